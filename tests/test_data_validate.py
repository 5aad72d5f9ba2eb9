"""Validation: each kind of bad input gives one InputError naming file, block, column and
row and what was expected (never a numpy/pandas traceback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.data import ParticleSet, TomogramSet, validate_particles
from subtomo.errors import InputError
from subtomo.io import write_mrc, write_star

N_TILTS = 4


def _project(folder: Path, n_images: int = 3, particle_px: float = 2.0) -> Path:
    """A valid RELION 5 project: one tomogram (4 tilts), two 2D-stack particles whose
    stacks hold sum(visible) = 3 images (unless ``n_images`` says otherwise)."""
    glob = pd.DataFrame(
        [
            {
                "rlnTomoName": "TS_01",
                "rlnVoltage": 300.0,
                "rlnSphericalAberration": 2.7,
                "rlnAmplitudeContrast": 0.1,
                "rlnTomoHand": -1.0,
                "rlnTomoTiltSeriesPixelSize": 2.0,
                "rlnTomoSizeX": 64,
                "rlnTomoSizeY": 64,
                "rlnTomoSizeZ": 32,
            }
        ]
    )
    tilts = pd.DataFrame(
        {
            "rlnMicrographPreExposure": [0.0, 3.0, 6.0, 9.0],
            "rlnTomoYTilt": [0.0, 3.0, -3.0, 6.0],
            "rlnTomoZRot": 0.0,
            "rlnTomoXShiftAngst": 0.0,
            "rlnTomoYShiftAngst": 0.0,
            "rlnDefocusU": 20000.0,
            "rlnDefocusV": 20000.0,
            "rlnDefocusAngle": 0.0,
        }
    )
    TomogramSet.from_tables(glob, {"TS_01": tilts}).write(folder / "tomograms.star")
    for k in (1, 2):
        write_mrc(folder / f"Subtomograms/TS_01/{k}_stack2d.mrcs", torch.ones(n_images, 8, 8), 4.0)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnTomoTiltSeriesPixelSize": [particle_px],
            "rlnImagePixelSize": [4.0],
            "rlnImageSize": [8],
        }
    )
    table = pd.DataFrame(
        {
            "rlnTomoName": ["TS_01", "TS_01"],
            "rlnCenteredCoordinateXAngst": [0.0, 10.0],
            "rlnCenteredCoordinateYAngst": [0.0, -4.0],
            "rlnCenteredCoordinateZAngst": [0.0, 2.0],
            "rlnOpticsGroup": [1, 1],
            "rlnImageName": [f"Subtomograms/TS_01/{k}_stack2d.mrcs" for k in (1, 2)],
            "rlnTomoVisibleFrames": ["[1,1,0,1]", "[0,1,1,1]"],
        }
    )
    general = {"rlnTomoSubTomosAre2DStacks": 1}
    ParticleSet.from_tables(table, optics, general).write(folder / "particles.star")
    return folder


def _load(folder: Path) -> tuple[ParticleSet, TomogramSet]:
    return ParticleSet.read(folder / "particles.star"), TomogramSet.read(folder / "tomograms.star")


def _edit_particles(folder: Path, column: str, row: int, value) -> None:
    particles = ParticleSet.read(folder / "particles.star")
    particles.particles[column] = particles.particles[column].astype(object)
    particles.particles.loc[row, column] = value
    particles.write(folder / "particles.star")


def test_valid_project_passes(tmp_path, monkeypatch):
    """The baseline project is valid, so each failure below is caused by its one edit."""
    monkeypatch.chdir(tmp_path)
    particles, tomos = _load(_project(tmp_path))
    validate_particles(particles, tomos)
    visible = particles.visible_frames({"TS_01": N_TILTS})
    np.testing.assert_array_equal(visible[1], [False, True, True, True])


def test_missing_required_column(tmp_path):
    """A particle file without rlnTomoName is rejected at read, naming the column; so is a
    tilt table without rlnMicrographPreExposure when the dose is needed."""
    _project(tmp_path)
    table = ParticleSet.read(tmp_path / "particles.star").particles.drop(columns="rlnTomoName")
    write_star(tmp_path / "bad.star", {"particles": table})
    with pytest.raises(InputError, match=r"bad\.star, block data_particles, column rlnTomoName"):
        ParticleSet.read(tmp_path / "bad.star")
    tomos = TomogramSet.read(tmp_path / "tomograms.star")
    del tomos["TS_01"].tilts["rlnMicrographPreExposure"]
    with pytest.raises(
        InputError,
        match=r"block data_TS_01, column rlnMicrographPreExposure: missing required column",
    ):
        _ = tomos["TS_01"].pre_exposure


def test_non_numeric_value(tmp_path):
    """'abc' as a coordinate names its row, not a pandas conversion error."""
    _project(tmp_path)
    _edit_particles(tmp_path, "rlnCenteredCoordinateYAngst", 1, "abc")
    particles, _ = _load(tmp_path)
    with pytest.raises(
        InputError,
        match=r"particles\.star, block data_particles, column rlnCenteredCoordinateYAngst, "
        r"row 2: expected a finite number, found 'abc'",
    ):
        particles.centered_coordinates_angst()


def test_nan_and_inf(tmp_path):
    """NaN and inf are not finite numbers; the message names the column and row."""
    _project(tmp_path)
    _edit_particles(tmp_path, "rlnCenteredCoordinateZAngst", 0, float("inf"))
    with pytest.raises(InputError, match=r"column rlnCenteredCoordinateZAngst, row 1: .*inf"):
        _load(tmp_path)[0].centered_coordinates_angst()
    tomos = TomogramSet.read(tmp_path / "tomograms.star")
    tomos["TS_01"].tilts.loc[2, "rlnDefocusU"] = np.nan
    with pytest.raises(
        InputError, match=r"TS_01\.star, block data_TS_01, column rlnDefocusU, row 3"
    ):
        _ = tomos["TS_01"].defocus_u


def test_unknown_tomogram(tmp_path, monkeypatch):
    """A particle of a tomogram that tomograms.star does not list."""
    monkeypatch.chdir(tmp_path)
    _project(tmp_path)
    _edit_particles(tmp_path, "rlnTomoName", 1, "TS_99")
    with pytest.raises(
        InputError,
        match=r"particles\.star, block data_particles, column rlnTomoName, row 2: tomogram "
        r"'TS_99' is not in .*tomograms\.star",
    ):
        validate_particles(*_load(tmp_path))


def test_missing_per_tilt_file(tmp_path, monkeypatch):
    """tomograms.star names a per-tilt STAR file that is gone."""
    monkeypatch.chdir(tmp_path)
    _project(tmp_path)
    (tmp_path / "tilt_series/TS_01.star").unlink()
    with pytest.raises(
        InputError,
        match=r"tomograms\.star, block data_global, column rlnTomoTiltSeriesStarFile, row 1: "
        r"per-tilt STAR file 'tilt_series/TS_01\.star' not found",
    ):
        validate_particles(*_load(tmp_path))


def test_missing_per_tilt_block(tmp_path, monkeypatch):
    """The per-tilt file exists but lacks the block data_<rlnTomoName>."""
    monkeypatch.chdir(tmp_path)
    _project(tmp_path)
    text = (tmp_path / "tilt_series/TS_01.star").read_text().replace("data_TS_01", "data_TS_02")
    (tmp_path / "tilt_series/TS_01.star").write_text(text)
    with pytest.raises(InputError, match=r"TS_01\.star: missing block data_TS_01"):
        validate_particles(*_load(tmp_path))


def test_visible_frames_wrong_length(tmp_path, monkeypatch):
    """rlnTomoVisibleFrames must have one entry per tilt of the tomogram (4 here)."""
    monkeypatch.chdir(tmp_path)
    _project(tmp_path)
    _edit_particles(tmp_path, "rlnTomoVisibleFrames", 1, "[1,1,1]")
    with pytest.raises(
        InputError,
        match=r"column rlnTomoVisibleFrames, row 2: 3 entries, expected 4 \(one per tilt of TS_01",
    ):
        validate_particles(*_load(tmp_path))


def test_stack_image_count(tmp_path, monkeypatch):
    """A 2D stack must hold sum(visible) images (RELION) or one per tilt (WarpTools)."""
    monkeypatch.chdir(tmp_path)
    _project(tmp_path, n_images=N_TILTS)
    validate_particles(*_load(tmp_path))  # Warp layout: all 4 tilts stored
    _project(tmp_path, n_images=2)
    with pytest.raises(
        InputError,
        match=r"column rlnImageName, row 1: .*1_stack2d\.mrcs holds 2 images; expected "
        r"sum\(rlnTomoVisibleFrames\) = 3, or one per tilt \(4\)",
    ):
        validate_particles(*_load(tmp_path))


def test_pixel_size_mismatch(tmp_path, monkeypatch):
    """Optics rlnTomoTiltSeriesPixelSize 2.002 vs 2.0 in tomograms.star: > 1e-3 apart."""
    monkeypatch.chdir(tmp_path)
    _project(tmp_path, particle_px=2.0009)
    validate_particles(*_load(tmp_path))  # within tolerance
    _project(tmp_path, particle_px=2.002)
    with pytest.raises(
        InputError,
        match=r"block data_optics, column rlnTomoTiltSeriesPixelSize, row 1: 2\.002 Å differs",
    ):
        validate_particles(*_load(tmp_path))


@pytest.mark.parametrize("damage", ["missing", "truncated", "not_mrc"])
def test_bad_image_files(tmp_path, monkeypatch, damage):
    """Missing, truncated and non-MRC stacks are named with the particle row."""
    monkeypatch.chdir(tmp_path)
    _project(tmp_path)
    stack = tmp_path / "Subtomograms/TS_01/2_stack2d.mrcs"
    if damage == "missing":
        stack.unlink()
        expected = "file not found"
    elif damage == "truncated":
        stack.write_bytes(stack.read_bytes()[:-50])
        expected = "truncated MRC file"
    else:
        stack.write_text("hello, not an MRC")
        expected = "not a readable MRC file"
    with pytest.raises(InputError, match=rf"column rlnImageName, row 2: .*{expected}"):
        validate_particles(*_load(tmp_path))


def test_crlf_particles(tmp_path, monkeypatch):
    """A CR+LF particles.star validates like the LF original."""
    monkeypatch.chdir(tmp_path)
    _project(tmp_path)
    path = tmp_path / "particles.star"
    path.write_bytes(path.read_text().replace("\n", "\r\n").encode())
    particles, tomos = _load(tmp_path)
    validate_particles(particles, tomos)
    assert particles.particles["rlnTomoParticleName"].tolist() == ["TS_01/1", "TS_01/2"]
