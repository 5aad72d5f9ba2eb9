"""Pose scores of the ML engine against ground truth and a direct evaluation of the formula."""

from __future__ import annotations

import math

import pytest
import torch

from subtomo.ml.batch import fourier_points
from subtomo.ml.estep import expectation, score_batch, slice_matrices
from subtomo.ml.likelihood import _lattice_steps, centred_data, pose_scores, shifted_data
from subtomo.ml.projector import Projector
from subtomo.ml.sampling import PoseGrid, translation_grid
from test_ml_synthetic import make_batch, perturb, small_map

BOX = 32


@pytest.fixture(scope="module")
def ribosome(shared_data) -> tuple[torch.Tensor, float]:
    return small_map("ribosome70S_4v4r_5A.mrc.gz", BOX)


def test_noise_free_data_match_the_model(ribosome, device) -> None:
    """Slices at R_f A_sub A_part with the data shifted by -[R_f A_sub o]_xy/px reproduce
    real-space projections; otherwise the rotation order, the offset frame or the shift sign
    of the engine disagree with relion5-conventions §1.3/§2.2."""
    vol, px = ribosome
    batch, truth = make_batch([vol], px, 3, noise_std=0.0, max_offset_angst=40.0)
    batch = batch.to(device)
    pts = fourier_points(BOX, BOX // 2, device)
    proj = Projector(vol[None].to(device), 2.0)
    mats = slice_matrices(batch.tilt_rotations, truth.rotations[:, None].to(device))
    model = pts.gather(batch.ctf2) * proj.slices(0, mats, pts)[:, 0]  # (b, f, K)
    y = pts.gather(batch.data)
    for sign, low, high in ((1.0, 0.95, 1.0), (-1.0, -1.0, 0.3)):
        off = (sign * truth.offsets)[:, None].to(device)
        c = centred_data(y, batch.tilt_rotations, off, pts, px)[:, 0]
        corr = (c.conj() * model).real.sum((1, 2)) / (
            c.abs().square().sum((1, 2)) * model.abs().square().sum((1, 2))
        ).sqrt()
        assert ((corr > low) & (corr < high)).all(), (sign, corr)


def direct_score(y, ctf2, inv_s2, slice_, shift, freq) -> float:
    """Slow loop evaluation of sum_f sum_k [Re(conj(Y e^{2 pi i k.s}) P) - CTF2 |P|^2/2]/sigma2."""
    total = 0.0
    for f in range(y.shape[0]):
        for k in range(y.shape[1]):
            ph = 2 * math.pi * float(freq[k, 0] * shift[f, 0] + freq[k, 1] * shift[f, 1])
            yk = complex(y[f, k]) * complex(math.cos(ph), math.sin(ph))
            pk = complex(slice_[f, k])
            total += float(inv_s2[k]) * (
                (yk.conjugate() * pk).real - 0.5 * float(ctf2[f, k]) * abs(pk) ** 2
            )
    return total


def test_matmul_scores_equal_direct_formula(ribosome) -> None:
    """The batched real matmuls (shared and per-particle slices) equal the likelihood formula
    evaluated term by term; a mismatch means the real/imaginary packing or the CTF^2 term is
    wrong."""
    vol, px = ribosome
    batch, truth = make_batch(
        [vol], px, 2, tilts_deg=(-30.0, 0.0, 30.0), noise_std=3.0, max_offset_angst=20.0
    )
    pts = fourier_points(BOX, 6, None)
    proj = Projector(vol[None], 2.0)
    g = torch.Generator().manual_seed(3)
    rot = torch.stack([perturb(truth.rotations, a, g) for a in (0.0, 5.0, 20.0)], 1)  # (b,3,..)
    offs = truth.offsets[:, None] + torch.tensor([[0.0, 0, 0], [10.0, -5, 3]])[None]  # (b,2,3)
    y = pts.gather(batch.data).to(torch.complex128)
    ctf2 = pts.gather(batch.ctf2).double()
    inv_s2 = torch.rand(2, pts.flat.numel(), generator=g, dtype=torch.float64) + 0.5
    slices = proj.slices(0, slice_matrices(batch.tilt_rotations, rot), pts).to(torch.complex128)
    centred = centred_data(y, batch.tilt_rotations, offs, pts, px)
    packed = torch.stack([slices.real, slices.imag]).transpose(2, 3)  # (2, b, f, J, K)
    got = pose_scores(centred, ctf2, inv_s2, packed)  # (b, T, J)
    shared = pose_scores(centred, ctf2, inv_s2, packed[:, :1])  # particle 0's slices for all
    for i in range(2):
        for t in range(2):
            shift = -(batch.tilt_rotations[i] @ offs[i, t])[:, :2] / px
            for j in range(3):
                want = direct_score(y[i], ctf2[i], inv_s2[i], slices[i, j], shift, pts.freq)
                assert got[i, t, j].item() == pytest.approx(want, rel=1e-4, abs=1e-6)
                want0 = direct_score(y[i], ctf2[i], inv_s2[i], slices[0, j], shift, pts.freq)
                assert shared[i, t, j].item() == pytest.approx(want0, rel=1e-4, abs=1e-6)


def test_true_pose_beats_perturbed_poses(ribosome, device) -> None:
    """At moderate noise the true (rotation, offset) has the highest posterior among poses
    perturbed by 5-15 degrees or 1-2 pixels; otherwise the scores do not measure the fit."""
    vol, px = ribosome
    batch, truth = make_batch([vol], px, 4, noise_std=4.0, max_offset_angst=20.0, seed=5)
    batch = batch.to(device)
    g = torch.Generator().manual_seed(4)
    rot = torch.stack(
        [truth.rotations] + [perturb(truth.rotations, a, g) for a in (5.0, 10.0, 15.0)], 1
    ).to(device)
    deltas = torch.tensor(
        [[0.0, 0, 0], [px, 0, 0], [0, -px, 0], [0, 0, 2 * px], [px, px, 0]],
        dtype=torch.float64,
        device=device,
    )
    poses = PoseGrid(
        rotations=rot,
        log_prior_rot=torch.zeros(4, 4, dtype=torch.float64, device=device),
        offsets=truth.offsets.to(device)[:, None] + deltas[None],
        deltas=deltas[None].expand(4, -1, -1),
        log_prior_offset=torch.zeros(4, 5, dtype=torch.float64, device=device),
    )
    pts = fourier_points(BOX, BOX // 2, device)
    s2 = torch.full((pts.flat.numel(),), truth.noise_sigma2, device=device)
    proj = Projector(vol[None].to(device), 2.0)
    scores = score_batch(
        proj,
        pts.gather(batch.data),
        pts.gather(batch.ctf2),
        (1 / s2).expand(4, -1),
        batch.tilt_rotations,
        poses,
        pts,
        px,
    )
    res = expectation(scores, torch.zeros(1, device=device), poses)
    assert (res.best[:, 1] == 0).all() and (res.best[:, 2] == 0).all(), res.best
    # posterior weights are a normalised distribution over the significant poses
    assert torch.allclose(
        res.weights.sum((1, 2, 3)), torch.ones(4, dtype=torch.float64, device=device)
    )


@pytest.mark.parametrize("shared", [False, True])
def test_chunked_score_batch_equals_pose_scores(ribosome, shared) -> None:
    """score_batch (phases and shifted planes built per chunk of particles, slices per chunk of
    rotations, per-particle or shared slices) equals pose_scores on the fully shifted data
    (itself checked against the direct formula); a mismatch means the chunk bookkeeping, the
    plane layout or the float32 phases are wrong."""
    vol, px = ribosome
    batch, truth = make_batch(
        [vol], px, 3, tilts_deg=(-40.0, -10.0, 20.0, 50.0), noise_std=2.0, max_offset_angst=20.0
    )
    if shared:
        batch.tilt_rotations = batch.tilt_rotations[:1].expand(3, -1, -1, -1).clone()
    pts = fourier_points(BOX, 10, None)
    g = torch.Generator().manual_seed(7)
    rot = torch.stack([perturb(truth.rotations, a, g) for a in (0.0, 3.0, 6.0, 9.0, 12.0)], 1)
    rot = rot[:1] if shared else rot  # (1 or b, J, 3, 3)
    deltas = torch.tensor([[0.0, 0, 0], [10.0, 0, 0], [0, -10, 5], [-5, 5, 10]]).double()
    poses = PoseGrid(
        rotations=rot,
        log_prior_rot=torch.zeros(3, 5, dtype=torch.float64),
        offsets=truth.offsets[:, None] + deltas[None],
        deltas=deltas[None].expand(3, -1, -1),
        log_prior_offset=torch.zeros(3, 4, dtype=torch.float64),
    )
    y, ctf2 = pts.gather(batch.data), pts.gather(batch.ctf2)
    inv_s2 = torch.rand(3, pts.flat.numel(), generator=g) + 0.5
    refs = torch.stack([vol, 0.5 * vol.flip(0)])  # two classes
    proj = Projector(refs, 2.0, max_slices=8)
    got = score_batch(proj, y, ctf2, inv_s2, batch.tilt_rotations, poses, pts, px,
                      max_elements=1)  # fmt: skip
    centred = centred_data(y.to(torch.complex128), batch.tilt_rotations, poses.offsets, pts, px)
    for c in range(2):
        mats = slice_matrices(batch.tilt_rotations.double(), rot.double())  # (b|1, J, f, 3, 3)
        packed = proj.sample(c, mats.transpose(1, 2), pts).double()  # (2, b|1, f, J, K)
        want = pose_scores(centred, ctf2.double(), inv_s2.double(), packed)  # (b, T, J)
        torch.testing.assert_close(got[:, c], want.transpose(1, 2), rtol=1e-4, atol=1e-2)


def test_recurrence_shifts_equal_direct_phases(ribosome) -> None:
    """shifted_data (one sine/cosine for the first offset of a lattice, then a step phasor per
    neighbour) equals Y e^{2 pi i k.s} with the phase of every offset computed directly, for
    a translation lattice shared by the batch and for per-row oversampled children whose
    parents differ; a mismatch means a wrong parent, step or step sign in the recurrence."""
    vol, px = ribosome
    batch, _ = make_batch([vol], px, 3, tilts_deg=(-50.0, 0.0, 35.0), max_offset_angst=30.0)
    pts = fourier_points(BOX, BOX // 2, None)
    y = pts.gather(batch.data)
    lattice = batch.offsets[:, None] + translation_grid(2.5 * px, px)[None]  # (3, 57, 3)
    corners = torch.cartesian_prod(*[torch.tensor([-px / 4, px / 4])] * 3).double()
    parents = torch.tensor([[[0.0, 0, 0], [px, 0, 0]], [[0, -px, 0], [0, px, px]],
                            [[0, 0, 0], [0, 0, -2 * px]]]).double()  # fmt: skip
    children = (batch.offsets[:, None, None] + parents[:, :, None] + corners).flatten(1, 2)
    for offsets in (lattice, children):
        got = shifted_data(y, batch.tilt_rotations, offsets, pts, px)
        want = centred_data(y.to(torch.complex128), batch.tilt_rotations, offsets, pts, px)
        err = (got.to(torch.complex128) - want).abs().max()
        assert err < 2e-6 * want.abs().max(), err
    # the speed-up: one direct offset for the lattice, one per parent for the children
    assert _lattice_steps(lattice)[0].count(-1) == 1
    assert _lattice_steps(children)[0].count(-1) == 2
