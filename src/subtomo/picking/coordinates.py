"""Picked positions to RELION 5 particle rows (conventions §1.3, §16).

Positions become rlnCenteredCoordinate*Angst with the C++ centre of §1.3: binned voxel v of a
tomogram binned by b is bin-1 pixel b·v, and ``C = (b·v - S/2)·px`` with S = (W, H, D) the
bin-1 tomogram size and px the tilt-series pixel size. RELION's Python picker subtracts
``S/2 - 1`` instead (relion5-upstream.md §7.2, one bin-1 pixel off); subtomo does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.data import TiltSeries, TomogramSet
from subtomo.errors import InputError
from subtomo.geometry import euler_to_matrix, matrix_to_euler, surface_orientations
from subtomo.io.coordinate_files import PickTable

__all__ = [
    "LocatedPicks",
    "binned_shape",
    "centred_angst",
    "inside_tomogram",
    "locate_picks",
    "normals_of_rows",
    "particle_rows",
    "surface_particle_rows",
    "tomogram_binning",
]

_CENTRED = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
_TOMOGRAM_FILES = (
    "rlnTomoReconstructedTomogram",
    "rlnTomoReconstructedTomogramDenoised",
    "rlnTomoDenoisedTomogram",
    "rlnTomoReconstructedTomogramHalf1",
    "rlnTomoReconstructedTomogramHalf2",
)


def centred_angst(
    xyz: np.ndarray,
    unit: str,
    *,
    binning: float,
    pixel_size: float,
    tomogram_size: Sequence[int],
) -> np.ndarray:
    """``(n, 3)`` rlnCenteredCoordinate*Angst of points ``xyz`` ``(n, 3)`` given in ``unit``.

    "voxel": 0-based voxels of the tomogram binned by ``binning`` (``C = (b·v - S/2)·px``);
    "angst": Å from the centre of voxel (0, 0, 0) (``C = a - S/2·px``); "centred_angst":
    unchanged.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    half = np.asarray(tomogram_size, dtype=np.float64) / 2 * pixel_size
    if unit == "voxel":
        if not binning > 0:
            raise InputError(f"binning must be positive, got {binning:g}")
        return xyz * binning * pixel_size - half
    if unit == "angst":
        return xyz - half
    if unit == "centred_angst":
        return xyz.copy()
    raise InputError(f"unknown coordinate unit {unit!r}")


@dataclass(frozen=True)
class LocatedPicks:
    """Picks placed in their tomograms: ``names`` (n,) rlnTomoName, ``centred`` (n, 3)
    rlnCenteredCoordinate*Angst, ``radius`` (n,) Å or None, ``angles`` (n, 3) RELION degrees
    or None, ``binning`` {tomogram: b used for voxel units}."""

    names: np.ndarray
    centred: np.ndarray
    radius: np.ndarray | None
    angles: np.ndarray | None
    binning: dict[str, float]


def locate_picks(
    picks: PickTable, tomograms: TomogramSet, *, binning: float = 0.0, tomo_name: str = ""
) -> LocatedPicks:
    """Place ``picks`` in ``tomograms``: name each row's tomogram and convert its position.

    A row names its tomogram by rlnTomoName or by the stem of a tomogram file the set lists
    (rlnTomoReconstructedTomogram, its halves or denoised version: Dynamo's .doc and pytom
    name files); a row that names none takes ``tomo_name``, or the only tomogram of the set.
    The binning of voxel coordinates is :func:`tomogram_binning`. ``InputError`` for a tomogram
    the set lacks.
    """
    table = picks.table
    files = _tomogram_files(tomograms)
    names = np.array(
        [str(n) if str(n) in tomograms else files.get(str(n), str(n)) for n in table["tomo"]],
        dtype=object,
    )
    default = tomo_name or (tomograms.names[0] if len(tomograms) == 1 else "")
    names[names == ""] = default
    if (names == "").any():
        raise InputError(
            f"the file names no tomogram and {len(tomograms)} are given: use --tomo_name",
            file=picks.source,
        )
    centred = np.empty((len(table), 3))
    radius = table["radius"].to_numpy(np.float64).copy() if "radius" in table else None
    used: dict[str, float] = {}
    xyz = table[["x", "y", "z"]].to_numpy(np.float64)
    for name in pd.unique(names):
        if name not in tomograms:
            raise InputError(
                f"tomogram {name!r} is not in the tomograms file ({', '.join(tomograms.names)})",
                file=picks.source,
            )
        series = tomograms[name]
        px = series.pixel_size
        b = tomogram_binning(series, binning, picks.pixel_size)
        rows = names == name
        centred[rows] = centred_angst(
            xyz[rows], picks.unit, binning=b, pixel_size=px, tomogram_size=series.tomogram_size
        )
        if radius is not None and picks.unit == "voxel":
            radius[rows] *= b * px
        used[name] = b
    angles = None
    if picks.rotations is not None:
        angles = _degrees(picks.rotations)
    elif "rot" in table:
        angles = table[["rot", "tilt", "psi"]].to_numpy(np.float64)
    return LocatedPicks(names, centred, radius, angles, used)


