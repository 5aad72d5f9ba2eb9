"""Picks from a template-matching score volume: the false-alarm cut-off and exclusion peaks.

**Cut-off.** Two estimates of the score that background exceeds ``n_false`` times in a
tomogram; the automatic cut-off is the higher.

* :func:`false_alarm_cutoff` (pytom-match-pick's rule, Cruz-León et al. 2024): the score of
  one orientation at one voxel is Gaussian noise of zero mean and the standard deviation
  ``σ`` measured over the search
  (:attr:`~subtomo.picking.template_matching.MatchResult.sigma`); treating the ``V`` voxels
  × ``M`` orientations as independent tests, noise exceeds ``σ √2 erfc⁻¹(2 n_false / (V M))``
  ``n_false`` times on average. It holds for noise; in a crowded tomogram other complexes,
  membranes and carbon edges score higher than noise does.
* :func:`tail_cutoff` fits the background's own tail: the peak scores (:func:`find_peaks`
  without a cut-off, one per exclusion sphere) of a tomogram are mostly background, whose
  best-of-many-orientations scores have an exponential upper tail (the Gumbel domain of
  maxima): ``log N(> s) = a − s / β`` is fitted by least squares to the peaks between two
  quantiles of the background, and the cut-off is where ``N(> s) = n_false``. The
  background is first all peaks (fitted between their 50th and 90th percentiles, below the
  particles unless they are more than a tenth of the peaks), then those below the last
  cut-off (fitted between the 75th and 99th percentiles), until the cut-off settles.

:func:`noise_tail` is the expected number of voxels whose best score exceeds a value under the
Gaussian model, for the report's histogram.

**Peaks** (:func:`find_peaks`): the highest score first, then each next highest local maximum
at least ``radius`` voxels from every pick so far, above the cut-off, inside the tomogram mask
and at least ``border`` voxels from the tomogram's faces, up to ``max_peaks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import erfcinv, log_ndtr

__all__ = ["TailFit", "false_alarm_cutoff", "find_peaks", "noise_tail", "tail_cutoff"]


def false_alarm_cutoff(
    sigma: float, n_voxels: int, n_orientations: int, n_false: float = 1.0
) -> float:
    """The score noise exceeds ``n_false`` times in ``n_voxels × n_orientations`` tests."""
    if not sigma > 0 or n_voxels < 1 or n_orientations < 1 or not n_false > 0:
        raise ValueError("need sigma > 0, voxels and orientations >= 1 and n_false > 0")
    p = min(1.0, 2.0 * n_false / (float(n_voxels) * n_orientations))
    return float(sigma * math.sqrt(2.0) * erfcinv(p))


@dataclass(frozen=True)
class TailFit:
    """The fitted background tail ``N(> s) = exp(intercept − s / scale)`` (peaks scoring
    above ``s``), fitted to ``n_fit`` peaks between ``low`` and ``high``, and its
    ``cutoff``."""

    cutoff: float
    intercept: float
    scale: float
    low: float
    high: float
    n_fit: int

    def expected(self, scores: np.ndarray) -> np.ndarray:
        """Background peaks expected above each score."""
        return np.exp(self.intercept - np.asarray(scores, dtype=np.float64) / self.scale)


def tail_cutoff(
    peak_scores: np.ndarray,
    n_false: float = 1.0,
    quantiles: tuple[float, float] = (0.75, 0.99),
    first: tuple[float, float] = (0.5, 0.9),
    iterations: int = 10,
) -> TailFit:
    """The score background peaks exceed ``n_false`` times (see the module docstring);
    ``peak_scores`` of every peak of the tomogram; ``quantiles`` of the background fitted
    (``first`` for the first fit, to all peaks: low enough to leave out up to a tenth of them
    as particles)."""
    scores = np.sort(np.asarray(peak_scores, dtype=np.float64))[::-1]
    if len(scores) < 20:
        raise ValueError(f"{len(scores)} peaks are too few to fit the background's tail")
    background = scores
    fit = None
    for step in range(iterations):
        low_q, high_q = first if step == 0 else quantiles
        n = len(background)
        ranks = np.arange(1, n + 1, dtype=np.float64)  # peaks at or above each score
        keep = (ranks > n * (1 - high_q)) & (ranks < n * (1 - low_q))
        if keep.sum() < 10:
            raise ValueError("too few background peaks in the fitted range")
        slope, intercept = np.polyfit(background[keep], np.log(ranks[keep]), 1)
        if slope >= 0:
            raise ValueError("the peak scores have no falling tail to fit")
        cutoff = (math.log(n_false) - intercept) / slope
        new = TailFit(float(cutoff), float(intercept), float(-1.0 / slope),
                      float(background[keep].min()), float(background[keep].max()),
                      int(keep.sum()))  # fmt: skip
        if fit is not None and abs(new.cutoff - fit.cutoff) < 1e-4:
            return new
        fit = new
        background = scores[scores < cutoff]
        if len(background) < 20:
            break
    return fit


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
