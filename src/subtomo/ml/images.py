"""Per-iteration image preparation: the circular particle mask of the E-step.

RELION masks every image with a soft circle of the particle diameter before the E-step and
fills the outside with noise of the current spectrum (or zeros with ``--zero_mask``); the
M-step uses the unmasked images. For premultiplied data the noise of component k has
``E|N|^2 = 2 sigma2(|k|) CTF2(k)``.
"""

from __future__ import annotations

import torch

from subtomo.fourier import irfft_centered, rfft_centered, shell_index

__all__ = ["mask_images"]


def mask_images(
    data: torch.Tensor,
    ctf2: torch.Tensor,
    sigma2: torch.Tensor,
    mask: torch.Tensor,
    *,
    zero_mask: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masked premultiplied images ``(b, f, n, n//2+1)`` (rfft layout in and out).

    ``sigma2`` ``(b, n//2+1)`` noise spectrum of each particle's optics group (per
    real/imaginary part); ``mask`` ``(n, n)``, e.g. :func:`subtomo.masks.soft_sphere` of the
    particle radius with a 5-pixel edge. Noise is drawn from
    ``generator`` on the CPU (device-independent, reproducible).
    """
    n = data.shape[-2]
    real = irfft_centered(data, (n, n))
    out = real * mask
    if not zero_mask:
        shell = _shells(n, data.device)
        std = torch.sqrt(sigma2[:, None].float()[..., shell] * ctf2)  # (b, f, n, n//2+1)
        noise = torch.randn((2, *data.shape), generator=generator, dtype=torch.float32)
        noise = torch.complex(noise[0], noise[1]).to(data.device) * std
        out = out + irfft_centered(noise, (n, n)) * (1 - mask)
    return rfft_centered(out, 2).to(data.dtype)


def _shells(n: int, device: torch.device) -> torch.Tensor:
    """Shell index clamped to ``n//2`` of every rfft component of an ``n x n`` image."""
    s = shell_index((n, n), device=device)
    return torch.where(s < 0, n // 2, s)
