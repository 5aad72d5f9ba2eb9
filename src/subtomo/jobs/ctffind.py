"""CTF estimation (``subtomo ctffind``; RELION's "CTF estimation", ``CtfFind/jobNNN/``).

Reads a tilt-series set (``tomograms.star`` or the global STAR of Import/MotionCorr with its
``tilt_series/<name>.star``) and estimates, per tilt, defocus U/V/angle (optionally the phase
shift), the fit resolution and figure of merit, tilt-aware (:mod:`subtomo.tilt.ctffind`): the
defocus gradient across each tilted image, the sample thickness from the Thon-ring nodes and
the hand of the series, which sets (or only checks, ``--keep_hand``) ``rlnTomoHand``.

Outputs as RELION's CTFFIND job writes them (relion5-upstream.md §3, §8):
``tilt_series_ctf.star`` (global; ``subtomoSampleThicknessNm``, ``subtomoHandFit`` = β and
``subtomoHandFitError`` added), ``tilt_series/<name>.star`` re-sorted by pre-exposure with
rlnCtfImage, rlnDefocusU/V, rlnCtfAstigmatism, rlnDefocusAngle, rlnCtfFigureOfMerit,
rlnCtfMaxResolution (Å, not clamped: 999 marks a tilt without Thon rings) [, rlnPhaseShift],
``power_spectra_fits.star`` (every tilt, for display), one diagnostic spectrum per tilt
``<name>/<micrograph>.ctf`` (MRC: left half data, right half model; ``.ctf:mrc`` in
rlnCtfImage), plots and ``report.html``. A tilt without Thon rings (a constant image, or no
ring above the noise) keeps the series' median defocus with figure of merit 0 and resolution
999, is listed in the report and is dropped by ``subtomo exclude-tilts --max_resolution``.
Under torch.distributed the series are shared out over the ranks (each writes its spectra and
plots); rank 0 writes the STAR files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from subtomo.data import DEFOCUS_ESTIMATE, TiltSeries, TomogramSet, read_tilt
from subtomo.device import resolve_device
from subtomo.distributed import all_gather_object, own_files, shard
from subtomo.errors import InputError
from subtomo.io import read_mrc_header, write_mrc, write_star
from subtomo.project import run_job, write_job_report
from subtomo.project.options import device_option, option, output_dir_option
from subtomo.report.plots import plot_images, plot_xy
from subtomo.tilt import depth_gradient, table_rotations
from subtomo.tilt.ctffind import CtfSearch, SeriesFit, estimate_series

__all__ = ["GLOBAL_NODE", "CtfFindParams", "run"]

log = logging.getLogger("subtomo")

GLOBAL_NODE = "TomogramGroupMetadata.star.relion.tomo.ctffind"


@dataclass
class CtfFindParams:
    """Options of "CTF estimation" (CTFFIND's names where they exist)."""

    i: str = option(..., "--i", help="Tilt series: tomograms.star or a job's global STAR.")
    box: int = option(512, "--Box", "--box", help="Tile size for the spectra.", unit="px")
    res_min: float = option(30.0, "--ResMin", help="Lowest resolution fitted.", unit="Å")
    res_max: float = option(5.0, "--ResMax", help="Highest resolution fitted.", unit="Å")
    defocus_min: float = option(5000.0, "--dFMin", help="Lowest defocus searched.", unit="Å")
    defocus_max: float = option(50000.0, "--dFMax", help="Highest defocus searched.", unit="Å")
    defocus_step: float = option(100.0, "--FStep", help="Defocus search step.", unit="Å")
    astigmatism_max: float = option(2000.0, "--max_astig", help="Largest U - V.", unit="Å")
    local_search: float = option(
        10000.0, "--localsearch_nominal_defocus",
        help="Search ± this around rlnTomoNominalDefocus when present; <= 0: whole range.",
        unit="Å",
    )  # fmt: skip
    phase_shift: bool = option(
        False, "--do_phaseshift/--no_phaseshift", help="Fit a phase shift (phase plate)."
    )
    thickness: bool = option(
        True, "--fit_thickness/--no_fit_thickness", help="Fit sample thickness (Thon nodes)."
    )
    thickness_max: float = option(500.0, "--max_thickness", help="Thickest sample.", unit="nm")
    set_hand: bool = option(
        True, "--set_hand/--keep_hand",
        help="Write the hand found from the defocus gradient to rlnTomoHand (else report it).",
    )  # fmt: skip
    device: str = device_option()
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def _check_series(series: TiltSeries, box: int) -> list[Path]:
    """The tilt images, checked before any work: listed, present, readable, one size >= box."""
    _ = (series.pixel_size, series.voltage_kv, series.cs_mm, series.amplitude_contrast)
    paths = series.micrograph_paths
    if paths is None:
        raise InputError("no rlnMicrographName column: no tilt images to fit",
                         file=series.tilt_file, block=series.name)  # fmt: skip
    sizes = set()
    for path in paths:
        shape = read_mrc_header(path).shape
        sizes.add((int(shape[-1]), int(shape[-2])))
        if min(shape[-2:]) < box:
            raise InputError(f"tilt image {shape[-1]}x{shape[-2]} is smaller than --Box {box}",
                             file=path)  # fmt: skip
    if len(sizes) > 1:
        raise InputError(f"tilt images of different sizes {sorted(sizes)}",
                         file=series.tilt_file, block=series.name)  # fmt: skip
    return paths


def _search(params: CtfFindParams, series: TiltSeries) -> CtfSearch:
    lo, hi = params.defocus_min, params.defocus_max
    if params.local_search > 0 and "rlnTomoNominalDefocus" in series.tilts.columns:
        nominal = -1e4 * float(np.median(series.tilts["rlnTomoNominalDefocus"]))
        lo, hi = max(lo, nominal - params.local_search), nominal + params.local_search
    return CtfSearch(
        box=params.box, res_min=params.res_min, res_max=params.res_max, defocus_min=lo,
        defocus_max=hi, defocus_step=params.defocus_step,
        astigmatism_max=params.astigmatism_max, phase_shift=params.phase_shift,
        thickness=params.thickness, thickness_max_nm=params.thickness_max,
    )  # fmt: skip


def _tilt_table(series: TiltSeries, fit: SeriesFit, images: list[str],
                phase_shift: bool) -> pd.DataFrame:  # fmt: skip
    """The per-tilt table with RELION's CTFFIND columns, re-sorted by pre-exposure (an
    earlier estimate that ctf-refine kept is dropped: this one replaces it)."""
    table = series.tilts.drop(columns=[DEFOCUS_ESTIMATE], errors="ignore")
    found = [f for f in fit.fits if f is not None]
    median_u = float(np.median([f.defocus_u for f in found])) if found else 0.0
    median_v = float(np.median([f.defocus_v for f in found])) if found else 0.0
    rows = [
        (f.defocus_u, f.defocus_v, f.defocus_angle, f.figure_of_merit, f.resolution,
         f.phase_shift) if f is not None else (median_u, median_v, 0.0, 0.0, 999.0, 0.0)
        for f in fit.fits
    ]  # fmt: skip
    u, v, angle, fom, res, phase = (np.array(c, dtype=np.float64) for c in zip(*rows, strict=True))
    table["rlnCtfImage"] = images
    table["rlnDefocusU"], table["rlnDefocusV"] = u, v
    table["rlnCtfAstigmatism"] = np.abs(u - v)
    table["rlnDefocusAngle"] = angle
    table["rlnCtfFigureOfMerit"] = np.nan_to_num(fom)
    table["rlnCtfMaxResolution"] = res
    if phase_shift:
        table["rlnPhaseShift"] = phase
    if "rlnMicrographPreExposure" in table.columns:
        table = table.sort_values("rlnMicrographPreExposure", kind="stable")
    return table.reset_index(drop=True)


def _tilt_angles(series: TiltSeries) -> np.ndarray:
    """(t,) tilt angles in degrees: rlnTomoYTilt when aligned, else the nominal stage tilt."""
    for column in ("rlnTomoYTilt", "rlnTomoNominalStageTiltAngle"):
        if column in series.tilts.columns:
            return series.tilts[column].to_numpy(dtype=np.float64)
    return np.zeros(series.n_tilts)


def _plots(job, name: str, series: TiltSeries, fit: SeriesFit, px: float) -> None:
    """Defocus and fit resolution against tilt, the hand regression and diagnostic spectra."""
    angles = table_rotations(series.tilts)
    tilt = _tilt_angles(series)
    nan = float("nan")
    u = [f.defocus_u if f else nan for f in fit.fits]
    v = [f.defocus_v if f else nan for f in fit.fits]
    res = [min(f.resolution, 50.0) if f else nan for f in fit.fits]
    plot_xy(job.path(f"{name}_defocus.png"), {"U": (tilt, u), "V": (tilt, v)},
            xlabel="tilt (deg)", ylabel="defocus (Å)",
            title=f"{name}: defocus per tilt")  # fmt: skip
    plot_xy(job.path(f"{name}_resolution.png"), {"fit resolution": (tilt, res)},
            xlabel="tilt (deg)", ylabel="Å", title=f"{name}: CTF fit resolution",
            invert_y=True)  # fmt: skip
    expected = px * depth_gradient(angles).norm(dim=-1).numpy()
    slopes = [f.slope if f else nan for f in fit.fits]
    plot_xy(job.path(f"{name}_hand.png"),
            {"fitted slope": (expected, slopes), f"hand {fit.hand:+d}": (
                expected, fit.hand_beta * expected)},
            xlabel="px·|g| (Å of defocus per px per unit hand)",
            ylabel="defocus slope (Å/px)",
            title=f"{name}: defocus gradient, β = {fit.hand_beta:.2f} ± {fit.hand_error:.2f}",
            lines=False)  # fmt: skip
    order = np.argsort(tilt)
    picks = [int(order[0]), int(order[len(order) // 2]), int(order[-1])]
    shown = {f"{tilt[f]:.0f}°": fit.diagnostics[f] for f in dict.fromkeys(picks)
             if fit.diagnostics[f] is not None}  # fmt: skip
    if shown:
        plot_images(job.path(f"{name}_spectra.png"), shown,
                    title=f"{name}: spectra (left) and fits (right)")  # fmt: skip


@dataclass
class _Fitted:
    """One series' results for the tables: its tilt table, the tilts without Thon rings,
    the global columns to set and the summary lines."""

    table: pd.DataFrame
    excluded: list[dict[str, str]]
    columns: dict[str, float]
    summary: dict[str, str]


def _fit_series(
    params: CtfFindParams,
    job,
    series: TiltSeries,
    paths: dict[str, list[Path]],
    device: torch.device,
    advance: Callable[[int], None],
) -> _Fitted:
    """Fit one series' CTFs, write its diagnostic spectra and plots; its table rows."""
    px = series.pixel_size
    optics = (series.voltage_kv, series.cs_mm, series.amplitude_contrast)
    fit = estimate_series(
        lambda f, s=series: read_tilt(s, f), table_rotations(series.tilts), optics,
        px, _search(params, series), progress=advance, device=device,
    )  # fmt: skip
    images, excluded = [], []
    for f, path in enumerate(paths[series.name]):
        out = job.path(f"{series.name}/{path.stem}.ctf")
        if fit.diagnostics[f] is None:
            images.append("None")
            excluded.append({
                "tilt series": series.name, "image": path.name,
                "tilt (deg)": f"{_tilt_angles(series)[f]:.1f}",
                "why": "no Thon rings above the noise (constant or blank image)",
            })  # fmt: skip
            continue
        write_mrc(out, fit.diagnostics[f], px)
        images.append(f"{job.alias}{series.name}/{path.stem}.ctf:mrc")
    given = series.hand
    significant = fit.hand != 0 and abs(fit.hand_beta) > 3 * fit.hand_error
    if significant and fit.hand != given:
        log.warning("%s: the defocus gradient says rlnTomoHand = %+d, the input has "
                    "%+d%s", series.name, fit.hand, given,
                    "; writing the fitted hand" if params.set_hand else "")  # fmt: skip
    columns = {
        "subtomoSampleThicknessNm": fit.thickness_nm,
        "subtomoHandFit": fit.hand_beta,
        "subtomoHandFitError": fit.hand_error,
    }
    if significant and params.set_hand:
        columns = {"rlnTomoHand": fit.hand, **columns}
    summary = {
        f"{series.name}: hand": (
            f"{fit.hand:+d} (β = {fit.hand_beta:.2f} ± {fit.hand_error:.2f}, input "
            f"{given:+d}{', not significant' if not significant else ''})"
        ),
        f"{series.name}: sample thickness": f"{fit.thickness_nm:.0f} nm",
    }
    _plots(job, series.name, series, fit, px)
    table = _tilt_table(series, fit, images, params.phase_shift)
    return _Fitted(table, excluded, columns, summary)


def run(params: CtfFindParams) -> dict[str, str]:
    """Estimate the CTF of every tilt; returns ``{output path: RELION node type}``."""
    device = resolve_device(params.device)
    tomograms = TomogramSet.read(params.i, require_series=True)
    paths = {s.name: _check_series(s, params.box) for s in tomograms}
    inputs = {params.i: "TomogramGroupMetadata.star.relion.tomo"}
    with run_job("CtfFind", params, output_dir=params.output_dir,
                 project_dir=params.project_dir, inputs=inputs) as (job, outputs):  # fmt: skip
        global_table = tomograms.global_table.copy()
        tables, excluded, fits_rows, summary = {}, [], [], {}
        series_list = list(tomograms)
        mine = list(shard(range(len(series_list))))  # whole series: the hand fit uses all tilts
        with Progress(transient=True) as bar, own_files():
            task = bar.add_task("fitting CTFs", total=sum(series_list[k].n_tilts for k in mine))
            fitted = [
                _fit_series(params, job, series_list[k], paths, device,
                            lambda n: bar.advance(task, n))
                for k in mine
            ]  # fmt: skip
        records = {k: r for shares in all_gather_object(list(zip(mine, fitted, strict=True)))
                   for k, r in shares}  # fmt: skip
        for k, series in enumerate(series_list):
            record = records[k]
            tables[series.name] = record.table
            excluded.extend(record.excluded)
            for column, value in record.columns.items():
                global_table.loc[k, column] = value
            summary.update(record.summary)
            shown = record.table.drop(
                columns=["rlnMicrographName", "rlnMicrographMovieName"], errors="ignore"
            )
            shown.insert(0, "rlnTomoName", series.name)
            fits_rows.append(shown)
        total = sum(s.n_tilts for s in tomograms)
        out = job.path("tilt_series_ctf.star")
        TomogramSet.from_tables(global_table, tables).write(out, job.path("tilt_series"))
        outputs[job.alias + "tilt_series_ctf.star"] = GLOBAL_NODE
        write_star(job.path("power_spectra_fits.star"),
                   {"power_spectra_fits": pd.concat(fits_rows, ignore_index=True)})  # fmt: skip
        outputs[job.alias + "power_spectra_fits.star"] = (
            "Image2DGroupMetadata.star.relion.ctffind.power_spectra"
        )
        log.info("fitted %d tilts of %d tilt series; %d without Thon rings", total,
                 len(tomograms), len(excluded))  # fmt: skip
        write_job_report(job, outputs, summary=summary,
                         tables={"tilts without Thon rings": excluded})  # fmt: skip
    return outputs
