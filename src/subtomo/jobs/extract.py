"""Extract subtomos: pseudo-subtomograms for every particle (``relion_tomo_subtomo``).

For each tilt series (one in memory at a time) and each particle, the visible tilts are cut,
binned, centred, premultiplied by ``-CTF · dose`` and written as a 2D stack
(``Subtomograms/<particle>_stack2d.mrcs``) or splatted into a RELION-4 style 3D
pseudo-subtomogram (``_data.mrc`` + ``_weights.mrc``). Writes ``particles.star`` (offsets
applied unless asked not to) and ``optimisation_set.star`` into ``Extract/jobNNN/``.
Under torch.distributed the tomograms (or, with fewer tomograms than ranks, each tomogram's
particles) are shared out; each rank writes its particles' files, rank 0 the STAR files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from subtomo.ctf import dose_cutoff_mask
from subtomo.data import (
    OptimisationSet,
    ParticleSet,
    TiltSeries,
    TomogramSet,
    prefetched_tilt_images,
    read_particle_inputs,
    relative_to_cwd,
    require_box_fits,
)
from subtomo.device import resolve_device
from subtomo.distributed import all_gather_object, own_files, shard_groups
from subtomo.errors import InputError
from subtomo.fourier import irfft_centered
from subtomo.geometry import matrix_to_euler
from subtomo.io import format_vector, write_mrc
from subtomo.project import run_job, write_job_report
from subtomo.project.options import ParticleInputs, device_option, option, output_dir_option
from subtomo.reconstruct.extraction import circle_crop, cone_weights, splat_slices
from subtomo.reconstruct.parallel import cpu_workers, map_batches
from subtomo.reconstruct.particles import (
    ctf_of_tilt_series,
    extract_slices,
    premultiply_filter,
    series_geometry,
    visible_frames,
)

__all__ = ["ExtractParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class ExtractParams(ParticleInputs):
    """Options of "Extract subtomos" (RELION GUI field / program flag names)."""

    box: int = option(64, "--box", "--b", help="Box size (binned).", unit="px")
    crop: int = option(-1, "--crop", help="Cropped box size (binned); <= 0: the box.", unit="px")
    binning: float = option(1.0, "--bin", help="Binning factor (real-valued).")
    stack2d: bool = option(True, "--stack2d/--3d", help="2D stacks or 3D pseudo-subtomograms.")
    float16: bool = option(True, "--float16/--float32", help="Half-precision MRC.")
    max_dose: float = option(
        -1.0, "--max_dose", help="Drop tilts above this dose; <= 0: none.", unit="e/Å²"
    )
    min_frames: int = option(1, "--min_frames", help="Minimum visible tilts.")
    apply_offsets: bool = option(
        True, "--apply_offsets/--dont_apply_offsets", help="Fold origins into coordinates."
    )
    apply_orientations: bool = option(
        False, "--apply_orientations", help="Fold the particle angles into the subtomograms."
    )
    cone_weight: bool = option(False, "--cone_weight", help="Cone weighting (3D only).")
    cone_angle: float = option(10.0, "--cone_angle", help="Angle of the weighted cone.", unit="deg")
    cone_sig0: float = option(
        2.0, "--cone_sig0", help="Cone width at the origin.", unit="Fourier px"
    )
    no_ctf: bool = option(False, "--no_ctf", help="Do not premultiply with the CTF.")
    no_ic: bool = option(False, "--no_ic", help="Do not invert contrast.")
    no_circle_crop: bool = option(False, "--no_circle_crop", help="No circular crop.")
    circle_precrop: bool = option(
        False, "--circle_precrop", help="Circle-crop each patch before the CTF, too."
    )
    batch_size: int = option(1024, "--batch", help="Tilt images per batch.")
    device: str = device_option()
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def _output_name(particle: str, tomo: str) -> str:
    return particle if "/" in particle else f"{tomo}/{particle}"


def _stack_images(params: ExtractParams, data: torch.Tensor, box: int, crop: int) -> np.ndarray:
    """Premultiplied spectra ``(b, box, box//2+1)`` of images centred at ``box//2``
    (``extract_slices(centre_at_origin=False)``) -> circle-cropped ``(b, crop, crop)``
    float32 images (one batched transform for all the stacks of a batch)."""
    images = torch.fft.irfftn(data, s=(box, box))
    if params.binning != 1:
        images /= params.binning
    if not params.no_circle_crop:
        images = circle_crop(images, crop / 2)
    lo = box // 2 - crop // 2
    return images[:, lo : lo + crop, lo : lo + crop].cpu().numpy()


def _write_3d(
    params: ExtractParams,
    sums: torch.Tensor,
    matrix: torch.Tensor,
    box: int,
    crop: int,
    pixel: float,
    root: Path,
) -> None:
    """``(3, c, c, c//2+1)`` sums -> ``_data.mrc`` (real) and ``_weights.mrc`` (§5.4)."""
    if params.cone_weight:
        sums = sums * cone_weights(crop, matrix[None].float(), params.cone_angle, params.cone_sig0)
    data = irfft_centered(sums[0], (crop,) * 3) * (box / (crop * params.binning**0.5))
    weights = torch.cat([sums[1].real, sums[2].real])  # (2c, c, c//2+1)
    write_mrc(root.with_name(root.name + "_data.mrc"), data, pixel, float16=params.float16)
    write_mrc(
        root.with_name(root.name + "_weights.mrc"), weights, 1.0 / pixel, float16=params.float16
    )


def _extract_series(
    params: ExtractParams,
    parts: ParticleSet,
    series: TiltSeries,
    images: torch.Tensor,
    motion,
    out_dir: Path,
    device: torch.device,
    advance,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Extract the particles of one series from its tilt ``images`` ``(t, h, w)``; returns
    (kept mask, visible vectors, names)."""
    box = params.box
    crop = params.crop if params.crop > 0 else box
    size = (images.shape[-1], images.shape[-2])
    geo = series_geometry(parts, series, motion, size)
    visible = visible_frames(geo.uv, size, params.binning * crop / 2)
    if params.max_dose > 0:
        dose = torch.as_tensor(series.pre_exposure)
        visible &= (dose <= params.max_dose)[None]
    keep = visible.sum(dim=1) >= params.min_frames
    ctf = ctf_of_tilt_series(series, parts)
    mats = geo.matrices(include_particle=params.apply_orientations).float()
    pixel = params.binning * series.pixel_size
    names = parts.particles["rlnTomoParticleName"].astype(str).tolist()
    kept = np.flatnonzero(keep.numpy())
    workers = cpu_workers(device, len(kept))
    per_batch = max(1, params.batch_size // max(series.n_tilts, 1) // workers)
    chunks = [kept[k : k + per_batch] for k in range(0, len(kept), per_batch)]
    written: dict[int, str] = {}  # particle index -> file (workers write distinct keys)

    def extract_chunk(_worker: int, chunk_np: np.ndarray) -> None:
        chunk = torch.from_numpy(chunk_np)
        pairs = visible[chunk].nonzero()  # (m, 2): local particle, frame
        p, f = chunk[pairs[:, 0]].to(device), pairs[:, 1].to(device)
        data, weight = extract_slices(
            images, f, geo.uv.to(device)[p, f], geo.depth.to(device)[p, f], ctf,
            box=box, binning=params.binning, precrop=params.circle_precrop, no_ctf=params.no_ctf,
            invert_contrast=not params.no_ic, centre_at_origin=not params.stack2d,
        )  # fmt: skip
        if not params.stack2d:
            _, dose = premultiply_filter(ctf, f, geo.depth.to(device)[p, f], box, params.binning)
            sums = splat_slices(
                data, weight, mats.to(device)[p, f], pairs[:, 0].to(device), crop,
                scale=crop / box, mask=dose_cutoff_mask(dose),
            )  # fmt: skip
        else:
            stacks = _stack_images(params, data, box, crop)  # rows grouped by particle
            ends = np.cumsum(visible[chunk].sum(dim=1).numpy())
        for j, i in enumerate(chunk.tolist()):
            root = out_dir / "Subtomograms" / _output_name(names[i], series.name)
            if params.stack2d:
                path = root.with_name(root.name + "_stack2d.mrcs")
                start_row = ends[j - 1] if j else 0
                write_mrc(path, stacks[start_row : ends[j]], pixel, float16=params.float16)
            else:
                _write_3d(params, sums[j], geo.a_sub[i] @ geo.a_part[i], box, crop, pixel, root)
                path = root.with_name(root.name + "_data.mrc")
            written[i] = relative_to_cwd(path)
        advance(len(chunk))

    map_batches(extract_chunk, chunks, workers)
    files = [written[i] for i in kept.tolist()]
    vectors = [format_vector(visible[i].int().tolist()) for i in kept.tolist()]
    return keep.numpy(), files, vectors


def _updated_particles(
    params: ExtractParams, parts: ParticleSet, files: list[str], vectors: list[str]
) -> ParticleSet:
    """The extracted particles with image names, visibility, offsets and optics (§2, §5.5)."""
    table = parts.particles.copy()
    centred = parts.centered_coordinates_angst()
    a_sub = parts.subtomogram_matrices()
    if params.apply_offsets:
        centred = centred - (a_sub @ parts.origins_angst()[..., None])[..., 0]
        for a in "XYZ":
            table[f"rlnOrigin{a}Angst"] = 0.0
    for k, a in enumerate("XYZ"):
        table[f"rlnCenteredCoordinate{a}Angst"] = centred[:, k].numpy()
    table = table.drop(columns=[f"rlnCoordinate{a}" for a in "XYZ"], errors="ignore")
    if params.apply_orientations:
        angles = matrix_to_euler(a_sub @ parts.particle_matrices()).numpy()
        for k, a in enumerate(("Rot", "Tilt", "Psi")):
            table[f"rlnTomoSubtomogram{a}"] = angles[:, k]
            table[f"rlnAngle{a}"] = 0.0
    table["rlnImageName"] = files
    if params.stack2d:
        table["rlnTomoVisibleFrames"] = vectors
        table = table.drop(columns=["rlnCtfImage"], errors="ignore")
    else:
        table["rlnCtfImage"] = [f.replace("_data.mrc", "_weights.mrc") for f in files]
    optics = parts.optics.copy()
    crop = params.crop if params.crop > 0 else params.box
    optics["rlnImagePixelSize"] = optics["rlnTomoTiltSeriesPixelSize"] * params.binning
    optics["rlnImageSize"] = crop
    optics["rlnImageDimensionality"] = 2 if params.stack2d else 3
    optics["rlnTomoSubtomogramBinning"] = params.binning
    optics["rlnCtfDataAreCtfPremultiplied"] = 0 if (params.stack2d and params.no_ctf) else 1
    general = {**parts.general, "rlnTomoSubTomosAre2DStacks": int(params.stack2d)}
    return ParticleSet(table, optics, general)


def _check_box(params: ExtractParams, parts: ParticleSet, tomos: TomogramSet) -> None:
    """``InputError`` for a box, crop or binning that leaves nothing to extract."""
    if params.box <= 0 or params.binning <= 0:
        raise InputError(f"--box and --bin must be > 0 (got {params.box}, {params.binning:g})")
    crop = params.crop if params.crop > 0 else params.box
    if crop > params.box:
        raise InputError(f"--crop {crop} is larger than --box {params.box}")
    option = f"--box {params.box}" + (f" (--crop {crop})" if crop != params.box else "")
    require_box_fits(parts, tomos, params.binning * crop, f"{option} at --bin {params.binning:g}")


def run(params: ExtractParams) -> dict[str, str]:
    """Run the job; returns ``{output path: RELION node type}``."""
    device = resolve_device(params.device)
    parts, tomos, motion, opt = read_particle_inputs(
        params.ios, params.particles, params.tomograms, params.trajectories
    )
    _check_box(params, parts, tomos)
    inputs = {str(opt.particles): "ParticleGroupMetadata.star.relion.tomo"}
    with run_job(
        "Extract", params, output_dir=params.output_dir, project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):  # fmt: skip
        log.info(
            "Extracting %d particles as %s: box %d, crop %d, bin %g",
            len(parts), "2D stacks" if params.stack2d else "3D subtomograms", params.box,
            params.crop if params.crop > 0 else params.box, params.binning,
        )  # fmt: skip
        kept = np.zeros(len(parts), dtype=bool)
        files = [""] * len(parts)
        vectors = [""] * len(parts)
        names = parts.tomo_names
        groups = shard_groups([(t, np.flatnonzero(names == t)) for t in dict.fromkeys(names)])
        mine = []  # (rows kept, files, visible vectors) of this rank's tomograms
        with Progress(transient=True) as bar, own_files():
            task = bar.add_task("extracting particles", total=sum(len(r) for _, r in groups))
            reading = prefetched_tilt_images([tomos[t] for t, _ in groups], device=device)
            for (_, rows), (series, images) in zip(groups, reading, strict=True):
                keep, f, v = _extract_series(
                    params, parts.subset(rows), series, images, motion, job.directory, device,
                    lambda n: bar.advance(task, n),
                )  # fmt: skip
                mine.append((rows[keep], f, v))
        for rows, f, v in (share for shares in all_gather_object(mine) for share in shares):
            kept[rows] = True
            for r, name, vec in zip(rows, f, v, strict=True):
                files[r], vectors[r] = name, vec
        if not kept.any():
            raise InputError(
                f"no particle has {params.min_frames} or more visible tilts (--min_frames) "
                "with the box inside the tilt images: nothing to extract",
                file=opt.particles,
            )
        if not kept.all():
            log.info(
                "Dropped %d particles with < %d visible tilts", (~kept).sum(), params.min_frames
            )
        sel = np.flatnonzero(kept)
        out = _updated_particles(
            params, parts.subset(sel), [files[i] for i in sel], [vectors[i] for i in sel]
        )
        star = job.path("particles.star")
        out.write(star)
        outputs[str(star)] = "ParticleGroupMetadata.star.relion.tomo"
        opt_out = OptimisationSet(
            particles=Path(relative_to_cwd(star)),
            tomograms=opt.tomograms,
            trajectories=opt.trajectories,
        )
        opt_path = job.path("optimisation_set.star")
        opt_out.write(opt_path)
        outputs[str(opt_path)] = "OptimisationSet.star.relion.tomo"
        write_job_report(job, outputs)
    return outputs
