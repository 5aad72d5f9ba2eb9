"""IMOD/etomo and AreTomo alignment files, read and written as numbers (no geometry here).

* IMOD ``.xf``: one line ``A11 A12 A21 A22 DX DY`` per view (DX, DY in pixels of the raw stack);
  ``.tlt``/``.rawtlt``/``.xtilt``: one angle (degrees) per line; ``tilt.com``/``newst.com``:
  ``KEY value ...`` lines (``$`` command lines and ``#`` comments skipped); ``.edf``:
  ``key=value``.
* AreTomo/AreTomo3 ``.aln``: ``#`` header lines (``RawSize = w h n``, ``NumPatches``,
  ``DarkFrame = i j tilt``, ``AlphaOffset``, ``BetaOffset``, ``Thickness``), ten numbers per
  global row (SEC ROT GMAG TX TY SMEAN SFIT SCALE BASE TILT, TX/TY in pixels) and, after
  ``# Local Alignment``, seven numbers per patch row (read, not used by RELION).
* Warp/WarpTools tilt-series ``.xml`` (``<TiltSeries>``): newline-separated per-tilt elements
  ``Angles``, ``AxisAngle`` (deg), ``AxisOffsetX``/``AxisOffsetY`` (Å), ``UseTilt``
  (True/False), root attributes ``LevelAngleX``/``LevelAngleY`` (deg) and
  ``AreAnglesInverted``, and the grids ``GridMovementX``/``GridMovementY`` (Å; ``Width`` x
  ``Height`` x ``Depth`` nodes, depth = tilts).

We parse these ourselves rather than with the ``alnfile``/``etomofiles`` packages: measured
on ``../shared/data/formats``, alnfile 0.1.1 rejects a real AreTomo 1.3 file without
``AlphaOffset`` and does not return the dark frames, and etomofiles 0.1.2 needs the ``.st``
stack beside the ``.xf``. Every reader raises :class:`~subtomo.errors.InputError` naming the
file and line; writers replace the file atomically.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from subtomo.errors import InputError
from subtomo.io.atomic import atomic_path
from subtomo.io.files import read_utf8, require_file

__all__ = [
    "ALN_COLUMNS",
    "AlnFile",
    "WarpXml",
    "read_aln",
    "read_angles",
    "read_edf",
    "read_imod_com",
    "read_warp_xml",
    "read_xf",
    "write_aln",
    "write_angles",
    "write_xf",
]

ALN_COLUMNS = ("SEC", "ROT", "GMAG", "TX", "TY", "SMEAN", "SFIT", "SCALE", "BASE", "TILT")


def _numbers(path: Path, line_no: int, text: str, count: int | None) -> list[float]:
    try:
        values = [float(t) for t in text.split()]
    except ValueError:
        values = []
    if (
        not values
        or (count is not None and len(values) != count)
        or not np.all(np.isfinite(values))
    ):
        what = f"{count} numbers" if count is not None else "numbers"
        raise InputError(f"line {line_no}: expected {what}, found {text.strip()!r}", file=path)
    return values


def _data_lines(path: str | os.PathLike) -> tuple[Path, list[tuple[int, str]]]:
    path = require_file(path)
    lines = [(k + 1, s) for k, s in enumerate(read_utf8(path).splitlines()) if s.strip()]
    return path, lines


def read_xf(path: str | os.PathLike) -> np.ndarray:
    """``(n, 2, 3)`` float64: per view ``[[A11, A12, DX], [A21, A22, DY]]``."""
    path, lines = _data_lines(path)
    rows = [_numbers(path, k, s, 6) for k, s in lines]
    if not rows:
        raise InputError("no transforms (empty file)", file=path)
    a = np.array(rows)
    return np.stack([a[:, [0, 1, 4]], a[:, [2, 3, 5]]], axis=1)


def write_xf(path: str | os.PathLike, xf: np.ndarray) -> None:
    """Write ``(n, 2, 3)`` transforms in IMOD's layout (``%12.7f`` matrix, ``%12.3f`` shifts)."""
    xf = np.asarray(xf, dtype=np.float64) + 0.0  # no "-0.000"
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for m in xf:
            out.write(
                f"{m[0, 0]:12.7f}{m[0, 1]:12.7f}{m[1, 0]:12.7f}{m[1, 1]:12.7f}"
                f"{m[0, 2]:12.3f}{m[1, 2]:12.3f}\n"
            )


def read_angles(path: str | os.PathLike) -> np.ndarray:
    """``(n,)`` degrees from a ``.tlt``/``.rawtlt``/``.xtilt`` file (first number per line)."""
    path, lines = _data_lines(path)
    values = [_numbers(path, k, s, None)[0] for k, s in lines]
    if not values:
        raise InputError("no angles (empty file)", file=path)
    return np.array(values, dtype=np.float64)


