"""Import coordinates (``subtomo import-coords``; RELION's "Import" of coordinates,
``Import/jobNNN/``): particle positions (and orientations) from Dynamo, IMOD, crYOLO,
pytom-match-pick, copick or a CSV become a RELION 5 ``particles.star`` (conventions §16).

Positions are converted to rlnCenteredCoordinate*Angst with the tomograms' sizes and pixel
sizes (§1.3); orientations, where the file has them, to rlnAngleRot/Tilt/Psi. Writes
``particles.star``, ``optimisation_set.star`` (particles + tomograms) and ``report.html``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from subtomo.data import OptimisationSet, ParticleSet, TomogramSet
from subtomo.data.paths import relative_to_cwd
from subtomo.io.coordinate_files import FORMATS, read_pick_file
from subtomo.picking import locate_picks, particle_rows
from subtomo.project import run_job, write_job_report
from subtomo.project.options import option, output_dir_option

__all__ = ["ImportCoordsParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class ImportCoordsParams:
    """Options of "Import coordinates"."""

    i: str = option(..., "--i", help="Coordinate file: .tbl, .mod, .cbox, .star, .json, .csv.")
    tomograms: str = option(
        ..., "--tomograms", "--t", help="tomograms.star (tomogram sizes and pixel sizes)."
    )
    format: str = option(
        "auto",
        "--format",
        help=f"File format: auto (by ending), {', '.join(FORMATS)}.",
    )
    bin: float = option(
        0.0,
        "--bin",
        help="Binning of the picked tomogram; <= 0: the file's voxel size over the tilt-series "
        "pixel size, else rlnTomoTomogramBinning, else 1.",
    )
    tomo_name: str = option(
        "", "--tomo_name", help="rlnTomoName for files that name no tomogram (IMOD, crYOLO)."
    )
    doc: str = option("", "--doc", help="Dynamo .doc (tomogram numbers to files).")
    csv_unit: str = option(
        "voxel", "--csv_unit", help="CSV x/y/z: voxel (0-based) or angst (from voxel 0)."
    )
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def run(params: ImportCoordsParams) -> dict[str, str]:
    """Read and convert the coordinates; returns ``{output path: RELION node type}``."""
    tomograms = TomogramSet.read(params.tomograms)
    picks = read_pick_file(
        params.i, params.format, doc=params.doc or None, csv_unit=params.csv_unit
    )
    located = locate_picks(picks, tomograms, binning=params.bin, tomo_name=params.tomo_name)
    particles = ParticleSet.from_tables(
        particle_rows(located.names, located.centred, located.angles)
    )
    inputs = {
        params.i: "ParticleGroupMetadata.star",
        params.tomograms: "TomogramGroupMetadata.star",
    }
    with run_job(
        "Import",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        particles.write(job.path("particles.star"))
        OptimisationSet(
            particles=Path(relative_to_cwd(job.path("particles.star"))),
            tomograms=Path(params.tomograms),
        ).write(job.path("optimisation_set.star"))
        outputs[job.alias + "particles.star"] = "ParticleGroupMetadata.star.relion.tomo.import"
        outputs[job.alias + "optimisation_set.star"] = "TomoOptimisationSet.star.relion.tomo.import"
        counts = pd.Series(located.names).value_counts(sort=False)
        rows = [
            {"tomogram": name, "particles": int(n), "binning": f"{located.binning[name]:g}"}
            for name, n in counts.items()
        ]
        log.info("%d particles from %s", len(particles), params.i)
        write_job_report(
            job,
            outputs,
            summary={
                "coordinates from": params.i,
                "orientations": "yes" if located.angles is not None else "no",
            },
            tables={"tomograms": rows},
        )
    return outputs
