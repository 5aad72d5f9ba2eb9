"""Subset selection (RELION's "Subset selection" job): classes, thresholds, duplicates and
random half sets, written to ``Select/jobNNN/particles.star``."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from subtomo.data import ParticleSet, TomogramSet
from subtomo.errors import InputError
from subtomo.io import numeric_column
from subtomo.jobs.jobdir import run_job
from subtomo.report.job_report import write_job_report
from subtomo.subsets import duplicate_keep_mask, random_half_sets

log = logging.getLogger("subtomo")

__all__ = ["SelectParams", "run"]


@dataclasses.dataclass
class SelectParams:
    """Parameters, named after RELION's Subset selection fields."""

    input: Path  # a particles/_data.star, or an _optimiser.star of any iteration
    classes: tuple[int, ...] = ()  # keep these rlnClassNumber values (empty: all)
    min_pmax: float | None = None  # keep rlnMaxValueProbDistribution >= this
    min_loglike: float | None = None  # keep rlnLogLikeliContribution >= this
    remove_duplicates_angst: float | None = None  # minimum inter-particle distance, Å
    tomograms: Path | None = None  # only needed for legacy pixel coordinates
    random_halves: bool = False  # (re)assign rlnRandomSubset at random
    seed: int = 0
    output_dir: Path | None = None
    project_dir: Path = Path(".")


def data_star_for(path: Path) -> Path:
    """The _data.star that belongs to an _optimiser.star (or the file itself)."""
    if path.name.endswith("_optimiser.star"):
        return path.with_name(path.name[: -len("_optimiser.star")] + "_data.star")
    return path


def _threshold(particles: ParticleSet, column: str, minimum: float) -> np.ndarray:
    values = numeric_column(particles.particles, column, particles.source, "particles")
    return values >= minimum


def run(params: SelectParams) -> Path:
    """Select particles; returns the path of the written particles.star."""
    source = data_star_for(Path(params.input))
    tomograms = TomogramSet.read(params.tomograms) if params.tomograms else None
    particles = ParticleSet.read(source, tomograms)
    inputs = {str(source): "ParticleGroupMetadata.star"}
    with run_job(
        "Select",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        keep = np.ones(len(particles), dtype=bool)
        log.info("read %d particles from %s", len(particles), source)
        if params.classes:
            classes = numeric_column(
                particles.particles, "rlnClassNumber", source, "particles"
            ).astype(int)
            keep &= np.isin(classes, params.classes)
            log.info("classes %s: %d particles", list(params.classes), int(keep.sum()))
        if params.min_pmax is not None:
            keep &= _threshold(particles, "rlnMaxValueProbDistribution", params.min_pmax)
            log.info("Pmax >= %g: %d particles", params.min_pmax, int(keep.sum()))
        if params.min_loglike is not None:
            keep &= _threshold(particles, "rlnLogLikeliContribution", params.min_loglike)
            log.info("log-likelihood >= %g: %d particles", params.min_loglike, int(keep.sum()))
        selected = particles.subset(keep)
        if params.remove_duplicates_angst is not None:
            if params.remove_duplicates_angst <= 0:
                raise InputError("the minimum distance for duplicates must be > 0 Å")
            centres = (
                selected.centered_coordinates_angst()
                - (selected.subtomogram_matrices() @ selected.origins_angst()[..., None])[..., 0]
            )
            unique = duplicate_keep_mask(
                centres.numpy(), selected.tomo_names, params.remove_duplicates_angst
            )
            removed = selected.subset(~unique)
            removed.write(job.path("particles_removed.star"))
            outputs[str(job.path("particles_removed.star"))] = "ParticleGroupMetadata.star"
            selected = selected.subset(unique)
            log.info(
                "removed %d duplicates closer than %g Å",
                len(removed),
                params.remove_duplicates_angst,
            )
        if params.random_halves:
            selected.particles["rlnRandomSubset"] = random_half_sets(len(selected), params.seed)
        out = job.path("particles.star")
        selected.write(out)
        outputs[str(out)] = "ParticleGroupMetadata.star"
        log.info("kept %d of %d particles -> %s", len(selected), len(particles), out)
        write_job_report(job, outputs)
    return out
