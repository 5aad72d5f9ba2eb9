"""The particle inputs of a job: an optimisation set and/or particles, tomograms and
trajectories given one by one (RELION's ``--ios`` and ``--p/--t/--mot``), read and checked."""

from __future__ import annotations

from pathlib import Path

from subtomo.data.optimisation_set import OptimisationSet
from subtomo.data.particles import ParticleSet
from subtomo.data.tomograms import TomogramSet
from subtomo.data.trajectories import Trajectories
from subtomo.data.validate import require_particles, validate_particles
from subtomo.errors import InputError

__all__ = ["read_particle_inputs"]


def read_particle_inputs(
    ios: str | None,
    particles: str | None,
    tomograms: str | None,
    trajectories: str | None = None,
) -> tuple[ParticleSet, TomogramSet, Trajectories | None, OptimisationSet]:
    """Particles, tomograms and trajectories of an optimisation set and/or direct entries,
    with the optimisation set they make up.

    Direct entries override those of the optimisation set (RELION's ``--p/--t/--mot``). The
    particles must be non-empty and every number the jobs use valid
    (:func:`~subtomo.data.validate.validate_particles`; image files are checked by the jobs
    that read them).
    """
    opt = OptimisationSet.read(ios) if ios else OptimisationSet()
    for name, value in (
        ("particles", particles),
        ("tomograms", tomograms),
        ("trajectories", trajectories),
    ):
        if value:
            setattr(opt, name, Path(value))
    if opt.particles is None or opt.tomograms is None:
        raise InputError("give --ios or both --particles and --tomograms", file=ios)
    tomos = TomogramSet.read(opt.tomograms)
    parts = ParticleSet.read(opt.particles, tomograms=tomos)
    require_particles(parts)
    validate_particles(parts, tomos, check_files=False)
    motion = Trajectories.read(opt.trajectories) if opt.trajectories else None
    return parts, tomos, motion, opt
