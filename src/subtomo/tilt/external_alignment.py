"""IMOD, AreTomo and Warp alignments as RELION 5 per-tilt columns, and back (relion5-upstream.md
§5).

The columns are those of the projection model of conventions §1.3: ``rlnTomoXTilt`` (0 from
both tools), ``rlnTomoYTilt``, ``rlnTomoZRot`` (degrees) and ``rlnTomoXShiftAngst``,
``rlnTomoYShiftAngst`` (Å, the raw-image offset of the projected specimen centre from the image
centre). Conversions (conventions §14):

* IMOD ``.xf`` maps raw to aligned image coordinates about the centre, ``x_ali = A x_raw + d``,
  with ``A = R(-ZRot)``: ``rlnTomoZRot = atan2(A12 - A21, A11 + A22)``, shifts ``-A⁻¹ d · px``;
  ``rlnTomoYTilt = tlt - AngleOffset``. RELION takes ``±acos(A11)`` with the sign of
  ``rlnTomoNominalTiltAxisAngle``; both agree whenever that nominal angle has the fitted sign,
  and ours needs no nominal angle. ``.xtilt`` is not used (as RELION).
* AreTomo ``.aln``: ``rlnTomoYTilt = TILT``, ``rlnTomoZRot = ROT``, shifts ``(TX, TY) · px``;
  dark frames are dropped from the table. Rows are matched to tilts by tilt angle, not by
  ``SEC``: real files number SEC from 0 or 1, before or after dark-frame removal
  (``../shared/data/formats/aretomo``), while dark frames always carry their nominal tilt and
  AreTomo writes the rows in ascending tilt.

* Warp/WarpTools ``.xml`` (conventions §18): ``rlnTomoYTilt = -(Angle + LevelAngleY)``,
  ``rlnTomoXTilt = LevelAngleX``, ``rlnTomoZRot = AxisAngle``, shifts = AxisOffset minus a
  global GridMovement (Å, no pixel size needed); ``UseTilt False`` rows leave the table;
  rows matched to tilts by angle.

``scale`` is the binning of the alignment files' pixels relative to the tilt images (shifts in
file pixels times ``scale`` are tilt-image pixels). Tensors are not needed: numpy in and out.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from subtomo.io.alignment_files import ALN_COLUMNS, AlnFile, WarpXml

__all__ = [
    "ALIGNMENT_COLUMNS",
    "aretomo_to_relion",
    "imod_to_relion",
    "relion_to_aretomo",
    "relion_to_imod",
    "view_order",
    "warp_to_relion",
]

ALIGNMENT_COLUMNS = (
    "rlnTomoXTilt",
    "rlnTomoYTilt",
    "rlnTomoZRot",
    "rlnTomoXShiftAngst",
    "rlnTomoYShiftAngst",
)


def view_order(tilts: pd.DataFrame) -> np.ndarray:
    """Row order of IMOD views and of RELION's aligned tables: ascending
    rlnTomoNominalStageTiltAngle (else rlnTomoYTilt, else as given), stable."""
    for column in ("rlnTomoNominalStageTiltAngle", "rlnTomoYTilt"):
        if column in tilts.columns:
            return np.argsort(tilts[column].to_numpy(dtype=np.float64), kind="stable")
    return np.arange(len(tilts))


def _columns(y_tilt, z_rot, shifts_px, pixel_size: float) -> dict[str, np.ndarray]:
    y_tilt = np.asarray(y_tilt, dtype=np.float64)
    return {
        "rlnTomoXTilt": np.zeros_like(y_tilt),
        "rlnTomoYTilt": y_tilt,
        "rlnTomoZRot": np.asarray(z_rot, dtype=np.float64),
        "rlnTomoXShiftAngst": shifts_px[:, 0] * pixel_size,
        "rlnTomoYShiftAngst": shifts_px[:, 1] * pixel_size,
    }


def imod_to_relion(
    xf: np.ndarray,
    tlt: np.ndarray,
    pixel_size: float,
    *,
    angle_offset: float = 0.0,
    scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """RELION columns from ``.xf`` ``(n, 2, 3)`` and ``.tlt`` ``(n,)`` (degrees), view order.

    ``angle_offset`` is tiltalign's AngleOffset (degrees, folded into the ``.tlt``);
    ``pixel_size`` is ``rlnTomoTiltSeriesPixelSize`` (Å).
    """
    xf = np.asarray(xf, dtype=np.float64)
    a, d = xf[:, :, :2], xf[:, :, 2]
    z_rot = np.degrees(np.arctan2(a[:, 0, 1] - a[:, 1, 0], a[:, 0, 0] + a[:, 1, 1]))
    shifts = -np.linalg.solve(a, d[..., None])[..., 0] * scale
    return _columns(np.asarray(tlt) - angle_offset, z_rot, shifts, pixel_size)


def relion_to_imod(
    columns: Mapping[str, np.ndarray], pixel_size: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(.xf (n, 2, 3), .tlt (n,))`` of RELION columns in row order (pure rotations)."""
    z = np.radians(np.asarray(columns["rlnTomoZRot"], dtype=np.float64))
    c, s = np.cos(z), np.sin(z)
    a = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)  # R(-ZRot)
    shifts = np.stack([columns["rlnTomoXShiftAngst"], columns["rlnTomoYShiftAngst"]], -1)
    d = -(a @ (np.asarray(shifts, dtype=np.float64) / pixel_size)[..., None])[..., 0]
    return np.concatenate([a, d[..., None]], axis=-1), np.asarray(columns["rlnTomoYTilt"], float)


