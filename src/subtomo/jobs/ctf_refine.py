"""Tomo CTF refinement (``subtomo ctf-refine``, ``relion_tomo_refine_ctf``; §11, §23).

As the RELION tutorial's "CTF refinement" step of the refinement cycle: from a refined
optimisation set (particles as 2D stacks, tomograms, the two half maps, a mask) every tilt's
defocus, astigmatism and scale are fitted against the half map of each particle's own half
set (:mod:`subtomo.tomorefine`), the scales by the Beer–Lambert law of the ice; beyond
RELION, optionally each particle's defocus (with a Gaussian prior). Writes into
``CtfRefine/jobNNN/``: ``tomograms.star`` (+ ``tilt_series/``) with the new
rlnDefocusU/V/Angle and rlnCtfScalefactor, ``particles.star`` with
``subtomoDefocusOffsetAngst`` when per-particle defoci are fitted, ``optimisation_set.star``
and ``report.html`` (defocus per tilt before/after, scale against tilt, ice thickness).
Follow it with a new Extract and Refine3D. ``--continue <job dir>`` resumes after the last
tilt series done (``ctf_refine_checkpoint.pt``) with the options it ran with (only
``--device`` may change). Under torch.distributed the ranks share each tilt series'
particles and sum their statistics; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.ctf import aberration_phase
from subtomo.data import (
    DEFOCUS_ESTIMATE,
    DEFOCUS_OFFSET,
    OptimisationSet,
    ParticleSet,
    TomogramSet,
    pixel_size_of,
    read_half_maps,
    read_particle_inputs,
    relative_to_cwd,
)
from subtomo.device import resolve_device
from subtomo.distributed import is_main
from subtomo.errors import InputError
from subtomo.io import format_vector, parse_vector
from subtomo.ml.loader import ParticleState, StackLoader
from subtomo.ml.starfiles import load_checkpoint, save_checkpoint
from subtomo.project import read_job_options, run_job, write_job_report
from subtomo.project.options import (
    ParticleInputs,
    device_option,
    option,
    output_dir_option,
)
from subtomo.report.plots import plot_images, plot_xy
from subtomo.tomorefine import TiltPredictor, fsc_weights
from subtomo.tomorefine.ctf import (
    AberrationSums,
    IceFit,
    fit_aberrations,
    fit_ice_scale,
    zernike_count,
)
from subtomo.tomorefine.refine import CtfRefineOptions, TomogramResult, refine_tomogram

__all__ = ["CtfRefineParams", "run"]

log = logging.getLogger("subtomo")

CHECKPOINT = "ctf_refine_checkpoint.pt"


def _astigmatism(text: str) -> str:
    if text not in ("none", "series", "tilt"):
        raise ValueError(f"expected none, series or tilt, found {text!r}")
    return text


STACK_CROPS = ("auto", "post", "pre", "both", "none")


def _stack_crop(text: str) -> str:
    if text not in STACK_CROPS:
        raise ValueError(f"expected one of {', '.join(STACK_CROPS)}, found {text!r}")
    return text


@dataclass
class CtfRefineParams(ParticleInputs):
    """Options of "Tomo CTF refinement" (relion_tomo_refine_ctf flags, plus ours)."""

    ref1: str | None = option(None, "--ref1", help="Half map 1 (default: the --ios one).")
    ref2: str | None = option(None, "--ref2", help="Half map 2 (default: the --ios one).")
    mask: str | None = option(
        None, "--mask", help="Reference mask (required; default: the --ios one)."
    )
    do_defocus: bool = option(
        True, "--do_defocus/--no_defocus", help="Fit the defocus of every tilt."
    )
    d0: float = option(-3000.0, "--d0", help="Lowest defocus change tried.", unit="Å")
    d1: float = option(3000.0, "--d1", help="Highest defocus change tried.", unit="Å")
    defocus_steps: int = option(100, "--defocus_steps", help="Steps from --d0 to --d1.")
    sigma_tilt_defocus: float = option(
        500.0, "--sigma_tilt_defocus",
        help="σ of the prior on each tilt's defocus about its CTF estimate; <= 0: none.",
        unit="Å",
    )  # fmt: skip
    do_reg_defocus: bool = option(
        False, "--do_reg_defocus", help="Pull the tilts' defoci towards their mean."
    )
    reg_lambda: float = option(
        1e-5, "--lambda", help="Weight of --do_reg_defocus, per particle.", unit="1/Å²"
    )
    astigmatism: str = option(
        "series", "--astigmatism", help="Astigmatism change: none | series | tilt.",
        parse=_astigmatism,
    )  # fmt: skip
    kmin: float = option(30.0, "--kmin", help="Lowest resolution used.", unit="Å")
    do_scale: bool = option(True, "--do_scale/--no_scale", help="Fit the scale of every tilt.")
    per_frame_scale: bool = option(
        False, "--per_frame_scale", help="Keep the per-tilt scales (no Beer–Lambert fit)."
    )
    per_tomogram_scale: bool = option(
        False, "--per_tomogram_scale", help="Beer–Lambert amplitude per tomogram, not global."
    )
    per_particle_defocus: bool = option(
        False, "--per_particle_defocus", help="Also fit each particle's defocus (§23)."
    )
    sigma_particle_defocus: float = option(
        300.0, "--sigma_particle_defocus", help="σ of the per-particle defocus prior.", unit="Å"
    )
    bias_correction: bool = option(
        True, "--bias_correction/--no_bias_correction",
        help="Correct the fits by simulated data (the circle crop's bias, §23).",
    )  # fmt: skip
    reference_spectrum: bool = option(
        False, "--reference_spectrum/--no_reference_spectrum",
        help="Fit the reference's smooth radial gain relative to the data first and keep "
        "each series' mean defocus (§23): for half maps from the data with --kmin near the "
        "first CTF lobe (e.g. 100 Å).",
    )  # fmt: skip
    do_even_aberrations: bool = option(
        False, "--do_even_aberrations",
        help="Fit the symmetrical aberrations of each optics group (rlnEvenZernike).",
    )  # fmt: skip
    ne: int = option(4, "--ne", help="Highest radial order of the even Zernike polynomials.")
    do_odd_aberrations: bool = option(
        False, "--do_odd_aberrations",
        help="Fit the antisymmetrical aberrations of each optics group (rlnOddZernike).",
    )  # fmt: skip
    no: int = option(3, "--no", help="Highest radial order of the odd Zernike polynomials.")
    stack_crop: str = option(
        "auto", "--stack_crop",
        help="How Extract circle-cropped the 2D stacks: post (after the CTF, RELION's "
        "default), pre (--circle_precrop --no_circle_crop), both, none; auto: from the "
        "Extract job's job.star next to the stacks, else post.",
        parse=_stack_crop,
    )  # fmt: skip
    batch_size: int = option(32, "--batch", help="Particles per batch.")
    memory_gb: float = option(2.0, "--memory-gb", help="Stacks kept in memory", unit="GB")
    device: str = device_option()
    continue_from: str | None = option(
        None, "--continue",
        help="Resume a ctf-refine job directory after its last finished tilt series, with the "
        "options it ran with (only --device may change).",
    )  # fmt: skip
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


_CROP_TEXT = {
    "post": "after the CTF (RELION's default)", "pre": "before the CTF (--circle_precrop)",
    "both": "before and after the CTF", "none": "not at all",
}  # fmt: skip


def stack_crop(parts: ParticleSet) -> str:
    """How the 2D stacks of ``parts`` were circle-cropped (§5.2 steps 2 and 7): ``"post"``
    (after the CTF premultiplication, RELION's default), ``"pre"`` (the raw patch before
    it), ``"both"`` or ``"none"``, from the ``no_circle_crop`` and ``circle_precrop`` options
    of the Extract job's job.star in a folder above the first stack (``<job>/Subtomograms/
    ...``); ``"post"`` when there is none or it lacks them (a RELION job: its defaults)."""
    names = parts.particles.get("rlnImageName")
    if names is None or not len(names):
        return "post"
    folder = Path(str(names.iloc[0]).split("@")[-1]).parent
    for directory in (folder, *folder.parents):
        path = directory / "job.star"
        if path.is_file():
            break
    else:
        return "post"
    try:
        values = read_job_options(path)
    except (InputError, ValueError, KeyError) as exc:
        log.warning("%s: %s; assuming the stacks were circle-cropped after the CTF", path, exc)
        return "post"
    post = values.get("no_circle_crop", "No").lower() not in ("yes", "true", "1")
    pre = values.get("circle_precrop", "No").lower() in ("yes", "true", "1")
    crop = {(True, False): "post", (False, True): "pre", (True, True): "both"}
    return crop.get((post, pre), "none")


def _resume(params: CtfRefineParams) -> tuple[CtfRefineParams, dict[str, TomogramResult]]:
    """The stored options and finished tilt series of ``--continue <job dir>``."""
    if not params.continue_from:
        return params, {}
    directory = Path(params.continue_from)
    path = directory / CHECKPOINT
    if not path.is_file():
        raise InputError(f"no {CHECKPOINT}: not a ctf-refine job directory", file=directory)
    state = load_checkpoint(path)
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in state["params"].items()}
    stored.update(continue_from=str(directory), output_dir=str(directory), device=params.device)
    if "no_bias_correction" in stored:  # a job of a version before --bias_correction
        stored["bias_correction"] = not stored.pop("no_bias_correction")
    done = {
        name: TomogramResult(
            name=name, **{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in r.items()}
        )
        for name, r in state["results"].items()
    }
    return CtfRefineParams(**stored), done


def _save(path: Path, params: CtfRefineParams, done: dict[str, TomogramResult]) -> None:
    results = {
        name: {
            f.name: torch.from_numpy(np.asarray(getattr(r, f.name)))
            for f in dataclasses.fields(r)
            if f.name != "name"
        }
        for name, r in done.items()
    }
    if is_main():
        save_checkpoint(path, {"params": dataclasses.asdict(params), "results": results})


def _options(params: CtfRefineParams) -> CtfRefineOptions:
    if params.d1 < params.d0 or params.defocus_steps < 1:
        raise InputError(f"need --d0 <= --d1 and --defocus_steps >= 1 (got {params.d0:g}, "
                         f"{params.d1:g}, {params.defocus_steps})")  # fmt: skip
    if params.per_particle_defocus and params.sigma_particle_defocus <= 0:
        raise InputError("--sigma_particle_defocus must be > 0")
    if (params.do_even_aberrations and params.ne < 0) or (
        params.do_odd_aberrations and params.no < 1
    ):
        raise InputError(f"need --ne >= 0 and --no >= 1 (got {params.ne}, {params.no})")
    return CtfRefineOptions(
        do_defocus=params.do_defocus, d0=params.d0, d1=params.d1, steps=params.defocus_steps,
        astigmatism=params.astigmatism,
        reg_lambda=params.reg_lambda if params.do_reg_defocus else None,
        sigma_tilt=params.sigma_tilt_defocus if params.sigma_tilt_defocus > 0 else None,
        do_scale=params.do_scale, per_particle=params.per_particle_defocus,
        sigma_particle=params.sigma_particle_defocus,
        correct_bias=params.bias_correction,
        reference_spectrum=params.reference_spectrum,
        even_aberrations=zernike_count(params.ne, "even") if params.do_even_aberrations else 0,
        odd_aberrations=zernike_count(params.no, "odd") if params.do_odd_aberrations else 0,
    )  # fmt: skip


def run(params: CtfRefineParams) -> dict[str, str]:
    """Run (or continue) the job; returns ``{output path: RELION node type}``."""
    params, done = _resume(params)
    options = _options(params)
    device = resolve_device(params.device)
    parts, tomos, _, opt = read_particle_inputs(params.ios, params.particles, params.tomograms)
    pixel = pixel_size_of(parts)
    if params.ref1:
        maps = read_half_maps(params.ref1, params.ref2, None, params.mask, -1.0, device)
    else:
        maps = read_half_maps(None, None, params.ios, params.mask, -1.0, device)
    if maps.mask is None:  # as RELION: unmasked maps put noise and neighbours in the model
        raise InputError(
            "CTF refinement needs a reference mask: give --mask (or an optimisation set with "
            "rlnTomoReferenceMaskFile)",
            file=params.ios,
        )
    if abs(maps.pixel_size - pixel) > 1e-3 * pixel:
        raise InputError(
            f"half maps have {maps.pixel_size:.4f} Å/px, the particle stacks {pixel:.4f}",
            file=maps.path1,
        )
    box = int(parts.image_size()[0])
    loader = StackLoader(
        parts, tomos, batch_size=params.batch_size, cache_bytes=params.memory_gb * 2**30
    )
    halves = torch.stack([maps.half1, maps.half2]).float() * maps.mask
    weight, last = fsc_weights(halves, pixel, kmin_angst=params.kmin)
    crop = stack_crop(parts) if params.stack_crop == "auto" else params.stack_crop
    predictor = TiltPredictor(
        loader, halves, max_shell=last, device=device, circle_cropped=crop in ("post", "both"),
        precropped=crop in ("pre", "both"),
    )  # fmt: skip
    inputs = {str(opt.particles): "ParticleGroupMetadata.star.relion.tomo",
              str(opt.tomograms): "TomogramGroupMetadata.star.relion.tomo",
              str(maps.path1): "DensityMap.mrc.halfmap"}  # fmt: skip
    with run_job(
        "CtfRefine", params, output_dir=params.output_dir, project_dir=params.project_dir,
        is_continue=bool(params.continue_from), inputs=inputs,
    ) as (job, outputs):  # fmt: skip
        log.info(
            "CTF refinement of %d particles in %d tilt series, box %d at %.3f Å/px, up to "
            "%.1f Å (FSC 0.143 of the half maps), stacks circle-cropped: %s%s",
            len(parts), len(dict.fromkeys(parts.tomo_names)), box, pixel,
            box * pixel / max(last, 1), _CROP_TEXT[crop],
            f"; {len(done)} done before" if done else "",
        )  # fmt: skip
        state = ParticleState.from_particles(parts)
        for name in map(str, dict.fromkeys(parts.tomo_names)):
            if name in done:
                continue
            rows = np.flatnonzero(parts.tomo_names == name)
            done[name] = refine_tomogram(
                predictor, state, name, rows, weight, options, tomos[name].defocus_estimate
            )
            _save(job.path(CHECKPOINT), params, done)
        ice = _scales(params, tomos, done)
        optics = _aberrations(options, parts, done, predictor.points.freq / pixel)
        _write(job, outputs, params, parts, optics, tomos, opt, maps, done)
        summary = _report(job, tomos, done, ice)
        if optics is not None and is_main():
            summary.update(_aberration_report(job, optics, pixel))
        write_job_report(job, outputs, summary=summary, tables=_tables(tomos, done))
    return outputs


def _scales(
    params: CtfRefineParams, tomos: TomogramSet, done: dict[str, TomogramResult]
) -> dict[str, IceFit]:
    """Replace the per-tilt scales by the Beer–Lambert model (unless kept per tilt)."""
    if not params.do_scale or params.per_frame_scale or not done:
        return {}
    names = list(done)
    fits, scales = fit_ice_scale(
        [tomos[n].projection_matrices()[:, :3, :3] for n in names],
        [torch.from_numpy(done[n].cross) for n in names],
        [torch.from_numpy(done[n].power) for n in names],
        [torch.from_numpy(done[n].scale_before) for n in names],
        per_tomogram=params.per_tomogram_scale,
    )
    for name, fit, scale in zip(names, fits, scales, strict=True):
        log.info(
            "%s: Beer–Lambert a = %.3f, κ = %.3f (ice %.2f mean free paths), normal %.1f°",
            name, fit.amplitude, fit.kappa, fit.thickness_mfp, fit.normal_deg,
        )  # fmt: skip
        done[name].scale = scale.numpy()
    return dict(zip(names, fits, strict=True))


def _aberrations(
    options: CtfRefineOptions,
    parts: ParticleSet,
    done: dict[str, TomogramResult],
    freq_angst: torch.Tensor,
) -> pd.DataFrame | None:
    """The optics table with each group's aberrations refined (``None`` without): the sums
    of its tilt series fitted (:func:`~subtomo.tomorefine.ctf.fit_aberrations`), less the fit
    of the simulations' sums (the bias), added to the coefficients the stacks were made with.
    ``freq_angst`` ``(K, 2)`` the points' frequencies in 1/Å."""
    n_even, n_odd = options.even_aberrations, options.odd_aberrations
    if not (n_even or n_odd):
        return None
    optics = parts.optics.copy()
    groups = parts.optics_rows()
    totals: dict[int, list[AberrationSums]] = {}
    for name, result in done.items():
        sums = [
            AberrationSums(*torch.from_numpy(x).split([2, 2, 3])) for x in result.aberration_sums
        ]
        group = int(groups[np.flatnonzero(parts.tomo_names == name)[0]])
        if group in totals:
            totals[group] = [a + b for a, b in zip(totals[group], sums, strict=True)]
        else:
            totals[group] = sums
    kx, ky = freq_angst[:, 0], freq_angst[:, 1]
    for column, count in (("rlnEvenZernike", n_even), ("rlnOddZernike", n_odd)):
        if count and column not in optics.columns:  # groups without particles keep zeros
            optics[column] = format_vector([0] * count)
    for group, sums in totals.items():
        even, odd = fit_aberrations(sums[0], kx, ky, n_even, n_odd)
        if len(sums) > 1:  # the bias of the fit, measured on the simulated data
            bias_even, bias_odd = fit_aberrations(sums[1], kx, ky, n_even, n_odd)
            even, odd = even - bias_even, odd - bias_odd
        for column, change in (("rlnEvenZernike", even), ("rlnOddZernike", odd)):
            if not len(change):
                continue
            current = parse_vector(optics.at[group, column])
            new = np.zeros(max(len(current), len(change)))
            new[: len(current)] += current
            new[: len(change)] += change.numpy()
            optics.at[group, column] = format_vector(np.round(new, 6))
        log.info(
            "optics group %s: aberrations changed by even %s, odd %s (rad)",
            optics["rlnOpticsGroup"].iloc[group] if "rlnOpticsGroup" in optics else group + 1,
            np.round(even.numpy(), 3).tolist(), np.round(odd.numpy(), 3).tolist(),
        )  # fmt: skip
    return optics


