"""Plots of template matching: the peak-score histogram with the fitted background tail and
the cut-off, and tomogram slices with the picks (PNG, written atomically; volumes zyx)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from subtomo.report.plots import _save, _subplots, histogram_figure

__all__ = ["plot_peak_scores", "plot_picks"]


def plot_peak_scores(
    path: str | os.PathLike,
    peak_scores: np.ndarray,
    *,
    tail: Callable[[np.ndarray], np.ndarray],
    fit_range: tuple[float, float],
    cutoffs: dict[str, float],
    title: str = "",
) -> Path:
    """Histogram (log counts) of every peak's score, the fitted background tail as expected
    peaks per bin (``tail(s)`` = background peaks above ``s``), the fitted range shaded and
    each cut-off ``{label: score}`` as a vertical line."""
    v = np.asarray(peak_scores, dtype=np.float64)
    edges = np.linspace(v.min(), max(v.max(), *cutoffs.values()) + 1e-6, 60)
    fig, ax, _ = histogram_figure(
        v, bins=edges, xlabel="peak score (local normalised correlation)",
        ylabel="peaks per bin", title=title, label=f"{len(v)} peaks", figsize=(7, 4),
    )  # fmt: skip
    centres = 0.5 * (edges[1:] + edges[:-1])
    per_bin = tail(edges[:-1]) - tail(edges[1:])
    shown = per_bin > 0.05
    ax.plot(centres[shown], per_bin[shown], color="black", lw=1.2, label="fitted background tail")
    ax.axvspan(*fit_range, color="grey", alpha=0.15, label="fitted range")
    for (label, value), colour in zip(cutoffs.items(), ("red", "orange", "green"), strict=False):
        ax.axvline(value, color=colour, lw=1.2, label=f"{label} {value:.3f}")
    ax.set_yscale("log")
    ax.set_ylim(0.5, None)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_picks(
    path: str | os.PathLike,
    tomogram: np.ndarray,
    scores: np.ndarray,
    picks_zyx: np.ndarray,
    radius: float,
    *,
    title: str = "",
) -> Path:
    """The tomogram's central xy slab (the mean of ``2 radius + 1`` slices) and the best score
    along z, with circles at the picks (those within ``radius`` of the slab in the left panel,
    all in the right)."""
    d = tomogram.shape[0]
    z0 = d // 2
    r = max(1, round(radius))
    slab = tomogram[max(0, z0 - r) : z0 + r + 1].mean(0)
    fig, axes = _subplots(1, 2, figsize=(11, 5.2))
    lo, hi = np.percentile(slab, [0.5, 99.5])
    axes[0].imshow(slab, cmap="gray", origin="lower", vmin=lo, vmax=hi)
    axes[0].set_title(f"tomogram, slices {max(0, z0 - r)}-{min(d - 1, z0 + r)}", fontsize=9)
    axes[1].imshow(scores.max(0), cmap="magma", origin="lower")
    axes[1].set_title("best score along z", fontsize=9)
    p = np.asarray(picks_zyx, dtype=np.float64).reshape(-1, 3)
    near = np.abs(p[:, 0] - z0) <= r
    for ax, pts in ((axes[0], p[near]), (axes[1], p)):
        ax.scatter(pts[:, 2], pts[:, 1], s=(2 * radius) ** 2 / 4, facecolors="none",
                   edgecolors="lime", linewidths=0.8)  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} ({len(p)} picks)")
    return _save(fig, path)
