"""Tilt exclusion rules: which tilts of a series to drop, and why.

Each rule looks at one per-tilt table (and, for dark images, the images' mean counts) and
returns ``{row: reason}``; :func:`exclusions` joins them (a tilt dropped by several rules
lists every reason).

* **dark**: a mean (of counts; the robust noise of normalised images) below
  ``dark_fraction`` of the series' median (a closed valve, a grid bar, a missed exposure), or
  a constant image (**blank**).
* **CTF**: rlnCtfMaxResolution worse (larger) than ``max_resolution`` Å (``subtomo ctffind``
  writes 999 where it found no Thon rings).
* **drift**: rlnAccumMotionTotal above ``max_motion`` (RELION's unit: unbinned movie pixels).
* **list**: nominal stage tilts (rlnTomoNominalStageTiltAngle) within 0.05° of a listed one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["by_ctf_resolution", "by_intensity", "by_list", "by_motion", "exclusions"]


def by_intensity(
    means: np.ndarray, stds: np.ndarray, spreads: np.ndarray, minima: np.ndarray,
    dark_fraction: float,
) -> dict[int, str]:  # fmt: skip
    """Rows whose image is constant (``stds`` 0: blank) or dark. Counts (no negative pixel in
    the series): a mean below ``dark_fraction`` x the series median; normalised images
    (negative values): a robust spread (1.4826 MAD, blind to hot pixels) below
    ``dark_fraction`` x the median spread."""
    out: dict[int, str] = {}
    counts = bool(np.all(minima >= 0)) and float(np.median(means)) > 0
    values, what = (means, "mean") if counts else (spreads, "noise (1.4826 MAD)")
    median = float(np.median(values))
    for f, (value, std) in enumerate(zip(values, stds, strict=True)):
        if std == 0:
            out[f] = "blank image (constant)"
        elif dark_fraction > 0 and value < dark_fraction * median:
            out[f] = f"dark: {what} {value:.3g} < {dark_fraction:g} x series median {median:.3g}"
    return out


def by_ctf_resolution(tilts: pd.DataFrame, max_resolution: float) -> dict[int, str]:
    """Rows whose CTF fit resolution is worse than ``max_resolution`` Å (<= 0: none)."""
    if max_resolution <= 0 or "rlnCtfMaxResolution" not in tilts.columns:
        return {}
    res = tilts["rlnCtfMaxResolution"].to_numpy(dtype=np.float64)
    return {
        int(f): "no Thon rings (CTF fit failed)" if res[f] >= 999 else
        f"CTF fit resolution {res[f]:.1f} Å worse than {max_resolution:g} Å"
        for f in np.flatnonzero(res > max_resolution)
    }  # fmt: skip


def by_motion(tilts: pd.DataFrame, max_motion: float) -> dict[int, str]:
    """Rows whose accumulated motion exceeds ``max_motion`` (<= 0: none)."""
    if max_motion <= 0 or "rlnAccumMotionTotal" not in tilts.columns:
        return {}
    motion = tilts["rlnAccumMotionTotal"].to_numpy(dtype=np.float64)
    return {int(f): f"drift {motion[f]:.1f} px > {max_motion:g} px"
            for f in np.flatnonzero(motion > max_motion)}  # fmt: skip


def by_list(tilts: pd.DataFrame, angles: Sequence[float]) -> dict[int, str]:
    """Rows whose nominal stage tilt is within 0.05° of one of ``angles``."""
    if not len(angles) or "rlnTomoNominalStageTiltAngle" not in tilts.columns:
        return {}
    nominal = tilts["rlnTomoNominalStageTiltAngle"].to_numpy(dtype=np.float64)
    return {int(f): "listed by the user" for f in range(len(nominal))
            if np.any(np.abs(nominal[f] - np.asarray(angles)) < 0.05)}  # fmt: skip


def exclusions(*rules: dict[int, str]) -> dict[int, str]:
    """Join the rules' ``{row: reason}``: reasons of one row joined with '; '."""
    out: dict[int, list[str]] = {}
    for rule in rules:
        for row, reason in rule.items():
            out.setdefault(row, []).append(reason)
    return {row: "; ".join(reasons) for row, reasons in sorted(out.items())}
