"""Dose weighting (Grant & Grigorieff 2015, as RELION 5 applies it; conventions §1.5).

Layout: ``(..., h, w//2+1)`` in the unshifted rfft layout of
:func:`subtomo.fourier.fftfreq_grid`; ``|k|`` in cycles/Å; doses in e/Å².
"""

from __future__ import annotations

import torch

from subtomo.ctf._params import Param, as_float64, frequency_grid_2d, resolve_device

__all__ = ["dose_cutoff_mask", "dose_weight_at", "dose_weights"]


def dose_weights(
    pre_exposure: Param,
    pixel_size: Param,
    image_size: int | tuple[int, int],
    *,
    bfactor_per_electron_dose: Param | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dose weights ``(..., h, w//2+1)`` float32 for a pre-exposure ``D`` in e/Å².

    ``w(k) = exp(-D / (2 N_e(k)))`` with the critical exposure
    ``N_e(k) = 0.245 |k|^-1.665 + 2.81`` (``|k|`` in 1/Å) and ``w(0) = 1``. Where
    ``bfactor_per_electron_dose`` β > 0 (rlnCtfBfactorPerElectronDose, Å² per e/Å²) the weight
    is ``exp(-β D |k|²/4)`` instead. Parameters broadcast to the leading ``...``; the pixel
    size is in Å and ``image_size`` is ``N`` or ``(h, w)`` pixels.
    """
    beta_in = 0.0 if bfactor_per_electron_dose is None else bfactor_per_electron_dose
    dev = resolve_device(pre_exposure, pixel_size, beta_in, device=device)
    dose, px, beta = as_float64(pre_exposure, pixel_size, beta_in, device=dev)
    kx, ky = frequency_grid_2d(image_size, dev)
    k = torch.sqrt(kx**2 + ky**2) / px  # (..., h, w') in 1/Å
    return dose_weight_at(k, dose, beta)


def dose_weight_at(
    k_angst: torch.Tensor, pre_exposure: Param, bfactor_per_electron_dose: Param = 0.0
) -> torch.Tensor:
    """The dose weight of :func:`dose_weights` at spatial frequencies ``|k|`` in 1/Å (any
    layout, e.g. 3D points); parameters broadcast against ``k_angst``; float32."""
    k = torch.as_tensor(k_angst, dtype=torch.float64)
    dose, beta = (torch.as_tensor(p, dtype=torch.float64, device=k.device)
                  for p in (pre_exposure, bfactor_per_electron_dose))  # fmt: skip
    critical = 0.245 * k.clamp_min(1e-12) ** -1.665 + 2.81  # e/Å²; huge at k = 0
    grant = torch.where(k > 0, torch.exp(-dose / (2.0 * critical)), torch.ones_like(k))
    bfac = torch.exp(-0.25 * beta * dose * k**2)
    return torch.where(beta > 0, bfac, grant).to(torch.float32)


def dose_cutoff_mask(weights: torch.Tensor, cutoff_fract: float = 0.01) -> torch.Tensor:
    """Frequencies worth inserting: bool ``(..., h, w//2+1)`` (RELION ``--cutoff_fract``).

    For each Fourier row (fixed ky), keeps x = 0 .. the last x where ``weights > cutoff_fract``
    (a row with no such x is dropped), and never beyond radius N/2: ``(x/w)² + (y/h)² <= 1/4``
    with ``w = 2 (w//2+1 - 1)`` (even sizes) and y the wrapped row index.
    """
    h, wh = weights.shape[-2:]
    x = torch.arange(wh, device=weights.device)
    last = torch.where(weights > cutoff_fract, x, -1).amax(dim=-1, keepdim=True)  # (..., h, 1)
    within_row = x <= last
    fx = x.double() / (2 * (wh - 1))
    fy = torch.fft.fftfreq(h, device=weights.device, dtype=torch.float64)
    within_radius = fx**2 + fy[:, None] ** 2 <= 0.25
    return within_row & within_radius
