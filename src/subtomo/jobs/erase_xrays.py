"""Erase X-rays (``subtomo erase-xrays``, ``EraseXrays/jobNNN/``): hot pixels and X-ray hits
found in every tilt image and filled with local-statistics noise, like IMOD's ccderaser
(:mod:`subtomo.tilt.xrays`).

RELION 5 has no such job; its outputs follow the other tilt-series jobs: the erased images
``<name>/<micrograph>.mrc``, ``erased_tilt_series.star`` (global) with
``tilt_series/<name>.star`` naming them in rlnMicrographName (every other column kept), and
``defects.star`` (one row per defect: tilt series, image, x, y, pixels, peak above the
image median in σ), with a plot
of defects per tilt and ``report.html``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress
from scipy import ndimage

from subtomo.data import TomogramSet, read_tilt
from subtomo.device import resolve_device
from subtomo.errors import InputError
from subtomo.io import read_mrc_header, write_mrc, write_star
from subtomo.project import run_job, write_job_report
from subtomo.project.options import device_option, option, output_dir_option
from subtomo.report.plots import plot_xy
from subtomo.tilt.xrays import erase_defects, find_defects, robust_sigma

__all__ = ["EraseXraysParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class EraseXraysParams:
    """Options of "Erase X-rays" (ccderaser's peak and grow criteria, in σ of the noise)."""

    i: str = option(..., "--i", help="Tilt series: tomograms.star or a job's global STAR.")
    threshold: float = option(
        6.0, "--peak", help="A defect starts this far above the local median.", unit="σ"
    )
    grow: float = option(4.0, "--grow", help="Neighbours this far above join it.", unit="σ")
    size: int = option(9, "--box", help="Local median and fill window, odd.", unit="px")
    seed: int = option(0, "--seed", help="Random seed of the fill noise.")
    device: str = device_option()
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def _defects(image: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, int, int, float]]:
    """(x, y, pixels, peak over the image median in σ) of each 8-connected defect."""
    labels, n = ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3)))
    if n == 0:
        return []
    values = image.float().cpu()
    sigma = max(robust_sigma(values - values.median()), 1e-30)
    excess = (values - values.median()).numpy() / sigma
    peaks = ndimage.maximum(excess, labels, index=np.arange(1, n + 1))
    where = ndimage.find_objects(labels)
    sizes = np.bincount(labels.ravel())[1:]
    return [(int(w[1].start), int(w[0].start), int(c), float(p))
            for w, c, p in zip(where, sizes, peaks, strict=True)]  # fmt: skip


def run(params: EraseXraysParams) -> dict[str, str]:
    """Erase every tilt image; returns ``{output path: RELION node type}``."""
    if params.size < 3 or params.size % 2 == 0:
        raise InputError(f"--box must be odd and >= 3, got {params.size}")
    if not 0 < params.grow <= params.threshold:
        raise InputError(f"--grow must be in (0, --peak], got {params.grow}")
    device = resolve_device(params.device)
    tomograms = TomogramSet.read(params.i)
    paths = {}
    for series in tomograms:
        paths[series.name] = series.micrograph_paths
        if paths[series.name] is None:
            raise InputError("no rlnMicrographName column: no tilt images",
                             file=series.tilt_file, block=series.name)  # fmt: skip
        for path in paths[series.name]:
            read_mrc_header(path)  # a missing or broken image: one error naming it, no job yet
    inputs = {params.i: "TomogramGroupMetadata.star.relion.tomo"}
    generator = torch.Generator().manual_seed(params.seed)
    with run_job("EraseXrays", params, output_dir=params.output_dir,
                 project_dir=params.project_dir, inputs=inputs) as (job, outputs):  # fmt: skip
        tables, rows, curves = {}, [], {}
        with Progress(transient=True) as bar:
            task = bar.add_task("erasing", total=sum(s.n_tilts for s in tomograms))
            for series in tomograms:
                names, counts = [], []
                for f, path in enumerate(paths[series.name]):
                    image = read_tilt(series, f, device=device)
                    mask = find_defects(image, params.threshold, params.grow, params.size)
                    found = _defects(image, mask)
                    counts.append(len(found))
                    rows += [(series.name, path.name, *d) for d in found]
                    out = job.path(f"{series.name}/{path.name}")
                    write_mrc(out, erase_defects(image, mask, generator, params.size),
                              series.pixel_size)  # fmt: skip
                    names.append(f"{job.alias}{series.name}/{path.name}")
                    bar.advance(task)
                table = series.tilts.copy()
                table["rlnMicrographName"] = names
                tables[series.name] = table
                order = series.tilts.get("rlnTomoNominalStageTiltAngle")
                x = np.arange(series.n_tilts) if order is None else order.to_numpy(float)
                curves[series.name] = (x, counts)
        TomogramSet.from_tables(tomograms.global_table, tables).write(
            job.path("erased_tilt_series.star"), job.path("tilt_series")
        )
        outputs[job.alias + "erased_tilt_series.star"] = "TomogramGroupMetadata.star.relion.tomo"
        columns = ["rlnTomoName", "rlnMicrographName", "subtomoX", "subtomoY", "subtomoPixels",
                   "subtomoPeakSigma"]  # fmt: skip
        defects = pd.DataFrame(rows, columns=columns)
        write_star(job.path("defects.star"), {"defects": defects})
        plot_xy(job.path("defects_per_tilt.png"), curves, xlabel="tilt (deg)",
                ylabel="defects", title="hot pixels and X-rays per tilt image")  # fmt: skip
        summary = {"defects erased": f"{len(defects)} ({int(defects['subtomoPixels'].sum())} "
                   "pixels)" if len(defects) else "0"}  # fmt: skip
        log.info("erased %s", summary["defects erased"])
        write_job_report(job, outputs, summary=summary)
    return outputs
