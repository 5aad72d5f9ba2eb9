"""E-step of the ML engine: local alignment on noisy synthetic data, priors and significance."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from subtomo.fourier import rfft_centered
from subtomo.fourier.slices import extract_slices
from subtomo.geometry import euler_to_matrix, rotation_angle_deg
from subtomo.masks import soft_sphere
from subtomo.ml.batch import fourier_points
from subtomo.ml.estep import expectation, score_batch
from subtomo.ml.images import mask_images
from subtomo.ml.projector import Projector, _sinc2, pad_centred
from subtomo.ml.sampling import (
    PoseGrid,
    Sampling,
    angle_prior_log,
    oversample,
    pose_grid,
    translation_grid,
)
from test_ml_synthetic import make_batch, perturb, small_map

BOX = 32


def test_projector_equals_rfft_slice_extraction(device) -> None:
    """The E-step's grid_sample projector returns, for each class, the same trilinear slices
    as the general rfft-layout extract_slices of the gridding-corrected padded map (up to
    float rounding); otherwise its Friedel-complete layout, its centre index or its class
    axis is wrong."""
    g = torch.Generator().manual_seed(0)
    vols = torch.randn(2, BOX, BOX, BOX, generator=g).to(device)
    proj = Projector(vols, 2.0)
    rot = euler_to_matrix(*(torch.rand(3, 12, generator=g, dtype=torch.float64) * 360)).float()
    pts = fourier_points(BOX, BOX // 2, device)
    for c in range(2):
        want = pts.gather(
            extract_slices(
                rfft_centered(pad_centred(vols[c], 2 * BOX) / _sinc2(2 * BOX, device), 3),
                rot.to(device),
                padding=2.0,
                max_radius=BOX // 2 + 1,
            )
        )
        got = proj.slices(c, rot.to(device), pts)
        assert (got - want).abs().max() < 1e-5 * want.abs().max()


@pytest.mark.parametrize("padding", [1.0, 2.0])
def test_nearest_projector_reads_the_nearest_voxel(device, padding) -> None:
    """The coarse pass's nearest-neighbour slices are the stored voxels at the rounded
    ``N/n M^T k`` (zyx, zero frequency at ``N//2 + 1``), also at Nyquist without padding:
    otherwise its coordinates, its centre or its axis order differ from the trilinear path's
    (or a lookup falls off the stored grid)."""
    g = torch.Generator().manual_seed(1)
    vols = torch.randn(2, BOX, BOX, BOX, generator=g).to(device)
    proj = Projector(vols, padding)
    rot = euler_to_matrix(*(torch.rand(3, 6, generator=g, dtype=torch.float64) * 360)).float()
    pts = fourier_points(BOX, BOX // 2, device)
    k = pts.freq.float() * BOX  # (K, 2) xy
    q = proj.size / BOX * (rot[:, :2, :].transpose(-1, -2) @ k.T).transpose(-1, -2)  # (S, K, xyz)
    x, y, z = (torch.round(q) + proj.size // 2 + 1).long().unbind(-1)
    for c in range(2):
        got = proj.sample_planes(c, rot[None].to(device), pts, "nearest")[0]  # (2, S, K)
        want = proj.volumes[c][:, z, y, x]
        assert torch.equal(got, want)
        trilinear = proj.sample_planes(c, rot[None].to(device), pts)[0]
        assert not torch.equal(got, trilinear)


def test_translation_grid_is_a_ball_of_lattice_points() -> None:
    """Offsets on the step lattice within the range, zero first; a wrong grid would miss
    true offsets or search outside --offset_range."""
    g = translation_grid(3.0, 1.0)
    assert torch.equal(g[0], torch.zeros(3, dtype=torch.float64))
    assert g.shape[0] == 123  # lattice points of Z^3 with |p| <= 3
    assert (g.norm(dim=1) <= 3 + 1e-9).all()
    assert translation_grid(0.0, 1.0).shape == (1, 3)


def test_tilt_psi_prior_is_gaussian_in_the_angle_difference() -> None:
    """log prior = -dtilt^2/(2 s_t^2) - dpsi^2/(2 s_p^2) with psi wrapped; otherwise
    --sigma_tilt/--sigma_psi pull particles towards the wrong angles."""
    rot = euler_to_matrix(
        torch.tensor([[10.0, 40.0]]), torch.tensor([[95.0, 80.0]]), torch.tensor([[175.0, -5.0]])
    )
    priors = torch.tensor([[90.0, -175.0]], dtype=torch.float64)
    got = angle_prior_log(rot, priors, 5.0, 10.0)
    want = torch.tensor([[-(5.0**2) / 50 - 10.0**2 / 200, -(10.0**2) / 50 - 170.0**2 / 200]])
    assert torch.allclose(got, want.double(), atol=1e-6)


@pytest.fixture(scope="module")
def aligned_run(shared_data):
    """Local searches on noisy data whose poses were perturbed by 8 degrees and ~2 pixels."""
    vol, px = small_map("ribosome70S_4v4r_5A.mrc.gz", BOX)
    n = 12
    batch, truth = make_batch([vol], px, n, noise_std=8.0, seed=2)
    g = torch.Generator().manual_seed(9)
    start = perturb(truth.rotations, 8.0, g)
    shift = torch.randn(n, 3, generator=g, dtype=torch.float64)
    shift = 2 * px * shift / shift.norm(dim=1, keepdim=True)
    batch = dataclasses.replace(batch, rotations=start, offsets=truth.offsets + shift)
    sampling = Sampling(
        healpix_order=4, offset_range_angst=3 * px, offset_step_angst=px, local_sigma_deg=4.0
    )
    poses = pose_grid(sampling, batch, 2 * px)
    pts = fourier_points(BOX, BOX // 2, None)
    s2 = torch.full((n, BOX // 2 + 1), truth.noise_sigma2)
    mask = soft_sphere((BOX, BOX), 330 / 2 / px, 5.0)
    masked = mask_images(
        batch.data, batch.ctf2, s2, mask, zero_mask=False, generator=torch.Generator()
    )
    scores = score_batch(
        Projector(vol[None], 2.0),
        pts.gather(masked),
        pts.gather(batch.ctf2),
        1 / s2[:, pts.shell].float(),
        batch.tilt_rotations,
        poses,
        pts,
        px,
    )
    return batch, truth, poses, expectation(scores, torch.zeros(1), poses), px


def test_local_alignment_recovers_perturbed_poses(aligned_run) -> None:
    """Best poses of a local search lie much closer to the truth than the 8 degree / 2 pixel
    perturbation: the scores, the local grid and the offset projection work together."""
    batch, truth, poses, res, px = aligned_run
    ar = torch.arange(batch.size)
    best_rot = poses.rotations[ar, res.best[:, 1]]
    err = rotation_angle_deg(best_rot, truth.rotations)
    assert err.median() < 3.0, err
    off_err = (poses.offsets[ar, res.best[:, 2]] - truth.offsets).norm(dim=1) / px
    assert off_err.median() < 0.8, off_err


def test_significant_poses_hold_the_probability(aligned_run) -> None:
    """Kept poses carry >= 0.999 of the posterior and include the best pose; Pmax is the
    largest weight; otherwise the M-step drops probability or keeps noise."""
    _, _, _, res, _ = aligned_run
    w = res.weights.flatten(1)
    assert torch.allclose(w.sum(1), torch.ones_like(w[:, 0]))
    assert torch.equal((w > 0).sum(1), res.n_significant)
    b = torch.arange(w.shape[0])
    assert (w[b, w.argmax(1)] >= res.pmax - 1e-12).all()
    assert (res.pmax > 0).all() and (res.pmax <= 1).all()


def test_oversampling_refines_around_significant_poses(shared_data) -> None:
    """The second pass (children at half the angular and offset steps around the significant
    coarse poses) lands closer to the true poses than the coarse 7.5 degree / 1 px grid;
    otherwise the children are built around the wrong poses or scored with wrong priors."""
    vol, px = small_map("ribosome70S_4v4r_5A.mrc.gz", BOX)
    n = 12
    batch, truth = make_batch([vol], px, n, noise_std=8.0, seed=2)
    g = torch.Generator().manual_seed(9)
    shift = torch.randn(n, 3, generator=g, dtype=torch.float64)
    shift = 2 * px * shift / shift.norm(dim=1, keepdim=True)
    batch = dataclasses.replace(
        batch, rotations=perturb(truth.rotations, 8.0, g), offsets=truth.offsets + shift
    )
    sampling = Sampling(
        healpix_order=3, offset_range_angst=3 * px, offset_step_angst=px, local_sigma_deg=5.0
    )
    pts = fourier_points(BOX, BOX // 2, None)
    inv_s2 = torch.full((n, pts.flat.numel()), 1 / truth.noise_sigma2)
    projector = Projector(vol[None], 2.0)

    def best_errors(poses):
        y = pts.gather(batch.data)
        scores = score_batch(
            projector, y, pts.gather(batch.ctf2), inv_s2, batch.tilt_rotations, poses, pts, px
        )
        res = expectation(scores, torch.zeros(1), poses)
        ar = torch.arange(n)
        rot = poses.rotations.expand(n, -1, -1, -1)[ar, res.best[:, 1]]
        off = poses.offsets[ar, poses.offset_index(res.best[:, 1], res.best[:, 2])]
        err = rotation_angle_deg(rot, truth.rotations)
        return res, err.median(), ((off - truth.offsets).norm(dim=1) / px).median()

    coarse = pose_grid(sampling, batch, 2 * px)
    res, rot0, off0 = best_errors(coarse)
    fine = oversample(sampling, batch, coarse, res.weights, 2 * px)
    _, rot1, off1 = best_errors(fine)
    assert fine.n_rot == 8 * int((res.weights.sum((1, 3)) > 0).sum(1).max())
    assert rot1 < rot0 and off1 <= off0, (rot0, rot1, off0, off1)


def test_nearest_coarse_pass_leads_the_fine_pass_to_the_same_poses(shared_data) -> None:
    """A coarse pass sampled at the nearest voxels (the engine's default with oversampling)
    sends the trilinear fine pass to the poses a trilinear coarse pass finds: the same best
    fine pose for nearly every particle, and pose errors as small; otherwise the nearest
    lookups are too coarse to rank the coarse poses."""
    vol, px = small_map("ribosome70S_4v4r_5A.mrc.gz", BOX)
    n = 12
    batch, truth = make_batch([vol], px, n, noise_std=8.0, seed=2)
    g = torch.Generator().manual_seed(9)
    batch = dataclasses.replace(batch, rotations=perturb(truth.rotations, 6.0, g))
    sampling = Sampling(
        healpix_order=3, offset_range_angst=2 * px, offset_step_angst=px, local_sigma_deg=5.0
    )
    pts = fourier_points(BOX, BOX // 2, None)
    inv_s2 = torch.full((n, pts.flat.numel()), 1 / truth.noise_sigma2)
    projector = Projector(vol[None], 2.0)
    y, c2 = pts.gather(batch.data), pts.gather(batch.ctf2)

    def passes(interpolation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        coarse = pose_grid(sampling, batch, 2 * px)
        first = score_batch(projector, y, c2, inv_s2, batch.tilt_rotations, coarse, pts, px,
                            interpolation=interpolation)  # fmt: skip
        fine = oversample(
            sampling, batch, coarse, expectation(first, torch.zeros(1), coarse).weights, 2 * px
        )
        scores = score_batch(projector, y, c2, inv_s2, batch.tilt_rotations, fine, pts, px)
        best = expectation(scores, torch.zeros(1), fine).best
        rot = fine.rotations.expand(n, -1, -1, -1)[torch.arange(n), best[:, 1]]
        return first, rot, rotation_angle_deg(rot, truth.rotations)

    first_t, rot_t, err_t = passes("bilinear")
    first_n, rot_n, err_n = passes("nearest")
    assert not torch.equal(first_n, first_t)  # the coarse pass did read other values
    same = rotation_angle_deg(rot_n, rot_t) < 1e-3
    assert int(same.sum()) >= n - 1, rotation_angle_deg(rot_n, rot_t)
    assert err_n.median() <= err_t.median() + 0.5, (err_n, err_t)


def test_oversampling_keeps_the_children_of_each_significant_pose(shared_data) -> None:
    """Per particle, each significant coarse (class, rotation, offset) becomes exactly its
    8 rotation children x 8 offset children (RELION's adaptive oversampling), with the local
    and offset priors evaluated at the children; scores exist only for those pairs and equal
    the scores of the same poses on a dense grid. Otherwise the second pass scores poses that
    RELION does not (or misses some), or mixes up blocks, classes or priors."""
    vol, px = small_map("ribosome70S_4v4r_5A.mrc.gz", BOX)
    batch, truth = make_batch([vol, 0.7 * vol], px, 2, noise_std=2.0)
    g = torch.Generator().manual_seed(1)
    coarse_rot = torch.stack([perturb(truth.rotations, a, g) for a in (0.0, 7.5, 7.5)], 1)
    deltas = torch.tensor([[0.0, 0, 0], [px, 0, 0], [0, -px, 0], [0, 0, px]]).double()
    coarse = PoseGrid(
        rotations=coarse_rot,
        log_prior_rot=torch.zeros(2, 3, dtype=torch.float64),
        offsets=batch.offsets[:, None] + deltas,
        deltas=deltas.expand(2, -1, -1),
        log_prior_offset=torch.zeros(2, 4, dtype=torch.float64),
    )
    weights = torch.zeros(2, 2, 3, 4, dtype=torch.float64)
    significant = {(0, 0, 1): (0, 2), (0, 1, 0): (3,), (1, 0, 2): (1,)}  # (p, c, j): offsets
    for (p, c, j), ts in significant.items():
        weights[p, c, j, list(ts)] = 1.0 / len(significant)
    sampling = Sampling(
        healpix_order=3, offset_range_angst=2 * px, offset_step_angst=px, local_sigma_deg=3.0
    )
    sigma_off = 2 * px
    fine = oversample(sampling, batch, coarse, weights, sigma_off)
    assert fine.block_class.tolist() == [[0, 1], [0, -1]]
    h = sampling.step_deg / 4
    corners = {tuple(v) for v in itertools.product((-1, 1), repeat=3)}
    blocks = {(0, 0): (0, 0, 1), (0, 1): (0, 1, 0), (1, 0): (1, 0, 2)}  # (p, slot) -> (p, c, j)
    for (p, s), key in blocks.items():
        rot = fine.rotations[p, 8 * s : 8 * s + 8]
        rotvec = Rotation.from_matrix((rot @ coarse_rot[p, key[2]].T).numpy()).as_rotvec()
        assert {tuple(np.round(v / np.radians(h)).astype(int)) for v in rotvec} == corners
        assert np.allclose(np.abs(rotvec), np.radians(h))
        angle = rotation_angle_deg(rot, batch.rotations[p])
        want_rot = -(angle**2) / (2 * 3.0**2)
        assert torch.allclose(fine.log_prior_rot[p, 8 * s : 8 * s + 8], want_rot)
        tb = fine.n_trans
        prior = fine.log_prior_offset[p, tb * s : tb * s + tb]
        d = fine.deltas[p, tb * s : tb * s + tb][torch.isfinite(prior)]
        want = {
            tuple((deltas[t] + px / 4 * torch.tensor(cn).double()).tolist())
            for t in significant[key]
            for cn in corners
        }
        assert {tuple(x) for x in d.tolist()} == want
        assert torch.allclose(prior[torch.isfinite(prior)], -(d**2).sum(1) / (2 * sigma_off**2))
    assert torch.isinf(fine.log_prior_rot[1, 8:]).all()
    # scores: only the block pairs, equal to the dense scoring of each block's poses
    assert fine.deltas.shape[1] == 2 * tb and tb == 16  # offsets of 2 blocks, <= 2 parents
    pts = fourier_points(BOX, 8, None)
    projector = Projector(torch.stack([vol, 0.7 * vol]).float(), 2.0)
    y, ctf2 = pts.gather(batch.data), pts.gather(batch.ctf2)
    inv_s2 = torch.full((2, pts.flat.numel()), 1 / truth.noise_sigma2)
    args = (y, ctf2, inv_s2, batch.tilt_rotations)
    scores = score_batch(projector, *args, fine, pts, px, max_elements=1)
    assert torch.isfinite(scores).sum() == 3 * 8 * tb
    for (p, s), (_, c, _) in blocks.items():
        dense = dataclasses.replace(
            fine,
            rotations=fine.rotations[:, 8 * s : 8 * s + 8],
            offsets=fine.offsets[:, tb * s : tb * s + tb],
            deltas=fine.deltas[:, tb * s : tb * s + tb],
            block_class=None,
        )
        want = score_batch(projector, *args, dense, pts, px)[p, c]
        got = scores[p, c, 8 * s : 8 * s + 8]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    res = expectation(scores, torch.zeros(2), fine)
    assert torch.allclose(res.weights.sum((1, 2, 3)), torch.ones(2, dtype=torch.float64))
    assert (res.weights[torch.isinf(scores)] == 0).all()
