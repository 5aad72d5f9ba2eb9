"""Fourier accumulators and finalisation against ground-truth maps and RELION's formulas."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from subtomo.fourier import extract_slices, fsc_maps, irfft_centered, projector_rfft, rfft_centered
from subtomo.geometry import euler_to_matrix
from subtomo.reconstruct import FourierAccumulator, reconstruct
from test_slices import blob_map, random_matrices

N_BOX = 32


def _project_and_insert(
    volume: torch.Tensor, mats: torch.Tensor, device: torch.device, padding: float = 2.0
) -> FourierAccumulator:
    f = projector_rfft(volume.to(device), padding)
    acc = FourierAccumulator(volume.shape[-1], padding, device=device)
    for start in range(0, mats.shape[0], 1000):
        m = mats[start : start + 1000].to(device)
        s = extract_slices(f, m, padding=padding)
        acc.insert(s, torch.ones(s.shape, device=device), m)
    return acc


def _min_fsc(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.9) -> float:
    f = fsc_maps(a.cpu(), b.cpu())
    return float(f[1 : int(fraction * a.shape[-1] / 2) + 1].min())


@pytest.mark.parametrize("snr", [None, 100.0])
def test_project_insert_reconstruct_recovers_the_map(snr, device):
    """3000 random projections (padding 2) inserted and finalised give FSC >= 0.98 to the true
    map up to 0.9 Nyquist and the right grey scale (within 2%), heuristic and Wiener: a wrong
    weight division, gridding correction or padding scale would fail."""
    truth = blob_map(N_BOX, seed=11, sigma=0.8)
    acc = _project_and_insert(truth, random_matrices(3000, seed=12), device)
    out = reconstruct(acc, snr=snr, taper=0)
    assert out.shape == truth.shape and out.device == acc.device
    assert _min_fsc(out, truth) >= 0.98
    scale = float((out.cpu() * truth).sum() / (truth * truth).sum())
    assert abs(scale - 1) < 0.02, scale


def test_symmetrised_reconstruction_from_one_sixth_of_the_views(device):
    """A C6 object from views of one asymmetric unit (rot in [0, 60)) plus C6 symmetrisation
    reaches the FSC of the full set of views without symmetry; wrong operators, a missing
    identity or symmetrising only the data would not."""
    truth = blob_map(N_BOX, seed=13, sigma=1.0, count=12, c_sym=6)
    ops = euler_to_matrix(torch.arange(6) * 60.0, 0.0, 0.0)  # C6 about z
    u = torch.rand(3000, 3, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    tilt = torch.rad2deg(torch.arccos(1 - 2 * u[:, 1]))
    full = euler_to_matrix(360 * u[:, 0], tilt, 360 * u[:, 2]).float()
    unit = euler_to_matrix(60 * u[:500, 0], tilt[:500], 360 * u[:500, 2]).float()
    reference = reconstruct(_project_and_insert(truth, full, device), taper=0)
    acc = _project_and_insert(truth, unit, device)
    acc.symmetrise(ops)
    sym = reconstruct(acc, taper=0)
    fsc_full = fsc_maps(reference.cpu(), truth)[1:15]
    fsc_sym = fsc_maps(sym.cpu(), truth)[1:15]
    assert fsc_sym.min() >= 0.98
    assert torch.all(fsc_sym >= fsc_full - 0.01), (fsc_sym, fsc_full)


def _numpy_divide(d: np.ndarray, w: np.ndarray, n: int, box: int, **kw) -> np.ndarray:
    """RELION's divisions written out with numpy (padded grid n, box ``box``)."""
    k, kx = np.fft.fftfreq(n) * n, np.fft.rfftfreq(n) * n
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    p3 = (n / box) ** 3
    if "tau2" in kw:
        shell = np.round(r / (n / box)).astype(int)
        tau2 = kw["tau2"]
        ok = (shell < len(tau2)) & (r <= n // 2)
        t = tau2[np.minimum(shell, len(tau2) - 1)]
        ok &= t > 0
        return np.where(ok, d / (w + 1 / (p3 * kw["fudge"] * np.where(t > 0, t, 1))), 0)
    shells = np.round(r).astype(int)
    mean = np.array([w[shells == i].mean() for i in range(n // 2 + 1)])
    r0 = np.minimum(np.floor(r).astype(int), n // 2 - 1)
    t = r - r0
    wbar = (1 - t) * mean[r0] + t * mean[np.minimum(r0 + 1, n // 2)]
    denom = np.maximum(w, 1e-3 * wbar)
    return np.where((r < n // 2) & (denom > 0), d / np.where(denom > 0, denom, 1), 0)


@pytest.mark.parametrize("mode", ["heuristic", "tau2"])
def test_division_follows_relion_formulas(mode):
    """Finalisation without gridding correction or taper equals the inverse FFT of RELION's
    heuristic D / max(W, 0.001 Wbar) or the MAP D / (W + 1/(p^3 T tau2)), written out
    independently with numpy (radial means by shell loops)."""
    box, padding = 8, 2.0
    acc = FourierAccumulator(box, padding, dtype=torch.float64)
    n = acc.padded
    g = torch.Generator().manual_seed(15)
    acc.data = rfft_centered(torch.randn(n, n, n, generator=g, dtype=torch.float64), 3)
    acc.weight = rfft_centered(torch.randn(n, n, n, generator=g, dtype=torch.float64), 3).abs()
    acc.weight[0, 0, 3] = 0  # an empty voxel
    d, w = acc.data.numpy(), acc.weight.numpy()
    if mode == "tau2":
        tau2 = np.abs(np.random.default_rng(0).normal(size=box // 2)) * 1e-3
        tau2[2] = 0  # a shell with no signal: zero
        out = reconstruct(acc, tau2=torch.from_numpy(tau2), tau2_fudge=2.0, taper=0,
                          gridding_correction=False)  # fmt: skip
        expected = _numpy_divide(d, w, n, box, tau2=tau2, fudge=2.0)
    else:
        out = reconstruct(acc, taper=0, gridding_correction=False)
        expected = _numpy_divide(d, w, n, box)
    full = irfft_centered(torch.from_numpy(expected), (n, n, n))
    lo = n // 2 - box // 2
    torch.testing.assert_close(out, full[lo : lo + box, lo : lo + box, lo : lo + box])


def test_insert_volume_identity_reconstructs_exactly():
    """Without padding, a 3D rfft volume inserted at the identity with weight 1 comes back
    exactly (integer positions, no interpolation); the x = 0 plane doubling must cancel."""
    box = 16
    v = torch.randn(box, box, box, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    f = rfft_centered(v, 3)
    acc = FourierAccumulator(box, 1.0, dtype=torch.float64)
    acc.insert_volume(f, torch.ones(f.shape, dtype=torch.float64), max_radius=box)
    out = reconstruct(acc, snr=1e12, taper=0, gridding_correction=False)
    torch.testing.assert_close(out, v)


def test_taper_crop_and_parts():
    """The taper zeroes everything outside the inscribed sphere, keeps the inner region up to
    a constant (the subtracted mean), the crop keeps the centre, and the parts are the
    gridding-corrected numerator and W mirrored to full centred layout (W(-k) = W(k))."""
    box = 16
    truth = blob_map(box, seed=17, sigma=1.0)
    acc = _project_and_insert(truth, random_matrices(800, seed=18), torch.device("cpu"))
    plain = reconstruct(acc, taper=0)
    parts = reconstruct(acc, taper=3, crop=12, return_parts=True)
    tapered = reconstruct(acc, taper=3)
    x = torch.arange(box) - box // 2
    r = torch.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)
    assert torch.all(tapered[r >= box / 2] == 0)
    inner = r < box / 2 - 3
    diff = (tapered - plain)[inner]
    torch.testing.assert_close(diff, diff.mean().expand_as(diff), atol=1e-5, rtol=0)
    torch.testing.assert_close(parts.map, tapered[2:14, 2:14, 2:14])
    n = acc.padded
    c = n // 2
    w = parts.weight
    assert w.shape == (n, n, n)
    torch.testing.assert_close(w[c + 1, c + 2, c + 3], acc.weight[1, 2, 3])
    torch.testing.assert_close(w[c - 1, c - 2, c - 3], acc.weight[1, 2, 3])
    numerator = irfft_centered(acc.data, (n, n, n))
    lo = c - box // 2
    sinc2 = torch.sinc(torch.tensor(3**0.5 / n)) ** 2  # voxel (1, 1, 1) from the centre
    torch.testing.assert_close(
        parts.data[box // 2 + 1, box // 2 + 1, box // 2 + 1],
        numerator[lo + box // 2 + 1, lo + box // 2 + 1, lo + box // 2 + 1] / sinc2,
    )


def test_merging_checkpoint_and_all_reduce(device):
    """Two halves merged equal one accumulator fed both (sums are exact up to rounding);
    a state_dict saved and loaded is identical; all_reduce without a process group is a
    no-op; incompatible boxes are refused."""
    truth = blob_map(16, seed=19)
    mats = random_matrices(200, seed=20)
    f = projector_rfft(truth.to(device), 2.0)
    s = extract_slices(f, mats.to(device), padding=2.0)
    ones = torch.ones(s.shape, device=device)
    whole, a, b = (FourierAccumulator(16, 2.0, device=device) for _ in range(3))
    whole.insert(s, ones, mats)
    a.insert(s[:120], ones[:120], mats[:120])
    b.insert(s[120:], ones[120:], mats[120:])
    merged = a.merged_with(b)
    torch.testing.assert_close(merged.data, whole.data, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(merged.weight, whole.weight, atol=1e-4, rtol=1e-5)
    assert not torch.equal(a.weight, merged.weight)  # merged_with leaves a unchanged
    a += b
    torch.testing.assert_close(a.data, merged.data)
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    loaded = FourierAccumulator.from_state_dict(torch.load(buffer), device=device)
    assert torch.equal(loaded.data, whole.data) and torch.equal(loaded.weight, whole.weight)
    before = whole.data.clone()
    whole.all_reduce()
    assert torch.equal(whole.data, before)
    with pytest.raises(ValueError, match="box"):
        whole += FourierAccumulator(18, 2.0, device=device)
