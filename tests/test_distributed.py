"""torch.distributed runs: 2 gloo ranks on CPU (``torchrun``) give the same maps and STAR
files as one process, rank 0 alone writes (each rank its own items' files), bad input ends
every rank with one error line; and the single-process helpers are the identity."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import run_subtomo, stack_project, torchrun_commands
from subtomo import distributed
from subtomo.cli.main import app
from subtomo.io import read_mrc, read_star

SMALL_BATCHES = ["--memory-gb", "0.002"]  # a few particles per batch: both ranks get work


def _invoke(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "subtomo.cli", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """16 noisy particles as 2D stacks (box 24, bin 2) and a reference."""
    return stack_project(tmp_path_factory.mktemp("dist") / "p")


def _same_maps(a: Path, b: Path, names: list[str], rtol: float = 1e-4) -> None:
    for name in names:
        x, _ = read_mrc(a / name)
        y, _ = read_mrc(b / name)
        assert float((x - y).abs().max()) <= rtol * float(x.abs().max()), name


def _one_and_two_ranks(project: Path, args: list[str], tag: str) -> tuple[Path, Path]:
    cwd = Path.cwd()
    try:
        os.chdir(project)
        _invoke([*args, "--o", f"{tag}1"])
    finally:
        os.chdir(cwd)
    done = _torchrun([*args, "--o", f"{tag}2"], project)
    assert done.returncode == 0, done.stderr[-3000:]
    two = project / f"{tag}2"
    assert (two / "RELION_JOB_EXIT_SUCCESS").is_file()
    assert not list(two.glob(".*tmp*")), "temporary files left"
    assert "2 ranks" in (two / "run.out").read_text()
    return project / f"{tag}1", two


def test_reconstruct_two_ranks_equals_one(project) -> None:
    """Each rank inserts half the particles of the one tomogram (from their 2D stacks); the
    all-reduced sums give the one-process half maps (float summation order only), whichever
    rank finishes and writes each map."""
    one, two = _one_and_two_ranks(
        project, ["reconstruct", "--ios", "ext/optimisation_set.star"], "rec"
    )
    # the ranks share the maps out (rank 1 writes half2's three files)
    names = [f"{kind}{tag}.mrc" for kind in ("", "data_", "weight_") for tag in
             ("half1", "half2", "merged")]  # fmt: skip
    _same_maps(one, two, names, rtol=1e-5)


def test_reconstruct_tilt_series_two_ranks_equals_one(tmp_path) -> None:
    """From the tilt series of 3 tomograms of 3 particles: rank 0 inserts TS_01's and one of
    TS_02's, rank 1 the others (balanced, each rank reading only its tilt series); the
    summed accumulators give the one-process maps (float summation order only)."""
    run_subtomo(["simulate", "--out", str(tmp_path), "--tomograms", "3", "--particles", "9",
                 "--tilt-step", "10", "--seed", "3"])  # fmt: skip
    args = ["reconstruct", "--p", "particles.star", "--t", "tomograms.star",
            "--from", "tilt_series", "--box", "24", "--bin", "2"]  # fmt: skip
    one, two = _one_and_two_ranks(tmp_path, args, "rec")
    _same_maps(one, two, ["half1.mrc", "half2.mrc", "merged.mrc"], rtol=1e-5)


def test_refine3d_two_ranks_equals_one(project) -> None:
    """Gold-standard refinement with the batches of each half split over 2 ranks: same
    iterations, maps and poses as one process (a rank whose batches were lost, or whose
    sampling decisions diverged, would differ by whole grid steps); and a 2-rank
    ``--continue`` of the one-process run's checkpoint ends where that run ended."""
    args = ["refine3d", "--ios", "ext/optimisation_set.star", "--ref", "rec/merged.mrc",
            "--ini_high", "60", "--healpix_order", "3", "--auto_local_healpix_order", "3",
            "--offset_range", "1", "--offset_step", "1", "--iter", "2", "--device", "cpu",
            "--random_seed", "4", *SMALL_BATCHES]  # fmt: skip
    one, two = _one_and_two_ranks(project, args, "ref")
    _same_maps(one, two, ["run_class001.mrc", "run_half1_class001_unfil.mrc"])
    a = read_star(one / "run_data.star")["particles"]
    b = read_star(two / "run_data.star")["particles"]
    assert list(a["rlnTomoParticleName"]) == list(b["rlnTomoParticleName"])
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"):
        assert np.abs(a[column].to_numpy() - b[column].to_numpy()).max() < 0.01, column
    # --continue with 2 ranks from the one-process run's first iteration: the same result
    resumed = project / "ref_resumed"
    resumed.mkdir()
    for path in one.glob("run_it001_*"):
        shutil.copy(path, resumed / path.name)
    shutil.copy(one / "job.star", resumed / "job.star")
    done = _torchrun(["refine3d", "--continue", "ref_resumed/run_it001_optimiser.star",
                      "--o", "ref_resumed"], project)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _same_maps(one, resumed, ["run_class001.mrc"])


