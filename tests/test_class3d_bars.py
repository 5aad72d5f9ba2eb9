"""A small version of issue #5's K=4 bar (``benchmarks/class3d.py --bars k4`` at full size):
classification without alignment of a 50/50 70S/50S mixture into 4 classes keeps the two
species apart."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd
import pytest
import starfile
from typer.testing import CliRunner

from subtomo.cli.main import app
from subtomo.io import read_mrc, write_mrc
from subtomo.jobs.class3d import Class3DParams, run
from subtomo.jobs.extract import ExtractParams
from subtomo.jobs.extract import run as run_extract

PX = 20.0
BOX = 24
DEMO = Path(__file__).resolve().parents[1] / "src" / "subtomo" / "demo_data"


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    """80 particles, 50/50 70S and 50S (true poses), 13 tilts, box 24 at 20 Å, SNR 0.1, as
    2D stacks; ``mix.mrc`` is the average of the two true maps."""
    root = tmp_path_factory.mktemp("mix4") / "project"
    result = CliRunner().invoke(
        app,
        [
            "simulate", "--out", str(root), "--preset", "tiny", "--pixel-size", str(PX),
            "--tilt-step", "10", "--noise", "gaussian", "--snr", "0.1", "--box", str(BOX),
            "--particles", "80", "--tomogram-size", "256,256,64", "--seed", "1",
            "--map", str(DEMO / "ribosome70S_4v4r_5A.mrc.gz"),
            "--map", str(DEMO / "ribosome50S_4v4r_5A.mrc.gz"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with contextlib.chdir(root):
        run_extract(
            ExtractParams(
                particles="particles.star", tomograms="tomograms.star", box=BOX,
                float16=False, output_dir="ext", device="cpu",
            )
        )  # fmt: skip
    a, px = read_mrc(root / "truth_ribosome70S_4v4r_5A.mrc")
    b, _ = read_mrc(root / "truth_ribosome50S_4v4r_5A.mrc")
    write_mrc(root / "mix.mrc", 0.5 * (a + b), px)
    return root


def test_four_classes_do_not_mix_the_species(mixture, monkeypatch) -> None:
    """K=4 from one average map, 8 iterations without alignment: no class holds more than 5%
    of the other species (issue #5's bar). A class stuck at the average of both species (the
    random initial subsets never broken up) or particles scored against the wrong class
    would mix them."""
    monkeypatch.chdir(mixture)
    run(
        Class3DParams(
            ios="ext/optimisation_set.star", ref=("mix.mrc",), K=4, iter=8, skip_align=True,
            strict_highres_exp=60.0, particle_diameter=0.8 * BOX * PX, device="cpu",
            output_dir="K4",
        )
    )  # fmt: skip
    data = starfile.read("K4/run_it008_data.star")["particles"]
    table = pd.crosstab(data["rlnClassNumber"], data["subtomoSpecies"])
    impurity = table.min(axis=1) / table.sum(axis=1)
    assert float(impurity.max()) <= 0.05, table
