"""Flip hand (``subtomo flip-hand``): the mirror image of a map through its xy plane.

A de novo initial model's hand is only as right as the tomograms' (``subtomo initial-model``
reports it); this writes the other one, z -> -z about the box centre ``n//2``
(:func:`subtomo.ml.align_maps.mirror_z`), as ``flipped.mrc``.
"""

from __future__ import annotations

from dataclasses import dataclass

from subtomo.data import read_map_checked
from subtomo.io import write_mrc
from subtomo.ml.align_maps import mirror_z
from subtomo.project import run_job, write_job_report
from subtomo.project.options import option, output_dir_option

__all__ = ["FlipHandParams", "run"]


@dataclass
class FlipHandParams:
    """Options of "Flip hand"."""

    i: str = option(..., "--i", help="Input map (MRC).")
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def run(params: FlipHandParams) -> dict[str, str]:
    """Mirror ``--i``; returns ``{output path: RELION node type}``."""
    volume, px = read_map_checked(params.i, what="--i", cubic=True)
    with run_job(
        "FlipHand", params, output_dir=params.output_dir, project_dir=params.project_dir,
        inputs={params.i: "DensityMap.mrc"},
    ) as (job, outputs):  # fmt: skip
        write_mrc(job.path("flipped.mrc"), mirror_z(volume), px)
        outputs[job.alias + "flipped.mrc"] = "DensityMap.mrc"
        write_job_report(job, outputs)
    return outputs