def test_class3d_two_ranks_equals_one(project) -> None:
    """Classification (K = 2, no alignment): same classes and maps with 2 ranks."""
    args = ["class3d", "--ios", "ext/optimisation_set.star", "--ref", "rec/merged.mrc",
            "--K", "2", "--iter", "2", "--skip_align", "--ini_high", "60", "--device", "cpu",
            "--random_seed", "3", *SMALL_BATCHES]  # fmt: skip
    one, two = _one_and_two_ranks(project, args, "cls")
    _same_maps(one, two, ["run_it002_class001.mrc", "run_it002_class002.mrc"])
    a = read_star(one / "run_it002_data.star")["particles"]
    b = read_star(two / "run_it002_data.star")["particles"]
    assert (a["rlnClassNumber"].to_numpy() == b["rlnClassNumber"].to_numpy()).all()


def test_initial_model_two_ranks_equals_one(project) -> None:
    """De novo initial model (K = 2) with each mini-batch's batches split over 2 ranks: the
    same classes, poses and maps as one process (a rank whose batches were lost, or whose
    results were not gathered, would move the step and the poses)."""
    args = ["initial-model", "--ios", "ext/optimisation_set.star", "--K", "2", "--iter", "2",
            "--grad_ini_subset", "12", "--grad_fin_subset", "16", "--ini_high", "100",
            "--maxres", "80", "--device", "cpu", "--random_seed", "5", *SMALL_BATCHES]  # fmt: skip
    one, two = _one_and_two_ranks(project, args, "ini")
    _same_maps(one, two, ["run_it002_class001.mrc", "run_it002_class002.mrc", "initial_model.mrc"])
    a = read_star(one / "run_it002_data.star")["particles"]
    b = read_star(two / "run_it002_data.star")["particles"]
    assert (a["rlnClassNumber"].to_numpy() == b["rlnClassNumber"].to_numpy()).all()
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"):
        assert np.abs(a[column].to_numpy() - b[column].to_numpy()).max() < 0.01, column


def test_bad_input_ends_every_rank_with_one_line(project) -> None:
    """Both ranks read the inputs before the job starts: one error line each, no job dir."""
    done = _torchrun(["reconstruct", "--ios", "missing.star", "--o", "bad"], project)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 2 and all("missing.star" in line for line in errors), errors
    assert not (project / "bad").exists()


def test_one_process_is_the_identity(monkeypatch) -> None:
    """Without a process group: rank 0 of 1, shard keeps everything, gathers wrap."""
    for name in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.init_from_environment("cpu")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert list(distributed.shard(range(5))) == [0, 1, 2, 3, 4]
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(3) == 3
    distributed.barrier()


@pytest.mark.parametrize("ranks", [1, 2, 3, 5, 7])
def test_shard_groups_balances_particles_keeping_tomograms_whole(monkeypatch, ranks) -> None:
    """Over all ranks every item once, in its group; item counts within one of each other;
    at most ranks - 1 groups split (a rank reads only the tilt series it uses)."""
    sizes = {"a": 7, "b": 0, "c": 2, "d": 5, "e": 1}
    groups = [(key, np.arange(n) + 100 * k) for k, (key, n) in enumerate(sizes.items())]
    monkeypatch.setattr(distributed, "world_size", lambda: ranks)
    shares = []
    for r in range(ranks):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.shard_groups(groups))
    got = {key: [] for key in sizes}
    for share in shares:
        assert all(len(items) for _, items in share)
        for key, items in share:
            got[key].extend(items.tolist())
    assert got == {key: items.tolist() for key, items in groups}
    counts = [sum(len(items) for _, items in share) for share in shares]
    assert max(counts) - min(counts) <= 1, counts
    readers = [sum(key in dict(share) for share in shares) for key in sizes]
    assert sum(n - 1 for n in readers if n) <= ranks - 1, readers


