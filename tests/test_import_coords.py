"""Coordinate import (subtomo.io.coordinate_files, ``subtomo import-coords``): one hand-made file
per format whose answer is known, converted with each format's origin, binning and angle
convention (conventions §16.2), and bad input."""

from __future__ import annotations

import json

import imodmodel
import numpy as np
import pandas as pd
import pytest

from subtomo.data import OptimisationSet, ParticleSet, TomogramSet
from subtomo.errors import InputError
from subtomo.geometry import euler_to_matrix
from subtomo.io.coordinate_files import (
    dynamo_to_relion_angles,
    read_cbox,
    read_copick,
    read_dynamo,
    read_imod_model,
    read_star_points,
)
from subtomo.jobs.import_coords import ImportCoordsParams, run
from subtomo.picking import locate_picks

# tomograms.star of the tests: px 2 Å, bin-1 size 800 x 800 x 200, tomograms binned by 4
PX, SIZE, BIN = 2.0, np.array([800.0, 800.0, 200.0]), 4.0


def _centred(voxel) -> np.ndarray:
    """§1.3: C = (b v - S/2) px."""
    return (np.asarray(voxel, dtype=np.float64) * BIN - SIZE / 2) * PX


@pytest.fixture
def tomograms(tmp_path):
    table = pd.DataFrame(
        {
            "rlnTomoName": ["TS_01", "TS_02"],
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.07,
            "rlnTomoTiltSeriesPixelSize": PX,
            "rlnTomoHand": -1,
            "rlnTomoSizeX": 800,
            "rlnTomoSizeY": 800,
            "rlnTomoSizeZ": 200,
            "rlnTomoTomogramBinning": BIN,
            "rlnTomoReconstructedTomogram": [
                f"Tomograms/job005/tomograms/rec_TS_0{k}.mrc" for k in (1, 2)
            ],
        }
    )
    tilts = pd.DataFrame(
        {"rlnMicrographPreExposure": [0.0], "rlnTomoYTilt": [0.0], "rlnTomoZRot": [0.0]}
    )
    path = tmp_path / "tomograms.star"
    TomogramSet.from_tables(table, {"TS_01": tilts, "TS_02": tilts}).write(path, tmp_path / "ts")
    return path


def _dynamo_row(x, y, z, dx, dy, dz, tdrot, tilt, narot, tomo) -> str:
    row = np.zeros(35)
    row[[0, 1, 2]] = 1
    row[3:9] = dx, dy, dz, tdrot, tilt, narot
    row[19] = tomo
    row[23:26] = x, y, z
    return " ".join(f"{v:g}" for v in row)


def test_dynamo_angles_match_known_pairs():
    """The pair eulerangles records as the same reconstruction in Dynamo and RELION, and
    Dynamo's matrix of (30, 60, 75) (dynamo_euler2matrix) = RELION's A^T."""
    np.testing.assert_allclose(
        dynamo_to_relion_angles(np.array([-47.273]), np.array([1.1777]), np.array([-132.3])),
        [[137.7, 1.1777, 42.727]],
        atol=1e-9,
    )
    dynamo_matrix = np.array(
        [[-0.0173, -0.5477, 0.8365], [0.9012, -0.3709, -0.2241], [0.4330, 0.7500, 0.5000]]
    )
    rot, tilt, psi = dynamo_to_relion_angles(np.array([30.0]), np.array([60.0]), np.array([75.0]))[
        0
    ]
    a = euler_to_matrix(rot, tilt, psi).double().numpy()
    np.testing.assert_allclose(a.T, dynamo_matrix, atol=1e-4)


def test_dynamo_table_and_doc(tmp_path, tomograms):
    """x + dx - 0.5 (Dynamo's origin at the corner of voxel [1,1,1]); tomogram names from the
    .doc; positions through the tomograms' binning."""
    tbl = tmp_path / "picks.tbl"
    tbl.write_text(
        _dynamo_row(101.5, 51.5, 21.5, 0.25, -0.5, 1.0, -47.273, 1.1777, -132.3, 1)
        + "\n"
        + _dynamo_row(11.0, 12.0, 13.0, 0, 0, 0, 30, 60, 75, 2)
        + "\n"
    )
    (tmp_path / "picks.doc").write_text("1 /data/tomos/TS_01.mrc\n2 /data/tomos/TS_02.mrc\n")
    picks = read_dynamo(tbl)
    np.testing.assert_allclose(
        picks.table[["x", "y", "z"]], [[101.25, 50.5, 22.0], [10.5, 11.5, 12.5]]
    )
    assert list(picks.table["tomo"]) == ["TS_01", "TS_02"]
    located = locate_picks(picks, TomogramSet.read(tomograms))
    np.testing.assert_allclose(
        located.centred, _centred([[101.25, 50.5, 22.0], [10.5, 11.5, 12.5]])
    )
    np.testing.assert_allclose(located.angles[0], [137.7, 1.1777, 42.727], atol=1e-9)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imodmodel uses pydantic v1 API
