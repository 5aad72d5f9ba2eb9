"""3D auto-refine (``relion_refine --auto_refine --split_random_halves``, tomography 2D stacks).

As the RELION tutorial's "3D auto-refine" step: the particles (an optimisation set or
particles + tomograms of extracted 2D stacks) are split into two random halves
(rlnRandomSubset; assigned at random when absent), the reference is low-pass filtered
("Initial low-pass filter") and, unless it is on absolute greyscale, scaled to the data;
each half is refined against its own reference, the gold-standard FSC sets the resolution,
image size and angular sampling until convergence, and a final iteration joins the halves
at full resolution. Writes ``Refine3D/jobNNN/run_it*_*`` per iteration and the final
``run_data.star``, ``run_model.star`` (+ halves), ``run_class001.mrc``,
``run_half?_class001_unfil.mrc``, ``run_optimisation_set.star`` and
``run_resolution.png``. ``--continue`` takes the job directory (its last complete iteration)
or an ``_itNNN_optimiser.star``: the options come from that iteration's checkpoint (``--iter``,
``--memory-gb``, ``--device`` and ``--o`` may change), and with the same options the result is
the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from subtomo.data import ParticleSet, pixel_size_of, read_map_checked, read_particle_inputs
from subtomo.device import resolve_device
from subtomo.distributed import is_main
from subtomo.errors import InputError
from subtomo.fourier import ssnr_resolution_shell
from subtomo.io import write_mrc
from subtomo.ml import EngineParams, MLModel, ParticleResults, initial_sigma2
from subtomo.ml.autorefine import (
    AutoRefineState,
    AutoSamplingOptions,
    HalfSetIteration,
    auto_refine,
)
from subtomo.ml.greyscale import fit_reference_scale
from subtomo.ml.loader import ParticleState, StackLoader, batch_size_for_memory
from subtomo.ml.starfiles import (
    IterationFiles,
    save_checkpoint,
    write_data_star,
    write_model_star,
    write_optimiser_star,
    write_sampling_star,
)
from subtomo.project import resolve_options, run_job, write_job_report
from subtomo.project.options import (
    continue_option,
    ml_option,
    option,
    output_dir_option,
    resumable_defaults,
)
from subtomo.report.plots import plot_series

__all__ = ["Refine3DParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class Refine3DParams:
    """Options of "3D auto-refine" (RELION GUI fields / relion_refine flags)."""

    ios: str | None = option(None, "--ios", help="Input optimisation set.")
    particles: str | None = option(None, "--particles", "--i", help="particles.star (2D stacks).")
    tomograms: str | None = option(None, "--tomograms", "--t", help="tomograms.star.")
    ref: str | None = option(
        None, "--ref", help="Reference map (*half1*: its *half2* is the second half's)."
    )
    ref_correct_greyscale: bool = ml_option("ref_correct_greyscale", False)
    ini_high: float = ml_option("ini_high", 60.0)
    solvent_mask: str | None = ml_option("solvent_mask", None)
    solvent_correct_fsc: bool = option(
        False, "--solvent_correct_fsc", help="Use solvent-flattened FSCs."
    )
    auto_solvent_mask: bool = option(
        True,
        "--auto_solvent_mask/--no_auto_solvent_mask",
        help="Without --solvent_mask: flatten the references with the loose mask of the FSC.",
    )
    sym: str = ml_option("sym", "C1")
    particle_diameter: float = ml_option("particle_diameter", 0.0)
    zero_mask: bool = ml_option("zero_mask", True)
    tau2_fudge: float = ml_option("tau2_fudge", 1.0)
    healpix_order: int = ml_option("healpix_order", 2)
    offset_range: float = ml_option("offset_range", 5.0)
    offset_step: float = ml_option("offset_step", 1.0)
    auto_local_healpix_order: int = option(
        4, "--auto_local_healpix_order", help="Local searches from this HEALPix order."
    )
    sigma_ang: float = ml_option("sigma_ang", -1.0)
    oversampling: int = ml_option("oversampling", 1)
    sigma_tilt: float = ml_option("sigma_tilt", -1.0)
    sigma_psi: float = ml_option("sigma_psi", -1.0)
    auto_ignore_angles: bool = option(
        False, "--auto_ignore_angles", help="Finer sampling and convergence without stable angles."
    )
    auto_resol_angles: bool = option(
        False, "--auto_resol_angles", help="Finer sampling as soon as the resolution needs it."
    )
    low_resol_join_halves: float = option(
        40.0, "--low_resol_join_halves", help="Join the halves below this resolution.", unit="Å"
    )
    strict_highres_exp: float = ml_option("strict_highres_exp", -1.0)
    incr_size: int = 10  # --incr_size (not on the command line)
    max_iter: int | None = ml_option("iter", 50)
    pad: float = ml_option("pad", 2.0)
    random_seed: int = ml_option("random_seed", 0)
    memory_gb: float | None = ml_option("memory_gb", 2.0)
    device: str | None = ml_option("device", "auto")
    continue_from: str | None = continue_option()
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def _halves(particles: ParticleSet, seed: int) -> np.ndarray:
    """rlnRandomSubset (1/2): all 0 -> random halves (seeded), as RELION; mixed -> error."""
    subsets = particles.random_subset()
    if (subsets == 0).all():
        rng = np.random.default_rng(seed)
        subsets = 1 + rng.permutation(len(subsets)) % 2
        log.info("No rlnRandomSubset: particles assigned to two random halves")
        particles.particles["rlnRandomSubset"] = subsets
        return subsets
    bad = np.flatnonzero(~np.isin(subsets, (1, 2)))
    if bad.size:
        raise InputError(
            "rlnRandomSubset must be all 0 or all 1 or 2", file=particles.source,
            block="particles", column="rlnRandomSubset", row=int(bad[0]) + 1,
        )  # fmt: skip
    if not ((subsets == 1).any() and (subsets == 2).any()):
        raise InputError("both halves need particles", file=particles.source,
                         block="particles", column="rlnRandomSubset")  # fmt: skip
    return subsets


def _references(params: Refine3DParams, box: int, pixel: float) -> list[torch.Tensor]:
    """One reference per half: ``--ref`` for both, or ``*half1*`` and its ``*half2*``."""
    if not params.ref:
        raise InputError("give a reference map (--ref)")
    paths = [Path(params.ref)]
    if "half1" in paths[0].name:
        paths.append(paths[0].with_name(paths[0].name.replace("half1", "half2")))
        log.info("Half-map references: %s and %s", *paths)
    maps = [
        read_map_checked(
            p, what="the reference", pixel_size=pixel, shape=(box, box, box),
            against="the particles' rlnImageSize",
        )[0]
        for p in paths
    ]  # fmt: skip
    return maps if len(maps) == 2 else maps * 2


def _mask(params: Refine3DParams, box: int, pixel: float) -> torch.Tensor | None:
    if not params.solvent_mask:
        if params.solvent_correct_fsc:
            raise InputError("--solvent_correct_fsc needs --solvent_mask")
        return None
    mask, _ = read_map_checked(
        params.solvent_mask, what="the solvent mask", pixel_size=pixel, shape=(box, box, box),
        against="the particles' rlnImageSize", mask=True,
    )  # fmt: skip
    return mask


def _options(params: Refine3DParams, box: int, pixel: float) -> AutoSamplingOptions:
    return AutoSamplingOptions(
        particle_diameter_angst=_diameter(params, box, pixel),
        pixel_size=pixel,
        healpix_order=params.healpix_order,
        offset_range_angst=params.offset_range * pixel,
        offset_step_angst=params.offset_step * pixel,
        auto_local_healpix_order=params.auto_local_healpix_order,
        oversampling=params.oversampling,
        symmetry=params.sym,
        sigma_tilt_deg=params.sigma_tilt if params.sigma_tilt > 0 else None,
        sigma_psi_deg=params.sigma_psi if params.sigma_psi > 0 else None,
        sigma_ang_deg=params.sigma_ang if params.sigma_ang > 0 else None,
        auto_ignore_angles=params.auto_ignore_angles,
        auto_resol_angles=params.auto_resol_angles,
        incr_size=params.incr_size,
    )


def _diameter(params: Refine3DParams, box: int, pixel: float) -> float:
    return params.particle_diameter if params.particle_diameter > 0 else 0.9 * box * pixel


#: Options a ``--continue`` may change (when given); all others come from the checkpoint.
_DEFAULTS = resumable_defaults(Refine3DParams)
_CONTINUE_OVERRIDES = (*_DEFAULTS, "output_dir", "continue_from")


def run(params: Refine3DParams) -> dict[str, str]:
    """Run (or continue) the job; returns ``{output path: RELION node type}``."""
    params, ck = resolve_options(params, _CONTINUE_OVERRIDES, _DEFAULTS)
    device = resolve_device(params.device)
    parts, tomos, _, opt = read_particle_inputs(params.ios, params.particles, params.tomograms)
    subsets = _halves(parts, params.random_seed)
    pixel = pixel_size_of(parts)
    box = int(parts.image_size()[0])
    mask = _mask(params, box, pixel)
    engine = EngineParams(
        particle_diameter_angst=_diameter(params, box, pixel),
        zero_mask=params.zero_mask,
        tau2_fudge=params.tau2_fudge,
        padding=params.pad,
        strict_highres_exp_angst=params.strict_highres_exp if params.strict_highres_exp > 0
        else None,
        incr_size=params.incr_size,
        reference_mask=mask,
        seed=params.random_seed,
        auto_solvent_mask=params.auto_solvent_mask and mask is None,
    )  # fmt: skip
    options = _options(params, box, pixel)
    n_trans = max(1, int((4 / 3) * math.pi * (params.offset_range / params.offset_step) ** 3))
    loader = StackLoader(
        parts, tomos,
        batch_size=batch_size_for_memory(params.memory_gb * 2**30 / 4, 41, box,
                                         n_translations=min(n_trans, 64), n_poses=4096),
        cache_bytes=params.memory_gb * 2**30 / 2,
    )  # fmt: skip
    indices = [np.flatnonzero(subsets == h) for h in (1, 2)]
    inputs = {str(opt.particles): "ParticleGroupMetadata.star.relion.tomo"}
    with run_job(
        "Refine3D", params, output_dir=params.output_dir, project_dir=params.project_dir,
        is_continue=ck is not None, inputs=inputs,
    ) as (job, outputs):  # fmt: skip
        if ck is not None:
            models = tuple(MLModel.from_state_dict(m, device) for m in ck["models"])
            state = AutoRefineState.from_state_dict(ck["state"])
            results = tuple(ParticleResults(**r) for r in ck["results"])
            pstate = ParticleState.from_state_dict(ck["particles"])
            history = list(ck["history"])
        else:
            pstate = ParticleState.from_particles(parts)
            models = _initial_models(params, loader, pstate, indices, box, pixel, device)
            state, results, history = None, None, []
        log.info(
            "3D auto-refine of %d particles (%d + %d), box %d at %.3f Å/px, symmetry %s",
            len(parts), len(indices[0]), len(indices[1]), box, pixel, params.sym,
        )  # fmt: skip
        writer = _Writer(job.directory, parts, pstate, params, engine, options, history,
                         opt, outputs)  # fmt: skip
        auto_refine(
            models,
            tuple((lambda i=i: loader.batches(pstate, i, shard=True)) for i in indices),
            options,
            engine,
            state=state,
            results=results,
            low_resol_join_angst=params.low_resol_join_halves,
            solvent_correct_fsc=params.solvent_correct_fsc,
            max_iterations=params.max_iter,
            on_iteration=writer,
            device=device,
        )
        write_job_report(job, outputs)
    return outputs


def _initial_models(
    params: Refine3DParams,
    loader: StackLoader,
    pstate: ParticleState,
    indices: list[np.ndarray],
    box: int,
    pixel: float,
    device: torch.device,
) -> tuple[MLModel, MLModel]:
    """Each half's model: its reference, noise spectra from its own particles, the image size
    of the initial low-pass filter, the reference scaled to the data unless on absolute
    greyscale."""
    refs = _references(params, box, pixel)
    ini = params.ini_high if params.ini_high > 0 else None
    size = box
    if ini:
        size = min(box, 2 * (int(box * pixel / ini) + params.incr_size))
    models = []
    for ref, idx in zip(refs, indices, strict=True):
        sigma2 = initial_sigma2(loader.batches(pstate, idx), loader.n_optics_groups, box)
        model = MLModel.initial(
            ref[None].to(device), sigma2, pixel, current_size=size, ini_high_angst=ini
        )
        if not params.ref_correct_greyscale:
            scale = fit_reference_scale(
                model.references, loader.batches(pstate, idx), sigma2, box=box,
                pixel_size=pixel, resolution_angst=pixel * box / max(1, model.current_size // 2),
                offset_range_angst=params.offset_range * pixel,
                offset_step_angst=params.offset_step * pixel, padding=params.pad, device=device,
            )  # fmt: skip
            if not math.isfinite(scale) or scale <= 0:
                scale = 1.0
            log.info("Reference scaled by %.4g to the data's greyscale", scale)
            model = dataclasses.replace(
                model, references=model.references * scale, tau2=model.tau2 * scale**2
            )
        models.append(model)
    return models[0], models[1]


class _Writer:
    """Writes each iteration's files (RELION names), the checkpoint, and the final files."""

    def __init__(self, directory, parts, pstate, params, engine, options, history, opt,
                 outputs) -> None:  # fmt: skip
        self.directory, self.parts, self.pstate = Path(directory), parts, pstate
        self.params, self.engine, self.options = params, engine, options
        self.history, self.opt, self.outputs = history, opt, outputs

    def __call__(self, it: HalfSetIteration, state: AutoRefineState) -> None:
        for r in it.results:
            self.pstate.update(r)
        if not is_main():  # rank 0 writes (torch.distributed)
            return
        model = it.models[0]
        final = state.converged and it.models[0] is it.models[1]
        files = IterationFiles(self.directory, None if final else model.iteration)
        px, n = model.pixel_size, model.box
        shell = ssnr_resolution_shell(it.ssnr)
        self.history.append(n * px / shell)
        if final:
            log.info("Final iteration (halves joined): resolution %.1f Å", n * px / shell)
        else:  # the sampling the next iteration will use
            log.info(
                "Iteration %d: resolution %.1f Å; %s: image size %d, HEALPix order %d%s, "
                "offsets %.1f/%.1f Å",
                model.iteration, n * px / shell,
                "converged, the final iteration" if state.converged else "next",
                model.current_size, state.healpix_order,
                " (local)" if state.local_searches else "", state.offset_range_angst,
                state.offset_step_angst,
            )  # fmt: skip
        sampling = state.sampling(self.options)
        write_data_star(files.data, self.parts, self.pstate)
        common = dict(
            padding=self.engine.padding, tau2_fudge=self.engine.tau2_fudge, sampling=sampling,
            log_likelihood=it.log_likelihood, average_pmax=it.mean_pmax,
            particles_per_group=[len(self.parts)], fsc=it.fsc[None],
            accuracies=tuple(v if math.isfinite(v) else 999.0
                             for v in (state.acc_rot_deg, state.acc_trans_angst)),
        )  # fmt: skip
        halves = (1, 2)
        for h, m, half in zip(halves, it.models, it.half_maps, strict=True):
            ref = files.class_map(0, h)
            unfil = ref.with_name(ref.name.replace(".mrc", "_unfil.mrc"))
            if final or self.params.solvent_correct_fsc:
                write_mrc(unfil, half, px)
            if not final:
                write_mrc(ref, m.references[0], px)
            write_model_star(files.model(h), m, [str(unfil if final else ref)], **common)
        if final:
            write_mrc(files.class_map(0), model.references[0], px)
            write_model_star(files.model(), model, [str(files.class_map(0))], **common)
        write_sampling_star(files.sampling, sampling, px)
        # the half maps this iteration wrote: the final one writes only the unfiltered halves
        maps = [files.class_map(0, h) for h in halves]
        if final:
            maps = [m.with_name(m.name.replace(".mrc", "_unfil.mrc")) for m in maps]
        ios = dataclasses.replace(
            self.opt, particles=files.data, reference_map1=maps[0], reference_map2=maps[1],
            path=None,
        )  # fmt: skip
        if self.params.solvent_mask:
            ios.reference_mask = Path(self.params.solvent_mask)
        ios.write(files.optimisation_set)
        # the checkpoint, then the optimiser file: together they mark the iteration complete
        save_checkpoint(files.checkpoint, {
            "params": dataclasses.asdict(self.params),
            "models": [m.state_dict() for m in it.models],
            "state": state.state_dict(),
            "results": [dataclasses.asdict(r) for r in it.results],
            "particles": self.pstate.state_dict(),
            "history": list(self.history),
        })  # fmt: skip
        write_optimiser_star(files.optimiser, files, {
            "rlnCurrentIteration": model.iteration,
            "rlnDoSplitRandomHalves": 1,
            "rlnJoinHalvesUntilThisResolution": self.params.low_resol_join_halves,
            "rlnRandomSeed": self.params.random_seed,
            "rlnNumberOfIterWithoutResolutionGain": state.iter_without_resolution_gain,
            "rlnNumberOfIterWithoutChangingAssignments": state.iter_without_changes,
            "rlnBestResolutionThusFar": state.best_resolution_shell / (n * px),
            "rlnHasConverged": int(state.converged),
            "rlnHasHighFscAtResolLimit": int(float(it.fsc[min(model.current_size // 2,
                                                               n // 2)]) > 0.2),
            "rlnAutoLocalSearchesHealpixOrder": self.options.auto_local_healpix_order,
        })  # fmt: skip
        if final:
            self._final_outputs(files)

    def _final_outputs(self, files: IterationFiles) -> None:
        plot = self.directory / "run_resolution.png"
        plot_series(
            plot, [str(i + 1) for i in range(len(self.history))],
            {"gold-standard resolution": self.history}, xlabel="iteration",
            ylabel="resolution (Å)", title="3D auto-refine", invert_y=True,
        )  # fmt: skip
        self.outputs[str(files.data)] = "ParticleGroupMetadata.star.relion.tomo"
        self.outputs[str(files.optimisation_set)] = "TomoOptimisationSet.star.relion"
        self.outputs[str(files.class_map(0))] = "DensityMap.mrc.relion.refine3d"
        for h in (1, 2):
            path = self.directory / f"run_half{h}_class001_unfil.mrc"
            self.outputs[str(path)] = "DensityMap.mrc.relion.halfmap.refine3d"
        self.outputs[str(files.model())] = "ProcessData.star.relion.optimiser.refine3d"
