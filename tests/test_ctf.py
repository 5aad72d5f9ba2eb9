"""CTF and dose weights against independent numpy implementations of RELION's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from subtomo.ctf import (
    ctf_2d,
    dose_cutoff_mask,
    dose_weights,
    electron_wavelength_angstrom,
    particle_defocus,
)


def _numpy_ctf(u, v, angle, kv, cs, q0, px, shape, phase=0.0, b=0.0, scale=1.0):
    """RELION's CTF (conventions §1.5) written directly in numpy, float64, rfft layout."""
    h, w = shape
    ky = np.fft.fftfreq(h, px)[:, None]
    kx = np.fft.rfftfreq(w, px)[None, :]
    volts = kv * 1e3
    lam = 12.2643247 / np.sqrt(volts * (1 + 0.978466e-6 * volts))
    k2 = kx**2 + ky**2
    theta = np.arctan2(ky, kx)
    a = np.deg2rad(angle)
    df = u * np.cos(theta - a) ** 2 + v * np.sin(theta - a) ** 2
    gamma = (
        -np.pi * lam * df * k2
        + np.pi / 2 * cs * 1e7 * lam**3 * k2**2
        - np.deg2rad(phase)
        - np.arctan(q0 / np.sqrt(1 - q0**2))
    )
    return -np.sin(gamma) * np.exp(-b * k2 / 4) * scale, gamma


def _k2(n: int, px: float) -> np.ndarray:
    """|k|² on an n x n rfft grid, 1/Å² for a pixel size in Å."""
    return np.fft.fftfreq(n, px)[:, None] ** 2 + np.fft.rfftfreq(n, px)[None, :] ** 2


def test_wavelength_known_values() -> None:
    """300 kV electrons have λ = 0.019687 Å and 200 kV 0.025079 Å; otherwise γ is off."""
    lam = electron_wavelength_angstrom(torch.tensor([300.0, 200.0]))
    assert torch.allclose(lam, torch.tensor([0.0196875, 0.0250795], dtype=lam.dtype), atol=2e-7)


def test_ctf_matches_numpy_random_parameters(device: torch.device) -> None:
    """Batched CTFs equal RELION's formula to 1e-5 over random parameters, U < V included.

    A failure means a wrong sign, unit (Cs mm, phase degrees), angle origin, astigmatism
    orientation, envelope, scale or rfft layout, or a broadcasting error across the batch.
    """
    rng = np.random.default_rng(1)
    n = 12
    u = rng.uniform(5_000, 50_000, n)
    v = u + rng.uniform(-4_000, 4_000, n)  # about half have U < V
    assert (u < v).any() and (u > v).any()
    angle = rng.uniform(-180, 180, n)
    kv = rng.choice([200.0, 300.0], n)
    cs = rng.uniform(0, 3, n)
    q0 = rng.uniform(0, 0.2, n)
    px = rng.uniform(0.8, 3.0, n)
    phase = rng.uniform(0, 120, n)
    b = rng.uniform(0, 200, n)
    scale = rng.uniform(0.5, 1.5, n)
    shape = (40, 36)
    t = [torch.tensor(a, device=device) for a in (u, v, angle, kv, cs, q0, px, phase, b, scale)]
    got = ctf_2d(*t[:7], shape, phase_shift_deg=t[7], bfactor=t[8], scale=t[9])
    assert got.shape == (n, 40, 19) and got.dtype == torch.float32 and got.device == device
    for i in range(n):
        want, _ = _numpy_ctf(
            u[i], v[i], angle[i], kv[i], cs[i], q0[i], px[i], shape, phase[i], b[i], scale[i]
        )
        np.testing.assert_allclose(got[i].cpu().numpy(), want, rtol=0, atol=1e-5 * scale[i])


def test_ctf_broadcasts_leading_dims() -> None:
    """Parameters of shapes (2, 1) and (3,) give a (2, 3, h, w') stack of the right CTFs."""
    u = torch.tensor([[12_000.0], [30_000.0]])
    phase = torch.tensor([0.0, 30.0, 90.0])
    got = ctf_2d(u, 11_000.0, 20.0, 300.0, 2.7, 0.07, 1.2, 32, phase_shift_deg=phase)
    assert got.shape == (2, 3, 32, 17)
    want, _ = _numpy_ctf(30_000.0, 11_000.0, 20.0, 300.0, 2.7, 0.07, 1.2, (32, 32), 30.0)
    np.testing.assert_allclose(got[1, 1].numpy(), want, atol=1e-5)


