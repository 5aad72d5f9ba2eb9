"""Picks from a template-matching score volume: the false-alarm cut-off and exclusion peaks.

**Cut-off** (:func:`false_alarm_cutoff`; pytom-match-pick's rule, Cruz-León et al. 2024).
Where no particle is, the score of one orientation at one voxel is modelled as Gaussian noise
of zero mean and the standard deviation ``σ`` measured over the search
(:attr:`~subtomo.picking.template_matching.MatchResult.sigma`). Treating the ``V`` voxels ×
``M`` orientations searched as independent tests, the score that noise exceeds ``n_false``
times on average is ``σ √2 erfc⁻¹(2 n_false / (V M))``. Neighbouring voxels and orientations
are correlated, so the real number of false alarms above it is lower: the cut-off is
conservative. :func:`noise_tail` is the expected number of voxels whose best score exceeds a
value under that model, the curve the report draws over the score histogram.

**Peaks** (:func:`find_peaks`): the highest score first, then each next highest voxel at least
``radius`` voxels from every pick so far, above the cut-off, inside the tomogram mask and at
least ``border`` voxels from the tomogram's faces, up to ``max_peaks``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import erfcinv, log_ndtr

__all__ = ["false_alarm_cutoff", "find_peaks", "noise_tail"]


def false_alarm_cutoff(
    sigma: float, n_voxels: int, n_orientations: int, n_false: float = 1.0
) -> float:
    """The score noise exceeds ``n_false`` times in ``n_voxels × n_orientations`` tests."""
    if not sigma > 0 or n_voxels < 1 or n_orientations < 1 or not n_false > 0:
        raise ValueError("need sigma > 0, voxels and orientations >= 1 and n_false > 0")
    p = min(1.0, 2.0 * n_false / (float(n_voxels) * n_orientations))
    return float(sigma * math.sqrt(2.0) * erfcinv(p))


def noise_tail(scores: np.ndarray, sigma: float, n_voxels: int, n_orientations: int) -> np.ndarray:
    """Expected number of the ``n_voxels`` voxels whose best of ``n_orientations`` independent
    noise scores exceeds each of ``scores``: ``V (1 − Φ(s/σ)^M)``."""
    log_cdf = n_orientations * log_ndtr(np.asarray(scores, dtype=np.float64) / sigma)
    return n_voxels * -np.expm1(log_cdf)


def find_peaks(
    scores: torch.Tensor,
    radius: float,
    cutoff: float,
    *,
    mask: torch.Tensor | None = None,
    border: int = 0,
    max_peaks: int = 10_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy peaks of ``scores`` ``(d, h, w)``: voxel indices ``(k, 3)`` zyx int64 and their
    scores ``(k,)``, highest first (see the module docstring; ``radius`` in voxels, ``mask``
    bool ``(d, h, w)``: where picks may lie)."""
    d, h, w = scores.shape
    allowed = scores > cutoff
    if mask is not None:
        allowed &= mask.to(scores.device).bool()
    if border > 0:
        inner = torch.zeros_like(allowed)
        inner[border : d - border, border : h - border, border : w - border] = True
        allowed &= inner
    local_max = scores == F.max_pool3d(scores[None, None], 3, stride=1, padding=1)[0, 0]
    candidates = torch.nonzero(allowed & local_max)  # (c, 3)
    values = scores[tuple(candidates.T)]
    order = torch.argsort(values, descending=True)
    candidates, values = candidates[order].cpu(), values[order].cpu()
    taken: list[int] = []
    points = candidates.double().numpy()
    r2 = radius * radius
    for i, p in enumerate(points):
        if len(taken) >= max_peaks:
            break
        if taken and np.min(((points[taken] - p) ** 2).sum(axis=1)) < r2:
            continue
        taken.append(i)
    index = torch.as_tensor(taken, dtype=torch.int64)
    return candidates[index], values[index]
