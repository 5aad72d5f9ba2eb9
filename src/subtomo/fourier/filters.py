"""Isotropic Fourier filters on the rfft grid: raised-cosine low/high-pass and B-factors.

All filters return real weights with the rfft shape of a real-space cube ``shape`` (zyx,
sides ``N``), to multiply an rfft (torch's unshifted layout, see :mod:`subtomo.fourier.fft`).
The raised-cosine edge follows RELION's ``lowPassFilterMap``: the filter shell is
``i = round(N * px / resolution)`` and the cosine runs over ``|k|`` (continuous, Fourier
pixels) from ``i - edge_width//2`` to ``i + edge_width//2`` (default: +-1 shell).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from subtomo.fourier.fft import irfft_centered, rfft_centered
from subtomo.fourier.shells import radius_grid

__all__ = [
    "bfactor_weights",
    "filter_shell",
    "highpass_weights",
    "lowpass_map",
    "lowpass_weights",
]


def filter_shell(resolution_angst: float, box: int, pixel_size: float) -> int:
    """RELION's filter shell ``round(N * px / resolution)`` for a resolution in Å."""
    if resolution_angst <= 0:
        raise ValueError(f"filter resolution must be positive, got {resolution_angst} Å")
    return round(box * pixel_size / resolution_angst)


def _cosine_edge(
    shape: Sequence[int],
    resolution_angst: float,
    pixel_size: float,
    edge_width: int,
    device: torch.device | str | None,
) -> torch.Tensor:
    """Low-pass weights 1 -> 0 across the raised-cosine edge (rfft shape, float32)."""
    n = shape[-1]
    shell = filter_shell(resolution_angst, n, pixel_size)
    half = edge_width // 2
    low = max(0.0, float(shell - half))
    high = float(shell + half)
    r = radius_grid(shape, device=device)
    if high <= low:  # zero-width edge: a hard cut at the shell
        return (r <= low).float()
    t = ((r - low) / (high - low)).clamp(0.0, 1.0)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def lowpass_weights(
    shape: Sequence[int],
    resolution_angst: float,
    pixel_size: float,
    *,
    edge_width: int = 2,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Raised-cosine low-pass at ``resolution_angst`` (1 below the edge, 0 beyond it)."""
    return _cosine_edge(shape, resolution_angst, pixel_size, edge_width, device)


def highpass_weights(
    shape: Sequence[int],
    resolution_angst: float,
    pixel_size: float,
    *,
    edge_width: int = 2,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Raised-cosine high-pass at ``resolution_angst``: ``1 - lowpass`` (0 at low frequency)."""
    return 1.0 - _cosine_edge(shape, resolution_angst, pixel_size, edge_width, device)


def bfactor_weights(
    shape: Sequence[int],
    bfactor: float,
    pixel_size: float,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``exp(-B |k|^2 / 4)`` with ``|k|`` in 1/Å up to Nyquist and 0 beyond (RELION's rule).

    A negative ``bfactor`` (Å^2) sharpens, a positive one blurs.
    """
    n = shape[-1]
    r = radius_grid(shape, device=device)
    k = r.double() / (n * pixel_size)  # 1/Å
    w = torch.exp(-(bfactor / 4.0) * k * k)
    return torch.where(k <= 0.5 / pixel_size, w, torch.zeros_like(w)).float()


def lowpass_map(
    volume: torch.Tensor,
    resolution_angst: float,
    pixel_size: float,
    *,
    edge_width: int = 2,
    ndim: int = 3,
) -> torch.Tensor:
    """Real-space maps (trailing ``ndim`` axes, zyx/yx, centre N//2) low-passed in Å."""
    shape = volume.shape[-ndim:]
    f = rfft_centered(volume, ndim)
    f = f * lowpass_weights(
        shape, resolution_angst, pixel_size, edge_width=edge_width, device=volume.device
    )
    return irfft_centered(f, shape)
