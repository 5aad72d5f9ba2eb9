"""Edits of particle geometry: recentring on a point of the reference."""

from __future__ import annotations

import torch

__all__ = ["recentred_origins"]


def recentred_origins(
    origins_angst: torch.Tensor,
    particle_matrices: torch.Tensor,
    point_px: torch.Tensor,
    pixel_size: torch.Tensor | float,
) -> torch.Tensor:
    """New rlnOrigin*Angst ``(n, 3)`` that put reference point ``point_px`` at the box centre.

    ``point_px`` is (x, y, z) in pixels of the reference box relative to its centre (as
    ``relion_star_handler --center_X/Y/Z``); ``pixel_size`` is each particle's
    rlnImagePixelSize. A reference point r appears at ``C - A_sub (o - A_part r)``, so the new
    origin is ``o - A_part r`` (only the refined angles enter: origins live in the
    subtomogram frame).
    """
    r = torch.as_tensor(point_px, dtype=torch.float64)
    px = torch.as_tensor(pixel_size, dtype=torch.float64).reshape(-1, 1)
    moved = (torch.as_tensor(particle_matrices, dtype=torch.float64) @ r) * px
    return torch.as_tensor(origins_angst, dtype=torch.float64) - moved
