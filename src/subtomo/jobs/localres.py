"""Local resolution job (``relion_postprocess --locres``): windowed, phase-randomisation
corrected FSC between the half maps.

Writes ``relion_locres.mrc`` (Å), ``relion_locres_filtered.mrc``, ``relion_locres.star``
(sample points and their resolution) and ``histogram.png`` (resolutions inside the mask)
into ``LocalRes/jobNNN/`` (or ``--o``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from subtomo.data import read_half_maps
from subtomo.device import resolve_device
from subtomo.errors import InputError
from subtomo.io import write_mrc, write_star
from subtomo.postprocess import LocalResOptions, LocalResResult, local_resolution
from subtomo.project import run_job, write_job_report
from subtomo.project.options import device_option, option, output_dir_option
from subtomo.report import plot_central_slices, plot_histogram

__all__ = ["LocalResParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class LocalResParams:
    """Options of "Local resolution" (relion_postprocess --locres flags)."""

    i: str | None = option(None, "--i", help="Half map 1.")
    i2: str | None = option(None, "--i2", help="Half map 2 (default: --i with half1 -> half2).")
    ios: str | None = option(None, "--ios", help="Optimisation set with the half maps.")
    mask: str | None = option(
        None, "--mask", help="Mask: sample only where the windows reach into it."
    )
    angpix: float = option(-1.0, "--angpix", help="Pixel size; <= 0: the header's.", unit="Å")
    locres_sampling: float = option(25.0, "--locres_sampling", help="Sampling distance.", unit="Å")
    locres_maskrad: float = option(
        -1.0, "--locres_maskrad", help="Window radius; <= 0: half the sampling.", unit="Å"
    )
    locres_edgwidth: float = option(
        -1.0, "--locres_edgwidth", help="Window edge width; <= 0: the sampling.", unit="Å"
    )
    locres_randomize_at: float = option(
        25.0, "--locres_randomize_at", help="Randomise phases beyond this resolution.", unit="Å"
    )
    locres_minres: float = option(
        50.0, "--locres_minres", help="Lowest resolution reported.", unit="Å"
    )
    adhoc_bfac: float = option(
        -100.0, "--adhoc_bfac", help="B-factor of the filtered map.", unit="Å²"
    )
    batch_size: int = option(32, "--batch", help="Windows per batch.")
    random_seed: int = option(0, "--random_seed", help="Random seed.")
    output_dir: str | None = output_dir_option()
    project_dir: str = "."
    device: str = device_option()


def run(params: LocalResParams) -> LocalResResult:
    """Run the job; returns the local-resolution result."""
    device = resolve_device(params.device)
    maps = read_half_maps(params.i, params.i2, params.ios, params.mask, params.angpix, device)
    if params.locres_sampling <= 0:
        raise InputError(f"--locres-sampling must be positive, got {params.locres_sampling}")
    options = LocalResOptions(
        sampling=params.locres_sampling,
        mask_radius=params.locres_maskrad,
        edge_width=params.locres_edgwidth,
        randomize_at=params.locres_randomize_at,
        min_resolution=params.locres_minres,
        bfactor=params.adhoc_bfac,
        batch_size=params.batch_size,
        random_seed=params.random_seed,
    )
    inputs = {str(maps.path1): "DensityMap.mrc.halfmap", str(maps.path2): "DensityMap.mrc.halfmap"}
    if maps.mask_path:
        inputs[str(maps.mask_path)] = "Mask3D.mrc"
    with run_job(
        "LocalRes",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        res = local_resolution(maps.half1, maps.half2, maps.pixel_size, maps.mask, options)
        px = maps.pixel_size
        write_mrc(job.path("relion_locres.mrc"), res.resolution_map, px)
        write_mrc(job.path("relion_locres_filtered.mrc"), res.filtered, px)
        outputs[job.alias + "relion_locres.mrc"] = "Image3D.mrc.localresmap"
        outputs[job.alias + "relion_locres_filtered.mrc"] = "DensityMap.mrc.localresfiltered"
        pts = res.points.cpu().numpy()
        table = pd.DataFrame(
            {
                "rlnCoordinateX": pts[:, 2],
                "rlnCoordinateY": pts[:, 1],
                "rlnCoordinateZ": pts[:, 0],
                "rlnAngstromResolution": res.point_resolution.cpu().numpy(),
            }
        )
        write_star(job.path("relion_locres.star"), {"local_resolution": table})
        inside = res.resolution_map[maps.mask > 0.5] if maps.mask is not None else None
        values = inside if inside is not None else res.resolution_map[res.resolution_map > 0]
        plot_histogram(
            job.path("histogram.png"),
            values,
            xlabel="local resolution (Å)",
            title="local resolution" + (" inside the mask" if inside is not None else ""),
        )
        plot_central_slices(
            job.path("relion_locres_slices.png"),
            res.resolution_map,
            title="local resolution (Å)",
            cmap="viridis",
        )
        if values.numel():
            log.info(
                " + %d sampling points; local resolution %.2f .. %.2f Å (median %.2f Å)",
                pts.shape[0],
                float(values.min()),
                float(values.max()),
                float(values.median()),
            )
        write_job_report(job, outputs)
    return res
