"""Post-processing: solvent-corrected FSC, resolution, sharpening and local resolution."""

# the FSC read-out lives in subtomo.fourier.resolution; these names stay importable here
from subtomo.fourier.resolution import FSC_THRESHOLD, crossing_shell, crossing_shells
from subtomo.postprocess.fsc_correction import (
    corrected_fsc,
    particle_fraction_fsc,
    randomize_phases_beyond,
    randomize_shell,
)
from subtomo.postprocess.localres import (
    LocalResOptions,
    LocalResResult,
    local_resolution,
    sample_points,
)
from subtomo.postprocess.pipeline import (
    PostprocessOptions,
    PostprocessResult,
    postprocess,
    solvent_fraction,
)
from subtomo.postprocess.sharpen import (
    GuinierFit,
    fit_guinier,
    fsc_weights,
    guinier_curve,
    mtf_weights,
)

__all__ = [
    "FSC_THRESHOLD",
    "GuinierFit",
    "LocalResOptions",
    "LocalResResult",
    "PostprocessOptions",
    "PostprocessResult",
    "corrected_fsc",
    "crossing_shell",
    "crossing_shells",
    "fit_guinier",
    "fsc_weights",
    "guinier_curve",
    "local_resolution",
    "mtf_weights",
    "particle_fraction_fsc",
    "postprocess",
    "randomize_phases_beyond",
    "randomize_shell",
    "sample_points",
    "solvent_fraction",
]
