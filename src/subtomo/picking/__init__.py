"""Picking: particles on vesicles and membranes (surface picking) from points or masks, and
picked positions as RELION 5 particle rows."""

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
from subtomo.picking.surfaces import (
    Ellipsoid,
    fit_ellipsoid,
    fit_sphere,
    mask_surfaces,
    sample_ellipsoid,
    sample_point_surface,
    thin_points,
)

__all__ = [
    "Ellipsoid",
    "LocatedPicks",
    "binned_shape",
    "centred_angst",
    "fit_ellipsoid",
    "fit_sphere",
    "inside_tomogram",
    "locate_picks",
    "mask_surfaces",
    "normals_of_rows",
    "particle_rows",
    "sample_ellipsoid",
    "sample_point_surface",
    "surface_particle_rows",
    "thin_points",
    "tomogram_binning",
]
