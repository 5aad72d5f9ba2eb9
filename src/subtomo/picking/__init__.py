"""Picking: template matching in tomograms (:mod:`.template_matching`) with peaks above a
false-alarm cut-off (:mod:`.peaks`); particles on vesicles and membranes (surface picking)
from points or masks (:mod:`.surfaces`); picked positions as RELION 5 particle rows
(:mod:`.coordinates`)."""

from subtomo.picking.coordinates import (
    LocatedPicks,
    binned_shape,
    centred_angst,
    inside_tomogram,
    locate_picks,
    normals_of_rows,
    particle_rows,
    surface_particle_rows,
    tomogram_binning,
)
from subtomo.picking.peaks import (
    TailFit,
    false_alarm_cutoff,
    find_peaks,
    noise_tail,
    tail_cutoff,
)
from subtomo.picking.surfaces import (
    Ellipsoid,
    fit_ellipsoid,
    fit_sphere,
    mask_surfaces,
    sample_ellipsoid,
    sample_point_surface,
    thin_points,
)
from subtomo.picking.template_matching import (
    MatchResult,
    match_template,
    rotate_volumes,
    tilt_weights,
)

__all__ = [
    "Ellipsoid",
    "LocatedPicks",
    "MatchResult",
    "TailFit",
    "binned_shape",
    "centred_angst",
    "false_alarm_cutoff",
    "find_peaks",
    "fit_ellipsoid",
    "fit_sphere",
    "inside_tomogram",
    "locate_picks",
    "mask_surfaces",
    "match_template",
    "noise_tail",
    "normals_of_rows",
    "particle_rows",
    "rotate_volumes",
    "sample_ellipsoid",
    "sample_point_surface",
    "surface_particle_rows",
    "tail_cutoff",
    "thin_points",
    "tilt_weights",
    "tomogram_binning",
]
