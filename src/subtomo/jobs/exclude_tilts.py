"""Exclude tilt images (``subtomo exclude-tilts``; RELION's "Exclude tilt images",
``ExcludeTiltImages/jobNNN/``): drop tilts by rule, not by clicking in napari.

Rules (:mod:`subtomo.tilt.exclusion`): dark or blank images (``--dark_fraction``), CTF fit
resolution worse than ``--max_resolution`` Å, drift above ``--max_motion`` px, and tilts listed
with ``--exclude NAME:ANGLE`` (nominal stage tilt, repeatable). Writes what RELION writes
(relion5-upstream.md §4): ``selected_tilt_series.star`` (global, same columns,
rlnTomoTiltSeriesStarFile moved to the end; a series left without tilts is dropped) and
``tilt_series/<name>.star`` with the kept rows, every column unchanged, sorted by nominal tilt;
plus ``excluded_tilts.star`` and ``report.html`` listing each dropped tilt and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.data import TiltSeries, TomogramSet, read_tilt
from subtomo.errors import InputError
from subtomo.io import read_mrc_header, read_star, write_star
from subtomo.project import run_job, write_job_report
from subtomo.project.options import option, output_dir_option
from subtomo.tilt.exclusion import by_ctf_resolution, by_intensity, by_list, by_motion, exclusions

__all__ = ["ExcludeTiltsParams", "parse_exclude", "run"]

log = logging.getLogger("subtomo")

_STAR_FILE = "rlnTomoTiltSeriesStarFile"


def parse_exclude(text: str) -> tuple[str, float]:
    """``"TS_01:-60"`` -> ``("TS_01", -60.0)``; ``ValueError`` otherwise."""
    name, sep, angle = text.rpartition(":")
    try:
        value = float(angle)
    except ValueError:
        value = float("nan")
    if not sep or not name or not np.isfinite(value):
        raise ValueError(f"expected NAME:ANGLE (e.g. TS_01:-60), found {text!r}")
    return name, value


@dataclass
class ExcludeTiltsParams:
    """Options of "Exclude tilt images": the rules (each off at 0 / empty)."""

    i: str = option(..., "--i", help="Tilt series: tomograms.star or a job's global STAR.")
    dark_fraction: float = option(
        0.3, "--dark_fraction", help="Drop images darker than this x the series median; 0: off."
    )
    max_resolution: float = option(
        0.0, "--max_resolution", help="Drop tilts whose CTF fit is worse; <= 0: off.", unit="Å"
    )
    max_motion: float = option(
        0.0, "--max_motion", help="Drop tilts with more accumulated motion; <= 0: off.", unit="px"
    )
    exclude: tuple[str, ...] = option(
        (), "--exclude", help="NAME:ANGLE of a tilt to drop (nominal stage tilt); repeat.",
    )  # fmt: skip
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def _image_stats(series: TiltSeries) -> tuple[np.ndarray, ...]:
    """Mean, standard deviation, robust spread (1.4826 MAD) and minimum of every tilt image
    (one image in memory at a time)."""
    stats = []
    for f in range(series.n_tilts):
        image = read_tilt(series, f).flatten()
        sample = image[:: max(1, image.numel() // 1_000_000)]
        mad = float((sample - sample.median()).abs().median())
        stats.append((float(image.mean()), float(image.std()), 1.4826 * mad, float(image.min())))
    return tuple(np.array(column) for column in zip(*stats, strict=True))


def run(params: ExcludeTiltsParams) -> dict[str, str]:
    """Apply the rules; returns ``{output path: RELION node type}``."""
    tomograms = TomogramSet.read(params.i)
    listed: dict[str, list[float]] = {}
    for text in params.exclude:
        try:
            name, angle = parse_exclude(text)
        except ValueError as exc:
            raise InputError(f"--exclude: {exc}") from None
        if name not in tomograms:
            raise InputError(f"--exclude {text}: no tilt series {name!r} in {params.i}")
        listed.setdefault(name, []).append(angle)
    if params.max_resolution > 0:
        for series in tomograms:
            if "rlnCtfMaxResolution" not in series.tilts.columns:
                raise InputError("--max_resolution needs a CTF fit (run subtomo ctffind first)",
                                 file=series.tilt_file, block=series.name,
                                 column="rlnCtfMaxResolution")  # fmt: skip
    if params.dark_fraction > 0:
        for series in tomograms:
            for path in series.micrograph_paths or []:
                read_mrc_header(path)  # missing images: one error naming the file, no job yet
    inputs = {params.i: "TomogramGroupMetadata.star.relion.tomo"}
    with run_job("ExcludeTiltImages", params, output_dir=params.output_dir,
                 project_dir=params.project_dir, inputs=inputs) as (job, outputs):  # fmt: skip
        tables, kept_names, dropped = {}, [], []
        for series in tomograms:
            tilts = series.tilts
            dark = by_intensity(*_image_stats(series), params.dark_fraction) if (
                params.dark_fraction > 0 and series.micrograph_paths) else {}  # fmt: skip
            reasons = exclusions(
                dark,
                by_ctf_resolution(tilts, params.max_resolution),
                by_motion(tilts, params.max_motion),
                by_list(tilts, listed.get(series.name, [])),
            )
            for row, why in reasons.items():
                dropped.append({
                    "rlnTomoName": series.name,
                    "rlnMicrographName": str(tilts["rlnMicrographName"].iloc[row])
                    if "rlnMicrographName" in tilts.columns else "",
                    "rlnTomoNominalStageTiltAngle": float(
                        tilts["rlnTomoNominalStageTiltAngle"].iloc[row])
                    if "rlnTomoNominalStageTiltAngle" in tilts.columns else float("nan"),
                    "subtomoExclusionReason": why,
                })  # fmt: skip
            kept = tilts.drop(index=list(reasons)).reset_index(drop=True)
            if "rlnTomoNominalStageTiltAngle" in kept.columns:
                kept = kept.sort_values("rlnTomoNominalStageTiltAngle", kind="stable")
            if len(kept) == 0:
                log.warning("%s: every tilt excluded; the series is dropped", series.name)
                continue
            tables[series.name] = kept.reset_index(drop=True)
            kept_names.append(series.name)
            log.info("%s: %d of %d tilts kept", series.name, len(kept), len(tilts))
        if not tables:
            raise InputError("every tilt of every series was excluded: nothing to write")
        table = tomograms.global_table
        table = table[table["rlnTomoName"].isin(kept_names)].reset_index(drop=True)
        table = table.drop(columns=[_STAR_FILE], errors="ignore")
        out = job.path("selected_tilt_series.star")
        TomogramSet.from_tables(table, tables).write(out, job.path("tilt_series"))
        _star_file_last(out)
        outputs[job.alias + "selected_tilt_series.star"] = (
            "TomogramGroupMetadata.star.relion.tomo.excludeimages"
        )
        columns = ["rlnTomoName", "rlnMicrographName", "rlnTomoNominalStageTiltAngle",
                   "subtomoExclusionReason"]  # fmt: skip
        write_star(job.path("excluded_tilts.star"),
                   {"excluded": pd.DataFrame(dropped, columns=columns)})  # fmt: skip
        summary = {"tilts dropped": len(dropped), "tilt series kept": len(tables)}
        rows = [{"tilt series": d["rlnTomoName"], "image": d["rlnMicrographName"],
                 "tilt (deg)": f"{d['rlnTomoNominalStageTiltAngle']:.1f}",
                 "why": d["subtomoExclusionReason"]} for d in dropped]  # fmt: skip
        write_job_report(job, outputs, summary=summary, tables={"dropped tilts": rows})
    return outputs


def _star_file_last(path: Path) -> None:
    """RELION rewrites the global table with rlnTomoTiltSeriesStarFile as the last column."""
    table = read_star(path)["global"]
    write_star(path, {"global": table[[c for c in table.columns if c != _STAR_FILE]
                                      + [_STAR_FILE]]})  # fmt: skip