def _write(job, outputs, params, parts, optics, tomos, opt, maps, done) -> None:
    """tomograms.star (+ tilt_series/), particles.star if per-particle defoci or aberrations
    were fitted (``optics`` not ``None``), optimisation_set."""
    tables = {}
    for series in tomos:
        table = series.tilts.copy()
        table[DEFOCUS_ESTIMATE] = series.defocus_estimate
        if series.name in done:
            r = done[series.name]
            table["rlnDefocusU"], table["rlnDefocusV"] = r.defocus_u, r.defocus_v
            table["rlnDefocusAngle"], table["rlnCtfScalefactor"] = r.defocus_angle, r.scale
        tables[series.name] = table
    tomo_path = job.path("tomograms.star")
    if is_main():
        TomogramSet.from_tables(tomos.global_table, tables).write(
            tomo_path, job.path("tilt_series")
        )
    outputs[job.alias + "tomograms.star"] = "TomogramGroupMetadata.star.relion.tomo.ctfrefine"
    particles_path = opt.particles
    if params.per_particle_defocus or optics is not None:
        table = parts.particles.copy()
        if params.per_particle_defocus:
            offsets = parts.defocus_offsets().numpy().copy()
            for r in done.values():
                offsets[r.rows] += r.particle_delta
            table[DEFOCUS_OFFSET] = offsets
        particles_path = job.path("particles.star")
        if is_main():
            ParticleSet.from_tables(
                table, parts.optics if optics is None else optics, general=parts.general
            ).write(particles_path)
        outputs[job.alias + "particles.star"] = "ParticleGroupMetadata.star.relion.tomo.ctfrefine"
    out = OptimisationSet(
        particles=Path(relative_to_cwd(particles_path)), tomograms=Path(relative_to_cwd(tomo_path)),
        trajectories=opt.trajectories, reference_map1=maps.path1, reference_map2=maps.path2,
        reference_mask=maps.mask_path, reference_fsc=opt.reference_fsc,
    )  # fmt: skip
    path = job.path("optimisation_set.star")
    if is_main():
        out.write(path)
    outputs[job.alias + "optimisation_set.star"] = "TomoOptimisationSet.star.relion.tomo.ctfrefine"


