"""Reconstruct particle: half1/half2/merged averages (``relion_tomo_reconstruct_particle``).

Reads an optimisation set (or particles + tomograms [+ trajectories]), inserts every visible
tilt of every particle into half-set Fourier accumulators — cut from the tilt series, or read
from already extracted 2D stacks when the tilt images are not available — symmetrises and
divides (Wiener or RELION's heuristic), and writes ``merged.mrc``, ``half1.mrc``, ``half2.mrc``
with ``data_<tag>.mrc`` and ``weight_<tag>.mrc`` into ``Reconstruct/jobNNN/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress

from subtomo.data import (
    ParticleSet,
    TiltSeries,
    TomogramSet,
    Trajectories,
    pixel_size_of,
    prefetched_tilt_images,
    read_particle_inputs,
    require_box_fits,
    stack_image_indices,
)
from subtomo.device import resolve_device
from subtomo.distributed import all_gather_object, barrier, own_files, shard, shard_groups
from subtomo.errors import InputError
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.io import read_mrc, write_mrc
from subtomo.project import run_job, write_job_report
from subtomo.project.options import ParticleInputs, device_option, option, output_dir_option
from subtomo.reconstruct import FourierAccumulator, reconstruct
from subtomo.reconstruct.parallel import cpu_workers, map_batches
from subtomo.reconstruct.particles import (
    ctf_of_tilt_series,
    insert_stacks,
    insert_tilt_series,
    series_geometry,
    visible_frames,
)

__all__ = ["ReconstructParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class ReconstructParams(ParticleInputs):
    """Options of "Reconstruct particle" (RELION GUI field / program flag names)."""

    box: int = option(0, "--box", "--b", help="Box size (binned); 0: the stacks' size.", unit="px")
    crop: int = option(-1, "--crop", help="Cropped box size (binned).", unit="px")
    binning: float = option(0.0, "--bin", help="Binning factor; 0: the stacks' binning (else 1).")
    sym: str = option("C1", "--sym", help="Point-group symmetry.")
    snr: float = option(-1.0, "--SNR", help="Wiener SNR; <= 0: RELION's heuristic.")
    taper: float = option(10.0, "--taper", help="Taper width.", unit="voxels")
    no_ctf: bool = option(False, "--no_ctf", help="Do not apply the CTF.")
    no_circle_crop: bool = option(
        False, "--no_circle_crop", help="No circular pre-crop of tilt-series patches."
    )
    cutoff_fract: float = option(0.01, "--cutoff_fract", help="Dose cut-off fraction.")
    source: str = option("auto", "--from", help="auto | tilt_series | stacks.")
    padding: float = 1.0  # Fourier oversampling (RELION's reconstruct_particle: none)
    batch_size: int = option(1024, "--batch", help="Tilt images per batch.")
    device: str = device_option()
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def _by_tomogram(parts: ParticleSet) -> list[tuple[str, np.ndarray]]:
    """Each tomogram's particle rows, this rank's share under torch.distributed: equal numbers
    of particles per rank, whole tomograms where possible (:func:`shard_groups`), so that a
    rank reads and prepares only the tilt series it inserts from."""
    names = parts.tomo_names
    return shard_groups([(name, np.flatnonzero(names == name)) for name in dict.fromkeys(names)])


def _halves(parts: ParticleSet) -> torch.Tensor:
    subsets = parts.random_subset()
    if not (subsets > 0).all():
        log.warning("rlnRandomSubset missing or 0: all particles go into half 1")
        return torch.zeros(len(parts), dtype=torch.long)
    if not np.isin(subsets, (1, 2)).all():
        raise InputError(
            "rlnRandomSubset must be 1 or 2", file=parts.source, block="particles",
            column="rlnRandomSubset", row=int(np.flatnonzero(~np.isin(subsets, (1, 2)))[0]) + 1,
        )  # fmt: skip
    return torch.from_numpy(subsets - 1)


def _has_tilt_images(series: TiltSeries) -> bool:
    paths = series.micrograph_paths
    if paths is not None:
        return all(p.is_file() for p in paths)
    return series.stack_path is not None and series.stack_path.is_file()


def _use_stacks(params: ReconstructParams, parts: ParticleSet, tomos: TomogramSet) -> bool:
    """Stacks when asked, or (auto) when the particles are 2D stacks and tilt images are
    missing (e.g. a WarpTools export)."""
    if params.source != "auto":
        return params.source == "stacks"
    names = dict.fromkeys(parts.tomo_names)
    return parts.is_2d_stacks and not all(_has_tilt_images(tomos[n]) for n in names)


def _insert_from_tilt_series(
    params: ReconstructParams,
    parts: ParticleSet,
    tomos: TomogramSet,
    motion: Trajectories | None,
    accs: list,
    box: int,
    binning: float,
    device: torch.device,
    advance: Callable[[int], None],
) -> int:
    halves = _halves(parts)
    count = 0
    groups = _by_tomogram(parts)
    reading = prefetched_tilt_images([tomos[name] for name, _ in groups], device=device)
    for (_, rows), (series, images) in zip(groups, reading, strict=True):
        size = (images.shape[-1], images.shape[-2])  # images (t, h, w): the next one is read
        geo = series_geometry(parts.subset(rows), series, motion, size)
        visible = visible_frames(geo.uv, size, box / 2)  # RELION: s/2 in bin-1 pixels
        count += insert_tilt_series(
            accs, images, geo.uv, geo.depth, visible, geo.matrices(), halves[rows],
            ctf_of_tilt_series(series, parts), box=box, binning=binning,
            batch_size=params.batch_size, no_ctf=params.no_ctf,
            circle_precrop=not params.no_circle_crop, cutoff_fract=params.cutoff_fract,
            progress=advance,
        )  # fmt: skip
    return count


def _insert_from_stacks(
    params: ReconstructParams,
    parts: ParticleSet,
    tomos: TomogramSet,
    motion: Trajectories | None,
    accs: list,
    binning: float,
    device: torch.device,
    advance: Callable[[int], None],
) -> int:
    halves = _halves(parts)
    n_tilts = {name: tomos[name].n_tilts for name in dict.fromkeys(parts.tomo_names)}
    visible = parts.visible_frames(n_tilts)
    paths = parts.image_paths()
    premultiplied = parts.ctf_premultiplied()
    count = 0
    for name, rows in _by_tomogram(parts):
        series = tomos[name]
        ctf = ctf_of_tilt_series(series, parts)
        subset = parts.subset(rows)
        geo = series_geometry(subset, series, motion, image_size=(2, 2))
        mats = geo.matrices().float()
        # the stacks are cut at the coordinates; offsets refined since move them (§5.6)
        origins = subset.origins_angst() / (binning * series.pixel_size)  # (n, 3) px
        shifts = geo.matrices(include_particle=False)[..., :2, :] @ origins[:, None, :, None]
        shifts = shifts[..., 0].float()  # (n, t, 2)
        per_batch = max(1, params.batch_size // max(series.n_tilts, 1))
        for start in range(0, len(rows), per_batch):
            chunk = range(start, min(start + per_batch, len(rows)))
            images, frames, owners = [], [], []
            for j in chunk:
                i = int(rows[j])
                stack, _ = read_mrc(paths[i])
                index = stack_image_indices(visible[i], stack.shape[0])
                if index is None:
                    raise InputError(
                        f"stack has {stack.shape[0]} images; rlnTomoVisibleFrames marks "
                        f"{int(visible[i].sum())} of {len(visible[i])} tilts visible",
                        file=paths[i],
                    )
                images.append(stack[torch.from_numpy(index)])
                frames.append(torch.from_numpy(np.flatnonzero(visible[i])))
                owners.append(torch.full((len(index),), j, dtype=torch.long))
            stacks = torch.cat(images).to(device)
            f = torch.cat(frames).to(device)
            o = torch.cat(owners).to(device)
            insert_stacks(
                accs, stacks, f, geo.depth.to(device)[o, f], mats.to(device)[o, f],
                halves[rows].to(device)[o], ctf, binning=binning,
                premultiplied=bool(premultiplied[rows[0]]), cutoff_fract=params.cutoff_fract,
                shifts_px=shifts.to(device)[o, f],
            )  # fmt: skip
            count += len(f)
            advance(len(f))
    return count


def _sampling(
    params: ReconstructParams, parts: ParticleSet, tomos: TomogramSet
) -> tuple[bool, int, float, float]:
    """(from stacks?, box in binned pixels, binning, pixel size in Å) of the reconstruction."""
    if _use_stacks(params, parts, tomos):
        binning = float(parts.subtomogram_binning()[0])
        box = int(parts.image_size()[0])
        if params.box and params.box != box:
            log.warning("reconstructing stacks at their own box %d (not %d)", box, params.box)
        return True, box, binning, pixel_size_of(parts)
    if params.box < 0 or params.binning < 0:
        raise InputError(f"--box and --bin must be >= 0 (got {params.box}, {params.binning:g})")
    extracted = "rlnImageSize" in parts.optics.columns
    binning = params.binning or (float(parts.subtomogram_binning()[0]) if extracted else 1.0)
    box = params.box or (int(parts.image_size()[0]) if extracted else 0)
    if box <= 0:
        raise InputError("--box must be given to reconstruct from tilt series")
    require_box_fits(parts, tomos, box, f"--box {box}")
    return False, box, binning, binning * tomos[parts.tomo_names[0]].pixel_size


def run(params: ReconstructParams) -> dict[str, str]:
    """Run the job; returns ``{output path: RELION node type}``."""

    device = resolve_device(params.device)
    parts, tomos, motion, opt = read_particle_inputs(
        params.ios, params.particles, params.tomograms, params.trajectories
    )
    use_stacks, box, binning, pixel = _sampling(params, parts, tomos)
    inputs = {str(opt.particles): "ParticleGroupMetadata.star.relion.tomo"}
    with run_job(
        "Reconstruct", params, output_dir=params.output_dir, project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):  # fmt: skip
        log.info(
            "Reconstructing %d particles from %s at box %d, bin %g (%.3f Å/px), sym %s",
            len(parts), "2D stacks" if use_stacks else "tilt series", box, binning, pixel,
            params.sym,
        )  # fmt: skip
        accs = [FourierAccumulator(box, padding=params.padding, device=device) for _ in (1, 2)]
        with Progress(transient=True) as bar:
            task = bar.add_task("inserting tilt images", total=None)

            def advance(n: int) -> None:
                bar.advance(task, n)

            if use_stacks:
                count = _insert_from_stacks(
                    params, parts, tomos, motion, accs, binning, device, advance
                )
            else:
                count = _insert_from_tilt_series(
                    params, parts, tomos, motion, accs, box, binning, device, advance
                )
        count = sum(all_gather_object(count))  # over the ranks
        if count == 0:
            raise InputError(
                f"no tilt image of any particle lies inside its tilt series at box {box}: "
                "nothing to reconstruct",
                file=opt.particles,
            )
        log.info("Inserted %d tilt images", count)
        halves = bool((parts.random_subset() > 0).all())
        _finalise(params, job, outputs, accs, halves, pixel, device)
        write_job_report(job, outputs)
    return outputs


def _finalise(
    params: ReconstructParams,
    job,
    outputs: dict[str, str],
    accs: list,
    halves: bool,
    pixel: float,
    device: torch.device,
) -> None:
    """Symmetrise, divide, taper and write ``<tag>.mrc``, ``data_<tag>.mrc``, ``weight_<tag>``.

    Half maps only when the particles have rlnRandomSubset (RELION); merged sums both.
    Under torch.distributed the ranks' sums are added up and the maps shared out: each rank
    finishes and writes its own (half1, half2, merged round robin).
    """
    for acc in accs:
        acc.all_reduce()
    merged = accs[0].merged_with(accs[1])
    tags = {"half1": accs[0], "half2": accs[1], "merged": merged} if halves else {}
    tags["merged"] = merged
    crop = params.crop if params.crop > 0 else None
    sym = symmetry_matrices(params.sym, device=device)

    def finalise(_worker: int, tag: str) -> None:
        acc = tags[tag]
        if len(sym) > 1:
            acc.symmetrise(sym)
        parts = reconstruct(
            acc, snr=params.snr if params.snr > 0 else None, taper=params.taper, crop=crop,
            return_parts=True,
        )  # fmt: skip
        write_mrc(job.path(f"{tag}.mrc"), parts.map, pixel)
        write_mrc(job.path(f"data_{tag}.mrc"), parts.data, pixel)
        write_mrc(job.path(f"weight_{tag}.mrc"), parts.weight, pixel)

    mine = shard(list(tags))  # independent maps: each rank finishes and writes its share
    with own_files():
        map_batches(finalise, mine, cpu_workers(device, len(mine)))
    barrier()  # the report reads them all
    for tag in tags:
        kind = "DensityMap.mrc" if tag == "merged" else "DensityMap.mrc.halfmap"
        outputs[str(job.path(f"{tag}.mrc"))] = kind
