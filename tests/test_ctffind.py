"""``subtomo ctffind`` on a simulated tilt series (subtomo.simulate.detector): defocus against
the truth, the hand from the defocus gradient (the input's wrong hand is corrected), a dark
tilt and a blank tilt reported as without Thon rings, bad input refused before any work."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from subtomo.data import DEFOCUS_ESTIMATE
from subtomo.errors import InputError
from subtomo.io import read_star, write_star
from subtomo.jobs.ctffind import CtfFindParams, run
from subtomo.simulate.detector import DetectorParams, detector_series, write_detector_series


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """5 tilts (±60°, 30° steps) of 512² at 2 Å/px, hand -1 written as +1, the -60° tilt dark
    and the -30° tilt blank (constant)."""
    out = tmp_path_factory.mktemp("ctffind")
    series = detector_series(
        params=DetectorParams(thickness_nm=150.0, hand=-1, contrast=3.0, dark_tilts=(0,)),
        tilt_step=30.0, astigmatism_um=0.08, seed=2,
    )  # fmt: skip
    series.images[1] = 12.0  # -30°: a blank image
    write_detector_series([series], out, hand_written=1)
    # an earlier estimate kept by ctf-refine, which this estimate must replace
    path = out / "tilt_series/TS_01.star"
    blocks = read_star(path)
    blocks["TS_01"][DEFOCUS_ESTIMATE] = 12345.0
    write_star(path, blocks)
    return out


@pytest.fixture(scope="module")
def fitted(project: Path) -> dict:
    with contextlib.chdir(project):
        run(CtfFindParams(i="tomograms.star", box=256, thickness_max=400.0))
        blocks = read_star("CtfFind/job001/tilt_series_ctf.star")
        tilts = read_star("CtfFind/job001/tilt_series/TS_01.star")["TS_01"]
        truth = read_star("detector_truth.star")["tilts"]
    merged = tilts.merge(truth, on="rlnTomoNominalStageTiltAngle", suffixes=("", "_true"))
    return {"global": blocks["global"], "tilts": merged}


def test_defocus_hand_and_outputs(project: Path, fitted: dict) -> None:
    t = fitted["tilts"]
    ok = t["rlnCtfMaxResolution"] < 999
    err = 0.5 * (t.rlnDefocusU + t.rlnDefocusV - t.rlnDefocusU_true - t.rlnDefocusV_true)
    angle = t["rlnTomoNominalStageTiltAngle"]
    assert abs(float(err[angle == 0].iloc[0])) <= 100
    assert (err[ok & (angle.abs() >= 30)].abs() <= 300).all(), err
    assert (t.loc[ok, "rlnDefocusU"] >= t.loc[ok, "rlnDefocusV"]).all()
    assert DEFOCUS_ESTIMATE not in t.columns  # the input's earlier estimate is dropped
    # the input said +1; the defocus gradient says -1 and the job writes it
    g = fitted["global"].iloc[0]
    assert int(g["rlnTomoHand"]) == -1 and g["subtomoHandFit"] < 0
    assert 50 <= g["subtomoSampleThicknessNm"] <= 300
    # diagnostics written and named as RELION does
    job = project / "CtfFind/job001"
    for name in ("power_spectra_fits.star", "report.html", "TS_01_defocus.png", "TS_01_hand.png",
                 "TS_01_spectra.png", "RELION_JOB_EXIT_SUCCESS"):  # fmt: skip
        assert (job / name).exists(), name
    image = t.loc[ok, "rlnCtfImage"].iloc[0]
    assert image.endswith(".ctf:mrc") and (project / image.removesuffix(":mrc")).exists()


def test_dark_and_blank_tilts_are_reported(project: Path, fitted: dict) -> None:
    t = fitted["tilts"]
    bad = t.loc[t["rlnCtfMaxResolution"] >= 999, "rlnTomoNominalStageTiltAngle"]
    assert sorted(bad) == [-60, -30]
    assert (t.loc[t["rlnCtfMaxResolution"] >= 999, "rlnCtfFigureOfMerit"] == 0).all()
    report = (project / "CtfFind/job001/report.html").read_text()
    assert "tilts without Thon rings" in report and "TS_01_-030.0.mrc" in report


def test_missing_image_is_one_error_before_any_work(project: Path, tmp_path: Path) -> None:
    with contextlib.chdir(project):
        victim = Path("tilt_series/TS_01/TS_01_+030.0.mrc")
        moved = tmp_path / victim.name
        victim.rename(moved)
        try:
            with pytest.raises(InputError, match=r"TS_01_\+030\.0\.mrc"):
                run(CtfFindParams(i="tomograms.star", box=256, output_dir="CtfFind/job009"))
        finally:
            moved.rename(victim)
        assert not Path("CtfFind/job009").exists()
        with pytest.raises(InputError, match="smaller than --Box 1024"):
            run(CtfFindParams(i="tomograms.star", box=1024, output_dir="CtfFind/job009"))
        assert not Path("CtfFind/job009").exists()


def test_flat_spectrum_has_no_fit() -> None:
    """White noise alone: no Thon rings, no fit (not a defocus made up from noise)."""
    from subtomo.tilt.ctffind import CtfSearch, estimate_series

    noise = torch.poisson(
        torch.full((1, 512, 512), 12.0), generator=torch.Generator().manual_seed(1)
    )
    fit = estimate_series(lambda f: noise[f], torch.eye(3)[None], (300.0, 2.7, 0.07), 2.0,
                          CtfSearch(box=256))  # fmt: skip
    assert fit.fits == [None]
