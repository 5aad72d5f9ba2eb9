"""Refinement of the tilt-series model against the half maps: CTF refinement, frame alignment
(per-tilt alignment and particle motion) and the observed/predicted tilt patches they share."""

from subtomo.tomorefine.frame_align import (
    FrameAlignSettings,
    SeriesFit,
    SeriesGeometry,
    SeriesObservations,
    align_series,
    observe_particles,
)
from subtomo.tomorefine.motion import gp_basis, gp_kernel
from subtomo.tomorefine.predict import TiltPatches, TiltPredictor, fsc_weights, shell_noise_sums

__all__ = [
    "FrameAlignSettings",
    "SeriesFit",
    "SeriesGeometry",
    "SeriesObservations",
    "TiltPatches",
    "TiltPredictor",
    "align_series",
    "fsc_weights",
    "gp_basis",
    "gp_kernel",
    "observe_particles",
    "shell_noise_sums",
]
