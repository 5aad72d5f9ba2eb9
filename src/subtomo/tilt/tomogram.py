"""Tomograms from aligned tilt series: weighted back-projection (WBP) and SIRT, in z-slabs, with
per-tilt CTF phase flipping in depth strips (IMOD ctfphaseflip's job, done per voxel depth).

Geometry (conventions §1.3, relion5-upstream.md §6): binned voxel ``v = (i, j, k)`` (0-based,
xyz) sits at bin-1 tomogram position ``b·v``; tilt ``f`` sees it at binned image pixel
``P_f[:2]·[b·v; 1] / b`` and at depth ``dz = R_f[2]·(b·v − c_tomo)`` bin-1 pixels, where its
defocus is ``ΔU + hand·slope·px·dz`` (§1.4). Tilt images are binned by Fourier cropping, which
keeps pixel ``i`` of the binned image at bin-1 position ``b·i``.

Back-projection samples, for every voxel, each tilt's filtered image at that point: with CTF
correction the image is first phase-flipped at ``K`` depths (strips) spanning the volume's
depths, and each voxel interpolates linearly between the two strips around its own depth (one
trilinear ``grid_sample`` over ``(strip, v, u)``). The forward projection SIRT needs is
Joseph's ray-driven projector (bilinear lookups where each ray crosses the volume's slices: a
gather, much faster on the CPU than the exact adjoint of the back-projection, a scatter, and
its partner to 2%). Both run on CPU and CUDA through the same dense torch code. We
back-project ourselves because torch-reconstruct-tomogram 0.6 inserts Fourier slices of
patches, with no depth-dependent CTF correction and no SIRT; the hand of ours is checked
against the simulator's independent Fourier projector (``tests/test_tomograms.py``).

Memory: the volume once, one slab's sampling grid (``slab_elements`` voxel-tilt samples) and the
filtered strips of one group of tilts (``STRIP_BYTES``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from subtomo.ctf import ctf_2d, dose_weights
from subtomo.data import TiltSeries
from subtomo.geometry import tomogram_centre_px
from subtomo.io import numeric_column

__all__ = [
    "CtfParams",
    "TomogramGrid",
    "back_project",
    "fourier_bin",
    "project",
    "reconstruct_sirt",
    "reconstruct_wbp",
    "series_ctf",
    "strip_depths",
    "tomogram_grid",
]

SLAB_ELEMENTS = 1 << 23  # voxel-tilt samples per back-projection step (~0.2 GB of grid)
FFT_ELEMENTS = 1 << 24  # padded pixels per batch of filtered tilts (~0.2 GB of spectra)
STRIP_BYTES = 1 << 29  # filtered strips held at once (a group of tilts)


@dataclass(frozen=True)
class TomogramGrid:
    """The binned volume and, per tilt, the affine maps from binned voxel ``(x, y, z, 1)``.

    ``shape`` is ``(d, h, w)`` (zyx) in binned voxels; ``uv`` ``(t, 2, 4)`` gives binned image
    pixels; ``depth`` ``(t, 4)`` the depth in bin-1 pixels from the tomogram centre;
    ``image_shape`` the binned tilt images ``(h, w)``; ``binning`` b.
    """

    shape: tuple[int, int, int]
    image_shape: tuple[int, int]
    binning: int
    uv: torch.Tensor
    depth: torch.Tensor

    @property
    def depth_range(self) -> tuple[float, float]:
        """Smallest and largest voxel depth over all tilts (bin-1 pixels)."""
        d, h, w = self.shape
        corners = torch.tensor(
            [[x, y, z, 1.0] for x in (0, w - 1) for y in (0, h - 1) for z in (0, d - 1)],
            dtype=torch.float64,
        )
        depths = self.depth.cpu() @ corners.T
        return float(depths.min()), float(depths.max())


def tomogram_grid(
    matrices: torch.Tensor,
    tomogram_size: tuple[int, int, int],
    image_size: tuple[int, int],
    binning: int,
) -> TomogramGrid:
    """The binned grid of a bin-1 tomogram ``(W, H, D)`` seen by ``(t, 4, 4)`` RELION matrices
    (tilt images ``(w, h)``): ``round(W/b) x round(H/b) x floor(D/b)`` voxels, as RELION."""
    b = int(binning)
    nx, ny = (math.floor(s / b + 0.5) for s in tomogram_size[:2])
    nz = tomogram_size[2] // b
    p = torch.as_tensor(matrices, dtype=torch.float64).cpu()
    scale = torch.diag(torch.tensor([b, b, b, 1.0], dtype=torch.float64))
    uv = (p[:, :2] @ scale) / b
    rot_z = p[:, 2, :3]
    depth = torch.cat([rot_z * b, -(rot_z @ tomogram_centre_px(tomogram_size))[:, None]], dim=1)
    return TomogramGrid(
        shape=(nz, ny, nx),
        image_shape=(image_size[1] // b, image_size[0] // b),
        binning=b,
        uv=uv,
        depth=depth,
    )


def fourier_bin(images: torch.Tensor, binning: int) -> torch.Tensor:
    """``(..., h, w)`` -> ``(..., h//b, w//b)`` by cropping the Fourier transform (mean kept)."""
    b = int(binning)
    if b == 1:
        return images
    h, w = images.shape[-2:]
    hb, wb = h // b, w // b
    f = torch.fft.rfft2(images)
    rows = torch.cat([torch.arange((hb + 1) // 2), torch.arange(h - hb // 2, h)])
    f = f[..., rows.to(images.device), : wb // 2 + 1]
    return torch.fft.irfft2(f, s=(hb, wb)) * (hb * wb / (h * w))


@dataclass(frozen=True)
class CtfParams:
    """Per-tilt CTF of a series: defocus U/V (Å), angle and phase shift (deg) as ``(t,)``;
    voltage (kV), Cs (mm), amplitude contrast, hand (±1), defocus slope and ``px`` (Å).
    ``wiener`` > 0: each depth is multiplied by ``CTF / (CTF² + wiener)`` instead of the sign
    of its CTF (a Wiener filter per tilt and depth, conventions §21; WBP only)."""

    defocus_u: torch.Tensor
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor
    phase_shift: torch.Tensor
    voltage: float
    cs: float
    amplitude_contrast: float
    hand: int
    slope: float
    pixel_size: float
    wiener: float = 0.0


def series_ctf(series: TiltSeries) -> CtfParams:
    """The per-tilt CTF of a series' tables (rlnDefocusU required; V defaults to U, the
    angle and phase shift to 0)."""
    u = torch.from_numpy(series.defocus_u)
    has_v = "rlnDefocusV" in series.tilts.columns
    return CtfParams(
        u, torch.from_numpy(series.defocus_v) if has_v else u,
        torch.from_numpy(
            numeric_column(
                series.tilts, "rlnDefocusAngle", series.tilt_file, series.name, default=0.0
            )
        ),
        torch.from_numpy(series.phase_shift), series.voltage_kv, series.cs_mm,
        series.amplitude_contrast, series.hand, series.defocus_slope, series.pixel_size,
    )  # fmt: skip


def strip_depths(
    grid: TomogramGrid, ctf: CtfParams | None, strip_angst: float, ctf_3d: bool = False
) -> torch.Tensor:
    """Depths (bin-1 px) of the strips: one (0) without CTF, else evenly spaced over the
    volume's depths at most ``strip_angst`` apart (<= 0: so that the CTF phase at the binned
    Nyquist frequency moves by at most π/2 between strips). ``ctf_3d``: one binned voxel apart
    (3D CTF correction, conventions §21), or as many as one tilt's ``STRIP_BYTES`` hold."""
    if ctf is None:
        return torch.zeros(1, dtype=torch.float64)
    lo, hi = grid.depth_range
    if ctf_3d:  # at most STRIP_BYTES of strips per tilt (the memory bound)
        h, w = grid.image_shape
        count = max(2, math.ceil((hi - lo) / grid.binning) + 1)
        count = min(count, max(2, STRIP_BYTES // (4 * h * w)))
        return torch.linspace(lo, hi, count, dtype=torch.float64)
    if strip_angst <= 0:
        kv = ctf.voltage * 1e3
        wavelength = 12.2643247 / math.sqrt(kv * (1 + 0.978466e-6 * kv))
        nyquist = 1.0 / (2 * ctf.pixel_size * grid.binning)
        strip_angst = 0.5 / (wavelength * nyquist**2)
    extent = (hi - lo) * ctf.pixel_size * abs(ctf.slope)
    count = max(2, math.ceil(extent / strip_angst) + 1)
    return torch.linspace(lo, hi, count, dtype=torch.float64)


def _angular_shares(grid: TomogramGrid) -> torch.Tensor:
    """``(t,)`` each tilt's share Δθ of the angular range (radians): half the gaps to its
    neighbours in tilt angle, the full gap at either end."""
    tilt = torch.asin((-grid.depth[:, 0] / grid.binning).clamp(-1, 1))
    order = torch.argsort(tilt)
    sorted_tilt = tilt[order]
    share = torch.full_like(sorted_tilt, math.pi)
    if len(share) > 1:
        gaps = sorted_tilt.diff()
        share[1:-1] = (gaps[1:] + gaps[:-1]) / 2
        share[0], share[-1] = gaps[0], gaps[-1]
    out = torch.empty_like(share)
    out[order] = share
    return out


def _ramp(
    grid: TomogramGrid,
    shares: torch.Tensor,
    padded: tuple[int, int],
    sirt_like: int,
    device: torch.device,
) -> torch.Tensor:
    """``(t, hp, wp//2+1)`` WBP weights of the grid's tilts: ``|k⊥|·Δθ`` (k⊥ across the tilt
    axis in cycles per binned pixel, Δθ = ``shares``), or with ``sirt_like = n`` the filter
    that mimics n SIRT iterations, ``|k⊥|·(1 − (1 − k0/|k⊥|)^n)`` with ``k0`` one frequency
    step (flat above ~n·k0)."""
    rot = grid.uv[:, :, :3]
    axis = rot[:, :, 1] / rot[:, :, 1].norm(dim=1, keepdim=True)  # tilt axis in the image
    normal = torch.stack([axis[:, 1], -axis[:, 0]], dim=1).float().to(device)
    hp, wp = padded
    ky = torch.fft.fftfreq(hp, device=device)[:, None]
    kx = torch.fft.rfftfreq(wp, device=device)[None, :]
    k_perp = (normal[:, 0, None, None] * kx + normal[:, 1, None, None] * ky).abs()
    k0 = 1.0 / max(hp, wp)
    ramp = k_perp.clamp_min(0.5 * k0)
    if sirt_like > 0:
        ramp = ramp * (1 - (1 - k0 / ramp.clamp_min(k0)).pow(sirt_like))
    return ramp * shares.float().to(device)[:, None, None]


@dataclass(frozen=True)
class _Filter:
    """What multiplies each tilt's spectrum: the ramp (``shares`` Δθ per tilt and the SIRT-like
    iterations) and/or the dose weight (``pre_exposure`` e/Å², ``pixel_size`` bin-1 Å)."""

    shares: torch.Tensor | None = None
    sirt_like: int = 0
    pre_exposure: torch.Tensor | None = None
    pixel_size: float = 1.0

    def part(self, tilts: slice) -> _Filter:
        return replace(
            self,
            shares=None if self.shares is None else self.shares[tilts],
            pre_exposure=None if self.pre_exposure is None else self.pre_exposure[tilts],
        )

    @property
    def empty(self) -> bool:
        return self.shares is None and self.pre_exposure is None

    def weights(self, grid: TomogramGrid, padded: tuple[int, int], device) -> torch.Tensor:
        """``(t, hp, wp//2+1)`` for the grid's tilts (made per batch: never for all tilts)."""
        out = torch.ones(grid.uv.shape[0], padded[0], padded[1] // 2 + 1, device=device)
        if self.shares is not None:
            out = out * _ramp(grid, self.shares, padded, self.sirt_like, device)
        if self.pre_exposure is not None:
            out = out * dose_weights(
                self.pre_exposure, self.pixel_size * grid.binning, padded, device=device
            )
        return out


def _filtered_strips(
    images: torch.Tensor,
    grid: TomogramGrid,
    depths: torch.Tensor,
    *,
    weights: _Filter,
    ctf: CtfParams | None,
    zero_mean: bool = True,
) -> torch.Tensor:
    """``(t, K, h, w)``: each binned tilt (made zero-mean), zero-padded 2x, multiplied in
    Fourier space by ``weights`` (ramp, dose) and, per strip, the sign of its CTF at the
    strip's depth (or its Wiener weight, ``ctf.wiener``); cropped back. ``grid`` and
    ``ctf`` hold these tilts only."""
    t, h, w = images.shape
    device = images.device
    if zero_mean:
        images = images - images.mean(dim=(-2, -1), keepdim=True)
    if weights.empty and ctf is None:
        return images[:, None].clone()
    out = torch.empty(t, len(depths), h, w, dtype=torch.float32, device=device)
    hp, wp = 2 * h, 2 * w
    chunk = max(1, FFT_ELEMENTS // (hp * wp))
    for f0 in range(0, t, chunk):
        f = slice(f0, min(t, f0 + chunk))
        spectrum = torch.fft.rfft2(images[f], s=(hp, wp))[:, None]  # (n, 1, hp, wp')
        if not weights.empty:
            part = replace(grid, uv=grid.uv[f], depth=grid.depth[f])
            spectrum = spectrum * weights.part(f).weights(part, (hp, wp), device)[:, None]
        if ctf is None:
            out[f] = torch.fft.irfft2(spectrum, s=(hp, wp))[..., :h, :w]
            continue
        shift = ctf.hand * ctf.slope * ctf.pixel_size * depths.cpu()  # ctf_2d moves them
        for k in range(len(depths)):  # one strip at a time: memory of one CTF grid
            values = ctf_2d(
                ctf.defocus_u[f].cpu() + shift[k],
                ctf.defocus_v[f].cpu() + shift[k],
                ctf.defocus_angle[f],
                ctf.voltage,
                ctf.cs,
                ctf.amplitude_contrast,
                ctf.pixel_size * grid.binning,
                (hp, wp),
                phase_shift_deg=ctf.phase_shift[f],
                device=device,
            )  # (n, hp, wp')
            if ctf.wiener > 0:
                values = values / (values.square() + ctf.wiener)
            else:
                values = values.sign()
            out[f, k] = torch.fft.irfft2(spectrum[:, 0] * values, s=(hp, wp))[..., :h, :w]
    return out


def _sampling_grid(
    grid: TomogramGrid, tilts: slice, z: slice, depths: torch.Tensor, device
) -> torch.Tensor:
    """``(n, nz, ny, nx, c)`` grid_sample coordinates in [-1, 1] (align_corners) of the voxels
    of slab ``z`` in ``n`` tilts: ``c = 2`` (u, v) with one strip, else 3 (u, v, strip)."""
    _, ny, nx = grid.shape
    h, w = grid.image_shape
    rows = [grid.uv[tilts, 0] * (2.0 / max(w - 1, 1)), grid.uv[tilts, 1] * (2.0 / max(h - 1, 1))]
    if len(depths) > 1:
        lo, hi = float(depths[0]), float(depths[-1])
        rows.append(grid.depth[tilts] * (2.0 / (hi - lo)))
        rows[-1][:, 3] -= lo * 2.0 / (hi - lo)
    maps = torch.stack(rows, dim=2).to(device=device, dtype=torch.float32)  # (n, 4, c)
    maps[:, 3] -= 1.0
    x = torch.arange(nx, dtype=torch.float32, device=device)[None, None, None, :, None]
    y = torch.arange(ny, dtype=torch.float32, device=device)[None, None, :, None, None]
    zs = torch.arange(z.start, z.stop, dtype=torch.float32, device=device)
    plane = maps[:, None, None, None, 0] * x + maps[:, None, None, None, 1] * y  # (n,1,ny,nx,c)
    depth = maps[:, None, 2] * zs[None, :, None] + maps[:, None, 3]  # (n, nz, c)
    coords = plane + depth[:, :, None, None]  # one pass over the slab
    if len(depths) > 1:
        coords[..., 2].clamp_(-1, 1)
    return coords


def _slabs(grid: TomogramGrid, n_tilts: int, slab_elements: int):
    """``(z slice, tilt slice)`` steps with at most ``slab_elements`` voxel-tilt samples."""
    nz, ny, nx = grid.shape
    plane = ny * nx
    tilts_per_step = max(1, min(n_tilts, slab_elements // plane))
    z_per_step = max(1, slab_elements // (plane * tilts_per_step))
    for z0 in range(0, nz, z_per_step):
        for t0 in range(0, n_tilts, tilts_per_step):
            yield slice(z0, min(nz, z0 + z_per_step)), slice(t0, min(n_tilts, t0 + tilts_per_step))


def back_project(
    strips: torch.Tensor,
    grid: TomogramGrid,
    depths: torch.Tensor,
    z: slice,
    tilts: slice,
) -> torch.Tensor:
    """Sum over ``tilts`` of ``strips`` ``(t, K, h, w)`` sampled at the voxels of slab ``z``:
    ``(nz, ny, nx)``; bilinear in the image, linear between strips. Voxels outside a tilt's
    image get nothing from it."""
    coords = _sampling_grid(grid, tilts, z, depths, strips.device)
    if len(depths) == 1:  # one strip: a 2D lookup is cheaper than the 3D one
        n, nz, ny, nx, _ = coords.shape
        sampled = F.grid_sample(
            strips[tilts],
            coords.reshape(n, nz * ny, nx, 2),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )
        return sampled.sum(dim=(0, 1)).reshape(nz, ny, nx)
    # several strips: one trilinear lookup over (strip, v, u); measured faster on the CPU than
    # bilinear lookups of the strips as channels weighted by depth
    sampled = F.grid_sample(
        strips[tilts, None], coords, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return sampled.sum(dim=(0, 1))


def _accumulate(
    strips: torch.Tensor,
    grid: TomogramGrid,
    depths: torch.Tensor,
    volume: torch.Tensor,
    factor: float,
    slab_elements: int,
    progress: Callable[[float], None] | None,
) -> None:
    """``volume += factor · back-projection of strips``, slab by slab, in place."""
    steps = list(_slabs(grid, strips.shape[0], slab_elements))
    for z, tilts in steps:
        volume[z] += factor * back_project(strips, grid, depths, z, tilts)
        if progress is not None:
            progress(1.0 / len(steps))


def project(
    volume: torch.Tensor,
    grid: TomogramGrid,
    depths: torch.Tensor,
    slab_elements: int = SLAB_ELEMENTS,
) -> torch.Tensor:
    """Ray sums of ``volume`` ``(d, h, w)`` into each tilt: ``(t, K, h/b, w/b)``.

    Joseph's projector: each ray along the beam is sampled where it crosses the volume's
    slices perpendicular to the axis closest to the beam (z up to 45° of tilt, else x),
    bilinearly in the slice, each sample weighted by the ray's length per slice; with ``K``
    strips a sample goes to the two strips around its depth with linear weights, so strip
    sums add up to the projection. One 2D lookup per slice and pixel: about 4x faster on the
    CPU than trilinear samples every voxel along the ray.
    """
    device = volume.device
    t, (h, w) = grid.uv.shape[0], grid.image_shape
    out = torch.zeros(t, len(depths), h, w, dtype=torch.float32, device=device)
    u = torch.arange(w, dtype=torch.float64)[None, :]
    v = torch.arange(h, dtype=torch.float64)[:, None]
    views = {
        2: (volume, (0, 1)),
        1: (volume.permute(1, 0, 2), (0, 2)),
        0: (volume.permute(2, 0, 1), (1, 2)),
    }  # axis -> (slices, (col axis, row axis))
    for f in range(t):
        forward = torch.cat([grid.uv[f], grid.depth[f : f + 1] / grid.binning])  # (3, 4)
        inverse = torch.linalg.inv(forward[:, :3])
        beam = inverse[:, 2]  # voxels per binned voxel of depth (xyz)
        start = (
            torch.stack(torch.broadcast_tensors(u, v, torch.zeros_like(u)), -1) - forward[:, 3]
        ) @ inverse.T  # (h, w, 3): the ray at depth 0, voxels (xyz)
        axis = int(beam.abs().argmax())
        slices, (col, row) = views[axis]
        n_slices, rows, cols = slices.shape
        # where the ray crosses slice i: start + (i - start_a) / beam_a * beam
        base = start - start[..., axis : axis + 1] / beam[axis] * beam  # (h, w, 3) at i = 0
        per_slice = beam / beam[axis]
        scale = torch.tensor([2.0 / max(cols - 1, 1), 2.0 / max(rows - 1, 1)], dtype=torch.float64)
        base2 = (base[..., [col, row]] * scale - 1).float().to(device)
        step2 = (per_slice[[col, row]] * scale).float().to(device)
        length = 1.0 / float(beam[axis].abs())
        chunk = max(1, slab_elements // (h * w * len(depths)))
        for i0 in range(0, n_slices, chunk):
            index = torch.arange(i0, min(n_slices, i0 + chunk), device=device)
            coords = base2 + index[:, None, None, None].float() * step2  # (n, h, w, 2)
            sampled = F.grid_sample(
                slices[index, None],
                coords,
                mode="bilinear",
                padding_mode="zeros",
                align_corners=True,
            )[:, 0]
            sampled = sampled * length
            if len(depths) == 1:
                out[f, 0] += sampled.sum(0)
                continue
            # depth (bin-1 px) of each sample: d = (i - start_a) / beam_a binned voxels
            depth = (
                (index[:, None, None].double().cpu() - start[..., axis]) / beam[axis] * grid.binning
            )  # (n, h, w)
            position = (depth - depths[0]) / (depths[1] - depths[0])
            k = torch.arange(len(depths), dtype=torch.float64)[:, None, None, None]
            hat = (1 - (position[None] - k).abs()).clamp_min(0).float().to(device)
            out[f] += (hat * sampled[None]).sum(1)
    return out


def _subset(grid: TomogramGrid, ctf: CtfParams | None, tilts: slice):
    """The grid and CTF of a group of tilts (strip depths stay those of the whole series)."""
    part = replace(grid, uv=grid.uv[tilts], depth=grid.depth[tilts])
    if ctf is None:
        return part, None
    return part, replace(
        ctf,
        defocus_u=ctf.defocus_u[tilts],
        defocus_v=ctf.defocus_v[tilts],
        defocus_angle=ctf.defocus_angle[tilts],
        phase_shift=ctf.phase_shift[tilts],
    )


def _groups(images: torch.Tensor, depths: torch.Tensor) -> list[slice]:
    """Tilt groups whose filtered strips take at most ``STRIP_BYTES``."""
    t, h, w = images.shape
    size = max(1, STRIP_BYTES // (4 * len(depths) * h * w))
    return [slice(g, min(t, g + size)) for g in range(0, t, size)]


def _back_project_filtered(
    images: torch.Tensor,
    grid: TomogramGrid,
    depths: torch.Tensor,
    volume: torch.Tensor,
    factor: float,
    *,
    ctf: CtfParams | None,
    weights: _Filter = _Filter(),
    zero_mean: bool = True,
    slab_elements: int = SLAB_ELEMENTS,
    progress: Callable[[float], None] | None = None,
) -> None:
    """``volume += factor · back-projection`` of the images filtered into strips, one group
    of tilts at a time (memory: one group's strips)."""
    t = images.shape[0]
    for g in _groups(images, depths):
        part, part_ctf = _subset(grid, ctf, g)
        strips = _filtered_strips(
            images[g],
            part,
            depths,
            weights=weights.part(g),
            ctf=part_ctf,
            zero_mean=zero_mean,
        )
        share = (g.stop - g.start) / t
        step = (lambda x, share=share: progress(x * share)) if progress is not None else None
        _accumulate(strips, part, depths, volume, factor, slab_elements, step)


def reconstruct_wbp(
    images: torch.Tensor,
    grid: TomogramGrid,
    *,
    ctf: CtfParams | None = None,
    pre_exposure: torch.Tensor | None = None,
    pixel_size: float = 1.0,
    sirt_like: int = 0,
    strip_angst: float = 0.0,
    ctf_3d: bool = False,
    slab_elements: int = SLAB_ELEMENTS,
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Weighted back-projection ``(d, h, w)`` of binned tilt images ``(t, h/b, w/b)``.

    ``ctf``: phase flip per depth strip (``ctf_3d``: strips one voxel apart, see
    :func:`strip_depths`); ``pre_exposure`` (e/Å², ``(t,)``): dose-weight each
    tilt (§1.5); ``pixel_size`` is bin-1 ``px`` in Å; ``sirt_like`` > 0 replaces the ramp by
    the SIRT-like filter of that many iterations.
    """
    device = images.device
    depths = strip_depths(grid, ctf, strip_angst, ctf_3d)
    weights = _Filter(_angular_shares(grid), sirt_like, pre_exposure, pixel_size)
    volume = torch.zeros(grid.shape, dtype=torch.float32, device=device)
    _back_project_filtered(
        images,
        grid,
        depths,
        volume,
        1.0,
        ctf=ctf,
        weights=weights,
        slab_elements=slab_elements,
        progress=progress,
    )
    return volume


def reconstruct_sirt(
    images: torch.Tensor,
    grid: TomogramGrid,
    *,
    iterations: int = 10,
    relaxation: float = 1.0,
    ctf: CtfParams | None = None,
    pre_exposure: torch.Tensor | None = None,
    pixel_size: float = 1.0,
    strip_angst: float = 0.0,
    ctf_3d: bool = False,
    slab_elements: int = SLAB_ELEMENTS,
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """SIRT ``(d, h, w)`` from zero: ``x += λ/t · Bᵀ R (b − B x)`` where ``B`` projects
    (:func:`project`) and, with ``ctf``, phase-flips each depth strip before summing the
    strips, ``Bᵀ`` is :func:`back_project` of the flipped strips, and ``R`` divides by each
    ray's length through the volume. ``ctf_3d``: strips one voxel apart. Raises
    ``ValueError`` for a Wiener-weighted ``ctf`` (its model is the phase flip)."""
    if ctf is not None and ctf.wiener > 0:
        raise ValueError("SIRT phase-flips: Wiener weighting is for WBP")
    device = images.device
    t = images.shape[0]
    depths = strip_depths(grid, ctf, strip_angst, ctf_3d)
    dose = _Filter(pre_exposure=pre_exposure, pixel_size=pixel_size)
    data = _filtered_strips(images, grid, torch.zeros(1), weights=dose, ctf=None)[:, 0]

    def model(volume: torch.Tensor) -> torch.Tensor:
        """``B x``: ray sums per strip, each strip phase-flipped, summed: ``(t, h, w)``."""
        out = torch.empty_like(data)
        for g in _groups(data, depths):
            part, part_ctf = _subset(grid, ctf, g)
            strips = project(volume, part, depths, slab_elements)
            if part_ctf is not None:  # the flip is its own adjoint
                strips = torch.stack(
                    [
                        _filtered_strips(
                            strips[:, k],
                            part,
                            depths[k : k + 1],
                            weights=_Filter(),
                            ctf=part_ctf,
                            zero_mean=False,
                        )[:, 0]
                        for k in range(len(depths))
                    ],
                    1,
                )
            out[g] = strips.sum(1)
        return out

    lengths = torch.cat(
        [
            project(
                torch.ones(grid.shape, device=device),
                _subset(grid, None, g)[0],
                depths[:1] * 0,
                slab_elements,
            )[:, 0]
            for g in _groups(data, depths)
        ]
    )
    inverse_length = 1.0 / lengths.clamp_min(1.0)
    volume = torch.zeros(grid.shape, dtype=torch.float32, device=device)
    for _ in range(iterations):
        residual = (data - model(volume)) * inverse_length
        step = (lambda x: progress(x / iterations)) if progress is not None else None
        _back_project_filtered(
            residual,
            grid,
            depths,
            volume,
            relaxation / t,
            ctf=ctf,
            zero_mean=False,
            slab_elements=slab_elements,
            progress=step,
        )
    return volume
