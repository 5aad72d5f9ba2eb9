"""Fourier-shell statistics by bincount: shell indices, radial averages and the FSC.

Shell ``i`` holds the Fourier components with ``round(|k|) == i`` where ``|k|`` is in
Fourier pixels of an ``N``-box (RELION's convention); shell i is ``N * px / i`` Å. Shells
run from 0 to ``N//2`` (components beyond Nyquist in the corners are left out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from subtomo.fourier.fft import rfft_centered

__all__ = [
    "fsc",
    "fsc_maps",
    "radial_average",
    "radius_grid",
    "shell_index",
    "shell_resolution_angst",
]


def radius_grid(
    shape: Sequence[int], *, rfft: bool = True, device: torch.device | str | None = None
) -> torch.Tensor:
    """``|k|`` in Fourier pixels of every Fourier index (float32, Fourier shape of ``shape``).

    ``shape`` is the real-space shape of a cube or square (all sides ``N``); component
    ``(kx, ky, kz)`` (integers, wrapped) has radius ``sqrt(kx^2 + ky^2 + kz^2)``.
    """
    r2 = None
    for i, n in enumerate(shape):
        last = i == len(shape) - 1
        k = (torch.fft.rfftfreq if rfft and last else torch.fft.fftfreq)(n, device=device) * n
        k2 = torch.round(k).long() ** 2
        k2 = k2.reshape([-1 if j == i else 1 for j in range(len(shape))])
        r2 = k2 if r2 is None else r2 + k2
    return torch.sqrt(r2.float())


def shell_index(
    shape: Sequence[int], *, rfft: bool = True, device: torch.device | str | None = None
) -> torch.Tensor:
    """Shell number ``round(|k| * N)`` of every Fourier index (long; -1 beyond Nyquist).

    ``shape`` is the real-space shape of a cube or square (all sides ``N``). Compute it once
    and pass it as ``index=`` to :func:`fsc`/:func:`radial_average` for repeated statistics.
    """
    n = shape[-1]
    r = torch.round(radius_grid(shape, rfft=rfft, device=device)).long()
    return torch.where(r <= n // 2, r, -1)


def _bincount(index: torch.Tensor, values: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Sum ``values`` (..., *fourier_shape) per shell -> (..., n_shells) (torch.bincount)."""
    idx = torch.where(index >= 0, index, n_shells).reshape(-1)  # beyond Nyquist: extra bin
    lead = values.shape[: values.ndim - index.ndim]
    v = values.reshape(-1, idx.numel())
    b = v.shape[0]
    if b > 1:
        offsets = torch.arange(b, device=idx.device)[:, None] * (n_shells + 1)
        idx = (idx[None, :] + offsets).reshape(-1)
    out = torch.bincount(idx, weights=v.reshape(-1), minlength=b * (n_shells + 1))
    return out.reshape(*lead, n_shells + 1)[..., :n_shells]


def radial_average(
    values: torch.Tensor,
    shape: Sequence[int],
    *,
    rfft: bool = True,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of real ``values`` in each shell: ``(..., N//2 + 1)``.

    ``values`` has the Fourier shape of the real-space ``shape`` as its trailing axes.
    In rfft layout every component is counted once (as RELION does). ``index`` is an
    optional precomputed :func:`shell_index` of ``shape``.
    """
    if index is None:
        index = shell_index(shape, rfft=rfft, device=values.device)
    n_shells = shape[-1] // 2 + 1
    total = _bincount(index, values, n_shells)
    count = _bincount(index, torch.ones_like(values[(0,) * (values.ndim - index.ndim)]), n_shells)
    return total / count.clamp(min=1)


def fsc(
    f1: torch.Tensor,
    f2: torch.Tensor,
    shape: Sequence[int],
    *,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fourier shell correlation of two rfft volumes/images: ``(..., N//2 + 1)``.

    ``FSC = sum Re(F1 conj F2) / sqrt(sum |F1|^2 sum |F2|^2)`` per shell. Shells with no
    power give 0. ``index`` is an optional precomputed :func:`shell_index` of ``shape``.
    """
    if index is None:
        index = shell_index(shape, device=f1.device)
    n_shells = shape[-1] // 2 + 1
    a, b = torch.view_as_real(f1), torch.view_as_real(f2)
    cross = _bincount(index, (a * b).sum(-1).double(), n_shells)
    p1 = _bincount(index, (a * a).sum(-1).double(), n_shells)
    p2 = _bincount(index, (b * b).sum(-1).double(), n_shells)
    denom = torch.sqrt(p1 * p2)
    out = torch.where(denom > 0, cross / denom.clamp(min=1e-300), torch.zeros_like(cross))
    return out.float()


def fsc_maps(
    map1: torch.Tensor, map2: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """FSC ``(N//2 + 1,)`` between two real-space maps (zyx, centred), optionally masked."""
    if mask is not None:
        map1, map2 = map1 * mask, map2 * mask
    nd = map1.ndim
    return fsc(rfft_centered(map1, nd), rfft_centered(map2, nd), map1.shape)


def shell_resolution_angst(n_shells: int, box: int, pixel_size: float) -> torch.Tensor:
    """Resolution in Å of shells 0..n_shells-1 (``box * px / i``; inf at shell 0)."""
    i = torch.arange(n_shells, dtype=torch.float64)
    return torch.where(i > 0, box * pixel_size / i.clamp(min=1), torch.inf)
