"""``subtomo simulate``: write a simulated data set as a RELION 5 project.

Under the output directory (the project directory; every path in the STAR files is relative
to it)::

    tilt_series/<tomo>/<tomo>_<k:03d>_<angle:.1f>.mrc   one 2D float32 MRC per tilt (k = 1-based
                                                       acquisition index)
    tilt_series/<tomo>.star                            per-tilt table (data_<tomo>), angle order
    tomograms.star                                     data_global
    <tomo>.mdoc                                        SerialEM-style, acquisition order
    particles.star, particles_picked.star              true and perturbed poses (+ optics)
    truth.mrc [, truth_<species>.mrc]                  maps as used, tilt-series pixel size
    simulation.json                                    every parameter, the seed, the species

This is the start of a project (like data from the microscope), not a job of one, so no job
directory or pipeline entry is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from subtomo import __version__
from subtomo.data import ParticleSet, TomogramSet, read_mtf
from subtomo.errors import InputError
from subtomo.io import read_mrc, write_mrc
from subtomo.io.mdoc import write_mdoc
from subtomo.simulate import SimulationParams, Species, simulate

__all__ = ["SimulateJob", "run"]

log = logging.getLogger("subtomo")


@dataclass
class SimulateJob:
    """The output directory (project directory) and the simulation parameters."""

    out: Path
    simulation: SimulationParams = field(default_factory=SimulationParams)


def _species_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".mrc", ".map"):
        name = name.removesuffix(suffix)
    return name


def read_species(paths: tuple[str, ...]) -> list[Species]:
    """Species maps from MRC files, named after the files (made unique with ``_<i>``)."""
    species, seen = [], set()
    for i, text in enumerate(paths):
        path = Path(text)
        volume, voxel = read_mrc(path)
        if voxel <= 0:
            raise InputError("the map has no pixel size in its header", file=path)
        name = _species_name(path)
        if name in seen:
            name = f"{name}_{i + 1}"
        seen.add(name)
        species.append(Species(name=name, volume=volume, voxel_size=voxel))
    return species


def run(job: SimulateJob) -> dict[str, str]:
    """Simulate and write everything; returns ``{path relative to out: RELION node type}``."""
    params = job.simulation
    out = Path(job.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    species = read_species(params.maps) if params.maps else None
    mtf = read_mtf(Path(params.mtf)) if params.mtf else None
    sim = simulate(params, species, mtf)
    px = params.pixel_size
    outputs: dict[str, str] = {}
    tilt_tables = {}
    with contextlib.chdir(out):
        for name, images in sim.tilt_series():
            table = sim.tilt_tables[name].copy()
            order = sim.acquisition_order[name]
            angles = table["rlnTomoNominalStageTiltAngle"].to_numpy()
            files = [
                f"tilt_series/{name}/{name}_{k + 1:03d}_{a:.1f}.mrc"
                for k, a in zip(order, angles, strict=True)
            ]
            for file, image in zip(files, images, strict=True):
                write_mrc(file, image, px)
            table.insert(0, "rlnMicrographName", files)
            tilt_tables[name] = table
            acquired = np.argsort(order)
            defocus_um = 0.5e-4 * (table["rlnDefocusU"] + table["rlnDefocusV"]).to_numpy()
            write_mdoc(
                f"{name}.mdoc",
                angles[acquired],
                params.dose_per_tilt,
                px,
                params.voltage,
                defocus_um=-defocus_um[acquired],  # SerialEM: negative = underfocus
                sub_frame_paths=[Path(files[i]).name for i in acquired],
                image_size=(images.shape[-1], images.shape[-2]),
                tilt_axis_angle_deg=params.tilt_axis_deg,
            )
            log.info("wrote %d tilt images of %s", len(files), name)
            del images
        TomogramSet.from_tables(sim.global_table, tilt_tables).write(
            "tomograms.star", "tilt_series"
        )
        outputs["tomograms.star"] = "TomogramGroupMetadata.star.relion.tomo"
        for file, table in (
            ("particles.star", sim.particles),
            ("particles_picked.star", sim.particles_picked),
        ):
            ParticleSet.from_tables(table, sim.optics_table).write(file)
            outputs[file] = "ParticleGroupMetadata.star.relion.tomo"
        write_mrc("truth.mrc", sim.maps[0], px)
        outputs["truth.mrc"] = "DensityMap.mrc"
        if len(sim.maps) > 1:
            for name, volume in zip(sim.species_names, sim.maps, strict=True):
                write_mrc(f"truth_{name}.mrc", volume, px)
                outputs[f"truth_{name}.mrc"] = "DensityMap.mrc"
        record = {
            **dataclasses.asdict(params),
            "out": str(out),
            "species": sim.species_names,
            "tilt_angles_deg": sim.tilt_tables[next(iter(sim.tilt_tables))][
                "rlnTomoNominalStageTiltAngle"
            ].tolist(),
            "subtomo_version": __version__,
        }
        Path("simulation.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("simulated data set written to %s", out)
    return outputs
