"""E-step: posterior probabilities of (class, orientation, offset) for a batch of particles.

Scores of :mod:`subtomo.ml.likelihood` plus log priors (class ``pi_c``, orientation prior of
local searches and tilt/psi priors, Gaussian offset prior) are normalised per particle with
logsumexp. As RELION, only the *significant* poses, the most probable ones holding
``adaptive_fraction`` (0.999) of the probability, are kept for the M-step (renormalised);
the marginalisation over them stays probability-weighted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from subtomo.ml.batch import FourierPoints
from subtomo.ml.likelihood import plane_scores, shifted_data, split_parts
from subtomo.ml.projector import Projector
from subtomo.ml.sampling import PoseGrid

__all__ = ["EStepResult", "expectation", "score_batch", "slice_matrices"]


@dataclass
class EStepResult:
    """Posterior over poses of ``b`` particles, ``C`` classes, ``J`` rotations, ``T`` offsets.

    ``weights`` ``(b, C, J, T)`` probabilities of the significant poses (renormalised to 1,
    zero elsewhere); ``log_evidence`` ``(b,)`` log of the summed prior-weighted likelihood
    (``rlnLogLikeliContribution`` up to a per-particle constant); ``pmax`` ``(b,)``
    (``rlnMaxValueProbDistribution``); ``n_significant`` ``(b,)``
    (``rlnNrOfSignificantSamples``); ``best`` ``(b, 3)`` long (class, rotation, offset index).
    """

    weights: torch.Tensor
    log_evidence: torch.Tensor
    pmax: torch.Tensor
    n_significant: torch.Tensor
    best: torch.Tensor


def slice_matrices(tilt_rotations: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``M = R_f A_sub A_part``: ``(b, f, 3, 3)`` x ``(b or 1, J, 3, 3)`` -> ``(b, J, f, 3, 3)``."""
    return tilt_rotations[:, None].to(rotations.dtype) @ rotations[:, :, None]


