"""Raised-cosine filters and B-factor weights against RELION's formulas written out."""

from __future__ import annotations

import math

import numpy as np
import torch

from subtomo.fourier import (
    bfactor_weights,
    filter_shell,
    highpass_weights,
    lowpass_map,
    lowpass_weights,
    rfft_centered,
)


def _radius(n: int) -> np.ndarray:
    k, kx = np.fft.fftfreq(n) * n, np.fft.rfftfreq(n) * n
    z, y, x = np.meshgrid(k, k, kx, indexing="ij")
    return np.sqrt(x**2 + y**2 + z**2)


def test_lowpass_matches_relion_raised_cosine(device):
    """Weights are 1 below shell-1, 0 beyond shell+1, 0.5+0.5cos in between (RELION's
    lowPassFilterMap); a wrong shell rounding or edge would move the 0.5 point."""
    n, px, res = 32, 2.0, 9.0
    shell = round(n * px / res)  # 7
    assert filter_shell(res, n, px) == shell
    r = _radius(n)
    lo, hi = shell - 1, shell + 1
    ref = np.where(r < lo, 1.0, np.where(r > hi, 0.0, 0.5 + 0.5 * np.cos(math.pi * (r - lo) / 2)))
    ours = lowpass_weights((n, n, n), res, px, device=device).cpu().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    hp = highpass_weights((n, n, n), res, px, device=device).cpu().numpy()
    np.testing.assert_allclose(hp, 1.0 - ref, atol=1e-6)


def test_bfactor_weights_formula_and_nyquist(device):
    """exp(-B k^2/4) with k in 1/Å up to Nyquist and 0 beyond; a sign or unit error would
    change the value at k = 0.1/Å."""
    n, px, b = 32, 2.5, -200.0
    w = bfactor_weights((n, n, n), b, px, device=device).cpu().numpy()
    k = _radius(n) / (n * px)
    ref = np.where(k <= 0.5 / px, np.exp(-b * k**2 / 4), 0.0)
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    assert w[0, 0, 8] == np.float32(np.exp(200 / 4 * (8 / 80) ** 2))


def test_lowpass_map_removes_power_beyond_edge(device):
    """A low-passed noise volume has no power beyond shell+1 and keeps it below shell-1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 24, 24, generator=g).to(device)
    y = lowpass_map(x, 6.0, 1.0)  # shell 4
    fx, fy = rfft_centered(x, 3), rfft_centered(y, 3)
    r = torch.as_tensor(_radius(24), device=device)
    assert fy[r > 5.0].abs().max() < 1e-4 * fx.abs().max()
    torch.testing.assert_close(fy[r < 3.0], fx[r < 3.0], rtol=1e-4, atol=1e-3)
