"""E-step: posterior probabilities of (class, orientation, offset) for a batch of particles.

Scores of :mod:`subtomo.ml.likelihood` plus log priors (class ``pi_c``, orientation prior of
local searches and tilt/psi priors, Gaussian offset prior) are normalised per particle with
logsumexp. As RELION, only the *significant* poses, the most probable ones holding
``adaptive_fraction`` (0.999) of the probability, are kept for the M-step (renormalised);
the marginalisation over them stays probability-weighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subtomo.ml.batch import FourierPoints
from subtomo.ml.likelihood import pose_scores
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


def score_batch(
    projector: Projector,
    centred: torch.Tensor,
    weights: torch.Tensor,
    inv_sigma2: torch.Tensor,
    tilt_rotations: torch.Tensor,
    poses: PoseGrid,
    points: FourierPoints,
) -> torch.Tensor:
    """Scores ``(b, C, J, T)`` of every pose (float64), in chunks of rotations.

    ``centred`` ``(b, T, f, K)`` from :func:`subtomo.ml.likelihood.centred_data`;
    ``weights`` ``(b, f, K)`` ``CTF2``; ``inv_sigma2`` ``(b, K)``. When the batch shares its
    rotations and tilt geometry, the slices are computed once for all particles.
    """
    b, t, f, _ = centred.shape
    rot = poses.rotations
    tilts = tilt_rotations
    if rot.shape[0] == 1 and bool((tilts == tilts[:1]).all()):
        tilts = tilts[:1]
    chunk = max(1, projector.max_slices // (tilts.shape[0] * f))
    out = torch.empty(
        b, projector.n_classes, rot.shape[1], t, dtype=torch.float64, device=centred.device
    )
    for c in range(projector.n_classes):
        for j0 in range(0, rot.shape[1], chunk):
            r = rot[:, j0 : j0 + chunk]
            mats = tilts[:, :, None].to(r.dtype) @ r[:, None]  # (b|1, f, Jc, 3, 3) tilt-major
            slices = projector.sample(c, mats, points)  # (2, b|1, f, Jc, K)
            s = pose_scores(centred, weights, inv_sigma2, slices)  # (b, T, Jc)
            out[:, c, j0 : j0 + chunk] = s.transpose(1, 2).double()
    return out


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
        + poses.log_prior_rot.to(scores)[:, None, :, None]
        + poses.log_prior_offset.to(scores)[:, None, None, :]
    )
    flat = logp.reshape(b, -1)
    log_z = torch.logsumexp(flat, dim=1)
    prob = torch.exp(flat - log_z[:, None])
    pmax, best = prob.max(dim=1)
    # significant poses: the most probable ones whose cumulative probability reaches
    # adaptive_fraction (at least the best one); ties resolved by the stable sort order
    sorted_p, order = torch.sort(prob, dim=1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=1) - sorted_p
    keep_sorted = before < adaptive_fraction
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    weights = torch.where(keep, prob, 0.0)
    weights = weights / weights.sum(dim=1, keepdim=True)
    n_sig = keep.sum(dim=1)
    best3 = torch.stack([best // (j * t), (best // t) % j, best % t], dim=1)
    return EStepResult(weights.reshape(b, c, j, t), log_z, pmax, n_sig, best3)
