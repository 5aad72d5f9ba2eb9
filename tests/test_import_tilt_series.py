"""``subtomo import``: the real SerialEM mdocs import with RELION 5's import columns and round-
trip; tilt order and pre-exposure come from acquisition time; bad input is one error line
naming the file and leaves no job directory."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from subtomo.cli import main as cli
from subtomo.data import TomogramSet
from subtomo.errors import InputError
from subtomo.io import read_mdoc, read_star, write_mdoc, write_mrc
from subtomo.io.movies import write_movie
from subtomo.jobs.importtomo import ImportTomoParams, base_name, run

IMPORT_TILT_COLUMNS = [
    "rlnMicrographMovieName",
    "rlnTomoTiltMovieFrameCount",
    "rlnTomoNominalStageTiltAngle",
    "rlnTomoNominalTiltAxisAngle",
    "rlnMicrographPreExposure",
    "rlnTomoNominalDefocus",
]
IMPORT_GLOBAL_COLUMNS = [
    "rlnTomoName",
    "rlnTomoTiltSeriesStarFile",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnMicrographOriginalPixelSize",
    "rlnTomoHand",
]


def _movies_for(mdoc: Path, folder: Path, pixel_size: float, frames: int | None = None) -> None:
    """Tiny movies (8 x 8 px) named by the mdoc's SubFramePaths, NumSubFrames frames each."""
    m = read_mdoc(mdoc)
    counts = m.table["NumSubFrames"].astype(int).tolist() if frames is None else None
    for i, sub in enumerate(m.sub_frame_paths):
        n = frames if counts is None else counts[i]
        name = sub.replace("\\", "/").rsplit("/", 1)[-1]
        write_movie(folder / name, np.ones((n, 8, 8), np.float32), pixel_size)


def test_base_name_drops_every_suffix():
    assert base_name("TS_01.mrc.mdoc") == "TS_01"
    assert base_name(r"D:\DATA\frames\TS_01_003_-6.0.mrc") == "TS_01_003_-6"


def test_real_serialem_mdoc_imports_and_round_trips(shared_data):
    """The 41-tilt EMBL mdoc (Binning 4, PixelSpacing 5.4 -> 1.35 Å movies, 8 frames): RELION's
    import columns in RELION's order, rows in DateTime order, pre-exposure d·i, defocus in
    µm with SerialEM's sign; the written set reads back with the same table."""
    Path("frames").mkdir()
    shutil.copy(shared_data / "formats/mdoc/tilt_series.mdoc", "TS_01.mdoc")
    _movies_for(Path("TS_01.mdoc"), Path("frames"), 1.35)
    outputs = run(
        ImportTomoParams(movie_files="frames/*.mrc", mdoc_files="*.mdoc", dose_per_tilt_image=3)
    )
    assert outputs == {
        "Import/job001/tilt_series.star": "TomogramGroupMetadata.star.relion.tomo.import"
    }
    blocks = read_star("Import/job001/tilt_series.star")
    assert list(blocks["global"].columns) == IMPORT_GLOBAL_COLUMNS
    assert Path("Import/job001/tilt_scheme.png").is_file()
    assert blocks["global"]["rlnMicrographOriginalPixelSize"].iloc[0] == pytest.approx(1.35)
    assert blocks["global"]["rlnTomoHand"].iloc[0] == -1
    tilts = TomogramSet.read("Import/job001/tilt_series.star")["TS_01"].tilts
    assert list(tilts.columns) == IMPORT_TILT_COLUMNS
    m = read_mdoc("TS_01.mdoc")
    order = m.acquisition_order
    np.testing.assert_allclose(tilts["rlnTomoNominalStageTiltAngle"], m.tilt_angles_deg[order])
    np.testing.assert_allclose(tilts["rlnMicrographPreExposure"], 3.0 * np.arange(41))
    assert (tilts["rlnTomoNominalDefocus"] == -4.0).all()
    assert tilts["rlnMicrographMovieName"].iloc[1] == "frames/TS_01_001_3.0.mrc"
    assert (tilts["rlnTomoTiltMovieFrameCount"] == 8).all()
    # round trip: the per-tilt file rewritten by our STAR writer reads back the same
    again = TomogramSet.read("Import/job001/tilt_series.star")
    again.write("copy.star", "copy_tilt_series")
    back = TomogramSet.read("copy.star")["TS_01"].tilts
    assert back.equals(tilts)


def test_real_frame_set_mdoc_with_tiff_movie(shared_data):
    """The real frame-set mdoc (one [FrameSet] of a 12-frame TIFF movie at 32.984°, Binning
    0.5): imported with --angpix, as a one-tilt series."""
    Path("frames").mkdir()
    shutil.copy(shared_data / "formats/mdoc/frame_set_single.mdoc", "lamella.mdoc")
    _movies_for(Path("lamella.mdoc"), Path("frames"), 0)
    run(ImportTomoParams(movie_files="frames/*.tif", mdoc_files="*.mdoc", angpix=1.2827))
    tilts = TomogramSet.read("Import/job001/tilt_series.star")["lamella"].tilts
    assert len(tilts) == 1
    assert tilts["rlnTomoNominalStageTiltAngle"].iloc[0] == pytest.approx(32.984)
    assert tilts["rlnTomoTiltMovieFrameCount"].iloc[0] == 12
    assert tilts["rlnTomoNominalDefocus"].iloc[0] == pytest.approx(-4.5)


