"""Particle coordinates written by other pickers and tools (conventions §16).

Every reader returns a :class:`PickTable`: one row per point with ``tomo`` (the tomogram the
file names, ``""`` where it names none), ``x``, ``y``, ``z`` and, where the file has them,
``rot``, ``tilt``, ``psi`` (RELION ZYZ degrees of ``A``, reference -> tomogram, §4; copick
gives matrices instead, :attr:`PickTable.rotations`), ``group`` (a label of the vesicle or
contour a point belongs to) and ``radius`` (a sphere's radius, same unit as x). ``unit`` says
what x, y, z are:

* ``"voxel"``: 0-based voxel coordinates of the file's tomogram, integer values on voxel
  centres (each reader converts its format's origin to this, §16.2);
* ``"angst"``: Å from the centre of voxel (0, 0, 0) (copick, CSV in Å);
* ``"centred_angst"``: RELION 5's rlnCenteredCoordinate*Angst (pytom-match-pick
  ``--relion5-compat``).

``pixel_size`` is the voxel size in Å a file states (pytom's rlnDetectorPixelSize), else None.
Only :mod:`subtomo.io.star` reads STAR text (crYOLO's ``.cbox`` is STAR too).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import dynamotable
import imodmodel
import numpy as np
import pandas as pd

from subtomo.errors import InputError
from subtomo.io.files import read_utf8, require_file
from subtomo.io.star import numeric_column, read_star, require_columns

__all__ = [
    "FORMATS",
    "PickTable",
    "dynamo_to_relion_angles",
    "read_cbox",
    "read_copick",
    "read_csv",
    "read_dynamo",
    "read_imod_model",
    "read_pick_file",
    "read_star_points",
]

#: ``--format`` names and the file endings that select them under ``auto``.
FORMATS = {
    "dynamo": (".tbl",),
    "imod": (".mod",),
    "cbox": (".cbox",),
    "star": (".star",),
    "copick": (".json",),
    "csv": (".csv", ".txt"),
}

_XYZ = ("x", "y", "z")


@dataclass(frozen=True)
class PickTable:
    """Points read from a file (see the module docstring for the columns and units);
    ``rotations`` ``(n, 3, 3)``: RELION's ``A`` of each point where the file gives matrices."""

    table: pd.DataFrame
    unit: str = "voxel"
    pixel_size: float | None = None
    source: str = ""
    rotations: np.ndarray | None = None


