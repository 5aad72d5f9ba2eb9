"""Shared helpers for the CTF and dose modules: parameter tensors and 2D frequency grids."""

from __future__ import annotations

import torch

from subtomo.fourier import fftfreq_grid

Param = float | torch.Tensor


def resolve_device(*params: Param | None, device: torch.device | str | None) -> torch.device:
    """The explicit ``device``, else that of the first tensor parameter, else cpu."""
    if device is not None:
        return torch.device(device)
    for p in params:
        if isinstance(p, torch.Tensor):
            return p.device
    return torch.device("cpu")


def as_float64(*params: Param, device: torch.device) -> list[torch.Tensor]:
    """Parameters as broadcast float64 tensors on ``device``, each with two trailing unit axes.

    The trailing ``(1, 1)`` lets them broadcast against an ``(h, w//2+1)`` Fourier grid.
    """
    tensors = [torch.as_tensor(p, dtype=torch.float64, device=device) for p in params]
    return [t[..., None, None] for t in torch.broadcast_tensors(*tensors)]


def frequency_grid_2d(
    image_size: int | tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kx, ky) in cycles/pixel, float64, each ``(h, w//2+1)`` in the unshifted rfft layout."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    k = fftfreq_grid((h, w), pixel_size=1.0, device=device, dtype=torch.float64)  # (h, w', xy)
    return k[..., 0], k[..., 1]
