"""Hot pixels and X-ray hits: find them and fill them with noise of the local statistics,
as IMOD's ccderaser does (behaviour from its documentation, not its code).

**Find** (:func:`find_defects`): the residual ``r = image - median_k(image)`` (a ``size`` x
``size`` median, robust to defects of fewer than half its pixels: streaks up to ~40 pixels
for 9 x 9) against the image's robust noise ``σ = 1.4826 · MAD(r)``; pixels above
``threshold · σ`` (and, for counts, above the count that a Poisson variable of the local
mean reaches as rarely as a Gaussian exceeds ``threshold`` σ) seed a defect, and their
neighbours (8-connected) above ``grow · σ`` join it until none is left (hysteresis, so a
streak's weaker pixels go with it). Only bright defects are looked for (hot pixels and
X-rays add charge).

**Fill** (:func:`erase_defects`): each flagged pixel becomes ``μ + σ_local · N(0, 1)`` with
``μ`` the median of the unflagged pixels of its ``size`` x ``size`` window and
``σ_local = σ · √(μ / m)`` (``m`` the image median: counting noise scales with the square root
of the counts; ``σ`` where ``m <= 0``). Unflagged pixels are never changed.

Why not teamtomo's torch-cryoeraser (0.6.0): it only fills a mask it is given (it finds
nothing), with the image's global standard deviation rather than the local one, and needs
einops, which the project dropped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["erase_defects", "find_defects", "median_filter", "robust_sigma"]


def median_filter(image: torch.Tensor, size: int = 9, rows: int = 128) -> torch.Tensor:
    """``size`` x ``size`` median of ``(h, w)`` (reflected edges), ``rows`` rows at a time."""
    pad = size // 2
    padded = F.pad(image[None, None].float(), (pad, pad, pad, pad), mode="reflect")[0, 0]
    out = torch.empty_like(image, dtype=torch.float32)
    for y in range(0, image.shape[0], rows):
        block = padded[y : y + rows + 2 * pad]
        windows = block.unfold(0, size, 1).unfold(1, size, 1)  # (r, w, size, size)
        out[y : y + rows] = windows.reshape(*windows.shape[:2], -1).median(-1).values
    return out


def robust_sigma(residual: torch.Tensor) -> float:
    """``1.4826 · MAD``: the standard deviation of Gaussian noise, ignoring outliers. Where
    counts are so low that the MAD is 0 (most pixels 0 or 1 electron), the standard deviation
    of the values inside the 0.1-99.9 percentiles instead."""
    r = residual.flatten().float()
    if r.numel() > 1_000_000:  # a strided subsample gives the same MAD to < 0.1 %
        r = r[:: r.numel() // 1_000_000]
    mad = float(1.4826 * (r - r.median()).abs().median())
    if mad > 0:
        return mad
    lo, hi = torch.quantile(r, torch.tensor([0.001, 0.999]))
    return float(r[(r >= lo) & (r <= hi)].std())


def _box_mean(image: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over the ``size`` x ``size`` window (odd) inside the image, by running sums:
    O(pixels) whatever the window."""

    def running(x: torch.Tensor, dim: int) -> torch.Tensor:
        pad = size // 2
        zeros = torch.zeros_like(x.narrow(dim, 0, 1))
        c = torch.cat([zeros, x.cumsum(dim)], dim)  # c[i] = sum of x[:i]
        n = x.shape[dim]
        hi = torch.arange(n, device=x.device).add(pad + 1).clamp(max=n)
        lo = torch.arange(n, device=x.device).sub(pad).clamp(min=0)
        return c.index_select(dim, hi) - c.index_select(dim, lo)

    x = image.double()
    sums = running(running(x, 0), 1)
    counts = running(running(torch.ones_like(x), 0), 1)
    return (sums / counts).float()


def _noise_sigma(image: torch.Tensor, size: int, crop: int = 512) -> float:
    """:func:`robust_sigma` of the median residual in the central ``crop`` x ``crop``."""
    h, w = image.shape
    y, x = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    patch = image[y : y + crop, x : x + crop].float()
    return robust_sigma(patch - median_filter(patch, size))


