"""``subtomo erase-xrays`` against injected defects (subtomo.simulate.detector) and
``subtomo exclude-tilts`` rules: each dropped tilt listed with its reason, RELION's layout."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from subtomo.errors import InputError
from subtomo.io import read_mrc, read_star, write_star
from subtomo.jobs.erase_xrays import EraseXraysParams
from subtomo.jobs.erase_xrays import run as erase
from subtomo.jobs.exclude_tilts import ExcludeTiltsParams
from subtomo.jobs.exclude_tilts import run as exclude
from subtomo.simulate.detector import DetectorParams, detector_series, write_detector_series


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, object]:
    """5 tilts of 384² with 30 hot pixels and 15 X-ray streaks each; the -60° tilt dark
    (0.24 electrons per pixel: the Poisson tails must not pass for defects)."""
    out = tmp_path_factory.mktemp("erase")
    series = detector_series(
        params=DetectorParams(hot_pixels=30, xrays=15, dark_tilts=(0,)),
        image_size=(384, 384), tilt_step=30.0, seed=5,
    )  # fmt: skip
    write_detector_series([series], out)
    return out, series


def test_erase_finds_defects_and_leaves_clean_pixels(project) -> None:
    out, series = project
    with contextlib.chdir(out):
        erase(EraseXraysParams(i="tomograms.star"))
        tilts = read_star("EraseXrays/job001/tilt_series/TS_01.star")["TS_01"]
        images = torch.stack([read_mrc(p)[0] for p in tilts["rlnMicrographName"]])
        assert (out / "EraseXrays/job001/defects.star").exists()
    changed = images != series.images
    truth = series.defect_mask
    assert int((changed & ~truth).sum()) <= 1e-4 * int((~truth).sum())
    found = total = 0
    for f, row in series.defects.iterrows():
        del f
        # a defect is found when every one of its pixels was replaced
        t = int(row["tilt"])
        total += 1
        found += bool(changed[t, int(row["subtomoY"]), int(row["subtomoX"])])
    assert found >= 0.99 * total, (found, total)
    # erased pixels look like their surroundings: within 6 σ of the local counts
    assert float(images[~series.defect_mask].max()) < 100


def test_exclude_tilts_by_rule(project) -> None:
    out, _ = project
    with contextlib.chdir(out):
        star = "tilt_series/TS_01.star"
        table = read_star(star)["TS_01"]
        table["rlnCtfMaxResolution"] = [8.0, 999.0, 7.0, 12.0, 6.0]  # -60 .. +60
        write_star(star, {"TS_01": table})
        job = Path("ExcludeTiltImages/job002")
        exclude(ExcludeTiltsParams(i="tomograms.star", max_resolution=10.0, output_dir=str(job),
                                   exclude=("TS_01:60",)))  # fmt: skip

        kept = read_star(job / "tilt_series/TS_01.star")["TS_01"]
        dropped = read_star(job / "excluded_tilts.star")["excluded"]
        report = (job / "report.html").read_text()
        header = read_star(job / "selected_tilt_series.star")["global"]
        with pytest.raises(InputError, match="NAME:ANGLE"):
            exclude(ExcludeTiltsParams(i="tomograms.star", exclude=("60",)))
        with pytest.raises(InputError, match="no tilt series 'TS_09'"):
            exclude(ExcludeTiltsParams(i="tomograms.star", exclude=("TS_09:0",)))
    assert kept["rlnTomoNominalStageTiltAngle"].tolist() == [0.0]
    assert list(kept.columns) == list(table.columns)
    reasons = dict(zip(dropped["rlnTomoNominalStageTiltAngle"],
                       dropped["subtomoExclusionReason"], strict=True))  # fmt: skip
    assert reasons[-60.0].startswith("dark")
    assert reasons[-30.0] == "no Thon rings (CTF fit failed)"
    assert "12.0 Å worse than 10 Å" in reasons[30.0]
    assert reasons[60.0] == "listed by the user"
    assert "dropped tilts" in report and "listed by the user" in report
    assert header.columns[-1] == "rlnTomoTiltSeriesStarFile"


def test_dark_rule_for_counts_and_normalised_images() -> None:
    """Counts: a tilt with a fifth of the dose is dark by its mean; normalised (zero-mean)
    images: by their robust noise (hot pixels left a dark tilt's standard deviation high); a
    constant image is blank."""
    from subtomo.tilt.exclusion import by_intensity

    blank_or_dark = by_intensity(
        np.array([12.0, 12.1, 2.4, 11.9, 12.0]), np.array([3.5, 3.5, 1.5, 3.4, 0.0]),
        np.array([3.5, 3.5, 1.5, 3.4, 0.0]), np.zeros(5), 0.3,
    )  # fmt: skip
    assert list(blank_or_dark) == [2, 4] and blank_or_dark[2].startswith("dark: mean")
    normalised = by_intensity(
        np.array([0.1, -0.2, 0.0, 0.05]), np.array([30.0, 31, 9.0, 29]),
        np.array([30.0, 31, 0.6, 29]), np.array([-90.0, -95, -3, -88]), 0.3,
    )  # fmt: skip
    assert list(normalised) == [2] and normalised[2].startswith("dark: noise")
