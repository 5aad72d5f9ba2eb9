"""RELION 5 ``particles.star``: blocks ``data_general``, ``data_optics``, ``data_particles``.

Conventions (relion5-conventions.md §2). Positions are xyz vectors in Å relative to the
tomogram centre ``c_tomo = (W/2, H/2, D/2)·px`` (rlnCenteredCoordinate*Angst); offsets
rlnOrigin*Angst are in the subtomogram frame. Rotations are RELION matrices
(:func:`subtomo.geometry.euler_to_matrix`): ``A_sub`` from rlnTomoSubtomogramRot/Tilt/Psi,
``A_part`` from rlnAngleRot/Tilt/Psi; the full reference->tomogram rotation is
``A_sub @ A_part``. Geometry comes back as float64 torch tensors, per-particle optics values
as numpy arrays of length n.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from subtomo.data.paths import resolve_path
from subtomo.data.tomograms import TomogramSet
from subtomo.errors import InputError
from subtomo.geometry import euler_to_matrix
from subtomo.io import numeric_column, parse_vector, read_star, require_block, write_star

__all__ = ["DEFOCUS_OFFSET", "ParticleSet", "pixel_size_of", "stack_image_indices"]

log = logging.getLogger("subtomo")

_STACKS_2D = "rlnTomoSubTomosAre2DStacks"
_CENTERED = tuple(f"rlnCenteredCoordinate{a}Angst" for a in "XYZ")
_LEGACY = tuple(f"rlnCoordinate{a}" for a in "XYZ")
_ORIGINS = tuple(f"rlnOrigin{a}Angst" for a in "XYZ")
#: Per-particle defocus in Å on top of the depth term (not a RELION column, §23).
DEFOCUS_OFFSET = "subtomoDefocusOffsetAngst"


#: optics columns RELION applies and subtomo does not model yet, with their neutral values
_UNMODELLED_OPTICS = {
    "rlnBeamTiltX": "beam tilt",
    "rlnBeamTiltY": "beam tilt",
    "rlnMagMat00": "anisotropic magnification",
    "rlnMagMat01": "anisotropic magnification",
    "rlnMagMat10": "anisotropic magnification",
    "rlnMagMat11": "anisotropic magnification",
}
_warned: set[tuple[str, str]] = set()


def _warn_unmodelled_optics(optics: pd.DataFrame, path: Path) -> None:
    """One warning per file and column whose values RELION would apply and subtomo leaves
    out of its CTFs and geometry (beam tilt, anisotropic magnification); neutral values
    (zeros, the identity matrix) are silent."""
    for column, what in _UNMODELLED_OPTICS.items():
        if column not in optics.columns or (str(path), column) in _warned:
            continue
        neutral = 1.0 if column in ("rlnMagMat00", "rlnMagMat11") else 0.0
        groups = optics.get("rlnOpticsGroup", pd.Series(range(1, len(optics) + 1)))
        for group, value in zip(groups, optics[column], strict=True):
            try:
                differs = abs(float(value) - neutral) > 1e-12
            except ValueError:
                continue  # the reader of that column reports malformed values
            if differs:
                _warned.add((str(path), column))
                log.warning(
                    "%s: optics group %s has %s = %s (%s): subtomo does not model them yet "
                    "and leaves them out",
                    path, group, column, value, what,
                )  # fmt: skip
                break


class ParticleSet:
    """The particles of a RELION 5 particles.star, with its optics and general blocks.

    ``particles`` and ``optics`` are the DataFrames a RELION user knows (unknown columns
    kept); ``general`` is the key-value block. ``tomograms`` (optional) is the set the file
    was read with; it converts legacy coordinates and builds a missing optics table.
    ``source`` is the file (or an in-memory label) that error messages name.
    """

    def __init__(
        self,
        particles: pd.DataFrame,
        optics: pd.DataFrame | None = None,
        general: Mapping[str, Any] | None = None,
        *,
        path: Path | None = None,
        tomograms: TomogramSet | None = None,
    ) -> None:
        self.path = path
        self.tomograms = tomograms
        self.source: str | Path = path if path is not None else "particles (in memory)"
        self.particles = particles.reset_index(drop=True)
        self.optics = pd.DataFrame() if optics is None else optics.reset_index(drop=True)
        self.general: dict[str, Any] = {_STACKS_2D: 0, **(general or {})}
        if "rlnTomoName" not in self.particles.columns:
            raise InputError(
                "missing required column",
                file=self.source,
                block="particles",
                column="rlnTomoName",
            )
        self.particles["rlnTomoName"] = self.particles["rlnTomoName"].astype(str)
        if "rlnTomoParticleName" not in self.particles.columns:
            k = self.particles.groupby("rlnTomoName", sort=False).cumcount() + 1
            self.particles["rlnTomoParticleName"] = (
                self.particles["rlnTomoName"] + "/" + k.astype(str)
            )
        if self.optics.empty and tomograms is not None:
            self._optics_from_tomograms(tomograms)

    # --- construction and output ------------------------------------------------------
    @classmethod
    def from_tables(
        cls,
        particles: pd.DataFrame,
        optics: pd.DataFrame | None = None,
        general: Mapping[str, Any] | None = None,
    ) -> ParticleSet:
        """A set built in memory (picking, simulation); tables are copied."""
        return cls(particles.copy(), None if optics is None else optics.copy(), general)

    @classmethod
    def read(cls, path: str | os.PathLike, tomograms: TomogramSet | None = None) -> ParticleSet:
        """Read a particles.star; CR+LF accepted. ``data_general`` defaults to 3D (0)."""
        path = Path(path)
        blocks = read_star(path)
        particles = require_block(blocks, "particles", path)
        general = blocks.get("general")
        if isinstance(general, pd.DataFrame):
            general = general.iloc[0].to_dict() if len(general) else {}
        optics = blocks.get("optics")
        if isinstance(optics, dict):
            optics = pd.DataFrame([optics])
        if optics is not None:
            _warn_unmodelled_optics(optics, path)
        return cls(particles, optics, general, path=path, tomograms=tomograms)

    def write(self, path: str | os.PathLike) -> None:
        """Write ``data_general``, ``data_optics`` (if any) and ``data_particles`` atomically."""
        blocks: dict[str, pd.DataFrame | dict] = {"general": dict(self.general)}
        if not self.optics.empty:
            blocks["optics"] = self.optics
        blocks["particles"] = self.particles
        write_star(path, blocks)

    def subset(self, selection: np.ndarray | Sequence[int] | Sequence[bool]) -> ParticleSet:
        """The particles picked by a boolean mask or integer indices (optics kept whole)."""
        index = np.asarray(selection)
        if index.dtype == bool:
            if len(index) != len(self):
                raise ValueError(f"mask has {len(index)} entries for {len(self)} particles")
            index = np.flatnonzero(index)
        return ParticleSet(
            self.particles.iloc[index].copy(),
            self.optics.copy(),
            self.general,
            path=self.path,
            tomograms=self.tomograms,
        )

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def is_2d_stacks(self) -> bool:
        """rlnTomoSubTomosAre2DStacks: particles are 2D tilt stacks (True) or 3D volumes."""
        value = self.general.get(_STACKS_2D, 0)
        if str(value).strip() not in ("0", "1", "0.0", "1.0"):
            raise InputError(
                f"expected 0 or 1, found {value!r}",
                file=self.source,
                block="general",
                column=_STACKS_2D,
            )
        return float(value) == 1

    @property
    def tomo_names(self) -> np.ndarray:
        """(n,) rlnTomoName of each particle (str)."""
        return self.particles["rlnTomoName"].to_numpy(dtype=str)

    # --- geometry ---------------------------------------------------------------------
    def _columns(self, columns: Sequence[str], default: float | None = None) -> np.ndarray:
        return np.stack(
            [
                numeric_column(self.particles, c, self.source, "particles", default=default)
                for c in columns
            ],
            axis=-1,
        )

    def centered_coordinates_angst(self, tomograms: TomogramSet | None = None) -> torch.Tensor:
        """(n, 3) xyz positions in Å relative to the tomogram centre.

        From rlnCenteredCoordinateX/Y/ZAngst, or legacy RELION-4 rlnCoordinateX/Y/Z
        (decentred bin-1 pixels p) as ``C = (p - (W/2, H/2, D/2)) * px`` with each
        tomogram's size and pixel size (needs ``tomograms`` or the set read with the file).
        """
        if all(c in self.particles.columns for c in _CENTERED):
            return torch.from_numpy(self._columns(_CENTERED))
        if not all(c in self.particles.columns for c in _LEGACY):
            raise InputError(
                "missing required column (and no legacy rlnCoordinateX/Y/Z)",
                file=self.source,
                block="particles",
                column=next(c for c in _CENTERED if c not in self.particles.columns),
            )
        tomos = tomograms if tomograms is not None else self.tomograms
        if tomos is None:
            raise InputError(
                "legacy rlnCoordinateX/Y/Z need the tomograms.star (size and pixel size) to "
                "convert to rlnCenteredCoordinate*Angst",
                file=self.source,
                block="particles",
                column="rlnCoordinateX",
            )
        pixels = self._columns(_LEGACY)
        out = np.empty_like(pixels)
        names = self.tomo_names
        for name in pd.unique(names):
            series = tomos[name]
            rows = names == name
            centre = np.asarray(series.tomogram_size, dtype=np.float64) / 2
            out[rows] = (pixels[rows] - centre) * series.pixel_size
        return torch.from_numpy(out)

    def origins_angst(self) -> torch.Tensor:
        """(n, 3) rlnOriginX/Y/ZAngst in Å, subtomogram frame (zeros where absent)."""
        return torch.from_numpy(self._columns(_ORIGINS, default=0.0))

    def defocus_offsets(self) -> torch.Tensor:
        """``(n,)`` per-particle defocus in Å (``subtomoDefocusOffsetAngst``, §23; 0 where
        absent), added to the depth-dependent defocus of every tilt."""
        return torch.from_numpy(self._columns([DEFOCUS_OFFSET], default=0.0)[:, 0])

    def _matrices(self, prefix: str) -> torch.Tensor:
        columns = [f"{prefix}{a}" for a in ("Rot", "Tilt", "Psi")]
        if not any(c in self.particles.columns for c in columns):
            return torch.eye(3, dtype=torch.float64).expand(len(self), 3, 3).clone()
        angles = torch.from_numpy(self._columns(columns, default=0.0))
        return euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])

    def subtomogram_matrices(self) -> torch.Tensor:
        """(n, 3, 3) ``A_sub`` from rlnTomoSubtomogramRot/Tilt/Psi (identity if absent)."""
        return self._matrices("rlnTomoSubtomogram")

    def particle_matrices(self) -> torch.Tensor:
        """(n, 3, 3) ``A_part`` from rlnAngleRot/Tilt/Psi (identity if absent)."""
        return self._matrices("rlnAngle")

    def visible_frames(self, n_tilts_by_tomo: Mapping[str, int]) -> list[np.ndarray]:
        """Per particle, a bool array over its tomogram's tilts (rlnTomoVisibleFrames).

        All True when the column is absent. ``InputError`` naming the row if a vector is
        malformed, not 0/1, or its length differs from the tomogram's number of tilts.
        """
        names = self.tomo_names
        for row, name in enumerate(names):
            if name not in n_tilts_by_tomo:
                raise InputError(
                    f"tomogram {str(name)!r} has no tilt count (is it in tomograms.star?)",
                    file=self.source,
                    block="particles",
                    column="rlnTomoName",
                    row=row + 1,
                )
        if "rlnTomoVisibleFrames" not in self.particles.columns:
            return [np.ones(int(n_tilts_by_tomo[name]), dtype=bool) for name in names]
        out = []
        for row, (name, text) in enumerate(
            zip(names, self.particles["rlnTomoVisibleFrames"], strict=True)
        ):
            expected = int(n_tilts_by_tomo[name])
            try:
                values = np.asarray(parse_vector(text))
            except ValueError:
                values = np.asarray([np.nan])
            if not np.isin(values, (0.0, 1.0)).all():
                problem = f"expected a vector of 0/1 like [1,1,0], found {text!r}"
            elif len(values) != expected:
                problem = f"{len(values)} entries, expected {expected} (one per tilt of {name})"
            else:
                out.append(values.astype(bool))
                continue
            raise InputError(
                problem,
                file=self.source,
                block="particles",
                column="rlnTomoVisibleFrames",
                row=row + 1,
            )
        return out

    def random_subset(self) -> np.ndarray:
        """(n,) rlnRandomSubset as int (1/2; 0 where absent)."""
        return numeric_column(
            self.particles, "rlnRandomSubset", self.source, "particles", default=0, dtype=np.int64
        )

    def image_paths(self, column: str = "rlnImageName") -> list[Path]:
        """Image file of each particle (rlnImageName, or e.g. rlnCtfImage), resolved: cwd
        first, then beside the particle file; a ``k@`` prefix is dropped."""
        if column not in self.particles.columns:
            raise InputError(
                "missing required column", file=self.source, block="particles", column=column
            )
        return [resolve_path(str(n), self.path) for n in self.particles[column]]

    # --- optics -----------------------------------------------------------------------
    def optics_rows(self) -> np.ndarray:
        """(n,) 0-based row in ``optics`` of each particle's rlnOpticsGroup."""
        if self.optics.empty:
            raise InputError("missing block data_optics", file=self.source)
        groups = numeric_column(self.optics, "rlnOpticsGroup", self.source, "optics")
        default = float(groups[0]) if len(groups) == 1 else None
        mine = numeric_column(
            self.particles, "rlnOpticsGroup", self.source, "particles", default=default
        )
        rows = pd.Index(groups).get_indexer(mine)
        if (rows < 0).any():
            row = int(np.flatnonzero(rows < 0)[0])
            raise InputError(
                f"optics group {mine[row]:g} is not in data_optics",
                file=self.source,
                block="particles",
                column="rlnOpticsGroup",
                row=row + 1,
            )
        return rows

    def aberrations(self, tomo_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(even, odd)`` Zernike coefficients (rlnEvenZernike, rlnOddZernike; empty where
        absent) of the optics group of tilt series ``tomo_name``'s particles. Its particles
        must share them (one CTF per tilt image)."""
        mine = np.flatnonzero(self.tomo_names == str(tomo_name))
        if not len(mine) or self.optics.empty:
            return (), ()
        columns = [c for c in ("rlnEvenZernike", "rlnOddZernike") if c in self.optics.columns]
        if not columns:
            return (), ()
        rows = np.unique(self.optics_rows()[mine])
        found: dict[str, set[tuple[float, ...]]] = {c: set() for c in columns}
        for column in columns:
            for r in rows:
                try:
                    found[column].add(tuple(parse_vector(self.optics[column].iloc[r])))
                except ValueError as error:
                    raise InputError(
                        str(error), file=self.source, block="optics", column=column, row=r + 1
                    ) from None
            if len(found[column]) > 1:
                raise InputError(
                    f"the particles of tilt series {tomo_name} are in optics groups with "
                    f"different {column}; one tilt image has one CTF",
                    file=self.source, block="optics", column=column,
                )  # fmt: skip
        names = ("rlnEvenZernike", "rlnOddZernike")
        even, odd = (found[c].pop() if c in found else () for c in names)
        return even, odd

    def optics_column(
        self, column: str, default: float | None = None, *, positive: bool = False
    ) -> np.ndarray:
        """(n,) value of an optics column for each particle (float64; ``positive``: > 0)."""
        values = numeric_column(
            self.optics, column, self.source, "optics", default=default, positive=positive
        )
        return values[self.optics_rows()]

    def tilt_series_pixel_size(self) -> np.ndarray:
        """(n,) rlnTomoTiltSeriesPixelSize, Å."""
        return self.optics_column("rlnTomoTiltSeriesPixelSize", positive=True)

    def subtomogram_binning(self) -> np.ndarray:
        """(n,) rlnTomoSubtomogramBinning (default 1)."""
        return self.optics_column("rlnTomoSubtomogramBinning", default=1.0, positive=True)

    def image_pixel_size(self) -> np.ndarray:
        """(n,) rlnImagePixelSize in Å (else tilt-series pixel size times binning)."""
        if "rlnImagePixelSize" in self.optics.columns:
            return self.optics_column("rlnImagePixelSize", positive=True)
        return self.tilt_series_pixel_size() * self.subtomogram_binning()

    def image_size(self) -> np.ndarray:
        """(n,) rlnImageSize, box size in (binned) pixels."""
        return self.optics_column("rlnImageSize", positive=True).astype(np.int64)

    def ctf_premultiplied(self) -> np.ndarray:
        """(n,) rlnCtfDataAreCtfPremultiplied as bool (default False)."""
        return self.optics_column("rlnCtfDataAreCtfPremultiplied", default=0.0) != 0

    def voltage_kv(self) -> np.ndarray:
        return self.optics_column("rlnVoltage")

    def cs_mm(self) -> np.ndarray:
        return self.optics_column("rlnSphericalAberration")

    def amplitude_contrast(self) -> np.ndarray:
        return self.optics_column("rlnAmplitudeContrast")

    def require_tomograms(self, tomograms: TomogramSet) -> None:
        """``InputError`` naming the first particle whose rlnTomoName is not in ``tomograms``."""
        names = self.tomo_names
        known = np.isin(names, np.asarray(tomograms.names, dtype=str))
        if not known.all():
            row = int(np.flatnonzero(~known)[0])
            raise InputError(
                f"tomogram {str(names[row])!r} is not in {tomograms.source}",
                file=self.source,
                block="particles",
                column="rlnTomoName",
                row=row + 1,
            )

    def _optics_from_tomograms(self, tomograms: TomogramSet) -> None:
        """Build data_optics as RELION does after picking: one group per rlnOpticsGroupName
        of the tomograms (or per tomogram), numbered in order of first appearance."""
        self.require_tomograms(tomograms)
        table = tomograms.global_table.set_index("rlnTomoName")
        names = self.tomo_names
        if "rlnOpticsGroupName" in table.columns:
            group_names = table.loc[names, "rlnOpticsGroupName"].astype(str).to_numpy()
        else:
            group_names = names
        order = pd.unique(group_names)
        first_tomo = {g: names[np.flatnonzero(group_names == g)[0]] for g in order}
        rows = []
        for number, group in enumerate(order, start=1):
            series = tomograms[first_tomo[group]]
            rows.append(
                {
                    "rlnOpticsGroup": number,
                    "rlnOpticsGroupName": str(group),
                    "rlnVoltage": series.voltage_kv,
                    "rlnSphericalAberration": series.cs_mm,
                    "rlnAmplitudeContrast": series.amplitude_contrast,
                    "rlnTomoTiltSeriesPixelSize": series.pixel_size,
                }
            )
        self.optics = pd.DataFrame(rows)
        number_of = {g: i for i, g in enumerate(order, start=1)}
        self.particles["rlnOpticsGroup"] = [number_of[g] for g in group_names]


def pixel_size_of(particles: ParticleSet) -> float:
    """The one image pixel size (Å) of a set; ``InputError`` if optics groups disagree."""
    sizes = particles.image_pixel_size()
    if len(sizes) == 0:
        raise InputError("no particles", file=particles.source, block="particles")
    if np.ptp(sizes) > 1e-6 * sizes.max():
        raise InputError(
            f"particles have different pixel sizes ({sizes.min():g} to {sizes.max():g} Å); "
            "expected one",
            file=particles.source,
            block="optics",
            column="rlnImagePixelSize",
        )
    return float(sizes[0])


def stack_image_indices(visible: np.ndarray, n_images: int) -> np.ndarray | None:
    """Positions in a 2D stack of the visible tilts, in tilt order; ``None`` if impossible.

    RELION's extraction stores only the visible tilts (``n_images == sum(visible)``);
    WarpTools stores every tilt, blank where invisible (``n_images == len(visible)``).
    """
    visible = np.asarray(visible, dtype=bool)
    if n_images == int(visible.sum()):
        return np.arange(n_images)
    if n_images == len(visible):
        return np.flatnonzero(visible)
    return None
