"""Typed views of RELION 5 tomogram, particle, optimisation-set and trajectory files."""

from subtomo.data.inputs import read_particle_inputs
from subtomo.data.maps import (
    MASK_TOLERANCE,
    PIXEL_SIZE_TOLERANCE_ANGST,
    HalfMaps,
    read_half_maps,
    read_map_checked,
)
from subtomo.data.mtf import read_mtf
from subtomo.data.optimisation_set import OptimisationSet
from subtomo.data.particles import (
    DEFOCUS_OFFSET,
    ParticleSet,
    pixel_size_of,
    stack_image_indices,
)
from subtomo.data.paths import relative_to_cwd, resolve_path, strip_image_name
from subtomo.data.tomograms import (
    DEFOCUS_ESTIMATE,
    TiltSeries,
    TomogramSet,
    deformation_columns,
    prefetched_tilt_images,
    read_tilt,
    tilt_images,
)
from subtomo.data.trajectories import Trajectories
from subtomo.data.validate import require_box_fits, require_particles, validate_particles

__all__ = [
    "DEFOCUS_ESTIMATE",
    "DEFOCUS_OFFSET",
    "MASK_TOLERANCE",
    "PIXEL_SIZE_TOLERANCE_ANGST",
    "HalfMaps",
    "OptimisationSet",
    "ParticleSet",
    "TiltSeries",
    "TomogramSet",
    "Trajectories",
    "deformation_columns",
    "pixel_size_of",
    "prefetched_tilt_images",
    "read_half_maps",
    "read_map_checked",
    "read_mtf",
    "read_particle_inputs",
    "read_tilt",
    "relative_to_cwd",
    "require_box_fits",
    "require_particles",
    "resolve_path",
    "stack_image_indices",
    "strip_image_name",
    "tilt_images",
    "validate_particles",
]
