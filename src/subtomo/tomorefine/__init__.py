"""Tomography refinement of the acquisition: frame alignment (per-tilt alignment and particle
motion, :mod:`subtomo.tomorefine.frame_align`) against the half maps."""

from subtomo.tomorefine.frame_align import (
    FrameAlignSettings,
    SeriesFit,
    SeriesObservations,
    align_series,
    observe_series,
)
from subtomo.tomorefine.motion import gp_basis, gp_kernel

__all__ = [
    "FrameAlignSettings",
    "SeriesFit",
    "SeriesObservations",
    "align_series",
    "gp_basis",
    "gp_kernel",
    "observe_series",
]
