"""``subtomo refine3d`` end to end on a tiny simulated project: RELION outputs, better poses
than the picked ones, --continue reproducing the uninterrupted run (also after a SIGKILL at a
random moment), and the choice of the iteration to continue after."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import stack_project
from subtomo.cli.main import app
from subtomo.data import ParticleSet
from subtomo.data.optimisation_set import OptimisationSet
from subtomo.errors import InputError
from subtomo.geometry import rotation_angle_deg
from subtomo.io import read_mrc, read_star
from subtomo.ml.starfiles import IterationFiles, load_checkpoint

REFINE = [
    "refine3d", "--ios", "ext/optimisation_set.star", "--ref", "rec/merged.mrc",
    "--ini_high", "60", "--healpix_order", "3", "--auto_local_healpix_order", "3",
    "--offset_range", "1", "--offset_step", "1", "--iter", "3", "--device", "cpu",
    "--random_seed", "4",
]  # fmt: skip


def _invoke(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """16 noisy particles picked with 6 deg / 1.5 px errors, 2D stacks at box 24 (bin 2), a
    reference reconstructed at the picked poses, and one uninterrupted refine3d run (at most 3
    iterations, then the final joined iteration)."""
    return stack_project(tmp_path_factory.mktemp("refine") / "p", [*REFINE, "--o", "r1"])


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


def test_optimisation_sets_name_files_that_exist(project) -> None:
    """Every optimisation set Refine3D writes names files it wrote: the final one the
    unfiltered half maps (the only half maps the final iteration writes), so ctf-refine and
    frame-align can start from it."""
    r1 = project / "r1"
    sets = [*sorted(r1.glob("run_it*_optimisation_set.star")), r1 / "run_optimisation_set.star"]
    for path in sets:
        ios = OptimisationSet.read(path)
        for f in (ios.particles, ios.tomograms, ios.reference_map1, ios.reference_map2):
            if f is not None:
                f = f if f.is_absolute() else project / f
                assert f.is_file(), (path.name, f)
    final = OptimisationSet.read(r1 / "run_optimisation_set.star")
    assert str(final.reference_map1).endswith("run_half1_class001_unfil.mrc")


def test_model_star_holds_the_estimated_accuracies(project) -> None:
    """run_model.star and each iteration's half models carry auto-refine's accuracy
    estimates (the checkpointed state's, RELION's rlnAccuracy*), not the sampling steps
    (3.75 deg / 20 Å here); a writer that ignores the estimates fails."""
    r1 = project / "r1"
    last = IterationFiles.resume_point(r1)
    state = load_checkpoint(last.checkpoint)["state"]
    for path in (r1 / "run_model.star", last.model(1), last.model(2)):
        row = read_star(path)["model_classes"].iloc[0]
        assert row["rlnAccuracyRotations"] == pytest.approx(state["acc_rot_deg"], rel=1e-5)
        assert row["rlnAccuracyTranslationsAngst"] == pytest.approx(
            state["acc_trans_angst"], rel=1e-5
        )
        assert row["rlnAccuracyRotations"] != pytest.approx(3.75)
        assert 0.05 <= row["rlnAccuracyRotations"] <= 30.1


def test_continue_reproduces_the_uninterrupted_run(project, monkeypatch) -> None:
    """Resuming from the last iteration's optimiser file into another directory (``--o``;
    as after a kill during the final iteration) gives a bit-identical final map and poses:
    the checkpoint holds the complete, deterministic state."""
    monkeypatch.chdir(project)
    shutil.rmtree("r2", ignore_errors=True)
    last = sorted(Path("r1").glob("run_it*_optimiser.star"))[-1]
    _invoke(["refine3d", "--continue", str(last), "--o", "r2"])
    a, _ = read_mrc("r1/run_class001.mrc")
    b, _ = read_mrc("r2/run_class001.mrc")
    assert torch.equal(a, b)
    pa = ParticleSet.read("r1/run_data.star").particles
    pb = ParticleSet.read("r2/run_data.star").particles
    assert (pa["rlnAngleRot"].to_numpy() == pb["rlnAngleRot"].to_numpy()).all()


def _same_results(a: Path, b: Path) -> None:
    """The final map, poses and resolution of two refine3d runs agree (bitwise or to 1e-6)."""
    ma, _ = read_mrc(a / "run_class001.mrc")
    mb, _ = read_mrc(b / "run_class001.mrc")
    assert torch.allclose(ma, mb, rtol=0, atol=1e-6 * float(ma.abs().max()))
    pa = ParticleSet.read(a / "run_data.star").particles
    pb = ParticleSet.read(b / "run_data.star").particles
    assert list(pa["rlnTomoParticleName"]) == list(pb["rlnTomoParticleName"])
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnOriginYAngst", "rlnOriginZAngst"):  # fmt: skip
        x, y = pa[col].to_numpy(), pb[col].to_numpy()
        assert abs(x - y).max() <= 1e-6 * max(1.0, abs(x).max()), col
    ga = read_star(a / "run_model.star")["model_general"]
    gb = read_star(b / "run_model.star")["model_general"]
    assert ga["rlnCurrentResolution"] == pytest.approx(gb["rlnCurrentResolution"], rel=1e-6)


def test_sigkill_at_a_random_moment_then_continue(project) -> None:
    """A refine3d run in its own process, SIGKILLed at a random moment after its first
    iteration's files exist (a seeded random iteration boundary plus a random fraction of an
    iteration), resumed with ``--continue <its directory>`` alone, ends with the uninterrupted
    run's map, poses and resolution. Fails if a half-written iteration is picked, if the
    checkpoint misses state, or if the resumed run does not take the stored options."""
    rng = random.Random(20)
    out = project / "rk"
    shutil.rmtree(out, ignore_errors=True)
    r1 = project / "r1"
    its = sorted(r1.glob("run_it*_optimiser.star"))
    boundary = rng.randrange(len(its))  # wait for this iteration's optimiser file
    after = [*its, r1 / "run_optimiser.star"][boundary + 1]
    delay = 0.6 * rng.random() * (after.stat().st_mtime - its[boundary].stat().st_mtime)
    cmd = [sys.executable, "-c", "from subtomo.cli.main import main; main()", *REFINE,
           "--o", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        target = out / its[boundary].name
        deadline = time.monotonic() + 120
        while not target.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "run_optimiser.star").is_file()
    cwd = Path.cwd()
    try:
        os.chdir(project)
        _invoke(["refine3d", "--continue", "rk"])
    finally:
        os.chdir(cwd)
    _same_results(r1, out)


def test_resume_point_is_the_last_complete_iteration(tmp_path) -> None:
    """``--continue <directory>`` takes the highest iteration whose optimiser file and
    checkpoint both exist: not iteration 3 (checkpoint written, killed before its optimiser
    file), not 4 (optimiser file without checkpoint); an explicit incomplete one is refused."""
    for it in (1, 2):
        for suffix in ("optimiser.star", "checkpoint.pt"):
            (tmp_path / f"run_it{it:03d}_{suffix}").write_text("x")
    (tmp_path / "run_it003_checkpoint.pt").write_text("x")
    (tmp_path / "run_it004_optimiser.star").write_text("x")
    (tmp_path / ".run_it005_optimiser.tmp9.star").write_text("x")
    files = IterationFiles.resume_point(tmp_path)
    assert files.iteration == 2 and files.root == "run"
    assert IterationFiles.resume_point(tmp_path / "run_it001_optimiser.star").iteration == 1
    with pytest.raises(InputError, match="checkpoint"):
        IterationFiles.resume_point(tmp_path / "run_it004_optimiser.star")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no complete iteration"):
        IterationFiles.resume_point(tmp_path / "empty")
