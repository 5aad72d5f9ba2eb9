"""Distances to a binary mask, by a separable min-plus transform on tensors.

``squared_distance_to(binary, max_distance)`` gives, for every voxel, the squared Euclidean
distance (in pixels) to the nearest ``True`` voxel whose offset lies in the cube
``+-ceil(max_distance)`` along every axis (RELION's search window), and ``inf`` when there is
none. It is exact inside that window: the 3D minimum of ``dz^2 + dy^2 + dx^2`` separates into
three 1D minimum passes. Voxels outside the box are never counted (no wrap-around).
"""

from __future__ import annotations

import math

import torch

__all__ = ["squared_distance_to"]


def _min_plus_pass(g: torch.Tensor, dim: int, reach: int) -> torch.Tensor:
    """``out[i] = min_{|o| <= reach} g[i + o] + o^2`` along ``dim`` (out of range: inf)."""
    n = g.shape[dim]
    pad_shape = list(g.shape)
    pad_shape[dim] = reach
    pad = torch.full(pad_shape, torch.inf, dtype=g.dtype, device=g.device)
    padded = torch.cat([pad, g, pad], dim=dim)
    out = g.clone()
    for o in range(1, reach + 1):
        out = torch.minimum(out, padded.narrow(dim, reach + o, n) + o * o)
        out = torch.minimum(out, padded.narrow(dim, reach - o, n) + o * o)
    return out


def squared_distance_to(binary: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Squared distance (pixels^2, float32) from each voxel to the nearest ``True`` voxel.

    ``binary`` is a boolean array of any dimension (zyx). Only offsets within
    ``+-ceil(max_distance)`` per axis are searched; farther voxels get ``inf``.
    """
    reach = max(0, math.ceil(abs(max_distance)))
    g = torch.where(binary, 0.0, torch.inf).float()
    if reach == 0:
        return g
    for dim in range(binary.ndim):
        g = _min_plus_pass(g, dim, reach)
    return g
