"""Warp/WarpTools tilt-series XML and RELION-4 projection matrices imported as RELION 5
alignment columns (``subtomo import-alignment --warp_dir`` / ``--relion4``, conventions §18):
the real Warp file gives its numbers in RELION's columns, UseTilt False tilts leave the table,
the real WarpTools matrices become columns that project exactly as the matrices did, and bad
input is a one-line error with nothing written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.data import TomogramSet
from subtomo.errors import InputError
from subtomo.io.alignment_files import read_warp_xml
from subtomo.jobs.import_alignment import ImportAlignmentParams
from subtomo.jobs.import_alignment import run as import_alignment

WARP = "formats/warp/warp_00254.xml"
WARPTOOLS = (
    "real/warptools_ribosome_subtilts/"
    "warptools_test_4-tomos_10-ptcls_box-32_angpix-12_tomograms.star"
)


def _series_for_xml(xml_path: Path, folder: Path, name: str = "warp_00254") -> Path:
    """A tomograms.star whose per-tilt table has the XML's tilts (nominal angles from the
    movie names, shuffled rows), and the XML as ``<folder>/xml/<name>.xml``."""
    text = xml_path.read_text(encoding="utf-8-sig")
    movies = re.search(r"<MoviePath>(.*?)</MoviePath>", text, re.S).group(1).split()
    nominal = [float(re.search(r"_(-?[0-9.]+)\.tif$", m).group(1)) for m in movies]
    order = np.random.default_rng(1).permutation(len(nominal))
    tilts = pd.DataFrame(
        {
            "rlnMicrographPreExposure": np.arange(len(nominal), dtype=float)[order] * 3.0,
            "rlnTomoNominalStageTiltAngle": np.array(nominal)[order],
        }
    )
    table = pd.DataFrame(
        {"rlnTomoName": [name], "rlnTomoTiltSeriesPixelSize": [1.35], "rlnVoltage": [300.0],
         "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07], "rlnTomoHand": [-1]}
    )  # fmt: skip
    (folder / "xml").mkdir(parents=True, exist_ok=True)
    (folder / "xml" / f"{name}.xml").write_text(text, encoding="utf-8")
    star = folder / "tomograms.star"
    TomogramSet.from_tables(table, {name: tilts}).write(star, folder / "tilt_series")
    return star


def test_real_warp_xml(shared_data: Path, tmp_path: Path) -> None:
    xml = read_warp_xml(shared_data / WARP)
    assert len(xml.angles) == 41 and xml.use_tilt.all() and not xml.angles_inverted
    assert np.allclose(xml.axis_angle, -4.2999735) and np.allclose(xml.movement, 0)
    star = _series_for_xml(shared_data / WARP, tmp_path)
    out = import_alignment(ImportAlignmentParams(i=str(star), warp_dir=str(tmp_path / "xml")))
    series = TomogramSet.read(next(iter(out)))["warp_00254"]
    tilts = series.tilts
    assert len(tilts) == 41
    nominal = tilts["rlnTomoNominalStageTiltAngle"].to_numpy()
    assert list(nominal) == sorted(nominal)  # RELION's row order after alignment
    # the XML is in ascending angle: row k is XML tilt k
    assert np.allclose(tilts["rlnTomoYTilt"], -xml.angles)
    assert np.allclose(tilts["rlnTomoZRot"], -4.2999735)
    assert np.allclose(tilts["rlnTomoXShiftAngst"], xml.offset[:, 0])
    assert np.allclose(tilts["rlnTomoYShiftAngst"], xml.offset[:, 1])
    assert (tilts["rlnTomoXTilt"] == 0).all()
    # the pre-exposure (chronology) travelled with its tilt
    assert sorted(tilts["rlnMicrographPreExposure"]) == list(np.arange(41) * 3.0)


def test_warp_use_tilt_and_bad_xml(shared_data: Path, tmp_path: Path) -> None:
    star = _series_for_xml(shared_data / WARP, tmp_path)
    path = tmp_path / "xml/warp_00254.xml"
    text = path.read_text(encoding="utf-8")
    use = re.search(r"<UseTilt>(.*?)</UseTilt>", text, re.S)
    flags = use.group(1).split()
    flags[0] = "False"  # the -60° tilt
    path.write_text(text.replace(use.group(1), "\n".join(flags)), encoding="utf-8")
    out = import_alignment(ImportAlignmentParams(i=str(star), warp_dir=str(tmp_path / "xml")))
    tilts = TomogramSet.read(next(iter(out)))["warp_00254"].tilts
    assert len(tilts) == 40 and tilts["rlnTomoNominalStageTiltAngle"].min() == -57.0
    jobs = sorted(Path("AlignTiltSeries").iterdir())
    # a tilt of the series that the XML does not have
    bad = text.replace("<Angles>-60.01", "<Angles>-62.5")
    path.write_text(bad, encoding="utf-8")
    with pytest.raises(
        InputError, match=r"warp_00254\.xml: no tilt within 1.0° of the nominal -60°"
    ):
        import_alignment(ImportAlignmentParams(i=str(star), warp_dir=str(tmp_path / "xml")))
    path.write_text(text.replace("<AxisAngle>-4.2999735", "<AxisAngle>x"), encoding="utf-8")
    with pytest.raises(InputError, match=r"<AxisAngle>: expected numbers") as error:
        import_alignment(ImportAlignmentParams(i=str(star), warp_dir=str(tmp_path / "xml")))
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="exactly one of"):
        import_alignment(
            ImportAlignmentParams(i=str(star), warp_dir=str(tmp_path / "xml"), relion4=True)
        )
    assert sorted(Path("AlignTiltSeries").iterdir()) == jobs  # nothing half written


def test_real_warptools_matrices_become_relion5_columns(shared_data: Path, tmp_path: Path) -> None:
    """WarpTools' rotation-only rlnTomoProj rows → five columns per tilt that build the same
    projection (xy rows of P) with the images' size; the rows are gone, as RELION 5 writes."""
    source = shared_data / WARPTOOLS
    star = tmp_path / "warptools_tomograms.star"
    shutil.copy(source, star)
    before = TomogramSet.read(star)
    with pytest.raises(InputError, match="give their size with --image_size"):
        import_alignment(ImportAlignmentParams(i=str(star), relion4=True))
    out = import_alignment(ImportAlignmentParams(i=str(star), relion4=True, image_size="4400,6000"))
    after = TomogramSet.read(next(iter(out)))
    assert after.names == before.names
    for name in before.names:
        old, new = before[name], after[name]
        assert not new.has_projection_rows and new.n_tilts == old.n_tilts == 37
        order = np.argsort(new.tilts["rlnTomoYTilt"].to_numpy())
        built = new.projection_matrices((4400, 6000))[torch.from_numpy(order)]
        original = old.projection_matrices()
        original = original[torch.argsort(torch.asin(-original[:, 2, 0]))]
        assert torch.allclose(built[:, :3, :3], original[:, :3, :3], atol=1e-6)
        # to the STAR files' float format (shifts in Å): 1e-3 px
        assert torch.allclose(built[:, :2, 3], original[:, :2, 3], atol=1e-3)
        assert np.allclose(
            np.sort(new.tilts["rlnMicrographPreExposure"]),
            np.sort(old.tilts["rlnMicrographPreExposure"]),
        )
