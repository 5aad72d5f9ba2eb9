"""The hidden-variable grid of one iteration: orientations, 3D offsets and their priors.

Orientations are RELION matrices ``A_part`` (reference -> subtomogram frame). Global
searches use a HEALPix grid reduced by the symmetry (shared by every particle); local
searches a Gaussian neighbourhood around each particle's current ``A_part`` (relion5-
conventions §7.1-7.2). Offsets are 3D, in Å in the subtomogram frame, on a cubic grid of
``offset_step_angst`` within a sphere of ``offset_range_angst`` around the current offset,
with a Gaussian prior of width ``sigma_offset_angst`` on the change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from subtomo.geometry import matrix_to_euler, rotation_angle_deg
from subtomo.geometry.orientations import local_orientations
from subtomo.ml.batch import ParticleBatch

__all__ = [
    "PoseGrid",
    "Sampling",
    "angle_prior_log",
    "oversample",
    "pose_grid",
    "translation_grid",
]


@dataclass(frozen=True)
class Sampling:
    """How poses are searched (RELION's "Sampling" tab).

    The grid is deterministic. ``align=False`` keeps each particle's current rotation and
    offset (classification without alignment). ``local_sigma_deg`` set means local searches
    with that Gaussian prior width, over ``local_n_sigma`` sigmas on a lattice of the HEALPix
    step of ``healpix_order``; otherwise the HEALPix grid of ``symmetry``'s asymmetric unit.
    ``oversampling`` 1 (RELION's default ``--oversampling 1``) adds a second pass at half the
    angular and offset steps around the significant poses of the first (0: one pass).
    ``sigma_tilt_deg``/``sigma_psi_deg`` add Gaussian priors around
    ``rlnAngleTilt/PsiPrior`` (``--sigma_tilt/--sigma_psi``).
    """

    healpix_order: int = 2
    offset_range_angst: float = 0.0
    offset_step_angst: float = 1.0
    local_sigma_deg: float | None = None
    local_n_sigma: float = 3.0
    symmetry: str = "C1"
    sigma_tilt_deg: float | None = None
    sigma_psi_deg: float | None = None
    align: bool = True
    oversampling: int = 1

    @property
    def step_deg(self) -> float:
        """HEALPix angular step ``360 / (6 2^order)``."""
        return 360.0 / (6 * 2**self.healpix_order)


@dataclass
class PoseGrid:
    """Trial poses for a batch of ``b`` particles.

    ``rotations`` ``(b or 1, J, 3, 3)`` trial ``A_part`` (1 when shared by the batch),
    ``log_prior_rot`` ``(b, J)``; ``offsets`` ``(b, T, 3)`` trial absolute offsets (Å),
    ``deltas`` ``(b, T, 3)`` their change from the current offset, ``log_prior_offset``
    ``(b, T)``.
    """

    rotations: torch.Tensor
    log_prior_rot: torch.Tensor
    offsets: torch.Tensor
    deltas: torch.Tensor
    log_prior_offset: torch.Tensor

    @property
    def n_rot(self) -> int:
        return self.rotations.shape[1]

    @property
    def n_trans(self) -> int:
        return self.deltas.shape[1]


def translation_grid(
    range_angst: float, step_angst: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """3D offsets ``(T, 3)`` Å on a cubic lattice of ``step`` within a sphere of ``range``.

    Always contains the zero offset (first); ordered by lattice index (deterministic).
    """
    if range_angst <= 0 or step_angst <= 0:
        return torch.zeros(1, 3, dtype=torch.float64, device=device)
    m = math.floor(range_angst / step_angst + 1e-9)
    ax = torch.arange(-m, m + 1, dtype=torch.float64, device=device) * step_angst
    g = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij")[::-1], dim=-1).reshape(-1, 3)
    g = g[torch.linalg.vector_norm(g, dim=-1) <= range_angst + 1e-9]
    order = torch.argsort(torch.linalg.vector_norm(g, dim=-1), stable=True)
    return g[order]


def angle_prior_log(
    rotations: torch.Tensor,
    priors_deg: torch.Tensor | None,
    sigma_tilt_deg: float | None,
    sigma_psi_deg: float | None,
) -> torch.Tensor | None:
    """Gaussian log prior on (tilt, psi) of trial rotations ``(b, J, 3, 3)`` -> ``(b, J)``.

    ``priors_deg`` ``(b, 2)`` prior centres (NaN: no prior for that angle). Psi differences
    wrap to (-180, 180].
    """
    if priors_deg is None or (sigma_tilt_deg is None and sigma_psi_deg is None):
        return None
    ang = matrix_to_euler(rotations.double())  # (b, J, 3)
    out = torch.zeros(ang.shape[:-1], dtype=torch.float64, device=rotations.device)
    for col, sigma in ((1, sigma_tilt_deg), (2, sigma_psi_deg)):
        if sigma is None or sigma <= 0:
            continue
        d = ang[..., col] - priors_deg[:, None, col - 1].double()
        d = torch.remainder(d + 180.0, 360.0) - 180.0
        out = out + torch.nan_to_num(-(d**2) / (2 * sigma**2), nan=0.0)
    return out


def pose_grid(
    sampling: Sampling,
    batch: ParticleBatch,
    sigma_offset_angst: float,
    global_rotations: torch.Tensor | None = None,
) -> PoseGrid:
    """The trial poses of ``batch``.

    ``global_rotations`` ``(J, 3, 3)`` (from :func:`subtomo.geometry.orientations.
    orientation_grid`) is used for global searches; local searches and ``align=False``
    build per-particle sets.
    """
    device = batch.data.device
    b = batch.size
    if not sampling.align:
        rot = batch.rotations[:, None].double()
        log_rot = torch.zeros(b, 1, dtype=torch.float64, device=device)
        deltas = torch.zeros(1, 3, dtype=torch.float64, device=device)
    else:
        if sampling.local_sigma_deg is not None:
            rot, log_rot = local_orientations(
                batch.rotations.double(),
                sampling.local_sigma_deg,
                sampling.step_deg,
                n_sigma=sampling.local_n_sigma,
            )
            rot, log_rot = rot.to(device).double(), log_rot.to(device).double()
        else:
            if global_rotations is None:
                raise ValueError("global searches need the orientation grid")
            rot = global_rotations.to(device).double()[None]
            log_rot = torch.zeros(b, rot.shape[1], dtype=torch.float64, device=device)
        deltas = translation_grid(
            sampling.offset_range_angst, sampling.offset_step_angst, device=device
        )
        prior = angle_prior_log(
            rot.expand(b, -1, -1, -1),
            batch.angle_priors,
            sampling.sigma_tilt_deg,
            sampling.sigma_psi_deg,
        )
        if prior is not None:
            log_rot = log_rot + prior
    deltas = deltas[None].expand(b, -1, -1)
    offsets = batch.offsets.double()[:, None, :] + deltas
    return PoseGrid(rot, log_rot, offsets, deltas, _offset_prior(deltas, sigma_offset_angst))


def _offset_prior(deltas: torch.Tensor, sigma_offset_angst: float) -> torch.Tensor:
    """Gaussian log prior ``-|delta|^2 / (2 sigma^2)`` ``(b, T)`` (zero when sigma <= 0)."""
    if sigma_offset_angst <= 0:
        return torch.zeros(deltas.shape[:2], dtype=torch.float64, device=deltas.device)
    return -(deltas**2).sum(-1) / (2 * sigma_offset_angst**2)


def _corner_rotations(half_step_deg: float, device: torch.device) -> torch.Tensor:
    """The 8 rotations ``exp([v]_x)`` with rotation vectors ``v`` in ``{+-h}^3`` ``(8, 3, 3)``."""
    h = math.radians(half_step_deg)
    v = torch.cartesian_prod(*[torch.tensor([-h, h], dtype=torch.float64, device=device)] * 3)
    zero = torch.zeros_like(v[:, 0])
    skew = torch.stack(
        [
            torch.stack([zero, -v[:, 2], v[:, 1]], -1),
            torch.stack([v[:, 2], zero, -v[:, 0]], -1),
            torch.stack([-v[:, 1], v[:, 0], zero], -1),
        ],
        -2,
    )
    return torch.linalg.matrix_exp(skew)


def oversample(
    sampling: Sampling,
    batch: ParticleBatch,
    poses: PoseGrid,
    weights: torch.Tensor,
    sigma_offset_angst: float,
) -> PoseGrid:
    """RELION's adaptive oversampling: the finer poses around the significant coarse ones.

    ``weights`` ``(b, C, J, T)`` from the coarse pass. For each particle the coarse rotations
    and offsets with non-zero weight (the same number for all particles: the most probable
    ones, so a particle with fewer significant poses gets a few extra, still valid, poses)
    are replaced by 8 children each: rotations ``exp([v]_x) A`` with ``v`` in
    ``{+-step/4}^3`` (spacing step/2) and offsets ``t + {+-step/4}^3`` Å. Priors are
    re-evaluated at the children (local: Gaussian in the angle to the current rotation).
    """
    b = batch.size
    device = weights.device
    w_rot = weights.sum(dim=(1, 3))  # (b, J)
    w_tr = weights.sum(dim=(1, 2))  # (b, T)
    n_rot = int((w_rot > 0).sum(1).max())
    n_tr = int((w_tr > 0).sum(1).max())
    j_idx = torch.topk(w_rot, n_rot, dim=1).indices  # (b, nj)
    t_idx = torch.topk(w_tr, n_tr, dim=1).indices  # (b, nt)
    rot = poses.rotations.expand(b, -1, -1, -1)
    rot = torch.gather(rot, 1, j_idx[..., None, None].expand(-1, -1, 3, 3))  # (b, nj, 3, 3)
    rot = _corner_rotations(sampling.step_deg / 4, device)[None, None] @ rot[:, :, None]
    rot = rot.reshape(b, -1, 3, 3)
    log_rot = torch.zeros(rot.shape[:2], dtype=torch.float64, device=device)
    if sampling.local_sigma_deg is not None:
        angle = rotation_angle_deg(rot, batch.rotations.double()[:, None])
        log_rot = -(angle**2) / (2 * sampling.local_sigma_deg**2)
    prior = angle_prior_log(
        rot, batch.angle_priors, sampling.sigma_tilt_deg, sampling.sigma_psi_deg
    )
    if prior is not None:
        log_rot = log_rot + prior
    deltas = torch.gather(poses.deltas, 1, t_idx[..., None].expand(-1, -1, 3))  # (b, nt, 3)
    if sampling.offset_range_angst > 0:
        h = sampling.offset_step_angst / 4
        corners = torch.cartesian_prod(*[torch.tensor([-h, h], dtype=torch.float64)] * 3)
        deltas = (deltas[:, :, None] + corners.to(device)[None, None]).reshape(b, -1, 3)
    offsets = batch.offsets.double()[:, None, :] + deltas
    return PoseGrid(rot, log_rot, offsets, deltas, _offset_prior(deltas, sigma_offset_angst))
