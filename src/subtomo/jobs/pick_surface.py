"""Surface picking (``subtomo pick-surface``; RELION 5's "Pick tomograms" in spheres or surfaces
mode, ``Picks/jobNNN/``): particles on a lattice over vesicles or membranes, each oriented
with the surface normal on its z axis (conventions §16.1).

Vesicles come as points (``--i``: a STAR, CSV or IMOD ``.mod``; one vesicle per
rlnTomoManifoldIndex / ``group`` / IMOD contour, else per tomogram): a few, fitted by a sphere
or an ellipsoid, or many tracing any closed surface (``--shape``); a RELION 5
``_spheres.star`` (rlnSphereRadius) gives spheres directly. Or ``--mask``: a segmentation of
one tomogram, whose every closed object is sampled. Writes ``particles.star``
(rlnTomoSubtomogram* from the normal; rlnAngleRot/Tilt/Psi 0/90/0 with tilt and psi priors
90/0, for refine3d's ``--sigma_tilt/--sigma_psi``), ``optimisation_set.star`` and
``report.html``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.data import OptimisationSet, ParticleSet, TomogramSet
from subtomo.data.paths import relative_to_cwd
from subtomo.errors import InputError
from subtomo.io import read_mrc
from subtomo.io.coordinate_files import PickTable, read_pick_file
from subtomo.picking import (
    Ellipsoid,
    binned_shape,
    centred_angst,
    fit_ellipsoid,
    fit_sphere,
    inside_tomogram,
    locate_picks,
    mask_surfaces,
    sample_ellipsoid,
    sample_point_surface,
    surface_particle_rows,
    tomogram_binning,
)
from subtomo.project import run_job, write_job_report
from subtomo.project.options import option, output_dir_option

__all__ = ["PickSurfaceParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class PickSurfaceParams:
    """Options of "Pick tomograms" (surfaces)."""

    tomograms: str = option(
        ..., "--tomograms", "--t", help="tomograms.star (tomogram sizes and pixel sizes)."
    )
    i: str = option(
        "", "--i", help="Points on vesicles: .star (RELION spheres/points), .csv or IMOD .mod."
    )
    mask: str = option("", "--mask", help="Segmentation MRC of one tomogram (nonzero inside).")
    spacing: float = option(
        0.0, "--spacing", help="Particle spacing on the surface (required).", unit="Å"
    )
    shape: str = option(
        "sphere",
        "--shape",
        help="Surface through each vesicle's points: sphere (>= 4 points, or 3+ on one "
        "slice), ellipsoid (>= 9; ~40 for normals within 5°) or points (the points trace the "
        "surface densely, closer than --spacing).",
    )
    format: str = option("auto", "--format", help="Points file format: auto, star, csv, imod.")
    bin: float = option(
        0.0,
        "--bin",
        help="Binning of the points' or mask's tomogram; <= 0: the mask's voxel size over the "
        "tilt-series pixel size, else rlnTomoTomogramBinning, else 1.",
    )
    tomo_name: str = option(
        "", "--tomo_name", help="rlnTomoName for a mask, or points that name no tomogram."
    )
    csv_unit: str = option(
        "voxel", "--csv_unit", help="CSV x/y/z: voxel (0-based) or angst (from voxel 0)."
    )
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


@dataclass(frozen=True)
class _Surface:
    """One sampled surface: tomogram, label, particle positions (centred Å) and normals."""

    tomo: str
    label: str
    centred: np.ndarray
    normals: np.ndarray
    note: str


def _fitted(params: PickSurfaceParams, tomograms: TomogramSet) -> list[_Surface]:
    """Vesicles of the points file, fitted and sampled (all before the job starts)."""
    picks: PickTable = read_pick_file(params.i, params.format, csv_unit=params.csv_unit)
    located = locate_picks(picks, tomograms, binning=params.bin, tomo_name=params.tomo_name)
    if params.shape not in ("sphere", "ellipsoid", "points"):
        raise InputError(f"--shape must be sphere, ellipsoid or points, got {params.shape!r}")
    groups = (
        picks.table["group"].to_numpy()
        if "group" in picks.table
        else np.zeros(len(picks.table), dtype=int)
    )
    keys = np.array([f"{t}\x00{g}" for t, g in zip(located.names, groups, strict=True)])
    surfaces = []
    for k, key in enumerate(pd.unique(keys)):
        rows = np.flatnonzero(keys == key)
        tomo, group = key.split("\x00")
        what = f"{params.i}: tomogram {tomo}, vesicle {group}"
        sampled = []  # (points, normals, note) of each surface of this vesicle
        if located.radius is not None:  # one sphere per row
            fits = [Ellipsoid.sphere(located.centred[r], located.radius[r]) for r in rows]
        elif params.shape == "points":
            points, normals = sample_point_surface(located.centred[rows], params.spacing, what)
            sampled.append((points, normals, f"traced by {len(rows)} points"))
            fits = []
        elif params.shape == "sphere":
            fits = [fit_sphere(located.centred[rows], what)]
        else:
            fits = [fit_ellipsoid(located.centred[rows], what)]
        for surface in fits:
            axes = "/".join(f"{a:.0f}" for a in surface.axes)
            note = f"semi-axes {axes} Å, fit rms {surface.rms:.1f} Å"
            sampled.append((*sample_ellipsoid(surface, params.spacing), note))
        series = tomograms[tomo]
        for j, (points, normals, note) in enumerate(sampled):
            inside = inside_tomogram(points, series.tomogram_size, series.pixel_size)
            surfaces.append(
                _Surface(
                    tomo,
                    f"{k + 1}" if len(sampled) == 1 else f"{k + 1}.{j + 1}",
                    points[inside],
                    normals[inside],
                    f"{note}, {np.count_nonzero(~inside)} outside the tomogram",
                )
            )
    return surfaces


def _masked(params: PickSurfaceParams, tomograms: TomogramSet) -> list[_Surface]:
    """Objects of the segmentation mask, sampled (all before the job starts)."""
    name = params.tomo_name or (tomograms.names[0] if len(tomograms) == 1 else "")
    if name not in tomograms:
        raise InputError(f"--tomo_name {name!r} is not a tomogram of {params.tomograms}")
    series = tomograms[name]
    volume, header_px = read_mrc(params.mask)
    b = tomogram_binning(series, params.bin, header_px)
    expected = binned_shape(series.tomogram_size, b)
    found = tuple(volume.shape[::-1])
    if any(abs(f - e) > 1 for f, e in zip(found, expected, strict=True)):
        raise InputError(
            f"{found[0]}x{found[1]}x{found[2]} voxels is not tomogram {name} binned by {b:g} "
            f"({expected[0]}x{expected[1]}x{expected[2]}): give --bin",
            file=params.mask,
        )
    voxel = b * series.pixel_size
    surfaces = []
    for k, (points, normals) in enumerate(mask_surfaces(volume.numpy(), params.spacing / voxel)):
        centred = centred_angst(
            points,
            "voxel",
            binning=b,
            pixel_size=series.pixel_size,
            tomogram_size=series.tomogram_size,
        )
        surfaces.append(_Surface(name, str(k + 1), centred, normals, "segmented object"))
    if not surfaces:
        raise InputError("no object of the mask is large enough to sample", file=params.mask)
    return surfaces


def run(params: PickSurfaceParams) -> dict[str, str]:
    """Fit and sample the surfaces; returns ``{output path: RELION node type}``."""
    if bool(params.i) == bool(params.mask):
        raise InputError("give exactly one of --i (points) and --mask (segmentation)")
    if not params.spacing > 0:
        raise InputError(f"--spacing must be given and positive, got {params.spacing:g}")
    tomograms = TomogramSet.read(params.tomograms)
    surfaces = _masked(params, tomograms) if params.mask else _fitted(params, tomograms)
    names = np.concatenate([[s.tomo] * len(s.centred) for s in surfaces])
    particles = ParticleSet.from_tables(
        surface_particle_rows(
            names,
            np.concatenate([s.centred for s in surfaces]),
            np.concatenate([s.normals for s in surfaces]),
        )
    )
    mode = "spheres" if params.i and params.shape == "sphere" else "surfaces"
    inputs = {params.i: "ParticleGroupMetadata.star"} if params.i else {params.mask: "Mask3D.mrc"}
    inputs[params.tomograms] = "TomogramGroupMetadata.star"
    with run_job(
        "Picks",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        star = job.path("particles.star")
        particles.write(star)
        OptimisationSet(
            particles=Path(relative_to_cwd(star)), tomograms=Path(params.tomograms)
        ).write(job.path("optimisation_set.star"))
        outputs[job.alias + "particles.star"] = (
            f"ParticleGroupMetadata.star.relion.tomo.manualpick.{mode}"
        )
        outputs[job.alias + "optimisation_set.star"] = (
            "TomoOptimisationSet.star.relion.tomo.manualpick"
        )
        rows = [
            {"tomogram": s.tomo, "surface": s.label, "particles": len(s.centred), "fit": s.note}
            for s in surfaces
        ]
        log.info("%d particles on %d surfaces", len(particles), len(surfaces))
        write_job_report(
            job,
            outputs,
            summary={"spacing (Å)": f"{params.spacing:g}", "particles": len(particles)},
            tables={"surfaces": rows},
        )
    return outputs
