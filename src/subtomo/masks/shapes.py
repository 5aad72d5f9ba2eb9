"""De novo masks: soft spheres, spherical shells ("crowns") and cylinders.

Volumes are zyx with the centre at index ``N//2``; ``center`` offsets are xyz pixels from
it (RELION's ``--center_x/y/z``). Radii and widths are pixels. Edges are raised cosines.

Why not ``torch_grid_utils.sphere``: evaluated with torch-grid-utils 0.6, its soft edge is a
quarter cosine ``cos(π/2 · d/w)`` of a scipy distance transform computed on the CPU, not
RELION's raised cosine ``½ + ½ cos(π · d/w)`` evaluated on the mask's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["crown_mask", "cylinder_mask", "radius_from", "soft_sphere"]


def radius_from(
    shape: Sequence[int],
    center: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Distance (pixels) of each voxel of a zyx ``shape`` from ``N//2 + center`` (xyz)."""
    axes = []
    for i, n in enumerate(shape):
        c = n // 2 + center[len(shape) - 1 - i]
        axes.append((torch.arange(n, device=device, dtype=torch.float32) - c) ** 2)
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(grids))


def _rising(d: torch.Tensor, start: float, width: float) -> torch.Tensor:
    """0 below ``start``, raised cosine to 1 at ``start + width``, 1 beyond."""
    if width <= 0:
        return (d >= start + width).float()
    t = ((d - start) / width).clamp(0.0, 1.0)
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def soft_sphere(
    shape: Sequence[int],
    radius: float,
    width: float,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """1 within ``radius``, raised cosine to 0 at ``radius + width`` (RELION's raisedCosineMask)."""
    d = radius_from(shape, center, device=device)
    return 1.0 - _rising(d, radius, width)


def crown_mask(
    shape: Sequence[int],
    inner_radius: float,
    outer_radius: float,
    width: float,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """1 for ``inner <= d < outer``, soft edges ``width`` wide outside both radii (RELION's
    raisedCrownMask; ``inner_radius = 0`` gives a solid soft sphere)."""
    d = radius_from(shape, center, device=device)
    inner = _rising(d, inner_radius - width, width) if inner_radius > 0 else torch.ones_like(d)
    return inner * (1.0 - _rising(d, outer_radius, width))


def cylinder_mask(
    shape: Sequence[int],
    inner_radius: float,
    outer_radius: float,
    height: float,
    width: float,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A (hollow) cylinder along z: the crown profile of the xy radius times a soft z extent
    of ``height`` pixels (1 for ``|z| < height/2``, raised cosine over ``width`` beyond)."""
    nz = shape[0]
    plane = crown_mask(shape[1:], inner_radius, outer_radius, width, center[:2], device=device)
    z = torch.arange(nz, device=device, dtype=torch.float32) - (nz // 2 + center[2])
    along = 1.0 - _rising(z.abs(), height / 2.0, width)
    return along[:, None, None] * plane[None]
