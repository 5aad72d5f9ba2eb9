"""Frame alignment (``subtomo frame-align``) and particle motion against simulated truth."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_subtomo
from subtomo.data import ParticleSet, TomogramSet, Trajectories
from subtomo.errors import InputError
from subtomo.fourier import fsc_maps
from subtomo.io import read_mrc
from subtomo.jobs.frame_align import FrameAlignParams, run
from subtomo.simulate.motion import particle_motion
from subtomo.simulate.truth import image_position_error
from subtomo.tomorefine import gp_basis, gp_kernel
from subtomo.tomorefine.motion import motion_steps


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 noisy particles in 2 tomograms (10 Å/px, box 48, 21 tilts) with per-tilt shift
    errors (σ 1.5 px) and particle motion (1 Å per e/Å²), stacks extracted with the nominal
    alignment, then frame alignment against the true map without and with the motion model."""
    root = tmp_path_factory.mktemp("frame_align")
    cwd = Path.cwd()
    try:
        os.chdir(root)
        run_subtomo(["simulate", "--out", ".", "--particles", "24", "--tomograms", "2",
                     "--noise", "gaussian",
                     "--snr", "0.1", "--tilt-shift-error-px", "1.5", "--motion-s-vel", "1.0",
                     "--seed", "1"])  # fmt: skip
        run_subtomo(["extract", "--p", "particles.star", "--t", "tomograms.star", "--box",
                     "48", "--float32", "--o", "ext"])  # fmt: skip
        common = ["frame-align", "--p", "ext/particles.star", "--t", "tomograms.star",
                  "--ref1", "truth.mrc", "--ref2", "truth.mrc", "--s_vel", "1.0"]  # fmt: skip
        run_subtomo([*common, "--o", "rigid"])
        run_subtomo([*common, "--motion", "--o", "motion"])
    finally:
        os.chdir(cwd)
    return root


def _errors(root: Path, job: str | None) -> tuple[float, float]:
    """RMS image-position error (px) over all (particle, tilt) pairs and of the per-tilt mean
    (:func:`subtomo.simulate.truth.image_position_error`) of a job, or of the stacks' input."""
    cwd = Path.cwd()
    os.chdir(root)  # the tables name files relative to the project

    def files(tomograms: str, particles: str, motion: str | None) -> tuple:
        tomos = TomogramSet.read(tomograms)
        traj = Trajectories.read(motion) if motion else None
        return tomos, ParticleSet.read(particles, tomos), traj

    try:
        truth = files("true_alignment.star", "particles.star", "true_motion.star")
        if job is None:
            return image_position_error(truth, files("tomograms.star", "ext/particles.star", None))
        return image_position_error(
            truth, files(f"{job}/tomograms.star", f"{job}/particles.star", f"{job}/motion.star")
        )
    finally:
        os.chdir(cwd)


def test_gp_prior_and_simulated_motion() -> None:
    """The basis reproduces the kernel (B Bᵀ = K); simulated trajectories are zero at the
    first tilt acquired and their steps have σ = s_vel × dose (a random walk of that size)."""
    positions = torch.tensor([[0.0, 0, 0], [300, 0, 0], [0, 2000, 500]], dtype=torch.float64)
    basis = gp_basis(positions, 1000.0)
    torch.testing.assert_close(basis @ basis.T, gp_kernel(positions, 1000.0))
    assert torch.allclose(gp_kernel(positions, 1000.0)[0, 1], torch.tensor(np.exp(-0.3)).double())
    dose = np.array([6.0, 3.0, 0.0, 9.0, 15.0])  # rows; acquisition 2, 1, 0, 3, 4
    apart = np.arange(600)[:, None] * np.array([1e4, 0.0, 0.0])  # uncorrelated particles
    traj = particle_motion(np.random.default_rng(0), apart, dose, 0.5, 1.0)
    assert np.all(traj[:, 2] == 0)
    order, sigma = motion_steps(torch.as_tensor(dose), 0.5)
    assert order.tolist() == [2, 1, 0, 3, 4]
    steps = np.diff(traj[:, order.numpy()], axis=1)  # (n, 4, 3)
    np.testing.assert_allclose(steps.std(axis=(0, 2)), sigma.numpy(), rtol=0.1)


def test_shifts_and_motion_recovered(project: Path) -> None:
    """Against the true map, the per-tilt shifts (σ 1.5 px injected) come back within 0.3 px
    RMS; the particles' image positions (shifts + motion) within 0.6 px, and the motion model
    brings them closer than the rigid fit (it could not if the GP or its signs were wrong)."""
    before_all, before_tilt = _errors(project, None)
    rigid_all, rigid_tilt = _errors(project, "rigid")
    motion_all, motion_tilt = _errors(project, "motion")
    assert before_tilt > 1.5 and before_all > 1.5
    assert rigid_tilt < 0.3 and motion_tilt < 0.3
    assert motion_all < 0.6
    assert motion_all < 0.8 * rigid_all


