"""Import tilt series (``subtomo import``, RELION 5's "Import tilt series" job).

From what the microscope writes - one movie (or one motion-corrected image) per tilt and one
SerialEM/Tomo5 ``.mdoc`` per tilt series - to RELION 5's import tables in ``Import/jobNNN/``:

- ``tilt_series.star``: ``data_global``, one row per series (rlnTomoName,
  rlnTomoTiltSeriesStarFile, rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast,
  rlnMicrographOriginalPixelSize, [rlnTomoTiltSeriesPixelSize], rlnTomoHand,
  [rlnMtfFileName], [rlnOpticsGroupName]);
- ``tilt_series/<name>.star``: ``data_<name>``, one row per tilt in acquisition order (mdoc
  DateTime): rlnMicrographMovieName, rlnTomoTiltMovieFrameCount,
  rlnTomoNominalStageTiltAngle, rlnTomoNominalTiltAxisAngle, rlnMicrographPreExposure,
  [rlnTomoNominalDefocus], [rlnMicrographName].

As RELION: a series is named after its mdoc with every suffix removed (``TS_01.mrc.mdoc`` ->
``TS_01``); each mdoc row's ``SubFramePath`` (cut at the last ``\\``) is matched to the
globbed movie with the same suffix-free name; the pre-exposure is the dose acquired before
each tilt in time order (``--dose_per_tilt_image`` d: d·i; ``--dose_per_movie_frame`` d:
d·frames before). One difference: with neither option the mdoc doses give the dose *before*
the tilt (RELION's import adds the tilt's own dose, so its first tilt is not 0).

Unlike RELION, a mdoc row without its movie is an error, not a silent drop, and so are
movies of a series that its mdoc does not list, a movie whose frame count differs from the
mdoc's ``NumSubFrames``, and pixel sizes that disagree; nothing is written then.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import numpy as np
import pandas as pd
from rich.progress import Progress

from subtomo.data import TomogramSet
from subtomo.errors import InputError
from subtomo.io.mdoc import MdocTiltSeries, read_mdoc
from subtomo.io.movies import read_movie_header
from subtomo.io.mrc import read_mrc_header
from subtomo.project import run_job, write_job_report
from subtomo.project.options import option, output_dir_option
from subtomo.report.plots import plot_series

__all__ = ["ImportTomoParams", "base_name", "import_tilt_series", "run"]

log = logging.getLogger("subtomo")

#: RELION 5 node type of the import's tilt-series set.
NODE_TYPE = "TomogramGroupMetadata.star.relion.tomo.import"


@dataclass
class ImportTomoParams:
    """Options of "Import tilt series" (RELION GUI field names)."""

    movie_files: str = option(
        "frames/*.mrc", "--movie_files", "--movies",
        help="Glob of the movies (MRC, TIFF, EER), or of the tilt images with "
        "--images_are_motion_corrected.",
    )  # fmt: skip
    mdoc_files: str = option(
        "mdoc/*.mdoc", "--mdoc_files", "--mdocs", help="Glob of the mdoc files, one per series."
    )
    prefix: str = option("", "--prefix", help="Prefix of the tilt-series names ('<prefix>_').")
    angpix: float = option(
        -1.0, "--angpix", help="Movie pixel size; <= 0: the mdoc's PixelSpacing.", unit="Å"
    )
    kv: float = option(300.0, "--kv", help="Voltage.", unit="kV")
    cs: float = option(2.7, "--cs", help="Spherical aberration.", unit="mm")
    q0: float = option(0.1, "--q0", help="Amplitude contrast (fraction).")
    dose_per_tilt_image: float = option(
        -1.0, "--dose_per_tilt_image", help="Dose per tilt; <= 0: not given.", unit="e/Å²"
    )
    dose_per_movie_frame: float = option(
        -1.0, "--dose_per_movie_frame", help="Dose per movie frame; <= 0: not given.",
        unit="e/Å²",
    )  # fmt: skip
    tilt_axis_angle: float = option(
        85.0, "--tilt_axis_angle", help="Nominal tilt-axis angle (CCW from the image y axis).",
        unit="deg",
    )  # fmt: skip
    flip_tiltseries_hand: bool = option(
        True, "--flip_tiltseries_hand/--keep_tiltseries_hand",
        help="Invert the defocus handedness (rlnTomoHand -1; RELION's default).",
    )  # fmt: skip
    images_are_motion_corrected: bool = option(
        False, "--images_are_motion_corrected", help="The files are tilt images, not movies."
    )
    mtf: str = option("", "--mtf", help="Detector MTF STAR file (rlnMtfFileName).")
    optics_group_name: str = option("", "--optics_group_name", help="rlnOpticsGroupName.")
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def base_name(path: str) -> str:
    """The file name with every suffix removed (RELION: ``TS_01_003_-6.0.mrc`` -> ``TS_01_003_-6``)
    after the last ``/`` or ``\\`` (SerialEM writes Windows paths)."""
    name = PureWindowsPath(str(path)).name
    while (stem := Path(name).stem) != name:
        name = stem
    return name


def _glob(pattern: str, what: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise InputError(f"no files match {what} {pattern!r}")
    return files


def _pre_exposure(params: ImportTomoParams, mdoc: MdocTiltSeries, frames: np.ndarray) -> np.ndarray:
    """Dose before each tilt (e/Å²), in the mdoc's row order; ``frames`` per row."""
    order = mdoc.acquisition_order
    pre = np.empty(len(order))
    if params.dose_per_tilt_image > 0:
        pre[order] = params.dose_per_tilt_image * np.arange(len(order))
    elif params.dose_per_movie_frame > 0:
        counts = frames[order].astype(np.float64)
        pre[order] = params.dose_per_movie_frame * np.concatenate([[0.0], np.cumsum(counts)[:-1]])
    else:
        pre = mdoc.pre_exposure.astype(np.float64)
        if not np.any(mdoc.exposure_dose > 0):
            log.warning("no dose given and none in the mdoc: pre-exposure 0 for every tilt")
    return pre


