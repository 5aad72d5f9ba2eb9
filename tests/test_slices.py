"""Fourier slice extraction/insertion against exact projections, real-space projections,
torch-fourier-slice, and the adjoint identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from subtomo.fourier import (
    extract_slices,
    extract_volumes,
    fsc,
    insert_slices,
    insert_volumes,
    projector_rfft,
    rfft_centered,
)
from subtomo.fourier import slices as slices_module
from subtomo.geometry import euler_to_matrix


def random_matrices(m: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RELION matrices of ``m`` orientations uniform on SO(3)."""
    u = torch.rand(m, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tilt = torch.rad2deg(torch.arccos(1 - 2 * u[:, 1]))
    return euler_to_matrix(360 * u[:, 0], tilt, 360 * u[:, 2]).to(dtype)


def blob_map(
    n: int, seed: int, sigma: float = 1.0, count: int = 60, c_sym: int = 1
) -> torch.Tensor:
    """A smooth map of Gaussian blobs at random places inside radius n/4 + 1 about the centre
    n//2: asymmetric, or with ``c_sym`` > 1 the blobs repeated about z (exact C_n)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(count, 3, generator=g, dtype=torch.float64)
    c *= (
        (n / 4 + 1)
        * torch.rand(count, 1, generator=g, dtype=torch.float64) ** (1 / 3)
        / c.norm(dim=1, keepdim=True)
    )
    amp = 0.5 + torch.rand(count, generator=g, dtype=torch.float64)
    phi = torch.arange(c_sym, dtype=torch.float64) * 2 * torch.pi / c_sym
    cos, sin = torch.cos(phi)[:, None], torch.sin(phi)[:, None]
    c = torch.stack(
        [cos * c[:, 0] - sin * c[:, 1], sin * c[:, 0] + cos * c[:, 1], c[:, 2].expand(c_sym, -1)],
        dim=-1,
    ).reshape(-1, 3)
    amp = amp.repeat(c_sym)
    x = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, xx = torch.meshgrid(x, x, x, indexing="ij")
    d2 = (
        (xx[..., None] - c[:, 0]) ** 2
        + (y[..., None] - c[:, 1]) ** 2
        + (z[..., None] - c[:, 2]) ** 2
    )
    return (amp * torch.exp(-d2 / (2 * sigma**2))).sum(-1).float()


def _radius_2d(n: int) -> torch.Tensor:
    k, kx = torch.fft.fftfreq(n) * n, torch.fft.rfftfreq(n) * n
    return torch.sqrt(k[:, None] ** 2 + kx[None, :] ** 2)


@pytest.mark.parametrize("angles", [(0, 0, 0), (0, 90, 0), (90, 0, 0), (90, 90, 0), (0, 90, 90)])
def test_grid_rotations_give_exact_projections(angles, device):
    """At 90-degree rotations (padding 1) every sample is on the grid, so the slice must equal
    the FFT of the real-space projection sum_z V(A^T r) exactly; a wrong rotation direction,
    Friedel handling or frequency layout would fail."""
    n = 16
    v = torch.zeros(n, n, n)
    v[1:, 1:, 1:] = torch.randn(n - 1, n - 1, n - 1, generator=torch.Generator().manual_seed(0))
    a = euler_to_matrix(*angles).float()
    offsets = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1).flip(-1)
    src = (torch.round((offsets - n // 2).float() @ a).long() + n // 2) % n  # A^T r, xyz
    image = v[src[..., 2], src[..., 1], src[..., 0]].sum(0)
    expected = rfft_centered(image, 2)
    got = extract_slices(rfft_centered(v, 3).to(device), a[None].to(device))[0].cpu()
    inside = _radius_2d(n) <= n / 2
    torch.testing.assert_close(got[inside], expected[inside], atol=1e-4, rtol=1e-5)
    assert torch.all(got[~inside] == 0)  # beyond max_radius: zero


def _real_space_projection(volume: np.ndarray, a: np.ndarray) -> torch.Tensor:
    """Rotate by A (trilinear, on a 2x finer grid) and sum along z; Fourier-crop to n."""
    n = volume.shape[0]
    fine = (np.arange(2 * n) - n) / 2  # fine grid in original voxels, centre at index n
    z, y, x = np.meshgrid(fine, fine, fine, indexing="ij")
    r = np.stack([x, y, z], axis=-1)  # xyz
    src = r @ a + n // 2  # A^T r, back to indices
    rotated = map_coordinates(volume, [src[..., 2], src[..., 1], src[..., 0]], order=1)
    image = torch.from_numpy(rotated.sum(0) / 2)  # dz = 1/2
    f = rfft_centered(image, 2)  # (2n, n + 1), centre 2n//2 = n
    rows = torch.cat([torch.arange(n // 2), torch.arange(2 * n - n // 2, 2 * n)])
    return f[rows][:, : n // 2 + 1] / 4  # Fourier crop to n, mean-preserving


def test_slices_match_real_space_projections(device):
    """Per-shell correlation >= 0.99 up to 0.8 Nyquist between extract_slices (padding 2) and
    projections of the map rotated in real space: a wrong rotation (A vs A^T), centre or
    interpolation would decorrelate the high shells. Without the sinc^2 pre-correction the
    zero frequency (on the grid, not interpolated) is the exact sum of the map."""
    n = 32
    volume = blob_map(n, seed=1)
    mats = random_matrices(4, seed=2)
    slices = extract_slices(projector_rfft(volume.to(device), 2.0), mats.to(device), padding=2.0)
    last = int(0.8 * n / 2)
    plain = extract_slices(
        projector_rfft(volume, 2.0, gridding_correction=False), mats, padding=2.0
    )
    for s, p, a in zip(slices.cpu(), plain, mats, strict=True):
        expected = _real_space_projection(volume.double().numpy(), a.double().numpy())
        corr = fsc(s.to(torch.complex128), expected, (n, n))
        assert corr[1 : last + 1].min() > 0.99, corr
        torch.testing.assert_close(p[0, 0].real.double(), expected[0, 0].real, rtol=1e-2, atol=0)
        torch.testing.assert_close(p[0, 0].real, volume.sum(), rtol=1e-5, atol=0)


def test_matches_torch_fourier_slice_with_transposed_matrix():
    """torch-fourier-slice samples at M k: with M = A^T it must give our slices (same grid,
    padding 1) to float precision inside n/2 - 1 (the edge is handled differently), and
    M = A must not (this verifies the conventions doc's unverified mapping)."""
    from torch_fourier_slice import extract_central_slices_rfft_3d

    n = 32
    g = torch.Generator().manual_seed(3)
    f = rfft_centered(torch.randn(n, n, n, generator=g), 3)
    a = random_matrices(6, seed=4)
    ours = extract_slices(f, a)
    inside = _radius_2d(n) <= n / 2 - 1

    def theirs(m: torch.Tensor) -> torch.Tensor:
        out = extract_central_slices_rfft_3d(torch.fft.fftshift(f, dim=(-3, -2)), m)
        return torch.fft.ifftshift(out, dim=-2)

    scale = ours[:, inside].abs().max()
    assert (ours - theirs(a.transpose(-1, -2)))[:, inside].abs().max() < 1e-5 * scale
    assert (ours - theirs(a))[:, inside].abs().max() > 0.1 * scale


@pytest.mark.parametrize("stage_ratio", [0, 10**12], ids=["staged", "direct"])
@pytest.mark.parametrize("max_radius", [None, 5.5, 12.0])
def test_insertion_is_adjoint_of_extraction(max_radius, stage_ratio, device, monkeypatch):
    """Re<extract(V), S> == Re<V, insert(S)>_F (x = 0 plane weighted 1/2) for a Hermitian V
    and arbitrary S, 2D and 3D, to float64 precision, on the staging grid and directly in the
    rfft layout: any mismatch in neighbours, weights, Friedel flips, the x = 0 mirror or the
    fold between the two paths would break it."""
    monkeypatch.setattr(slices_module, "STAGE_RATIO", stage_ratio)
    n, size = 16, 32
    g = torch.Generator().manual_seed(5)
    v = rfft_centered(torch.randn(size, size, size, generator=g, dtype=torch.float64), 3).to(device)
    a = random_matrices(7, seed=6, dtype=torch.float64).to(device)
    plane_weight = torch.ones(v.shape, dtype=torch.float64, device=device)
    plane_weight[..., 0] = 0.5
    for ndim in (2, 3):
        shape = (7, *(n,) * (ndim - 1), n // 2 + 1)
        s = torch.randn(shape, generator=g, dtype=torch.complex128).to(device)
        data = torch.zeros_like(v)
        weight = torch.zeros(v.shape, dtype=torch.float64, device=device)
        ones = torch.ones(shape, dtype=torch.float64, device=device)
        if ndim == 2:
            e = extract_slices(v, a, padding=2.0, max_radius=max_radius)
            insert_slices(data, weight, s, ones, a, padding=2.0, max_radius=max_radius)
        else:
            e = extract_volumes(v, a, padding=2.0, max_radius=max_radius)
            insert_volumes(data, weight, s, ones, a, max_radius=max_radius)
        lhs = (e * s.conj()).real.sum()
        rhs = (v * data.conj() * plane_weight).real.sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("stage_ratio", [0, 10**12], ids=["staged", "direct"])
def test_insertion_keeps_the_x0_plane_hermitian(stage_ratio, device, monkeypatch):
    """After insertion, voxel (0, -y, -z) holds the conjugate of (0, y, z) in data and the same
    value in weight (relion5-conventions 5.4); without the mirror the x = 0 plane would be
    half-filled and the reconstruction would lose energy there."""
    monkeypatch.setattr(slices_module, "STAGE_RATIO", stage_ratio)
    n, size = 16, 32
    a = random_matrices(20, seed=7).to(device)
    s = rfft_centered(torch.randn(20, n, n, generator=torch.Generator().manual_seed(8)), 2)
    data = torch.zeros(size, size, size // 2 + 1, dtype=torch.complex64, device=device)
    weight = torch.zeros(data.shape, device=device)
    insert_slices(data, weight, s.to(device), s.abs().to(device), a, padding=2.0)
    assert weight[..., 0].abs().sum() > 0
    for acc, conj in ((data, True), (weight, False)):
        plane = acc[..., 0]
        mirror = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
        torch.testing.assert_close(plane, mirror.conj() if conj else mirror)


def test_max_radius_limits_and_keeps_components():
    """Components within max_radius equal the unrestricted slice and those beyond are zero;
    a radius test on the wrong grid (padded vs image pixels) would shift the boundary."""
    n = 32
    f = projector_rfft(blob_map(n, seed=9), 2.0)
    a = random_matrices(3, seed=10)
    full = extract_slices(f, a, padding=2.0)
    part = extract_slices(f, a, padding=2.0, max_radius=7.0)
    inside = _radius_2d(n) <= 7.0
    torch.testing.assert_close(part[:, inside], full[:, inside])
    assert torch.all(part[:, ~inside] == 0)


@pytest.mark.parametrize("padding", [1.0, 2.0])
def test_staged_and_direct_paths_agree(padding, device, monkeypatch):
    """The staging grid (many points per voxel) and the direct rfft lookups (few) are two
    addressings of the same trilinear weights: equal slices and sums to float64 rounding,
    including points at the largest radius, where the staging grid's halo and fold matter."""
    n = 16
    size = round(n * padding)
    g = torch.Generator().manual_seed(11)
    v = rfft_centered(torch.randn(size, size, size, generator=g, dtype=torch.float64), 3).to(device)
    a = random_matrices(9, seed=12, dtype=torch.float64).to(device)
    s = torch.randn(9, n, n // 2 + 1, generator=g, dtype=torch.complex128).to(device)
    w = torch.rand(9, n, n // 2 + 1, generator=g, dtype=torch.float64).to(device)
    results = []
    for ratio in (0, 10**12):
        monkeypatch.setattr(slices_module, "STAGE_RATIO", ratio)
        data = torch.zeros_like(v)
        weight = torch.zeros(v.shape, dtype=torch.float64, device=device)
        insert_slices(data, weight, s, w, a, padding=padding)
        results.append((extract_slices(v, a, padding=padding), data, weight))
    for staged, direct in zip(*results, strict=True):
        torch.testing.assert_close(staged, direct, rtol=1e-12, atol=1e-10)
    assert results[0][2].sum() > 0
