"""Orientation grids: RELION's HEALPix sampling (global) and local neighbourhoods (priors).

Angles are RELION ZYZ Euler angles (rot, tilt, psi) in degrees and matrices are RELION's
``A = euler_to_matrix(rot, tilt, psi)`` (reference -> image coordinates; see
:mod:`subtomo.geometry.euler`). A *direction* (rot, tilt) is the viewing direction, row 3 of
``A``, i.e. the unit vector ``(sin tilt cos rot, sin tilt sin rot, cos tilt)`` in reference
axes. Directions are the centres of the HEALPix pixels (``healpix`` package, NESTED scheme,
as RELION orders them) with ``nside = 2**order``; psi is sampled with the same angular step
``360 / (6 nside)``; orientation index = direction index * n_psi + psi index.
"""

from __future__ import annotations

import math

import healpix
import numpy as np
import torch

from subtomo.errors import InputError
from subtomo.geometry.euler import euler_to_matrix
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.geometry.tilt import tilt_rotations

__all__ = [
    "healpix_directions",
    "healpix_order_step_deg",
    "local_orientations",
    "orientation_grid",
    "orientation_grid_by_step",
    "surface_orientations",
]

# A generic pole (tilt 10°, rot 37°) fixed by no rotation of any supported group: each
# symmetry-equivalent set of directions keeps the member closest to it (its Dirichlet cell,
# a fundamental domain; for Cn the wedge |rot - 37°| <= 180°/n, for Dn also tilt <= 90°).
_POLE = (
    math.sin(math.radians(10.0)) * math.cos(math.radians(37.0)),
    math.sin(math.radians(10.0)) * math.sin(math.radians(37.0)),
    math.cos(math.radians(10.0)),
)


def healpix_order_step_deg(order: int) -> float:
    """RELION's angular step in degrees for a HEALPix order: ``360 / (6 * 2**order)``."""
    return 360.0 / (6 * 2**order)


def healpix_directions(
    order: int, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rot, tilt) in degrees, float64 ``(12 * 4**order,)``: the HEALPix pixel centres.

    ``tilt`` is the colatitude in [0, 180] and ``rot`` the longitude in [0, 360), NESTED order.
    """
    if not 0 <= order <= 13:
        raise InputError(f"HEALPix order must be in 0..13, got {order}")
    nside = 2**order
    theta, phi = healpix.pix2ang(nside, np.arange(12 * nside * nside), nest=True)
    rot = torch.from_numpy(np.mod(np.degrees(phi), 360.0)).to(device)
    tilt = torch.from_numpy(np.degrees(theta)).to(device)
    return rot, tilt


def _direction_vectors(rot: torch.Tensor, tilt: torch.Tensor) -> torch.Tensor:
    """Unit xyz viewing directions ``(..., 3)`` of (rot, tilt) in degrees (row 3 of A)."""
    r, t = torch.deg2rad(rot), torch.deg2rad(tilt)
    return torch.stack([t.sin() * r.cos(), t.sin() * r.sin(), t.cos()], dim=-1)


def _asymmetric_unit(directions: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Bool ``(n,)``: directions ``d`` (n, 3) with ``d·p >= (R d)·p`` for all R of ``group``.

    Orientations ``A`` and ``A R`` give the same projection of a map with ``V(R x) = V(x)``
    and their directions are related by ``R^T``, so directions are equivalent under the group.
    """
    pole = torch.tensor(_POLE, dtype=directions.dtype, device=directions.device)
    images = pole @ group.to(directions)  # (g, 3): p^T R, so (R d)·p = d·(R^T p)
    scores = directions @ images.T  # (n, g)
    return scores[:, 0] >= scores.amax(dim=1) - 1e-9  # group[0] is the identity


