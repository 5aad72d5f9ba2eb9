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

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["defect_count", "erase_defects", "find_defects", "median_filter", "robust_sigma"]


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


def find_defects(
    image: torch.Tensor, threshold: float = 6.0, grow: float = 4.0, size: int = 9
) -> torch.Tensor:
    """Mask ``(h, w)`` bool of bright defects (see the module docstring); σ units."""
    local = median_filter(image, size)
    residual = image.float() - local
    sigma = robust_sigma(residual)
    if sigma <= 0:  # a constant image (apart from defects, if any)
        return residual > 0
    mask = residual > threshold * sigma
    if float(image.min()) >= 0 and float(image.mean()) > 0:  # counts: Poisson tails, not Gauss
        box_mean = F.avg_pool2d(image[None, None].float(), size, 1, size // 2,
                                count_include_pad=False)[0, 0]  # fmt: skip
        mask &= image.float() >= _poisson_limit(torch.maximum(local, box_mean), threshold)
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
    pad = size // 2
    masked = torch.where(mask, torch.full_like(out, float("nan")), out)
    padded = F.pad(masked[None, None], (pad, pad, pad, pad), mode="constant", value=float("nan"))
    offsets = torch.arange(size, device=image.device)
    windows = padded[0, 0][(ys[:, None, None] + offsets[None, :, None]),
                           (xs[:, None, None] + offsets[None, None, :])]  # fmt: skip
    local = windows.reshape(len(ys), -1).nanmedian(-1).values  # (n,)
    typical = float(out[~mask].median())
    local = torch.where(torch.isnan(local), torch.full_like(local, typical), local)
    residual = out - median_filter(out, size)
    sigma = robust_sigma(residual[~mask])
    scale = (local / typical).clamp(min=0).sqrt() if typical > 0 else torch.ones_like(local)
    noise = torch.randn(len(ys), generator=generator).to(out.device)
    out[ys, xs] = local + sigma * scale * noise
    return out


def defect_count(mask: torch.Tensor) -> int:
    """Number of 8-connected defects in a mask."""
    from scipy import ndimage

    return int(ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3)))[1])
