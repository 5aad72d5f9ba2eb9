"""EER movies (subtomo.io.eer): a small EER written here reads back event for event through
tifffile, as RELION renders it (--eer_grouping EER frames per frame, --eer_upsampling 2 on
the finer grid), and motioncorr aligns it; an EER without a grouping, a truncated EER and a
gain of the wrong shape are one error line naming the file, with no job directory and the
inputs untouched."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from subtomo.cli import main as cli
from subtomo.errors import InputError
from subtomo.io import read_star, write_mdoc, write_mrc
from subtomo.io.eer import write_eer
from subtomo.io.movies import read_movie_frames, read_movie_header, render_eer
from subtomo.simulate.movies import drift_trajectory, simulate_movie, specimen_texture

PIXEL_SIZE = 1.35  # Å


@pytest.fixture(autouse=True)
def _one_thread():
    """OpenMP threads spin-wait on shared cores unless OMP_WAIT_POLICY=PASSIVE (as the CLI
    sets it): the job ran 5x slower under pytest with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_eer_round_trip_grouping_and_upsampling() -> None:
    events = (np.random.default_rng(0).random((10, 24, 32)) < 0.3).astype(np.uint8)
    write_eer("m.eer", events, PIXEL_SIZE)
    with tifffile.TiffFile("m.eer") as tif:  # a valid EER for the field's reader
        assert tif.is_eer and tif.eer_metadata["numberOfFrames"] == 10
    header = read_movie_header("m.eer")
    assert (header.n_frames, header.shape, header.is_eer) == (10, (24, 32), True)
    rendered = render_eer(header, 3)  # 3 frames of 3 EER frames; the 10th is dropped
    assert (rendered.n_frames, rendered.shape) == (3, (24, 32))
    frames = torch.cat(list(read_movie_frames(rendered, 2))).numpy()
    np.testing.assert_array_equal(frames, events[:9].reshape(3, 3, 24, 32).sum(axis=1))
    fine = render_eer(header, 5, upsampling=2)
    frames = torch.cat(list(read_movie_frames(fine))).numpy()
    assert frames.shape == (2, 48, 64)
    np.testing.assert_array_equal(frames.reshape(2, 24, 2, 32, 2).sum(axis=(2, 4)),
                                  events.reshape(2, 5, 24, 32).sum(axis=1))  # fmt: skip
    for grouping, upsampling, message in ((0, 1, "without a fractionation.*--eer_grouping"),
                                          (11, 1, "more than its 10 EER frames"),
                                          (2, 3, "--eer_upsampling 3")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            render_eer(header, grouping, upsampling)
    data = Path("m.eer").read_bytes()
    Path("m.eer").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match=r"m\.eer"):
        read_movie_header("m.eer")


def _eer_project(n_eer: int = 40, size: int = 256) -> dict[str, np.ndarray]:
    """Two EER movies of ``n_eer`` EER frames (3 e/Å² in all, a drift, no gain pattern) with
    an mdoc and a flat gain; returns the true shifts per EER frame."""
    rng = np.random.default_rng(1)
    truth, names = {}, []
    for k in range(2):
        shifts = drift_trajectory(n_eer, 4.0, rng)
        movie = simulate_movie(specimen_texture((size, size), PIXEL_SIZE, rng),
                               pixel_size=PIXEL_SIZE, dose=3.0, n_frames=n_eer, shifts=shifts,
                               contrast=0.3, rng=rng)  # fmt: skip
        name = f"frames/ts_{k + 1:03d}_{3.0 * k:.1f}.eer"
        write_eer(name, movie.frames.clamp(max=1).numpy().astype(np.uint8), PIXEL_SIZE)
        truth[name] = shifts
        names.append(Path(name).name)
    write_mrc("gain.mrc", np.ones((size, size), np.float32), PIXEL_SIZE)
    start = datetime(2026, 1, 1, 9, 0, 0)
    write_mdoc("ts.mdoc", [0.0, 3.0], 3.0, PIXEL_SIZE, 300, sub_frame_paths=names,
               date_times=[start, start + timedelta(minutes=1)],
               frames_per_tilt=n_eer)  # fmt: skip
    argv = ["import", "--movies", "frames/*.eer", "--mdocs", "ts.mdoc", "--angpix",
            str(PIXEL_SIZE)]  # fmt: skip
    assert cli.run_cli(argv) == 0
    return truth


def _digests() -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in Path("frames").iterdir()}


def _error(capsys, *argv: str) -> str:
    assert cli.run_cli(["motioncorr", "--i", "Import/job001/tilt_series.star", *argv]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not Path("MotionCorr").exists()
    return lines[0]


def test_motioncorr_renders_and_aligns_eer(capsys) -> None:
    truth = _eer_project()
    capsys.readouterr()  # the import's log
    before = _digests()
    message = _error(capsys)
    assert "frames/ts_001_0.0.eer" in message and "--eer_grouping" in message
    write_mrc("small_gain.mrc", np.ones((128, 128), np.float32), PIXEL_SIZE)
    assert "small_gain.mrc" in _error(capsys, "--eer_grouping", "4", "--gain_ref",
                                      "small_gain.mrc")  # fmt: skip
    assert _digests() == before  # inputs untouched
    argv = ["motioncorr", "--i", "Import/job001/tilt_series.star", "--eer_grouping", "4",
            "--gain_ref", "gain.mrc"]  # fmt: skip
    assert cli.run_cli(argv) == 0
    for movie, shifts in truth.items():
        blocks = read_star("MotionCorr/job002/" + movie.removesuffix(".eer").replace(".", "_")
                           + ".star")  # fmt: skip
        general, table = blocks["general"], blocks["global_shift"]
        assert (general["rlnEERGrouping"], general["rlnEERUpsampling"]) == (4, 1)
        assert general["rlnImageSizeZ"] == 10 and len(table) == 10
        grouped = shifts.reshape(10, 4, 2).mean(axis=1)  # each frame: its EER frames' mean
        grouped -= grouped[0]
        found = -table[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
        assert np.sqrt(((found - grouped) ** 2).sum(axis=1).mean()) < 0.5
