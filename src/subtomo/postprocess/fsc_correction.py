"""Solvent-mask correction of the FSC by phase randomisation.

Conventions (relion5-conventions section 8): shells are ``round(|k|)`` in Fourier pixels of
an ``N``-box, shell ``i`` is ``N * px / i`` Å. FSC curves are 1D tensors over shells
``0..N//2``. The resolution read-out from an FSC is :mod:`subtomo.fourier.resolution`.
"""

from __future__ import annotations

import math

import torch

from subtomo.fourier import radius_grid

__all__ = [
    "corrected_fsc",
    "particle_fraction_fsc",
    "randomize_phases_beyond",
    "randomize_shell",
]


def randomize_phases_beyond(
    f: torch.Tensor,
    shape: tuple[int, ...],
    shell: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Copy of rfft ``f`` of a real cube ``shape`` with uniformly random phases where
    ``|k|^2 >= shell^2`` (Fourier pixels); amplitudes are kept.

    ``generator`` (a CPU generator) makes it reproducible; random numbers are drawn on the
    CPU so CPU and GPU runs agree.
    """
    beyond = radius_grid(shape, device=f.device) ** 2 >= shell * shell - 1e-3
    phases = torch.rand(f.shape, generator=generator, dtype=torch.float32) * (2 * math.pi)
    randomized = torch.polar(f.abs().float(), phases.to(f.device)).to(f.dtype)
    return torch.where(beyond, randomized, f)


def randomize_shell(
    fsc_unmasked: torch.Tensor,
    box: int,
    pixel_size: float,
    *,
    at_fsc: float = 0.8,
    at_angst: float = -1.0,
) -> int:
    """First randomised shell: ``floor(N px / at_angst)`` if ``at_angst > 0``, else the first
    shell ``i > 0`` where the unmasked FSC ``< at_fsc``. ``ValueError`` if it never drops."""
    if at_angst > 0:
        return int(box * pixel_size / at_angst)
    below = torch.nonzero(fsc_unmasked[1:] < at_fsc)
    if below.numel() == 0:
        raise ValueError(
            f"the unmasked FSC never drops below {at_fsc}; give a resolution to randomise from"
        )
    return int(below[0]) + 1


def corrected_fsc(
    fsc_masked: torch.Tensor, fsc_random: torch.Tensor, randomize_at: int
) -> torch.Tensor:
    """``FSC_true``: the masked FSC below shell ``randomize_at + 2``, beyond it
    ``(FSC_m - FSC_rand) / (1 - FSC_rand)``, and 0 where ``FSC_rand > FSC_m``."""
    i = torch.arange(fsc_masked.shape[-1], device=fsc_masked.device)
    true = (fsc_masked - fsc_random) / (1.0 - fsc_random)
    true = torch.where(fsc_random > fsc_masked, torch.zeros_like(true), true)
    return torch.where(i < randomize_at + 2, fsc_masked, true)


def particle_fraction_fsc(fsc_unmasked: torch.Tensor, fraction: float) -> torch.Tensor:
    """Box-to-particle-volume corrected FSC ``f FSC / (f FSC + 1 - FSC)`` (RELION/cisTEM)."""
    return fraction * fsc_unmasked / (fraction * fsc_unmasked + 1.0 - fsc_unmasked)
