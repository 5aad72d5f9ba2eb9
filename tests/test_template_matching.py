"""Template matching (:mod:`subtomo.picking`) against known rotations and positions: the
rotation convention (a rotated copy gives that rotation, not its inverse, and its mirror
scores lower), the tomogram's transfer function (the wedge follows the projection matrices),
the false-alarm cut-off against sampled noise, and the exclusion peaks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import affine_transform
from scipy.spatial.transform import Rotation
from scipy.stats import norm

from subtomo.geometry import euler_to_matrix, projection_matrices
from subtomo.masks import soft_sphere
from subtomo.picking import (
    false_alarm_cutoff,
    find_peaks,
    match_template,
    noise_tail,
    rotate_volumes,
    tail_cutoff,
    tilt_weights,
)
from subtomo.tilt.tomogram import CtfParams

N = 24


def chiral_template(n: int = N) -> torch.Tensor:
    """``(n, n, n)``: a right-handed helix of Gaussian blobs with an off-axis blob at one end
    (no rotation maps it onto its mirror image)."""
    axis = torch.arange(n, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    volume = torch.zeros(n, n, n)
    blobs = [(4 * math.cos(2 * math.pi * t), 7 * t, 4 * math.sin(2 * math.pi * t))
             for t in np.linspace(-1, 1, 9)] + [(5.0, -8.0, 3.0)]  # fmt: skip
    for cx, cy, cz in blobs:
        volume += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 1.3**2))
    return volume


def scipy_rotate(volume: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``out(x) = volume(Aᵀx)`` about ``N//2`` by scipy (zyx indices: the axes reversed)."""
    n = volume.shape[-1]
    flip = np.eye(3)[::-1]
    m = flip @ a.numpy().T @ flip
    c = np.full(3, n // 2, dtype=np.float64)
    out = affine_transform(volume.numpy().astype(np.float64), m, offset=c - m @ c, order=1)
    return torch.from_numpy(out).float()


def place(tomogram: torch.Tensor, box: torch.Tensor, zyx: tuple[int, int, int]) -> None:
    """Add ``box`` with its centre ``N//2`` at voxel ``zyx``."""
    n = box.shape[-1]
    z, y, x = (p - n // 2 for p in zyx)
    tomogram[z : z + n, y : y + n, x : x + n] += box


def random_rotations(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(Rotation.random(n, random_state=seed).as_matrix())


def test_rotation_is_relions_reference_to_tomogram_matrix() -> None:
    """``rotate_volumes`` turns by A as scipy's independent resampling does (a transposed
    matrix or swapped axes would correlate far worse than 0.99)."""
    template = chiral_template()
    a = euler_to_matrix(torch.tensor(30.0), torch.tensor(50.0), torch.tensor(-70.0))
    ours = rotate_volumes(template, a[None])[0]
    theirs = scipy_rotate(template, a)
    wrong = scipy_rotate(template, a.T)
    corr = float(torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1])
    corr_wrong = float(torch.corrcoef(torch.stack([ours.flatten(), wrong.flatten()]))[0, 1])
    assert corr > 0.99 and corr_wrong < 0.6


def test_match_returns_the_rotation_not_its_inverse_and_the_mirror_scores_lower() -> None:
    template = chiral_template()
    truth = random_rotations(2, seed=3)
    decoys = random_rotations(60, seed=4)
    grid = torch.cat([truth, truth.transpose(1, 2), decoys])  # true, inverse, others
    tomogram = torch.zeros(48, 64, 80)
    centres = [(16, 20, 20), (30, 40, 56), (24, 44, 24)]
    place(tomogram, scipy_rotate(template, truth[0]), centres[0])
    place(tomogram, scipy_rotate(template, truth[1]), centres[1])
    mirror = scipy_rotate(template, truth[0]).flip(-1)  # x mirrored: the other hand
    place(tomogram, mirror, centres[2])
    tomogram += 0.05 * torch.randn(tomogram.shape, generator=torch.Generator().manual_seed(0))
    mask = soft_sphere((N,) * 3, 8.0, 3.0)
    result = match_template(tomogram, template, mask, grid, batch=8)
    for k, centre in enumerate(centres[:2]):
        assert int(result.orientation[centre]) == k, "the inverse or another rotation won"
        assert float(result.scores[centre]) > 0.9
    assert float(result.scores[centres[2]]) < float(result.scores[centres[0]]) - 0.2
    masked = match_template(tomogram, template, mask, grid, spherical_mask=False, batch=8)
    # a sphere turned is the same sphere (up to interpolation)
    assert torch.allclose(masked.scores, result.scores, atol=0.01)
    picks, _ = find_peaks(result.scores, radius=8, cutoff=0.5)
    assert sorted(map(tuple, picks.tolist()[:2])) == sorted(centres[:2])


def single_axis_rotations(z_rot: float) -> torch.Tensor:
    t = torch.arange(-60.0, 61.0, 3.0, dtype=torch.float64)
    zero = torch.zeros_like(t)
    p = projection_matrices(zero, t, zero + z_rot, zero, zero, 10.0, (64, 64, 64), (64, 64))
    return p[:, :3, :3]


@pytest.mark.parametrize("z_rot", [0.0, 5.0, 90.0])
def test_wedge_follows_the_projection_matrices(z_rot: float) -> None:
    """Weight 1 on measured planes, 0 in the missing wedge around the beam (z) beyond ±60°.
    ``P = R_z R_y``: the specimen tilts about tomogram y whatever the image rotation zrot, so
    the wedge stays about y (a wedge built from the nominal axis angle would turn)."""
    box = 32
    w = tilt_weights(single_axis_rotations(z_rot), box, 10.0)
    axis_dir = torch.tensor([0.0, 1.0])

    def at(kx: float, ky: float, kz: float) -> float:
        i = [round(v) % box for v in (kz, ky)] + [round(kx)]
        if kx < 0:  # Friedel mate
            i = [(-round(kz)) % box, (-round(ky)) % box, -round(kx)]
        return float(w[i[0], i[1], i[2]])

    ax, ay = (8 * float(c) for c in axis_dir)
    px, py = -ay, ax  # in the xy plane, orthogonal to the tilt axis
    assert at(0, 0, 8) == pytest.approx(0.0, abs=1e-6)  # beam direction: missing
    assert at(ax, ay, 0) == pytest.approx(1.0, abs=1e-3)  # along the tilt axis: measured
    assert at(px, py, 0) == pytest.approx(1.0, abs=0.05)  # untilted plane: measured
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert at(px * c, py * c, 8 * s) > 0.9  # 30° from the plane: inside ±60°
    c, s = math.cos(math.radians(75)), math.sin(math.radians(75))
    assert at(px * c, py * c, 8 * s) < 0.05  # 75° from the plane: the wedge


def test_ctf_weight_is_the_tilts_ctf_and_flips_to_its_modulus() -> None:
    rot = single_axis_rotations(0.0)
    t = len(rot)
    ctf = dict(
        defocus_u=torch.full((t,), 30000.0), defocus_v=torch.full((t,), 30000.0),
        defocus_angle=torch.zeros(t), phase_shift=torch.zeros(t),
        voltage=300.0, cs=2.7, amplitude_contrast=0.07, hand=1, slope=1.0, pixel_size=10.0,
    )  # fmt: skip
    raw = tilt_weights(rot, 32, 10.0, ctf=CtfParams(**ctf), phase_flipped=False)
    flipped = tilt_weights(rot, 32, 10.0, ctf=CtfParams(**ctf), phase_flipped=True)
    line = raw[0, 0, :]  # along x: the untilted tilt (and its neighbours) only
    assert (line < -0.5).any() and (line > 0.5).any()  # CTF oscillates
    assert torch.allclose(flipped[0, 0, :], line.abs(), atol=0.05)


def test_false_alarm_cutoff_counts_sampled_noise() -> None:
    """Noise above the cut-off about ``n_false`` times in V x M Gaussian tests, and the tail
    model gives the same count for the best of M."""
    g = torch.Generator().manual_seed(1)
    v, m, sigma = 200_000, 10, 0.03
    noise = sigma * torch.randn(m, v, generator=g, dtype=torch.float64)
    cut = false_alarm_cutoff(sigma, v, m, n_false=20.0)
    assert 20 - 4 * math.sqrt(20) < int((noise > cut).sum()) < 20 + 4 * math.sqrt(20)
    best = noise.max(0).values.numpy()
    level = false_alarm_cutoff(sigma, v, m, n_false=200.0)
    expected = float(noise_tail(np.array([level]), sigma, v, m)[0])
    assert expected == pytest.approx(200.0, rel=0.02)
    assert abs(int((best > level).sum()) - expected) < 5 * math.sqrt(expected)


def test_tail_cutoff_fits_the_background_and_ignores_the_particles() -> None:
    """Gumbel background peaks (the maxima of many noise scores): the cut-off lands where one
    background peak is expected above it (μ + β ln N), with or without a tenth as many
    particles far above; a Gaussian fit to the bulk would cut far too low."""
    rng = np.random.default_rng(0)
    mu, beta, n = 0.1, 0.015, 3000
    background = rng.gumbel(mu, beta, n)
    expected = mu + beta * math.log(n)
    alone = tail_cutoff(background).cutoff
    with_particles = tail_cutoff(np.concatenate([background, rng.normal(0.4, 0.03, 300)])).cutoff
    assert abs(alone - expected) < 1.5 * beta
    assert abs(with_particles - alone) < 0.5 * beta
    assert (background > alone).sum() <= 5
    q1, median, q3 = np.percentile(background, [25, 50, 75])
    gaussian = median + (q3 - q1) / 1.349 * norm.isf(1.0 / n)
    assert gaussian < expected - 2 * beta


def test_peaks_keep_the_exclusion_radius_the_mask_and_the_cap() -> None:
    scores = torch.zeros(20, 40, 40)
    for (z, y, x), s in [((10, 10, 10), 0.9), ((10, 10, 14), 0.8), ((10, 30, 30), 0.7),
                         ((10, 20, 30), 0.6)]:  # fmt: skip
        scores[z, y, x] = s
    picks, values = find_peaks(scores, radius=6, cutoff=0.1)
    assert picks.tolist() == [[10, 10, 10], [10, 30, 30], [10, 20, 30]]
    assert values.tolist() == pytest.approx([0.9, 0.7, 0.6])
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[:, 25:, 25:] = False
    picks, _ = find_peaks(scores, radius=6, cutoff=0.1, mask=mask, max_peaks=1)
    assert picks.tolist() == [[10, 10, 10]]
    picks, _ = find_peaks(scores, radius=6, cutoff=0.65, border=0)
    assert len(picks) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    template = chiral_template()
    grid = random_rotations(12, seed=5)
    tomogram = torch.randn(32, 40, 48, generator=torch.Generator().manual_seed(2))
    place(tomogram, scipy_rotate(template, grid[3]), (16, 20, 24))
    mask = soft_sphere((N,) * 3, 8.0, 3.0)
    cpu = match_template(tomogram, template, mask, grid, batch=5)
    gpu = match_template(tomogram.cuda(), template.cuda(), mask.cuda(), grid, batch=5)
    assert torch.allclose(gpu.scores.cpu(), cpu.scores, atol=1e-4)
    assert int(gpu.orientation[16, 20, 24]) == 3
