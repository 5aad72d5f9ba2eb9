"""PNG plots with matplotlib (Agg, object-oriented: no pyplot state): FSC curves, Guinier
plots, histograms, slices.

Every function writes one PNG atomically and returns its path. Frequencies are in 1/Å;
volumes are zyx. matplotlib is imported on first use (it costs ~0.5 s);
:func:`import_in_background` lets a job import it while it computes.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from subtomo.io import atomic_path

__all__ = [
    "histogram_figure",
    "import_in_background",
    "plot_angular_distribution",
    "plot_central_slices",
    "plot_class_progress",
    "plot_fsc",
    "plot_guinier",
    "plot_histogram",
    "plot_images",
    "plot_series",
    "plot_xy",
    "view_histogram",
]


def import_in_background() -> None:
    """Start importing matplotlib's figure module in a daemon thread (for a job's report)."""
    threading.Thread(
        target=importlib.import_module, args=("matplotlib.figure",), daemon=True
    ).start()


def _subplots(*args, figsize: tuple[float, float], **kwargs):
    """A new ``Figure`` and its axes (``Figure.subplots`` arguments)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
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
    fig, ax = _subplots(figsize=(7, 4.2))
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
    fig, ax = _subplots(figsize=(7, 4.2))
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


def histogram_figure(
    values: np.ndarray | torch.Tensor,
    *,
    bins: int | np.ndarray,
    xlabel: str,
    ylabel: str = "count",
    title: str = "",
    label: str | None = None,
    figsize: tuple[float, float] = (6, 3.8),
):
    """A figure with the histogram of the finite ``values`` drawn (``bins``: a count or the
    edges); returns ``(fig, ax, values)`` for the caller's marks, then :func:`_save`."""
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    v = v[np.isfinite(v)].ravel()
    fig, ax = _subplots(figsize=figsize)
    ax.hist(v, bins=bins, color="steelblue", edgecolor="white", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax, v


def plot_histogram(
    path: str | os.PathLike,
    values: np.ndarray | torch.Tensor,
    *,
    xlabel: str,
    bins: int = 40,
    title: str = "",
) -> Path:
    """Histogram of ``values`` with the median marked."""
    fig, ax, v = histogram_figure(values, bins=bins, xlabel=xlabel, title=title)
    if v.size:
        med = float(np.median(v))
        ax.axvline(med, color="red", lw=1.0, label=f"median {med:.2f}")
        ax.legend(fontsize=8)
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
    fig, axes = _subplots(1, 3, figsize=(10, 3.6))
    for ax, (name, sl) in zip(axes, sections.items(), strict=True):
        ax.imshow(sl, cmap=cmap, origin="lower", vmin=lo, vmax=hi)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def view_histogram(
    rot_deg: np.ndarray, tilt_deg: np.ndarray, bins: tuple[int, int] = (36, 18)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of view directions on an equal-area grid: ``(counts (n_cos, n_rot), rot edges
    (deg, -180..180), cos(tilt) edges (1..-1))``.

    rlnAngleRot is the azimuth and rlnAngleTilt the polar angle of the view direction (RELION
    ZYZ), so bins equal in rot and in cos(tilt) cover equal areas of the sphere: directions
    drawn uniformly give the same expected count in every bin.
    """
    rot = (np.asarray(rot_deg, dtype=np.float64) + 180.0) % 360.0 - 180.0
    cos_tilt = np.cos(np.deg2rad(np.asarray(tilt_deg, dtype=np.float64)))
    rot_edges = np.linspace(-180.0, 180.0, bins[0] + 1)
    cos_edges = np.linspace(1.0, -1.0, bins[1] + 1)
    counts, _, _ = np.histogram2d(cos_tilt, rot, bins=(cos_edges[::-1], rot_edges))
    return counts[::-1], rot_edges, cos_edges


def plot_angular_distribution(
    path: str | os.PathLike,
    rot_deg: np.ndarray,
    tilt_deg: np.ndarray,
    *,
    title: str = "angular distribution",
) -> Path:
    """Particles per view direction (rlnAngleRot against rlnAngleTilt, degrees) on the
    equal-area grid of :func:`view_histogram`; the tilt axis is labelled in degrees."""
    counts, rot_edges, cos_edges = view_histogram(rot_deg, tilt_deg)
    fig, ax = _subplots(figsize=(7, 3.8))
    mesh = ax.pcolormesh(rot_edges, cos_edges, counts, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label="particles")
    ticks = [0, 30, 60, 90, 120, 150, 180]
    ax.set_yticks(np.cos(np.deg2rad(ticks)))
    ax.set_yticklabels([str(t) for t in ticks])
    ax.set_ylim(1, -1)
    ax.set_xlabel("rlnAngleRot (deg)")
    ax.set_ylabel("rlnAngleTilt (deg)")
    ax.set_title(f"{title} ({len(np.asarray(rot_deg))} particles)")
    return _save(fig, path)


def plot_series(
    path: str | os.PathLike,
    labels: Sequence[str],
    curves: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    invert_y: bool = False,
) -> Path:
    """Values per step (iterations, pipeline steps) with the steps' ``labels`` on the x axis;
    one line per curve, NaN leaves a gap. ``invert_y`` puts small values (Å) at the top."""
    fig, ax = _subplots(figsize=(7, 3.8))
    x = np.arange(len(labels))
    for name, y in curves.items():
        ax.plot(x, np.asarray(y, dtype=np.float64), marker="o", lw=1.3, label=name)
    long = max(map(len, labels), default=0) > 4
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30 if long else 0, ha="right" if long else "center")
    if invert_y:
        ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_class_progress(
    path: str | os.PathLike,
    iterations: Sequence[int],
    class_distribution: np.ndarray,
    resolution_angst: Sequence[float],
    *,
    title: str = "3D classification",
) -> Path:
    """Class populations (``(iterations, K)`` fractions, stacked) and the current
    resolution (Å) against the iteration number."""
    it = np.asarray(iterations)
    dist = np.asarray(class_distribution, dtype=np.float64).reshape(len(it), -1)
    fig, (top, bottom) = _subplots(2, 1, figsize=(7, 6), sharex=True)
    top.stackplot(it, dist.T, labels=[f"class {c + 1}" for c in range(dist.shape[1])])
    top.set_ylim(0, 1)
    top.set_ylabel("rlnClassDistribution")
    top.legend(fontsize=8, loc="upper left", ncol=min(dist.shape[1], 6))
    top.set_title(title)
    res = np.asarray(resolution_angst, dtype=np.float64)
    ok = np.isfinite(res) & (res > 0) & (res < 999)
    bottom.plot(it[ok], res[ok], "o-", color="black", lw=1.2)
    bottom.set_xlabel("iteration")
    bottom.set_ylabel("current resolution (Å)")
    return _save(fig, path)


def plot_xy(
    path: str | os.PathLike,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    invert_y: bool = False,
    lines: bool = True,
) -> Path:
    """Curves ``{label: (x, y)}`` against a numeric x axis (markers, joined when ``lines``);
    NaN leaves a gap; ``invert_y`` puts small values (Å) at the top."""
    fig, ax = _subplots(figsize=(7, 3.8))
    for name, (x, y) in curves.items():
        ax.plot(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), marker="o",
                ms=4, lw=1.2 if lines else 0, label=name)  # fmt: skip
    if invert_y:
        ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_images(
    path: str | os.PathLike,
    images: Mapping[str, torch.Tensor | np.ndarray],
    *,
    title: str = "",
    columns: int = 4,
    cmap: str = "gray",
    symmetric: bool = False,
) -> Path:
    """2D images ``{caption: (h, w)}`` in a grid, each scaled to its 0.5-99.5 percentiles;
    ``symmetric``: to ± its largest absolute value instead, with a colour bar (signed maps
    such as phases)."""
    n = max(1, len(images))
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = _subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (name, image) in zip(axes.flat, images.items(), strict=False):
        a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        lo, hi = np.percentile(a, [0.5, 99.5])
        if symmetric:
            hi = max(float(np.abs(a).max()), 1e-12)
            lo = -hi
        shown = ax.imshow(a, cmap=cmap, origin="lower", vmin=lo, vmax=hi)
        if symmetric:
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
