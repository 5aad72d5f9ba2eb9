"""Finalise a reconstruction: divide data by weight, gridding correction, taper and crop.

relion5-conventions §6 (relion_tomo_reconstruct_particle) and §7.1 (the ML M-step). The
weight ``W`` lives on the padded grid, where it is ``padding^3`` times smaller than on the
box grid (the same sum spread over ``padding^3`` as many voxels); ``snr`` and ``tau2`` are in
RELION's box-grid units, so their terms are divided by ``padding^3`` (RELION's
``oversampling_correction``). Maps are zyx with the centre at ``N//2``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from subtomo.fourier import irfft_centered, radial_average, radius_grid, trilinear_sinc2
from subtomo.reconstruct.accumulator import FourierAccumulator

__all__ = ["Reconstruction", "reconstruct"]

#: RELION's heuristic floor: W is raised to at least this fraction of its shell average.
HEURISTIC_FRACTION = 1e-3


class Reconstruction(NamedTuple):
    """A finalised map and, with ``return_parts``, what RELION writes beside it."""

    map: torch.Tensor  # (c, c, c) real, centred: the corrected, tapered, cropped map
    data: torch.Tensor | None  # (box, box, box) gridding-corrected real-space numerator
    weight: torch.Tensor | None  # (N, N, N) W in full centred Fourier layout (padded grid)


def _divide(
    acc: FourierAccumulator,
    snr: float | None,
    tau2: torch.Tensor | None,
    tau2_fudge: float,
    max_radius: float | None = None,
) -> torch.Tensor:
    """``F = D / denominator`` on the padded rfft grid (zero where undefined and in shells
    ``round(|k|) >= max_radius`` of the box)."""
    n = acc.padded
    scale = n / acc.box
    oversampling = scale**3
    data, weight = acc.data, acc.weight
    radius = radius_grid((n, n, n), device=weight.device).to(weight.dtype)
    if tau2 is not None:
        tau2 = torch.as_tensor(tau2, device=weight.device, dtype=weight.dtype)
        shell = torch.round(radius / scale).long()
        known = (shell < tau2.shape[0]) & (radius <= n // 2)
        t = tau2[shell.clamp(max=tau2.shape[0] - 1)]
        known &= t > 0
        denom = weight + 1 / (oversampling * tau2_fudge * t.clamp(min=torch.finfo(t.dtype).tiny))
    elif snr is not None and snr > 0:
        known = torch.ones_like(weight, dtype=torch.bool)
        denom = weight + 1 / (oversampling * snr)
    else:
        mean = radial_average(weight, (n, n, n))  # (n//2 + 1,): shells round(|k|)
        last = mean.shape[0] - 1
        r0 = radius.floor().long().clamp(max=last - 1)
        t = radius - r0
        floor = (1 - t) * mean[r0] + t * mean[r0 + 1]
        known = radius < last  # beyond the last radial bin: 0
        denom = torch.maximum(weight, HEURISTIC_FRACTION * floor)
    known &= denom > 0
    if max_radius is not None:
        known &= radius < scale * (max_radius - 0.5)
    return torch.where(known, data / torch.where(known, denom, 1), 0)


def _crop(volume: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop of the last three axes to ``size`` (centres at N//2 kept)."""
    lo = volume.shape[-1] // 2 - size // 2
    return volume[..., lo : lo + size, lo : lo + size, lo : lo + size]


def _taper(volume: torch.Tensor, width: float) -> torch.Tensor:
    """Subtract the taper-weighted mean inside the inscribed sphere, then multiply by a raised
    cosine falling over the outer ``width`` voxels of that sphere (zero outside)."""
    n = volume.shape[-1]
    x = torch.arange(n, device=volume.device, dtype=volume.dtype) - n // 2
    r = torch.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)
    outer = n / 2
    edge = ((r - (outer - width)) / width).clamp(0, 1)
    w = torch.where(r < outer, 0.5 + 0.5 * torch.cos(torch.pi * edge), 0)
    mean = (volume * w).sum() / w.sum()
    return (volume - mean) * w


def _full_centred(half: torch.Tensor, n: int) -> torch.Tensor:
    """Real rfft-layout ``(n, n, n//2 + 1)`` Hermitian array -> full ``(n, n, n)``, centred."""
    full = half.new_zeros(n, n, n)
    width = half.shape[-1]
    full[..., :width] = half
    neg = (-torch.arange(n, device=half.device)) % n
    rest = torch.arange(width, n, device=half.device)  # x = -(n - i)
    full[..., width:] = half[neg][:, neg][..., n - rest]
    return torch.fft.fftshift(full)


def reconstruct(
    acc: FourierAccumulator,
    *,
    snr: float | None = None,
    tau2: torch.Tensor | None = None,
    tau2_fudge: float = 1.0,
    taper: float = 10,
    crop: int | None = None,
    gridding_correction: bool = True,
    max_radius: float | None = None,
    return_parts: bool = False,
) -> torch.Tensor | Reconstruction:
    """The real-space map ``(c, c, c)`` (zyx, centre c//2; c = ``crop`` or the box).

    Steps: ``F = D / (W + 1/(p^3 T tau2(shell)))`` with ``tau2`` ``(box//2 + 1,)`` per shell of
    the box (ML M-step, RELION 7.1; zero where tau2 <= 0 or beyond its last shell), else
    ``D / (W + 1/(p^3 SNR))`` for ``snr > 0`` (Wiener), else RELION's heuristic
    ``D / max(W, 0.001 * Wbar(|k|))`` with ``Wbar`` the radial mean of ``W`` (linear
    interpolation; zero beyond the last bin); inverse FFT over the padded box; division by
    ``sinc^2(r/N)`` (gridding correction for trilinear splatting); crop to the box; taper
    (mean inside the inscribed sphere subtracted, raised cosine over the outer ``taper``
    voxels); crop to ``crop``. ``p = N / box``.

    ``max_radius`` (Fourier pixels of the box) is the radius the slices were inserted to, e.g.
    ``current_size // 2`` in refinement: only shells ``round(|k|) < max_radius`` are kept. The
    voxels at the edge hold only part of their trilinear neighbourhood, often small weights
    near CTF zeros, and their quotients would spread noise over the whole map.

    With ``return_parts`` a :class:`Reconstruction` also holds the gridding-corrected
    real-space numerator (box^3) and ``W`` in full centred layout (N^3), as
    relion_tomo_reconstruct_particle writes them (data_<tag>.mrc, weight_<tag>.mrc).
    """
    n, box = acc.padded, acc.box
    real = acc.weight.dtype
    correction = trilinear_sinc2(n, acc.device, real) if gridding_correction else None

    def to_real(f: torch.Tensor) -> torch.Tensor:
        x = irfft_centered(f, (n, n, n))
        return _crop(x / correction if correction is not None else x, box)

    volume = to_real(_divide(acc, snr, tau2, tau2_fudge, max_radius))
    if taper > 0:
        volume = _taper(volume, taper)
    if crop is not None:
        volume = _crop(volume, crop)
    volume = volume.contiguous()
    if not return_parts:
        return volume
    data = to_real(acc.data).contiguous()
    return Reconstruction(volume, data, _full_centred(acc.weight, n))
