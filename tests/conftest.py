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
