"""3D classification (``relion_refine`` without ``--auto_refine``) of 2D-stack particles.

As on the tutorial's "3D classification" page: read the particles (an optimisation set or
particles + tomograms), the reference map(s) and an optional solvent mask; low-pass the
reference (``--ini_high``) and put it on the data's grey scale; start K classes from it
(random particle subsets in the first iteration) or from K maps; then iterate the ML engine
(:func:`subtomo.ml.iterate`) with or without alignment (global HEALPix or local searches) and
write RELION's ``run_itNNN_*`` files every iteration (relion5-conventions §7.4), with a
checkpoint beside each optimiser file so that ``--continue`` (the job directory: its last
complete iteration, or a ``run_itNNN_optimiser.star``) reproduces the uninterrupted run
exactly. A plot of the class populations and resolution and a ``report.html`` end the job.
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from subtomo.data import (
    OptimisationSet,
    ParticleSet,
    read_map_checked,
    read_particle_inputs,
    relative_to_cwd,
)
from subtomo.device import resolve_device
from subtomo.distributed import is_main
from subtomo.errors import InputError
from subtomo.geometry import rotation_angle_deg
from subtomo.geometry.orientations import orientation_grid
from subtomo.io import write_mrc
from subtomo.ml import (
    EngineParams,
    MLModel,
    Sampling,
    initial_sigma2,
    iterate,
    translation_grid,
)
from subtomo.ml.greyscale import fit_reference_scale
from subtomo.ml.loader import ParticleState, StackLoader, batch_size_for_memory
from subtomo.ml.seeding import pca_classes
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

__all__ = ["Class3DParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class Class3DParams(ParticleInputs):
    """Options of "3D classification" (RELION GUI field / program flag names)."""

    ref: tuple[str, ...] = option(
        (), "--ref", help="Reference map: one (perturbed into K classes) or one per class."
    )
    ref_correct_greyscale: bool = ml_option("ref_correct_greyscale", False)
    ini_high: float = ml_option("ini_high", 60.0)
    solvent_mask: str | None = ml_option("solvent_mask", None)
    K: int = ml_option("K", 1)
    iter: int | None = ml_option("iter", 25)
    tau2_fudge: float = ml_option("tau2_fudge", 1.0)
    particle_diameter: float = ml_option("particle_diameter", -1.0)
    zero_mask: bool = ml_option("zero_mask", False)
    flatten_solvent: bool = option(
        True, "--flatten_solvent/--no_flatten_solvent", help="Mask the references."
    )
    sym: str = ml_option("sym", "C1")
    skip_align: bool = option(
        False, "--skip_align", "--no-align", help="Classification without alignment."
    )
    healpix_order: int = ml_option("healpix_order", 2)
    offset_range: float = ml_option("offset_range", 5.0)
    offset_step: float = ml_option("offset_step", 1.0)
    sigma_ang: float = ml_option("sigma_ang", -1.0)
    oversampling: int = ml_option("oversampling", 1)
    sigma_tilt: float = ml_option("sigma_tilt", -1.0)
    sigma_psi: float = ml_option("sigma_psi", -1.0)
    strict_highres_exp: float = ml_option("strict_highres_exp", -1.0)
    adaptive_fraction: float = option(
        0.999, "--adaptive_fraction", help="Fraction of the probability mass oversampled."
    )
    pad: float = ml_option("pad", 2.0)
    random_seed: int = ml_option("random_seed", 0)
    class_init: str = option(
        "pca", "--class_init",
        help="How one reference becomes K classes in iteration 1: 'pca' (k-means on the "
        "leading principal components of the particles' low-resolution residuals against "
        "it) or 'random' (RELION's random subsets).",
    )  # fmt: skip
    init_res: float = option(
        50.0, "--init_res", help="Resolution of the residuals that --class_init pca compares.",
        unit="Å",
    )  # fmt: skip
    leave_one_out: bool = option(
        True, "--leave_one_out/--no_leave_one_out",
        help="Without alignment: score each particle against its class's reference without "
        "its own contribution (otherwise, at low SNR, no particle ever changes class).",
    )  # fmt: skip
    continue_from: str | None = continue_option()
    memory_gb: float | None = ml_option("memory_gb", 2.0)
    cache_gb: float | None = ml_option("cache_gb", 2.0)
    max_slices: int = 4096  # reference slices computed at once (not on the command line)
    device: str | None = ml_option("device", "auto")
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


#: Options a ``--continue`` may change (when given); all others come from the checkpoint.
_DEFAULTS = resumable_defaults(Class3DParams)
_CONTINUE_OVERRIDES = (*_DEFAULTS, "output_dir", "continue_from")


def _engine_params(params: Class3DParams, box: int, px: float, mask) -> EngineParams:
    diameter = params.particle_diameter if params.particle_diameter > 0 else box * px
    return EngineParams(
        particle_diameter_angst=diameter,
        zero_mask=params.zero_mask,
        tau2_fudge=params.tau2_fudge,
        padding=params.pad,
        adaptive_fraction=params.adaptive_fraction,
        strict_highres_exp_angst=(
            params.strict_highres_exp if params.strict_highres_exp > 0 else None
        ),
        reference_mask=mask,
        flatten_solvent=params.flatten_solvent,
        random_class_init=len(params.ref) == 1,
        seed=params.random_seed,
        max_slices=params.max_slices,
        seeded_classes=_pca_init(params),
        leave_one_out=params.leave_one_out,
    )


def _pca_init(params: Class3DParams) -> bool:
    """Whether iteration 1 takes its classes from :func:`subtomo.ml.seeding.pca_classes`."""
    return params.class_init == "pca" and len(params.ref) == 1 and params.K > 1


def _sampling(params: Class3DParams, px: float) -> Sampling:
    return Sampling(
        healpix_order=params.healpix_order,
        offset_range_angst=params.offset_range * px,
        offset_step_angst=params.offset_step * px,
        local_sigma_deg=params.sigma_ang if params.sigma_ang > 0 else None,
        sigma_tilt_deg=params.sigma_tilt if params.sigma_tilt > 0 else None,
        sigma_psi_deg=params.sigma_psi if params.sigma_psi > 0 else None,
        symmetry=params.sym,
        align=not params.skip_align,
        oversampling=params.oversampling,
    )


def _read_map(path: str, box: int, px: float, what: str, mask: bool = False) -> torch.Tensor:
    """A reference or mask for particles of box ``box`` at ``px`` Å/pixel, checked
    (:func:`~subtomo.data.read_map_checked`: finite, that box, that pixel size)."""
    volume, _ = read_map_checked(
        path, what=what, pixel_size=px, shape=(box, box, box),
        against="the particles' rlnImageSize", mask=mask,
    )  # fmt: skip
    return volume


def _references(params: Class3DParams, box: int, px: float) -> torch.Tensor:
    """``(K, n, n, n)``: one map repeated K times (RELION perturbs it through random subsets
    in the first iteration) or K maps."""
    if not params.ref:
        raise InputError("give a reference map (--ref)")
    if len(params.ref) not in (1, params.K):
        raise InputError(f"give one reference or K = {params.K}, not {len(params.ref)}")
    maps = [_read_map(p, box, px, "the reference") for p in params.ref]
    if len(maps) == 1:
        maps = maps * params.K
    return torch.stack(maps)


def _changes(prev: ParticleState, new: ParticleState) -> dict[str, float]:
    """Mean change of the best orientation (deg), RMS change of the best offset (Å) and the
    fraction of particles that changed class (rlnChangesOptimal*)."""
    angle = rotation_angle_deg(prev.rotations, new.rotations)
    shift = (prev.offsets - new.offsets).square().sum(1)
    return {
        "rlnChangesOptimalOrientations": float(angle.mean()),
        "rlnChangesOptimalOffsets": float(shift.mean().sqrt()),
        "rlnChangesOptimalClasses": float((prev.classes != new.classes).double().mean()),
    }


def _history_entry(model: MLModel) -> dict[str, Any]:
    res = estimated_resolution_angst(model.ssnr, model.box, model.pixel_size)
    return {
        "iteration": model.iteration,
        "class_distribution": model.class_priors.double().cpu().tolist(),
        "resolution_angst": float(res.min()) if bool((model.ssnr > 0).any()) else 999.0,
    }


def _write_iteration(
    files: IterationFiles,
    model: MLModel,
    state: ParticleState,
    parts: ParticleSet,
    opt: OptimisationSet,
    sampling: Sampling,
    params: Class3DParams,
    optimiser: dict[str, Any],
    checkpoint: dict[str, Any],
) -> None:
    """All files of one iteration, the checkpoint and then the optimiser file last (together
    they mark the iteration complete)."""
    maps = [files.class_map(c) for c in range(model.n_classes)]
    for path, volume in zip(maps, model.references, strict=True):
        write_mrc(path, volume.cpu(), model.pixel_size)
    write_data_star(files.data, parts, state)
    groups = np.bincount(parts.optics_rows(), minlength=model.sigma2.shape[0])
    names = parts.optics.get("rlnOpticsGroupName")
    write_model_star(
        files.model(), model, [relative_to_cwd(p) for p in maps], padding=params.pad,
        tau2_fudge=params.tau2_fudge, sampling=sampling,
        log_likelihood=float(state.log_likelihood.sum()),
        average_pmax=float(state.pmax.mean()), particles_per_group=groups.tolist(),
        group_names=None if names is None else names.astype(str).tolist(),
    )  # fmt: skip
    write_sampling_star(files.sampling, sampling, model.pixel_size)
    OptimisationSet(
        particles=Path(relative_to_cwd(files.data)),
        tomograms=opt.tomograms,
        trajectories=opt.trajectories,
        reference_mask=opt.reference_mask,
    ).write(files.optimisation_set)
    save_checkpoint(files.checkpoint, checkpoint)
    write_optimiser_star(files.optimiser, files, optimiser)


def _initial_size(params: Class3DParams, box: int, px: float) -> int:
    """The first iteration's image size: 2 (shell of ``--ini_high`` + ``--incr_size``), as
    RELION (the full box without an initial low-pass)."""
    if params.ini_high <= 0:
        return box
    return min(box, 2 * (int(box * px / params.ini_high) + EngineParams.incr_size))


def run(params: Class3DParams) -> dict[str, str]:
    """Run (or continue) the job; returns ``{output path: RELION node type}``."""
    params, checkpoint = resolve_options(params, _CONTINUE_OVERRIDES, _DEFAULTS)
    if params.K < 1 or params.iter < 1:
        raise InputError(f"--K and --iter must be >= 1 (got {params.K}, {params.iter})")
    if params.class_init not in ("pca", "random"):
        raise InputError(f"--class_init must be 'pca' or 'random' (got {params.class_init!r})")
    if not params.init_res > 0:
        raise InputError(f"--init_res must be > 0 Å (got {params.init_res})")
    device = resolve_device(params.device)
    parts, tomos, _, opt = read_particle_inputs(
        params.ios, params.particles, params.tomograms, params.trajectories
    )
    inputs = {str(opt.particles): "ParticleGroupMetadata.star.relion.tomo"}
    inputs.update({str(r): "DensityMap.mrc" for r in params.ref})
    with run_job(
        "Class3D", params, output_dir=params.output_dir, project_dir=params.project_dir,
        is_continue=checkpoint is not None, inputs=inputs,
    ) as (job, outputs):  # fmt: skip
        probe = StackLoader(parts, tomos, batch_size=1)
        box, px = probe.box, probe.pixel_size
        mask = None
        if params.solvent_mask:
            mask = _read_map(params.solvent_mask, box, px, "the solvent mask", mask=True)
            opt.reference_mask = Path(params.solvent_mask)
        sampling = _sampling(params, px)
        engine = _engine_params(params, box, px, mask)
        if checkpoint is not None:
            batch_size = int(checkpoint["batch_size"])
        else:
            n_rot, n_trans = _search_size(sampling)
            batch_size = batch_size_for_memory(
                params.memory_gb * 2**30, probe.max_tilts, box, n_translations=n_trans,
                n_poses=params.K * n_rot * n_trans,
            )  # fmt: skip
        loader = StackLoader(
            parts, tomos, batch_size=batch_size, cache_bytes=params.cache_gb * 2**30
        )
        log.info(
            "3D classification of %d particles (box %d, %.3f Å/px, up to %d tilts) into %d "
            "classes, %s; %d particles per batch%s",
            len(parts), box, px, loader.max_tilts, params.K,
            "without alignment" if params.skip_align else (
                f"local searches (sigma {params.sigma_ang:g} deg)" if params.sigma_ang > 0
                else f"global searches (HEALPix order {params.healpix_order})"),
            batch_size, ", stacks cached in memory" if loader.cache_enabled else "",
        )  # fmt: skip
        if checkpoint is not None:
            model = MLModel.from_state_dict(checkpoint["model"])
            model = dataclasses.replace(model, references=model.references.to(device))
            state = ParticleState.from_state_dict(checkpoint["particles"])
            history = list(checkpoint["history"])
            changes = dict(checkpoint["changes"])
            log.info("Continuing from iteration %d", model.iteration)
        else:
            state = ParticleState.from_particles(parts, params.K)
            refs = _references(params, box, px)
            sigma2 = initial_sigma2(loader.batches(state), loader.n_optics_groups, box)
            if not params.ref_correct_greyscale:
                scale = fit_reference_scale(
                    refs, loader.batches(state), sigma2, box=box, pixel_size=px,
                    resolution_angst=params.ini_high if params.ini_high > 0 else 2 * px,
                    offset_range_angst=sampling.offset_range_angst if sampling.align else 0.0,
                    offset_step_angst=sampling.offset_step_angst, padding=params.pad,
                    device=device,
                )  # fmt: skip
                if not np.isfinite(scale) or scale <= 0:
                    log.warning("could not fit the reference grey scale; keeping it as is")
                    scale = 1.0
                log.info("Reference grey scale corrected by a factor %.4g", scale)
                refs = refs * scale
            model = MLModel.initial(
                refs.to(device), sigma2, px, current_size=_initial_size(params, box, px),
                sigma_offset_angst=max(params.offset_range * px, 10.0),
                ini_high_angst=params.ini_high if params.ini_high > 0 else None,
            )  # fmt: skip
            if engine.seeded_classes:
                log.info("Initial classes: k-means on the principal components of the "
                         "residuals to %g Å", params.init_res)  # fmt: skip
                state.classes = pca_classes(
                    refs[0], sigma2, lambda: loader.batches(state), len(parts), params.K,
                    params.init_res, padding=params.pad, seed=params.random_seed,
                    device=device,
                )  # fmt: skip
            history = [_history_entry(model)]
            changes = {
                "rlnChangesOptimalOrientations": 999.0,
                "rlnChangesOptimalOffsets": 999.0,
                "rlnChangesOptimalClasses": 1.0,
            }
        files = IterationFiles(job.directory, model.iteration)

        def save() -> None:
            if not is_main():  # rank 0 writes (torch.distributed)
                return
            optimiser = {
                **classification_optimiser_values(
                    model.iteration,
                    params.iter,
                    params.random_seed,
                    params.tau2_fudge,
                    engine.particle_diameter_angst,
                ),
                **changes,
                "rlnNumberOfIterWithoutResolutionGain": 0,
                "rlnNumberOfIterWithoutChangingAssignments": 0,
                "rlnHasConverged": int(model.iteration >= params.iter),
            }
            state_now = {
                "params": dataclasses.asdict(params),
                "batch_size": batch_size,
                "model": model.state_dict(),
                "particles": state.state_dict(),
                "history": history,
                "changes": changes,
            }
            _write_iteration(
                files, model, state, parts, opt, sampling, params, optimiser, state_now
            )

        if checkpoint is None:
            save()
        for _ in range(model.iteration, params.iter):
            before = ParticleState.from_state_dict(state.state_dict())
            started = time.perf_counter()
            with Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
            ) as bar:  # fmt: skip
                task = bar.add_task(f"iteration {model.iteration + 1}", total=len(loader))
                model, results = iterate(
                    model, lambda: loader.batches(state, shard=True), sampling, engine,
                    device=device, progress=lambda k, t=task: bar.advance(t, k),
                )  # fmt: skip
            state.update(results)
            changes = _changes(before, state)
            history.append(_history_entry(model))
            log.info(
                "iteration %d (%.1f s): classes %s, resolution %.1f Å, class changes %.3f, "
                "orientation changes %.2f deg",
                model.iteration, time.perf_counter() - started,
                " ".join(f"{p:.3f}" for p in model.class_priors.tolist()),
                history[-1]["resolution_angst"], changes["rlnChangesOptimalClasses"],
                changes["rlnChangesOptimalOrientations"],
            )  # fmt: skip
            files = IterationFiles(job.directory, model.iteration)
            save()
        _outputs(outputs, files, model.n_classes)
        if is_main():
            _report(job, params, history, files, model)
    return outputs


def _search_size(sampling: Sampling) -> tuple[int, int]:
    """Rotations and translations per particle of the coarse pass (for the batch size)."""
    if not sampling.align:
        return 1, 1
    n_trans = len(translation_grid(sampling.offset_range_angst, sampling.offset_step_angst))
    if sampling.local_sigma_deg is None:
        return len(orientation_grid(sampling.healpix_order, sampling.symmetry)[0]), n_trans
    radius = sampling.local_n_sigma * sampling.local_sigma_deg / sampling.step_deg
    return int(4.19 * (radius + 0.5) ** 3) + 1, n_trans


def _outputs(outputs: dict[str, str], files: IterationFiles, n_classes: int) -> None:
    outputs[str(files.data)] = "ParticleGroupMetadata.star.relion.tomo.class3d"
    outputs[str(files.optimiser)] = "ProcessData.star.relion.optimiser.class3d"
    outputs[str(files.optimisation_set)] = "OptimisationSet.star.relion.tomo"
    for c in range(n_classes):
        outputs[str(files.class_map(c))] = "DensityMap.mrc.relion.class3d"


def _report(job, params: Class3DParams, history, files: IterationFiles, model: MLModel) -> None:
    """``class_progress.png``, central sections of each class and ``report.html``."""
    progress = plot_class_progress(
        job.path("class_progress.png"),
        [h["iteration"] for h in history],
        np.array([h["class_distribution"] for h in history]),
        [h["resolution_angst"] for h in history],
    )
    images = [progress]
    for c in range(model.n_classes):
        images.append(
            plot_central_slices(
                job.path(f"class{c + 1:03d}_sections.png"), model.references[c].cpu(),
                title=f"class {c + 1}: {100 * float(model.class_priors[c]):.1f}%",
            )
        )  # fmt: skip
    write_html_report(
        job.path("report.html"),
        "3D classification",
        {
            "iterations": model.iteration,
            "classes": model.n_classes,
            "class distribution": ", ".join(f"{p:.3f}" for p in model.class_priors.tolist()),
            "resolution (Å)": f"{history[-1]['resolution_angst']:.1f}",
            "alignment": "none" if params.skip_align else "yes",
            "last data file": relative_to_cwd(files.data),
        },
        images,
    )
