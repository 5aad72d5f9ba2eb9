"""Align tilt series (``subtomo align-tilts``; RELION's "Align tilt series",
``AlignTiltSeries/jobNNN/``): without fiducials, coarse cosine-stretched cross-correlation,
tilt-axis refinement by common lines and projection matching (:mod:`subtomo.tilt.alignment`,
conventions §18); with ``--fiducial``, on gold beads of ``--bead_diameter``: detection,
tracking and a least-squares fit of the projection model (:mod:`subtomo.tilt.fiducials`, §20).
Fiducial-less with ``--erase_gold``: gold beads of ``--bead_diameter`` are found and erased
first (:mod:`subtomo.tilt.gold`): they bias projection matching (§18, "Gold erasing").

Starts from each series' tilt angles and tilt axis: rlnTomoYTilt/ZRot when it has them, else
the nominal stage tilt and tilt-axis angle (:func:`subtomo.tilt.table_rotations`); the shifts
are found anew.
Writes ``aligned_tilt_series.star`` and ``tilt_series/NAME.star`` (rows in ascending nominal
tilt as RELION's alignment job, every input column kept) with rlnTomoXTilt (0), rlnTomoYTilt,
rlnTomoZRot, rlnTomoXShiftAngst, rlnTomoYShiftAngst, and per tilt ``subtomoAlignResidual``
(px) and ``subtomoAlignFlagged`` (1: does not align; ``subtomo exclude-tilts`` can drop it);
rlnTomoSizeX/Y/Z when the input has none (the image size and ``--thickness``); ``report.html``.
In fiducial mode the residual is the RMS of the tilt's bead residuals, and ``fiducials.star``
lists the fitted beads (rlnTomoName, rlnCenteredCoordinateX/Y/ZAngst in the aligned tomogram,
``subtomoBeadResidual`` px), as the simulator's ``fiducials.star``.
Runs on the CPU (the alignment's small per-tilt steps mix devices; not yet checked on CUDA).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from subtomo.data import TiltSeries, TomogramSet
from subtomo.data.tomograms import tilt_images
from subtomo.errors import InputError
from subtomo.io import write_star
from subtomo.project import run_job, write_job_report
from subtomo.project.options import option, output_dir_option
from subtomo.tilt import table_rotations
from subtomo.tilt.alignment import TiltAlignment, align_tilt_series
from subtomo.tilt.external_alignment import view_order
from subtomo.tilt.fiducials import align_fiducials

__all__ = ["AlignTiltsParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class AlignTiltsParams:
    """Options of "Align tilt series"."""

    i: str = option(..., "--i", help="Tilt series: tomograms.star or a job's global STAR.")
    thickness: int = option(
        0, "--thickness", help="Specimen thickness; <= 0: rlnTomoSizeZ.", unit="px"
    )
    bin: int = option(0, "--bin", help="Binning of the images aligned; <= 0: <= 128 px.")
    rounds: int = option(
        4, "--rounds", help="Rounds of projection matching (one more after the tilt-axis scan)."
    )
    max_shift: float = option(
        0.0, "--max_shift", help="Largest shift between neighbouring tilts; <= 0: width/4.",
        unit="px",
    )  # fmt: skip
    axis_search: float = option(
        4.0, "--axis_search", help="Tilt-axis search range (±); 0: keep ZRot.", unit="deg"
    )
    tilt_angles: bool = option(
        True, "--tilt_angles/--no_tilt_angles", help="Refine the tilt angles too."
    )
    tilt_angle_rounds: int = option(
        4, "--tilt_angle_rounds", help="Rounds of projection matching that refine tilt angles."
    )
    fiducial: bool = option(
        False, "--fiducial/--no_fiducial", help="Align on gold beads (fiducials)."
    )
    bead_diameter: float = option(
        100.0, "--bead_diameter", help="Gold bead diameter (--fiducial, --erase_gold).", unit="Å"
    )
    erase_gold: bool = option(
        False,
        "--erase_gold/--no_erase_gold",
        help="Fiducial-less: erase gold beads of --bead_diameter before aligning.",
    )
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


@dataclass
class _Plan:
    series: TiltSeries
    image_size: tuple[int, int]
    size: tuple[int, int, int]
    order: np.ndarray


def _plan(params: AlignTiltsParams, series: TiltSeries) -> _Plan:
    """Check one series before the job starts: tilts, images, thickness."""
    where = {"file": series.tilt_file, "block": series.name}
    if series.n_tilts < 3:
        raise InputError(f"{series.n_tilts} tilt(s): alignment needs at least 3", **where)
    image_size = series.image_size
    if image_size is None:
        raise InputError("no tilt images (rlnMicrographName)", **where)
    depth = params.thickness
    if depth <= 0:
        if "rlnTomoSizeZ" not in series.row.index:
            raise InputError(
                "no rlnTomoSizeZ: give the specimen thickness with --thickness (bin-1 px)",
                file=params.i,
                block=series.name,
            )
        depth = round(float(series.row["rlnTomoSizeZ"]))
    size = (
        round(float(series.row.get("rlnTomoSizeX", image_size[0]))),
        round(float(series.row.get("rlnTomoSizeY", image_size[1]))),
        int(depth),
    )
    if (params.fiducial or params.erase_gold) and params.bead_diameter / (
        2 * series.pixel_size
    ) < 1.5:
        raise InputError(
            f"--bead_diameter {params.bead_diameter} Å is under 3 pixels of "
            f"{series.pixel_size} Å: too small to detect",
            **where,
        )
    return _Plan(series, image_size, size, view_order(series.tilts))


def _binning(params: AlignTiltsParams, image_size: tuple[int, int]) -> int:
    if params.bin > 0:
        return params.bin
    return max(1, 2 ** math.ceil(math.log2(max(image_size) / 128)))


@dataclass
class _Aligned:
    """One series aligned: the alignment, per tilt its residual (px) and flag, the report's
    numbers, and the fitted beads (fiducial mode; ``(n, 3)`` px from the tomogram centre, and
    their residuals, px)."""

    alignment: TiltAlignment
    residual_px: torch.Tensor
    flagged: torch.Tensor
    summary: dict[str, str]
    beads: tuple[torch.Tensor, torch.Tensor] | None = None


def _align(params: AlignTiltsParams, plan: _Plan) -> _Aligned:
    series = plan.series
    rotations = table_rotations(series.tilts)
    y_tilt = torch.rad2deg(torch.asin((-rotations[:, 2, 0]).clamp(-1, 1)))
    z_rot = torch.rad2deg(torch.atan2(rotations[:, 1, 0], rotations[:, 0, 0]))
    images = tilt_images(series)
    max_shift = params.max_shift if params.max_shift > 0 else min(plan.image_size) / 4
    if params.fiducial:
        try:
            model = align_fiducials(
                images,
                y_tilt,
                z_rot,
                params.bead_diameter / (2 * series.pixel_size),
                max_shift=max_shift,
            )
        except ValueError as error:
            raise InputError(str(error), file=series.tilt_file, block=series.name) from None
        summary = {
            "axis change (deg)": f"{model.axis_correction:+.2f}",
            "tilt offset (deg)": f"{model.tilt_offset:+.2f}",
            "beads": str(len(model.positions)),
            "bead residual (px RMS)": f"{model.rms_px:.2f}",
        }
        return _Aligned(
            model.alignment,
            model.residual_px,
            model.flagged,
            summary,
            (model.positions, model.bead_residual_px),
        )
    result = align_tilt_series(
        images,
        y_tilt,
        z_rot,
        plan.size,
        binning=_binning(params, plan.image_size),
        max_shift=max_shift,
        axis_search_deg=params.axis_search,
        rounds=params.rounds,
        refine_axis=params.axis_search > 0,
        refine_tilt_angles=params.tilt_angles,
        tilt_angle_rounds=params.tilt_angle_rounds,
        bead_radius_px=params.bead_diameter / (2 * series.pixel_size) if params.erase_gold else 0,
    )
    summary = {"axis change (deg)": f"{result.axis_correction:+.2f}"}
    return _Aligned(result.alignment, result.residual_px, result.flagged, summary)


def run(params: AlignTiltsParams) -> dict[str, str]:
    """Align every series; returns ``{output path: RELION node type}``."""
    if min(params.rounds, params.axis_search, params.tilt_angle_rounds) < 0:
        raise InputError("--rounds, --axis_search and --tilt_angle_rounds must be >= 0")
    tomograms = TomogramSet.read(params.i, require_series=True)
    plans = [_plan(params, s) for s in tomograms]
    inputs = {params.i: "TomogramGroupMetadata.star.relion.tomo"}
    with run_job(
        "AlignTiltSeries",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        table = tomograms.global_table.copy()
        tables, rows, tilt_rows, beads = {}, [], [], []
        for k, plan in enumerate(plans):
            series = plan.series
            result = _align(params, plan)
            tilts = series.tilts.copy()
            for column, values in result.alignment.columns(series.pixel_size).items():
                tilts[column] = values.cpu().numpy()
            tilts["subtomoAlignResidual"] = result.residual_px.cpu().numpy()
            if result.beads is not None:
                positions, residuals = (v.cpu().numpy() for v in result.beads)
                beads.append(
                    pd.DataFrame(
                        {
                            "rlnTomoName": series.name,
                            **{
                                f"rlnCenteredCoordinate{a}Angst": positions[:, i]
                                * series.pixel_size
                                for i, a in enumerate("XYZ")
                            },
                            "subtomoBeadResidual": residuals,
                        }
                    )
                )
            tilts["subtomoAlignFlagged"] = result.flagged.cpu().numpy().astype(int)
            tables[series.name] = tilts.iloc[plan.order].reset_index(drop=True)
            for axis, value in zip("XYZ", plan.size, strict=True):
                if f"rlnTomoSize{axis}" not in table.columns or pd.isna(
                    table.loc[k, f"rlnTomoSize{axis}"]
                ):
                    table.loc[k, f"rlnTomoSize{axis}"] = value
            flagged = tables[series.name].loc[
                tables[series.name]["subtomoAlignFlagged"] == 1, "rlnTomoYTilt"
            ]
            rows.append(
                {
                    "tilt series": series.name,
                    "tilts": series.n_tilts,
                    "ZRot (deg)": f"{float(result.alignment.z_rot.mean()):.2f}",
                    **result.summary,
                    "median residual (px)": f"{float(result.residual_px.nanmedian()):.2f}",
                    "flagged tilts (deg)": ", ".join(f"{a:.1f}" for a in flagged) or "none",
                }
            )
            for _, tilt in tables[series.name].iterrows():
                tilt_rows.append(
                    {
                        "tilt series": series.name,
                        "YTilt (deg)": f"{tilt['rlnTomoYTilt']:.2f}",
                        "ZRot (deg)": f"{tilt['rlnTomoZRot']:.2f}",
                        "shift (Å)": f"{tilt['rlnTomoXShiftAngst']:.1f}, "
                        f"{tilt['rlnTomoYShiftAngst']:.1f}",
                        "residual (px)": f"{tilt['subtomoAlignResidual']:.2f}",
                        "flagged": "yes" if tilt["subtomoAlignFlagged"] else "",
                    }
                )
            log.info(
                "%s: %d tilts aligned, median residual %.2f px, %d flagged",
                series.name, series.n_tilts, float(result.residual_px.nanmedian()), len(flagged),
            )  # fmt: skip
        out = job.path("aligned_tilt_series.star")
        TomogramSet.from_tables(table, tables).write(out, job.path("tilt_series"))
        outputs[job.alias + "aligned_tilt_series.star"] = (
            "TomogramGroupMetadata.star.relion.tomo.aligntiltseries"
        )
        if beads:
            write_star(job.path("fiducials.star"), {"fiducials": pd.concat(beads)})
        write_job_report(
            job,
            outputs,
            summary=(
                {"method": f"fiducial: beads of {params.bead_diameter:g} Å, tracked and fitted"}
                if params.fiducial
                else {"method": "fiducial-less: stretched cross-correlation, common lines, "
                      "projection matching", "rounds": params.rounds,
                      "gold erased": f"beads of {params.bead_diameter:g} Å"
                      if params.erase_gold else "no"}
            ),
            tables={"tilt series": rows, "tilts": tilt_rows},
        )  # fmt: skip
    return outputs
