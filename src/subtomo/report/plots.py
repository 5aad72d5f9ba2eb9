"""PNG plots with matplotlib's Agg backend: FSC curves, Guinier plots, histograms, slices.

Every function writes one PNG atomically and returns its path. Frequencies are in 1/Å;
volumes are zyx.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from subtomo.io import atomic_path

__all__ = ["plot_central_slices", "plot_fsc", "plot_guinier", "plot_histogram"]


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_fsc(
    path: str | os.PathLike,
    frequency: np.ndarray,
    curves: Mapping[str, np.ndarray],
    *,
    thresholds: Sequence[float] = (0.143, 0.5),
    resolution: float | None = None,
    title: str = "Fourier shell correlation",
) -> Path:
    """FSC curves against spatial frequency (1/Å), with threshold lines and, if given, the
    final ``resolution`` (Å) marked; the top axis reads in Å."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, y in curves.items():
        ax.plot(frequency, y, label=label, lw=2.0 if label.lower().startswith("corr") else 1.3)
    for t in thresholds:
        ax.axhline(t, color="grey", ls="--", lw=0.8)
        ax.text(frequency[-1], t, f" {t:g}", va="center", fontsize=8, color="grey")
    ax.axhline(0.0, color="black", lw=0.6)
    if resolution is not None and 0 < resolution < 999:
        ax.axvline(1.0 / resolution, color="red", lw=0.8)
        title = f"{title}: {resolution:.2f} Å"
    ax.set_xlim(0, float(frequency[-1]))
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    top = ax.secondary_xaxis(
        "top", functions=(lambda f: 1.0 / np.maximum(f, 1e-6), lambda d: 1.0 / np.maximum(d, 1e-6))
    )
    ticks = [f for f in ax.get_xticks() if 0 < f <= frequency[-1]]
    top.set_xticks([1.0 / f for f in ticks])
    top.set_xticklabels([f"{1.0 / f:.1f}" for f in ticks], fontsize=8)
    top.set_xlabel("resolution (Å)")
    return _save(fig, path)


def plot_guinier(
    path: str | os.PathLike,
    resolution_squared: np.ndarray,
    curves: Mapping[str, np.ndarray],
    *,
    fit: tuple[float, float] | None = None,
    fit_range: tuple[float, float] | None = None,
    title: str = "Guinier plot",
) -> Path:
    """ln(amplitude) against 1/d^2 (1/Å^2); points at -99 (no value) are left out.
    ``fit`` = (slope, intercept) draws the fitted line over ``fit_range`` (1/Å^2)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, y in curves.items():
        ok = y > -99
        ax.plot(resolution_squared[ok], y[ok], label=label, lw=1.3)
    if fit is not None:
        lo, hi = fit_range or (float(resolution_squared[1]), float(resolution_squared[-1]))
        xs = np.array([lo, hi])
        ax.plot(xs, fit[0] * xs + fit[1], "k--", lw=1.0, label=f"fit, B = {4 * fit[0]:.0f} Å²")
    ax.set_xlabel("1/d² (1/Å²)")
    ax.set_ylabel("ln(amplitude)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_histogram(
    path: str | os.PathLike,
    values: np.ndarray | torch.Tensor,
    *,
    xlabel: str,
    bins: int = 40,
    title: str = "",
) -> Path:
    """Histogram of ``values`` with the median marked."""
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    v = v[np.isfinite(v)].ravel()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.hist(v, bins=bins, color="steelblue", edgecolor="white")
    if v.size:
        med = float(np.median(v))
        ax.axvline(med, color="red", lw=1.0, label=f"median {med:.2f}")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    return _save(fig, path)


def plot_central_slices(
    path: str | os.PathLike,
    volume: torch.Tensor | np.ndarray,
    *,
    title: str = "",
    cmap: str = "gray",
) -> Path:
    """The three central sections (xy, xz, yz through index N//2) of a zyx volume."""
    v = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    cz, cy, cx = (s // 2 for s in v.shape)
    sections = {"xy (z = N/2)": v[cz], "xz (y = N/2)": v[:, cy, :], "yz (x = N/2)": v[:, :, cx]}
    lo, hi = np.percentile(v, [0.5, 99.5])
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (name, sl) in zip(axes, sections.items(), strict=True):
        ax.imshow(sl, cmap=cmap, origin="lower", vmin=lo, vmax=hi)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _save(fig, path)