def _slice_planes(
    projector: Projector,
    cls: int,
    matrices: torch.Tensor,
    points: FourierPoints,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Slices at ``(B, f, J, 3, 3)`` (tilt-major for the cache) as ``(B, f, 2, J, K)`` real."""
    n, f, j = matrices.shape[:3]
    v = projector.sample_planes(cls, matrices.reshape(n * f, j, 3, 3), points, mode)
    return v.view(n, f, 2, j, -1)


def score_batch(
    projector: Projector,
    data: torch.Tensor,
    weights: torch.Tensor,
    inv_sigma2: torch.Tensor,
    tilt_rotations: torch.Tensor,
    poses: PoseGrid,
    points: FourierPoints,
    pixel_size: float,
    *,
    max_elements: int = 1 << 21,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Scores ``(b, C, J, T)`` of every pose (float64).

    ``data`` ``(b, f, K)`` complex premultiplied images at ``points``; ``weights`` ``(b, f, K)``
    ``CTF2``; ``inv_sigma2`` ``(b, K)``. The shifted data (:func:`subtomo.ml.likelihood.
    shifted_data`) are built for chunks of particles of about ``max_elements`` (translation,
    tilt, frequency) values; slices ``projector.max_slices`` at a time. When the batch shares
    its rotations and tilt geometry, the slices are computed once for all particles (and the
    shifted data once per chunk of slices), otherwise once per chunk of particles.
    ``interpolation`` ``"nearest"`` samples the slices at the nearest voxel of the padded
    reference instead of trilinearly (the coarse pass of adaptive oversampling, whose
    significant poses the fine pass scores again trilinearly).
    """
    b, f, k = data.shape
    t = poses.n_trans
    rot = poses.rotations
    n_rot = rot.shape[1]
    real = data.real.dtype
    y = data * inv_sigma2[:, None, :].to(real)
    w = weights * inv_sigma2[:, None, :]
    out = torch.empty(b, projector.n_classes, n_rot, t, dtype=torch.float64, device=data.device)
    per = max(1, max_elements // (t * f * k))

    def shifted(p: torch.Tensor | slice, offsets: torch.Tensor) -> torch.Tensor:
        return split_parts(shifted_data(y[p], tilt_rotations[p], offsets, points, pixel_size))

    tilts = tilt_rotations.to(rot.dtype)
    if poses.block_class is not None:
        out.fill_(-torch.inf)
        _score_blocks(
            out, projector, shifted, w, tilts, poses, points, f * k, max_elements, interpolation
        )
        return out
    if rot.shape[0] == 1 and bool((tilts == tilts[:1]).all()):
        chunk = max(1, projector.max_slices // f)
        for c in range(projector.n_classes):
            for j0 in range(0, n_rot, chunk):
                mats = tilts[:1, :, None] @ rot[:, None, j0 : j0 + chunk]  # (1, f, Jc, 3, 3)
                planes = _slice_planes(projector, c, mats, points, interpolation)
                for p0 in range(0, b, per):
                    sl = slice(p0, p0 + per)
                    s = plane_scores(shifted(sl, poses.offsets[sl]), w[sl], planes)
                    out[p0 : p0 + per, c, j0 : j0 + chunk] = s.transpose(1, 2)
        return out
    rot = rot.expand(b, -1, -1, -1)
    chunk = max(1, projector.max_slices // (min(per, b) * f))
    for p0 in range(0, b, per):
        sh = shifted(slice(p0, p0 + per), poses.offsets[p0 : p0 + per])
        for c in range(projector.n_classes):
            for j0 in range(0, n_rot, chunk):
                r = rot[p0 : p0 + per, j0 : j0 + chunk]
                mats = tilts[p0 : p0 + per, :, None] @ r[:, None]  # (p, f, Jc, 3, 3)
                planes = _slice_planes(projector, c, mats, points, interpolation)
                s = plane_scores(sh, w[p0 : p0 + per], planes)
                out[p0 : p0 + per, c, j0 : j0 + chunk] = s.transpose(1, 2)
    return out


def _score_blocks(
    out: torch.Tensor,
    projector: Projector,
    shifted: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    w: torch.Tensor,
    tilts: torch.Tensor,
    poses: PoseGrid,
    points: FourierPoints,
    plane: int,
    max_elements: int,
    interpolation: str,
) -> None:
    """Fill ``out`` ``(b, C, J, T/S)`` for a block grid (-inf elsewhere).

    Each used (particle, block) is a row of ``J/S`` rotations x ``T/S`` offsets, scored as one
    particle: rows of a class are chunked by about ``max_elements`` shifted values.
    """
    b, n_blocks = poses.block_class.shape
    jb, tb = poses.n_rot // n_blocks, poses.n_trans
    rot = poses.rotations.expand(b, -1, -1, -1).reshape(b, n_blocks, jb, 3, 3)
    offsets = poses.offsets.reshape(b, n_blocks, tb, 3)
    blocks = out.view(b, out.shape[1], n_blocks, jb, tb)
    per = max(1, min(max_elements // (tb * plane), projector.max_slices // (jb * tilts.shape[1])))
    for c in range(projector.n_classes):
        p_all, s_all = torch.nonzero(poses.block_class == c).unbind(1)
        for r0 in range(0, p_all.shape[0], per):
            p, s = p_all[r0 : r0 + per], s_all[r0 : r0 + per]
            mats = tilts[p][:, :, None] @ rot[p, s][:, None]  # (R, f, jb, 3, 3)
            planes = _slice_planes(projector, c, mats, points, interpolation)
            scores = plane_scores(shifted(p, offsets[p, s]), w[p], planes)  # (R, tb, jb)
            blocks[p, c, s] = scores.transpose(1, 2).to(out.dtype)


def expectation(
    scores: torch.Tensor,
    log_class_priors: torch.Tensor,
    poses: PoseGrid,
    adaptive_fraction: float = 0.999,
) -> EStepResult:
    """Posterior weights from scores ``(b, C, J, T)`` and the log priors."""
    b, c, j, t = scores.shape
    logp = (
        scores
        + log_class_priors.to(scores)[None, :, None, None]
        + poses.log_prior().to(scores)[:, None]
    )
    flat = logp.reshape(b, -1)
    log_z = torch.logsumexp(flat, dim=1)
    prob = torch.exp(flat - log_z[:, None])
    pmax, best = prob.max(dim=1)
    # significant poses: the most probable ones whose cumulative probability reaches
    # adaptive_fraction (at least the best one); ties resolved by the stable sort order
    sorted_p, order = torch.sort(prob, dim=1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=1) - sorted_p
    keep_sorted = (before < adaptive_fraction) & (sorted_p > 0)
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    weights = torch.where(keep, prob, 0.0)
    weights = weights / weights.sum(dim=1, keepdim=True)
    n_sig = keep.sum(dim=1)
    best3 = torch.stack([best // (j * t), (best // t) % j, best % t], dim=1)
    return EStepResult(weights.reshape(b, c, j, t), log_z, pmax, n_sig, best3)