def _frame_counts(mdoc: MdocTiltSeries, movies: list[str], path: Path) -> np.ndarray:
    """Frames of each movie (header), checked against the mdoc's NumSubFrames."""
    counts = np.array([read_movie_header(m).n_frames for m in movies])
    if "NumSubFrames" in mdoc.table.columns:
        listed = pd.to_numeric(mdoc.table["NumSubFrames"], errors="coerce").to_numpy()
        for movie, count, expected in zip(movies, counts, listed, strict=True):
            if np.isfinite(expected) and int(expected) != count:
                raise InputError(
                    f"the movie has {count} frames, the mdoc lists NumSubFrames = {int(expected)}"
                    f" ({path})",
                    file=movie,
                )
    return counts


def _check_pixel_size(
    params: ImportTomoParams, mdoc: MdocTiltSeries, movies: list[str], path: Path
) -> float:
    """The movie pixel size (Å): ``--angpix``, else the mdoc's PixelSpacing / Binning.

    ``InputError`` when the first movie's header records another pixel size (beyond 1 %;
    0 and 1 Å mean "not recorded"), naming the movie when ``--angpix`` disagrees and the
    mdoc when the mdoc does. A mdoc that disagrees with ``--angpix`` alone (TIFF movies
    record no pixel size; super-resolution Binning is ambiguous) is only a warning.
    """
    binning = 1.0
    if "Binning" in mdoc.table.columns:
        values = pd.to_numeric(mdoc.table["Binning"], errors="coerce").dropna()
        binning = float(values.iloc[0]) if len(values) and values.iloc[0] > 0 else 1.0
    mdoc_px = None if mdoc.pixel_size is None else mdoc.pixel_size / binning
    px = params.angpix if params.angpix > 0 else mdoc_px
    if px is None:
        raise InputError("no PixelSpacing in the mdoc: give --angpix", file=path)
    first = movies[0]
    header = (
        read_mrc_header(first).voxel_size
        if params.images_are_motion_corrected
        else read_movie_header(first).pixel_size
    )

    def differ(a: float, b: float) -> bool:
        return abs(a - b) > 0.01 * b

    recorded = header > 0 and abs(header - 1.0) > 1e-6
    if recorded and params.angpix > 0 and differ(header, px):
        raise InputError(
            f"the header's pixel size {header:g} Å differs from --angpix {px:g} Å", file=first
        )
    if recorded and mdoc_px is not None and differ(mdoc_px, header):
        raise InputError(
            f"PixelSpacing {mdoc.pixel_size:g} Å (Binning {binning:g}) disagrees with the "
            f"movies' {header:g} Å ({first})",
            file=path,
        )
    if mdoc_px is not None and differ(mdoc_px, px):
        log.warning(
            "%s: PixelSpacing %g Å (Binning %g) differs from --angpix %g Å; using --angpix",
            path, mdoc.pixel_size, binning, px,
        )  # fmt: skip
    return float(px)


