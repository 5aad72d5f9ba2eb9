"""Particle picking: template matching in tomograms (:mod:`.template_matching`) and peaks
above a false-alarm cut-off (:mod:`.peaks`)."""

from subtomo.picking.peaks import (
    TailFit,
    false_alarm_cutoff,
    find_peaks,
    noise_tail,
    tail_cutoff,
)
from subtomo.picking.template_matching import (
    MatchResult,
    TiltCtf,
    match_template,
    rotate_volumes,
    tilt_weights,
)

__all__ = [
    "MatchResult",
    "TailFit",
    "TiltCtf",
    "false_alarm_cutoff",
    "find_peaks",
    "match_template",
    "noise_tail",
    "rotate_volumes",
    "tail_cutoff",
    "tilt_weights",
]
