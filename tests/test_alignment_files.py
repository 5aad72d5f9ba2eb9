"""IMOD and AreTomo alignment files (``subtomo import-alignment`` / ``export-alignment``):
real files load, import -> export -> import keeps the numbers, an IMOD and an AreTomo file
written for one simulated series give its true projection matrices (conventions §14), and
bad files are one-line errors naming the file with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.data import TomogramSet
from subtomo.errors import InputError
from subtomo.geometry import projection_matrices
from subtomo.io import read_star
from subtomo.io.alignment_files import (
    AlnFile,
    read_aln,
    read_angles,
    read_edf,
    read_imod_com,
    read_xf,
    write_aln,
    write_angles,
    write_xf,
)
from subtomo.jobs.export_alignment import ExportAlignmentParams
from subtomo.jobs.export_alignment import run as export_alignment
from subtomo.jobs.import_alignment import ImportAlignmentParams
from subtomo.jobs.import_alignment import run as import_alignment
from subtomo.tilt.external_alignment import (
    ALIGNMENT_COLUMNS,
    aretomo_to_relion,
    imod_to_relion,
    relion_to_aretomo,
    relion_to_imod,
)

PX = 2.0
IMAGE = (96, 80)
SIZE = (96, 80, 40)


def test_real_imod_files(shared_data: Path) -> None:
    imod = shared_data / "formats/imod"
    xf, tlt = read_xf(imod / "TS_001.xf"), read_angles(imod / "TS_001.tlt")
    offset = float(read_edf(imod / "TS_001.edf")["batchruntomo.a.align.AngleOffset"])
    columns = imod_to_relion(xf, tlt, 1.0, angle_offset=offset)
    # etomo's ImageRotationA (tilt axis, CCW from y) is 83.9°; tiltalign refined it to ~84.1°
    assert np.allclose(columns["rlnTomoZRot"], 84.1, atol=0.2)
    # without its AngleOffset the tilts are the stage tilts again
    assert np.abs(columns["rlnTomoYTilt"] - read_angles(imod / "TS_001.rawtlt")).max() < 0.5
    assert len(read_angles(imod / "TS_001.xtilt")) == len(xf) == 40
    second = imod / "cryoet-alignment_imod_1"
    assert len(read_xf(second / "tilt_1.xf")) == len(read_angles(second / "tilt_1.tlt")) == 59
    tilt_com = read_imod_com(second / "tilt.com")
    assert tilt_com["FULLIMAGE"] == ["3708", "3832"] and tilt_com["THICKNESS"] == ["2000"]
    assert read_imod_com(second / "newst.com")["BinByFactor"] == ["4"]


def test_real_aln_files(shared_data: Path) -> None:
    folder = shared_data / "formats/aretomo"
    aln = read_aln(folder / "global_and_local.aln")
    assert aln.rows.shape == (37, 10) and len(aln.dark_frames) == 14 and len(aln.local) == 592
    nominal = np.arange(-68.0, 34.0, 2.0)  # 51 tilts, RawSize 4096 4096 51
    kept, columns = aretomo_to_relion(aln, nominal, 1.0)
    assert list(kept) == list(range(14, 51))  # the 14 dark frames are the lowest tilts
    assert np.abs(columns["rlnTomoYTilt"] - aln.alpha_offset - nominal[kept]).max() < 0.02
    assert np.allclose(columns["rlnTomoZRot"], 84.4445)
    assert read_aln(folder / "example_v1_3_0.aln").rows.shape == (41, 10)  # no AlphaOffset line
    assert len(read_aln(folder / "cryoet-alignment_test.aln").dark_frames) == 4
    # the .xf AreTomo wrote beside global_no_local.aln: the same shifts, the opposite
    # rotation (conventions §14)
    pair = read_aln(folder / "global_no_local.aln")
    _, from_aln = aretomo_to_relion(pair, pair.column("TILT"), 1.0)
    from_xf = imod_to_relion(
        read_xf(folder / "global_no_local.xf"), read_angles(folder / "global_no_local.tlt"), 1.0
    )
    for c in ("rlnTomoXShiftAngst", "rlnTomoYShiftAngst", "rlnTomoYTilt"):
        assert np.abs(from_aln[c] - from_xf[c]).max() < 2e-3
    assert np.allclose(from_xf["rlnTomoZRot"], -from_aln["rlnTomoZRot"], atol=1e-4)


def test_file_round_trip(shared_data: Path, tmp_path: Path) -> None:
    imod = shared_data / "formats/imod"
    first = imod_to_relion(read_xf(imod / "TS_001.xf"), read_angles(imod / "TS_001.tlt"), 1.35)
    xf, tlt = relion_to_imod(first, 1.35)
    write_xf(tmp_path / "a.xf", xf)
    write_angles(tmp_path / "a.tlt", tlt)
    again = imod_to_relion(read_xf(tmp_path / "a.xf"), read_angles(tmp_path / "a.tlt"), 1.35)
    for c in ALIGNMENT_COLUMNS:
        assert np.abs(again[c] - first[c]).max() < 2e-3, c
    aln = read_aln(shared_data / "formats/aretomo/example_v1_3_0.aln")
    nominal = aln.column("TILT")
    _, first = aretomo_to_relion(aln, nominal, 1.35)
    write_aln(tmp_path / "a.aln", relion_to_aretomo(first, 1.35, (5760, 4092)))
    _, again = aretomo_to_relion(read_aln(tmp_path / "a.aln"), nominal, 1.35)
    for c in ALIGNMENT_COLUMNS:
        assert np.abs(again[c] - first[c]).max() < 2e-3, c


# --- one simulated series, two routes -------------------------------------------------------
def _truth(n: int = 21, seed: int = 3) -> pd.DataFrame:
    """Per-tilt truth in dose-symmetric row order (not tilt order)."""
    rng = np.random.default_rng(seed)
    nominal = np.arange(n) * 6.0 - 60.0
    order = np.argsort(np.abs(nominal) + 0.1 * (nominal < 0), kind="stable")
    return pd.DataFrame(
        {
            "rlnMicrographMovieName": [f"tilt_{k:02d}.tif" for k in order],
            "rlnTomoNominalStageTiltAngle": nominal[order],
            "rlnMicrographPreExposure": np.arange(n) * 3.0,
            "rlnTomoYTilt": nominal[order] + 0.7 + rng.normal(0, 0.2, n),
            "rlnTomoZRot": 84.0 + rng.normal(0, 0.5, n),
            "rlnTomoXShiftAngst": rng.uniform(-20, 20, n) * PX,
            "rlnTomoYShiftAngst": rng.uniform(-20, 20, n) * PX,
        }
    )


def _write_set(tilts: pd.DataFrame, folder: Path) -> Path:
    """tomograms.star of one series (no images: the image size is given to the matrices)."""
    keep = [c for c in tilts.columns if c not in ALIGNMENT_COLUMNS]
    table = pd.DataFrame(
        [
            {
                "rlnTomoName": "TS_01",
                "rlnVoltage": 300.0,
                "rlnSphericalAberration": 2.7,
                "rlnAmplitudeContrast": 0.1,
                "rlnTomoTiltSeriesPixelSize": PX,
                "rlnTomoHand": -1,
                "rlnTomoSizeX": SIZE[0],
                "rlnTomoSizeY": SIZE[1],
                "rlnTomoSizeZ": SIZE[2],
            }
        ]
    )
    path = folder / "tomograms.star"
    TomogramSet.from_tables(table, {"TS_01": tilts[keep]}).write(path, folder / "tilt_series")
    return path


def _imod_from_definition(truth: pd.DataFrame, folder: Path) -> None:
    """IMOD's files from its definition: ``.xf`` maps raw image points (about the centre) to
    the aligned image, where the tilt axis is y and the specimen centre is the image centre;
    views in ascending tilt."""
    rng = np.random.default_rng(0)
    points = rng.uniform(-30, 30, (50, 3))
    ordered = truth.sort_values("rlnTomoNominalStageTiltAngle")
    xf = []
    for _, row in ordered.iterrows():
        ry = projection_matrices(0.0, row["rlnTomoYTilt"], 0.0, 0.0, 0.0, PX, (0, 0, 0), (0, 0))
        p = projection_matrices(
            0.0,
            row["rlnTomoYTilt"],
            row["rlnTomoZRot"],
            row["rlnTomoXShiftAngst"],
            row["rlnTomoYShiftAngst"],
            PX,
            (0, 0, 0),
            (0, 0),
        )
        homogeneous = np.c_[points, np.ones(len(points))]
        raw = (homogeneous @ p.numpy().T)[:, :2]
        aligned = (homogeneous @ ry.numpy().T)[:, :2]
        fit, *_ = np.linalg.lstsq(np.c_[raw, np.ones(len(raw))], aligned, rcond=None)
        xf.append(fit.T)  # [[A11, A12, DX], [A21, A22, DY]]
    write_xf(folder / "TS_01.xf", np.array(xf))
    write_angles(folder / "TS_01.tlt", ordered["rlnTomoYTilt"].to_numpy())


def _aretomo_from_definition(truth: pd.DataFrame, folder: Path, darks: list[float]) -> None:
    """AreTomo's ``.aln`` as RELION reads it (ROT, TX/TY in pixels, TILT), rows in ascending
    tilt, 1-based SEC after the dark frames (as some AreTomo versions write)."""
    ordered = truth.sort_values("rlnTomoYTilt")
    rows = np.zeros((len(ordered), 10))
    rows[:, 0] = np.arange(1, len(ordered) + 1)
    rows[:, 1] = ordered["rlnTomoZRot"]
    rows[:, [2, 5, 6, 7]] = 1.0
    rows[:, 3] = ordered["rlnTomoXShiftAngst"] / PX
    rows[:, 4] = ordered["rlnTomoYShiftAngst"] / PX
    rows[:, 9] = ordered["rlnTomoYTilt"]
    dark = [(k, k, t) for k, t in enumerate(darks)]
    write_aln(
        folder / "TS_01.aln",
        AlnFile(rows=rows, raw_size=(*IMAGE, len(truth) + len(darks)), dark_frames=dark),
    )


def _matrices(star: str) -> dict[float, torch.Tensor]:
    series = TomogramSet.read(star)["TS_01"]
    p = series.projection_matrices(image_size=IMAGE)
    nominal = series.tilts["rlnTomoNominalStageTiltAngle"]
    return {round(float(a), 3): p[k] for k, a in enumerate(nominal)}


def test_imod_and_aretomo_give_the_true_projections(tmp_path: Path) -> None:
    truth = _truth()
    true = {
        round(float(row["rlnTomoNominalStageTiltAngle"]), 3): projection_matrices(
            0.0, *(row[c] for c in ALIGNMENT_COLUMNS[1:]), PX, SIZE, IMAGE
        )
        for _, row in truth.iterrows()
    }
    (tmp_path / "imod").mkdir()
    _imod_from_definition(truth, tmp_path / "imod")
    star = _write_set(truth, tmp_path / "a")
    import_alignment(ImportAlignmentParams(i=str(star), imod_dir=str(tmp_path / "imod")))
    # the AreTomo series has two more tilts, dark, which the import drops
    darks = pd.DataFrame(
        {
            "rlnMicrographMovieName": ["dark_a.tif", "dark_b.tif"],
            "rlnTomoNominalStageTiltAngle": [-66.0, 66.0],
            "rlnMicrographPreExposure": [63.0, 66.0],
        }
    )
    star = _write_set(pd.concat([truth, darks], ignore_index=True), tmp_path / "b")
    (tmp_path / "aretomo").mkdir()
    _aretomo_from_definition(truth, tmp_path / "aretomo", [-66.0, 66.0])
    import_alignment(ImportAlignmentParams(i=str(star), aretomo_dir=str(tmp_path / "aretomo")))
    for job in ("AlignTiltSeries/job001", "AlignTiltSeries/job002"):
        got = _matrices(f"{job}/aligned_tilt_series.star")
        assert sorted(got) == sorted(true)
        error = max(float((got[a] - true[a]).abs().max()) for a in true)
        assert error < 0.01, (job, error)  # pixels (files keep 3 decimals)


def test_jobs_round_trip(tmp_path: Path) -> None:
    truth = _truth(seed=8)
    star = _write_set(truth, tmp_path / "a")
    (tmp_path / "imod").mkdir()
    _imod_from_definition(truth, tmp_path / "imod")
    first = import_alignment(ImportAlignmentParams(i=str(star), imod_dir=str(tmp_path / "imod")))
    aligned = next(iter(first))
    columns = ["rlnTomoNominalStageTiltAngle", *ALIGNMENT_COLUMNS]
    reference = read_star(Path(aligned).parent / "tilt_series/TS_01.star")["TS_01"][columns]
    for fmt in ("imod", "aretomo"):
        out = export_alignment(ExportAlignmentParams(i=aligned, format=fmt))
        folder = str(Path(next(iter(out))).parent)
        key = "imod_dir" if fmt == "imod" else "aretomo_dir"
        again = import_alignment(ImportAlignmentParams(i=str(star), **{key: folder}))
        table = read_star(Path(next(iter(again))).parent / "tilt_series/TS_01.star")["TS_01"]
        assert np.abs(table[columns].to_numpy() - reference.to_numpy()).max() < 2e-3, fmt


def test_bad_alignment_files(tmp_path: Path) -> None:
    truth = _truth()
    star = _write_set(truth, tmp_path / "a")
    (tmp_path / "imod").mkdir()
    _imod_from_definition(truth.iloc[:-1], tmp_path / "imod")
    with pytest.raises(InputError, match=r"TS_01\.xf: 20 lines for tilt series TS_01 of 21"):
        import_alignment(ImportAlignmentParams(i=str(star), imod_dir=str(tmp_path / "imod")))
    (tmp_path / "aretomo").mkdir()
    _aretomo_from_definition(truth.iloc[:-2], tmp_path / "aretomo", [])
    with pytest.raises(InputError, match=r"TS_01\.aln: 19 alignment rows and 0 dark frames"):
        import_alignment(ImportAlignmentParams(i=str(star), aretomo_dir=str(tmp_path / "aretomo")))
    bad = tmp_path / "bad.xf"
    bad.write_text("1 0 0 1 0\n")
    with pytest.raises(InputError, match=r"bad\.xf: line 1: expected 6 numbers"):
        read_xf(bad)
    assert not Path("AlignTiltSeries").exists()


def test_real_relion5_alignment_columns_are_its_matrices(shared_data: Path) -> None:
    """EMPIAR-10164 TS_01 as RELION 5 wrote it after IMOD alignment: the projection matrices
    built from its columns (conventions §1.3) are its rlnTomoProj rows, with the image centre
    of its 3710 x 3838 K2 images, and rlnTomoZRot is near the nominal tilt axis (85°), as the
    IMOD reading of §14 gives."""
    folder = shared_data / "formats/relion5"
    tilts = read_star(folder / "220728_TS_01.star")["220728_TS_01"]
    columns = {c: torch.tensor(tilts[c].to_numpy(dtype=float)) for c in ALIGNMENT_COLUMNS}
    built = projection_matrices(*columns.values(), 1.35, (4000, 4000, 3000), (3710, 3838))
    rows = np.array(
        [
            [[float(x) for x in str(v).strip("[]").split(",")] for v in row]
            for row in tilts[
                ["rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW"]
            ].to_numpy()
        ]
    )
    assert np.abs(built.numpy() - rows).max() < 1e-3
    assert np.abs(columns["rlnTomoZRot"].numpy() - 85.0).max() < 1.0
