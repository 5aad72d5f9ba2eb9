"""Extraction kernels against analytic images and RELION's formulas (conventions §5, §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from subtomo.fourier import irfft_centered, rfft_centered
from subtomo.geometry import euler_to_matrix
from subtomo.reconstruct.extraction import (
    circle_crop,
    cone_weights,
    cut_patches,
    fourier_resize,
    phase_ramp,
    raised_cosine_mask,
    splat_slices,
)
from subtomo.reconstruct.particles import TiltSeriesCtf, extract_slices, visible_frames


def _gaussian_2d(shape, centre_xy, sigma, device=None):
    h, w = shape
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=device),
        torch.arange(w, dtype=torch.float64, device=device),
        indexing="ij",
    )
    return torch.exp(-((x - centre_xy[0]) ** 2 + (y - centre_xy[1]) ** 2) / (2 * sigma**2))


def _flat_ctf(n_frames: int = 1, pixel_size: float = 1.0) -> TiltSeriesCtf:
    zeros = torch.zeros(n_frames)
    return TiltSeriesCtf(
        defocus_u=torch.full((n_frames,), 20000.0),
        defocus_v=torch.full((n_frames,), 20000.0),
        defocus_angle=zeros,
        pre_exposure=zeros,
        voltage_kv=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.07,
        pixel_size=pixel_size,
    )


def test_cut_patches_matches_edge_padded_slicing(device):
    """Patch corners are round(u) - s0//2 with edge clamping; otherwise particles near the
    border would be cut at the wrong place or read out of bounds."""
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(3, 40, 50)).astype(np.float32)
    uv = np.array([[2.4, 3.6], [48.5, 20.0], [25.2, 38.9], [-1.0, 0.2]])
    frames = np.array([0, 2, 1, 1])
    size = 9
    got = cut_patches(
        torch.from_numpy(stack).to(device),
        torch.from_numpy(uv).to(device),
        size,
        image_index=torch.from_numpy(frames).to(device),
    )
    pad = 20
    padded = np.pad(stack, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    for i, (u, v) in enumerate(uv):
        cx, cy = math.floor(u + 0.5) - size // 2, math.floor(v + 0.5) - size // 2
        want = padded[frames[i], cy + pad : cy + pad + size, cx + pad : cx + pad + size]
        np.testing.assert_array_equal(got[i].cpu().numpy(), want)


@pytest.mark.parametrize("binning", [1.0, 2.0, 1.5])
def test_extraction_chain_centres_particle_and_bins(device, binning):
    """A Gaussian at a sub-pixel position must come out centred at pixel s//2 with its
    width divided by the binning and its mean preserved, and with inverted contrast (the
    -CTF premultiplication with a flat CTF); a wrong corner, phase sign or binning scale
    shows up as a shifted, resized or rescaled blob."""
    sigma, s = 4.0, 32
    u, v = 100.3, 87.6
    image = _gaussian_2d((200, 240), (u, v), sigma, device).float()
    data, weight = extract_slices(
        image[None],
        torch.tensor([0], device=device),
        torch.tensor([[u, v]], device=device),
        torch.tensor([0.0], device=device),
        _flat_ctf(),
        box=s,
        binning=binning,
        precrop=False,
        no_ctf=True,
    )
    got = irfft_centered(data, (s, s))[0].double()
    want = -_gaussian_2d((s, s), (s // 2, s // 2), sigma / binning, device)
    assert (got - want).abs().max() < 2e-4
    assert torch.allclose(weight, torch.ones_like(weight))  # dose 0: weight (w)^2 = 1


def test_fourier_resize_preserves_mean_and_pads():
    """Binning then un-binning a band-limited image is the identity and the mean survives;
    a wrong scale factor would change the grey level of every binned particle."""
    image = _gaussian_2d((64, 64), (32, 32), 6.0).float()[None] + 0.3
    binned = irfft_centered(fourier_resize(rfft_centered(image, 2), 32), (32, 32))
    assert binned.mean().item() == pytest.approx(image.mean().item(), rel=1e-5)
    back = irfft_centered(fourier_resize(rfft_centered(binned, 2), 64), (64, 64))
    assert (back - image).abs().max() < 1e-3


def test_phase_ramp_moves_content_by_d(device):
    """exp(-2πi k·d) must move content by +d pixels (x, y), matching the analytic image."""
    n, d = 48, torch.tensor([[2.25, -3.5]], device=device)
    image = _gaussian_2d((n, n), (n // 2, n // 2), 3.0, device).float()[None]
    got = irfft_centered(rfft_centered(image, 2) * phase_ramp(d, n), (n, n))[0].double()
    want = _gaussian_2d((n, n), (n // 2 + 2.25, n // 2 - 3.5), 3.0, device)
    assert (got - want).abs().max() < 1e-4


def test_circle_crop_follows_relion_formula():
    """Outside mean subtracted, 1 inside R-5, 0.5-0.5cos(π(R-r)/5) on the edge, 0 beyond R."""
    n, radius = 32, 12.0
    image = torch.full((1, n, n), 3.0)
    image[0, n // 2, n // 2] = 10.0
    got = circle_crop(image, radius)[0]
    assert got[n // 2, n // 2].item() == pytest.approx(7.0)  # 10 - outside mean 3
    assert got[n // 2, n // 2 + 13].item() == 0.0
    r = 9.0  # between R-5 and R
    want = 0.5 - 0.5 * math.cos(math.pi * (radius - r) / 5.0)
    mask = raised_cosine_mask((n, n), radius)
    assert mask[n // 2, n // 2 + 9].item() == pytest.approx(want, rel=1e-6)
    assert mask[n // 2 + 3, n // 2 + 4].item() == 1.0  # r = 5 < R - 5


def test_visibility_is_strict_with_margin():
    """Centres exactly on the margin are not visible (RELION: strictly inside)."""
    uv = torch.tensor([[[16.0, 50.0], [16.01, 50.0], [84.0, 50.0], [50.0, 83.99]]])
    got = visible_frames(uv, (100, 100), 16.0)
    assert got.tolist() == [[False, True, False, True]]


@pytest.mark.parametrize(
    "angles", [(0.0, 0.0, 90.0), (0.0, 90.0, 0.0), (90.0, 90.0, 0.0), (30.0, 180.0, -60.0)]
)
def test_splat_slices_puts_projection_on_its_central_slice(device, angles):
    """The projection of an off-centre anisotropic blob along A's z, splatted with A, must
    equal the blob's 3D Fourier transform on the voxels it reaches. These rotations put the
    slice exactly on grid points (the 90° tilts on the x = 0 plane, exercising the Friedel
    and mirror rules), so any error in the rotation direction, the conjugation or the
    mirror-plane rule shows up as a mismatch, not as interpolation blur."""
    s = 20
    centre = torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64)
    widths = torch.tensor([1.5, 2.5, 1.0], dtype=torch.float64)
    axis = torch.arange(s, dtype=torch.float64) - s // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    grid = torch.stack([x, y, z], dim=-1)

    def blob(p):
        return torch.exp(-(((p - centre) / widths) ** 2).sum(-1) / 2)

    a = euler_to_matrix(*(torch.tensor(v, dtype=torch.float64) for v in angles))
    image = blob(grid @ a).sum(0)  # image frame p -> reference A^T p; project along z
    slices = rfft_centered(image.float()[None], 2).to(device)
    out = splat_slices(
        slices,
        torch.ones(slices.shape, device=device),
        a.float()[None].to(device),
        torch.zeros(1, dtype=torch.long),
        s,
    )[0].cpu()
    data, mult = out[0], out[2].real
    truth = rfft_centered(blob(grid).float(), 3)
    hit = mult > 0.5
    assert int(hit.sum()) >= 0.45 * math.pi * (s / 2) ** 2  # the half disc of radius s/2
    err = (data[hit] / mult[hit] - truth[hit]).abs().max() / truth.abs().max()
    assert err < 1e-3
    assert torch.allclose(out[1].real, mult)  # unit weights: CTF^2 sum == multiplicity


def test_cone_weights_zero_on_axis_one_far_away():
    """On the q_z axis (ρ = 0) the weight is 0; far from the cone it tends to 1."""
    w = cone_weights(16, torch.eye(3)[None], cone_angle_deg=10.0, sig0=2.0)[0]
    assert w[3, 0, 0].item() == 0.0  # k = (0, 0, 3)
    t = 7 / (0 * math.sin(math.radians(5)) + 2.0)  # k = (7, 0, 0)
    assert w[0, 0, 7].item() == pytest.approx(1 - math.exp(-0.5 * t**2), rel=1e-5)


def test_premultiply_filter_equals_per_particle_ctf_and_dose():
    """The per-tilt CTF with each particle's depth applied as a defocus phase term must equal
    RELION's per-particle CTF (defocus U + hand*slope*px*depth) times the dose weight; a sign
    or unit slip in the depth term shows here at large depths."""
    from subtomo.ctf import ctf_2d, dose_weights, particle_defocus
    from subtomo.reconstruct.particles import TiltSeriesCtf, premultiply_filter

    ctf = TiltSeriesCtf(
        defocus_u=torch.tensor([30000.0, 42000.0]),
        defocus_v=torch.tensor([28000.0, 41000.0]),
        defocus_angle=torch.tensor([20.0, -70.0]),
        pre_exposure=torch.tensor([3.0, 60.0]),
        voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.07, pixel_size=1.5,
        hand=-1.0, defocus_slope=1.2,
    )  # fmt: skip
    frames = torch.tensor([0, 1, 1, 0])
    depth = torch.tensor([-800.0, 0.0, 650.0, 1200.0])
    values, dose = premultiply_filter(ctf, frames, depth, 64, 2.0)
    u, v = particle_defocus(ctf.defocus_u[frames], ctf.defocus_v[frames], depth, 1.5, -1.0, 1.2)
    expected = ctf_2d(u, v, ctf.defocus_angle[frames], 300.0, 2.7, 0.07, 3.0, 64)
    expected_dose = dose_weights(ctf.pre_exposure[frames], 3.0, 64)
    torch.testing.assert_close(dose, expected_dose, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(values, expected * expected_dose, atol=2e-5, rtol=1e-4)
