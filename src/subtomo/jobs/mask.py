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
from subtomo.report import plot_central_slices

__all__ = ["MaskParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class MaskParams:
    """Options of "Mask creation" (RELION flags; lengths in pixels unless marked Å)."""

    i: str | None = None  # --i input map
    lowpass: float = -1.0  # --lowpass (Å; <= 0: none)
    angpix: float = -1.0  # --angpix (<= 0: from the header)
    ini_threshold: float = 0.01  # --ini_threshold
    extend_inimask: float = 0.0  # --extend_inimask (negative shrinks)
    width_soft_edge: float = 0.0  # --width_soft_edge
    invert: bool = False  # --invert
    and_map: str | None = None  # --and
    or_map: str | None = None  # --or
    and_not_map: str | None = None  # --and_not
    or_not_map: str | None = None  # --or_not
    denovo: bool = False  # --denovo
    box_size: int = -1  # --box_size
    inner_radius: float = 0.0  # --inner_radius
    outer_radius: float = 99999.0  # --outer_radius
    height: float = 0.0  # cylinder height along z (0: a sphere/shell)
    center_x: float = 0.0  # --center_x
    center_y: float = 0.0  # --center_y
    center_z: float = 0.0  # --center_z
    o: str | None = None  # output directory (default MaskCreate/jobNNN/)
    project_dir: str = "."
    device: str = "auto"


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
        "MaskCreate", params, output_dir=params.o, project_dir=params.project_dir, inputs=inputs
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