def _dose_symmetric_project(n_frames: int = 3) -> list[float]:
    """A dose-symmetric series whose stack (ZValue) order is by angle, not by time."""
    angles = [-6.0, -3.0, 0.0, 3.0, 6.0]
    acquired = [3, 2, 0, 1, 4]  # time rank of each ZValue: 0, +3, -3, -6, +6
    start = datetime(2025, 3, 1, 10, 0, 0)
    Path("frames").mkdir()
    names = [f"ts_{a:.1f}.mrc" for a in angles]
    for name in names:
        write_movie(Path("frames") / name, np.ones((n_frames, 8, 8), np.float32), 2.0)
    write_mdoc(
        "ts.mdoc", angles, 2.5, 2.0, 300, sub_frame_paths=names,
        date_times=[start + timedelta(seconds=60 * r) for r in acquired],
        frames_per_tilt=n_frames,
    )  # fmt: skip
    return angles


def test_tilt_order_and_pre_exposure_from_acquisition_time():
    """Rows come in DateTime order and each tilt's pre-exposure is the dose before it in
    time, for all three dose sources."""
    _dose_symmetric_project()
    expected_angles = [0.0, 3.0, -3.0, -6.0, 6.0]
    for dose, job in (({"dose_per_tilt_image": 2.0}, 1), ({"dose_per_movie_frame": 0.5}, 2)):
        run(ImportTomoParams(movie_files="frames/*.mrc", mdoc_files="*.mdoc", **dose))
        tilts = TomogramSet.read(f"Import/job00{job}/tilt_series.star")["ts"].tilts
        np.testing.assert_allclose(tilts["rlnTomoNominalStageTiltAngle"], expected_angles)
        step = 1.5 if job == 2 else 2.0  # 3 frames x 0.5 e/Å², or 2 e/Å² per tilt
        np.testing.assert_allclose(tilts["rlnMicrographPreExposure"], step * np.arange(5))
    run(ImportTomoParams(movie_files="frames/*.mrc", mdoc_files="*.mdoc"))  # mdoc doses
    tilts = TomogramSet.read("Import/job003/tilt_series.star")["ts"].tilts
    np.testing.assert_allclose(tilts["rlnMicrographPreExposure"], [0, 2.5, 5, 7.5, 10])


def _import_error(capsys, *extra: str) -> str:
    argv = ["import", "--movies", "frames/*.mrc", "--mdocs", "*.mdoc", *extra]
    assert cli.run_cli(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not Path("Import").exists()  # checked before the job directory is made
    return lines[0]


def test_bad_input_is_one_line_naming_the_file(capsys):
    """A missing movie, a wrong frame count, a pixel size that disagrees with the mdoc, a
    movie the mdoc does not list and a truncated movie."""
    _dose_symmetric_project()
    Path("frames/ts_3.0.mrc").rename("ts_3.0.mrc")
    message = _import_error(capsys)
    assert "ts.mdoc" in message and "ts_3" in message
    write_movie("frames/ts_3.0.mrc", np.ones((4, 8, 8), np.float32), 2.0)
    message = _import_error(capsys)
    assert "frames/ts_3.0.mrc" in message and "NumSubFrames = 3" in message
    write_movie("frames/ts_3.0.mrc", np.ones((3, 8, 8), np.float32), 2.0)
    with mrcfile.open("frames/ts_-6.0.mrc", "r+") as mrc:
        mrc.voxel_size = 3.1
    message = _import_error(capsys)
    assert "ts.mdoc" in message and "3.1" in message  # mdoc 2 Å vs the movie's 3.1 Å
    with mrcfile.open("frames/ts_-6.0.mrc", "r+") as mrc:
        mrc.voxel_size = 2.0
    write_movie("frames/ts_9.0.mrc", np.ones((3, 8, 8), np.float32), 2.0)
    assert "ts_9.0" in _import_error(capsys)  # a movie of the series the mdoc does not list
    Path("frames/ts_9.0.mrc").unlink()
    data = Path("frames/ts_6.0.mrc").read_bytes()
    Path("frames/ts_6.0.mrc").write_bytes(data[:-50])
    message = _import_error(capsys)
    assert "truncated" in message and "frames/ts_6.0.mrc" in message


def test_bad_pattern_and_options(capsys):
    assert "no files match --movie_files" in _import_error(capsys)
    _dose_symmetric_project()
    assert "not both" in _import_error(
        capsys, "--dose_per_tilt_image", "1", "--dose_per_movie_frame", "1"
    )
    with pytest.raises(InputError):
        run(ImportTomoParams(movie_files="frames/*.mrc", mdoc_files="none*.mdoc"))


def test_motion_corrected_tilt_images():
    """--images_are_motion_corrected: single tilt images, rlnMicrographName and
    rlnTomoTiltSeriesPixelSize, no movie columns (RELION's import of corrected images)."""
    _dose_symmetric_project()
    for movie in Path("frames").glob("*.mrc"):
        write_mrc(movie, np.ones((8, 8), np.float32), 2.0)
    run(
        ImportTomoParams(
            movie_files="frames/*.mrc", mdoc_files="*.mdoc", images_are_motion_corrected=True
        )
    )
    tomos = TomogramSet.read("Import/job001/tilt_series.star")
    assert tomos.global_table["rlnTomoTiltSeriesPixelSize"].iloc[0] == pytest.approx(2.0)
    tilts = tomos["ts"].tilts
    assert "rlnMicrographMovieName" not in tilts.columns
    assert tilts["rlnMicrographName"].tolist()[:2] == ["frames/ts_0.0.mrc", "frames/ts_3.0.mrc"]