def orientation_grid(
    order: int, symmetry: str | None = None, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global grid of RELION orientations: angles ``(m, 3)`` degrees and matrices ``(m, 3, 3)``.

    Every HEALPix direction of ``order`` combined with psi = 0, step, ..., 360 - step
    (``step = healpix_order_step_deg(order)``), direction-major; float64. With ``symmetry``
    (e.g. "D7", "I"), only one direction per symmetry-equivalent set is kept (an asymmetric
    unit, as RELION does), so ``m`` is about ``12 * 4**order * 6 * 2**order / |G|``.
    """
    rot, tilt = healpix_directions(order, device=device)
    return _with_psi(rot, tilt, 6 * 2**order, symmetry)


def orientation_grid_by_step(
    step_deg: float, symmetry: str | None = None, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`orientation_grid` for any angular step (template matching's 7°, say).

    Directions are HEALPix pixel centres (RING scheme, which allows any ``nside``) with
    ``nside = ceil(60 / step_deg)``; psi steps by ``360 / (6 nside)``, so the step used is at
    most ``step_deg`` and equals RELION's for ``step_deg = healpix_order_step_deg(order)``
    (the directions then come in another order).
    """
    if not 0.1 <= step_deg <= 60.0:
        raise InputError(f"the angular step must be in [0.1, 60] degrees, got {step_deg:g}")
    nside = math.ceil(60.0 / step_deg - 1e-9)
    theta, phi = healpix.pix2ang(nside, np.arange(12 * nside * nside), nest=False)
    rot = torch.from_numpy(np.mod(np.degrees(phi), 360.0)).to(device)
    tilt = torch.from_numpy(np.degrees(theta)).to(device)
    return _with_psi(rot, tilt, 6 * nside, symmetry)


def _with_psi(
    rot: torch.Tensor, tilt: torch.Tensor, n_psi: int, symmetry: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions (of one asymmetric unit with ``symmetry``) times ``n_psi`` psi angles."""
    device = rot.device
    if symmetry is not None:
        group = symmetry_matrices(symmetry, device=device)
        keep = _asymmetric_unit(_direction_vectors(rot, tilt), group)
        rot, tilt = rot[keep], tilt[keep]
    psi = torch.arange(n_psi, dtype=torch.float64, device=device) * (360.0 / n_psi)
    angles = torch.stack(
        [
            rot[:, None].expand(-1, n_psi),
            tilt[:, None].expand(-1, n_psi),
            psi[None, :].expand(len(rot), -1),
        ],
        dim=-1,
    ).reshape(-1, 3)
    return angles, euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])


def local_orientations(
    centres: torch.Tensor, sigma_deg: float, step_deg: float, n_sigma: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orientations around each centre and their Gaussian log prior.

    ``centres`` are RELION matrices ``(b, 3, 3)``. The offsets are the rotations whose
    rotation vectors lie on a cubic lattice of spacing ``step_deg`` (degrees) within a ball
    of radius ``n_sigma * sigma_deg`` (the zero offset included); each is applied in the image
    frame, ``A' = D @ A``. Returns matrices ``(b, m, 3, 3)`` and ``log_prior (b, m)`` =
    ``-d² / (2 sigma²)`` with ``d`` the offset's rotation angle in degrees (unnormalised).
    A rotation within the ball lies within about ``step·√3/2`` of one of the grid rotations.
    """
    radius = n_sigma * sigma_deg
    k = math.floor(radius / step_deg)
    axis = torch.arange(-k, k + 1, dtype=centres.dtype, device=centres.device) * step_deg
    vectors = torch.cartesian_prod(axis, axis, axis).reshape(-1, 3)  # (M, 3) degrees
    angle = vectors.norm(dim=-1)
    vectors, angle = vectors[angle <= radius + 1e-9], angle[angle <= radius + 1e-9]  # (m, 3)
    v = torch.deg2rad(vectors)
    zero = torch.zeros_like(v[:, 0])
    skew = torch.stack(
        [
            torch.stack([zero, -v[:, 2], v[:, 1]], dim=-1),
            torch.stack([v[:, 2], zero, -v[:, 0]], dim=-1),
            torch.stack([-v[:, 1], v[:, 0], zero], dim=-1),
        ],
        dim=-2,
    )  # (m, 3, 3)
    offsets = torch.linalg.matrix_exp(skew)  # (m, 3, 3)
    matrices = offsets[None] @ centres[:, None]  # (b, m, 3, 3)
    log_prior = (-0.5 * (angle / sigma_deg) ** 2).expand(len(centres), -1)
    return matrices, log_prior


def surface_orientations(
    normals: np.ndarray, in_plane_deg: np.ndarray | float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """RELION's split of a surface pick into subtomogram and particle rotations.

    The particle's reference z axis lies along the normal ``n`` (xyz, tomogram axes) and it is
    turned by ``in_plane_deg`` about it: ``A = O @ Rz(φ)`` with ``O = Rz(α) Ry(β)``, ``O e_z =
    n``. As RELION 5's sphere and filament pickers write it (relion5-upstream.md §7.2),
    ``A_sub = O @ Ry(90)`` (rlnTomoSubtomogramRot/Tilt/Psi) and ``A_part = A_sub^T A``, whose
    angles are (rot, tilt, psi) = (-φ, 90, 0), so the priors are rlnAngleTiltPrior = 90 and
    rlnAnglePsiPrior = 0: ``--sigma_tilt``/``--sigma_psi`` restrain the normal and leave the
    in-plane angle (rlnAngleRot) free. Returns ``(A_sub, A_part)``, float64 ``(n, 3, 3)``.
    """
    n = normals / np.linalg.norm(normals, axis=1, keepdims=True)
    beta = torch.rad2deg(torch.arccos(torch.as_tensor(n[:, 2]).clamp(-1.0, 1.0)))
    alpha = torch.rad2deg(torch.atan2(torch.as_tensor(n[:, 1]), torch.as_tensor(n[:, 0])))
    zero = torch.zeros_like(beta)
    phi = torch.as_tensor(in_plane_deg, dtype=torch.float64).expand_as(beta)
    frame = tilt_rotations(zero, beta, alpha)  # Rz(α) Ry(β): e_z -> n
    ry90 = tilt_rotations(zero[:1], zero[:1] + 90.0, zero[:1])
    a_sub = frame @ ry90
    a_part = a_sub.transpose(-1, -2) @ frame @ tilt_rotations(zero, zero, phi)
    return a_sub.numpy(), a_part.numpy()
