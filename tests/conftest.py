"""Shared fixtures: the real reference data folder and the devices to test on."""

from __future__ import annotations

import os
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
