"""Tomo frame alignment (``subtomo frame-align``, RELION's ``relion_tomo_align``, §11, §24).

Reads extracted 2D-stack particles (``--ios`` or ``--p/--t/--mot``) and the half maps
(``--ref1/--ref2`` or the optimisation set's, ``--mask``), compares every visible tilt image
with the projection of its own half map (:class:`subtomo.tomorefine.TiltPredictor`), and fits
per tilt series: per-tilt shifts (and angles), particle offsets, with ``--motion``
particle trajectories under RELION's Gaussian-process prior and with ``--deformation`` a
smooth 2D deformation of each tilt image (:mod:`subtomo.tomorefine.frame_align`). Writes
into ``Polish/jobNNN/`` (RELION 5's directory, shared with SPA polishing): ``tomograms.star``
(+ ``tilt_series/``) with the refined per-tilt alignment (and deformations),
``particles.star`` with the new centred coordinates, ``motion.star``,
``optimisation_set.star`` and ``report.html`` (shifts per tilt, motion).
The stacks must have been extracted with the tomograms and trajectories given; re-extract
afterwards (RELION's refinement cycle). ``--continue <job dir>`` finishes a job cut short:
the tilt series already fitted (``checkpoints/<rlnTomoName>.pt``) are kept and the others
run with the stored options.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.data import (
    OptimisationSet,
    ParticleSet,
    TiltSeries,
    TomogramSet,
    Trajectories,
    deformation_columns,
    read_half_maps,
    read_particle_inputs,
    relative_to_cwd,
)
from subtomo.data.tomograms import DEFORMATION_COEFFICIENTS
from subtomo.device import resolve_device
from subtomo.distributed import all_gather_object, is_main, shard
from subtomo.errors import InputError
from subtomo.fourier import fsc_maps, fsc_threshold_shell
from subtomo.geometry import particle_positions_px
from subtomo.ml.loader import ParticleState, StackLoader
from subtomo.ml.starfiles import load_checkpoint, save_checkpoint
from subtomo.project import run_job, write_job_report
from subtomo.project.options import ParticleInputs, device_option, option, output_dir_option
from subtomo.tomorefine import (
    FrameAlignSettings,
    SeriesFit,
    SeriesGeometry,
    TiltPredictor,
    align_series,
    observe_particles,
)

__all__ = ["FrameAlignParams", "run"]

log = logging.getLogger("subtomo")

CHECKPOINTS = "checkpoints"
_ALIGNMENT = ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot", "rlnTomoXShiftAngst",
              "rlnTomoYShiftAngst")  # fmt: skip
_PROJECTION_ROWS = ("rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW")


@dataclass
class FrameAlignParams(ParticleInputs):
    """Options of "Tomo frame alignment" (relion_tomo_align flags)."""

    ref1: str | None = option(None, "--ref1", help="Half map 1 (default: the --ios one).")
    ref2: str | None = option(None, "--ref2", help="Half map 2 (default: the --ios one).")
    mask: str | None = option(None, "--mask", help="Mask for the FSC and the references.")
    shift_only: bool = option(False, "--shift_only", help="Only per-tilt 2D shifts.")
    const_a: bool = option(False, "--const_a", help="Keep the per-tilt angles.")
    const_s: bool = option(False, "--const_s", help="Keep the per-tilt shifts.")
    const_p: bool = option(False, "--const_p", help="Keep the particle positions.")
    motion: bool = option(False, "--motion", help="Fit particle motion across tilts.")
    s_vel: float = option(0.5, "--s_vel", help="Velocity σ of the motion.", unit="Å/(e/Å²)")
    s_div: float = option(5000.0, "--s_div", help="Correlation length of the motion.", unit="Å")
    sq_exp_ker: bool = option(False, "--sq_exp_ker", help="Squared-exponential motion kernel.")
    max_ed: int = option(-1, "--max_ed", help="Motion basis vectors per series; <= 0: all.")
    max_shift: float = option(20.0, "--r", help="Search range of the per-tilt shifts.", unit="px")
    iterations: int = option(50, "--it", help="L-BFGS iterations per stage.")
    range_reg: float = option(0.0, "--range_reg", help="Penalty on per-tilt shifts.", unit="1/px²")
    deformation: bool = option(
        False, "--deformation", help="Fit a smooth 2D deformation of each tilt image (§24)."
    )
    def_w: int = option(3, "--def_w", help="Deformation grid nodes along x.")
    def_h: int = option(3, "--def_h", help="Deformation grid nodes along y.")
    def_reg: float = option(
        0.1, "--def_reg", help="Gaussian prior on the deformation's nodes.", unit="1/px²"
    )
    batch_size: int = option(32, "--batch", help="Particles per batch.")
    device: str = device_option()
    continue_from: str | None = option(
        None, "--continue", help="Finish a job cut short (its directory), stored options."
    )
    output_dir: str | None = output_dir_option()
    project_dir: str = "."

    def settings(self) -> FrameAlignSettings:
        return FrameAlignSettings(
            shift_only=self.shift_only, const_a=self.const_a, const_s=self.const_s,
            const_p=self.const_p, motion=self.motion, s_vel=self.s_vel, s_div=self.s_div,
            sq_exp_ker=self.sq_exp_ker, max_ed=self.max_ed, max_shift_px=self.max_shift,
            iterations=self.iterations, range_reg=self.range_reg,
            deformation=(self.def_w, self.def_h) if self.deformation else None,
            def_reg=self.def_reg,
        )  # fmt: skip


def _resume(params: FrameAlignParams) -> tuple[FrameAlignParams, dict[str, dict]]:
    """The options to run with and the tilt series already fitted (``--continue``)."""
    if not params.continue_from:
        return params, {}
    directory = Path(params.continue_from)
    files = sorted((directory / CHECKPOINTS).glob("*.pt"))
    if not files:
        raise InputError(f"no fitted tilt series ({CHECKPOINTS}/*.pt) to continue from",
                         file=directory)  # fmt: skip
    states = [load_checkpoint(f) for f in files]
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in states[0]["params"].items()}
    stored.update(output_dir=str(directory), continue_from=params.continue_from,
                  device=params.device)  # fmt: skip
    return FrameAlignParams(**stored), {s["name"]: s["fit"] for s in states}


def _image_size(series: TiltSeries) -> tuple[int, int]:
    """The (w, h) the image centre of §1.3 needs: only RELION-4 projection rows depend on it
    (angles and shifts give the same matrices and columns back with any size)."""
    size = series.image_size if series.has_projection_rows else None
    return size or (series.tomogram_size[0], series.tomogram_size[1])


def _fit_series(
    params: FrameAlignParams,
    predictor: TiltPredictor,
    state: ParticleState,
    parts: ParticleSet,
    series: TiltSeries,
    rows: np.ndarray,
    motion: Trajectories | None,
) -> SeriesFit:
    """Observe and fit one tilt series (``rows`` its particles)."""
    obs = observe_particles(predictor, state, rows)[series.name]
    sub = parts.subset(rows)
    centres = particle_positions_px(
        sub.centered_coordinates_angst(), series.pixel_size, series.tomogram_size,
        sub.origins_angst(), sub.subtomogram_matrices(),
    )  # fmt: skip
    names = sub.particles["rlnTomoParticleName"].astype(str).tolist()
    if motion is None:
        trajectories = torch.zeros(len(rows), series.n_tilts, 3, dtype=torch.float64)
    else:
        trajectories = motion.displacements_angst(names, series.n_tilts)
    field = series.deformation
    size = _image_size(series)
    if params.deformation or field is not None:  # the field's nodes span the real images
        size = series.image_size
        if size is None:
            raise InputError(
                "deformations need the tilt images' size: no rlnMicrographName/"
                "rlnTomoTiltSeriesName images", file=series.tilt_file, block=series.name,
            )  # fmt: skip
    geometry = SeriesGeometry(
        series.projection_matrices(size), centres, trajectories,
        torch.as_tensor(series.pre_exposure), series.pixel_size, series.tomogram_size, size,
        field,
    )  # fmt: skip
    try:
        fit = align_series(obs, geometry, params.settings())
    except ValueError as error:  # a grid other than the series' own
        raise InputError(
            str(error), file=series.tilt_file, block=series.name, column=DEFORMATION_COEFFICIENTS
        ) from None
    log.info(
        "%s: %d particles, %d tilt images, scale %.3g, CC %.4g -> %.4g, mean |shift| %.2f px",
        series.name, len(rows), len(obs.frame), obs.scale, fit.cc_before, fit.cc_after,
        float(fit.tilt_shifts_px.norm(dim=-1).mean()),
    )  # fmt: skip
    return fit


def _outputs(
    parts: ParticleSet, tomos: TomogramSet, motion: Trajectories | None, fits: dict[str, dict]
) -> tuple[TomogramSet, ParticleSet, Trajectories]:
    """The refined tomograms, particles (new centred coordinates) and trajectories."""
    tables = {}
    global_table = tomos.global_table.copy()
    for series in tomos:
        tilts = series.tilts.drop(columns=list(_PROJECTION_ROWS), errors="ignore")
        if series.name in fits:
            tilts = tilts.assign(**{k: fits[series.name]["alignment"][k].numpy()
                                    for k in _ALIGNMENT})  # fmt: skip
            field = fits[series.name].get("deformation")
            if field is not None:
                grid, vectors = deformation_columns(field)
                tilts = tilts.assign(**{DEFORMATION_COEFFICIENTS: vectors})
                row = global_table["rlnTomoName"].astype(str) == series.name
                for column, value in grid.items():
                    global_table.loc[row, column] = value
        tables[series.name] = tilts
    table = parts.particles.copy()
    names = parts.tomo_names
    particle_names = table["rlnTomoParticleName"].astype(str).tolist()
    trajectories = dict(motion.tables) if motion is not None else {}
    columns = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
    table[columns] = parts.centered_coordinates_angst().numpy()
    for name, fit in fits.items():
        rows = np.flatnonzero(names == name)
        px = tomos[name].pixel_size
        table.loc[rows, columns] = table.loc[rows, columns].to_numpy() + (
            fit["offsets_px"].numpy() * px
        )
        for j, i in enumerate(rows):
            trajectories[particle_names[i]] = pd.DataFrame(
                fit["trajectories_angst"][j].numpy(),
                columns=["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"],
            )
    table = table.drop(columns=[f"rlnCoordinate{a}" for a in "XYZ"], errors="ignore")
    return (
        TomogramSet.from_tables(global_table, tables),
        ParticleSet(table, parts.optics, parts.general),
        Trajectories(trajectories, len(parts)),
    )


def _rms(vectors: torch.Tensor) -> float:
    """RMS length of the vectors along the last axis."""
    return float(vectors.square().sum(-1).mean().sqrt())


def _report_rows(
    tomos: TomogramSet, fits: dict[str, dict]
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Rows of the report: per tilt (shift of its particles) and per tilt series (motion)."""
    tilt_rows, series_rows = [], []
    for name, fit in fits.items():
        series = tomos[name]
        shifts = fit["tilt_shifts_px"]
        for f in range(series.n_tilts):
            tilt_rows.append({
                "tilt series": name,
                "row": f + 1,
                "pre-exposure (e/Å²)": f"{series.pre_exposure[f]:.1f}",
                "shift x, y (px)": f"{float(shifts[f, 0]):+.2f}, {float(shifts[f, 1]):+.2f}",
            })  # fmt: skip
        traj = fit["trajectories_angst"]
        series_rows.append({
            "tilt series": name,
            "CC before → after": f"{fit['cc_before']:.4g} → {fit['cc_after']:.4g}",
            "RMS per-tilt shift (px)": f"{_rms(shifts):.2f}",
            "RMS particle offset (Å)": f"{_rms(fit['offsets_px']) * series.pixel_size:.1f}",
            "RMS / max motion (Å)": f"{_rms(traj):.1f} / "
            f"{float(traj.norm(dim=-1).max()):.1f}",
        })  # fmt: skip
    return series_rows, tilt_rows


