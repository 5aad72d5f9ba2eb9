"""Tomograms of a simulation (crowded tomograms for picking benchmarks), with an optional
carbon edge.

:func:`simulated_tomograms` renders each tilt series of a :class:`~subtomo.simulate.Simulation`
(particles of several species at known, non-overlapping positions and orientations, CTF,
dose and noise), adds the carbon film's projection when asked, and reconstructs it with
:func:`subtomo.tilt.tomogram.reconstruct_wbp` at bin 1 (voxel = the tilt-series pixel, so a
"bin 4" tomogram is simulated at its binned pixel size directly), CTF phase-flipped per depth
strip, from the tables' projection matrices as ``subtomo reconstruct-tomograms`` would.
Voxel ``(i, j, k)`` sits at tomogram position ``(i, j, k)`` px (§1.3), so the truth's
rlnCenteredCoordinate*Angst are at voxel ``C/px + (W/2, H/2, D/2)``.

**Carbon edge** (:class:`CarbonEdge`): a film of uniform density filling a slab of the
tomogram, ``|z − D/2| < thickness/2``, on one side of a straight edge in the xy plane,
``x cos θ + y sin θ > offset`` (px from the tomogram centre). Each tilt image gets its exact
line integral (the length of the ray through the slab beyond the edge, along
``R_fᵀ e_z``), blurred by one pixel, with the tilt's central CTF and dose weight, dark like
protein; it is added after the noise (its own shot noise is not modelled).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from subtomo.ctf import ctf_2d, dose_weights
from subtomo.data import TomogramSet
from subtomo.fourier import fftfreq_grid
from subtomo.simulate.simulate import Simulation
from subtomo.tilt.tomogram import reconstruct_wbp, series_ctf, tomogram_grid

__all__ = ["CarbonEdge", "carbon_edge_images", "simulated_tomograms"]


@dataclass(frozen=True)
class CarbonEdge:
    """A carbon film beyond an edge: edge normal ``angle_deg`` (from tomogram x towards y),
    ``offset_px`` from the tomogram centre along it, film ``thickness_px`` and ``density``
    (times the 99th percentile of the first species' map: ~2.5 for carbon against
    protein, both relative to ice)."""

    angle_deg: float = 30.0
    offset_px: float = 60.0
    thickness_px: float = 20.0
    density: float = 2.5


def carbon_edge_images(
    carbon: CarbonEdge,
    matrices: torch.Tensor,
    tomogram_size: tuple[int, int, int],
    image_size: tuple[int, int],
) -> torch.Tensor:
    """Line integrals ``(t, h, w)`` float64 (in voxel-lengths of unit density) of the film
    seen by ``(t, 4, 4)`` projection matrices (§1.3)."""
    w, h = image_size
    inverse = torch.linalg.inv(torch.as_tensor(matrices, dtype=torch.float64))  # image -> tomo
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    image = torch.stack([u, v, torch.zeros_like(u), torch.ones_like(u)], dim=-1)  # (h, w, 4)
    start = torch.einsum("tij,hwj->thwi", inverse, image)[..., :3]  # depth 0 on each ray
    ray = inverse[:, :3, 2]  # (t, 3): R_fᵀ e_z, unit
    centre = torch.tensor(tomogram_size, dtype=torch.float64) / 2.0
    p = start - centre
    bz = ray[:, 2, None, None]
    half = carbon.thickness_px / 2.0
    s1, s2 = (-half - p[..., 2]) / bz, (half - p[..., 2]) / bz
    low, high = torch.minimum(s1, s2), torch.maximum(s1, s2)
    theta = math.radians(carbon.angle_deg)
    normal = torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)
    along = ray[:, :2] @ normal  # (t,)
    at0 = p[..., :2] @ normal - carbon.offset_px  # (t, h, w): > 0 beyond the edge at s = 0
    a = along[:, None, None]
    parallel = a.abs() <= 1e-12  # the ray runs along the edge: all in or all out
    crossing = -at0 / torch.where(parallel, torch.ones_like(a), a)
    low = torch.where(~parallel & (a > 0), torch.maximum(low, crossing), low)
    high = torch.where(~parallel & (a < 0), torch.minimum(high, crossing), high)
    return torch.where(parallel & (at0 <= 0), 0.0, (high - low).clamp_min(0.0))


def _filtered(images: torch.Tensor, sim: Simulation, name: str) -> torch.Tensor:
    """Images blurred by one pixel (Gaussian), with each tilt's CTF and dose weight."""
    h, w = images.shape[-2:]
    tilts = sim.tilt_tables[name]
    px = sim.params.pixel_size
    k2 = (fftfreq_grid((h, w), dtype=torch.float64) ** 2).sum(-1)  # cycles/px
    weight = torch.exp(-2.0 * math.pi**2 * k2) * dose_weights(
        torch.tensor(tilts["rlnMicrographPreExposure"].to_numpy()), px, (h, w)
    )
    if sim.params.ctf:
        col = {c: torch.tensor(tilts[c].to_numpy())
               for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")}  # fmt: skip
        weight = weight * ctf_2d(
            col["rlnDefocusU"], col["rlnDefocusV"], col["rlnDefocusAngle"], sim.params.voltage,
            sim.params.cs, sim.params.amplitude_contrast, px, (h, w),
        )  # fmt: skip
    return torch.fft.irfft2(torch.fft.rfft2(images) * weight, s=(h, w))


def simulated_tomograms(
    sim: Simulation, *, carbon: CarbonEdge | None = None, ctf: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(rlnTomoName, tomogram (D, H, W) float32)`` for each simulated series in turn: WBP at
    bin 1, phase-flipped per depth strip when ``ctf`` (and the simulation has a CTF)."""
    tables = TomogramSet.from_tables(sim.global_table, sim.tilt_tables)
    size = tuple(int(s) for s in sim.params.tomogram_size)
    image_size = (size[0], size[1])
    scale = float(torch.quantile(sim.maps[0].flatten().float(), 0.99))
    for name, images in sim.tilt_series():
        series = tables[name]
        matrices = series.projection_matrices(image_size)
        if carbon is not None:
            film = carbon_edge_images(carbon, matrices, size, image_size)
            images = images - (carbon.density * scale * _filtered(film, sim, name)).to(images)
        grid = tomogram_grid(matrices, size, image_size, 1)
        flip = None
        if ctf and sim.params.ctf:
            flip = series_ctf(series)
        yield name, reconstruct_wbp(images, grid, ctf=flip, pixel_size=series.pixel_size)
