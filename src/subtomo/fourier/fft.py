"""Centred FFTs and frequency grids: the one Fourier layout all of subtomo uses.

Real-space arrays are zyx (or yx) with the centre at index ``N//2`` along every axis.
Fourier arrays are torch's *unshifted rfft* layout (``torch.fft.rfftn``): the origin at index 0,
the last axis holds x = 0..N/2, the other axes wrap (index i >= N/2 means i - N), exactly
RELION's FFTW half-complex layout. ``rfft_centered`` moves the real-space centre to the
Fourier origin first, so a centred object has real, non-oscillating low frequencies.

Why not ``torch_grid_utils.fftfreq_grid``: evaluated with torch-grid-utils 0.6, it returns
frequency vectors in array-axis order (z, y, x) and in float32 only, where subtomo's geometry
and CTF take xyz vectors and the CTF evaluates its phase in float64 (:mod:`subtomo.ctf.ctf`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["fftfreq_grid", "irfft_centered", "rfft_centered", "rfft_shape"]


def _dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def rfft_centered(x: torch.Tensor, ndim: int, norm: str = "backward") -> torch.Tensor:
    """rfft of the last ``ndim`` axes with the real-space centre (N//2) moved to the origin."""
    dims = _dims(ndim)
    return torch.fft.rfftn(torch.fft.ifftshift(x, dim=dims), dim=dims, norm=norm)


def irfft_centered(f: torch.Tensor, shape: Sequence[int], norm: str = "backward") -> torch.Tensor:
    """Inverse of :func:`rfft_centered` for a real-space ``shape`` (the last len(shape) axes)."""
    dims = _dims(len(shape))
    x = torch.fft.irfftn(f, s=tuple(shape), dim=dims, norm=norm)
    return torch.fft.fftshift(x, dim=dims)


def rfft_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the rfft of a real array of ``shape``: the last axis becomes N//2 + 1."""
    return (*shape[:-1], shape[-1] // 2 + 1)


def fftfreq_grid(
    shape: Sequence[int],
    *,
    rfft: bool = True,
    pixel_size: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Frequencies of every Fourier index, shape ``(*fourier_shape, ndim)``, vectors in xyz.

    ``shape`` is the real-space shape (zyx or yx). Units are cycles/Å when ``pixel_size`` is
    in Å (cycles/pixel for the default 1), so Nyquist is ``0.5 / pixel_size``.
    """
    axes = []
    for i, n in enumerate(shape):
        if rfft and i == len(shape) - 1:
            axes.append(torch.fft.rfftfreq(n, d=pixel_size, device=device, dtype=dtype))
        else:
            axes.append(torch.fft.fftfreq(n, d=pixel_size, device=device, dtype=dtype))
    grids = torch.meshgrid(*axes, indexing="ij")  # zyx order
    return torch.stack(grids[::-1], dim=-1)  # xyz vectors
