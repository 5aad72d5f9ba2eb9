"""SerialEM ``.mdoc`` tilt-series metadata: read with ``mdocfile``, write for simulations.

SerialEM units: TiltAngle in degrees, ExposureDose in e/Å² per image, PixelSpacing in Å,
Voltage in kV, Defocus in µm (SerialEM's sign: negative = underfocus). One section
``[ZValue = i]`` per image, in the order the images sit in the stack.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.errors import InputError
from subtomo.io.atomic import atomic_path
from subtomo.io.files import read_utf8, require_file

__all__ = ["MdocTiltSeries", "read_mdoc", "write_mdoc"]

#: SerialEM's DateTime forms, then Tomo5's (ISO-like, 4-digit years).
_DATE_FORMATS = (
    "%d-%b-%y  %H:%M:%S",
    "%d-%b-%Y  %H:%M:%S",
    "%d-%b-%y %H:%M:%S",
    "%d-%b-%Y %H:%M:%S",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%b-%d %H:%M:%S",
    "%d.%m.%Y %H:%M:%S",
)


@dataclass(frozen=True)
class MdocTiltSeries:
    """The tilt images of an mdoc, in file (ZValue) order.

    ``acquisition_order[k]`` is the index of the k-th image acquired (by DateTime, else
    ZValue); ``pre_exposure`` is the dose before each image (PriorRecordDose when given,
    else the cumulative ExposureDose of the images acquired before it), e/Å².
    """

    table: pd.DataFrame
    tilt_angles_deg: np.ndarray
    exposure_dose: np.ndarray
    pre_exposure: np.ndarray
    acquisition_order: np.ndarray
    pixel_size: float | None
    voltage_kv: float | None
    defocus_um: np.ndarray | None
    sub_frame_paths: list[str] | None


def _first_value(*columns: pd.Series | None) -> float | None:
    """The first finite number in the given columns (``None`` columns skipped)."""
    for column in columns:
        if column is None:
            continue
        values = pd.to_numeric(column, errors="coerce").dropna()
        if len(values):
            return float(values.iloc[0])
    return None


def _pixel_spacing_text(text: str) -> pd.Series:
    """Every ``PixelSpacing = x`` in the text (mdocfile drops it from frame-set sections)."""
    found = re.findall(r"^\s*PixelSpacing\s*=\s*(\S+)", text, flags=re.MULTILINE)
    return pd.Series(found, dtype=object)


def _parse_dates(values: pd.Series) -> list[datetime] | None:
    dates = []
    for text in values:
        if not isinstance(text, str):
            return None
        for fmt in _DATE_FORMATS:
            try:
                dates.append(datetime.strptime(text.strip(), fmt))
                break
            except ValueError:
                continue
        else:
            return None
    return dates


def read_mdoc(path: str | os.PathLike) -> MdocTiltSeries:
    """Tilt angles, doses, pixel size, voltage, defocus and acquisition order of an mdoc.

    Frame-set mdocs (``[FrameSet = n]`` sections) are read too: the ``[ZValue]`` sections
    are the images; pixel size and voltage fall back to any section that has them.
    """
    import mdocfile  # imported here: pydantic makes it slow to import for every command

    path = require_file(path)
    text = read_utf8(path)
    try:
        everything = mdocfile.read(path)
    except Exception as exc:  # mdocfile/pydantic raise many types on malformed text
        raise InputError(
            f"not a readable mdoc file ({type(exc).__name__}: {exc})", file=path
        ) from None
    if "ZValue" in everything.columns and everything["ZValue"].notna().any():
        table = everything[everything["ZValue"].notna()].reset_index(drop=True)
    else:
        table = everything
    if table.empty or "TiltAngle" not in table.columns:
        raise InputError("no tilt images ([ZValue] sections with TiltAngle)", file=path)
    if "ZValue" in table.columns and table["ZValue"].duplicated().any():
        z = table["ZValue"][table["ZValue"].duplicated()].iloc[0]
        raise InputError(f"section [ZValue = {z}] appears twice", file=path)
    angles = pd.to_numeric(table["TiltAngle"], errors="coerce").to_numpy(np.float64)
    if not np.isfinite(angles).all():
        row = int(np.flatnonzero(~np.isfinite(angles))[0])
        raise InputError(f"section [ZValue = {row}] has no valid TiltAngle", file=path)

    def column(name: str, default: float) -> np.ndarray:
        if name not in table.columns:
            return np.full(len(table), default)
        values = pd.to_numeric(table[name], errors="coerce").to_numpy(np.float64)
        return np.where(np.isfinite(values), values, default)

    dose = column("ExposureDose", 0.0)
    if (dose < 0).any():
        row = int(np.flatnonzero(dose < 0)[0])
        raise InputError(f"section [ZValue = {row}] has a negative ExposureDose", file=path)
    dates = _parse_dates(table["DateTime"]) if "DateTime" in table.columns else None
    if dates is not None:
        order = np.argsort(np.array(dates, dtype="datetime64[s]"), kind="stable")
    else:
        order = np.arange(len(table))
    if "PriorRecordDose" in table.columns and table["PriorRecordDose"].notna().all():
        pre = column("PriorRecordDose", 0.0)
    else:
        pre = np.empty(len(table))
        pre[order] = np.concatenate([[0.0], np.cumsum(dose[order])[:-1]])
    defocus = column("Defocus", np.nan) if "Defocus" in table.columns else None
    frames = None
    if "SubFramePath" in table.columns and table["SubFramePath"].notna().all():
        frames = [str(p) for p in table["SubFramePath"]]
    pixel_size = _first_value(
        table.get("PixelSpacing"), everything.get("PixelSpacing"), _pixel_spacing_text(text)
    )
    voltage = _first_value(table.get("Voltage"), everything.get("Voltage"))
    for name, value in (("PixelSpacing", pixel_size), ("Voltage", voltage)):
        if value is not None and value <= 0:
            raise InputError(f"{name} = {value:g}, expected > 0", file=path)
    return MdocTiltSeries(
        table=table,
        tilt_angles_deg=angles,
        exposure_dose=dose,
        pre_exposure=pre,
        acquisition_order=order,
        pixel_size=pixel_size,
        voltage_kv=voltage,
        defocus_um=defocus,
        sub_frame_paths=frames,
    )


def write_mdoc(
    path: str | os.PathLike,
    tilt_angles_deg: Sequence[float] | np.ndarray,
    exposure_dose: float | Sequence[float] | np.ndarray,
    pixel_size: float,
    voltage_kv: float,
    *,
    defocus_um: Sequence[float] | np.ndarray | None = None,
    date_times: Sequence[datetime] | None = None,
    sub_frame_paths: Sequence[str] | None = None,
    image_file: str | None = None,
    image_size: tuple[int, int] | None = None,
    tilt_axis_angle_deg: float | None = None,
    frames_per_tilt: int | None = None,
) -> None:
    """Write a SerialEM-style tilt-series mdoc, one ``[ZValue = i]`` per tilt, atomically.

    The arrays are in acquisition order (image i of the stack = i-th exposure).
    ``exposure_dose`` is e/Å² per tilt (one value for all, or one per tilt). ``defocus_um``
    uses SerialEM's sign (negative = underfocus). ``tilt_axis_angle_deg`` is written in the
    title line as SerialEM does ("Tilt axis angle = ...") and as RotationAngle;
    ``frames_per_tilt`` as NumSubFrames (the movies named by ``sub_frame_paths``).
    """
    angles = np.asarray(tilt_angles_deg, dtype=np.float64)
    n = len(angles)
    doses = np.broadcast_to(np.asarray(exposure_dose, dtype=np.float64), (n,))
    for name, values in (
        ("defocus_um", defocus_um),
        ("date_times", date_times),
        ("sub_frame_paths", sub_frame_paths),
    ):
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} tilts")
    lines = [f"PixelSpacing = {pixel_size:g}", f"Voltage = {voltage_kv:g}"]
    if image_file is not None:
        lines.append(f"ImageFile = {image_file}")
    if image_size is not None:
        lines.append(f"ImageSize = {image_size[0]} {image_size[1]}")
    lines += ["", "[T = SerialEM-style mdoc written by subtomo]", ""]
    if tilt_axis_angle_deg is not None:
        lines += [f"[T =     Tilt axis angle = {tilt_axis_angle_deg:g}, binning = 1]", ""]
    for i in range(n):
        lines += [
            f"[ZValue = {i}]",
            f"TiltAngle = {angles[i]:.10g}",
            f"ExposureDose = {doses[i]:.10g}",
            f"PixelSpacing = {pixel_size:g}",
            f"Voltage = {voltage_kv:g}",
        ]
        if defocus_um is not None:
            lines.append(f"Defocus = {float(defocus_um[i]):.10g}")
        if tilt_axis_angle_deg is not None:
            lines.append(f"RotationAngle = {tilt_axis_angle_deg:g}")
        if sub_frame_paths is not None:
            lines.append(f"SubFramePath = {sub_frame_paths[i]}")
        if frames_per_tilt is not None:
            lines.append(f"NumSubFrames = {frames_per_tilt}")
        if date_times is not None:
            lines.append(f"DateTime = {date_times[i].strftime(_DATE_FORMATS[0])}")
        lines.append("")
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
