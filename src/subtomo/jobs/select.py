"""Subset selection (RELION's "Subset selection" job): classes, thresholds, duplicates and
random half sets, written to ``Select/jobNNN/particles.star``."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from subtomo.data import ParticleSet, TomogramSet, require_particles
from subtomo.errors import InputError
from subtomo.io import numeric_column
from subtomo.project import run_job, write_job_report
from subtomo.project.options import option, output_dir_option
from subtomo.subsets import duplicate_keep_mask, random_half_sets

log = logging.getLogger("subtomo")

__all__ = ["SelectParams", "class_numbers", "run"]


def class_numbers(text: str) -> tuple[int, ...]:
    """``"1,3"`` -> ``(1, 3)``; ``ValueError`` unless every entry is a class number >= 1."""
    entries = [c for c in text.replace(" ", "").split(",") if c]
    if not all(c.isdigit() and int(c) >= 1 for c in entries):
        raise ValueError(f"expected class numbers >= 1 like 1,3, found {text!r}")
    return tuple(int(c) for c in entries)


@dataclasses.dataclass
class SelectParams:
    """Options of "Subset selection" (named after RELION's fields)."""

    input: Path = option(
        ..., "--i", help="particles.star, a _data.star or an _optimiser.star of any iteration."
    )
    classes: tuple[int, ...] = option(
        (), "--classes", help="Class numbers to keep, e.g. 1,3 (default: all).", parse=class_numbers
    )
    min_pmax: float | None = option(
        None, "--min-pmax", help="Keep rlnMaxValueProbDistribution >= this."
    )
    min_loglike: float | None = option(
        None, "--min-loglike", help="Keep rlnLogLikeliContribution >= this."
    )
    remove_duplicates_angst: float | None = option(
        None, "--remove-duplicates", help="Remove particles closer than this distance.", unit="Å"
    )
    tomograms: Path | None = option(
        None, "--tomograms", help="tomograms.star (for legacy pixel coordinates)."
    )
    random_halves: bool = option(
        False, "--random-halves", help="Reassign rlnRandomSubset at random."
    )
    seed: int = option(0, "--seed", help="Random seed of --random-halves.")
    output_dir: Path | None = output_dir_option()
    project_dir: Path = Path(".")


def data_star_for(path: Path) -> Path:
    """The _data.star that belongs to an _optimiser.star (or the file itself)."""
    if path.name.endswith("_optimiser.star"):
        return path.with_name(path.name[: -len("_optimiser.star")] + "_data.star")
    return path


def _keep(params: SelectParams, particles: ParticleSet) -> np.ndarray:
    """(n,) bool: the particles of the wanted classes above the thresholds. ``InputError``
    when that is none of them (a class not in the file, thresholds above every value)."""
    require_particles(particles)
    keep = np.ones(len(particles), dtype=bool)
    if params.classes:
        classes = numeric_column(
            particles.particles, "rlnClassNumber", particles.source, "particles"
        ).astype(int)
        keep &= np.isin(classes, params.classes)
        if not keep.any():
            raise InputError(
                f"no particle is in classes {list(params.classes)} (--classes); the file has "
                f"classes {sorted(set(classes.tolist()))}",
                file=particles.source,
                block="particles",
                column="rlnClassNumber",
            )
    for flag, column, minimum in (
        ("--min-pmax", "rlnMaxValueProbDistribution", params.min_pmax),
        ("--min-loglike", "rlnLogLikeliContribution", params.min_loglike),
    ):
        if minimum is None:
            continue
        keep &= (
            numeric_column(particles.particles, column, particles.source, "particles") >= minimum
        )
        if not keep.any():
            raise InputError(
                f"no particle left at {flag} {minimum:g}",
                file=particles.source,
                block="particles",
                column=column,
            )
    return keep


def run(params: SelectParams) -> Path:
    """Select particles; returns the path of the written particles.star."""
    if params.remove_duplicates_angst is not None and params.remove_duplicates_angst <= 0:
        raise InputError("the minimum distance for duplicates must be > 0 Å (--remove-duplicates)")
    source = data_star_for(Path(params.input))
    tomograms = TomogramSet.read(params.tomograms) if params.tomograms else None
    particles = ParticleSet.read(source, tomograms)
    keep = _keep(params, particles)
    inputs = {str(source): "ParticleGroupMetadata.star"}
    with run_job(
        "Select",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        log.info("read %d particles from %s", len(particles), source)
        selected = particles.subset(keep)
        log.info("%d in the wanted classes and above the thresholds", len(selected))
        if params.remove_duplicates_angst is not None:
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
