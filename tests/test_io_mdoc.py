"""SerialEM mdoc: the real files load; written mdocs read back with mdocfile unchanged."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import PureWindowsPath

import mdocfile
import numpy as np
import pytest

from subtomo.errors import InputError
from subtomo.io import read_mdoc, write_mdoc


def test_real_tilt_series_mdoc(shared_data):
    """The 41-tilt SerialEM file: dose-symmetric angles in stack order, 5.4 Å pixels."""
    m = read_mdoc(shared_data / "formats/mdoc/tilt_series.mdoc")
    assert len(m.tilt_angles_deg) == 41
    np.testing.assert_allclose(m.tilt_angles_deg[:4], [0.000999877, 3.00113, -2.99863, -5.99876])
    assert m.pixel_size == pytest.approx(5.4)
    assert m.defocus_um[0] == pytest.approx(2.68083)
    # DateTime increases with ZValue in this file, so acquisition order is stack order
    np.testing.assert_array_equal(m.acquisition_order, np.arange(41))
    assert m.sub_frame_paths[1].endswith("TS_01_001_3.0.mrc")
    np.testing.assert_array_equal(m.pre_exposure, 0.0)  # the file records ExposureDose = 0


def test_real_frame_set_mdoc(shared_data):
    """Frame-set mdoc: the 20 [ZValue] sections are the images; PriorRecordDose is used
    as pre-exposure; pixel size and voltage come from the [FrameSet] section."""
    m = read_mdoc(shared_data / "formats/mdoc/frame_set_multiple.mdoc")
    assert len(m.tilt_angles_deg) == 20
    assert m.pixel_size == pytest.approx(1.2827)
    assert m.voltage_kv == pytest.approx(300.0)
    assert m.pre_exposure[:3] == pytest.approx([0.0, 7.66184, 15.3237])
    assert m.exposure_dose[6] == pytest.approx(7.55522)


def test_write_reads_back_with_mdocfile(tmp_path):
    """A simulated dose-symmetric series written by us must be read by mdocfile (what
    RELION's and Warp's importers use) with the same angles, doses, pixel size and order."""
    angles = np.array([0.0, 3.0, -3.0, -6.0, 6.0, 9.0])
    defocus = np.array([-4.0, -4.1, -3.9, -4.2, -4.05, -3.95])
    start = datetime(2024, 5, 1, 12, 0, 0)
    times = [start + timedelta(seconds=45 * i) for i in range(len(angles))]
    write_mdoc(
        tmp_path / "ts.mdoc",
        angles,
        3.5,
        pixel_size=1.35,
        voltage_kv=300,
        defocus_um=defocus,
        date_times=times,
        sub_frame_paths=[f"frames/ts_{i:03d}.tif" for i in range(len(angles))],
        tilt_axis_angle_deg=85.0,
    )
    df = mdocfile.read(tmp_path / "ts.mdoc")
    np.testing.assert_array_equal(df["ZValue"], np.arange(len(angles)))
    np.testing.assert_allclose(df["TiltAngle"], angles)
    np.testing.assert_allclose(df["ExposureDose"], 3.5)
    np.testing.assert_allclose(df["PixelSpacing"], 1.35)
    np.testing.assert_allclose(df["Defocus"], defocus)
    np.testing.assert_allclose(df["Voltage"], 300.0)
    ours = read_mdoc(tmp_path / "ts.mdoc")
    np.testing.assert_array_equal(ours.acquisition_order, np.arange(len(angles)))
    np.testing.assert_allclose(ours.pre_exposure, 3.5 * np.arange(len(angles)))
    assert PureWindowsPath(ours.sub_frame_paths[2]).name == "ts_002.tif"


def test_acquisition_order_from_datetime(tmp_path):
    """When images are stored out of time order, DateTime decides the dose history."""
    start = datetime(2024, 5, 1, 12, 0, 0)
    times = [start + timedelta(minutes=m) for m in (2, 0, 1)]
    write_mdoc(tmp_path / "o.mdoc", [6.0, 0.0, 3.0], [1.0, 2.0, 4.0], 2.0, 300, date_times=times)
    m = read_mdoc(tmp_path / "o.mdoc")
    np.testing.assert_array_equal(m.acquisition_order, [1, 2, 0])
    np.testing.assert_allclose(m.pre_exposure, [6.0, 0.0, 2.0])


def test_missing_mdoc(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_mdoc(tmp_path / "none.mdoc")