def _tomogram_files(tomograms: TomogramSet) -> dict[str, str]:
    """{file stem: rlnTomoName} of the tomogram files the set lists (pickers name the file)."""
    table = tomograms.global_table
    out = {}
    for column in _TOMOGRAM_FILES:
        if column in table.columns:
            for name, path in zip(table["rlnTomoName"], table[column], strict=True):
                if isinstance(path, str) and path:
                    out[Path(path).stem] = str(name)
    return out


def tomogram_binning(
    series: TiltSeries, given: float = 0.0, voxel_size: float | None = None
) -> float:
    """Binning of a tomogram the picks were made on: ``given`` when > 0, else the file's
    ``voxel_size`` (Å) over the tilt-series pixel size, else rlnTomoTomogramBinning, else 1."""
    if given > 0:
        return float(given)
    if voxel_size is not None and voxel_size > 0:
        return voxel_size / series.pixel_size
    value = pd.to_numeric(series.row.get("rlnTomoTomogramBinning"), errors="coerce")
    return float(value) if np.isfinite(value) and value > 0 else 1.0


def binned_shape(tomogram_size: Sequence[int], binning: float) -> tuple[int, int, int]:
    """(x, y, z) voxels of the tomogram binned by ``binning`` as RELION reconstructs it
    (§1.3): round(W/b), round(H/b), floor(D/b)."""
    w, h, d = tomogram_size
    return round(w / binning), round(h / binning), int(d // binning)


def inside_tomogram(
    centred: np.ndarray, tomogram_size: Sequence[int], pixel_size: float
) -> np.ndarray:
    """``(n,)`` whether positions ``centred`` (Å, §1.3) lie inside the bin-1 tomogram."""
    p = centred / pixel_size + np.asarray(tomogram_size, dtype=np.float64) / 2
    return np.all((p >= 0) & (p < np.asarray(tomogram_size)), axis=1)


def particle_rows(
    tomo_names: Sequence[str], centred: np.ndarray, angles: np.ndarray | None = None
) -> pd.DataFrame:
    """A RELION 5 data_particles table: rlnTomoName, rlnCenteredCoordinate*Angst and, with
    ``angles`` ``(n, 3)``, rlnAngleRot/Tilt/Psi (degrees)."""
    df = pd.DataFrame({"rlnTomoName": [str(n) for n in tomo_names]})
    for k, col in enumerate(_CENTRED):
        df[col] = centred[:, k]
    if angles is not None:
        for k, col in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            df[col] = angles[:, k]
    return df


def surface_particle_rows(
    tomo_names: Sequence[str], centred: np.ndarray, normals: np.ndarray
) -> pd.DataFrame:
    """Rows of surface picks at ``centred`` ``(n, 3)`` Å with outward ``normals`` ``(n, 3)``.

    As RELION 5's sphere picker: rlnTomoSubtomogramRot/Tilt/Psi = ``A_sub = O Ry(90)`` with
    ``O e_z = n`` (:func:`subtomo.geometry.surface_orientations`), rlnAngleRot/Tilt/Psi =
    (0, 90, 0) and the priors rlnAngleTiltPrior = 90, rlnAnglePsiPrior = 0, so the full
    rotation ``A_sub A_part`` puts the reference z axis on the normal and refine3d's
    ``--sigma_tilt/--sigma_psi`` keep it there while rlnAngleRot (the turn about the normal)
    stays free.
    """
    a_sub, _ = surface_orientations(normals)  # A_part is exactly Ry(90)^T = (0, 90, 0)
    df = particle_rows(tomo_names, centred, np.tile([0.0, 90.0, 0.0], (len(centred), 1)))
    for k, col in enumerate(("Rot", "Tilt", "Psi")):
        df[f"rlnTomoSubtomogram{col}"] = _degrees(a_sub)[:, k]
    df["rlnAngleTiltPrior"] = df["rlnAngleTilt"]
    df["rlnAnglePsiPrior"] = df["rlnAnglePsi"]
    return df


def _degrees(matrices: np.ndarray) -> np.ndarray:
    return matrix_to_euler(torch.as_tensor(matrices, dtype=torch.float64)).numpy()


def normals_of_rows(df: pd.DataFrame) -> np.ndarray:
    """``(n, 3)`` directions of the reference z axis, ``A_sub A_part e_z``, of particle rows."""

    def matrices(prefix: str) -> torch.Tensor:
        cols = [f"{prefix}{a}" for a in ("Rot", "Tilt", "Psi")]
        if cols[0] not in df.columns:
            return torch.eye(3, dtype=torch.float64).expand(len(df), 3, 3)
        ang = torch.as_tensor(df[cols].to_numpy(np.float64))
        return euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])

    full = matrices("rlnTomoSubtomogram") @ matrices("rlnAngle")
    return full[:, :, 2].numpy()
