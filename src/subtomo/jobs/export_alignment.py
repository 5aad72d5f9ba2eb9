"""Export tilt-series alignments (``subtomo export-alignment``, ``ExportAlignment/jobNNN/``):
the rlnTomoYTilt/ZRot/X,YShiftAngst of an aligned ``tomograms.star`` as IMOD ``NAME.xf`` +
``NAME.tlt`` (views in ascending nominal tilt) or AreTomo ``NAME.aln`` (SEC = row of the
per-tilt table), so that ``subtomo import-alignment`` reads back the same numbers
(conventions §14). rlnTomoXTilt must be 0: neither file format holds it as RELION reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from subtomo.data import TiltSeries, TomogramSet
from subtomo.errors import InputError
from subtomo.io import numeric_column
from subtomo.io.alignment_files import write_aln, write_angles, write_xf
from subtomo.project import run_job, write_job_report
from subtomo.project.options import option, output_dir_option
from subtomo.tilt.external_alignment import (
    ALIGNMENT_COLUMNS,
    relion_to_aretomo,
    relion_to_imod,
    view_order,
)

__all__ = ["ExportAlignmentParams", "run"]

_FORMATS = ("imod", "aretomo")


@dataclass
class ExportAlignmentParams:
    """Options of "Export tilt-series alignment"."""

    i: str = option(..., "--i", help="Aligned tilt series: tomograms.star or a global STAR.")
    format: str = option("imod", "--format", help="imod (.xf + .tlt) or aretomo (.aln).")
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def _columns(series: TiltSeries) -> dict[str, np.ndarray]:
    columns = {
        c: numeric_column(
            series.tilts,
            c,
            series.tilt_file,
            series.name,
            default=0.0 if c == "rlnTomoXTilt" else None,
        )
        for c in ALIGNMENT_COLUMNS
    }
    if np.abs(columns["rlnTomoXTilt"]).max() > 1e-3:
        raise InputError(
            "rlnTomoXTilt is not 0: IMOD and AreTomo files cannot hold it",
            file=series.tilt_file,
            block=series.name,
            column="rlnTomoXTilt",
        )
    return columns


def run(params: ExportAlignmentParams) -> dict[str, str]:
    """Write one alignment file set per series; returns ``{output path: RELION node type}``."""
    if params.format not in _FORMATS:
        raise InputError(f"--format must be one of {', '.join(_FORMATS)}, found {params.format!r}")
    tomograms = TomogramSet.read(params.i)
    columns = {s.name: _columns(s) for s in tomograms}
    inputs = {params.i: "TomogramGroupMetadata.star.relion.tomo"}
    with run_job(
        "ExportAlignment",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        for series in tomograms:
            px = series.pixel_size
            if params.format == "imod":
                order = view_order(series.tilts)
                xf, tlt = relion_to_imod({k: v[order] for k, v in columns[series.name].items()}, px)
                write_xf(job.path(f"{series.name}.xf"), xf)
                write_angles(job.path(f"{series.name}.tlt"), tlt)
                written = [f"{series.name}.xf", f"{series.name}.tlt"]
            else:
                aln = relion_to_aretomo(columns[series.name], px, series.image_size)
                write_aln(job.path(f"{series.name}.aln"), aln)
                written = [f"{series.name}.aln"]
            for name in written:
                outputs[job.alias + name] = "LogFile.txt.subtomo.alignment"
        write_job_report(
            job, outputs, summary={"format": params.format, "tilt series": len(tomograms)}
        )
    return outputs