def test_ctf_zeros_at_analytic_frequencies() -> None:
    """With Cs = 0, Q0 = 0, no astigmatism, the CTF vanishes where π λ Δf k² = nπ.

    Δf is chosen so the first zero falls on x index 10 (k₁ = 10/(N px)); the zeros of order
    4, 9, 16 then fall on indices 20, 30, 40, with a sign change across each. A failure means
    the defocus term (λ, Å units, k², pixel size) is wrong.
    """
    kv, px, n = 300.0, 1.5, 128
    lam = float(electron_wavelength_angstrom(kv))
    k1 = 10 / (n * px)
    df = 1 / (lam * k1**2)
    ctf = ctf_2d(df, df, 33.0, kv, 0.0, 0.0, px, n).double()
    for i in (10, 20, 30, 40):
        assert abs(float(ctf[0, i])) < 1e-5  # along x
        assert abs(float(ctf[i, 0])) < 1e-5  # along y, positive ky
        assert abs(float(ctf[n - i, 0])) < 1e-5  # negative ky
        assert float(ctf[0, i - 1]) * float(ctf[0, i + 1]) < 0
    assert torch.all(ctf[0, 1:10].abs() > 1e-3)  # no zero before the first


def test_ctf_astigmatism_orientation() -> None:
    """Defocus U lies along the defocus angle from image +x (zeros move with it).

    Along θ = α the CTF equals the isotropic CTF of defocus U, along α + 90° that of V.
    """
    u, v, a = 25_000.0, 15_000.0, 0.0
    n = 64
    got = ctf_2d(u, v, a, 300.0, 2.7, 0.1, 1.0, n)
    iso_u = ctf_2d(u, u, 0.0, 300.0, 2.7, 0.1, 1.0, n)
    iso_v = ctf_2d(v, v, 0.0, 300.0, 2.7, 0.1, 1.0, n)
    assert torch.allclose(got[0, :], iso_u[0, :], atol=1e-6)  # along x (ky = 0)
    assert torch.allclose(got[:, 0], iso_v[:, 0], atol=1e-6)  # along y (kx = 0)
    rotated = ctf_2d(u, v, 90.0, 300.0, 2.7, 0.1, 1.0, n)
    assert torch.allclose(rotated[0, :], iso_v[0, :], atol=1e-6)


def test_ignore_until_first_peak() -> None:
    """CTF is 1 (times envelope) wherever |γ| < π/2 and RELION's CTF elsewhere."""
    args = (18_000.0, 16_000.0, 40.0, 300.0, 2.7, 0.1, 1.3, (48, 48))
    got = ctf_2d(*args, bfactor=50.0, ignore_until_first_peak=True).numpy()
    want, gamma = _numpy_ctf(*args, b=50.0)
    env = np.exp(-50.0 * _k2(48, 1.3) / 4)
    inside = np.abs(gamma) < np.pi / 2
    assert inside.sum() > 3 and (~inside).sum() > 100
    np.testing.assert_allclose(got[inside], env[inside], atol=1e-6)
    np.testing.assert_allclose(got[~inside], want[~inside], atol=1e-5)


def test_dose_weights_hand_values(device: torch.device) -> None:
    """Grant-Grigorieff weights at hand-computed k; 1 at k = 0; β form when β > 0.

    At k = 1/16 Å⁻¹: N_e = 0.245·16^1.665 + 2.81 = 27.5857, so w(D=60) = exp(-60/55.171).
    """
    w = dose_weights(torch.tensor([0.0, 30.0, 60.0], device=device), 1.0, 16)
    assert w.shape == (3, 16, 9) and w.device == device
    assert torch.all(w[:, 0, 0] == 1.0) and torch.all(w[0] == 1.0)
    ne = 0.245 * 16**1.665 + 2.81
    assert abs(ne - 27.5857) < 1e-4
    assert abs(float(w[2, 0, 1]) - math.exp(-60 / (2 * ne))) < 1e-6
    assert abs(float(w[2, 1, 0]) - math.exp(-60 / (2 * ne))) < 1e-6  # along y as along x
    k = math.hypot(4 / 16, 4 / 16)  # index (y, x) = (4, 4) at 1 Å on 16 px
    wk = dose_weights(45.0, 1.0, 16)[4, 4]
    assert abs(float(wk) - math.exp(-45 / (2 * (0.245 * k**-1.665 + 2.81)))) < 1e-6
    wb = dose_weights(
        torch.tensor([10.0, 20.0], device=device), 2.0, 16, bfactor_per_electron_dose=4.0
    )
    k2 = (3 / 32) ** 2  # index x = 3 at pixel size 2 Å on 16 px
    assert abs(float(wb[1, 0, 3]) - math.exp(-4.0 * 20.0 * k2 / 4)) < 1e-6


def test_dose_cutoff_mask() -> None:
    """Per row: x up to the last weight above the cutoff, within radius N/2.

    Built on a hand-made weight array with a non-monotonic row, so "last x above" differs
    from "all x above"; a failure means the row rule or the N/2 circle is wrong.
    """
    w = torch.zeros(8, 5)
    w[0] = torch.tensor([1.0, 0.5, 0.005, 0.5, 0.5])  # y = 0: x = 4 is on the radius-4 circle
    w[1] = torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5])  # y = 1: x = 4 beyond radius (17 > 16)
    w[3] = torch.tensor([0.001, 0.0, 0.0, 0.0, 0.0])  # nothing above: empty row
    w[4] = torch.ones(5)  # y = -4 (Nyquist row): only x = 0
    w[7] = torch.tensor([1.0, 0.02, 0.0, 0.0, 0.0])  # y = -1
    m = dose_cutoff_mask(w, cutoff_fract=0.01)
    assert m[0].tolist() == [True] * 5
    assert m[1].tolist() == [True, True, True, True, False]
    assert not m[3].any() and not m[2].any()
    assert m[4].tolist() == [True, False, False, False, False]
    assert m[7].tolist() == [True, True, False, False, False]


