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
    ``(b, T)``. Every (class, rotation, offset) is a pose unless ``block_class`` ``(b, S)``
    is set (the oversampled grids of :func:`oversample`): then the rotations form ``S``
    consecutive blocks of ``J/S`` and the offsets ``S`` blocks of ``T/S``; the poses of
    block ``s`` are its rotations x its offsets for class ``block_class[:, s]`` only (-1:
    unused block), and scores/weights ``(b, C, J, T/S)`` index the offset within the block
    of the rotation (:meth:`offset_index`).
    """

    rotations: torch.Tensor
    log_prior_rot: torch.Tensor
    offsets: torch.Tensor
    deltas: torch.Tensor
    log_prior_offset: torch.Tensor
    block_class: torch.Tensor | None = None

    @property
    def n_rot(self) -> int:
        return self.rotations.shape[1]

    @property
    def n_trans(self) -> int:
        """Offsets per rotation (the last axis of scores and weights)."""
        n = self.deltas.shape[1]
        return n if self.block_class is None else n // self.block_class.shape[1]

    def offset_index(self, j: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Index into ``offsets``/``deltas`` of the pose (rotation ``j``, offset ``t``)."""
        if self.block_class is None:
            return t
        return (
            torch.div(j, self.n_rot // self.block_class.shape[1], rounding_mode="floor")
            * (self.n_trans)
            + t
        )

    def log_prior(self) -> torch.Tensor:
        """Rotation plus offset log prior of every pose ``(b, J, T)``."""
        idx = self.offset_index(
            torch.arange(self.n_rot, device=self.deltas.device)[:, None],
            torch.arange(self.n_trans, device=self.deltas.device)[None],
        )
        return self.log_prior_rot[:, :, None] + self.log_prior_offset[:, idx]


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


def _corner_offsets(half_step_angst: float, device: torch.device) -> torch.Tensor:
    """The 8 offsets ``{+-h}^3`` Å ``(8, 3)``."""
    h = torch.tensor([-half_step_angst, half_step_angst], dtype=torch.float64, device=device)
    return torch.cartesian_prod(h, h, h)


def oversample(
    sampling: Sampling,
    batch: ParticleBatch,
    poses: PoseGrid,
    weights: torch.Tensor,
    sigma_offset_angst: float,
) -> PoseGrid:
    """RELION's adaptive oversampling: the children of each particle's significant poses.

    ``weights`` ``(b, C, J, T)`` from the coarse pass (non-zero: significant). Each
    significant coarse (class c, rotation j, offset t) is replaced by its 8 x 8 children:
    rotations ``exp([v]_x) A_j`` with ``v`` in ``{+-step/4}^3`` (spacing step/2) times offsets
    ``t + {+-step/4}^3`` Å (offset_step; only the parent without offset search). The
    result is a block grid (:class:`PoseGrid`): one block per significant (particle, c, j)
    holding the 8 rotation children and the children of its significant offsets (padded to
    the largest count with impossible poses, log prior -inf), so no other pair is scored.
    Priors are evaluated at the children (local: Gaussian in the angle to the current
    rotation; tilt/psi priors; Gaussian offset prior).
    """
    b = weights.shape[0]
    device = weights.device
    sig = weights > 0
    rows = torch.nonzero(sig.any(-1))  # (R, 3) particle-major (p, c, j)
    p, c, j = rows.unbind(1)
    counts = torch.bincount(p, minlength=b)
    n_blocks = int(counts.max())
    slot = torch.arange(rows.shape[0], device=device) - (torch.cumsum(counts, 0) - counts)[p]
    # significant offsets of each row first (stable), padded with impossible copies
    row_sig = sig[p, c, j]  # (R, T)
    n_t = int(row_sig.sum(1).max())
    t_idx = torch.sort(row_sig.to(torch.int8), dim=1, descending=True, stable=True).indices
    t_idx, t_ok = t_idx[:, :n_t], torch.gather(row_sig, 1, t_idx[:, :n_t])  # (R, nt)

    coarse = poses.rotations.expand(b, -1, -1, -1)[p, j]  # (R, 3, 3)
    children = _corner_rotations(sampling.step_deg / 4, device)[None] @ coarse[:, None]
    rot = batch.rotations.double()[:, None, None].expand(b, n_blocks, 8, 3, 3).clone()
    rot[p, slot] = children
    rot = rot.reshape(b, n_blocks * 8, 3, 3)
    log_rot = torch.zeros(rot.shape[:2], dtype=torch.float64, device=device)
    if sampling.local_sigma_deg is not None:
        angle = rotation_angle_deg(rot, batch.rotations.double()[:, None])
        log_rot = -(angle**2) / (2 * sampling.local_sigma_deg**2)
    prior = angle_prior_log(
        rot, batch.angle_priors, sampling.sigma_tilt_deg, sampling.sigma_psi_deg
    )
    if prior is not None:
        log_rot = log_rot + prior
    used = torch.zeros(b, n_blocks, dtype=torch.bool, device=device)
    used[p, slot] = True
    log_rot = log_rot.masked_fill(~used.repeat_interleave(8, dim=1), -math.inf)

    deltas = poses.deltas[p[:, None], t_idx]  # (R, nt, 3)
    ok = t_ok
    if sampling.offset_range_angst > 0:
        corners = _corner_offsets(sampling.offset_step_angst / 4, device)
        deltas = (deltas[:, :, None] + corners[None, None]).reshape(rows.shape[0], -1, 3)
        ok = t_ok.repeat_interleave(8, dim=1)
    n_tb = deltas.shape[1]
    full = torch.zeros(b, n_blocks, n_tb, 3, dtype=torch.float64, device=device)
    full[p, slot] = deltas
    full = full.reshape(b, n_blocks * n_tb, 3)
    valid = torch.zeros(b, n_blocks, n_tb, dtype=torch.bool, device=device)
    valid[p, slot] = ok
    log_off = _offset_prior(full, sigma_offset_angst)
    log_off = log_off.masked_fill(~valid.reshape(b, -1), -math.inf)
    block_class = torch.full((b, n_blocks), -1, dtype=torch.long, device=device)
    block_class[p, slot] = c
    offsets = batch.offsets.double()[:, None, :] + full
    return PoseGrid(rot, log_rot, offsets, full, log_off, block_class)
