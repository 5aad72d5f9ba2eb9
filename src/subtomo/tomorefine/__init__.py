"""Refinement of the tilt-series model against the half maps: CTF refinement (and the
observed/predicted tilt patches it shares with frame alignment)."""

from subtomo.tomorefine.predict import TiltPatches, TiltPredictor, fsc_weights, shell_noise_sums

__all__ = ["TiltPatches", "TiltPredictor", "fsc_weights", "shell_noise_sums"]