def dynamo_to_relion_angles(tdrot: np.ndarray, tilt: np.ndarray, narot: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) ``(n, 3)`` of Dynamo's ZXZ (tdrot, tilt, narot), degrees.

    Dynamo's matrix ``Rz(narot) Rx(tilt) Rz(tdrot)`` is RELION's ``A^T``; with
    ``Rx(t) = Rz(-90) Ry(t) Rz(90)`` this is (rot, tilt, psi) = (narot - 90, tilt, tdrot + 90)
    (§16.2), wrapped to (-180, 180].
    """
    angles = np.column_stack([narot - 90.0, tilt, tdrot + 90.0])
    return -((-angles + 180.0) % 360.0) + 180.0


def read_dynamo(path: str | os.PathLike, doc: str | os.PathLike | None = None) -> PickTable:
    """A Dynamo table (``dynamotable``): position ``x + dx - 0.5`` etc. (Dynamo's coordinate
    origin is the corner of voxel [1,1,1], so voxel centres sit at half-integers), angles
    converted by :func:`dynamo_to_relion_angles`; ``tomo`` is the tomogram file's stem from
    the ``.doc`` map (``doc``, or ``<table>.doc`` beside it), else the tomogram number.
    """
    path = require_file(path)
    doc_path = Path(doc) if doc else path.with_suffix(".doc")
    try:
        df = dynamotable.read(str(path))
    except Exception as exc:  # pandas raises many types on malformed text
        raise InputError(f"not a readable Dynamo table ({type(exc).__name__})", file=path) from None
    for number, name in ((24, "x"), (4, "dx"), (7, "tdrot"), (20, "tomo")):
        if name not in df.columns:
            raise InputError(f"a Dynamo table needs >= {max(26, number)} columns", file=path)
    values = {c: numeric_column(df, c, path, "table") for c in ("x", "y", "z", "dx", "dy", "dz")}
    out = pd.DataFrame({a: values[a] + values[f"d{a}"] - 0.5 for a in _XYZ})
    angles = dynamo_to_relion_angles(
        *(numeric_column(df, c, path, "table") for c in ("tdrot", "tilt", "narot"))
    )
    out["rot"], out["tilt"], out["psi"] = angles.T
    tomo_number = numeric_column(df, "tomo", path, "table").astype(int)
    names = {n: str(n) for n in np.unique(tomo_number)}
    if doc is not None or doc_path.is_file():
        for line in read_utf8(require_file(doc_path)).splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].lstrip("-").isdigit():
                names[int(parts[0])] = Path(parts[1]).stem
    out["tomo"] = [names[n] for n in tomo_number]
    return PickTable(out, "voxel", source=str(path))


def read_imod_model(path: str | os.PathLike) -> PickTable:
    """An IMOD model (``imodmodel``): each contour is a ``group`` ("object.contour", from 1).
    IMOD puts the centre of voxel (0, 0, 0) at model point (0.5, 0.5, 0), so x and y lose 0.5
    and z (a section index) stays. The model's own scale and offsets (refcurscale,
    refoldtrans) are not applied.
    """
    path = require_file(path)
    try:
        df = imodmodel.read(path)
    except Exception as exc:  # the binary parser raises many types
        raise InputError(f"not a readable IMOD model ({type(exc).__name__})", file=path) from None
    if df.empty:
        raise InputError("the model has no points", file=path)
    out = pd.DataFrame(
        {
            "x": df["x"].to_numpy(np.float64) - 0.5,
            "y": df["y"].to_numpy(np.float64) - 0.5,
            "z": df["z"].to_numpy(np.float64),
            "tomo": "",
        }
    )
    out["group"] = [  # 3dmod numbers objects and contours from 1
        f"{o + 1}.{c + 1}" for o, c in zip(df["object_id"], df["contour_id"], strict=True)
    ]
    return PickTable(out, "voxel", source=str(path))


def read_cbox(path: str | os.PathLike) -> PickTable:
    """A crYOLO ``.cbox`` (STAR, block ``data_cryolo``): _CoordinateX/Y are the box's
    lower-left corner, so the centre is X + _Width/2, Y + _Height/2; _CoordinateZ is the
    centre slice. Voxel units of the picked tomogram; rows with NaN z (2D picks) are an error.
    """
    path = require_file(path)
    blocks = read_star(path)
    df = blocks.get("cryolo")
    if not isinstance(df, pd.DataFrame):
        raise InputError("missing block data_cryolo", file=path)
    cols = ("_CoordinateX", "_CoordinateY", "_CoordinateZ", "_Width", "_Height")
    df = df.rename(columns=lambda c: c if c.startswith("_") else "_" + c)
    require_columns(df, cols, path, "cryolo")
    x, y, z, w, h = (numeric_column(df, c, path, "cryolo") for c in cols)
    out = pd.DataFrame({"x": x + w / 2, "y": y + h / 2, "z": z, "tomo": ""})
    return PickTable(out, "voxel", source=str(path))


def read_star_points(path: str | os.PathLike) -> PickTable:
    """A STAR file of points: pytom-match-pick's particles (rlnCoordinateX/Y/Z voxels of the
    searched tomogram, RELION angles, rlnDetectorPixelSize, rlnMicrographName; or RELION 5
    rlnCenteredCoordinate*Angst with ``--relion5-compat``), or RELION 5 picker annotations
    (``<tomo>_spheres.star`` with rlnSphereRadius; rlnTomoManifoldIndex groups points). The
    first block with coordinates is read; the tomogram is rlnTomoName, else the stem of
    rlnMicrographName, else the file name before its last ``_`` (as RELION's picker).
    """
    path = require_file(path)
    blocks = read_star(path)
    block, df = next(
        (
            (name, b)
            for name, b in blocks.items()
            if isinstance(b, pd.DataFrame)
            and ("rlnCoordinateX" in b.columns or "rlnCenteredCoordinateXAngst" in b.columns)
        ),
        (None, None),
    )
    if df is None:
        raise InputError(
            "no table with rlnCoordinateX/Y/Z or rlnCenteredCoordinateX/Y/ZAngst", file=path
        )
    carried = [c for c in df.columns if c.startswith(("rlnTomoSubtomogram", "rlnOrigin"))]
    if carried:
        raise InputError(
            f"carries {carried[0]}: a RELION particle file, not picks; give it to the jobs as "
            "--particles directly (RELION 4 and 5 particle files are read as they are)",
            file=path,
            block=block,
        )
    centred = "rlnCenteredCoordinateXAngst" in df.columns
    cols = [f"rlnCenteredCoordinate{a}Angst" if centred else f"rlnCoordinate{a}" for a in "XYZ"]
    out = pd.DataFrame(
        {a: numeric_column(df, c, path, block) for a, c in zip(_XYZ, cols, strict=True)}
    )
    for ours, label in (("rot", "rlnAngleRot"), ("tilt", "rlnAngleTilt"), ("psi", "rlnAnglePsi")):
        if label in df.columns:
            out[ours] = numeric_column(df, label, path, block)
    if "rlnSphereRadius" in df.columns:
        out["radius"] = numeric_column(df, "rlnSphereRadius", path, block, positive=True)
    if "rlnTomoManifoldIndex" in df.columns:
        out["group"] = numeric_column(df, "rlnTomoManifoldIndex", path, block).astype(int)
    if "rlnTomoName" in df.columns:
        out["tomo"] = df["rlnTomoName"].astype(str).to_numpy()
    elif "rlnMicrographName" in df.columns:
        out["tomo"] = [Path(str(m)).stem for m in df["rlnMicrographName"]]
    else:
        out["tomo"] = path.stem.rsplit("_", 1)[0] if "_" in path.stem else ""
    size = None
    if "rlnDetectorPixelSize" in df.columns and not centred:
        size = float(numeric_column(df, "rlnDetectorPixelSize", path, block, positive=True)[0])
    return PickTable(out, "centred_angst" if centred else "voxel", size, str(path))


def read_copick(path: str | os.PathLike) -> PickTable:
    """A copick picks JSON: ``points[].location`` x/y/z in Å (voxel i at i x voxel size),
    ``transformation_`` a 4x4 from object to tomogram space (copick's ``CopickPoint``): its
    rotation is RELION's ``A`` (reference -> tomogram) and its translation (Å) is added to
    the location; ``tomo`` = run_name.
    """
    path = require_file(path)
    try:
        data = json.loads(read_utf8(path))
        points = data["points"]
        loc = np.array([[p["location"][a] for a in _XYZ] for p in points], dtype=np.float64)
        mats = np.array([p.get("transformation_", np.eye(4)) for p in points], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"not a copick picks file ({type(exc).__name__}: {exc})", file=path
        ) from None
    if len(points) == 0:
        raise InputError("the picks file has no points", file=path)
    if mats.shape[1:] != (4, 4) or not np.all(np.isfinite(mats)) or not np.all(np.isfinite(loc)):
        raise InputError("transformation_ must be finite 4x4 matrices", file=path)
    out = pd.DataFrame(loc + mats[:, :3, 3], columns=list(_XYZ))
    out["tomo"] = str(data.get("run_name") or "")
    return PickTable(out, "angst", source=str(path), rotations=mats[:, :3, :3])


def read_csv(path: str | os.PathLike, unit: str = "voxel") -> PickTable:
    """A CSV with a header: ``x``, ``y``, ``z`` (``unit`` "voxel": 0-based voxel coordinates;
    "angst": Å from voxel (0, 0, 0)), optional ``tomo`` (or rlnTomoName), ``rot``, ``tilt``,
    ``psi`` (RELION degrees), ``group`` and ``radius``.
    """
    if unit not in ("voxel", "angst"):
        raise InputError(f"--csv_unit must be voxel or angst, got {unit!r}")
    path = require_file(path)
    try:
        df = pd.read_csv(path, sep=None, engine="python", dtype={"tomo": str, "rlnTomoName": str})
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"not a readable CSV ({exc})", file=path) from None
    df.columns = [str(c).strip() for c in df.columns]
    require_columns(df, _XYZ, path, "csv")
    out = pd.DataFrame({a: numeric_column(df, a, path, "csv") for a in _XYZ})
    for c in ("rot", "tilt", "psi", "radius"):
        if c in df.columns:
            out[c] = numeric_column(df, c, path, "csv", positive=c == "radius")
    if "group" in df.columns:
        out["group"] = df["group"].astype(str).to_numpy()
    name = "tomo" if "tomo" in df.columns else "rlnTomoName"
    out["tomo"] = df[name].astype(str).to_numpy() if name in df.columns else ""
    return PickTable(out, unit, source=str(path))


def read_pick_file(
    path: str | os.PathLike,
    fmt: str = "auto",
    *,
    doc: str | os.PathLike | None = None,
    csv_unit: str = "voxel",
) -> PickTable:
    """Read ``path`` as ``fmt`` (one of :data:`FORMATS`, or "auto": by file ending)."""
    path = Path(path)
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = next((f for f, ends in FORMATS.items() if suffix in ends), "")
        if not fmt:
            raise InputError(
                f"cannot tell the format from the ending {suffix!r}: give --format", file=path
            )
    readers = {
        "dynamo": lambda: read_dynamo(path, doc),
        "imod": lambda: read_imod_model(path),
        "cbox": lambda: read_cbox(path),
        "star": lambda: read_star_points(path),
        "copick": lambda: read_copick(path),
        "csv": lambda: read_csv(path, csv_unit),
    }
    if fmt not in readers:
        raise InputError(f"unknown format {fmt!r}; choose from auto, {', '.join(readers)}")
    return readers[fmt]()
