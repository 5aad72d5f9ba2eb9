"""Reconstruct tomograms (``subtomo reconstruct-tomograms``; RELION's "Reconstruct tomograms",
``Tomograms/jobNNN/``): weighted back-projection or SIRT of each aligned tilt series at a
binning, with per-tilt CTF phase flipping in depth strips (``--ctf_3d``: at every voxel depth;
``--wiener``: Wiener-weighted instead of flipped, conventions §21) and optional dose weighting
(:mod:`subtomo.tilt.tomogram`).

Writes what RELION writes (relion5-upstream.md §6): ``tomograms/rec_<name>.mrc`` (voxel size
``px·b`` in the header; ``rec_<name>_half1/_half2.mrc`` from the rlnMicrographNameEven/Odd
images when the series has them), ``tomograms.star`` with rlnTomoSizeX/Y/Z (bin-1 pixels),
rlnTomoTomogramBinning (always written: the Python pickers need it) and
rlnTomoReconstructedTomogram[Half1/Half2], the per-tilt tables unchanged, and ``report.html``.
Binned voxel ``(i, j, k)`` sits at bin-1 position ``b·(i, j, k)``, as RELION's. Under
torch.distributed the volumes (series and halves) are shared out over the ranks, each rank
writing its own; rank 0 writes the STAR files.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.progress import Progress

from subtomo.data import TiltSeries, TomogramSet
from subtomo.data.paths import resolve_path
from subtomo.device import resolve_device
from subtomo.distributed import own_files, shard
from subtomo.errors import InputError
from subtomo.io import numeric_column, read_mrc, read_mrc_header, write_mrc
from subtomo.project import run_job, write_job_report
from subtomo.project.options import device_option, option, output_dir_option
from subtomo.tilt.tomogram import (
    SLAB_ELEMENTS,
    CtfParams,
    fourier_bin,
    reconstruct_sirt,
    reconstruct_wbp,
    series_ctf,
    tomogram_grid,
)

__all__ = ["ReconstructTomogramsParams", "run"]

log = logging.getLogger("subtomo")

_METHODS = ("wbp", "sirt")
_HALVES = {"Half1": "rlnMicrographNameEven", "Half2": "rlnMicrographNameOdd"}


@dataclass
class ReconstructTomogramsParams:
    """Options of "Reconstruct tomograms"."""

    i: str = option(..., "--i", "--t", help="Aligned tilt series: tomograms.star or global STAR.")
    w: int = option(0, "--w", help="Tomogram width; <= 0: rlnTomoSizeX or the tilts'.", unit="px")
    h: int = option(0, "--h", help="Tomogram height; <= 0: rlnTomoSizeY or the tilts'.", unit="px")
    d: int = option(0, "--d", help="Tomogram thickness; <= 0: rlnTomoSizeZ.", unit="px")
    bin: int = option(4, "--bin", help="Binning (the tilts are Fourier-cropped by it).")
    method: str = option("wbp", "--method", help="wbp (weighted back-projection) or sirt.")
    sirt_like: int = option(
        0, "--sirt_like", help="WBP: SIRT-like filter of this many iterations; 0: ramp."
    )
    iter: int = option(10, "--iter", help="SIRT iterations.")
    relax: float = option(1.0, "--relax", help="SIRT relaxation factor (0, 2).")
    ctf: bool = option(True, "--ctf/--no_ctf", help="Phase-flip each tilt in depth strips.")
    strip: float = option(
        0.0, "--strip", help="Depth strip height; <= 0: CTF phase moves <= π/2.", unit="Å"
    )
    ctf_3d: bool = option(
        False, "--ctf_3d/--no_ctf_3d", help="3D CTF correction: a depth every voxel (NovaCTF)."
    )
    wiener: float = option(
        0.0, "--wiener", help="WBP: weight each depth by CTF/(CTF²+this); 0: phase flip."
    )
    dose_weighting: bool = option(
        False, "--dose_weighting/--no_dose_weighting", help="Dose-weight each tilt."
    )
    halves: bool = option(
        True,
        "--generate_split_tomograms/--no_split_tomograms",
        help="Also even/odd half tomograms when the series has EVN/ODD images.",
    )
    device: str = device_option()
    output_dir: str | None = output_dir_option()
    project_dir: str = "."
    slab_elements: int = SLAB_ELEMENTS


@dataclass
class _Plan:
    """One series checked: its sizes, images per output and CTF."""

    series: TiltSeries
    size: tuple[int, int, int]
    image_size: tuple[int, int]
    images: dict[str, list[Path]]
    ctf: CtfParams | None


def _size(params: ReconstructTomogramsParams, series: TiltSeries, image: tuple[int, int]):
    given = (params.w, params.h, params.d)
    out = []
    for axis, value, fallback in zip("XYZ", given, (*image, None), strict=True):
        column = f"rlnTomoSize{axis}"
        if value > 0:
            out.append(int(value))
        elif column in series.row.index:
            out.append(round(float(series.row[column])))
        elif fallback is not None:
            out.append(int(fallback))
        else:
            raise InputError(
                f"no {column}: give the thickness with --d (bin-1 pixels)",
                file=params.i,
                block=series.name,
            )
    return tuple(out)


def _ctf(series: TiltSeries) -> CtfParams:
    if "rlnDefocusU" not in series.tilts.columns:
        raise InputError(
            "no CTF (rlnDefocusU): run subtomo ctffind first, or use --no_ctf",
            file=series.tilt_file,
            block=series.name,
        )
    return series_ctf(series)


def _ctf_label(params: ReconstructTomogramsParams) -> str:
    how = f"Wiener-weighted (ε {params.wiener:g})" if params.wiener > 0 else "phase-flipped"
    return how + (", every voxel depth (3D)" if params.ctf_3d else ", depth strips")


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _plan(params: ReconstructTomogramsParams, series: TiltSeries, device: torch.device) -> _Plan:
    """Check one series before the job starts: tilts, alignment, images, sizes, memory."""
    if series.n_tilts < 2:
        raise InputError(
            f"{series.n_tilts} tilt: a tomogram needs at least two",
            file=series.tilt_file,
            block=series.name,
        )
    if not series.has_projection_rows:
        for c in ("rlnTomoYTilt", "rlnTomoZRot", "rlnTomoXShiftAngst", "rlnTomoYShiftAngst"):
            numeric_column(series.tilts, c, series.tilt_file, series.name)  # aligned?
    images = {"": series.micrograph_paths or []}
    if not images[""]:
        raise InputError(
            "no tilt images (rlnMicrographName)", file=series.tilt_file, block=series.name
        )
    if params.halves and all(c in series.tilts.columns for c in _HALVES.values()):
        for half, column in _HALVES.items():
            images[half] = [resolve_path(str(n), series.tilt_file) for n in series.tilts[column]]
    shapes = {read_mrc_header(p).shape[-2:] for paths in images.values() for p in paths}
    if len(shapes) != 1:
        raise InputError(
            f"tilt images of different sizes {sorted(shapes)}",
            file=series.tilt_file,
            block=series.name,
        )
    h, w = shapes.pop()
    size = _size(params, series, (w, h))
    b = params.bin
    shape = (size[2] // b, math.floor(size[1] / b + 0.5), math.floor(size[0] / b + 0.5))
    if min(shape) < 1 or w // b < 2 or h // b < 2:
        raise InputError(
            f"tomogram {size[0]}x{size[1]}x{size[2]} at bin {b} has no voxels",
            file=params.i,
            block=series.name,
        )
    needed = 4 * (
        math.prod(shape) * (2 if params.method == "sirt" else 1)
        + 8 * series.n_tilts * (h // b) * (w // b)
        + 16 * params.slab_elements
    )
    available = _available_bytes(device)
    if needed > available:
        raise InputError(
            f"tomogram {shape[2]}x{shape[1]}x{shape[0]} at bin {b} needs "
            f"{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available on "
            f"{device}: bin more or reconstruct fewer slices (--d)",
            file=params.i,
            block=series.name,
        )
    ctf = replace(_ctf(series), wiener=params.wiener) if params.ctf else None
    return _Plan(series, size, (w, h), images, ctf)


def _name(series: TiltSeries, half: str) -> str:
    """The tomogram's file in the job directory (RELION's names)."""
    return f"tomograms/rec_{series.name}{'_' + half.lower() if half else ''}.mrc"


def _binned(paths: list[Path], b: int, device: torch.device) -> torch.Tensor:
    """Tilt images read one at a time and Fourier-cropped: ``(t, h/b, w/b)``."""
    return torch.stack(
        [
            fourier_bin(
                read_mrc(p, device=device, finite=True)[0].reshape(read_mrc_header(p).shape[-2:]), b
            )
            for p in paths
        ]
    )


def run(params: ReconstructTomogramsParams) -> dict[str, str]:
    """Reconstruct every series; returns ``{output path: RELION node type}``."""
    if params.method not in _METHODS:
        raise InputError(f"--method must be one of {', '.join(_METHODS)}, found {params.method!r}")
    if params.bin < 1 or params.iter < 1 or not 0 < params.relax < 2 or params.sirt_like < 0:
        raise InputError("--bin and --iter must be >= 1, --relax in (0, 2), --sirt_like >= 0")
    if params.wiener < 0 or (params.wiener > 0 and params.method == "sirt"):
        raise InputError("--wiener must be >= 0, and 0 with --method sirt (SIRT phase-flips)")
    if (params.ctf_3d or params.wiener > 0) and not params.ctf:
        raise InputError("--ctf_3d and --wiener correct the CTF: drop --no_ctf")
    device = resolve_device(params.device)
    tomograms = TomogramSet.read(params.i, require_series=True)
    plans = [_plan(params, s, device) for s in tomograms]
    inputs = {params.i: "TomogramGroupMetadata.star.relion.tomo"}
    with run_job(
        "Tomograms",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        table = tomograms.global_table.copy()
        rows, grids = [], []
        for k, plan in enumerate(plans):
            series, b = plan.series, params.bin
            grids.append(tomogram_grid(
                series.projection_matrices(plan.image_size), plan.size, plan.image_size, b
            ))  # fmt: skip
            for axis, value in zip("XYZ", plan.size, strict=True):
                table.loc[k, f"rlnTomoSize{axis}"] = value
            table.loc[k, "rlnTomoTomogramBinning"] = float(b)
            for half in plan.images:
                table.loc[k, f"rlnTomoReconstructedTomogram{half}"] = job.alias + _name(
                    series, half
                )
            rows.append(
                {
                    "tilt series": series.name,
                    "tilts": series.n_tilts,
                    "voxels (x y z)": " ".join(map(str, grids[k].shape[::-1])),
                    "voxel size (Å)": f"{series.pixel_size * b:.2f}",
                    "halves": "yes" if len(plan.images) > 1 else "no",
                    "CTF": _ctf_label(params) if plan.ctf is not None else "none",
                }
            )
        # one volume (a series or one of its halves) per item, shared out over the ranks
        work = shard([(k, half) for k, plan in enumerate(plans) for half in plan.images])
        with Progress(transient=True) as bar, own_files():
            task = bar.add_task("reconstructing", total=len(work))
            for k, half in work:
                plan, b = plans[k], params.bin
                series = plan.series
                dose = (
                    torch.from_numpy(series.pre_exposure).to(device)
                    if params.dose_weighting
                    else None
                )
                images = _binned(plan.images[half], b, device)
                common = dict(
                    ctf=plan.ctf,
                    pre_exposure=dose,
                    pixel_size=series.pixel_size,
                    strip_angst=params.strip,
                    ctf_3d=params.ctf_3d,
                    slab_elements=params.slab_elements,
                    progress=lambda x: bar.advance(task, x),
                )
                if params.method == "sirt":
                    volume = reconstruct_sirt(
                        images, grids[k], iterations=params.iter, relaxation=params.relax,
                        **common,
                    )  # fmt: skip
                else:
                    volume = reconstruct_wbp(images, grids[k], sirt_like=params.sirt_like, **common)
                write_mrc(job.path(_name(series, half)), volume, series.pixel_size * b)
                del volume, images
                log.info(
                    "%s%s: %s tomogram %s at bin %d", series.name, f" {half}" if half else "",
                    params.method.upper(), "x".join(map(str, grids[k].shape[::-1])), b,
                )  # fmt: skip
        tables = {s.name: s.tilts for s in tomograms}
        TomogramSet.from_tables(table, tables).write(
            job.path("tomograms.star"), job.path("tilt_series")
        )
        outputs[job.alias + "tomograms.star"] = "TomogramGroupMetadata.star.relion.tomo.reconstruct"
        summary = {
            "method": params.method.upper()
            + (f" (SIRT-like filter, {params.sirt_like})" if params.sirt_like else ""),
            "binning": params.bin,
            "tilt series": len(plans),
        }
        write_job_report(job, outputs, summary=summary, tables={"tomograms": rows})
    return outputs
