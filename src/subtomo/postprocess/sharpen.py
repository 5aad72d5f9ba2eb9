"""Sharpening as ``relion_postprocess`` does it: MTF, FSC weighting, Guinier fit, B-factor.

Fourier arrays are rfft (torch layout) of a cube with ``norm="forward"`` (the DC term is the
map mean, as RELION's transforms), so Guinier intercepts are comparable with RELION's.
Guinier points run over shells ``0..N//2``: ``x = (i / (N px))^2`` (1/Å^2),
``y = ln(mean |F| in shell i)``, or ``-99`` where the shell is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from subtomo.fourier import radial_average, radius_grid

__all__ = [
    "GuinierFit",
    "fit_guinier",
    "fsc_weights",
    "guinier_curve",
    "mtf_weights",
]

NO_VALUE = -99.0


def mtf_weights(
    shape: tuple[int, ...],
    pixel_size: float,
    mtf_frequency: np.ndarray,
    mtf_value: np.ndarray,
    *,
    mtf_pixel_size: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Detector MTF on the rfft grid of ``shape`` (to divide by); 1 at and beyond Nyquist.

    ``mtf_frequency`` is ``rlnResolutionInversePixel`` (1/detector pixel), converted to 1/Å
    with ``mtf_pixel_size`` (default: ``pixel_size``); values are linearly interpolated,
    clamped to the first/last table entry outside its range.
    """
    n = shape[-1]
    freq = torch.tensor(np.asarray(mtf_frequency, float) / (mtf_pixel_size or pixel_size))
    value = torch.tensor(np.asarray(mtf_value, float))
    k = radius_grid(shape, device="cpu").double() / (n * pixel_size)  # 1/Å
    pos = torch.searchsorted(freq, k.flatten()).clamp(1, freq.numel() - 1)
    x0, x1 = freq[pos - 1], freq[pos]
    t = ((k.flatten() - x0) / (x1 - x0)).clamp(0.0, 1.0)
    mtf = (value[pos - 1] + t * (value[pos] - value[pos - 1])).reshape(k.shape)
    mtf = torch.where(k < 0.5 / pixel_size, mtf, torch.ones_like(mtf))
    return mtf.float().to(device)


def fsc_weights(fsc_curve: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``sqrt(2 FSC / (1 + FSC))`` per shell ``round(|k|)`` (rfft grid of ``shape``), 0 from
    the first shell where FSC < 1e-4 on (and beyond Nyquist), as Rosenthal & Henderson."""
    curve = fsc_curve.double()
    below = torch.nonzero(curve < 1e-4)
    last = curve.numel() - 1 if below.numel() == 0 else max(int(below[0]) - 1, 0)
    table = torch.zeros(curve.numel() + 1, dtype=torch.float64, device=curve.device)
    good = curve[: last + 1].clamp(min=0.0)
    table[: last + 1] = torch.sqrt(2.0 * good / (1.0 + good))
    ires = torch.round(radius_grid(shape, device=curve.device)).long().clamp(max=curve.numel())
    return table[ires].float()


def guinier_curve(
    f: torch.Tensor, shape: tuple[int, ...], pixel_size: float, index: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Guinier points ``(x, y)`` of an rfft ``f``: ``x = (i/(N px))^2``, ``y = ln mean|F|``."""
    n = shape[-1]
    mean_amp = radial_average(f.abs().double(), shape, index=index).cpu().numpy()
    i = np.arange(mean_amp.size)
    x = (i / (n * pixel_size)) ** 2
    with np.errstate(divide="ignore"):
        y = np.where(mean_amp > 0, np.log(np.where(mean_amp > 0, mean_amp, 1.0)), NO_VALUE)
    return x, y


@dataclass(frozen=True)
class GuinierFit:
    """Straight line ``y = slope x + intercept`` through the Guinier plot; B = 4 slope."""

    slope: float
    intercept: float
    correlation: float  # RELION's rlnCorrelationFitGuinierPlot (r^2 of the fit)
    n_points: int

    @property
    def bfactor(self) -> float:
        """The sharpening B-factor (Å^2, negative sharpens)."""
        return 4.0 * self.slope


def fit_guinier(
    x: np.ndarray,
    y: np.ndarray,
    box: int,
    pixel_size: float,
    *,
    lowres: float = 10.0,
    highres: float = 0.0,
) -> GuinierFit:
    """Least-squares line through the points with ``lowres >= d >= highres`` (Å) and a value.

    ``d = N px / i``; shell 0 (infinite d) is never used. ``ValueError`` with fewer than two
    points (e.g. the FSC-weighted amplitudes vanish before ``lowres``).
    """
    i = np.arange(x.size)
    with np.errstate(divide="ignore"):
        d = np.where(i > 0, box * pixel_size / np.maximum(i, 1), np.inf)
    use = (d <= lowres) & (d >= highres) & (y > NO_VALUE)
    if use.sum() < 2:
        raise ValueError(
            f"too few Guinier points between {lowres} and {highres or 'Nyquist'} Å to fit a "
            "B-factor; lower --autob-lowres or give --adhoc-bfac"
        )
    xs, ys = x[use], y[use]
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx, sxy, syy = (dx * dx).sum(), (dx * dy).sum(), (dy * dy).sum()
    slope = sxy / sxx
    r = sxy / np.sqrt(sxx * syy) if syy > 0 else 1.0
    return GuinierFit(
        slope=float(slope),
        intercept=float(ys.mean() - slope * xs.mean()),
        correlation=float(r * r),
        n_points=int(use.sum()),
    )
