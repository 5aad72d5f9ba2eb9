"""``subtomo simulate``: write a simulated data set as a RELION 5 project.

Under the output directory (the project directory; every path in the STAR files is relative
to it)::

    tilt_series/<tomo>/<tomo>_<k:03d>_<angle:.1f>.mrc   one 2D float32 MRC per tilt (k = 1-based
                                                       acquisition index)
    tilt_series/<tomo>.star                            per-tilt table (data_<tomo>), angle order
    tomograms.star                                     data_global
    true_alignment.star, tilt_series_true/<tomo>.star  with alignment or defocus errors or ice:
                                                       the true alignment, defocus and scale
    fiducials.star                                     with --beads: the beads' true centres
    true_motion.star                                   with --motion-s-vel: true trajectories
    <tomo>.mdoc                                        SerialEM-style, acquisition order
    frames/<tomo>_<k:03d>_<angle:.1f>.mrc|tif          with --movie-frames: one movie per tilt
    gain.mrc, motion_truth.star [, motion_truth_local.npz]   the movies' gain and true motion
    detector_truth.star, defects.star                 with --ice-thickness/--hot-pixels/--xrays/
                                                      --dark-tilt: the detector's truth
    particles.star, particles_picked.star              true and perturbed poses (+ optics)
    truth.mrc [, truth_<species>.mrc]                  maps as used, tilt-series pixel size
    simulation.json                                    every parameter, the seed, the species
    tomograms/rec_<tomo>.mrc                           with --full-tomogram (--crowded): each
                                                       tomogram, for picking; tomograms.star
                                                       names it (rlnTomoReconstructedTomogram)

With ``--movie-frames N`` each tilt image (normalised) is also the specimen of a counting
movie of N frames (:mod:`subtomo.simulate.movies`): drift, optional local deformation, a
gain pattern and Poisson noise at the tilt's dose (a ``--dark-tilt`` gets its dark share of
it); the mdoc then lists the movies
(SubFramePath, NumSubFrames, DateTime in acquisition order), ready for ``subtomo import``.

This is the start of a project (like data from the microscope), not a job of one, so no job
directory or pipeline entry is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from subtomo import __version__
from subtomo.data import ParticleSet, TomogramSet, deformation_columns, read_mtf
from subtomo.data.tomograms import DEFORMATION_COEFFICIENTS
from subtomo.errors import InputError
from subtomo.io import parse_vector, read_mrc, write_mrc, write_star
from subtomo.io.mdoc import write_mdoc
from subtomo.io.movies import unorient_gain, write_movie
from subtomo.project.options import option
from subtomo.simulate import Simulation, SimulationParams, Species, simulate
from subtomo.simulate.detector import DetectorParams, apply_detector, truth_tables
from subtomo.simulate.movies import (
    MovieOptions,
    drift_trajectory,
    gain_pattern,
    local_deformation,
    simulate_movie,
)
from subtomo.simulate.tomograms import CarbonEdge, simulated_tomograms

__all__ = ["SimulateJob", "SimulateParams", "parse_tomogram_size", "run"]

log = logging.getLogger("subtomo")


@dataclass
class SimulateJob:
    """The output directory (project directory), the simulation parameters, the movies'
    (``None``: no movies), the detector's, whether to write the tomograms and their carbon
    edge (``None``: none)."""

    out: Path
    simulation: SimulationParams = field(default_factory=SimulationParams)
    movies: MovieOptions | None = None
    detector: DetectorParams | None = None
    full_tomogram: bool = False
    carbon: CarbonEdge | None = None


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
    tilt_axis_deg: float | None = _preset(
        "--tilt-axis", help="Nominal tilt axis, counter-clockwise from image y", unit="deg"
    )
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
    tilt_angle_error_deg: float | None = _preset(
        "--tilt-angle-error-deg", help="σ of tilt angles alone", unit="deg"
    )
    in_plane_error_deg: float | None = _preset(
        "--in-plane-error-deg", help="σ of in-plane rotations alone", unit="deg"
    )
    axis_error_deg: float | None = _preset(
        "--axis-error-deg", help="Error of the tilt-axis angle", unit="deg"
    )
    tilt_offset_deg: float | None = _preset(
        "--tilt-offset-deg", help="Offset of every tilt angle", unit="deg"
    )
    beads: int | None = _preset("--beads", help="Gold fiducial beads per tomogram")
    bead_radius_px: float | None = _preset("--bead-radius", help="Bead radius", unit="px")
    pose_error_deg: float | None = _preset("--pose-error-deg", help="σ of picked poses", unit="deg")
    shift_error_px: float | None = _preset("--shift-error-px", help="σ of picked shifts", unit="px")
    motion_s_vel: float | None = _preset(
        "--motion-s-vel", help="Particle motion: velocity σ; 0: none", unit="Å/(e/Å²)"
    )
    motion_s_div: float | None = _preset(
        "--motion-s-div", help="Particle motion: correlation length", unit="Å"
    )
    defocus_error_angst: float | None = _preset(
        "--defocus-error", help="σ of the defocus error per tilt", unit="Å"
    )
    particle_defocus_error_angst: float | None = _preset(
        "--particle-defocus-error", help="σ of the defocus error per particle", unit="Å"
    )
    ice_kappa: float | None = _preset("--ice-kappa", help="Beer–Lambert κ of the ice (1: none)")
    deformation_px: float | None = _preset(
        "--deformation", help="σ of each tilt's 2D deformation at its grid nodes; 0: none",
        unit="px",
    )  # fmt: skip
    deformation_grid: int | None = _preset("--deformation-grid", help="Deformation nodes per axis")
    even_zernike: tuple[float, ...] | None = _preset(
        "--even-zernike", help="Symmetrical aberrations as rlnEvenZernike, e.g. [0,0,0,0,0,0,0.5]",
        parse=parse_vector,
    )  # fmt: skip
    odd_zernike: tuple[float, ...] | None = _preset(
        "--odd-zernike", help="Antisymmetrical aberrations as rlnOddZernike, e.g. [0,0,0,0.3]",
        parse=parse_vector,
    )  # fmt: skip
    ice_normal_deg: float | None = _preset(
        "--ice-normal", help="Ice normal from z towards x", unit="deg"
    )
    seed: int | None = _preset("--seed", help="Random seed")
    batch_size: int | None = _preset("--batch", help="Patches rendered at once")
    device: str | None = _preset("--device", help="auto | cpu | cuda[:N]")
    movie_frames: int = option(0, "--movie-frames", help="Frames of a movie per tilt; 0: none.")
    movie_drift: float = option(4.0, "--movie-drift", help="Drift per movie", unit="px")
    movie_local: float = option(
        0.0, "--movie-local", help="Local deformation at the last frame", unit="px"
    )
    movie_gain: float = option(0.1, "--movie-gain", help="Relative spread of the gain pattern.")
    movie_gain_rot: int = option(
        0, "--movie-gain-rot", help="Write the gain so that --gain_rot N restores it."
    )
    movie_gain_flip: int = option(
        0, "--movie-gain-flip", help="Write the gain so that --gain_flip N restores it."
    )
    movie_contrast: float = option(
        0.1, "--movie-contrast", help="Contrast of the specimen in the frames."
    )
    movie_format: str = option("mrc", "--movie-format", help="mrc | tiff")
    detector_thickness: float = option(
        0.0, "--ice-thickness", help="Sample slab whose Thon rings are added; 0: none.", unit="nm"
    )
    detector_hot_pixels: int = option(0, "--hot-pixels", help="Hot pixels per tilt image.")
    detector_xrays: int = option(0, "--xrays", help="X-ray streaks per tilt image.")
    detector_dark_tilts: tuple[int, ...] = option(
        (), "--dark-tilt", help="0-based row (tilt order) of a dark tilt; repeat."
    )
    full_tomogram: bool = option(
        False, "--full-tomogram", "--crowded",
        help="Also write each whole tomogram (WBP, bin 1, phase-flipped) for picking.",
    )  # fmt: skip
    carbon_edge: float = option(
        0.0, "--carbon-edge", help="With --full-tomogram: carbon film beyond this distance "
        "from the centre (along x); 0: none.", unit="px",
    )  # fmt: skip

    def job(self) -> SimulateJob:
        """The preset with the options given."""
        changes = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("output_dir", "preset")
            and not f.name.startswith(("movie_", "detector_", "full_", "carbon_"))
        }
        if self.maps and self.species_fraction is None:
            changes["species_fraction"] = ()  # own maps: equal shares, not the preset's
        simulation = SimulationParams.from_preset(self.preset, **changes)
        movies = None
        if self.movie_frames > 0:
            movies = MovieOptions(
                n_frames=self.movie_frames, drift_px=self.movie_drift,
                local_px=self.movie_local, gain_spread=self.movie_gain,
                gain_rotation=self.movie_gain_rot, gain_flip=self.movie_gain_flip,
                contrast=self.movie_contrast, file_format=self.movie_format,
            )  # fmt: skip
        detector = None  # subtomo.simulate.detector: sample background, defects, dark tilts
        if self.detector_thickness > 0 or self.detector_hot_pixels or self.detector_xrays or (
                self.detector_dark_tilts):  # fmt: skip
            detector = DetectorParams(
                thickness_nm=self.detector_thickness, contrast=1.0 if self.detector_thickness
                else 0.0, hot_pixels=self.detector_hot_pixels, xrays=self.detector_xrays,
                dark_tilts=tuple(self.detector_dark_tilts),
            )  # fmt: skip
        carbon = CarbonEdge(angle_deg=0.0, offset_px=self.carbon_edge) if self.carbon_edge else None
        return SimulateJob(out=Path(self.output_dir), simulation=simulation, movies=movies,
                           detector=detector, full_tomogram=self.full_tomogram or bool(carbon),
                           carbon=carbon)  # fmt: skip


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


def _write_movies(
    options: MovieOptions, name: str, images, angles: np.ndarray, order: np.ndarray,
    pixel_size: float, doses: np.ndarray, sensitivity: np.ndarray, rng: np.random.Generator,
    truth: dict[str, list],
) -> list[str]:  # fmt: skip
    """One movie per tilt image (table row order) under ``frames/``, tilt ``f`` exposed to
    ``doses[f]`` e/Å² (a dark tilt: its share of the dose); the true motion of each into
    ``truth`` (``{movie: [shifts (t, 2), deformation or None]}``); returns the movie file
    names."""
    suffix = ".tif" if options.file_format == "tiff" else ".mrc"
    names = []
    for k, angle, image, dose in zip(order, angles, images, doses, strict=True):
        file = f"frames/{name}_{k + 1:03d}_{angle:.1f}{suffix}"
        specimen = image.cpu().double()
        specimen = ((specimen - specimen.mean()) / specimen.std().clamp_min(1e-12)).float()
        shifts = drift_trajectory(options.n_frames, options.drift_px, rng)
        local = (
            local_deformation(options.n_frames, options.local_px, rng)
            if options.local_px > 0
            else None
        )
        movie = simulate_movie(
            specimen, pixel_size=pixel_size, dose=dose, n_frames=options.n_frames,
            shifts=shifts, contrast=options.contrast, sensitivity=sensitivity,
            deformation=local, rng=rng,
        )  # fmt: skip
        write_movie(file, movie.frames.numpy(), pixel_size)
        truth[file] = [shifts, local]
        names.append(Path(file).name)
    return names


def _write_tomograms(sim: Simulation, carbon: CarbonEdge | None) -> pd.DataFrame:
    """``tomograms/rec_<name>.mrc`` for every series (:func:`simulated_tomograms`: rendered
    again without detector effects, CTF phase-flipped; voxel ``v`` at tomogram position
    ``v`` px) and the global table with rlnTomoReconstructedTomogram and binning 1."""
    table = sim.global_table.copy()
    names = table["rlnTomoName"].tolist()
    for name, tomogram in simulated_tomograms(sim, carbon=carbon):
        path = f"tomograms/rec_{name}.mrc"
        write_mrc(path, tomogram, sim.params.pixel_size)
        table.loc[names.index(name), "rlnTomoReconstructedTomogram"] = path
        log.info("wrote the tomogram of %s", name)
    table["rlnTomoTomogramBinning"] = 1.0
    return table


def _write_motion_truth(truth: dict[str, list]) -> None:
    """``motion_truth.star`` (true whole-frame shifts as RELION writes them: the correction
    ``-s``, movie px, :mod:`subtomo.tilt.motion`) and
    ``motion_truth_local.npz`` (``{movie: (t, 2, gh, gw)}`` xy px) when there is any."""
    rows = [
        {
            "rlnMicrographMovieName": movie,
            "rlnMicrographFrameNumber": i + 1,
            "rlnMicrographShiftX": -float(s[0]),  # RELION's sign: the correction
            "rlnMicrographShiftY": -float(s[1]),
        }
        for movie, (shifts, _) in truth.items()
        for i, s in enumerate(shifts)
    ]
    write_star("motion_truth.star", {"motion_truth": pd.DataFrame(rows)})
    local = {movie: field for movie, (_, field) in truth.items() if field is not None}
    if local:
        np.savez("motion_truth_local.npz", **local)


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
    rng = np.random.default_rng(params.seed)
    truth: dict[str, list] = {}
    detector_truth: list[tuple[pd.DataFrame, pd.DataFrame]] = []
    sensitivity = None
    with contextlib.chdir(out):
        if job.movies is not None:
            w, h = params.tomogram_size[:2]
            sensitivity = gain_pattern((h, w), rng, job.movies.gain_spread)
            gain = unorient_gain(1.0 / sensitivity, job.movies.gain_rotation, job.movies.gain_flip)
            write_mrc("gain.mrc", gain, px)
        for name, images in sim.tilt_series():
            table = sim.tilt_tables[name].copy()
            order = sim.acquisition_order[name]
            angles = table["rlnTomoNominalStageTiltAngle"].to_numpy()
            files = [
                f"tilt_series/{name}/{name}_{k + 1:03d}_{a:.1f}.mrc"
                for k, a in zip(order, angles, strict=True)
            ]
            if job.detector is not None:
                optics = (params.voltage, params.cs, params.amplitude_contrast)
                images, _, defects = apply_detector(
                    images, table, optics, px, job.detector, rng)  # fmt: skip
                detector_truth.append(truth_tables(name, files, table, job.detector, defects))
            for file, image in zip(files, images, strict=True):
                write_mrc(file, image, px)
            table.insert(0, "rlnMicrographName", files)
            tilt_tables[name] = table
            acquired = np.argsort(order)
            defocus_um = 0.5e-4 * (table["rlnDefocusU"] + table["rlnDefocusV"]).to_numpy()
            sub_frames = [Path(files[i]).name for i in acquired]
            movie_extras = {}
            if job.movies is not None:
                doses = np.full(len(files), params.dose_per_tilt)
                if job.detector is not None:
                    doses[list(job.detector.dark_tilts)] *= job.detector.dark_fraction
                movies = _write_movies(
                    job.movies, name, images, angles, order, px, doses, sensitivity, rng, truth
                )
                sub_frames = [movies[i] for i in acquired]
                start = datetime.datetime(2026, 1, 1, 9, 0, 0)
                movie_extras = {
                    "date_times": [
                        start + datetime.timedelta(minutes=k) for k in range(len(order))
                    ],
                    "frames_per_tilt": job.movies.n_frames,
                }
            write_mdoc(
                f"{name}.mdoc",
                angles[acquired],
                params.dose_per_tilt,
                px,
                params.voltage,
                defocus_um=-defocus_um[acquired],  # SerialEM: negative = underfocus
                sub_frame_paths=sub_frames,
                image_size=(images.shape[-1], images.shape[-2]),
                tilt_axis_angle_deg=params.tilt_axis_deg,
                **movie_extras,
            )
            log.info("wrote %d tilt images of %s", len(files), name)
            del images
        if job.movies is not None:
            _write_motion_truth(truth)
        if detector_truth:
            tilt_truth, defects = zip(*detector_truth, strict=True)
            write_star("detector_truth.star", {"tilts": pd.concat(tilt_truth, ignore_index=True)})
            write_star("defects.star", {"defects": pd.concat(defects, ignore_index=True)})
        global_table = sim.global_table
        if job.full_tomogram:
            global_table = _write_tomograms(sim, job.carbon)
        TomogramSet.from_tables(global_table, tilt_tables).write("tomograms.star", "tilt_series")
        outputs["tomograms.star"] = "TomogramGroupMetadata.star.relion.tomo"
        if any(
            getattr(params, k)
            for k in ("tilt_error_deg", "tilt_shift_error_px", "tilt_angle_error_deg",
                      "in_plane_error_deg", "axis_error_deg", "tilt_offset_deg",
                      "defocus_error_angst", "deformation_px")
        ) or params.ice_kappa != 1.0:  # fmt: skip
            true_tables = {
                name: sim.true_tilt_tables[name].assign(
                    rlnMicrographName=table["rlnMicrographName"]
                )[table.columns]
                for name, table in tilt_tables.items()
            }
            true_global = sim.global_table
            for name, field in sim.true_deformation.items():
                grid, vectors = deformation_columns(field)
                true_tables[name] = true_tables[name].assign(**{DEFORMATION_COEFFICIENTS: vectors})
                true_global = true_global.assign(**grid)
            TomogramSet.from_tables(true_global, true_tables).write(
                "true_alignment.star", "tilt_series_true"
            )
            outputs["true_alignment.star"] = "TomogramGroupMetadata.star.relion.tomo"
        if params.motion_s_vel > 0:
            sim.true_motion.write("true_motion.star")
            outputs["true_motion.star"] = "TomoTrajectoryData.star.relion.tomo"
        if params.beads:
            centre = np.asarray(params.tomogram_size, dtype=np.float64) / 2
            rows = [
                pd.DataFrame(
                    {"rlnTomoName": name}
                    | {
                        f"rlnCenteredCoordinate{a}Angst": (beads[:, k] - centre[k]) * px
                        for k, a in enumerate("XYZ")
                    }
                )
                for name, beads in sim.bead_positions.items()
            ]
            write_star("fiducials.star", {"fiducials": pd.concat(rows, ignore_index=True)})
        for file, table, optics in (
            ("particles.star", sim.particles, sim.true_optics_table()),
            ("particles_picked.star", sim.particles_picked, sim.optics_table),
        ):
            ParticleSet.from_tables(table, optics).write(file)
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