def test_imod_model_voxel_centres(tmp_path, tomograms):
    """IMOD's first voxel centre is model point (0.5, 0.5, 0): x, y lose 0.5, z stays;
    contours are groups "object.contour"."""
    path = tmp_path / "vesicles.mod"
    df = pd.DataFrame(
        {
            "x": [10.5, 30.5, 5.5],
            "y": [20.5, 40.5, 6.5],
            "z": [7.0, 8.0, 9.0],
            "object_id": [0, 0, 1],
            "contour_id": [0, 0, 0],
        }
    )
    imodmodel.write(df, path)
    picks = read_imod_model(path)
    np.testing.assert_allclose(picks.table[["x", "y", "z"]], [[10, 20, 7], [30, 40, 8], [5, 6, 9]])
    assert list(picks.table["group"]) == ["1.1", "1.1", "2.1"]
    with pytest.raises(InputError, match="names no tomogram and 2 are given: use --tomo_name"):
        locate_picks(picks, TomogramSet.read(tomograms))
    located = locate_picks(picks, TomogramSet.read(tomograms), tomo_name="TS_02", binning=2.0)
    np.testing.assert_allclose(located.centred[0], (np.array([10, 20, 7]) * 2 - SIZE / 2) * PX)


def test_cbox_box_corner_to_centre(tmp_path):
    """crYOLO: lower-left corner + half the box in x and y; z is the centre slice."""
    path = tmp_path / "TS_01.cbox"
    path.write_text(
        "data_cryolo\n\nloop_\n_CoordinateX #1\n_CoordinateY #2\n_CoordinateZ #3\n_Width #4\n"
        "_Height #5\n_Depth #6\n_EstWidth #7\n_EstHeight #8\n_Confidence #9\n_NumBoxes #10\n"
        "_Angle #11\n90.0 180.0 33.0 20.0 24.0 20.0 20.0 20.0 0.8 5 0.0\n"
    )
    np.testing.assert_allclose(read_cbox(path).table[["x", "y", "z"]], [[100.0, 192.0, 33.0]])


def test_pytom_star_both_layouts(tmp_path, tomograms):
    """pytom-match-pick: voxel coordinates of the searched tomogram with its voxel size
    (rlnDetectorPixelSize 8 Å over px 2 Å: b = 4), angles as written, the tomogram from
    rlnMicrographName (matched to rlnTomoReconstructedTomogram's file); with --relion5-compat
    the centred Å and rlnTomoName pass through."""
    path = tmp_path / "TS_02_particles.star"
    path.write_text(
        "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnCoordinateZ #3\n"
        "_rlnAngleRot #4\n_rlnAngleTilt #5\n_rlnAnglePsi #6\n_ptmLCCmax #7\n_ptmCutOff #8\n"
        "_ptmSearchStd #9\n_rlnDetectorPixelSize #10\n_rlnMicrographName #11\n"
        "12 34 56 10.0 20.0 30.0 0.3 0.2 0.01 8.0 tomograms/rec_TS_02.mrc\n"
    )
    located = locate_picks(read_star_points(path), TomogramSet.read(tomograms), binning=0.0)
    np.testing.assert_allclose(located.centred, _centred([[12, 34, 56]]))
    np.testing.assert_allclose(located.angles, [[10, 20, 30]])
    assert list(located.names) == ["TS_02"]
    compat = tmp_path / "compat.star"
    compat.write_text(
        "data_particles\n\nloop_\n_rlnTomoName #1\n_rlnCenteredCoordinateXAngst #2\n"
        "_rlnCenteredCoordinateYAngst #3\n_rlnCenteredCoordinateZAngst #4\nTS_01 -5.5 6.0 7.0\n"
    )
    located = locate_picks(read_star_points(compat), TomogramSet.read(tomograms))
    np.testing.assert_allclose(located.centred, [[-5.5, 6.0, 7.0]])


def test_copick_angstrom_and_transformation(tmp_path, tomograms):
    """copick: Å from voxel 0 plus the transformation's translation; its rotation is A."""
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    matrix = [[c, -s, 0, 10.0], [s, c, 0, 0.0], [0, 0, 1, 0.0], [0, 0, 0, 1]]
    path = tmp_path / "ribosome.json"
    path.write_text(
        json.dumps(
            {
                "pickable_object_name": "ribosome",
                "run_name": "TS_01",
                "points": [
                    {"location": {"x": 800.0, "y": 400.0, "z": 200.0}, "transformation_": matrix}
                ],
            }
        )
    )
    located = locate_picks(read_copick(path), TomogramSet.read(tomograms))
    np.testing.assert_allclose(located.centred, [[10.0, -400.0, 0.0]])
    a = euler_to_matrix(*located.angles[0]).double().numpy()
    np.testing.assert_allclose(a, np.asarray(matrix)[:3, :3], atol=1e-6)


