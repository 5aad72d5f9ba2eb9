"""Mask creation job (``relion_mask_create``): low-pass, threshold, extend, soft edge,
invert, logical combination with a second map, or de novo spheres/cylinders.

Writes ``mask.mrc`` (and ``mask_slices.png``) into ``MaskCreate/jobNNN/`` (or ``--o``) and
logs a threshold suggested from the map's histogram.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from subtomo.data import read_map_checked
from subtomo.device import resolve_device
from subtomo.errors import InputError
from subtomo.fourier import lowpass_map
from subtomo.io import write_mrc
from subtomo.masks import crown_mask, cylinder_mask, mask_from_map, suggest_threshold
from subtomo.project import run_job, write_job_report
from subtomo.project.options import device_option, option, output_dir_option
from subtomo.report import plot_central_slices

__all__ = ["MaskParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class MaskParams:
    """Options of "Mask creation" (relion_mask_create flags)."""

    i: str | None = option(None, "--i", help="Input map to threshold.")
    lowpass: float = option(
        -1.0, "--lowpass", help="Low-pass before thresholding; <= 0: none.", unit="Å"
    )
    angpix: float = option(-1.0, "--angpix", help="Pixel size; <= 0: the header's.", unit="Å")
    ini_threshold: float = option(0.01, "--ini_threshold", help="Binarisation threshold.")
    extend_inimask: float = option(
        0.0, "--extend_inimask", "--extend", help="Extend; negative shrinks.", unit="px"
    )
    width_soft_edge: float = option(
        0.0, "--width_soft_edge", "--soft-edge", help="Raised-cosine edge width.", unit="px"
    )
    invert: bool = option(False, "--invert", help="Invert the final mask.")
    and_map: str | None = option(None, "--and", help="AND: both maps above the threshold.")
    or_map: str | None = option(None, "--or", help="OR: either map above the threshold.")
    and_not_map: str | None = option(None, "--and_not", help="Input above AND this map below.")
    or_not_map: str | None = option(None, "--or_not", help="Input above OR this map below.")
    denovo: bool = option(False, "--denovo", help="Make a sphere, shell or cylinder de novo.")
    box_size: int = option(-1, "--box_size", help="De novo box.", unit="px")
    inner_radius: float = option(0.0, "--inner_radius", help="De novo inner radius.", unit="px")
    outer_radius: float = option(99999.0, "--outer_radius", help="De novo outer radius.", unit="px")
    height: float = option(
        0.0, "--height", help="Cylinder height along z; 0: a sphere or shell.", unit="px"
    )
    center_x: float = option(0.0, "--center_x", help="De novo centre x from N//2.", unit="px")
    center_y: float = option(0.0, "--center_y", help="De novo centre y from N//2.", unit="px")
    center_z: float = option(0.0, "--center_z", help="De novo centre z from N//2.", unit="px")
    output_dir: str | None = output_dir_option()
    project_dir: str = "."
    device: str = device_option()


def _denovo(p: MaskParams, device: torch.device) -> torch.Tensor:
    shape = (p.box_size,) * 3
    center = (p.center_x, p.center_y, p.center_z)
    if p.height > 0:
        return cylinder_mask(
            shape,
            p.inner_radius,
            p.outer_radius,
            p.height,
            p.width_soft_edge,
            center,
            device=device,
        )
    return crown_mask(
        shape, p.inner_radius, p.outer_radius, p.width_soft_edge, center, device=device
    )


def _combination(params: MaskParams) -> dict[str, str]:
    """``{how: map}`` of the one --and/--or/--and-not/--or-not given (empty if none)."""
    others = {
        "and": params.and_map,
        "or": params.or_map,
        "and_not": params.and_not_map,
        "or_not": params.or_not_map,
    }
    given = {k: v for k, v in others.items() if v}
    if len(given) > 1:
        raise InputError(f"give at most one of --and/--or/--and-not/--or-not, got {sorted(given)}")
    return given


def _read_maps(
    params: MaskParams, given: dict[str, str], device: torch.device
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """The input map, its pixel size (Å; 0 when unknown and not needed) and the map to
    combine it with, checked before the job starts."""
    if not params.i:
        raise InputError("give an input map with --i (or --denovo)")
    volume, px = read_map_checked(
        params.i, what="--i", device=device, angpix=params.angpix,
        pixel_required=params.lowpass > 0,
    )  # fmt: skip
    other = None
    for path in given.values():
        other, _ = read_map_checked(
            path, what="the map", device=device, angpix=px, pixel_required=False,
            shape=volume.shape, against="--i",
        )  # fmt: skip
    return volume, px, other


def _mask_of_map(
    params: MaskParams, volume: torch.Tensor, px: float, other: torch.Tensor | None, how: str
) -> torch.Tensor:
    """Low-pass, threshold, combine, extend and soften; ``InputError`` for an empty mask."""
    if params.lowpass > 0:
        volume = lowpass_map(volume, params.lowpass, px)
    log.info(
        " + map range %.4g .. %.4g; suggested --ini-threshold %.4g (histogram, Otsu)",
        float(volume.min()),
        float(volume.max()),
        suggest_threshold(volume),
    )
    mask = mask_from_map(
        volume,
        params.ini_threshold,
        extend=params.extend_inimask,
        soft_edge_width=params.width_soft_edge,
        other=other,
        combine=how,
    )
    if not bool((mask > 0).any()):
        raise InputError(
            f"the mask is empty: no voxel is above --ini_threshold {params.ini_threshold:g} "
            f"(map range {float(volume.min()):.4g} .. {float(volume.max()):.4g})",
            file=params.i,
        )
    return mask


def run(params: MaskParams) -> torch.Tensor:
    """Create the mask; returns it (zyx, values in [0, 1])."""
    device = resolve_device(params.device)
    given = _combination(params)
    if params.denovo:
        if params.box_size <= 0:
            raise InputError("--denovo needs --box-size")
        volume = other = None
        px = params.angpix if params.angpix > 0 else 1.0
    else:
        volume, px, other = _read_maps(params, given, device)
    inputs = {p: "DensityMap.mrc" for p in [params.i, *given.values()] if p}
    with run_job(
        "MaskCreate",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        if volume is None:
            mask = _denovo(params, device)
        else:
            mask = _mask_of_map(params, volume, px, other, next(iter(given), None))
        if params.invert:
            mask = 1.0 - mask
        write_mrc(job.path("mask.mrc"), mask, px)
        outputs[job.alias + "mask.mrc"] = "Mask3D.mrc"
        plot_central_slices(job.path("mask_slices.png"), mask, title="mask.mrc")
        log.info(
            " + mask written: %s (%.0f voxels > 0.5)",
            job.path("mask.mrc"),
            float((mask > 0.5).sum()),
        )
        write_job_report(job, outputs)
    return mask
