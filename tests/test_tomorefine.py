"""CTF refinement and its shared machinery (subtomo.tomorefine) against simulated truth."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from conftest import run_subtomo
from subtomo.data import ParticleSet, TomogramSet
from subtomo.io import read_mrc
from subtomo.ml.loader import ParticleState, StackLoader
from subtomo.tomorefine import TiltPredictor, fsc_weights


@pytest.fixture(scope="module")
def exact_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 noise-free particles (10 Å/px, box 32, 11 tilts), stacks extracted at the true poses."""
    root = tmp_path_factory.mktemp("exact")
    cwd = Path.cwd()
    try:
        os.chdir(root)
        run_subtomo(["simulate", "--out", ".", "--particles", "12", "--tilt-step", "12",
                     "--box", "32", "--seed", "3"])  # fmt: skip
        run_subtomo(["extract", "--p", "particles.star", "--t", "tomograms.star",
                     "--box", "32", "--float32", "--o", "ext"])  # fmt: skip
    finally:
        os.chdir(cwd)
    return root


def _predictor(root: Path, device: torch.device) -> tuple[TiltPredictor, ParticleState]:
    tomograms = TomogramSet.read(root / "tomograms.star")
    particles = ParticleSet.read(root / "ext/particles.star", tomograms)
    loader = StackLoader(particles, tomograms, batch_size=5)
    truth, _ = read_mrc(root / "truth.mrc")
    halves = torch.stack([truth, truth]).float()
    _, last = fsc_weights(halves, loader.pixel_size)
    predictor = TiltPredictor(loader, halves, max_shell=last, device=device)
    return predictor, ParticleState.from_particles(particles)


def _correlation(predictor: TiltPredictor, state: ParticleState) -> float:
    """Correlation of the data with ``A·A·P`` (the current CTF applied twice) over all."""
    num = den_y = den_m = 0.0
    for patches in predictor.batches(state):
        model = patches.ctf * patches.ctf * patches.predicted
        y = patches.observed
        num += float((y.conj() * model).real.sum())
        den_y += float(y.abs().square().sum())
        den_m += float(model.abs().square().sum())
        subset = predictor.loader.particles.random_subset()[patches.index.numpy()]
        assert patches.half.tolist() == (subset - 1).tolist()
    return num / (den_y * den_m) ** 0.5


def test_prediction_matches_noise_free_data(exact_project: Path, device: torch.device) -> None:
    """On noise-free stacks at the true poses the data are ``A·A·P``: correlation > 0.95
    (neighbours in the patches keep it below 1); at poses turned by 10° about z it falls below
    0.8, so a wrong rotation convention, CTF or half-set choice would fail."""
    predictor, state = _predictor(exact_project, device)
    assert _correlation(predictor, state) > 0.95
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    turn = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    state.rotations = state.rotations @ turn
    assert _correlation(predictor, state) < 0.8
