"""Rigid alignment of maps: one map onto another (both hands), and onto symmetry axes.

Maps are zyx real-space volumes with their centre at ``n//2``; rotations are RELION matrices
acting on xyz. :func:`transform_volume` is ``out(u) = V(R^T (u - s))`` about the centre: the
map rotated by ``R`` and then moved by ``s``. :func:`align_maps` searches a global HEALPix
grid of rotations on low-passed, downsampled copies with every translation at once (FFT
cross-correlation), refines the best candidates locally (angular step halved four times),
for the map and its mirror image (:func:`mirror_z`), and reports the Pearson correlation of
the two maps low-passed to the comparison resolution inside a soft sphere. A de novo map's
hand and frame are arbitrary, so this is how it is compared with the truth.
:func:`symmetry_frame` finds the rotation that puts a map's symmetry axes on the point
group's standard axes (§4), as ``relion_align_symmetry`` does after a C1 initial model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from subtomo.fourier import lowpass_map
from subtomo.geometry.orientations import local_orientations, orientation_grid
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.masks import soft_sphere

__all__ = [
    "MapAlignment",
    "align_maps",
    "centre_of_mass_shift",
    "masked_correlation",
    "mirror_z",
    "symmetrise_volume",
    "symmetry_frame",
    "transform_volume",
]

COARSE_BOX = 24
"""Box (voxels) of the downsampled maps of the global search."""

REFINE_LEVELS = 4
"""Local refinement rounds after the global grid, each halving the angular step."""


@dataclass(frozen=True)
class MapAlignment:
    """``moving`` -> ``fixed``: ``transform_volume(mirror_z(moving) if mirrored else moving,
    rotation, shift_px)`` matches ``fixed`` with Pearson ``correlation`` (at the comparison
    resolution, inside the mask); ``other_hand_correlation`` is the best of the other hand
    (``None`` when only one hand was searched)."""

    rotation: torch.Tensor
    shift_px: torch.Tensor
    mirrored: bool
    correlation: float
    other_hand_correlation: float | None = None


def mirror_z(volume: torch.Tensor) -> torch.Tensor:
    """The mirror image through the xy plane through the centre (z -> -z): index ``i`` of the
    z axis (the first of the last three) goes to ``(n - i) mod n``, so ``n//2`` stays put."""
    return torch.roll(torch.flip(volume, dims=(-3,)), 1, dims=-3)


def transform_volume(
    volume: torch.Tensor,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor | None = None,
    *,
    size: int | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``(B, m, m, m)``: ``out_b(u) = V(R_b^T (scale u - s_b))`` (trilinear, zero outside).

    ``volume`` ``(n, n, n)``; ``rotations`` ``(B, 3, 3)``; ``shifts_px`` ``(B, 3)`` xyz voxels
    of ``volume``; ``u`` are xyz voxel positions from the output centre ``m//2`` (``m`` =
    ``size`` or ``n``), so ``scale > 1`` samples the map more coarsely (low-pass it first).
    """
    n = volume.shape[-1]
    m = size or n
    real = volume.dtype
    rot = rotations.to(volume.device, real)
    ax = (torch.arange(m, device=volume.device, dtype=real) - m // 2) * scale
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    u = torch.stack([x, y, z], dim=-1)[None]  # (1, m, m, m, 3)
    if shifts_px is not None:
        u = u - shifts_px.to(volume.device, real)[:, None, None, None, :]
    src = torch.einsum("b...j,bjk->b...k", u.expand(rot.shape[0], -1, -1, -1, -1), rot)
    grid = (src + n // 2) * (2.0 / (n - 1)) - 1.0
    vol = volume[None, None].expand(rot.shape[0], 1, n, n, n)
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, 0]


def masked_correlation(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Pearson correlation of two maps weighted by ``mask`` (means taken under the mask)."""
    w = mask.double() / mask.double().sum()
    a, b = a.double(), b.double()
    da, db = a - (w * a).sum(), b - (w * b).sum()
    den = math.sqrt(float((w * da * da).sum() * (w * db * db).sum()))
    return float((w * da * db).sum()) / den if den > 0 else 0.0


