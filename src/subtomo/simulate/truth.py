"""The simulator's true tilt-series alignment put on tilt series processed from its movies.

The upstream jobs (import → motioncorr → ctffind → exclude-tilts) do not align tilt series;
RELION's "Align tilt series" and "Reconstruct tomograms" jobs add the alignment
(rlnTomoXTilt/YTilt/ZRot, rlnTomoX/YShiftAngst, relion5-upstream.md §5.1) and the tomogram
size (rlnTomoSizeX/Y/Z, §6). To run Extract and Reconstruct on the upstream result with the
known alignment, :func:`with_true_alignment` copies those columns from the simulator's
``tomograms.star``, matching series by ``rlnTomoName`` and tilts by nominal stage tilt (the
row order differs between jobs, §0). Everything the upstream jobs measured (defocus, dose,
hand, pixel size) is kept as they wrote it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from subtomo.data import ParticleSet, TomogramSet, Trajectories
from subtomo.errors import InputError
from subtomo.reconstruct.particles import series_geometry
from subtomo.tilt.external_alignment import ALIGNMENT_COLUMNS

__all__ = ["TOMOGRAM_COLUMNS", "alignment_error", "image_position_error", "with_true_alignment"]

#: Global columns of a reconstructed tomogram (unbinned tilt-series pixels).
TOMOGRAM_COLUMNS = ("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ")

_TILT = "rlnTomoNominalStageTiltAngle"


def with_true_alignment(processed: TomogramSet, truth: TomogramSet) -> TomogramSet:
    """``processed`` with the alignment and tomogram size of ``truth`` (same names; each
    processed tilt matched to the true tilt of the same nominal stage tilt, to 0.01°).

    Raises :class:`InputError` for a series or a tilt the truth does not have.
    """
    tables: dict[str, pd.DataFrame] = {}
    sizes = []
    for series in processed:
        if series.name not in truth:
            raise InputError(f"no tilt series {series.name!r} in the truth", file=truth.source)
        true = truth[series.name]
        tilts = series.tilts.drop(columns=list(ALIGNMENT_COLUMNS), errors="ignore")
        key = tilts[_TILT].round(2)
        aligned = true.tilts.assign(**{_TILT: true.tilts[_TILT].round(2)}).set_index(_TILT)
        missing = sorted(set(key) - set(aligned.index))
        if missing:
            raise InputError(f"{series.name}: no true tilt at {missing} deg", file=true.tilt_file)
        values = aligned.loc[key, list(ALIGNMENT_COLUMNS)].reset_index(drop=True)
        tables[series.name] = pd.concat([tilts.reset_index(drop=True), values], axis=1)
        sizes.append(true.tomogram_size)
    table = processed.global_table.drop(columns=list(TOMOGRAM_COLUMNS), errors="ignore")
    for axis, column in enumerate(TOMOGRAM_COLUMNS):
        table[column] = [size[axis] for size in sizes]
    return TomogramSet.from_tables(table.reset_index(drop=True), tables)


def _image_positions(matrices: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``(t, n, 2)`` image positions of ``(n, 3)`` points under ``(t, 4, 4)`` matrices."""
    return (matrices[:, None, :2, :3] @ points[None, :, :, None])[..., 0] + matrices[:, None, :2, 3]


