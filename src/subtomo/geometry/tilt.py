"""Tilt-series geometry: RELION 5 projection matrices and particle positions in tilt images.

Conventions (relion5-conventions.md §1.3–1.4). All vectors are xyz; pixel coordinates are
0-based with integer values at pixel centres, in *bin-1 tilt-series pixels* (size ``px``).

For tilt ``f`` the 4x4 affine projection matrix is::

    P_f = T(s_f/px + c_img) @ Rz(zrot) @ Ry(ytilt) @ Rx(xtilt) @ T(-c_spec)

with active right-handed rotations, ``s_f = (rlnTomoXShiftAngst, rlnTomoYShiftAngst, 0)``,
``c_img = (w//2, h//2, 0)`` and ``c_spec = (W//2, H//2, D//2)`` for a tilt image of ``w x h``
and a bin-1 tomogram of ``W x H x D``. ``P_f @ [p; 1]`` gives the image position ``(u, v)`` of
tomogram point ``p`` (decentred pixels); its third component is used only as depth.

Why not ``torch_affine_utils``' ``Rx``/``Ry``/``Rz``/``T``: evaluated with torch-affine-utils
0.6, they cast angles and shifts to float32, while these matrices keep the float64 of the
STAR tables, as RELION computes them (float32 rounding moves a point ~10⁴ pixels from the
centre by ~10⁻³ pixel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "alignment_from_projection_matrices",
    "particle_positions_px",
    "project_particles",
    "projection_matrices",
    "tilt_rotations",
    "tomogram_centre_px",
]


def _axis_rotation(angle_deg: torch.Tensor, axis: int) -> torch.Tensor:
    """Active right-handed rotation ``(..., 3, 3)`` by ``angle_deg`` about x (0), y (1) or z (2)."""
    t = torch.deg2rad(angle_deg)
    c, s = t.cos(), t.sin()
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    if axis == 0:
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == 1:
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def _as_float(x: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t if t.is_floating_point() else t.double()


def tilt_rotations(
    x_tilt_deg: torch.Tensor | float,
    y_tilt_deg: torch.Tensor | float,
    z_rot_deg: torch.Tensor | float,
) -> torch.Tensor:
    """``R_f = Rz(zrot) @ Ry(ytilt) @ Rx(xtilt)``, shape ``(..., 3, 3)``: tomogram -> tilt axes."""
    x, y, z = torch.broadcast_tensors(*(_as_float(a) for a in (x_tilt_deg, y_tilt_deg, z_rot_deg)))
    return _axis_rotation(z, 2) @ _axis_rotation(y, 1) @ _axis_rotation(x, 0)


def _spec_centre(tomogram_size: Sequence[int]) -> torch.Tensor:
    return torch.tensor([s // 2 for s in tomogram_size], dtype=torch.float64)


def tomogram_centre_px(tomogram_size: Sequence[int]) -> torch.Tensor:
    """``c_tomo = (W/2, H/2, D/2)`` in floating point: origin of centred coordinates."""
    return torch.tensor([s / 2 for s in tomogram_size], dtype=torch.float64)


def projection_matrices(
    x_tilt_deg: torch.Tensor,
    y_tilt_deg: torch.Tensor,
    z_rot_deg: torch.Tensor,
    x_shift_angst: torch.Tensor,
    y_shift_angst: torch.Tensor,
    pixel_size: float,
    tomogram_size: Sequence[int],
    image_size: Sequence[int],
) -> torch.Tensor:
    """RELION 5 projection matrices ``(t, 4, 4)`` for ``t`` tilts (float64).

    ``tomogram_size`` is (W, H, D) in bin-1 pixels; ``image_size`` is the tilt image (w, h).
    """
    rot = tilt_rotations(x_tilt_deg, y_tilt_deg, z_rot_deg).double()
    shifts = torch.stack(
        [_as_float(x_shift_angst).double(), _as_float(y_shift_angst).double()], dim=-1
    ) / float(pixel_size)
    c_img = torch.tensor([image_size[0] // 2, image_size[1] // 2], dtype=torch.float64)
    p = torch.zeros(*rot.shape[:-2], 4, 4, dtype=torch.float64)
    p[..., :3, :3] = rot
    p[..., :3, 3] = -(rot @ _spec_centre(tomogram_size))
    p[..., :2, 3] += shifts + c_img
    p[..., 3, 3] = 1.0
    return p


def alignment_from_projection_matrices(
    matrices: torch.Tensor,
    pixel_size: float,
    tomogram_size: Sequence[int],
    image_size: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Invert :func:`projection_matrices`: RELION's XTilt/YTilt/ZRot (deg) and shifts (Å).

    Uses RELION's decomposition ``xtilt = atan2(M21, M22)``, ``ytilt = asin(-M20)``,
    ``zrot = atan2(M10, M00)``. Keys are the per-tilt STAR column names.
    """
    p = torch.as_tensor(matrices, dtype=torch.float64)
    m = p[..., :3, :3]
    x_tilt = torch.rad2deg(torch.atan2(m[..., 2, 1], m[..., 2, 2]))
    y_tilt = torch.rad2deg(torch.asin((-m[..., 2, 0]).clamp(-1.0, 1.0)))
    z_rot = torch.rad2deg(torch.atan2(m[..., 1, 0], m[..., 0, 0]))
    c_img = torch.tensor([image_size[0] // 2, image_size[1] // 2], dtype=torch.float64)
    shifts_px = p[..., :2, 3] + (m @ _spec_centre(tomogram_size))[..., :2] - c_img
    shifts = shifts_px * float(pixel_size)
    return {
        "rlnTomoXTilt": x_tilt,
        "rlnTomoYTilt": y_tilt,
        "rlnTomoZRot": z_rot,
        "rlnTomoXShiftAngst": shifts[..., 0],
        "rlnTomoYShiftAngst": shifts[..., 1],
    }


def particle_positions_px(
    centered_coordinates_angst: torch.Tensor,
    pixel_size: float,
    tomogram_size: Sequence[int],
    origins_angst: torch.Tensor | None = None,
    subtomogram_matrices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Particle centres ``(n, 3)`` in decentred bin-1 tomogram pixels (float64).

    ``p = C/px + c_tomo - A_sub @ o/px`` with C = rlnCenteredCoordinate*Angst, o =
    rlnOrigin*Angst (in the subtomogram frame) and A_sub the subtomogram rotation (RELION
    matrix from rlnTomoSubtomogramRot/Tilt/Psi; identity if ``None``).
    """
    c = torch.as_tensor(centered_coordinates_angst, dtype=torch.float64)
    p = c / float(pixel_size) + tomogram_centre_px(tomogram_size)
    if origins_angst is not None:
        o = torch.as_tensor(origins_angst, dtype=torch.float64) / float(pixel_size)
        if subtomogram_matrices is not None:
            o = (torch.as_tensor(subtomogram_matrices, dtype=torch.float64) @ o[..., None])[..., 0]
        p = p - o
    return p


def project_particles(
    matrices: torch.Tensor,
    positions_px: torch.Tensor,
    tomogram_size: Sequence[int],
    trajectories_angst: torch.Tensor | None = None,
    pixel_size: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image positions and depths of ``n`` particles in ``t`` tilts.

    Parameters
    ----------
    matrices
        ``(t, 4, 4)`` projection matrices of one tilt series.
    positions_px
        ``(n, 3)`` particle centres in decentred bin-1 pixels (:func:`particle_positions_px`).
    trajectories_angst
        Optional ``(n, t, 3)`` per-tilt displacements in Å, tomogram axes (motion.star).
        They move the image position but not the depth used for the CTF, as in RELION.

    Returns
    -------
    uv
        ``(n, t, 2)`` image positions (x, y) in bin-1 pixels, 0-based, pixel centres integer.
    depth
        ``(n, t)`` depth offset in pixels, ``[R_f @ (p - c_tomo)]_z``.
    """
    p = torch.as_tensor(matrices, dtype=torch.float64)
    x = torch.as_tensor(positions_px, dtype=torch.float64)
    rot = p[:, :3, :3]  # (t, 3, 3)
    depth = torch.einsum("tj,nj->nt", rot[:, 2, :], x - tomogram_centre_px(tomogram_size))
    moved = x[:, None, :].expand(-1, p.shape[0], -1)
    if trajectories_angst is not None:
        moved = moved + torch.as_tensor(trajectories_angst, dtype=torch.float64) / pixel_size
    uv = torch.einsum("tij,ntj->nti", rot[:, :2, :], moved) + p[:, :2, 3]
    return uv, depth
