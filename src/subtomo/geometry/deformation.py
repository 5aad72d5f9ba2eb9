"""Smooth 2D deformations of tilt images (conventions §24; subtomo's own model).

A deformation moves every point of tilt image ``f`` by a displacement field ``d_f(u, v)``
(bin-1 px) on top of the rigid projection of §1.3: the particle seen at ``uv`` by the
projection matrices is found at ``uv + d_f(uv)``. ``d_f`` is the bilinear interpolation of
its values at a grid of ``g_x × g_y`` nodes spread evenly over the image, from pixel 0 to
``w − 1`` and ``h − 1`` (constant beyond them). The field is stored as ``(t, g_y, g_x, 2)``
(xy displacements, nodes row by row from the image's first row); in tomograms.star as
``subtomoDeformationGridSizeX/Y`` (global row) and per tilt ``subtomoDeformationCoefficients``
(the ``g_x·g_y`` x displacements, then the y ones). RELION 5's own deformation columns
(``rlnTomoDeformation*``) describe other models and are not read (a warning says so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["deformation_shift"]


def deformation_shift(
    uv: torch.Tensor, field: torch.Tensor, image_size: tuple[int, int]
) -> torch.Tensor:
    """``d_f(uv)`` ``(n, t, 2)`` (px) at image positions ``uv`` ``(n, t, 2)`` (bin-1 px) of
    a field ``(t, g_y, g_x, 2)`` over images of ``image_size`` (w, h); differentiable."""
    w, h = image_size
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=uv.dtype)
    grid = (uv.to(field.dtype) * scale.to(field.device, field.dtype) - 1).transpose(0, 1)
    sampled = F.grid_sample(
        field.permute(0, 3, 1, 2), grid[:, :, None, :], mode="bilinear",
        padding_mode="border", align_corners=True,
    )  # fmt: skip  # (t, 2, n, 1)
    return sampled[..., 0].permute(2, 0, 1)