def _mean_defocus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.asarray(u) + np.asarray(v)) / 2


def _report(job, tomos: TomogramSet, done: dict[str, TomogramResult], ice: dict) -> dict:
    """Plots (defocus and scale against tilt, per-particle defoci) and summary lines."""
    summary: dict[str, object] = {}
    if not is_main() or not done:
        return summary
    defocus, scale = {}, {}
    for name, r in done.items():
        series = tomos[name]
        tilt = np.asarray(series.tilts.get("rlnTomoYTilt", np.arange(series.n_tilts)))
        before = _mean_defocus(series.defocus_u, series.defocus_v)
        defocus[f"{name} before"] = (tilt, before)
        defocus[f"{name} after"] = (tilt, _mean_defocus(r.defocus_u, r.defocus_v))
        raw = r.scale_before * np.where(r.power > 0, r.cross / np.maximum(r.power, 1e-300), 1)
        scale[f"{name} per tilt"] = (tilt, raw)
        if name in ice:
            order = np.argsort(tilt)
            scale[f"{name} Beer–Lambert"] = (tilt[order], r.scale[order])
            fit = ice[name]
            summary[f"{name} ice"] = (
                f"κ = {fit.kappa:.3f} ({fit.thickness_mfp:.2f} mean free paths; "
                f"~{fit.thickness_mfp * 320:.0f} nm at 300 kV), normal {fit.normal_deg:.1f}°, "
                f"a = {fit.amplitude:.3f}"
            )
        summary[f"{name} defocus change"] = (
            f"mean {r.delta.mean():+.0f} Å, RMS {np.sqrt((r.delta**2).mean()):.0f} Å"
        )
        summary[f"{name} likelihood widened (κ², empirical Bayes)"] = (
            f"tilts {float(r.kappa2_tilts):.2f}, particles {float(r.kappa2_particles):.2f}"
        )
    plot_xy(job.path("defocus_per_tilt.png"), defocus, xlabel="tilt (°)",
            ylabel="mean defocus (Å)", title="defocus per tilt")  # fmt: skip
    plot_xy(job.path("scale_per_tilt.png"), scale, xlabel="tilt (°)",
            ylabel="rlnCtfScalefactor", title="scale per tilt")  # fmt: skip
    changes = np.concatenate([r.particle_delta for r in done.values()])
    if len(changes):
        summary["per-particle defocus change"] = (
            f"RMS {np.sqrt((changes**2).mean()):.0f} Å over {len(changes)} particles"
        )
    return summary