def test_slurm_environment(monkeypatch) -> None:
    """srun's variables give rank and world size; the master is the first listed host."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-05,07],cpu1")
    assert distributed._environment() == (5, 8)
    assert os.environ["MASTER_ADDR"] == "gpu03"
    assert distributed._first_host("node7") == "node7"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed._environment() is None


# the tilt-series jobs, each on the previous one's output, as one process and as 2 ranks
_CHAIN = [
    "motioncorr --i Import/job001/tilt_series.star --o mc{n}",
    "ctffind --i tomograms.star --box 128 --dFMin 20000 --dFMax 40000 --FStep 2000 "
    "--max_astig 200 --no_fit_thickness --localsearch_nominal_defocus 0 --o ctf{n}",
    "reconstruct-tomograms --i ctf{n}/tilt_series_ctf.star --bin 4 --o rt{n}",
    "template-match --i rt{n}/tomograms.star --template truth.mrc --angular_step 60 --o tm{n}",
    "extract --p particles_picked.star --t tomograms.star --box 24 --bin 2 --o ex{n}",
]


_JOB = re.compile(r"\b(mc|ctf|rt|tm|ex)(\d|_resumed)/")  # a job directory of _CHAIN


def _same_tables(a: dict, b: dict, path: Path) -> None:
    assert list(a) == list(b), path
    for name, x in a.items():
        y = b[name]
        if isinstance(x, dict):
            x, y = pd.DataFrame([x]), pd.DataFrame([y])
        assert list(x.columns) == list(y.columns), (path, name)
        for column in x.columns:
            u, v = x[column].to_numpy(), y[column].to_numpy()
            if u.dtype.kind in "fi":
                np.testing.assert_array_equal(u, v, err_msg=f"{path} {column}")
            else:
                assert [_JOB.sub("job/", str(t)) for t in u] == [
                    _JOB.sub("job/", str(t)) for t in v
                ], (path, column)


def _same_outputs(one: Path, two: Path) -> int:
    """Every MRC and STAR file of job directory ``one`` is in ``two`` with the same values
    (bit-identical; paths equal but for the job names); returns the number compared."""
    count = 0
    for a in sorted(one.rglob("*")):
        if a.suffix not in (".mrc", ".mrcs", ".star", ".ctf") or a.name == "job.star":
            continue
        b = two / a.relative_to(one)
        assert b.is_file(), b
        if a.suffix == ".star":
            _same_tables(read_star(a), read_star(b), a)
        else:
            _same_maps(one, two, [str(a.relative_to(one))], rtol=0.0)
        count += 1
    return count


@pytest.fixture(scope="module")
def series_project(tmp_path_factory) -> Path:
    """2 simulated tilt series (3 tilts, 256² at 10 Å) with 4-frame movies, imported."""
    root = tmp_path_factory.mktemp("dist_series") / "p"
    run_subtomo(["simulate", "--out", str(root), "--tomograms", "2", "--particles", "6",
                 "--tilt-range", "6", "--tilt-step", "6", "--movie-frames", "4",
                 "--seed", "1"])  # fmt: skip
    cwd = Path.cwd()
    try:
        os.chdir(root)
        run_subtomo(["import", "--movies", "frames/*", "--mdocs", "*.mdoc"])
    finally:
        os.chdir(cwd)
    return root


def test_tilt_series_jobs_two_ranks_equal_one(series_project) -> None:
    """motioncorr, ctffind, reconstruct-tomograms (movies, series, volumes shared out),
    template-match (orientation batches shared out, maxima reduced) and extract (tomograms
    shared out) write the same files with 2 ranks as with one process; a 2-rank
    ``--only_do_unfinished`` run finishes the movies a one-process run left undone. The one
    process runs on as many threads as each rank (torch's sums in the same order: the locally
    normalised scores of template matching differ by 1e-3 between 1 and 2 threads)."""
    cwd, threads = Path.cwd(), torch.get_num_threads()
    try:
        os.chdir(series_project)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        for line in _CHAIN:
            run_subtomo(line.format(n=1).split())
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    resumed = series_project / "mc_resumed"
    shutil.copytree(series_project / "mc1", resumed)
    for movie in sorted(resumed.glob("frames/TS_0*_00[23]_*"))[::2]:
        movie.unlink()  # a sum or a motion STAR missing: that movie is redone
    lines = [line.format(n=2) for line in _CHAIN]
    lines.append("motioncorr --i Import/job001/tilt_series.star --o mc_resumed "
                 "--only_do_unfinished")  # fmt: skip
    done = torchrun_commands(lines, series_project)
    assert done.returncode == 0, done.stderr[-3000:]
    compared = {}
    for job in ("mc", "ctf", "rt", "tm", "ex"):
        two = series_project / f"{job}2"
        assert (two / "RELION_JOB_EXIT_SUCCESS").is_file()
        assert not list(two.rglob(".*tmp*")), "temporary files left"
        assert "2 ranks" in (two / "run.out").read_text()
        compared[job] = _same_outputs(series_project / f"{job}1", two)
    assert compared["mc"] == 15 and min(compared.values()) > 0, compared
    assert _same_outputs(series_project / "mc1", resumed) == 15
