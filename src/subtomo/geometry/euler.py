"""RELION's ZYZ Euler angles (rot, tilt, psi in degrees) and rotation matrices.

The matrix ``A = euler_to_matrix(rot, tilt, psi)`` is RELION's ``Euler_angles2matrix``:
it maps *reference* coordinates to *image/subtomogram* coordinates (xyz column vectors),
``A = Rz(psi)^T @ Ry(tilt)^T @ Rz(rot)^T``, i.e. the transpose of scipy's intrinsic
``Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix()``.
An image is the reference rotated by ``A`` and projected along z; in Fourier space
``F_img(k) = F_ref(A^T k)``. Row 3 of ``A`` is the viewing direction in reference axes.
"""

from __future__ import annotations

import torch

__all__ = ["euler_to_matrix", "matrix_to_euler", "rotation_angle_deg"]


def euler_to_matrix(
    rot: torch.Tensor | float, tilt: torch.Tensor | float, psi: torch.Tensor | float
) -> torch.Tensor:
    """RELION rotation matrices ``(..., 3, 3)`` from ZYZ Euler angles in degrees."""
    rot, tilt, psi = torch.broadcast_tensors(*(torch.as_tensor(a) for a in (rot, tilt, psi)))
    if not rot.is_floating_point():
        rot, tilt, psi = rot.double(), tilt.double(), psi.double()
    a, b, g = torch.deg2rad(rot), torch.deg2rad(tilt), torch.deg2rad(psi)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def matrix_to_euler(matrix: torch.Tensor) -> torch.Tensor:
    """ZYZ Euler angles ``(..., 3)`` = (rot, tilt, psi) in degrees from RELION matrices.

    tilt is in [0, 180]; rot and psi in (-180, 180]. At tilt 0 or 180 (gimbal lock) rot
    is set to 0 and the whole in-plane angle goes to psi, as RELION does.
    """
    m = torch.as_tensor(matrix)
    sin_tilt = torch.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    tilt = torch.atan2(sin_tilt, m[..., 2, 2])
    rot = torch.atan2(m[..., 2, 1], m[..., 2, 0])
    psi = torch.atan2(m[..., 1, 2], -m[..., 0, 2])
    locked = sin_tilt < 16 * torch.finfo(m.dtype).eps
    up = m[..., 2, 2] > 0
    psi_locked = torch.where(
        up, torch.atan2(m[..., 0, 1], m[..., 0, 0]), torch.atan2(m[..., 0, 1], -m[..., 0, 0])
    )
    rot = torch.where(locked, torch.zeros_like(rot), rot)
    psi = torch.where(locked, psi_locked, psi)
    tilt = torch.where(locked, torch.where(up, 0.0, torch.full_like(tilt, torch.pi)), tilt)
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))


def rotation_angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in degrees of the rotation ``a @ b^T`` taking ``b`` to ``a`` (…, 3, 3)."""
    trace = (a * b).sum(dim=(-2, -1))
    return torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0)))
