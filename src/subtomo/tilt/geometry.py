"""Where a tilted specimen plane lies in its tilt image: depth and defocus across the image.

For tilt ``f`` with rotation ``M = R_f`` (specimen -> tilt axes, relion5-conventions.md §1.3),
a point ``s = (x, y, z)`` of the specimen (pixels from the specimen centre) appears at image
offset ``(u, v) = M[:2] s`` from the image centre, at depth ``d = M[2] s``. The specimen
mid-plane ``z = 0`` therefore has depth ``d = g · (u, v)`` with
``g = M[2, :2] @ inv(M[:2, :2])`` (pixels of depth per image pixel). With
``ΔU' = ΔU + hand · slope · px · d`` (§1.4), the defocus across a tilted image is the central
defocus plus ``hand · slope · px · g · (u, v)``: for ``R_f = Rz(φ) Ry(θ)``,
``g = -tan θ · (cos φ, sin φ)``, zero along the tilt axis.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from subtomo.geometry import tilt_rotations

__all__ = ["depth_gradient", "slab_depth_factor", "table_rotations"]


def table_rotations(tilts: pd.DataFrame) -> torch.Tensor:
    """``R_f`` float64 ``(t, 3, 3)`` of a per-tilt table: rlnTomoXTilt/YTilt/ZRot when the
    series is aligned, else the nominal stage tilt and ``rlnTomoNominalTiltAxisAngle`` as the Z
    rotation (both counter-clockwise from image y: a real aligned EMPIAR-10164 series has
    ZRot 85.27 for a nominal 85, §14)."""

    def column(name: str, default: float) -> torch.Tensor:
        values = tilts[name] if name in tilts.columns else np.full(len(tilts), default)
        return torch.tensor(np.asarray(values, dtype=np.float64))

    if "rlnTomoYTilt" in tilts.columns:
        y_tilt, z_rot = column("rlnTomoYTilt", 0.0), column("rlnTomoZRot", 0.0)
    else:
        y_tilt = column("rlnTomoNominalStageTiltAngle", 0.0)
        z_rot = column("rlnTomoNominalTiltAxisAngle", 0.0)
    return tilt_rotations(column("rlnTomoXTilt", 0.0), y_tilt, z_rot)


def depth_gradient(rotations: torch.Tensor) -> torch.Tensor:
    """``g`` ``(..., 2)``: depth of the specimen mid-plane per image pixel along image x, y."""
    m = rotations.to(torch.float64)
    return (m[..., 2:3, :2] @ torch.linalg.inv(m[..., :2, :2]))[..., 0, :]


def slab_depth_factor(rotations: torch.Tensor) -> torch.Tensor:
    """``(...)``: depth change per unit of height above the mid-plane, at a fixed image point
    (``1/cos θ`` for ``Rz Ry(θ)``): a slab ``T`` thick spans ``T · factor`` of defocus."""
    m = rotations.to(torch.float64)
    g = depth_gradient(m)
    return m[..., 2, 2] - (g * m[..., :2, 2]).sum(-1)
