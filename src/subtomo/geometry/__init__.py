"""Geometry: RELION Euler angles, tilt-series projection, symmetry and orientation grids."""

from subtomo.geometry.euler import euler_to_matrix, matrix_to_euler, rotation_angle_deg
from subtomo.geometry.orientations import (
    healpix_directions,
    healpix_order_step_deg,
    local_orientations,
    orientation_grid,
    orientation_grid_by_step,
    surface_orientations,
)
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.geometry.tilt import (
    alignment_from_projection_matrices,
    particle_positions_px,
    project_particles,
    projection_matrices,
    tilt_rotations,
    tomogram_centre_px,
)

__all__ = [
    "alignment_from_projection_matrices",
    "euler_to_matrix",
    "healpix_directions",
    "healpix_order_step_deg",
    "local_orientations",
    "matrix_to_euler",
    "orientation_grid",
    "orientation_grid_by_step",
    "particle_positions_px",
    "project_particles",
    "projection_matrices",
    "rotation_angle_deg",
    "surface_orientations",
    "symmetry_matrices",
    "tilt_rotations",
    "tomogram_centre_px",
]
