"""Solvent masks as ``relion_mask_create`` makes them (relion5-conventions section 9).

Steps: (optional low-pass, done by the caller) -> binary at ``>= threshold`` (or a logical
combination with a second map) -> extend (or shrink) by ``e`` pixels -> raised-cosine soft
edge ``w`` pixels wide -> optional inversion. Arrays are zyx; distances are in pixels.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from subtomo.masks.distance import squared_distance_to

__all__ = [
    "Combine",
    "automatic_mask",
    "binary_threshold",
    "extend_binary",
    "mask_from_map",
    "soft_edge",
    "suggest_threshold",
]

Combine = Literal["and", "or", "and_not", "or_not"]


def binary_threshold(
    volume: torch.Tensor,
    threshold: float,
    *,
    other: torch.Tensor | None = None,
    combine: Combine | None = None,
) -> torch.Tensor:
    """Initial binary mask: ``volume >= threshold``, or combined with a second map.

    With ``other`` RELION compares both maps strictly (``>``, and ``<`` for the "not" map):
    ``and``: both above; ``or``: either above; ``and_not``: volume above and other below;
    ``or_not``: volume above or other below.
    """
    if other is None or combine is None:
        return volume >= threshold
    if other.shape != volume.shape:
        raise ValueError(f"maps differ in shape: {tuple(volume.shape)} and {tuple(other.shape)}")
    a = volume > threshold
    if combine == "and":
        return a & (other > threshold)
    if combine == "or":
        return a | (other > threshold)
    if combine == "and_not":
        return a & (other < threshold)
    if combine == "or_not":
        return a | (other < threshold)
    raise ValueError(f"unknown combination {combine!r}")


def extend_binary(binary: torch.Tensor, pixels: float) -> torch.Tensor:
    """Grow (``pixels > 0``) or shrink (``< 0``) a boolean mask.

    Growing sets a voxel if some set voxel lies at distance ``< pixels``; shrinking clears a
    set voxel if some unset voxel lies at distance ``< |pixels|`` (RELION's rule).
    """
    if pixels == 0:
        return binary.clone()
    limit = pixels * pixels
    if pixels > 0:
        return binary | (squared_distance_to(binary, pixels) < limit)
    return binary & ~(squared_distance_to(~binary, pixels) < limit)


def soft_edge(binary: torch.Tensor, width: float) -> torch.Tensor:
    """Float mask: 1 inside, ``0.5 + 0.5 cos(pi d / width)`` at distance ``d < width`` outside."""
    mask = binary.float()
    if width <= 0:
        return mask
    d2 = squared_distance_to(binary, width)
    edge = 0.5 + 0.5 * torch.cos(math.pi * torch.sqrt(d2.clamp(max=width * width)) / width)
    return torch.where(binary, 1.0, torch.where(d2 < width * width, edge, 0.0))


def mask_from_map(
    volume: torch.Tensor,
    threshold: float,
    *,
    extend: float = 0.0,
    soft_edge_width: float = 0.0,
    invert: bool = False,
    other: torch.Tensor | None = None,
    combine: Combine | None = None,
) -> torch.Tensor:
    """Threshold, extend, soften and optionally invert: a mask in [0, 1] (float32, zyx).

    ``volume`` should already be low-passed if wanted (RELION filters only the first map).
    """
    binary = binary_threshold(volume, threshold, other=other, combine=combine)
    mask = soft_edge(extend_binary(binary, extend), soft_edge_width)
    return 1.0 - mask if invert else mask


def suggest_threshold(volume: torch.Tensor, bins: int = 256) -> float:
    """A binarisation threshold from the histogram: Otsu's between-class variance optimum.

    Solvent and density form the two classes; the value returned separates them best.
    """
    v = volume.detach().flatten().double()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, dtype=torch.float64, device=v.device) + 0.5) * (
        (hi - lo) / bins
    )
    p = hist / hist.sum()
    w0 = torch.cumsum(p, 0)
    m0 = torch.cumsum(p * centres, 0)
    total = m0[-1]
    w1 = 1.0 - w0
    between = (total * w0 - m0) ** 2 / (w0 * w1).clamp(min=1e-12)
    k = int(torch.argmax(between[:-1]))
    return float(centres[k] + (hi - lo) / bins / 2)


def automatic_mask(
    volume: torch.Tensor, *, extend: float = 3.0, soft_edge_width: float = 6.0
) -> torch.Tensor:
    """A loose solvent mask of a (low-passed) map with no threshold to choose: the binary at
    :func:`suggest_threshold`, extended by ``extend`` pixels with a ``soft_edge_width``-pixel
    raised-cosine edge (relion_postprocess's ``--auto_mask`` extension and edge)."""
    return mask_from_map(
        volume, suggest_threshold(volume), extend=extend, soft_edge_width=soft_edge_width
    )
