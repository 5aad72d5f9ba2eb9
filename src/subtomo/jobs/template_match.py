"""Template matching (``subtomo template-match``, ``TemplateMatch/jobNNN/``): particles found
in reconstructed tomograms by an orientation search with a template (:mod:`subtomo.picking`).

For each tomogram of ``--i`` (a tomograms.star with rlnTomoReconstructedTomogram, e.g. from
``subtomo reconstruct-tomograms``): the template, resampled to the tomogram's voxel size,
filtered by the tomogram's transfer function (the missing wedge of the real tilts from the
projection matrices, the per-tilt CTF — its modulus for a phase-flipped tomogram — and the
dose) and masked (a sphere of the particle radius or ``--mask``), is correlated in every
orientation of a HEALPix/psi grid of ``--angular_step`` (one asymmetric unit of ``--sym``) with
local normalisation; each voxel keeps its best score and orientation. Peaks at least
``--exclusion`` apart, inside ``--tomogram_mask``, above the cut-off (``--cutoff``, or the
higher of pytom's Gaussian search-space rule and the fitted tail of the peak scores, both at
``--n_false`` expected false alarms per tomogram), at most ``--max_particles`` per tomogram,
become particles.

Writes ``tmatch/<name>_scores.mrc`` (best score), ``tmatch/<name>_rot.mrc``, ``_tilt.mrc``,
``_psi.mrc`` (its angles, degrees), ``particles.star`` (RELION 5: rlnTomoName,
rlnCenteredCoordinateX/Y/ZAngst from the binned voxel as §1.3 says, rlnAngleRot/Tilt/Psi of
the template's orientation, rlnAutopickFigureOfMerit = the score, and an optics table from
the tomograms) and ``report.html`` with each tomogram's peak-score histogram, fitted tail,
cut-offs and slices with the picks. Conventions: §17.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from subtomo.data import ParticleSet, TiltSeries, TomogramSet, read_map_checked
from subtomo.data.paths import resolve_path
from subtomo.device import resolve_device
from subtomo.errors import InputError
from subtomo.fourier import lowpass_map
from subtomo.geometry import matrix_to_euler, orientation_grid_by_step
from subtomo.io import read_mrc, read_mrc_header, write_mrc
from subtomo.masks import soft_sphere
from subtomo.picking import (
    false_alarm_cutoff,
    find_peaks,
    match_template,
    tail_cutoff,
    tilt_weights,
)
from subtomo.project import run_job, write_job_report
from subtomo.project.options import device_option, option, output_dir_option
from subtomo.report.picking import plot_peak_scores, plot_picks
from subtomo.simulate.maps import particle_radius_px, rescale_map
from subtomo.tilt.tomogram import series_ctf

__all__ = ["TemplateMatchParams", "run"]

log = logging.getLogger("subtomo")

_PIXEL_TOLERANCE = 1e-3  # relative difference of pixel sizes taken as equal


@dataclass
class TemplateMatchParams:
    """Options of "Template matching"."""

    i: str = option(..., "--i", "--t", help="tomograms.star with rlnTomoReconstructedTomogram.")
    template: str = option(..., "--template", help="Template map (MRC), protein white.")
    template_angpix: float = option(
        -1.0, "--template_angpix", help="Template pixel size; <= 0: the header's.", unit="Å"
    )
    invert: bool = option(
        True, "--invert/--no_invert", help="Invert the template (tomograms have protein dark)."
    )
    mask: str = option("", "--mask", help="Template mask (MRC, template's box); '': a sphere.")
    particle_diameter: float = option(
        -1.0, "--particle_diameter", help="Sphere mask and exclusion; <= 0: template's.", unit="Å"
    )
    angular_step: float = option(7.0, "--angular_step", help="Orientation step.", unit="deg")
    sym: str = option("C1", "--sym", help="Template symmetry (search one asymmetric unit).")
    lowpass: float = option(0.0, "--lowpass", help="Template low-pass; <= 0: none.", unit="Å")
    ctf: bool = option(True, "--ctf/--no_ctf", help="Weight the template by each tilt's CTF.")
    phase_flipped: bool = option(
        True, "--phase_flipped/--not_phase_flipped", help="Tomograms were CTF phase-flipped."
    )
    dose_weighting: bool = option(
        True, "--dose_weighting/--no_dose_weighting", help="Weight the template by tilt dose."
    )
    tomogram_mask: str = option(
        "", "--tomogram_mask", help="Where picks may lie (MRC); {name}: rlnTomoName; '': all."
    )
    cutoff: float = option(0.0, "--cutoff", help="Score cut-off; <= 0: from --n_false (automatic).")
    n_false: float = option(1.0, "--n_false", help="Expected false picks per tomogram.")
    exclusion: float = option(
        -1.0, "--exclusion", help="Least distance of picks; <= 0: particle radius.", unit="Å"
    )
    max_particles: int = option(1000, "--max_particles", help="Most picks per tomogram.")
    batch: int = option(4, "--batch", help="Orientations per batch (memory).")
    device: str = device_option()
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


@dataclass
class _Tomogram:
    """One tomogram checked: its series, file, voxel size (Å), binning and shape (zyx)."""

    series: TiltSeries
    path: Path
    voxel_size: float
    binning: float
    shape: tuple[int, int, int]
    mask_path: Path | None


def _tomogram(params: TemplateMatchParams, series: TiltSeries) -> _Tomogram:
    column = "rlnTomoReconstructedTomogram"
    if column not in series.row.index or pd.isna(series.row[column]):
        raise InputError(
            "no tomogram: run subtomo reconstruct-tomograms first",
            file=params.i, block="global", column=column,
        )  # fmt: skip
    path = resolve_path(str(series.row[column]), params.i)
    header = read_mrc_header(path)
    if len(header.shape) != 3 or min(header.shape) < 2:
        raise InputError(f"expected a 3D tomogram, found shape {header.shape}", file=path)
    px = series.pixel_size
    if "rlnTomoTomogramBinning" in series.row.index:
        binning = float(series.row["rlnTomoTomogramBinning"])
    elif header.voxel_size > 0:
        binning = header.voxel_size / px
    else:
        raise InputError("no rlnTomoTomogramBinning and no voxel size in the header", file=path)
    voxel = px * binning
    if header.voxel_size > 0 and abs(header.voxel_size - voxel) > _PIXEL_TOLERANCE * voxel:
        raise InputError(
            f"voxel size {header.voxel_size:g} Å in the header, but rlnTomoTiltSeriesPixelSize "
            f"x rlnTomoTomogramBinning = {voxel:g} Å",
            file=path,
        )
    if params.ctf and "rlnDefocusU" not in series.tilts.columns:
        raise InputError("no CTF (rlnDefocusU): give --no_ctf",
                         file=series.tilt_file, block=series.name)  # fmt: skip
    mask_path = None
    if params.tomogram_mask:
        mask_path = Path(params.tomogram_mask.replace("{name}", series.name))
        mask_volume, _ = read_mrc(mask_path)
        if tuple(mask_volume.shape) != header.shape:
            raise InputError(
                f"tomogram mask of shape {tuple(mask_volume.shape)} for a tomogram of "
                f"{header.shape}",
                file=mask_path,
            )
        if not bool((mask_volume > 0.5).any()):
            raise InputError("the tomogram mask is empty (no value above 0.5)", file=mask_path)
    return _Tomogram(series, path, voxel, binning, header.shape, mask_path)


def _resampled(
    volume: torch.Tensor, pixel: float, voxel: float, what: str, path: str
) -> torch.Tensor:
    """``volume`` at the tomogram's voxel size in the even box closest to the same physical
    size (``rescale_map`` logs a scale that is then not exact); an odd box is padded."""
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"{what} must be a cube, found shape {tuple(volume.shape)}", file=path)
    n = volume.shape[-1]
    if abs(pixel - voxel) <= _PIXEL_TOLERANCE * voxel:
        return volume if n % 2 == 0 else torch.nn.functional.pad(volume, (0, 1) * 3)
    box = max(2, 2 * round(n * pixel / voxel / 2))
    log.warning("%s resampled from %.4g to %.4g Å/px (box %d -> %d)", what, pixel, voxel, n, box)
    return rescale_map(volume, pixel, voxel, box)


def _template(params: TemplateMatchParams, voxel: float, device: torch.device):
    """The template and mask at ``voxel`` Å, the particle radius (voxels) and a line saying
    what was done to the template."""
    volume, pixel = read_map_checked(
        params.template, what="--template", angpix=params.template_angpix, varying=True
    )
    template = _resampled(volume, pixel, voxel, "the template", params.template)
    if params.lowpass > 0:
        template = lowpass_map(template, params.lowpass, voxel)
    n = template.shape[-1]
    if params.particle_diameter > 0:
        radius = params.particle_diameter / 2 / voxel
    else:
        radius = particle_radius_px(template.abs(), threshold=0.1)
    if params.mask:
        mask_volume, _ = read_map_checked(
            params.mask, what="--mask", mask=True, shape=volume.shape, against="--template"
        )
        mask = _resampled(mask_volume, pixel, voxel, "the mask", params.mask).clamp(0.0, 1.0)
        if float(mask.sum()) < 1.0:
            raise InputError("the mask is empty (its values sum to less than one voxel)",
                             file=params.mask)  # fmt: skip
    else:
        if radius <= 0:
            raise InputError("the template is empty: give --particle_diameter",
                             file=params.template)  # fmt: skip
        mask = soft_sphere((n,) * 3, min(radius, n / 2 - 2), 2.0)
    sign = -1.0 if params.invert else 1.0
    said = f"{volume.shape[-1]} voxels at {pixel:g} Å"
    if template.shape[-1] != volume.shape[-1] or abs(pixel - voxel) > _PIXEL_TOLERANCE * voxel:
        said += f", resampled to {template.shape[-1]} at {voxel:g} Å (the tomograms')"
    said += ", inverted" if params.invert else ""
    return (sign * template).to(device), mask.to(device), float(radius), said


def _weights(params: TemplateMatchParams, tomo: _Tomogram, box: int) -> torch.Tensor:
    """The tomogram's transfer function on the template box (tomogram frame)."""
    series = tomo.series
    size = series.tomogram_size
    # only the rotations are used: the image size (the translations) does not matter
    matrices = series.projection_matrices((size[0], size[1]))
    ctf = series_ctf(series) if params.ctf else None
    dose = torch.from_numpy(series.pre_exposure) if params.dose_weighting else None
    beta = series.bfactor_per_electron_dose or 0.0
    return tilt_weights(
        matrices[:, :3, :3], box, tomo.voxel_size, ctf=ctf,
        phase_flipped=params.phase_flipped, pre_exposure=dose,
        bfactor_per_electron_dose=beta,
    )  # fmt: skip


