"""Shared fixtures: the real reference data folder and the devices to test on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# as the subtomo command does (cli.main): OpenMP threads that spin while waiting for work
# slow in-process jobs several-fold on a shared 2-core machine; set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (real third-party files; read only)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each available device: cpu always, cuda when present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _run_in_tmp_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with a fresh temporary folder as its RELION project directory, so
    jobs (which register in ``./default_pipeline.star``) never write into the checkout."""
    monkeypatch.chdir(tmp_path)


def run_subtomo(args: list[str]) -> None:
    """Run one ``subtomo`` command line in this process; fail the test on a non-zero exit."""
    from typer.testing import CliRunner

    from subtomo.cli.main import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def stack_project(root: Path, *more: list[str]) -> Path:
    """A tiny simulated project in ``root``: 16 noisy particles picked with 6 deg / 1.5 px
    errors, 2D stacks at box 24 (bin 2) in ``ext/``, a reference reconstructed at the picked
    poses in ``rec/``, then the command lines ``more`` (run in ``root``)."""
    run_subtomo(["simulate", "--out", str(root), "--particles", "16", "--tilt-step", "10",
                 "--noise", "gaussian", "--snr", "0.1", "--pose-error-deg", "6",
                 "--shift-error-px", "1.5", "--seed", "2"])  # fmt: skip
    cwd = Path.cwd()
    try:
        os.chdir(root)
        run_subtomo(["extract", "--p", "particles_picked.star", "--t", "tomograms.star",
                     "--box", "24", "--bin", "2", "--float32", "--o", "ext"])  # fmt: skip
        run_subtomo(["reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec"])
        for args in more:
            run_subtomo(args)
    finally:
        os.chdir(cwd)
    return root


def torchrun(args: list[str], cwd: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    """``subtomo args`` under ``torchrun --standalone`` with ``ranks`` gloo ranks (CPU)."""
    return _torchrun(["-m", "subtomo.cli", *args], cwd, ranks)


def torchrun_commands(lines: list[str], cwd: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    """Several ``subtomo`` command lines run in turn in one ``torchrun`` launch (one start-up
    of the ranks and of torch for them all)."""
    return _torchrun([str(Path(__file__).with_name("torchrun_commands.py")), *lines], cwd, ranks)


def _torchrun(program: list[str], cwd: Path, ranks: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")]
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(ranks), *program]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
