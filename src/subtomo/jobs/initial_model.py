"""De novo 3D initial model (``subtomo initial-model``) of 2D-stack particles.

As RELION's "3D initial model" (``relion_refine --grad --denovo_3dref``, then
``relion_align_symmetry``): K classes start from random-orientation reconstructions of random
particle subsets and follow stochastic gradient steps over mini-batches with global
orientation searches, the resolution growing from ``--ini_high`` to ``--maxres``
(:mod:`subtomo.ml.initial_model`). With ``--sym`` other than C1 the run is C1 and the final
map is moved onto the symmetry axes and symmetrised (``--impose_sym``: the symmetry is
imposed throughout). ``--sigma_tilt``/``--sigma_psi`` use the pickers' surface-normal priors
(rlnAngleTilt/PsiPrior). Every ``--grad_write_iter`` iterations (default every one) and at
the end it writes RELION's ``run_itNNN_classNNN.mrc``, ``_data.star``, ``_model.star``,
``_optimiser.star`` and ``_sampling.star`` with a checkpoint beside them, so that
``--continue`` (the job directory: its last complete iteration, or a
``run_itNNN_optimiser.star``) ends as the uninterrupted run, byte for byte; then
``initial_model.mrc`` (the largest class, in the symmetry frame); the report shows the central
sections of every class at every written iteration, the class sizes and the resolution
estimate. Under torch.distributed the ranks split each mini-batch's batches (conventions §19).
Particles must be 2D stacks: the engine does not read 3D pseudo-subtomograms (nor do Class3D
and Refine3D).

Hand: the tilt geometry fixes the hand of the map only as far as the tomograms' own hand is
right, and at low resolution the mirror image fits the data almost as well; the report says
so, and ``subtomo flip-hand`` writes the mirror image. With ``--truth`` (simulated data) the
report gives the correlation of the map and of its mirror with the truth after alignment
(:func:`subtomo.ml.align_maps.align_maps`) and says which hand matches.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from subtomo.data import OptimisationSet, read_map_checked, read_particle_inputs, relative_to_cwd
from subtomo.device import resolve_device
from subtomo.distributed import is_main
from subtomo.errors import InputError
from subtomo.geometry.orientations import orientation_grid
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.io import write_mrc
from subtomo.ml import EngineParams, MLModel, Sampling, initial_sigma2, translation_grid
from subtomo.ml.align_maps import align_maps, symmetrise_volume, symmetry_frame, transform_volume
from subtomo.ml.initial_model import (
    GradientSchedule,
    denovo_model,
    gradient_iteration,
    image_size,
    minibatch,
    random_rotations,
)
from subtomo.ml.loader import ParticleState, StackLoader, batch_size_for_memory
from subtomo.ml.starfiles import (
    IterationFiles,
    classification_optimiser_values,
    estimated_resolution_angst,
    save_checkpoint,
    write_data_star,
    write_model_star,
    write_optimiser_star,
    write_sampling_star,
)
from subtomo.project import resolve_options, run_job
from subtomo.project.options import (
    ParticleInputs,
    continue_option,
    ml_option,
    option,
    output_dir_option,
    resumable_defaults,
)
from subtomo.report import plot_central_slices, write_html_report
from subtomo.report.plots import plot_class_progress

__all__ = ["InitialModelParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class InitialModelParams(ParticleInputs):
    """Options of "3D initial model" (RELION flag names; ``grad_*``: the gradient schedule)."""

    iter: int | None = ml_option("iter", 20)
    K: int = ml_option("K", 1)
    sym: str = ml_option("sym", "C1")
    impose_sym: bool = option(
        False, "--impose_sym/--c1_then_sym",
        help="Impose --sym in every iteration instead of running C1 and aligning the final "
        "map to the symmetry axes (RELION's default).",
    )  # fmt: skip
    tau2_fudge: float = ml_option("tau2_fudge", 4.0)
    particle_diameter: float = ml_option("particle_diameter", -1.0)
    zero_mask: bool = ml_option("zero_mask", True)
    ini_high: float = ml_option("ini_high", 60.0)
    maxres: float = option(
        -1.0, "--maxres", help="Resolution of the last iterations; <= 0: 3 pixels.", unit="Å"
    )
    healpix_order: int = ml_option("healpix_order", 1)
    oversampling: int = ml_option("oversampling", 1)
    offset_range: float = ml_option("offset_range", 2.0)
    offset_step: float = ml_option("offset_step", 2.0)
    sigma_tilt: float = ml_option("sigma_tilt", -1.0)
    sigma_psi: float = ml_option("sigma_psi", -1.0)
    grad_ini_subset: int = option(100, "--grad_ini_subset", help="First mini-batch size.")
    grad_fin_subset: int = option(200, "--grad_fin_subset", help="Final mini-batch size.")
    grad_ini_stepsize: float = option(0.6, "--grad_ini_stepsize", help="First step lambda.")
    grad_fin_stepsize: float = option(0.3, "--grad_fin_stepsize", help="Final step lambda.")
    grad_momentum: float = option(0.5, "--grad_momentum", help="Momentum mu of the steps.")
    write_iter: int = option(
        1, "--grad_write_iter",
        help="Write the files and a checkpoint every N iterations (RELION: 10; here every "
        "iteration, so that --continue loses none).",
    )  # fmt: skip
    truth: str | None = option(
        None, "--truth", help="Known map (simulations): report the correlation of both hands."
    )
    random_seed: int = ml_option("random_seed", 0)
    pad: float = ml_option("pad", 2.0)
    continue_from: str | None = continue_option()
    memory_gb: float | None = ml_option("memory_gb", 2.0)
    cache_gb: float | None = ml_option("cache_gb", 2.0)
    max_slices: int = 4096  # reference slices computed at once (not on the command line)
    device: str | None = ml_option("device", "auto")
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def _check(params: InitialModelParams) -> None:
    """One-line errors for option values that cannot work."""
    if params.K < 1 or params.iter < 1:
        raise InputError(f"--K and --iter must be >= 1 (got {params.K}, {params.iter})")
    if min(params.grad_ini_subset, params.grad_fin_subset) < 1:
        raise InputError("--grad_ini_subset and --grad_fin_subset must be >= 1")
    if not (0 < params.grad_ini_stepsize <= 1 and 0 < params.grad_fin_stepsize <= 1):
        raise InputError("--grad_ini_stepsize and --grad_fin_stepsize must be in (0, 1]")
    if not 0 <= params.grad_momentum < 1:
        raise InputError(f"--grad_momentum must be in [0, 1) (got {params.grad_momentum})")
    if params.ini_high <= 0:
        raise InputError(f"--ini_high must be > 0 Å (got {params.ini_high})")
    try:
        symmetry_matrices(params.sym)
    except InputError as err:
        raise InputError(f"--sym: {err}") from None


def _schedule(params: InitialModelParams, px: float) -> GradientSchedule:
    maxres = params.maxres if params.maxres > 0 else 3 * px
    return GradientSchedule(
        iterations=params.iter,
        subset_start=params.grad_ini_subset,
        subset_end=params.grad_fin_subset,
        resolution_start_angst=max(params.ini_high, maxres),
        resolution_end_angst=maxres,
        step_start=params.grad_ini_stepsize,
        step_end=params.grad_fin_stepsize,
        momentum=params.grad_momentum,
    )


def _sampling(params: InitialModelParams, px: float) -> Sampling:
    return Sampling(
        healpix_order=params.healpix_order,
        offset_range_angst=params.offset_range * px,
        offset_step_angst=params.offset_step * px,
        symmetry=params.sym if params.impose_sym else "C1",
        sigma_tilt_deg=params.sigma_tilt if params.sigma_tilt > 0 else None,
        sigma_psi_deg=params.sigma_psi if params.sigma_psi > 0 else None,
        oversampling=params.oversampling,
    )


def _engine(params: InitialModelParams, box: int, px: float) -> EngineParams:
    diameter = params.particle_diameter if params.particle_diameter > 0 else box * px
    return EngineParams(
        particle_diameter_angst=diameter, zero_mask=params.zero_mask,
        tau2_fudge=params.tau2_fudge, padding=params.pad, seed=params.random_seed,
        max_slices=params.max_slices, random_class_init=False,
    )  # fmt: skip


def _write_iteration(files: IterationFiles, model, state, parts, opt, sampling, params,
                     optimiser: dict[str, Any], checkpoint: dict[str, Any]) -> None:  # fmt: skip
    """All files of one iteration, the checkpoint and then the optimiser file last (together
    they mark the iteration complete for ``--continue``)."""
    maps = [files.class_map(c) for c in range(model.n_classes)]
    for path, volume in zip(maps, model.references, strict=True):
        write_mrc(path, volume.cpu(), model.pixel_size)
    write_data_star(files.data, parts, state)
    groups = np.bincount(parts.optics_rows(), minlength=model.sigma2.shape[0])
    names = parts.optics.get("rlnOpticsGroupName")
    write_model_star(
        files.model(), model, [relative_to_cwd(p) for p in maps], padding=params.pad,
        tau2_fudge=params.tau2_fudge, sampling=sampling,
        log_likelihood=float(state.log_likelihood.sum()), average_pmax=float(state.pmax.mean()),
        particles_per_group=groups.tolist(),
        group_names=None if names is None else names.astype(str).tolist(),
    )  # fmt: skip
    write_sampling_star(files.sampling, sampling, model.pixel_size)
    OptimisationSet(
        particles=Path(relative_to_cwd(files.data)), tomograms=opt.tomograms,
        trajectories=opt.trajectories,
    ).write(files.optimisation_set)  # fmt: skip
    save_checkpoint(files.checkpoint, checkpoint)
    write_optimiser_star(files.optimiser, files, optimiser)


def _final_map(model, params: InitialModelParams) -> tuple[torch.Tensor, float | None]:
    """The largest class, moved onto the symmetry axes and symmetrised (``--sym`` run in
    C1), with the symmetry correlation found (``None`` for C1 or an imposed symmetry)."""
    volume = model.references[int(torch.argmax(model.class_priors))].float().cpu()
    if params.sym.upper() == "C1":
        return volume, None
    if params.impose_sym:
        return volume, None
    res = model.current_resolution_angst
    rot, shift, cc = symmetry_frame(volume, params.sym, model.pixel_size, res)
    placed = transform_volume(volume, rot[None].float(), shift[None].float())[0]
    return symmetrise_volume(placed, params.sym), cc


#: Options a ``--continue`` may change (when given); all others come from the checkpoint.
_DEFAULTS = resumable_defaults(InitialModelParams)
_CONTINUE_OVERRIDES = (*_DEFAULTS, "output_dir", "continue_from")


def run(params: InitialModelParams) -> dict[str, str]:
    """Run (or continue) the job; returns ``{output path: RELION node type}``."""
    params, checkpoint = resolve_options(params, _CONTINUE_OVERRIDES, _DEFAULTS)
    _check(params)
    device = resolve_device(params.device)
    parts, tomos, _, opt = read_particle_inputs(
        params.ios, params.particles, params.tomograms, params.trajectories
    )
    probe = StackLoader(parts, tomos, batch_size=1)
    box, px = probe.box, probe.pixel_size
    if (params.sigma_tilt > 0 or params.sigma_psi > 0) and probe.angle_priors is None:
        raise InputError(
            "--sigma_tilt/--sigma_psi need prior angles (surface-normal picks)",
            file=parts.source, block="particles", column="rlnAngleTiltPrior",
        )  # fmt: skip
    truth = None
    if params.truth:
        truth, _ = read_map_checked(
            params.truth, what="--truth", pixel_size=px, shape=(box, box, box),
            against="the particles' rlnImageSize",
        )  # fmt: skip
    inputs = {str(opt.particles): "ParticleGroupMetadata.star.relion.tomo"}
    with run_job(
        "InitialModel", params, output_dir=params.output_dir, project_dir=params.project_dir,
        is_continue=checkpoint is not None, inputs=inputs,
    ) as (job, outputs):  # fmt: skip
        n = len(parts)
        schedule = _schedule(params, px)
        sampling = _sampling(params, px)
        engine = _engine(params, box, px)
        if checkpoint is not None:
            batch_size = int(checkpoint["batch_size"])
        else:
            n_rot = len(orientation_grid(params.healpix_order, sampling.symmetry)[0])
            n_trans = len(translation_grid(sampling.offset_range_angst,
                                           sampling.offset_step_angst))  # fmt: skip
            batch_size = batch_size_for_memory(
                params.memory_gb * 2**30, probe.max_tilts, box, n_translations=n_trans,
                n_poses=params.K * n_rot * n_trans,
            )  # fmt: skip
        loader = StackLoader(parts, tomos, batch_size=batch_size,
                             cache_bytes=params.cache_gb * 2**30)  # fmt: skip
        log.info(
            "3D initial model of %d particles (box %d, %.3f Å/px) into %d classes: %d "
            "iterations, mini-batches %d -> %d, %g -> %g Å, HEALPix order %d, symmetry %s%s; "
            "%d particles per batch", n, box, px, params.K, params.iter,
            schedule.subset(0, n), schedule.subset(params.iter, n),
            schedule.resolution_start_angst, schedule.resolution_end_angst,
            params.healpix_order, params.sym,
            " imposed" if params.impose_sym else " applied after a C1 run", batch_size,
        )  # fmt: skip
        if checkpoint is not None:
            model = MLModel.from_state_dict(checkpoint["model"], device)
            velocity = checkpoint["velocity"].to(device)
            state = ParticleState.from_state_dict(checkpoint["particles"])
            history = list(checkpoint["history"])
            log.info("Continuing from iteration %d", model.iteration)
        else:
            state = ParticleState.from_particles(parts, params.K)
            state.rotations = random_rotations(n, torch.Generator().manual_seed(params.random_seed))
            sigma2 = initial_sigma2(loader.batches(state), loader.n_optics_groups, box)
            first = minibatch(0, schedule.subset(0, n) * params.K, n, params.random_seed)
            model = denovo_model(
                loader.batches(state, first, shard=True), sigma2, params.K, box, px, engine,
                sampling.symmetry, schedule.resolution_start_angst,
                sigma_offset_angst=max(params.offset_range * px, 10.0), device=device,
            )  # fmt: skip
            velocity = torch.zeros_like(model.references)
            history = [_history_entry(model, 0.0)]
        files = IterationFiles(job.directory, model.iteration)
        started = time.perf_counter() - history[-1]["seconds"]
        for it in range(model.iteration, params.iter):
            size = image_size(schedule.resolution_angst(it), box, px)
            idx = minibatch(it, schedule.subset(it, n), n, params.random_seed)
            t0 = time.perf_counter()
            model, velocity, results = gradient_iteration(
                model, velocity, loader.batches(state, idx, shard=True), sampling, engine,
                n_particles=n, step=schedule.step(it), momentum=schedule.momentum,
                current_size=size, device=device,
            )  # fmt: skip
            state.update(results)
            history.append(_history_entry(model, time.perf_counter() - started))
            log.info(
                "iteration %d (%.1f s): %d particles, %.1f Å image size limit, classes %s, "
                "resolution estimate %.1f Å", model.iteration, time.perf_counter() - t0,
                len(idx), model.current_resolution_angst,
                " ".join(f"{p:.3f}" for p in model.class_priors.tolist()),
                history[-1]["resolution_angst"],
            )  # fmt: skip
            last = it == params.iter - 1
            if not is_main() or (model.iteration % params.write_iter and not last):
                continue  # rank 0 writes (torch.distributed)
            _plot_classes(job, model)
            files = IterationFiles(job.directory, model.iteration)
            _write_iteration(files, model, state, parts, opt, sampling, params, {
                **classification_optimiser_values(
                    model.iteration, params.iter, params.random_seed, params.tau2_fudge,
                    engine.particle_diameter_angst,
                ),
                "rlnHasConverged": int(last),
            }, {
                "params": dataclasses.asdict(params),
                "batch_size": batch_size,
                "model": model.state_dict(),
                "velocity": velocity.cpu().clone(),
                "particles": state.state_dict(),
                "history": history,
            })  # fmt: skip
        if is_main():
            final, sym_cc = _final_map(model, params)
            write_mrc(job.path("initial_model.mrc"), final, px)
            hand = _hand_report(final, truth, px, model.current_resolution_angst)
            _report(job, params, history, model, sym_cc, hand)
        outputs[str(files.data)] = "ParticleGroupMetadata.star.relion.tomo.initialmodel"
        outputs[str(files.optimiser)] = "ProcessData.star.relion.optimiser.initialmodel"
        for c in range(model.n_classes):
            outputs[str(files.class_map(c))] = "DensityMap.mrc.relion.initialmodel"
        outputs[job.alias + "initial_model.mrc"] = "DensityMap.mrc.relion.initialmodel"
    return outputs


def _history_entry(model, seconds: float) -> dict[str, Any]:
    ssnr = model.ssnr
    res = estimated_resolution_angst(ssnr, model.box, model.pixel_size)
    return {
        "iteration": model.iteration,
        "seconds": seconds,
        "class_distribution": model.class_priors.double().cpu().tolist(),
        "resolution_angst": float(res.min()) if bool((ssnr > 0).any()) else 999.0,
    }


def _plot_classes(job, model) -> None:
    """Central sections of every class at this iteration (``itNNN_classNNN_sections.png``)."""
    for c in range(model.n_classes):
        plot_central_slices(
            job.path(f"it{model.iteration:03d}_class{c + 1:03d}_sections.png"),
            model.references[c].cpu(),
            title=f"iteration {model.iteration}, class {c + 1}: "
            f"{100 * float(model.class_priors[c]):.1f}%",
        )


def _hand_report(final: torch.Tensor, truth: torch.Tensor | None, px: float,
                 resolution: float) -> dict[str, str]:  # fmt: skip
    """What is known of the hand (the truth's correlations on simulated data)."""
    out = {"hand": "that of the tomograms' tilt geometry; if their hand is unverified, "
           "compare with a known structure and use `subtomo flip-hand` if needed"}  # fmt: skip
    if truth is None:
        return out
    a = align_maps(truth.float(), final, px, max(resolution, 2 * px))
    same, mirror = (a.other_hand_correlation, a.correlation) if a.mirrored else (
        a.correlation, a.other_hand_correlation)  # fmt: skip
    out["correlation with --truth (as written)"] = f"{same:.3f}"
    out["correlation with --truth (mirror image)"] = f"{mirror:.3f}"
    out["hand matching --truth"] = "the mirror image (flip it)" if a.mirrored else "as written"
    log.info("Correlation with the truth at %.1f Å: %.3f as written, %.3f mirrored",
             max(resolution, 2 * px), same, mirror)  # fmt: skip
    return out


def _report(job, params, history, model, sym_cc: float | None, hand: dict[str, str]) -> None:
    progress = plot_class_progress(
        job.path("class_progress.png"), [h["iteration"] for h in history],
        np.array([h["class_distribution"] for h in history]),
        [h["resolution_angst"] for h in history], title="3D initial model",
    )  # fmt: skip
    images = [progress]
    for c in range(model.n_classes):
        images.append(plot_central_slices(
            job.path(f"class{c + 1:03d}_sections.png"), model.references[c].cpu(),
            title=f"class {c + 1}: {100 * float(model.class_priors[c]):.1f}%",
        ))  # fmt: skip
    images.extend(sorted(job.directory.glob("it*_class*_sections.png")))
    summary = {
        "iterations": model.iteration,
        "classes": model.n_classes,
        "class distribution": ", ".join(f"{p:.3f}" for p in model.class_priors.tolist()),
        "resolution estimate (Å)": f"{history[-1]['resolution_angst']:.1f}",
        "seconds": f"{history[-1]['seconds']:.0f}",
        "symmetry": params.sym + (" imposed" if params.impose_sym else " applied after C1"),
        **hand,
    }
    if sym_cc is not None:
        summary["correlation with its symmetrised copy"] = f"{sym_cc:.3f}"
    write_html_report(job.path("report.html"), "3D initial model", summary, images)
