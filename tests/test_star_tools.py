"""`subtomo select` and `subtomo star` tools on constructed cases and against RELION."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from typer.testing import CliRunner

from subtomo.cli.main import app
from subtomo.data import ParticleSet, TomogramSet
from subtomo.geometry import euler_to_matrix
from subtomo.jobs import star_tools
from subtomo.jobs.select import SelectParams, run

OPTICS = pd.DataFrame(
    {
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.1],
        "rlnTomoTiltSeriesPixelSize": [1.25],
        "rlnImagePixelSize": [2.5],
        "rlnImageSize": [64],
    }
)


def _particles(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = {"rlnTomoName": ["TS_1"] * n, "rlnOpticsGroup": [1] * n}
    for a in "XYZ":
        table[f"rlnCenteredCoordinate{a}Angst"] = rng.normal(0, 300, n)
        table[f"rlnOrigin{a}Angst"] = rng.normal(0, 5, n)
    for name, (lo, hi) in {"Rot": (-180, 180), "Tilt": (0, 180), "Psi": (-180, 180)}.items():
        table[f"rlnAngle{name}"] = rng.uniform(lo, hi, n)
    return pd.DataFrame(table)


def test_select_classes_thresholds_duplicates_with_rotated_origins(tmp_path):
    """Duplicates are judged on true centres C - A_sub o: two particles with equal C and
    opposite-looking origins in different subtomogram frames are the same point (removed),
    which RELION's shortcut (C - o) would keep."""
    table = _particles(6)
    table["rlnClassNumber"] = [1, 1, 2, 1, 3, 1]
    table["rlnMaxValueProbDistribution"] = [0.9, 0.5, 0.9, 0.9, 0.9, 0.95]
    for name in ("Rot", "Tilt", "Psi"):
        table[f"rlnTomoSubtomogram{name}"] = 0.0
    # Particle 3 and 5: same true centre. A_sub of 5 is 180 deg about z; its origin is the
    # origin of 3 rotated back, so A_sub5 o5 == A_sub3 o3 while o5 != o3.
    table.loc[5, [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]] = table.loc[
        3, [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
    ].to_numpy()
    table.loc[5, "rlnTomoSubtomogramRot"] = 180.0
    o3 = table.loc[3, [f"rlnOrigin{a}Angst" for a in "XYZ"]].to_numpy(dtype=float)
    a5 = euler_to_matrix(180.0, 0.0, 0.0).numpy()
    table.loc[5, [f"rlnOrigin{a}Angst" for a in "XYZ"]] = a5.T @ o3
    ParticleSet.from_tables(table, OPTICS).write(tmp_path / "run_it025_data.star")
    out = run(
        SelectParams(
            input=tmp_path / "run_it025_optimiser.star",
            classes=(1,),
            min_pmax=0.8,
            remove_duplicates_angst=1.0,
            output_dir=tmp_path / "Select" / "job001",
            project_dir=tmp_path,
        )
    )
    kept = ParticleSet.read(out)
    # class 1 -> rows 0,1,3,5; Pmax >= 0.8 -> 0,3,5; 3 duplicates 5 -> 0,5 remain.
    assert kept.particles["rlnTomoParticleName"].tolist() == ["TS_1/1", "TS_1/6"]
    removed = ParticleSet.read(out.parent / "particles_removed.star")
    assert removed.particles["rlnTomoParticleName"].tolist() == ["TS_1/4"]


@pytest.mark.relion
def test_recentre_matches_relion_star_handler(tmp_path):
    """Same input, same new origins as relion_star_handler --center (RELION 3.1)."""
    if shutil.which("relion_star_handler") is None:
        pytest.skip("relion_star_handler not installed")
    table = _particles(8, seed=2)
    starfile.write({"optics": OPTICS, "particles": table}, tmp_path / "in.star")
    subprocess.run(
        ["relion_star_handler", "--i", "in.star", "--o", "relion.star", "--center",
         "--center_X", "3", "--center_Y", "-2", "--center_Z", "2.75"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    relion = starfile.read(tmp_path / "relion.star")["particles"]
    ours = star_tools.recentre(ParticleSet.read(tmp_path / "in.star"), (3, -2, 2.75))
    for a in "XYZ":
        column = f"rlnOrigin{a}Angst"
        np.testing.assert_allclose(ours.particles[column], relion[column], atol=1e-4)
        assert not np.allclose(ours.particles[column], table[column], atol=1e-3)


def test_apply_orientations_keeps_every_tilt_position(tmp_path):
    """Folding angles and offsets changes no particle's full pose or true centre."""
    table = _particles(5, seed=3)
    for name in ("Rot", "Tilt", "Psi"):
        table[f"rlnTomoSubtomogram{name}"] = np.random.default_rng(4).uniform(-90, 90, 5)
    before = ParticleSet.from_tables(table, OPTICS)
    after = star_tools.apply_orientations(before)
    full_before = before.subtomogram_matrices() @ before.particle_matrices()
    full_after = after.subtomogram_matrices() @ after.particle_matrices()
    np.testing.assert_allclose(full_after.numpy(), full_before.numpy(), atol=1e-9)
    centre_before = (
        before.centered_coordinates_angst()
        - (before.subtomogram_matrices() @ before.origins_angst()[..., None])[..., 0]
    )
    np.testing.assert_allclose(after.centered_coordinates_angst(), centre_before, atol=1e-9)
    assert torch.all(after.origins_angst() == 0)


def test_convert_real_warp_coordinates_and_print(shared_data, tmp_path):
    """WarpTools' legacy pixel coordinates become centred Å: C = (p - size/2) px."""
    folder = shared_data / "real" / "warptools_ribosome_subtilts"
    stem = "warptools_test_4-tomos_10-ptcls_box-32_angpix-12"
    tomos = TomogramSet.read(folder / f"{stem}_tomograms.star")
    particles = ParticleSet.read(folder / f"{stem}.star", tomos)
    out = star_tools.convert_to_centred(particles, tomos)
    first = particles.particles.iloc[0]
    expected_x = (first["rlnCoordinateX"] - 4400 / 2) * 1.667
    assert out.particles["rlnCenteredCoordinateXAngst"].iloc[0] == pytest.approx(expected_x)
    assert "rlnCoordinateX" not in out.particles.columns
    result = CliRunner().invoke(
        app, ["star", "print", str(folder / f"{stem}.star"), "particles", "rlnTomoName"]
    )
    assert result.exit_code == 0 and "Unt_083.tomostar" in result.output
    bad = CliRunner().invoke(app, ["star", "print", str(folder / f"{stem}.star"), "nope"])
    assert bad.exit_code != 0


def test_console_command_exits_cleanly_with_all_output(shared_data):
    """The ``subtomo`` entry point skips the interpreter's teardown after success: the exit
    status must still be 0 (1 for bad input) and everything printed must arrive."""
    folder = shared_data / "real" / "warptools_ribosome_subtilts"
    star = folder / "warptools_test_4-tomos_10-ptcls_box-32_angpix-12.star"
    command = [sys.executable, "-c", "from subtomo.cli.main import main; main()", "star", "print"]
    done = subprocess.run([*command, str(star), "particles", "rlnTomoName"], capture_output=True)
    assert done.returncode == 0
    printed = done.stdout.decode()
    assert printed.count(".tomostar") == len(starfile.read(star)["particles"])
    assert printed.rstrip().endswith("┘")  # the table's last line arrived
    bad = subprocess.run([*command, str(star), "nope"], capture_output=True)
    assert bad.returncode == 1 and b"nope" in bad.stderr