def _window_medians(
    image: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: int,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Median of the ``size`` x ``size`` window around each pixel ``(ys, xs)``: edges
    reflected, or, with ``exclude``, those pixels and the outside left out (NaN where nothing
    is left)."""
    pad = size // 2
    values = image.float()[None, None]
    if exclude is None:  # reflected edges, no NaN: the faster plain median
        padded = F.pad(values, (pad, pad, pad, pad), mode="reflect")[0, 0]
    else:
        values = torch.where(exclude, torch.full_like(values, float("nan")), values)
        padded = F.pad(values, (pad, pad, pad, pad), value=float("nan"))[0, 0]
    median = torch.Tensor.median if exclude is None else torch.Tensor.nanmedian
    offsets = torch.arange(size, device=image.device)
    out = torch.empty(len(ys), device=image.device)
    for i in range(0, len(ys), 65536):  # bounded memory: 65536 x size² values at a time
        y, x = ys[i : i + 65536], xs[i : i + 65536]
        windows = padded[y[:, None, None] + offsets[None, :, None],
                         x[:, None, None] + offsets[None, None, :]]  # fmt: skip
        out[i : i + 65536] = median(windows.reshape(len(y), -1), -1).values
    return out


def find_defects(
    image: torch.Tensor, threshold: float = 6.0, grow: float = 4.0, size: int = 9
) -> torch.Tensor:
    """Mask ``(h, w)`` bool of bright defects (see the module docstring); σ units.

    The ``size`` x ``size`` median is taken only where a pixel exceeds a 33 x 33 box mean by
    ``grow - 1`` σ (a 20-pixel streak of 50 σ raises that mean by < 1 σ), so the cost follows
    the candidates, not the image (σ from the central 512 x 512)."""
    sigma = _noise_sigma(image, size)
    if sigma <= 0:  # a constant image (apart from defects, if any)
        return image.float() > image.float().median()
    values = image.float()[None, None]
    coarse = values[0, 0] - _box_mean(image, 33)
    ys, xs = torch.nonzero(coarse > (grow - 1) * sigma, as_tuple=True)
    local = _window_medians(image, ys, xs, size)
    residual = torch.full_like(coarse, -math.inf)
    residual[ys, xs] = values[0, 0, ys, xs] - local
    mask = residual > threshold * sigma
    if float(image.min()) >= 0 and float(image.mean()) > 0:  # counts: Poisson tails, not Gauss
        typical = torch.maximum(local, _box_mean(image, size)[ys, xs])
        limit = torch.full_like(coarse, math.inf)
        limit[ys, xs] = _poisson_limit(typical, threshold)
        mask &= values[0, 0] >= limit
    candidates = residual > grow * sigma
    kernel = torch.ones(1, 1, 3, 3, device=image.device)
    for _ in range(64):
        near = F.conv2d(mask[None, None].float(), kernel, padding=1)[0, 0] > 0
        grown = mask | (near & candidates)
        if bool((grown == mask).all()):
            break
        mask = grown
    return mask


def _poisson_limit(mean: torch.Tensor, threshold: float) -> torch.Tensor:
    """Counts that a Poisson variable of ``mean`` reaches no more often than a Gaussian one
    exceeds ``threshold`` σ (low doses: 0-3 electrons per pixel have long tails)."""
    from scipy import stats

    p = stats.norm.sf(threshold)
    values, inverse = torch.unique((mean.clamp(min=0) * 64).round() / 64, return_inverse=True)
    limits = torch.as_tensor(stats.poisson.isf(p, values.double().cpu().numpy()) + 1)
    return limits.to(mean.device, torch.float32)[inverse]


def erase_defects(
    image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, size: int = 9
) -> torch.Tensor:
    """``image`` with the ``mask`` pixels replaced by local-statistics noise."""
    out = image.clone().float()
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) == 0:
        return out
    local = _window_medians(out, ys, xs, size, exclude=mask)  # (n,)
    typical = float(out[~mask].median())
    local = torch.where(torch.isnan(local), torch.full_like(local, typical), local)
    sigma = _noise_sigma(out, size)
    scale = (local / typical).clamp(min=0).sqrt() if typical > 0 else torch.ones_like(local)
    noise = torch.randn(len(ys), generator=generator).to(out.device)
    out[ys, xs] = local + sigma * scale * noise
    return out