def _series_table(
    params: ImportTomoParams, path: Path, by_name: dict[str, str], name: str
) -> tuple[pd.DataFrame, float]:
    """The per-tilt table of one mdoc (acquisition order) and its movie pixel size."""
    mdoc = read_mdoc(path)
    if mdoc.sub_frame_paths is None:
        raise InputError("no SubFramePath for every tilt: cannot match the movies", file=path)
    wanted = [base_name(p) for p in mdoc.sub_frame_paths]
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise InputError(
            f"{len(missing)} of {len(wanted)} tilts have no file in {params.movie_files!r} "
            f"(first: {missing[0]})",
            file=path,
        )
    listed = set(wanted)
    extra = [m for b, m in by_name.items() if b.startswith(name + "_") and b not in listed]
    if extra:
        raise InputError(
            f"lists {len(wanted)} tilts, but {len(wanted) + len(extra)} files of series "
            f"{name} match {params.movie_files!r} (not in the mdoc: {extra[0]})",
            file=path,
        )
    movies = [by_name[w] for w in wanted]
    px = _check_pixel_size(params, mdoc, movies, path)
    if params.images_are_motion_corrected:
        frames = np.ones(len(movies), dtype=int)
        for image in movies:
            read_mrc_header(image)  # complete and readable
    else:
        frames = _frame_counts(mdoc, movies, path)
    table = pd.DataFrame()
    if not params.images_are_motion_corrected:
        table["rlnMicrographMovieName"] = movies
        table["rlnTomoTiltMovieFrameCount"] = frames
    table["rlnTomoNominalStageTiltAngle"] = mdoc.tilt_angles_deg
    table["rlnTomoNominalTiltAxisAngle"] = float(params.tilt_axis_angle)
    table["rlnMicrographPreExposure"] = _pre_exposure(params, mdoc, frames)
    if "TargetDefocus" in mdoc.table.columns:
        table["rlnTomoNominalDefocus"] = pd.to_numeric(
            mdoc.table["TargetDefocus"], errors="coerce"
        ).to_numpy(np.float64)
    if params.images_are_motion_corrected:
        table["rlnMicrographName"] = movies
    return table.iloc[mdoc.acquisition_order].reset_index(drop=True), px


def import_tilt_series(params: ImportTomoParams) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The global table and the per-tilt tables of every mdoc (checked, nothing written)."""
    if params.dose_per_tilt_image > 0 and params.dose_per_movie_frame > 0:
        raise InputError("give --dose_per_tilt_image or --dose_per_movie_frame, not both")
    movies = _glob(params.movie_files, "--movie_files")
    by_name: dict[str, str] = {}
    for movie in movies:
        other = by_name.setdefault(base_name(movie), movie)
        if other != movie:
            raise InputError(f"{other} and {movie} have the same name without suffixes")
    rows, tables = [], {}
    with Progress(transient=True) as bar:
        mdocs = _glob(params.mdoc_files, "--mdoc_files")
        task = bar.add_task("reading mdoc files and movie headers", total=len(mdocs))
        for mdoc in mdocs:
            name = base_name(mdoc)
            name = f"{params.prefix}_{name}" if params.prefix else name
            if name in tables:
                raise InputError(f"a second mdoc gives the tilt-series name {name!r}", file=mdoc)
            tables[name], px = _series_table(params, Path(mdoc), by_name, base_name(mdoc))
            row: dict[str, object] = {
                "rlnTomoName": name,
                "rlnVoltage": params.kv,
                "rlnSphericalAberration": params.cs,
                "rlnAmplitudeContrast": params.q0,
                "rlnMicrographOriginalPixelSize": px,
            }
            if params.images_are_motion_corrected:
                row["rlnTomoTiltSeriesPixelSize"] = px
            row["rlnTomoHand"] = -1 if params.flip_tiltseries_hand else 1
            if params.mtf:
                row["rlnMtfFileName"] = params.mtf
            if params.optics_group_name:
                row["rlnOpticsGroupName"] = params.optics_group_name
            rows.append(row)
            bar.advance(task)
    return pd.DataFrame(rows), tables


def run(params: ImportTomoParams) -> dict[str, str]:
    """Import; returns ``{output path: RELION node type}``."""
    for name, value in (("--kv", params.kv), ("--cs", params.cs)):
        if value < 0 or (name == "--kv" and value == 0):
            raise InputError(f"{name} {value:g} is not a valid value")
    if not 0 <= params.q0 < 1:
        raise InputError(f"--q0 {params.q0:g} must be in [0, 1)")
    global_table, tables = import_tilt_series(params)
    with run_job(
        "Import", params, output_dir=params.output_dir, project_dir=params.project_dir
    ) as (job, outputs):
        star = job.path("tilt_series.star")
        TomogramSet.from_tables(global_table, tables).write(star, job.path("tilt_series"))
        n_tilts = sum(len(t) for t in tables.values())
        log.info("Imported %d tilt series (%d tilts)", len(tables), n_tilts)
        longest = max(len(t) for t in tables.values())
        curves = {
            name: [*t["rlnTomoNominalStageTiltAngle"], *[np.nan] * (longest - len(t))]
            for name, t in list(tables.items())[:8]
        }
        plot_series(
            job.path("tilt_scheme.png"), [str(k + 1) for k in range(longest)], curves,
            xlabel="acquisition order (mdoc DateTime)", ylabel="tilt angle (deg)",
            title="tilt scheme (first 8 series)",
        )  # fmt: skip
        outputs[job.alias + "tilt_series.star"] = NODE_TYPE
        write_job_report(job, outputs)
    return outputs