def run(params: FrameAlignParams) -> dict[str, str]:
    """Run the job; returns ``{output path: RELION node type}``."""
    params, done = _resume(params)
    device = resolve_device(params.device)
    parts, tomos, motion, opt = read_particle_inputs(
        params.ios, params.particles, params.tomograms, params.trajectories
    )
    from_ios = params.ios if not params.ref1 else None
    if params.ref1 is None and (opt.reference_map1 is None or opt.reference_map2 is None):
        raise InputError("give the half maps with --ref1/--ref2 or an --ios that names them")
    maps = read_half_maps(
        params.ref1, params.ref2, from_ios, params.mask or (
            str(opt.reference_mask) if opt.reference_mask else None), -1.0, device,
    )  # fmt: skip
    loader = StackLoader(parts, tomos, batch_size=params.batch_size)
    if abs(maps.pixel_size - loader.pixel_size) > 1e-3:
        raise InputError(
            f"half maps have {maps.pixel_size:.4f} Å/px, the particle stacks "
            f"{loader.pixel_size:.4f} (rlnImagePixelSize)", file=maps.path1,
        )  # fmt: skip
    halves = torch.stack([maps.half1, maps.half2]).float()
    if maps.mask is not None:
        halves = halves * maps.mask
    # the last shell before the FSC falls below 0.143 (§11's flat weight); shell 0 (the mean,
    # near zero in both halves) says nothing about the resolution
    last = 1 + fsc_threshold_shell(fsc_maps(halves[0], halves[1], maps.mask)[1:])
    predictor = TiltPredictor(loader, halves, max_shell=last, device=device)
    inputs = {str(opt.particles): "ParticleGroupMetadata.star.relion.tomo"}
    with run_job(
        "Polish", params, output_dir=params.output_dir, project_dir=params.project_dir,
        is_continue=bool(params.continue_from), inputs=inputs,
    ) as (job, outputs):  # fmt: skip
        log.info(
            "Frame alignment of %d particles in %d tilt series up to shell %d (%.1f Å)%s",
            len(parts), len(dict.fromkeys(parts.tomo_names)), last,
            loader.box * maps.pixel_size / max(last, 1), ", with motion" if params.motion else "",
        )  # fmt: skip
        state = ParticleState.from_particles(parts)
        names = parts.tomo_names
        stored = {k: v for k, v in dataclasses.asdict(params).items() if k != "continue_from"}
        fits = dict(done)
        for name in shard([n for n in dict.fromkeys(names) if n not in done]):
            fit = _fit_series(
                params, predictor, state, parts, tomos[name], np.flatnonzero(names == name),
                motion,
            )  # fmt: skip
            name = str(name)  # a numpy string would not load back (weights_only)
            fits[name] = dataclasses.asdict(fit)
            checkpoint = {"params": stored, "name": name, "fit": fits[name]}
            save_checkpoint(job.path(f"{CHECKPOINTS}/{name}.pt"), checkpoint)
        for gathered in all_gather_object(fits):
            fits.update(gathered)
        paths = {k: job.path(k) for k in ("tomograms.star", "particles.star", "motion.star")}
        if is_main():  # every rank has every fit; rank 0 writes
            new_tomos, new_parts, new_motion = _outputs(parts, tomos, motion, fits)
            new_tomos.write(paths["tomograms.star"], job.path("tilt_series"))
            new_parts.write(paths["particles.star"])
            new_motion.write(paths["motion.star"])
            OptimisationSet(
                particles=Path(relative_to_cwd(paths["particles.star"])),
                tomograms=Path(relative_to_cwd(paths["tomograms.star"])),
                trajectories=Path(relative_to_cwd(paths["motion.star"])),
                reference_map1=maps.path1, reference_map2=maps.path2,
                reference_mask=maps.mask_path, reference_fsc=opt.reference_fsc,
            ).write(job.path("optimisation_set.star"))  # fmt: skip
        outputs[str(paths["tomograms.star"])] = "TomogramGroupMetadata.star.relion.tomo"
        outputs[str(paths["particles.star"])] = "ParticleGroupMetadata.star.relion.tomo"
        outputs[str(paths["motion.star"])] = "TomoTrajectoryData.star.relion.tomo"
        outputs[str(job.path("optimisation_set.star"))] = "OptimisationSet.star.relion.tomo"
        series_rows, tilt_rows = _report_rows(tomos, fits)
        write_job_report(
            job, outputs,
            summary={"fitted": ", ".join(k for k in ("shifts", "angles", "offsets", "motion",
                     "deformation") if _fitted(params, k)), "last shell": last},
            tables={"tilt series": series_rows, "per-tilt shifts": tilt_rows},
        )  # fmt: skip
    return outputs


def _fitted(params: FrameAlignParams, what: str) -> bool:
    """Whether the job fits ``what`` (shifts, angles, offsets, motion, deformation)."""
    if params.shift_only:
        return what == "shifts"
    return {
        "shifts": not params.const_s,
        "angles": not params.const_a,
        "offsets": not params.const_p,
        "motion": params.motion,
        "deformation": params.deformation,
    }[what]
