"""Which particles to keep: duplicates and random half sets."""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

__all__ = ["duplicate_keep_mask", "random_half_sets"]


def duplicate_keep_mask(
    centres_angst: torch.Tensor | np.ndarray, groups: np.ndarray, min_distance_angst: float
) -> np.ndarray:
    """Keep-mask ``(n,)`` removing duplicates as RELION's ``--remove_duplicates`` does.

    For every pair ``i < j`` (file order) in the same group (tomogram) whose centres are at
    most ``min_distance_angst`` apart, particle ``i`` is discarded and ``j`` kept. Unlike
    RELION's shortcut, ``centres_angst`` should be the true particle centres ``C - A_sub o``
    (origins rotated into the tomogram frame).
    """
    centres = np.asarray(centres_angst, dtype=np.float64)
    groups = np.asarray(groups)
    keep = np.ones(len(centres), dtype=bool)
    for group in np.unique(groups):
        index = np.flatnonzero(groups == group)
        pairs = cKDTree(centres[index]).query_pairs(min_distance_angst, output_type="ndarray")
        if len(pairs):
            keep[index[pairs.min(axis=1)]] = False
    return keep


def random_half_sets(n: int, seed: int = 0) -> np.ndarray:
    """Balanced random rlnRandomSubset values (1 or 2) for ``n`` particles."""
    halves = np.resize(np.array([1, 2]), n)
    return np.random.default_rng(seed).permutation(halves)
