"""RELION 5 ``tomograms.star``: a set of tilt series with their per-tilt tables.

Conventions (relion5-conventions.md §1): ``data_global`` holds one row per tilt series; each
series has a per-tilt table ``data_<rlnTomoName>`` whose row order is the frame index ``f``.
RELION 5 keeps each per-tilt table in its own file, named by ``rlnTomoTiltSeriesStarFile``;
RELION 4 and WarpTools put them in the same file as ``data_global``. Both forms are read;
RELION 5's is written. Per-tilt tables are read when first needed, so a ``tomograms.star``
whose other series are absent still serves the ones that are present.

Units: pixel sizes in Å, tomogram sizes (W, H, D) in bin-1 tilt-series pixels, angles in
degrees, defocus in Å (positive = underfocus), doses in e/Å². Image arrays are (y, x).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch

from subtomo.data.paths import relative_to_cwd, resolve_path
from subtomo.errors import InputError
from subtomo.geometry import projection_matrices
from subtomo.io import (
    format_vector,
    number_problem,
    numeric_column,
    parse_vector,
    read_mrc,
    read_mrc_header,
    read_star,
    require_block,
    require_columns,
    require_finite,
    write_star,
)

__all__ = [
    "DEFOCUS_ESTIMATE",
    "DEFORMATION_COEFFICIENTS",
    "DEFORMATION_GRID",
    "TiltSeries",
    "TomogramSet",
    "deformation_columns",
    "prefetched_tilt_images",
    "read_tilt",
    "tilt_images",
]

#: per-tilt column (ours): the mean defocus (Å) that CTF estimation gave, which ctf-refine's
#: prior is centred on however often it runs (it writes the column when it is absent)
DEFOCUS_ESTIMATE = "subtomoDefocusEstimateAngst"

_GLOBAL = "global"
_STAR_FILE = "rlnTomoTiltSeriesStarFile"
_PROJ_COLUMNS = ("rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW")


log = logging.getLogger("subtomo")
_warned_deformations: set[str] = set()


def _warn_deformations(
    row: pd.Series, tilts: pd.DataFrame, name: str, tilt_file: str | Path
) -> None:
    """One warning per tilt series, read from a file, with RELION 5's 2D deformations (frame
    alignment ``--deformation``: rlnTomoDeformationType in its global row, per tilt
    rlnTomoDeformationCoefficients), which subtomo does not apply yet."""
    if not isinstance(tilt_file, Path) or f"{tilt_file}:{name}" in _warned_deformations:
        return  # tables built in memory are ours
    kind = str(row.get("rlnTomoDeformationType", tilts.get("rlnTomoDeformationType", [""])[0]))
    typed = kind.strip().lower() not in ("", "none", "0", "nan")
    coefficients = tilts.get("rlnTomoDeformationCoefficients")
    nonzero = coefficients is not None and any(
        any(c != 0 for c in _vector_or_empty(v)) for v in coefficients
    )
    if typed or nonzero:
        _warned_deformations.add(f"{tilt_file}:{name}")
        log.warning(
            "%s: tilt series %s has RELION's 2D deformations (rlnTomoDeformationType %s): "
            "subtomo does not read RELION's models and uses the rigid projection for them",
            tilt_file, name, kind if typed else "not given, coefficients not zero",
        )  # fmt: skip


def _vector_or_empty(value) -> list[float]:
    try:
        return parse_vector(value)
    except ValueError:
        return []


#: subtomo's 2D deformation (:mod:`subtomo.geometry.deformation`): grid size in the global
#: row, ``2·g_x·g_y`` coefficients per tilt (x displacements, then y; bin-1 px)
DEFORMATION_GRID = ("subtomoDeformationGridSizeX", "subtomoDeformationGridSizeY")
DEFORMATION_COEFFICIENTS = "subtomoDeformationCoefficients"


def deformation_columns(field: torch.Tensor) -> tuple[dict[str, int], list[str]]:
    """The global columns (grid size) and the per-tilt coefficient vectors of a field
    ``(t, g_y, g_x, 2)`` (the inverse of :attr:`TiltSeries.deformation`)."""
    t, gy, gx, _ = field.shape
    flat = field.permute(0, 3, 1, 2).reshape(t, -1).double().cpu().numpy()
    return dict(zip(DEFORMATION_GRID, (gx, gy), strict=True)), [
        format_vector(np.round(row, 4)) for row in flat
    ]


class TiltSeries:
    """One tilt series: its ``data_global`` row and its per-tilt table (read on first use).

    ``source`` names where the global row lives (for error messages): the tomograms.star
    file (or a label for tables built in memory) and the 1-based row.
    """

    def __init__(
        self,
        name: str,
        row: pd.Series,
        load_tilts: Callable[[], tuple[pd.DataFrame, str | Path]],
        *,
        source: str | Path,
        row_number: int,
    ) -> None:
        self.name = name
        self.row = row
        self._load_tilts = load_tilts
        self._tilts: pd.DataFrame | None = None
        self._tilt_file: str | Path = source
        self._source = source
        self._row_number = row_number

    def __repr__(self) -> str:
        return f"TiltSeries({self.name!r})"

    # --- tables -----------------------------------------------------------------------
    @property
    def tilts(self) -> pd.DataFrame:
        """Per-tilt table, one row per tilt in frame order (``InputError`` if unreadable)."""
        if self._tilts is None:
            tilts, tilt_file = self._load_tilts()
            self._tilt_file = tilt_file
            if "rlnTomoFrameCount" in self.row.index:
                count = int(self._global_value("rlnTomoFrameCount"))
                if count != len(tilts):
                    raise InputError(
                        f"{count} frames, but the per-tilt table data_{self.name} has "
                        f"{len(tilts)} rows",
                        file=self._source,
                        block=_GLOBAL,
                        column="rlnTomoFrameCount",
                        row=self._row_number,
                    )
            _warn_deformations(self.row, tilts, self.name, tilt_file)
            self._tilts = tilts
        return self._tilts

    @property
    def tilt_file(self) -> str | Path:
        """The file holding the per-tilt table (after it has been read)."""
        _ = self.tilts
        return self._tilt_file

    def _global_value(
        self, column: str, default: float | None = None, *, positive: bool = False
    ) -> float:
        """A number of the global row; ``default`` where the column is absent or empty (NaN:
        a combined table's row without an optional column), else an error naming the cell."""
        if column not in self.row.index:
            if default is None:
                raise InputError(
                    "missing required column",
                    file=self._source,
                    block=_GLOBAL,
                    column=column,
                    row=self._row_number,
                )
            return float(default)
        raw = self.row[column]
        if default is not None and pd.isna(raw):
            return float(default)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        problem = number_problem(raw, value, positive=positive)
        if problem is not None:
            raise InputError(
                problem, file=self._source, block=_GLOBAL, column=column, row=self._row_number
            )
        return value

    def _tilt_column(self, column: str, default: float | None = None) -> np.ndarray:
        return numeric_column(self.tilts, column, self.tilt_file, self.name, default=default)

    # --- global values ----------------------------------------------------------------
    @property
    def pixel_size(self) -> float:
        """Tilt-image pixel size ``px`` in Å (rlnTomoTiltSeriesPixelSize)."""
        return self._global_value("rlnTomoTiltSeriesPixelSize", positive=True)

    @property
    def tomogram_size(self) -> tuple[int, int, int]:
        """(W, H, D) of the bin-1 tomogram in tilt-series pixels (rlnTomoSizeX/Y/Z)."""
        return tuple(round(self._global_value(f"rlnTomoSize{a}", positive=True)) for a in "XYZ")

    @property
    def hand(self) -> int:
        """rlnTomoHand, +1 or -1: sign of the defocus change with depth."""
        value = self._global_value("rlnTomoHand")
        if value not in (1.0, -1.0):
            raise InputError(
                f"expected 1 or -1, found {value:g}",
                file=self._source,
                block=_GLOBAL,
                column="rlnTomoHand",
                row=self._row_number,
            )
        return int(value)

    @property
    def voltage_kv(self) -> float:
        return self._global_value("rlnVoltage", positive=True)

    @property
    def cs_mm(self) -> float:
        return self._global_value("rlnSphericalAberration")

    @property
    def amplitude_contrast(self) -> float:
        return self._global_value("rlnAmplitudeContrast")

    @property
    def defocus_slope(self) -> float:
        """rlnTomoDefocusSlope, multiplier on depth-dependent defocus (default 1)."""
        return self._global_value("rlnTomoDefocusSlope", default=1.0)

    @property
    def bfactor_per_electron_dose(self) -> float | None:
        """rlnCtfBfactorPerElectronDose (Å² per e/Å²) if > 0, else ``None`` (use the
        Grant-Grigorieff dose filter)."""
        value = self._global_value("rlnCtfBfactorPerElectronDose", default=0.0)
        return value if value > 0 else None

    @property
    def fractional_dose(self) -> float:
        """Dose per tilt (e/Å²): rlnTomoImportFractionalDose, or the difference between the
        two lowest pre-exposures."""
        if "rlnTomoImportFractionalDose" in self.row.index:
            return self._global_value("rlnTomoImportFractionalDose")
        lowest = np.sort(self.pre_exposure)[:2]
        return float(lowest[1] - lowest[0]) if len(lowest) == 2 else 0.0

    # --- per-tilt values --------------------------------------------------------------
    @property
    def n_tilts(self) -> int:
        return len(self.tilts)

    @property
    def pre_exposure(self) -> np.ndarray:
        """(t,) cumulative dose before each tilt, e/Å² (rlnMicrographPreExposure)."""
        return self._tilt_column("rlnMicrographPreExposure")

    @property
    def defocus_u(self) -> np.ndarray:
        """(t,) defocus U at the specimen centre, Å (positive = underfocus)."""
        return self._tilt_column("rlnDefocusU")

    @property
    def defocus_v(self) -> np.ndarray:
        return self._tilt_column("rlnDefocusV")

    @property
    def defocus_estimate(self) -> np.ndarray:
        """(t,) mean defocus from CTF estimation, Å (:data:`DEFOCUS_ESTIMATE`; without the
        column, the mean of rlnDefocusU and rlnDefocusV)."""
        if DEFOCUS_ESTIMATE in self.tilts.columns:
            return self._tilt_column(DEFOCUS_ESTIMATE)
        return (self.defocus_u + self.defocus_v) / 2

    @property
    def defocus_angle(self) -> np.ndarray:
        """(t,) astigmatism angle, degrees."""
        return self._tilt_column("rlnDefocusAngle")

    @property
    def ctf_scale(self) -> np.ndarray:
        return self._tilt_column("rlnCtfScalefactor", default=1.0)

    @property
    def ctf_bfactor(self) -> np.ndarray:
        return self._tilt_column("rlnCtfBfactor", default=0.0)

    @property
    def phase_shift(self) -> np.ndarray:
        """(t,) phase shift, degrees."""
        return self._tilt_column("rlnPhaseShift", default=0.0)

    # --- image files ------------------------------------------------------------------
    @property
    def stack_path(self) -> Path | None:
        """Legacy "option A" tilt-series stack (rlnTomoTiltSeriesName), resolved, or None."""
        if "rlnTomoTiltSeriesName" not in self.row.index:
            return None
        return resolve_path(str(self.row["rlnTomoTiltSeriesName"]), self._source_path)

    @property
    def micrograph_paths(self) -> list[Path] | None:
        """Per-tilt 2D images (rlnMicrographName), resolved, or None when not listed."""
        if "rlnMicrographName" not in self.tilts.columns:
            return None
        anchor = self.tilt_file if isinstance(self.tilt_file, Path) else None
        return [resolve_path(str(n), anchor) for n in self.tilts["rlnMicrographName"]]

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(w, h) of the tilt images from the first micrograph or the stack header.

        ``None`` when the tables name no image file; ``InputError`` if a named file is
        missing or not an MRC file.
        """
        paths = self.micrograph_paths
        if paths:
            shape = read_mrc_header(paths[0]).shape
        elif self.stack_path is not None:
            shape = read_mrc_header(self.stack_path).shape
        else:
            return None
        return int(shape[2]), int(shape[1])

    @property
    def _source_path(self) -> Path | None:
        return self._source if isinstance(self._source, Path) else None

    # --- geometry ---------------------------------------------------------------------
    @property
    def deformation(self) -> torch.Tensor | None:
        """The 2D deformation field ``(t, g_y, g_x, 2)`` (bin-1 px, float64) of
        :mod:`subtomo.geometry.deformation`, or ``None`` when the tables define none."""
        if DEFORMATION_COEFFICIENTS not in self.tilts.columns:
            return None
        gx, gy = (int(self._global_value(c)) for c in DEFORMATION_GRID)
        rows = []
        for i, text in enumerate(self.tilts[DEFORMATION_COEFFICIENTS]):
            values = parse_vector(text)
            if len(values) != 2 * gx * gy:
                raise InputError(
                    f"{len(values)} deformation coefficients, expected {2 * gx * gy} "
                    f"(x and y for a {gx} x {gy} grid)",
                    file=self.tilt_file, block=self.name, column=DEFORMATION_COEFFICIENTS,
                    row=i + 1,
                )  # fmt: skip
            rows.append(values)
        field = torch.tensor(rows, dtype=torch.float64).reshape(-1, 2, gy, gx)
        return field.permute(0, 2, 3, 1).contiguous()

    @property
    def has_projection_rows(self) -> bool:
        """True when the per-tilt table has RELION-4 rlnTomoProjX/Y/Z/W matrix rows."""
        return all(c in self.tilts.columns for c in _PROJ_COLUMNS)

    def projection_matrices(self, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """RELION 5 projection matrices ``P_f``, float64 ``(t, 4, 4)`` (conventions §1.3).

        rlnTomoProjX/Y/Z/W rows win when present (WarpTools writes rotation-only rows
        ``[a,b,c,0]``, so its translations are zero). Otherwise P_f is built from
        rlnTomoXTilt (default 0), rlnTomoYTilt, rlnTomoZRot and the shifts in Å, which needs
        the tilt image size (w, h): ``image_size`` or :attr:`image_size` from the files.
        """
        if self.has_projection_rows:
            return self._matrices_from_rows()
        size = image_size if image_size is not None else self.image_size
        if size is None:
            raise InputError(
                "tilt image size unknown: no rlnMicrographName/rlnTomoTiltSeriesName images; "
                "pass image_size=(w, h)",
                file=self.tilt_file,
                block=self.name,
            )
        as_tensor = torch.from_numpy
        return projection_matrices(
            as_tensor(self._tilt_column("rlnTomoXTilt", default=0.0)),
            as_tensor(self._tilt_column("rlnTomoYTilt")),
            as_tensor(self._tilt_column("rlnTomoZRot")),
            as_tensor(self._tilt_column("rlnTomoXShiftAngst")),
            as_tensor(self._tilt_column("rlnTomoYShiftAngst")),
            self.pixel_size,
            self.tomogram_size,
            size,
        )

    def _matrices_from_rows(self) -> torch.Tensor:
        out = np.zeros((self.n_tilts, 4, 4))
        for i, column in enumerate(_PROJ_COLUMNS):
            for f, text in enumerate(self.tilts[column]):
                try:
                    values = parse_vector(text)
                except ValueError:
                    values = []
                if len(values) != 4 or not np.all(np.isfinite(values)):
                    raise InputError(
                        f"expected a vector of 4 finite numbers like [1,0,0,0], found {text!r}",
                        file=self.tilt_file,
                        block=self.name,
                        column=column,
                        row=f + 1,
                    )
                out[f, i] = values
        return torch.from_numpy(out)


class TomogramSet:
    """The tilt series of a ``tomograms.star``, by name, in file order.

    ``global_table`` is the ``data_global`` DataFrame (unknown columns kept). Index with a
    name (``tomograms["TS_01"]``) or iterate to get :class:`TiltSeries`. ``source`` is the
    file (or an in-memory label) that error messages name.
    """

    def __init__(
        self,
        global_table: pd.DataFrame,
        tilt_loaders: Mapping[str, Callable[[], tuple[pd.DataFrame, str | Path]]],
        *,
        path: Path | None = None,
    ) -> None:
        self.source: str | Path = path if path is not None else "tomograms (in memory)"
        self.path = path
        require_columns(global_table, ["rlnTomoName"], self.source, _GLOBAL)
        table = global_table.reset_index(drop=True)
        table["rlnTomoName"] = table["rlnTomoName"].astype(str)
        duplicated = table["rlnTomoName"].duplicated()
        if duplicated.any():
            row = int(np.flatnonzero(duplicated.to_numpy())[0])
            raise InputError(
                f"tomogram name {table['rlnTomoName'].iloc[row]!r} appears twice",
                file=self.source,
                block=_GLOBAL,
                column="rlnTomoName",
                row=row + 1,
            )
        self._global = table
        self._series = {
            name: TiltSeries(
                name, table.iloc[i], tilt_loaders[name], source=self.source, row_number=i + 1
            )
            for i, name in enumerate(table["rlnTomoName"])
        }

    # --- construction -----------------------------------------------------------------
    @classmethod
    def from_tables(
        cls, global_table: pd.DataFrame, tilt_tables: Mapping[str, pd.DataFrame]
    ) -> TomogramSet:
        """A set built in memory (simulator, importers): one per-tilt table per name."""
        label = "tomograms (in memory)"

        def loader(name: str) -> Callable[[], tuple[pd.DataFrame, str]]:
            def load() -> tuple[pd.DataFrame, str]:
                if name not in tilt_tables:
                    raise InputError("no per-tilt table given", file=label, block=name)
                return tilt_tables[name].reset_index(drop=True), label

            return load

        names = global_table["rlnTomoName"].astype(str) if "rlnTomoName" in global_table else []
        return cls(global_table, {n: loader(n) for n in names})

    @classmethod
    def read(cls, path: str | os.PathLike, *, require_series: bool = False) -> TomogramSet:
        """Read RELION 5 (per-tilt files) or RELION 4 / WarpTools (one file) tomograms.star;
        ``require_series``: an empty global table is an error (jobs that work per series)."""
        path = Path(path)
        blocks = read_star(path)
        table = require_block(blocks, _GLOBAL, path)
        require_columns(table, ["rlnTomoName"], path, _GLOBAL)
        if require_series and len(table) == 0:
            raise InputError("no tilt series in the global table", file=path, block=_GLOBAL)
        names = table["rlnTomoName"].astype(str).tolist()
        cache: dict[Path, dict] = {path: blocks}
        if _STAR_FILE in table.columns:
            loaders = {name: _file_loader(path, table, i, cache) for i, name in enumerate(names)}
        else:
            loaders = {name: _block_loader(path, blocks, name) for name in names}
        return cls(table, loaders, path=path)

    # --- access -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._series)

    @property
    def global_table(self) -> pd.DataFrame:
        return self._global

    def __getitem__(self, name: str) -> TiltSeries:
        try:
            return self._series[str(name)]
        except KeyError:
            raise InputError(
                f"no tomogram named {str(name)!r} (known: {', '.join(self.names[:5])}"
                f"{', ...' if len(self.names) > 5 else ''})",
                file=self.source,
                block=_GLOBAL,
                column="rlnTomoName",
            ) from None

    def __contains__(self, name: object) -> bool:
        return str(name) in self._series

    def __iter__(self) -> Iterator[TiltSeries]:
        return iter(self._series.values())

    def __len__(self) -> int:
        return len(self._series)

    # --- output -----------------------------------------------------------------------
    def write(self, path: str | os.PathLike, tilt_series_dir: str | os.PathLike | None = None):
        """Write RELION 5 form: ``data_global`` plus ``<tilt_series_dir>/<name>.star``.

        ``tilt_series_dir`` defaults to ``tilt_series/`` beside ``path``. Each per-tilt file
        holds the block ``data_<name>``; rlnTomoTiltSeriesStarFile is written relative to the
        working directory (RELION's project directory) when the file lies inside it.
        Every per-tilt table must be readable. Columns are kept as they are (rlnTomoProj rows
        included: WarpTools' rotation-only rows cannot be turned into angles and shifts
        without the image size).
        """
        path = Path(path)
        folder = (
            Path(tilt_series_dir) if tilt_series_dir is not None else path.parent / "tilt_series"
        )
        star_files = []
        for series in self:
            tilt_path = folder / f"{series.name}.star"
            write_star(tilt_path, {series.name: series.tilts})
            star_files.append(relative_to_cwd(tilt_path))
        table = self._global.copy()
        if _STAR_FILE in table.columns:
            table[_STAR_FILE] = star_files
        else:
            table.insert(1, _STAR_FILE, star_files)
        write_star(path, {_GLOBAL: table})


def _block_loader(
    path: Path, blocks: Mapping, name: str
) -> Callable[[], tuple[pd.DataFrame, Path]]:
    """Per-tilt table ``data_<name>`` in the tomograms.star itself (RELION 4, WarpTools)."""

    def load() -> tuple[pd.DataFrame, Path]:
        if name not in blocks:
            raise InputError(
                f"missing required column (nor is the per-tilt table data_{name} in this file)",
                file=path,
                block=_GLOBAL,
                column=_STAR_FILE,
            )
        return require_block(blocks, name, path).reset_index(drop=True), path

    return load


def _file_loader(
    path: Path, table: pd.DataFrame, index: int, cache: dict[Path, dict]
) -> Callable[[], tuple[pd.DataFrame, Path]]:
    name = str(table["rlnTomoName"].iloc[index])
    written = str(table[_STAR_FILE].iloc[index])

    def load() -> tuple[pd.DataFrame, Path]:
        tilt_path = resolve_path(written, path)
        if not tilt_path.is_file():
            raise InputError(
                f"per-tilt STAR file {written!r} not found (looked in the working directory "
                f"and beside {path.name})",
                file=path,
                block=_GLOBAL,
                column=_STAR_FILE,
                row=index + 1,
            )
        if tilt_path not in cache:
            cache[tilt_path] = read_star(tilt_path)
        return require_block(cache[tilt_path], name, tilt_path).reset_index(drop=True), tilt_path

    return load


def read_tilt(
    series: TiltSeries, frame: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Tilt image ``frame`` (0-based, per-tilt table order) as float32 ``(h, w)``.

    Reads one 2D MRC (rlnMicrographName) or one section of the option-A stack, so memory
    stays one tilt at a time.
    """
    if not 0 <= frame < series.n_tilts:
        raise IndexError(f"frame {frame} outside 0..{series.n_tilts - 1} of {series.name}")
    paths = series.micrograph_paths
    if paths is not None:
        image, _ = read_mrc(paths[frame], device=device, finite=True)
        return image.reshape(image.shape[-2:])
    stack = series.stack_path
    if stack is None:
        raise InputError(
            "no tilt images: neither rlnMicrographName nor rlnTomoTiltSeriesName",
            file=series.tilt_file,
            block=series.name,
        )
    n_images = read_mrc_header(stack).shape[0]
    if frame >= n_images:
        raise InputError(f"stack has {n_images} images, frame {frame + 1} requested", file=stack)
    with mrcfile.mmap(stack, mode="r", permissive=True) as mrc:
        data = np.asarray(mrc.data).reshape(n_images, *mrc.data.shape[-2:])[frame]
        section = torch.from_numpy(np.array(data, dtype=np.float32))
    require_finite(section, stack)
    return section.to(device)


def tilt_images(series: TiltSeries, *, device: torch.device | str | None = None) -> torch.Tensor:
    """All tilt images as float32 ``(t, h, w)`` in frame order."""
    first = read_tilt(series, 0)
    out = torch.empty(series.n_tilts, *first.shape, dtype=first.dtype)
    out[0] = first
    for f in range(1, series.n_tilts):
        out[f] = read_tilt(series, f)
    return out.to(device)


def prefetched_tilt_images(
    series: Sequence[TiltSeries],
    *,
    device: torch.device | str | None = None,
    max_ahead_bytes: int = 1 << 30,
) -> Iterator[tuple[TiltSeries, torch.Tensor]]:
    """``(series, tilt_images(series))`` in order. While the caller works on one series, a
    background thread reads the next if it takes at most ``max_ahead_bytes`` (float32), so
    reading ahead never holds more than that on top of the current series."""

    def nbytes(s: TiltSeries) -> int:
        w, h = s.image_size or (0, 0)
        return 4 * s.n_tilts * w * h

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = None
        for k, current in enumerate(series):
            images = tilt_images(current, device=device) if pending is None else pending.result()
            pending = None
            if k + 1 < len(series) and nbytes(series[k + 1]) <= max_ahead_bytes:
                pending = reader.submit(tilt_images, series[k + 1], device=device)
            yield current, images
            del images
