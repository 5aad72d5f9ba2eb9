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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from subtomo import __version__
from subtomo.data import ParticleSet, TomogramSet, read_mtf
from subtomo.errors import InputError
from subtomo.io import read_mrc, write_mrc
from subtomo.io.mdoc import write_mdoc
from subtomo.project.options import option
from subtomo.simulate import SimulationParams, Species, simulate

__all__ = ["SimulateJob", "SimulateParams", "parse_tomogram_size", "run"]

log = logging.getLogger("subtomo")


@dataclass
class SimulateJob:
    """The output directory (project directory) and the simulation parameters."""

    out: Path
    simulation: SimulationParams = field(default_factory=SimulationParams)


def parse_tomogram_size(text: str) -> tuple[int, int, int]:
    """``"W,H,D"`` (or ``WxHxD``) in pixels; ``ValueError`` otherwise."""
    try:
        values = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ValueError(f"expected W,H,D, found {text!r}")
    return (values[0], values[1], values[2])


def _preset(
    *flags: str, help: str, unit: str | None = None, parse: Callable[[str], Any] | None = None
) -> Any:
    """An option whose default is the preset's value (``None`` until the preset fills it)."""
    return option(None, *flags, help=f"{help} (default: the preset's)", unit=unit, parse=parse)


@dataclass
class SimulateParams:
    """Options of ``subtomo simulate``: a preset and the :class:`SimulationParams` fields to
    change (``None``: the preset's value); :meth:`job` makes the :class:`SimulateJob`."""

    output_dir: Path = option(..., "--o", "--out", help="Output (project) directory.")
    preset: str = option("tiny", "--preset", help="tiny | demo | benchmark.")
    maps: tuple[str, ...] | None = _preset("--map", help="Species map (MRC); repeat for more")
    species_fraction: tuple[float, ...] | None = option(
        None, "--species-fraction", help="Share of each --map species; repeat (default: equal)."
    )
    tomograms: int | None = _preset("--tomograms", help="Number of tilt series")
    particles: int | None = _preset("--particles", help="Particles in all tomograms")
    pixel_size: float | None = _preset("--pixel-size", help="Tilt-series pixel size", unit="Å")
    box: int | None = _preset("--box", help="Simulation box, even", unit="px")
    tomogram_size: tuple[int, int, int] | None = _preset(
        "--tomogram-size", help="W,H,D, even", unit="px", parse=parse_tomogram_size
    )
    tilt_range: float | None = _preset("--tilt-range", help="Largest |tilt|", unit="deg")
    tilt_step: float | None = _preset("--tilt-step", help="Tilt increment", unit="deg")
    tilt_axis_deg: float | None = _preset("--tilt-axis", help="Tilt axis from x", unit="deg")
    dose_per_tilt: float | None = _preset("--dose-per-tilt", help="Dose per tilt", unit="e/Å²")
    dose_symmetric: bool | None = _preset(
        "--dose-symmetric/--sequential", help="Hagen dose-symmetric or -max..+max order"
    )
    voltage: float | None = _preset("--voltage", help="Voltage", unit="kV")
    cs: float | None = _preset("--cs", help="Spherical aberration", unit="mm")
    amplitude_contrast: float | None = _preset("--q0", help="Amplitude contrast")
    defocus_um: float | None = _preset("--defocus-um", help="Mean underfocus", unit="µm")
    defocus_spread_um: float | None = _preset("--defocus-spread-um", help="± per tilt", unit="µm")
    astigmatism_um: float | None = _preset("--astigmatism-um", help="U - V", unit="µm")
    ctf: bool | None = _preset("--ctf/--no-ctf", help="Apply the CTF")
    noise: str | None = _preset("--noise", help="gaussian | poisson | none")
    snr: float | None = _preset("--snr", help="Target SNR (see subtomo.simulate.imaging)")
    mtf: str | None = option(None, "--mtf", help="Detector MTF STAR file (RELION format).")
    layout: str | None = _preset("--layout", help="random | vesicle")
    tilt_error_deg: float | None = _preset("--tilt-error-deg", help="σ of tilts", unit="deg")
    tilt_shift_error_px: float | None = _preset(
        "--tilt-shift-error-px", help="σ of tilt shifts", unit="px"
    )
    pose_error_deg: float | None = _preset("--pose-error-deg", help="σ of picked poses", unit="deg")
    shift_error_px: float | None = _preset("--shift-error-px", help="σ of picked shifts", unit="px")
    seed: int | None = _preset("--seed", help="Random seed")
    batch_size: int | None = _preset("--batch", help="Patches rendered at once")
    device: str | None = _preset("--device", help="auto | cpu | cuda[:N]")

    def job(self) -> SimulateJob:
        """The preset with the options given."""
        changes = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("output_dir", "preset")
        }
        if self.maps and self.species_fraction is None:
            changes["species_fraction"] = ()  # own maps: equal shares, not the preset's
        simulation = SimulationParams.from_preset(self.preset, **changes)
        return SimulateJob(out=Path(self.output_dir), simulation=simulation)


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


def run(job: SimulateJob | SimulateParams) -> dict[str, str]:
    """Simulate and write everything; returns ``{path relative to out: RELION node type}``."""
    if isinstance(job, SimulateParams):
        job = job.job()
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