def write_angles(path: str | os.PathLike, angles: np.ndarray) -> None:
    """One angle per line, ``%8.2f`` like IMOD's ``.tlt``."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.writelines(f"{a:8.2f}\n" for a in np.asarray(angles, dtype=np.float64))


def read_imod_com(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{KEY: [tokens]}`` of an IMOD command file (``tilt.com``, ``newst.com``)."""
    path, lines = _data_lines(path)
    out: dict[str, list[str]] = {}
    for _, text in lines:
        tokens = text.replace(",", " ").split()
        if tokens[0].startswith(("$", "#")):
            continue
        out[tokens[0]] = tokens[1:]
    return out


def read_edf(path: str | os.PathLike) -> dict[str, str]:
    """``{key: value}`` of an etomo ``.edf`` (Java properties)."""
    path, lines = _data_lines(path)
    return dict(
        (key.strip(), value.strip())
        for key, _, value in (s.partition("=") for _, s in lines if not s.startswith("#"))
    )


@dataclass
class AlnFile:
    """An AreTomo ``.aln``: header values, dark frames, global rows and local patches.

    ``rows`` is ``(m, 10)`` in :data:`ALN_COLUMNS` order as written (AreTomo writes them in
    ascending TILT); ``dark_frames`` holds ``(first index, second index, tilt deg)`` of each
    ``# DarkFrame`` line, whose index meaning differs between AreTomo versions (so callers
    match dark frames by tilt angle); ``raw_size`` is ``(w, h, n)`` or ``None``.
    """

    rows: np.ndarray
    raw_size: tuple[int, int, int] | None = None
    dark_frames: list[tuple[int, int, float]] = field(default_factory=list)
    alpha_offset: float = 0.0
    beta_offset: float = 0.0
    thickness: float | None = None
    local: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))

    def column(self, name: str) -> np.ndarray:
        """One global column by its AreTomo name (``"TX"``, ``"TILT"``...)."""
        return self.rows[:, ALN_COLUMNS.index(name)]


def read_aln(path: str | os.PathLike) -> AlnFile:
    """Parse an AreTomo/AreTomo3 ``.aln`` file (local patches kept in ``local``)."""
    path, lines = _data_lines(path)
    rows, local, darks = [], [], []
    header: dict[str, list[float]] = {}
    in_local = False
    for k, text in lines:
        stripped = text.strip()
        if stripped.startswith("#"):
            key, sep, value = stripped[1:].partition("=")
            key = key.strip()
            if key.lower().startswith("local alignment"):
                in_local = True
            elif sep and key == "DarkFrame":
                d = _numbers(path, k, value, 3)
                darks.append((int(d[0]), int(d[1]), d[2]))
            elif sep and key in ("RawSize", "NumPatches", "AlphaOffset", "BetaOffset", "Thickness"):
                header[key] = _numbers(path, k, value, None)
            continue
        if in_local:
            local.append(_numbers(path, k, stripped, 7))
        else:
            rows.append(_numbers(path, k, stripped, len(ALN_COLUMNS)))
    if not rows:
        raise InputError("no global alignment rows (SEC ROT GMAG TX TY ... TILT)", file=path)
    raw = header.get("RawSize")
    return AlnFile(
        rows=np.array(rows, dtype=np.float64),
        raw_size=(int(raw[0]), int(raw[1]), int(raw[2])) if raw and len(raw) >= 3 else None,
        dark_frames=darks,
        alpha_offset=header.get("AlphaOffset", [0.0])[0],
        beta_offset=header.get("BetaOffset", [0.0])[0],
        thickness=header["Thickness"][0] if "Thickness" in header else None,
        local=np.array(local, dtype=np.float64).reshape(-1, 7),
    )