def test_dose_cutoff_mask_on_dose_weights() -> None:
    """For monotonic dose weights the mask is exactly {w > cutoff} inside radius N/2."""
    w = dose_weights(torch.tensor([5.0, 80.0]), 1.5, 32)
    m = dose_cutoff_mask(w, 0.05)
    k2 = torch.tensor(_k2(32, 1.0))  # cycles/pixel²
    assert torch.equal(m, (w > 0.05) & (k2 <= 0.25))
    assert m[0].sum() > m[1].sum() > 0


def test_particle_defocus() -> None:
    """U' = U + hand·slope·px·dz for every particle and tilt (§1.4), V likewise."""
    u = torch.tensor([10_000.0, 20_000.0, 30_000.0], dtype=torch.float64)  # per tilt
    v = u + 500.0
    dz = torch.tensor([[10.0, -20.0, 0.0], [100.0, 5.0, -7.5]], dtype=torch.float64)
    up, vp = particle_defocus(u, v, dz, 1.7, -1, slope=0.5)
    assert up.shape == (2, 3)
    assert float(up[1, 0]) == pytest.approx(10_000.0 - 0.5 * 1.7 * 100.0)
    assert float(up[0, 1]) == pytest.approx(20_000.0 + 0.5 * 1.7 * 20.0)
    assert torch.allclose(vp - up, torch.full_like(up, 500.0))


def test_zernike_polynomials_as_relion_documents_them() -> None:
    """RELION's order of rlnEvenZernike/rlnOddZernike and its unnormalised polynomials of the
    frequency in 1/Å: its documented example Z_3^-1 = 3(kx² + ky²)·ky − 2ky, and Z_4^0 (the
    7th even term, a change of Cs) = 6r⁴ − 6r² + 1."""
    from subtomo.ctf.aberrations import aberration_phase, zernike_indices, zernike_polynomial

    assert zernike_indices(9, "even") == [(0, 0), (2, -2), (2, 0), (2, 2), (4, -4), (4, -2),
                                          (4, 0), (4, 2), (4, 4)]  # fmt: skip
    assert zernike_indices(6, "odd") == [(1, -1), (1, 1), (3, -3), (3, -1), (3, 1), (3, 3)]
    kx = torch.tensor([0.1, 0.03, -0.2], dtype=torch.float64)
    ky = torch.tensor([0.05, -0.12, 0.07], dtype=torch.float64)
    r2 = kx**2 + ky**2
    torch.testing.assert_close(zernike_polynomial(3, -1, kx, ky), 3 * r2 * ky - 2 * ky)
    torch.testing.assert_close(aberration_phase([0, 0, 0, 0, 0, 0, 2.0], "even", kx, ky),
                               2 * (6 * r2**2 - 6 * r2 + 1))  # fmt: skip


def test_even_aberrations_enter_gamma() -> None:
    """An even aberration c·Z_2^0 = c(2|k|² − 1) added to γ is a defocus change of
    −2c/(πλ) Å plus a phase shift of c rad (γ has −φ): the premultiplied CTF of a tilt series
    with rlnEvenZernike [0, 0, c] equals the one with those changes instead."""
    import dataclasses

    from subtomo.reconstruct.particles import TiltSeriesCtf, premultiply_filter

    c, kv = 0.7, 300.0
    base = TiltSeriesCtf(
        defocus_u=torch.tensor([30000.0, 25000.0]), defocus_v=torch.tensor([29000.0, 26000.0]),
        defocus_angle=torch.tensor([20.0, -40.0]), pre_exposure=torch.tensor([0.0, 3.0]),
        voltage_kv=kv, cs_mm=2.7, amplitude_contrast=0.07, pixel_size=2.0,
    )  # fmt: skip
    lam = float(electron_wavelength_angstrom(kv))
    change = -2 * c / (math.pi * lam)
    moved = dataclasses.replace(
        base, defocus_u=base.defocus_u + change, defocus_v=base.defocus_v + change,
        phase_shift=math.degrees(c),
    )  # fmt: skip
    aberrated = dataclasses.replace(base, even_zernike=(0.0, 0.0, c))
    frames, depth = torch.tensor([0, 1]), torch.zeros(2)
    got, _ = premultiply_filter(aberrated, frames, depth, 64, 1.0)
    want, _ = premultiply_filter(moved, frames, depth, 64, 1.0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    plain, _ = premultiply_filter(base, frames, depth, 64, 1.0)
    assert (got - plain).abs().max() > 0.5
