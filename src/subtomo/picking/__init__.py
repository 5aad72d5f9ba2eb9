"""Particle picking: template matching in tomograms (:mod:`.template_matching`) and peaks
above a false-alarm cut-off (:mod:`.peaks`)."""

from subtomo.picking.peaks import false_alarm_cutoff, find_peaks, noise_tail
from subtomo.picking.template_matching import (
    MatchResult,
    TiltCtf,
    match_template,
    rotate_volumes,
    tilt_weights,
)

__all__ = [
    "MatchResult",
    "TiltCtf",
    "false_alarm_cutoff",
    "find_peaks",
    "match_template",
    "noise_tail",
    "rotate_volumes",
    "tilt_weights",
]