def write_aln(path: str | os.PathLike, aln: AlnFile) -> None:
    """Write the global part of an ``.aln`` in AreTomo 2's layout (no local patches)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("# AreTomo Alignment / Priims bprmMn\n")
        if aln.raw_size is not None:
            out.write("# RawSize = {} {} {}\n".format(*aln.raw_size))
        out.write("# NumPatches = 0\n")
        for i, j, tilt in aln.dark_frames:
            out.write(f"# DarkFrame = {i:5d}{j:5d}{tilt:9.2f}\n")
        out.write(f"# AlphaOffset = {aln.alpha_offset:8.2f}\n")
        out.write(f"# BetaOffset = {aln.beta_offset:8.2f}\n")
        if aln.thickness is not None:
            out.write(f"# Thickness = {aln.thickness:g}\n")
        out.write(
            "# SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE"
            "     BASE     TILT\n"
        )
        for r in aln.rows:
            out.write(
                f"{int(r[0]):5d}{r[1]:11.4f}{r[2]:11.5f}{r[3]:11.3f}{r[4]:11.3f}"
                f"{r[5]:9.2f}{r[6]:9.2f}{r[7]:9.2f}{r[8]:9.2f}{r[9]:10.2f}\n"
            )


@dataclass
class WarpXml:
    """The rigid alignment of a Warp/WarpTools tilt-series ``.xml``, per tilt in file order.

    ``angles``, ``axis_angle`` (deg), ``offset`` ``(n, 2)`` (AxisOffsetX/Y, Å), ``use_tilt``;
    ``movement`` ``(n, 2)`` the global image movement (Å) when GridMovementX/Y are one node per
    tilt (or one for all), ``None`` when they vary across the image (local, not read);
    ``level_angles`` (LevelAngleX, LevelAngleY) deg; ``angles_inverted`` AreAnglesInverted.
    """

    angles: np.ndarray
    axis_angle: np.ndarray
    offset: np.ndarray
    use_tilt: np.ndarray
    movement: np.ndarray | None
    level_angles: tuple[float, float]
    angles_inverted: bool


def _xml_values(path: Path, root: ElementTree.Element, name: str, n: int | None) -> list[str]:
    element = root.find(name)
    tokens = (element.text or "").split() if element is not None else []
    if not tokens or (n is not None and len(tokens) != n):
        what = f"{n} values" if n is not None else "values"
        raise InputError(f"<{name}>: expected {what}, found {len(tokens)}", file=path)
    return tokens


def _xml_floats(path: Path, root: ElementTree.Element, name: str, n: int | None) -> np.ndarray:
    tokens = _xml_values(path, root, name, n)
    try:
        values = np.array([float(t) for t in tokens])
    except ValueError:
        values = np.array([np.nan])
    if not np.all(np.isfinite(values)):
        raise InputError(f"<{name}>: expected numbers", file=path)
    return values


def _grid_per_tilt(path: Path, root: ElementTree.Element, name: str, n: int) -> np.ndarray | None:
    """One value per tilt of a Warp grid with one node per tilt (or one node); ``None`` when
    it varies across the image."""
    grid = root.find(name)
    if grid is None:
        return np.zeros(n)
    try:
        width, height = int(grid.get("Width", "1")), int(grid.get("Height", "1"))
        nodes = [(int(node.get("Z", "0")), float(node.get("Value", "0"))) for node in grid]
    except ValueError:
        raise InputError(
            f"<{name}>: expected integer sizes and numeric node values", file=path
        ) from None
    if width * height != 1:
        return None
    values = dict(nodes)
    if len(values) == 1:
        return np.full(n, next(iter(values.values())))
    if sorted(values) != list(range(n)):
        raise InputError(f"<{name}>: {len(values)} nodes for {n} tilts", file=path)
    return np.array([values[z] for z in range(n)])


def read_warp_xml(path: str | os.PathLike) -> WarpXml:
    """Parse the rigid alignment of a Warp/WarpTools tilt-series ``.xml``."""
    path = require_file(path)
    try:
        root = ElementTree.fromstring(read_utf8(path).lstrip("\ufeff"))
    except ElementTree.ParseError as exc:
        raise InputError(f"not XML: {exc}", file=path) from None
    if root.tag != "TiltSeries":
        raise InputError(f"root element <{root.tag}>, expected <TiltSeries>", file=path)
    angles = _xml_floats(path, root, "Angles", None)
    n = len(angles)
    offset = np.stack([_xml_floats(path, root, f"AxisOffset{a}", n) for a in "XY"], axis=-1)
    use = [t.lower() for t in _xml_values(path, root, "UseTilt", n)]
    if any(t not in ("true", "false") for t in use):
        raise InputError("<UseTilt>: expected True or False per tilt", file=path)
    movement = [_grid_per_tilt(path, root, f"GridMovement{a}", n) for a in "XY"]
    try:
        level = (float(root.get("LevelAngleX", "0")), float(root.get("LevelAngleY", "0")))
    except ValueError:
        raise InputError("LevelAngleX/LevelAngleY are not numbers", file=path) from None
    return WarpXml(
        angles=angles,
        axis_angle=_xml_floats(path, root, "AxisAngle", n),
        offset=offset,
        use_tilt=np.array([t == "true" for t in use]),
        movement=None if any(m is None for m in movement) else np.stack(movement, axis=-1),
        level_angles=level,
        angles_inverted=root.get("AreAnglesInverted", "False").lower() == "true",
    )