def _aberration_report(job, optics: pd.DataFrame, pixel: float) -> dict[str, str]:
    """Summary lines (each group's coefficients) and ``aberrations.png``: the even and odd
    phase (rad) of each optics group over the frequency plane up to Nyquist (centred)."""
    summary, images = {}, {}
    k = torch.fft.fftshift(torch.fft.fftfreq(128, pixel, dtype=torch.float64))  # to Nyquist
    kx, ky = k[None].expand(128, -1), k[:, None].expand(-1, 128)
    for row in range(len(optics)):
        group = optics["rlnOpticsGroup"].iloc[row] if "rlnOpticsGroup" in optics else row + 1
        for column, parity in (("rlnEvenZernike", "even"), ("rlnOddZernike", "odd")):
            if column not in optics.columns:
                continue
            values = parse_vector(optics[column].iloc[row])
            summary[f"optics group {group} {column} (rad)"] = optics[column].iloc[row]
            images[f"group {group}, {parity} phase"] = aberration_phase(values, parity, kx, ky)
    plot_images(job.path("aberrations.png"), images, title="aberrations (rad), kx to the right",
                cmap="RdBu_r", symmetric=True)  # fmt: skip
    return summary


def _tables(tomos: TomogramSet, done: dict[str, TomogramResult]) -> dict[str, list[dict]]:
    """Per tilt series: its tilts' defocus and scale before and after."""
    tables = {}
    for name, r in done.items():
        series = tomos[name]
        tilt = np.asarray(series.tilts.get("rlnTomoYTilt", np.full(series.n_tilts, np.nan)))
        columns = zip(
            tilt, _mean_defocus(series.defocus_u, series.defocus_v),
            _mean_defocus(r.defocus_u, r.defocus_v), r.scale_before, r.scale, strict=True,
        )  # fmt: skip
        tables[f"{name}: per tilt"] = [
            {
                "tilt (°)": f"{t:.1f}",
                "defocus before (Å)": f"{b:.0f}",
                "defocus after (Å)": f"{a:.0f}",
                "scale before": f"{s0:.3f}",
                "scale after": f"{s1:.3f}",
            }
            for t, b, a, s0, s1 in columns
        ]
    return tables
