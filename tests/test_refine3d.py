"""``subtomo refine3d`` end to end on a tiny simulated project: RELION outputs, better poses
than the picked ones, and --continue reproducing the uninterrupted run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from subtomo.cli.main import app
from subtomo.data import ParticleSet
from subtomo.geometry import rotation_angle_deg
from subtomo.io import read_mrc

REFINE = [
    "refine3d", "--ios", "ext/optimisation_set.star", "--ref", "rec/merged.mrc",
    "--ini_high", "60", "--healpix_order", "3", "--auto_local_healpix_order", "3",
    "--offset_range", "1", "--offset_step", "1", "--iter", "1", "--device", "cpu",
    "--random_seed", "4",
]  # fmt: skip


def _invoke(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """16 noisy particles picked with 6 deg / 1.5 px errors, 2D stacks at box 24 (bin 2), a
    reference reconstructed at the picked poses, and one refine3d run (iteration 1, then the
    final joined iteration)."""
    root = tmp_path_factory.mktemp("refine") / "p"
    _invoke(["simulate", "--out", str(root), "--particles", "16", "--tilt-step", "10",
             "--noise", "gaussian", "--snr", "0.1", "--pose-error-deg", "6",
             "--shift-error-px", "1.5", "--seed", "2"])  # fmt: skip
    cwd = Path.cwd()
    try:
        os.chdir(root)
        _invoke(["extract", "--p", "particles_picked.star", "--t", "tomograms.star",
                 "--box", "24", "--bin", "2", "--float32", "--o", "ext"])  # fmt: skip
        _invoke(["reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec"])
        _invoke([*REFINE, "--o", "r1"])
    finally:
        os.chdir(cwd)
    return root


def test_outputs_and_pose_improvement(project) -> None:
    """RELION's final files exist and the refined poses are closer to the truth than the
    picked ones (median angle); a broken E-step, half split or pose write-back fails."""
    r1 = project / "r1"
    for name in ("run_data.star", "run_model.star", "run_class001.mrc",
                 "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc",
                 "run_optimisation_set.star", "run_it001_optimiser.star",
                 "run_it001_half1_class001.mrc", "run_resolution.png"):  # fmt: skip
        assert (r1 / name).is_file(), name
    truth = ParticleSet.read(project / "particles.star")
    picked = ParticleSet.read(project / "ext" / "particles.star")
    refined = ParticleSet.read(r1 / "run_data.star")
    order = {n: i for i, n in enumerate(truth.particles["rlnTomoParticleName"])}
    idx = [order[n] for n in refined.particles["rlnTomoParticleName"]]
    t = truth.particle_matrices()[idx].double()
    before = rotation_angle_deg(picked.particle_matrices().double(), t).median()
    after = rotation_angle_deg(refined.particle_matrices().double(), t).median()
    assert after < 0.8 * before, (before, after)
    halves = refined.particles["rlnRandomSubset"]
    assert set(halves) == {1, 2}


def test_continue_reproduces_the_uninterrupted_run(project, monkeypatch) -> None:
    """Resuming from iteration 1's checkpoint (as after a kill during iteration 2) gives a
    bit-identical final map and poses: the checkpoint holds the complete, deterministic state."""
    monkeypatch.chdir(project)
    shutil.rmtree("r2", ignore_errors=True)
    _invoke([*REFINE, "--continue", "r1/run_it001_optimiser.star", "--o", "r2"])
    a, _ = read_mrc("r1/run_class001.mrc")
    b, _ = read_mrc("r2/run_class001.mrc")
    assert torch.equal(a, b)
    pa = ParticleSet.read("r1/run_data.star").particles
    pb = ParticleSet.read("r2/run_data.star").particles
    assert (pa["rlnAngleRot"].to_numpy() == pb["rlnAngleRot"].to_numpy()).all()
