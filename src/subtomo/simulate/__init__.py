"""Ground-truth simulator: tilt series, RELION 5 tables and true maps from known particles.

See :func:`simulate` (layout and tables) and :meth:`Simulation.tilt_series` (images); the job
``subtomo simulate`` (:mod:`subtomo.jobs.simulate`) writes them as a RELION project.
"""

from subtomo.simulate.maps import DEMO_MAPS, Species, demo_species, rescale_map
from subtomo.simulate.projection import VolumeProjector, project_rfft
from subtomo.simulate.simulate import (
    PRESETS,
    Simulation,
    SimulationParams,
    simulate,
)

__all__ = [
    "DEMO_MAPS",
    "PRESETS",
    "Simulation",
    "SimulationParams",
    "Species",
    "VolumeProjector",
    "demo_species",
    "project_rfft",
    "rescale_map",
    "simulate",
]