def _fsc_to_truth(root: Path, *args: str) -> float:
    """Mean FSC to the true map over shells 1..N/2 of a reconstruction from the tilt series."""
    out = f"rec_{len(list(root.glob('rec_*')))}"
    cwd = Path.cwd()
    os.chdir(root)
    try:
        run_subtomo(["reconstruct", *args, "--box", "48", "--from", "tilt_series", "--o", out])
    finally:
        os.chdir(cwd)
    merged, _ = read_mrc(root / out / "merged.mrc")
    truth, _ = read_mrc(root / "truth.mrc")
    return float(fsc_maps(merged, truth)[1:].mean())


def test_motion_star_read_back_by_reconstruct(project: Path) -> None:
    """Reconstruct reads the job's tomograms, particles and motion.star (its optimisation set)
    and the map is closer to the truth than from the nominal alignment."""
    before = _fsc_to_truth(project, "--p", "particles.star", "--t", "tomograms.star")
    after = _fsc_to_truth(project, "--ios", "motion/optimisation_set.star")
    assert after > before + 0.05


def test_continue_keeps_fitted_series(project: Path) -> None:
    """``--continue`` on a finished job refits nothing and writes the same tables."""
    cwd = Path.cwd()
    os.chdir(project)
    try:

        def tables() -> list[str]:  # without the writer's time stamp
            return [line for name in ("motion.star", "tomograms.star", "particles.star")
                    for line in (project / "motion" / name).read_text().splitlines()
                    if not line.startswith("# Created")]  # fmt: skip

        first = tables()
        run(FrameAlignParams(continue_from="motion"))
        assert tables() == first
    finally:
        os.chdir(cwd)


def test_bad_input_leaves_no_job(project: Path) -> None:
    """Without half maps: one InputError and no job directory."""
    cwd = Path.cwd()
    os.chdir(project)
    try:
        with pytest.raises(InputError, match="half maps"):
            run(FrameAlignParams(particles="ext/particles.star", tomograms="tomograms.star",
                                 output_dir="bad"))  # fmt: skip
        assert not (project / "bad").exists()
    finally:
        os.chdir(cwd)


def test_deformation_fields_are_fitted_and_applied(tmp_path: Path) -> None:
    """Tilt images deformed by smooth fields (σ 3 px at a 3 x 3 grid of nodes, zero mean
    per tilt), stacks extracted with the undeformed tables: ``frame-align --deformation``
    brings the particles' image positions far closer to the truth than the rigid model
    can, writes the field (subtomoDeformation* columns), and Extract + Reconstruct with its
    tables then give a map closer to the truth than with the rigid fit's."""
    os.chdir(tmp_path)
    run_subtomo(["simulate", "--out", ".", "--particles", "40", "--tomograms", "1",
                 "--deformation", "3", "--seed", "2"])  # fmt: skip
    assert TomogramSet.read("true_alignment.star")["TS_01"].deformation is not None
    run_subtomo(["extract", "--p", "particles.star", "--t", "tomograms.star", "--box", "48",
                 "--float32", "--o", "ext"])  # fmt: skip
    common = ["frame-align", "--p", "ext/particles.star", "--t", "tomograms.star",
              "--ref1", "truth.mrc", "--ref2", "truth.mrc"]  # fmt: skip
    run_subtomo([*common, "--o", "rigid"])
    run_subtomo([*common, "--deformation", "--o", "deformed"])

    def error(tomograms: str, particles: str, motion: str | None = None) -> float:
        def files(t: str, p: str, m: str | None) -> tuple:
            tomos = TomogramSet.read(t)
            return tomos, ParticleSet.read(p, tomos), Trajectories.read(m) if m else None

        truth = files("true_alignment.star", "particles.star", None)
        return image_position_error(truth, files(tomograms, particles, motion))[0]

    before = error("tomograms.star", "ext/particles.star")
    rigid = error("rigid/tomograms.star", "rigid/particles.star", "rigid/motion.star")
    deformed = error("deformed/tomograms.star", "deformed/particles.star", "deformed/motion.star")
    assert TomogramSet.read("deformed/tomograms.star")["TS_01"].deformation.shape[1:] == (3, 3, 2)
    assert deformed < 0.5 * rigid and rigid < before, (before, rigid, deformed)
    truth, _ = read_mrc("truth.mrc")
    score = {}
    for job in ("rigid", "deformed"):
        run_subtomo(["reconstruct", "--p", f"{job}/particles.star", "--t",
                     f"{job}/tomograms.star", "--mot", f"{job}/motion.star", "--box", "48",
                     "--o", f"rec_{job}"])  # fmt: skip
        score[job] = float(fsc_maps(read_mrc(f"rec_{job}/merged.mrc")[0], truth)[1:20].mean())
    assert score["deformed"] > score["rigid"] + 0.02, score
    # a grid other than the series' own: one line naming the file, series and column
    with pytest.raises(InputError, match="3 x 3 deformation grid, 2 x 3 was asked for"):
        run(FrameAlignParams(
            particles="deformed/particles.star", tomograms="deformed/tomograms.star",
            ref1="truth.mrc", ref2="truth.mrc", deformation=True, def_w=2,
            output_dir="Polish/bad",
        ))  # fmt: skip