def _normalised(x: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit norm over the last three axes."""
    x = x - x.mean(dim=(-3, -2, -1), keepdim=True)
    return x / x.flatten(-3).norm(dim=-1).clamp(min=1e-30)[..., None, None, None]


def _best_shifts(
    fixed_f: torch.Tensor, moving: torch.Tensor, max_shift: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cyclic shift of each of ``moving`` ``(B, m, m, m)`` onto the map whose FFT is
    ``fixed_f``: scores ``(B,)`` (normalised cross-correlation) and shifts ``(B, 3)`` xyz
    voxels (``|s| <= max_shift``)."""
    m = moving.shape[-1]
    cc = torch.fft.irfftn(fixed_f * torch.fft.rfftn(_normalised(moving), dim=(-3, -2, -1)).conj(),
                          s=(m, m, m), dim=(-3, -2, -1))  # fmt: skip
    idx = torch.fft.fftfreq(m, 1.0 / m, device=moving.device)
    iz, iy, ix = torch.meshgrid(idx, idx, idx, indexing="ij")
    far = (ix**2 + iy**2 + iz**2) > max_shift**2
    cc = cc.masked_fill(far, -torch.inf).flatten(1)
    score, arg = cc.max(dim=1)
    shifts = torch.stack([ix.flatten()[arg], iy.flatten()[arg], iz.flatten()[arg]], dim=1)
    return score, shifts


def _search(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    rotations: torch.Tensor,
    scale: float,
    size: int,
    max_shift_px: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(B,)`` and best shifts ``(B, 3)`` (voxels of the full map) of ``rotations``."""
    ident = torch.eye(3, dtype=fixed.dtype, device=fixed.device)[None]
    fixed_f = torch.fft.rfftn(
        _normalised(transform_volume(fixed, ident, size=size, scale=scale)), dim=(-3, -2, -1)
    )
    scores, shifts = [], []
    for r in rotations.split(chunk):
        w = transform_volume(moving, r, size=size, scale=scale)
        s, t = _best_shifts(fixed_f, w, max_shift_px / scale)
        scores.append(s)
        shifts.append(t * scale)
    return torch.cat(scores), torch.cat(shifts)


def _refine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    starts: torch.Tensor,
    step_deg: float,
    scale: float,
    size: int,
    max_shift_px: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Local refinement from each of ``starts`` ``(c, 3, 3)``: the best rotation, shift and
    score after :data:`REFINE_LEVELS` rounds of neighbours within one step, step halved."""
    best_r, best_s, best = starts[0], torch.zeros(3, dtype=fixed.dtype), -math.inf
    for r0 in starts:
        r, step = r0, step_deg
        for _ in range(REFINE_LEVELS):
            cand = local_orientations(r[None].double(), step, step / 2, n_sigma=1.0)[0][0]
            score, shift = _search(
                fixed, moving, cand.to(fixed.dtype), scale, size, max_shift_px, chunk
            )
            i = int(score.argmax())
            r, s, sc = cand[i].to(fixed.dtype), shift[i], float(score[i])
            step /= 2
        if sc > best:
            best_r, best_s, best = r, s, sc
    return best_r, best_s, best


def align_maps(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    pixel_size: float,
    resolution_angst: float,
    *,
    mirror: bool = True,
    max_shift_angst: float | None = None,
    healpix_order: int = 2,
    candidates: int = 3,
    chunk: int = 256,
) -> MapAlignment:
    """Rotation, shift (and hand, with ``mirror``) that best put ``moving`` onto ``fixed``.

    Both maps ``(n, n, n)`` at ``pixel_size`` Å are low-passed to ``resolution_angst``. The
    global search runs on :data:`COARSE_BOX`-voxel copies over the HEALPix grid of
    ``healpix_order`` (C1) with every translation up to ``max_shift_angst`` (default a quarter
    of the box); the ``candidates`` best rotations are refined locally on copies sampled at a
    third of the resolution. The correlation is taken at full sampling within a soft sphere
    of the box.
    """
    n = fixed.shape[-1]
    dtype = torch.float32
    fixed_lp = lowpass_map(fixed.to(dtype), resolution_angst, pixel_size)
    max_shift = (max_shift_angst / pixel_size) if max_shift_angst is not None else n / 4
    coarse_scale = max(1.0, n / COARSE_BOX)
    fine_scale = max(1.0, resolution_angst / (3 * pixel_size))
    fine_size = math.ceil(n / fine_scale / 2) * 2
    coarse_lp = lowpass_map(fixed.to(dtype), max(resolution_angst, 2.5 * coarse_scale * pixel_size),
                            pixel_size)  # fmt: skip
    grid = orientation_grid(healpix_order)[1].to(dtype)
    step = 360.0 / (6 * 2**healpix_order)
    mask = soft_sphere((n, n, n), n / 2 - 4, 3.0, device=fixed.device)
    results = []
    for mirrored in (False, True) if mirror else (False,):
        mov = mirror_z(moving) if mirrored else moving
        mov = mov.to(dtype)
        mov_coarse = lowpass_map(mov, max(resolution_angst, 2.5 * coarse_scale * pixel_size),
                                 pixel_size)  # fmt: skip
        score, _ = _search(coarse_lp, mov_coarse, grid, coarse_scale, COARSE_BOX, max_shift, chunk)
        starts = grid[torch.topk(score, min(candidates, len(score))).indices]
        mov_lp = lowpass_map(mov, resolution_angst, pixel_size)
        rot, shift, _ = _refine(fixed_lp, mov_lp, starts, step, fine_scale, fine_size,
                                max_shift, chunk)  # fmt: skip
        placed = transform_volume(mov_lp, rot[None], shift[None])[0]
        cc = masked_correlation(fixed_lp, placed, mask)
        results.append(MapAlignment(rot.double(), shift.double(), mirrored, cc))
    best = max(results, key=lambda a: a.correlation)
    other = [a.correlation for a in results if a is not best]
    return MapAlignment(
        best.rotation, best.shift_px, best.mirrored, best.correlation, other[0] if other else None
    )


def centre_of_mass_shift(volume: torch.Tensor) -> torch.Tensor:
    """Shift ``(3,)`` xyz voxels that moves the centre of the positive density to ``n//2``."""
    n = volume.shape[-1]
    w = volume.double().clamp(min=0)
    ax = torch.arange(n, dtype=torch.float64, device=volume.device) - n // 2
    total = w.sum().clamp(min=1e-30)
    return (
        -torch.stack(
            [(w.sum((0, 1)) * ax).sum(), (w.sum((0, 2)) * ax).sum(), (w.sum((1, 2)) * ax).sum()]
        )
        / total
    )


def symmetrise_volume(volume: torch.Tensor, symmetry: str) -> torch.Tensor:
    """The average of ``volume`` over the point group's rotations (about the centre)."""
    ops = symmetry_matrices(symmetry, device=volume.device).to(volume.dtype)
    return transform_volume(volume, ops).mean(0)


def symmetry_frame(
    volume: torch.Tensor,
    symmetry: str,
    pixel_size: float,
    resolution_angst: float,
    *,
    healpix_order: int = 2,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rotation ``R`` and shift ``s`` (voxels) that put the map's symmetry axes on the point
    group's standard ones, and how symmetric it then is.

    The map is centred on its positive density (a point group's centre is its centre of
    mass); ``R`` maximises the correlation of ``transform_volume(V, R, s)`` with its
    symmetrised copy (at ``resolution_angst``): a global search over the HEALPix grid of the
    group's asymmetric unit on :data:`COARSE_BOX`-voxel copies, then local refinement of the
    best, the step halved :data:`REFINE_LEVELS` times. Returns ``(R, s, correlation)``:
    ``transform_volume(V, R, s)`` is the map in the group's frame.
    """
    n = volume.shape[-1]
    dtype = torch.float32
    ops = symmetry_matrices(symmetry).to(dtype)[1:]
    lp = lowpass_map(volume.to(dtype), resolution_angst, pixel_size)
    shift = centre_of_mass_shift(lp).to(dtype)
    lp = transform_volume(lp, torch.eye(3, dtype=dtype)[None], shift[None])[0]
    coarse_scale = max(1.0, n / COARSE_BOX)
    coarse = lowpass_map(lp, max(resolution_angst, 2.5 * coarse_scale * pixel_size), pixel_size)

    def scores(vol: torch.Tensor, rots: torch.Tensor, scale: float, size: int) -> torch.Tensor:
        m = soft_sphere((size,) * 3, size / 2 - 2, 2.0).to(dtype)
        out = []
        for r in rots.split(chunk):
            w = _normalised(transform_volume(vol, r, size=size, scale=scale) * m)
            # symmetry copies of each rotated map: rotate by g, i.e. the rotation g R
            g = (ops[None] @ r[:, None]).reshape(-1, 3, 3)
            copies = _normalised(transform_volume(vol, g, size=size, scale=scale) * m)
            copies = copies.reshape(len(r), len(ops), *copies.shape[1:])
            out.append((w[:, None] * copies).sum((-3, -2, -1)).mean(1))
        return torch.cat(out)

    # the score is the same for R and g R; the grid's asymmetric unit is one of R ~ R g, so
    # its transposes cover one rotation of each set {g R}
    grid = orientation_grid(healpix_order, symmetry)[1].transpose(1, 2).to(dtype)
    coarse_scores = scores(coarse, grid, coarse_scale, COARSE_BOX)
    r = grid[int(coarse_scores.argmax())]
    step = 360.0 / (6 * 2**healpix_order)
    fine_scale = max(1.0, resolution_angst / (3 * pixel_size))
    fine_size = math.ceil(n / fine_scale / 2) * 2
    best = float(coarse_scores.max())
    for _ in range(REFINE_LEVELS):
        cand = local_orientations(r[None].double(), step, step / 2, n_sigma=1.0)[0][0].to(dtype)
        sc = scores(lp, cand, fine_scale, fine_size)
        r, best = cand[int(sc.argmax())], float(sc.max())
        step /= 2
    return r.double(), r.double() @ shift.double(), best
