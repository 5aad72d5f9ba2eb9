"""TomogramSet / TiltSeries: real RELION 5, RELION 4 and WarpTools files, round trips,
projection matrices against the rlnTomoProj rows RELION wrote, and tilt-image reading."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.data import TomogramSet, prefetched_tilt_images, read_tilt, tilt_images
from subtomo.errors import InputError
from subtomo.io import read_star, write_mrc, write_star

WARP = "real/warptools_ribosome_subtilts/warptools_test_4-tomos_10-ptcls_box-32_angpix-12"
PROJ = ["rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW"]


def _assert_same_set(a: TomogramSet, b: TomogramSet) -> None:
    pd.testing.assert_frame_equal(
        a.global_table.drop(columns="rlnTomoTiltSeriesStarFile", errors="ignore"),
        b.global_table.drop(columns="rlnTomoTiltSeriesStarFile", errors="ignore"),
    )
    assert a.names == b.names
    for name in a.names:
        pd.testing.assert_frame_equal(a[name].tilts, b[name].tilts)


def test_real_relion5_tomograms(shared_data):
    """pytom's RELION 5 project: 10 series, per-tilt files named by project-relative paths;
    only tomo200528_107's table ships, found beside tomograms.star. The others fail only
    when used, naming the global row and column."""
    tomos = TomogramSet.read(shared_data / "formats/relion5/tomograms.star")
    assert len(tomos) == 10
    ts = tomos["tomo200528_107"]
    assert ts.n_tilts == 35
    assert (ts.pixel_size, ts.tomogram_size, ts.hand, ts.voltage_kv) == (
        1.724,
        (4000, 4000, 2000),
        -1,
        200.0,
    )
    assert ts.cs_mm == 2.7 and ts.amplitude_contrast == 0.08
    assert ts.defocus_slope == 1.0 and ts.bfactor_per_electron_dose is None
    # pytom wrote rlnCtfScalefactor = cos(stage tilt); absent terms take RELION's defaults
    cos_tilt = np.cos(np.deg2rad(ts.tilts["rlnTomoNominalStageTiltAngle"].to_numpy()))
    np.testing.assert_allclose(ts.ctf_scale, cos_tilt, atol=1e-4)
    np.testing.assert_array_equal(ts.ctf_bfactor, 0.0)
    np.testing.assert_array_equal(ts.phase_shift, 0.0)
    np.testing.assert_array_equal(ts.pre_exposure, ts.tilts["rlnMicrographPreExposure"])
    with pytest.raises(InputError, match=r"data_global, column rlnTomoTiltSeriesStarFile, row 1"):
        _ = tomos["tomo200528_100"].tilts
    with pytest.raises(InputError, match="no tomogram named 'TS_99'"):
        tomos["TS_99"]


def test_relion5_round_trip(shared_data, tmp_path, monkeypatch):
    """write -> read of a RELION 5 set gives identical tables, and the written
    rlnTomoTiltSeriesStarFile is relative to the working directory (project dir)."""
    tomos = TomogramSet.read(shared_data / "formats/relion5/tomograms.star")
    one = TomogramSet.from_tables(
        tomos.global_table[tomos.global_table["rlnTomoName"] == "tomo200528_107"],
        {"tomo200528_107": tomos["tomo200528_107"].tilts},
    )
    monkeypatch.chdir(tmp_path)
    one.write("Import/job001/tomograms.star")
    glob = read_star("Import/job001/tomograms.star")["global"]
    assert glob["rlnTomoTiltSeriesStarFile"].tolist() == [
        "Import/job001/tilt_series/tomo200528_107.star"
    ]
    _assert_same_set(one, TomogramSet.read("Import/job001/tomograms.star"))


def test_warp_single_file_to_relion5(shared_data, tmp_path):
    """WarpTools' RELION-4 style file (per-tilt blocks in the same file, option-A stack
    name, rotation-only rlnTomoProj rows) loads, and converts to RELION 5 form losslessly."""
    warp = TomogramSet.read(shared_data / f"{WARP}_tomograms.star")
    assert warp.names == ["Unt_083.tomostar", "Unt_050.tomostar", "Unt_076.tomostar",
                          "Unt_088.tomostar"]  # fmt: skip
    ts = warp["Unt_083.tomostar"]
    assert ts.n_tilts == 37 and ts.pixel_size == 1.667 and ts.tomogram_size == (4400, 6000, 1400)
    assert ts.fractional_dose == 2.556
    p = ts.projection_matrices()
    assert p.dtype == torch.float64 and p.shape == (37, 4, 4)
    np.testing.assert_allclose(p[0, 0].numpy(), [0.10915412, -0.99366254, 0.026835253, 0])
    np.testing.assert_array_equal(p[:, :3, 3].numpy(), 0.0)  # Warp writes no translations
    rot = p[:, :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(37, 3, 3).double(),
                               atol=1e-6, rtol=0)  # fmt: skip
    warp.write(tmp_path / "tomograms.star")
    _assert_same_set(warp, TomogramSet.read(tmp_path / "tomograms.star"))


def test_projection_matrices_from_angles_match_relion_rows(shared_data):
    """RELION's own TS_01 table has both XTilt/YTilt/ZRot/shifts and rlnTomoProj rows.
    Rebuilding P_f from the angles must give RELION's matrices; their translations fix the
    tilt-image size at 3710 x 3838 (c_img = (1855, 1919)). A wrong rotation order, sign or
    centre would show here."""
    tomos = TomogramSet.read(shared_data / "formats/relion5/tilt_series.star")
    ts = tomos["220728_TS_01"]
    assert ts.n_tilts == 41 and ts.has_projection_rows
    relion = ts.projection_matrices()  # the rows win when present
    angles_only = TomogramSet.from_tables(
        tomos.global_table, {"220728_TS_01": ts.tilts.drop(columns=PROJ)}
    )["220728_TS_01"]
    # the size would come from the micrographs, which are not shipped: the error names one
    with pytest.raises(InputError, match=r"TS_01_000_0_0\.mrc: file not found"):
        angles_only.projection_matrices()
    ours = angles_only.projection_matrices(image_size=(3710, 3838))
    np.testing.assert_allclose(ours[:, :3, :3].numpy(), relion[:, :3, :3].numpy(), atol=1e-6)
    np.testing.assert_allclose(ours[:, :3, 3].numpy(), relion[:, :3, 3].numpy(), atol=1e-3)
    np.testing.assert_array_equal(ours[:, 3].numpy(), relion[:, 3].numpy())


def _tiny_global(name: str, **extra) -> pd.DataFrame:
    row = {
        "rlnTomoName": name,
        "rlnVoltage": 300.0,
        "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.07,
        "rlnTomoHand": -1.0,
        "rlnTomoTiltSeriesPixelSize": 2.0,
        "rlnTomoSizeX": 64,
        "rlnTomoSizeY": 48,
        "rlnTomoSizeZ": 32,
        **extra,
    }
    return pd.DataFrame([row])


def test_tilt_images_from_micrographs_and_stack(tmp_path, device):
    """Per-tilt 2D MRCs and an option-A stack give the same (t, h, w) images, frame by
    frame, and image_size comes from the files as (w, h)."""
    images = torch.arange(3 * 6 * 10, dtype=torch.float32).reshape(3, 6, 10)
    for f in range(3):
        write_mrc(tmp_path / f"tilt{f}.mrc", images[f], 2.0)
    write_mrc(tmp_path / "ts.mrc", images, 2.0, is_stack=True)
    tilts = pd.DataFrame(
        {
            "rlnMicrographName": [f"tilt{f}.mrc" for f in range(3)],
            "rlnMicrographPreExposure": [0.0, 3.0, 6.0],
            "rlnTomoYTilt": [0.0, 3.0, -3.0],
            "rlnTomoZRot": 0.0,
            "rlnTomoXShiftAngst": 0.0,
            "rlnTomoYShiftAngst": 0.0,
        }
    )
    write_star(tmp_path / "tomograms.star", {"global": _tiny_global("TS"), "TS": tilts})
    ts = TomogramSet.read(tmp_path / "tomograms.star")["TS"]
    assert ts.image_size == (10, 6)
    torch.testing.assert_close(tilt_images(ts, device=device).cpu(), images)
    assert read_tilt(ts, 1, device=device).device.type == torch.device(device).type
    # option A: the same images as one stack, rlnMicrographName absent
    glob = _tiny_global("TS", rlnTomoTiltSeriesName="ts.mrc:mrc", rlnTomoFrameCount=3)
    write_star(tmp_path / "a.star", {"global": glob, "TS": tilts.drop(columns="rlnMicrographName")})
    stack_ts = TomogramSet.read(tmp_path / "a.star")["TS"]
    assert stack_ts.micrograph_paths is None and stack_ts.image_size == (10, 6)
    torch.testing.assert_close(read_tilt(stack_ts, 2), images[2])
    # read ahead (or not, above the size limit): each series with its own images, in order
    order = [stack_ts, ts, stack_ts]
    for limit in (1 << 30, 0):
        got = list(prefetched_tilt_images(order, device=device, max_ahead_bytes=limit))
        assert [s for s, _ in got] == order
        for _, tensor in got:
            torch.testing.assert_close(tensor.cpu(), images)
    assert list(prefetched_tilt_images([])) == []
    # from the files' size, P_f puts the tomogram centre on the image centre (w//2, h//2)
    centre = torch.tensor([32.0, 24.0, 16.0, 1.0], dtype=torch.float64)
    uv = ts.projection_matrices() @ centre
    np.testing.assert_allclose(uv[:, :2].numpy(), [[5, 3]] * 3, atol=1e-12)


def test_frame_count_must_match_table(tmp_path):
    """Option A: rlnTomoFrameCount != per-tilt rows is reported at the global row."""
    glob = _tiny_global("TS", rlnTomoTiltSeriesName="ts.mrc", rlnTomoFrameCount=4)
    tilts = pd.DataFrame({"rlnMicrographPreExposure": [0.0, 3.0]})
    write_star(tmp_path / "t.star", {"global": glob, "TS": tilts})
    with pytest.raises(InputError, match=r"data_global, column rlnTomoFrameCount, row 1: 4 fr"):
        _ = TomogramSet.read(tmp_path / "t.star")["TS"].tilts


def test_bad_hand_unknown_size_and_duplicate_names():
    """rlnTomoHand must be +-1; P_f needs an image size; tomogram names must be unique."""
    tilts = pd.DataFrame({"rlnMicrographPreExposure": [0.0]})
    ts = TomogramSet.from_tables(_tiny_global("TS", rlnTomoHand=0.5), {"TS": tilts})["TS"]
    with pytest.raises(InputError, match="column rlnTomoHand, row 1: expected 1 or -1"):
        _ = ts.hand
    with pytest.raises(InputError, match="tilt image size unknown"):
        ts.projection_matrices()  # no image files and no size given
    two = pd.concat([_tiny_global("TS"), _tiny_global("TS")])
    with pytest.raises(InputError, match="column rlnTomoName, row 2: tomogram name 'TS' appears"):
        TomogramSet.from_tables(two, {"TS": tilts})


def test_crlf_tomograms_star(shared_data, tmp_path):
    """A Windows-edited (CR+LF) RELION 5 tomograms.star with its per-tilt file loads."""
    src = shared_data / "formats/relion5"
    for name in ("tilt_series.star", "220728_TS_01.star"):
        text = (src / name).read_text().replace("\n", "\r\n")
        (tmp_path / name).write_bytes(text.encode())
    ts = TomogramSet.read(tmp_path / "tilt_series.star")["220728_TS_01"]
    assert ts.n_tilts == 41
    np.testing.assert_allclose(ts.defocus_u[0], 39424.761719)


def test_deformations_are_named(shared_data, tmp_path, monkeypatch, caplog):
    """A tilt series with RELION 5's 2D deformations (frame alignment ``--deformation``:
    the model in the global row, coefficients per tilt), which subtomo does not apply: one
    warning naming the series when its tilts are read; without them (the real RELION 5
    file) nothing."""
    tomos = TomogramSet.read(shared_data / "formats/relion5/tomograms.star")
    name = "tomo200528_107"
    tilts = tomos[name].tilts.copy()
    one = tomos.global_table[tomos.global_table["rlnTomoName"] == name]
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="subtomo"):
        TomogramSet.from_tables(one, {name: tilts}).write("plain.star")
        _ = TomogramSet.read("plain.star")[name].tilts
        assert not caplog.records
        # RELION 5: model and grid in the global row, coefficients per tilt
        deformed = one.assign(rlnTomoDeformationType="spline", rlnTomoDeformationGridSizeX=3,
                              rlnTomoDeformationGridSizeY=3)  # fmt: skip
        tilts["rlnTomoDeformationCoefficients"] = "[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0.5]"
        TomogramSet.from_tables(deformed, {name: tilts}).write("deformed.star")
        for _ in range(2):
            _ = TomogramSet.read("deformed.star")[name].tilts
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"tilt series {name} has RELION's 2D deformations" in lines[0]