def _check(params: TemplateMatchParams) -> None:
    if params.batch < 1 or params.max_particles < 1 or not params.n_false > 0:
        raise InputError("--batch and --max_particles must be >= 1 and --n_false > 0")
    if not 0.1 <= params.angular_step <= 60:
        raise InputError(f"--angular_step must be in [0.1, 60] degrees, got {params.angular_step}")


def run(params: TemplateMatchParams) -> dict[str, str]:
    """Match the template in every tomogram; returns ``{output path: RELION node type}``."""
    _check(params)
    device = resolve_device(params.device)
    tomograms = TomogramSet.read(params.i, require_series=True)
    plans = [_tomogram(params, s) for s in tomograms]
    voxels = {round(p.voxel_size, 3) for p in plans}
    if len(voxels) != 1:
        raise InputError(f"tomograms of different voxel sizes {sorted(voxels)} Å", file=params.i)
    voxel = plans[0].voxel_size
    template, mask, radius, said = _template(params, voxel, device)
    box = template.shape[-1]
    for plan in plans:
        if box > min(plan.shape):
            raise InputError(
                f"the template ({box} voxels at {voxel:g} Å) is larger than the tomogram "
                f"{'x'.join(map(str, plan.shape[::-1]))}",
                file=plan.path,
            )
    _, matrices = orientation_grid_by_step(params.angular_step, params.sym)
    table = matrix_to_euler(matrices).float()  # (m, 3) rot, tilt, psi
    exclusion = params.exclusion / voxel if params.exclusion > 0 else radius
    inputs = {params.i: "TomogramGroupMetadata.star.relion.tomo", params.template: "DensityMap.mrc"}
    with run_job(
        "TemplateMatch",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        job.path("tmatch").mkdir(exist_ok=True)
        frames, rows, throughput = [], [], []
        with Progress(transient=True) as bar:
            task = bar.add_task("matching", total=len(plans) * len(matrices))
            for plan in plans:
                series = plan.series
                tomogram, _ = read_mrc(plan.path, device=device, finite=True)
                valid = None
                if plan.mask_path is not None:
                    valid = read_mrc(plan.mask_path, device=device)[0] > 0.5
                result = match_template(
                    tomogram, template, mask, matrices,
                    weights=_weights(params, plan, box).to(device),
                    spherical_mask=not params.mask, valid=valid, batch=params.batch,
                    progress=lambda k: bar.advance(task, k),
                )  # fmt: skip
                n_voxels = int(valid.sum()) if valid is not None else tomogram.numel()
                throughput.append(len(matrices) * tomogram.numel() / result.seconds)
                border = round(radius)
                _, every = find_peaks(result.scores, exclusion, -2.0, mask=valid,
                                      border=border, max_peaks=10**7)  # fmt: skip
                gauss = false_alarm_cutoff(result.sigma, n_voxels, len(matrices), params.n_false)
                tail = tail_cutoff(every.numpy(), params.n_false)
                cutoff = params.cutoff if params.cutoff > 0 else max(gauss, tail.cutoff)
                picks, values = find_peaks(
                    result.scores, exclusion, cutoff, mask=valid, border=border,
                    max_peaks=params.max_particles,
                )  # fmt: skip
                angles = table[result.orientation.cpu()]  # (d, h, w, 3)
                stem = f"tmatch/{series.name}"
                write_mrc(job.path(f"{stem}_scores.mrc"), result.scores, voxel)
                for k, name in enumerate(("rot", "tilt", "psi")):
                    write_mrc(job.path(f"{stem}_{name}.mrc"), angles[..., k], voxel)
                    outputs[job.alias + f"{stem}_{name}.mrc"] = "Image3D.mrc.angles"
                outputs[job.alias + f"{stem}_scores.mrc"] = "Image3D.mrc.scores"
                frames.append(_particles(series, plan, picks, values, angles))
                plot_peak_scores(
                    job.path(f"{series.name}_peak_scores.png"), every.numpy(),
                    tail=tail.expected, fit_range=(tail.low, tail.high),
                    cutoffs={"cut-off used": cutoff, "Gaussian search space": gauss,
                             "fitted tail": tail.cutoff},
                    title=f"{series.name}: peak scores",
                )  # fmt: skip
                plot_picks(
                    job.path(f"{series.name}_picks.png"), tomogram.cpu().numpy(),
                    result.scores.cpu().numpy(), picks.numpy(), exclusion, title=series.name,
                )  # fmt: skip
                rows.append({
                    "tomogram": series.name,
                    "voxels (x y z)": " ".join(map(str, plan.shape[::-1])),
                    "score σ": f"{result.sigma:.4f}",
                    "cut-off (Gaussian / tail / used)": f"{gauss:.3f} / {tail.cutoff:.3f} / "
                                                        f"{cutoff:.3f}",
                    "picks": len(picks),
                    "seconds": f"{result.seconds:.1f}",
                })  # fmt: skip
                log.info("%s: %d picks above %.3f", series.name, len(picks), cutoff)
                del tomogram, result, angles
        particles = ParticleSet(pd.concat(frames, ignore_index=True), tomograms=tomograms)
        particles.write(job.path("particles.star"))
        outputs[job.alias + "particles.star"] = "ParticleGroupMetadata.star.relion.tomo"
        summary = {
            "template": said,
            "orientations": f"{len(matrices)} ({params.angular_step:g}° step, {params.sym})",
            "particle radius": f"{radius * voxel:.0f} Å; exclusion {exclusion * voxel:.0f} Å",
            "throughput": f"{np.mean(throughput):.3g} orientations x voxels / s on {device}",
        }
        write_job_report(job, outputs, summary=summary, tables={"tomograms": rows})
    return outputs


def _particles(
    series: TiltSeries,
    plan: _Tomogram,
    picks: torch.Tensor,
    values: torch.Tensor,
    angles: torch.Tensor,
) -> pd.DataFrame:
    """The picks of one tomogram as RELION 5 particle rows (§1.3: binned voxel ``v`` is at
    ``b·v`` bin-1 px, ``C = (b·v − size/2)·px``)."""
    px, b = series.pixel_size, plan.binning
    size = np.asarray(series.tomogram_size, dtype=np.float64)
    zyx = picks.numpy().reshape(-1, 3)
    centred = (b * zyx[:, ::-1] - size / 2.0) * px
    eul = angles[tuple(picks.T)].double().numpy().reshape(-1, 3) if len(zyx) else np.zeros((0, 3))
    df = pd.DataFrame({"rlnTomoName": [series.name] * len(zyx)})
    for axis, col in enumerate("XYZ"):
        df[f"rlnCenteredCoordinate{col}Angst"] = centred[:, axis]
    for axis, col in enumerate(("Rot", "Tilt", "Psi")):
        df[f"rlnAngle{col}"] = eul[:, axis]
    df["rlnAutopickFigureOfMerit"] = values.double().numpy()
    return df
