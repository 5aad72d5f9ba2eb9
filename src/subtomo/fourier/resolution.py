"""Resolution shells: the two rules that turn a curve over Fourier shells into a resolution.

* :func:`ssnr_resolution_shell` — ``relion_refine``'s current resolution, from the spectral
  signal-to-noise ratio of the references (§7.2);
* :func:`fsc_threshold_shell` and :func:`crossing_shell` — the last shell before an FSC
  first drops below a threshold (0.143 by default, §8 step 4), and the same crossing
  interpolated between shells. Shell 0 never counts as a crossing: it compares the maps'
  means, whose sign is noise for unfiltered half maps (FSC ±1 at random).

Shells are ``round(|k|)`` in Fourier pixels of an ``N``-box: shell ``i`` is ``N * px / i`` Å.
Curves are tensors over shells ``0..N//2`` (last dimension).
"""

from __future__ import annotations

import torch

__all__ = [
    "FSC_THRESHOLD",
    "crossing_shell",
    "crossing_shells",
    "fsc_threshold_shell",
    "ssnr_resolution_shell",
]

FSC_THRESHOLD = 0.143


def ssnr_resolution_shell(ssnr: torch.Tensor) -> int:
    """RELION's current resolution shell: the first shell > 0 where SSNR < 1, minus one.

    ``ssnr`` ``(..., S)``; the best (highest) over leading dims. If the SSNR rises above 1
    again more than 3 shells later, that later shell counts (§7.2).
    """
    s = ssnr.reshape(-1, ssnr.shape[-1])
    best = 1
    for row in s:
        below = (row[1:] < 1).nonzero()
        shell = int(below[0]) if below.numel() else row.shape[0] - 1
        above = (row[shell + 4 :] >= 1).nonzero()
        if above.numel():
            shell = int(above[-1]) + shell + 4
        best = max(best, shell)
    return best


def fsc_threshold_shell(fsc_curve: torch.Tensor, threshold: float = FSC_THRESHOLD) -> int:
    """Last shell before the FSC first drops below ``threshold`` from shell 1 on (0 if
    shell 1 is below; the last shell if it never drops)."""
    below = torch.nonzero(fsc_curve[1:] < threshold)
    if below.numel() == 0:
        return fsc_curve.shape[-1] - 1
    return int(below[0])


def crossing_shells(fsc_curves: torch.Tensor, threshold: float = FSC_THRESHOLD) -> torch.Tensor:
    """Fractional shell where each FSC ``(..., n)`` first drops below ``threshold``: linear
    interpolation between the last shell above and the first below, from shell 1 on (the
    last shell if it never drops, 0 if shell 1 is already below). Returns float64 ``(...)``."""
    curves = fsc_curves.double()
    n = curves.shape[-1]
    below = curves < threshold
    below[..., 0] = False  # the maps' means: no resolution information
    first = torch.where(
        below.any(-1),
        below.double().argmax(-1),
        torch.full_like(below[..., 0], n, dtype=torch.long),
    )
    last_above = (first - 1).clamp(min=0)
    nxt = first.clamp(max=n - 1)
    a = curves.gather(-1, last_above[..., None])[..., 0]
    b = curves.gather(-1, nxt[..., None])[..., 0]
    frac = torch.where(a > b, (a - threshold) / (a - b).clamp(min=1e-12), torch.zeros_like(a))
    out = last_above.double() + frac.clamp(0.0, 1.0)
    out = torch.where(first >= n, torch.full_like(out, n - 1), out)
    return torch.where(first == 1, torch.zeros_like(out), out)


def crossing_shell(fsc_curve: torch.Tensor, threshold: float = FSC_THRESHOLD) -> float:
    """:func:`crossing_shells` of one curve, as a float."""
    return float(crossing_shells(fsc_curve, threshold))