def test_import_coords_job_csv(tmp_path, tomograms, monkeypatch):
    """CSV in voxels and in Å -> a RELION 5 particles.star with centred Å, angles and an
    optimisation set; an unknown tomogram is a one-line error with no job directory."""
    monkeypatch.chdir(tmp_path)
    pd.DataFrame(
        {
            "tomo": ["TS_01", "TS_02"],
            "x": [1.0, 2.0],
            "y": [3.0, 4.0],
            "z": [5.0, 6.0],
            "rot": [1.0, 2.0],
            "tilt": [3.0, 4.0],
            "psi": [5.0, 6.0],
        }
    ).to_csv("picks.csv", index=False)
    run(ImportCoordsParams(i="picks.csv", tomograms=str(tomograms), output_dir="Import/job001"))
    parts = ParticleSet.read("Import/job001/particles.star")
    np.testing.assert_allclose(
        parts.centered_coordinates_angst().numpy(), _centred([[1, 3, 5], [2, 4, 6]])
    )
    np.testing.assert_allclose(
        parts.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]], [[1, 3, 5], [2, 4, 6]]
    )
    assert list(parts.particles["rlnTomoParticleName"]) == ["TS_01/1", "TS_02/1"]
    opt = OptimisationSet.read("Import/job001/optimisation_set.star")
    assert opt.particles.name == "particles.star" and opt.tomograms.name == "tomograms.star"

    run(
        ImportCoordsParams(
            i="picks.csv", tomograms=str(tomograms), csv_unit="angst", output_dir="Import/job002"
        )
    )
    parts = ParticleSet.read("Import/job002/particles.star")
    np.testing.assert_allclose(
        parts.centered_coordinates_angst().numpy()[0], np.array([1, 3, 5]) - SIZE / 2 * PX
    )

    pd.DataFrame({"tomo": ["TS_09"], "x": [1.0], "y": [1.0], "z": [1.0]}).to_csv(
        "bad.csv", index=False
    )
    with pytest.raises(InputError, match="tomogram 'TS_09' is not in the tomograms file") as err:
        run(ImportCoordsParams(i="bad.csv", tomograms=str(tomograms), output_dir="Import/job003"))
    assert "\n" not in str(err.value) and not (tmp_path / "Import/job003").exists()
    with pytest.raises(InputError, match="cannot tell the format"):
        run(ImportCoordsParams(i="tomograms.star.bak", tomograms=str(tomograms)))


MALFORMED = [
    ("empty.tbl", b"", "not a readable Dynamo table"),
    ("short.tbl", b"1 1 1 0 0 0 0 0 0 0\n", "a Dynamo table needs >= 26 columns"),
    ("junk.mod", b"\x00\x01not a model", "not a readable IMOD model"),
    ("other.cbox", b"data_boxes\n\nloop_\n_CoordinateX #1\n1.0\n", "missing block data_cryolo"),
    (
        "flat.cbox",
        b"data_cryolo\n\nloop_\n_CoordinateX #1\n_CoordinateY #2\n_CoordinateZ #3\n_Width #4\n"
        b"_Height #5\n1.0 2.0 nan 10 10\n",
        "column _CoordinateZ, row 1: expected a finite number",
    ),
    ("bad.json", b"{not json", "not a copick picks file"),
    ("none.json", b'{"run_name": "TS_01", "points": []}', "the picks file has no points"),
    ("noz.csv", b"x,y\n1,2\n", "column z: missing required column"),
    ("text.csv", b"x,y,z\n1,abc,3\n", "column y, row 1: expected a finite number, found 'abc'"),
    ("nocoords.star", b"data_x\n\nloop_\n_rlnTomoName #1\nTS_01\n", "no table with rlnCoordinateX"),
    (
        "relion.star",
        b"data_particles\n\nloop_\n_rlnTomoName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
        b"_rlnCoordinateZ #4\n_rlnOriginXAngst #5\nTS_01 1 2 3 4.5\n",
        "carries rlnOriginXAngst: a RELION particle file",
    ),
]


@pytest.mark.parametrize("name,content,expect", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_give_one_error_line(tmp_path, tomograms, capsys, name, content, expect):
    """Each reader's bad input ends in one ``error:`` line naming the file and the cause, exit
    status 1, no traceback and no job directory."""
    from subtomo.cli.main import run_cli

    path = tmp_path / name
    path.write_bytes(content)
    code = run_cli(
        ["import-coords", "--i", str(path), "--t", str(tomograms), "--o", str(tmp_path / "job")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(path) in err[0] and expect in err[0], err[0]
    assert "Traceback" not in err[0] and not (tmp_path / "job").exists()