def alignment_error(
    true_matrices: torch.Tensor,
    matrices: torch.Tensor,
    tomogram_size: tuple[int, int, int],
    points: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far an alignment puts specimen points from where the true one does, up to the rigid
    motion of the specimen that no alignment can see (the gauge).

    Points on a ``points³`` grid through the tomogram ``(W, H, D)`` (bin-1 px); the rigid
    motion ``G`` (rotation about the centre and translation) minimising
    ``Σ |P(G p) - P_true(p)|²`` is fitted (Gauss-Newton); returns the per-tilt RMS distance
    ``(t,)`` (px) after it and ``G`` ``(4, 4)``.
    """
    size = torch.tensor(tomogram_size, dtype=torch.float64)
    axes = [torch.linspace(0.05, 0.95, points, dtype=torch.float64) * s for s in size]
    p = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    centre = size / 2
    target = _image_positions(true_matrices.double(), p)
    matrices = matrices.double()
    g = torch.eye(4, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    for _ in range(4):
        moved = p @ g[:3, :3].T + g[:3, 3]
        res = (target - _image_positions(matrices, moved)).reshape(-1, 1)
        # δ(moved) = ω × (moved - centre) + δt = -[q]x ω + δt
        q = moved - centre
        skew = torch.zeros(len(p), 3, 3, dtype=torch.float64)
        skew[:, 0, 1], skew[:, 0, 2] = q[:, 2], -q[:, 1]
        skew[:, 1, 0], skew[:, 1, 2] = -q[:, 2], q[:, 0]
        skew[:, 2, 0], skew[:, 2, 1] = q[:, 1], -q[:, 0]
        jac = matrices[:, None, :2, :3] @ torch.cat([skew, eye.expand(len(p), 3, 3)], -1)
        step = torch.linalg.lstsq(jac.reshape(-1, 6), res).solution[:, 0]
        angle = float(step[:3].norm())
        rot = eye.clone()
        if angle > 0:
            k = step[:3] / angle
            kx = torch.zeros(3, 3, dtype=torch.float64)
            kx[0, 1], kx[0, 2], kx[1, 2] = -k[2], k[1], -k[0]
            kx = kx - kx.T
            rot = rot + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx
        update = torch.eye(4, dtype=torch.float64)
        update[:3, :3] = rot
        update[:3, 3] = centre - rot @ centre + step[3:]
        g = update @ g
    moved = p @ g[:3, :3].T + g[:3, 3]
    distance = (target - _image_positions(matrices, moved)).square().sum(-1)
    return distance.mean(-1).sqrt(), g


def _particle_image_positions(
    tomograms: TomogramSet, particles: ParticleSet, motion: Trajectories | None
) -> dict[str, torch.Tensor]:
    """``{rlnTomoParticleName: (t, 2)}`` image positions (bin-1 px, §1.3, trajectories in)."""
    names = particles.particles["rlnTomoParticleName"].astype(str).to_numpy()
    out: dict[str, torch.Tensor] = {}
    for tomo in dict.fromkeys(particles.tomo_names):
        rows = np.flatnonzero(particles.tomo_names == tomo)
        series = tomograms[tomo]
        geo = series_geometry(particles.subset(rows), series, motion, series.tomogram_size[:2])
        out.update(zip(names[rows], geo.uv, strict=True))
    return out


def image_position_error(
    truth: tuple[TomogramSet, ParticleSet, Trajectories | None],
    found: tuple[TomogramSet, ParticleSet, Trajectories | None],
) -> tuple[float, float]:
    """How far ``found`` (tomograms, particles, trajectories) puts the particles in the tilt
    images from where ``truth`` does (the simulator's true alignment, particles and motion),
    matched by rlnTomoParticleName: the RMS distance (px) over every (particle, tilt) pair,
    and the RMS over the tilts of each series of the mean displacement of their particles
    (the error of the per-tilt shifts). Tilt series must have the same tilts in both."""
    true_uv = _particle_image_positions(*truth)
    found_uv = _particle_image_positions(*found)
    tomo = dict(zip(found[1].particles["rlnTomoParticleName"].astype(str), found[1].tomo_names,
                    strict=True))  # fmt: skip
    by_series: dict[str, list[torch.Tensor]] = {}
    for name, uv in found_uv.items():
        by_series.setdefault(tomo[name], []).append(uv - true_uv[name])
    d = [torch.stack(v) for v in by_series.values()]  # (n_s, t, 2) each
    pairs = torch.cat([x.reshape(-1, 2) for x in d])
    tilts = torch.cat([x.mean(0) for x in d])
    return float(pairs.square().sum(-1).mean().sqrt()), float(tilts.square().sum(-1).mean().sqrt())