def aretomo_to_relion(
    aln: AlnFile, nominal_tilts: np.ndarray, pixel_size: float, *, scale: float = 1.0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(kept rows, columns)``: which rows of a series (by ``nominal_tilts``, degrees, table
    order) the ``.aln`` aligns and their RELION columns, in that row order.

    Each dark frame removes the remaining row whose nominal tilt is nearest its tilt.
    ``ValueError`` when the rows left and the ``.aln``'s rows differ in number.
    """
    nominal = np.asarray(nominal_tilts, dtype=np.float64)
    left = np.ones(len(nominal), dtype=bool)
    for _, _, tilt in aln.dark_frames:
        if not left.any():
            break
        candidates = np.flatnonzero(left)
        left[candidates[np.argmin(np.abs(nominal[candidates] - tilt))]] = False
    kept = np.flatnonzero(left)
    if len(kept) != len(aln.rows):
        raise ValueError(
            f"{len(aln.rows)} alignment rows and {len(aln.dark_frames)} dark frames for a "
            f"series of {len(nominal)} tilts"
        )
    kept = kept[np.argsort(nominal[kept], kind="stable")]
    rows = aln.rows[np.argsort(aln.column("TILT"), kind="stable")]
    shifts = rows[:, [ALN_COLUMNS.index("TX"), ALN_COLUMNS.index("TY")]] * scale
    columns = _columns(
        rows[:, ALN_COLUMNS.index("TILT")], rows[:, ALN_COLUMNS.index("ROT")], shifts, pixel_size
    )
    order = np.argsort(kept, kind="stable")
    return kept[order], {k: v[order] for k, v in columns.items()}


def relion_to_aretomo(
    columns: Mapping[str, np.ndarray], pixel_size: float, image_size: tuple[int, int] | None
) -> AlnFile:
    """An ``.aln`` for the table's rows: SEC = 0-based row (RELION's stack order), rows in
    ascending TILT, RawSize ``(w, h, n)`` when the image size is known."""
    y_tilt = np.asarray(columns["rlnTomoYTilt"], dtype=np.float64)
    n = len(y_tilt)
    rows = np.zeros((n, len(ALN_COLUMNS)))
    rows[:, ALN_COLUMNS.index("SEC")] = np.arange(n)
    rows[:, ALN_COLUMNS.index("ROT")] = columns["rlnTomoZRot"]
    rows[:, [ALN_COLUMNS.index(c) for c in ("GMAG", "SMEAN", "SFIT", "SCALE")]] = 1.0
    rows[:, ALN_COLUMNS.index("TX")] = np.asarray(columns["rlnTomoXShiftAngst"]) / pixel_size
    rows[:, ALN_COLUMNS.index("TY")] = np.asarray(columns["rlnTomoYShiftAngst"]) / pixel_size
    rows[:, ALN_COLUMNS.index("TILT")] = y_tilt
    order = np.argsort(y_tilt, kind="stable")
    raw = None if image_size is None else (int(image_size[0]), int(image_size[1]), n)
    return AlnFile(rows=rows[order], raw_size=raw)


def warp_to_relion(
    xml: WarpXml, nominal_tilts: np.ndarray, tolerance_deg: float = 1.0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(kept rows, columns)``: the rows of a series (by ``nominal_tilts``, degrees, table
    order) that the ``.xml`` uses (UseTilt) and their RELION columns, in that row order.

    Each row takes the ``.xml`` tilt nearest its nominal angle; ``ValueError`` when one is
    farther than ``tolerance_deg``, when two rows take one tilt, for AreAnglesInverted or for
    image movement that varies across the image (local alignment, not representable).
    """
    if xml.angles_inverted:
        raise ValueError("AreAnglesInverted=True is not supported")
    if xml.movement is None:
        raise ValueError("GridMovementX/Y vary across the image (local alignment)")
    nominal = np.asarray(nominal_tilts, dtype=np.float64)
    nearest = np.abs(nominal[:, None] - xml.angles[None, :]).argmin(axis=1)
    gap = np.abs(nominal - xml.angles[nearest])
    if gap.max() > tolerance_deg:
        row = int(gap.argmax())
        raise ValueError(f"no tilt within {tolerance_deg}° of the nominal {nominal[row]:g}°")
    if len(set(nearest.tolist())) != len(nearest):
        raise ValueError("two tilts of the series match one tilt of the .xml")
    kept = np.flatnonzero(xml.use_tilt[nearest])
    index = nearest[kept]
    level_x, level_y = xml.level_angles
    shifts = xml.offset[index] - xml.movement[index]
    return kept, {
        "rlnTomoXTilt": np.full(len(kept), level_x),
        "rlnTomoYTilt": -(xml.angles[index] + level_y),
        "rlnTomoZRot": xml.axis_angle[index].astype(np.float64),
        "rlnTomoXShiftAngst": shifts[:, 0],
        "rlnTomoYShiftAngst": shifts[:, 1],
    }
