"""Reconstruction: Fourier accumulators (insertion, symmetry, merging) and finalisation."""

from subtomo.reconstruct.accumulator import FourierAccumulator
from subtomo.reconstruct.finalise import Reconstruction, reconstruct

__all__ = ["FourierAccumulator", "Reconstruction", "reconstruct"]
