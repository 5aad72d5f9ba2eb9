"""Local resolution by windowed, phase-randomisation-corrected FSC between half maps.

Follows ``relion_postprocess --locres``: sample points on a grid ``sampling`` Å apart inside
a sphere of radius ``N/2 - mask_radius``; at each point weight both halves (and both
phase-randomised halves) with a soft sphere (radius ``mask_radius``, raised-cosine edge
``edge_width``), compute the corrected FSC and read its 0.143 crossing (capped at
``min_resolution``). The local-resolution map is the window-weighted harmonic mean of the
point resolutions; the filtered map blends the sum of the halves low-passed (and
FSC-weighted) at each point's resolution with the same window weights.

Differences from RELION, for speed: each window is cut out as a small box (zero-padded by
``padding``) instead of FSC-ing the whole box per point, the crossing is interpolated
between shells, and points sharing a filter shell share one filtered map (weighted by
their mean FSC). Maps are zyx cubes, centre ``N//2``; resolutions are Å.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from subtomo.fourier import (
    bfactor_weights,
    crossing_shells,
    filter_shell,
    fsc,
    irfft_centered,
    lowpass_weights,
    rfft_centered,
    shell_index,
)
from subtomo.masks import soft_sphere, squared_distance_to
from subtomo.postprocess.fsc_correction import corrected_fsc, randomize_phases_beyond
from subtomo.postprocess.sharpen import fsc_weights

__all__ = ["LocalResOptions", "LocalResResult", "local_resolution", "sample_points"]


@dataclass
class LocalResOptions:
    """``relion_postprocess --locres`` options (Å) plus batching."""

    sampling: float = 25.0  # --locres_sampling
    mask_radius: float = -1.0  # --locres_maskrad (default 0.5 * sampling)
    edge_width: float = -1.0  # --locres_edgwidth (default sampling)
    randomize_at: float = 25.0  # --locres_randomize_at
    min_resolution: float = 50.0  # --locres_minres
    bfactor: float = 0.0  # --adhoc_bfac applied to the filtered map
    filter_edge_width: int = 2  # --filter_edge_width
    padding: int = 1  # windows are zero-padded to padding x their box (at most N)
    batch_size: int = 32  # windows per batch
    random_seed: int = 0


@dataclass
class LocalResResult:
    """Local-resolution map (Å, 0 where no window reaches), filtered map, sample points."""

    resolution_map: torch.Tensor  # zyx
    filtered: torch.Tensor  # zyx
    points: torch.Tensor  # (n, 3) zyx voxel indices
    point_resolution: torch.Tensor  # (n,) Å


def sample_points(
    box: int,
    step: int,
    max_radius: float,
    *,
    within: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Grid points ``N//2 + k * step`` (zyx indices) closer than ``max_radius`` to the centre,
    and inside ``within`` (a boolean zyx volume) when given."""
    k = torch.arange(-(box // 2 // step), box // 2 // step + 1, device=device) * step
    grid = torch.stack(torch.meshgrid(k, k, k, indexing="ij"), -1).reshape(-1, 3)
    keep = torch.linalg.vector_norm(grid.float(), dim=-1) < max_radius
    pts = grid[keep] + box // 2
    pts = pts[((pts >= 0) & (pts < box)).all(-1)]
    if within is not None:
        pts = pts[within[pts[:, 0], pts[:, 1], pts[:, 2]]]
    return pts


def _window_index(corners: torch.Tensor, box: int, size: int) -> torch.Tensor:
    """Flat indices ``(b, box^3)`` of ``box``-cubes at ``corners`` (zyx) in a ``size``-cube."""
    o = torch.arange(box, device=corners.device)
    z = corners[:, 0, None, None, None] + o[:, None, None]
    y = corners[:, 1, None, None, None] + o[None, :, None]
    x = corners[:, 2, None, None, None] + o[None, None, :]
    return ((z * size + y) * size + x).reshape(corners.shape[0], -1)


def local_resolution(
    half1: torch.Tensor,
    half2: torch.Tensor,
    pixel_size: float,
    mask: torch.Tensor | None = None,
    options: LocalResOptions | None = None,
) -> LocalResResult:
    """Local resolution of two half maps (zyx cubes); ``mask`` (> 0.5 = inside) limits the
    sample points to windows that reach into it."""
    opt = options or LocalResOptions()
    n = half1.shape[-1]
    dev = half1.device
    px = pixel_size
    step = max(1, round(opt.sampling / px))
    rad = round((opt.mask_radius if opt.mask_radius > 0 else 0.5 * opt.sampling) / px)
    edge = round((opt.edge_width if opt.edge_width > 0 else opt.sampling) / px)
    reach = rad + edge
    box = 2 * reach + 2
    pbox = min(max(n, box), opt.padding * box)
    pbox += pbox % 2
    shape, wshape = (n, n, n), (pbox, pbox, pbox)

    within = None
    if mask is not None:
        within = squared_distance_to(mask.to(dev) > 0.5, reach) < reach * reach
    points = sample_points(n, step, n / 2 - rad, within=within, device=dev)

    # Phase-randomised halves beyond randomize_at (whole maps, once).
    f1 = rfft_centered(half1.float(), 3)
    f2 = rfft_centered(half2.float(), 3)
    gen = torch.Generator().manual_seed(opt.random_seed)
    shell_full = int(n * px / opt.randomize_at)
    maps = [half1.float(), half2.float()] + [
        irfft_centered(randomize_phases_beyond(f, shape, shell_full, gen), shape) for f in (f1, f2)
    ]
    padded = torch.stack([F.pad(m, (box,) * 6) for m in maps]).reshape(4, -1)  # (4, P^3)
    size = n + 2 * box
    window = soft_sphere((box,) * 3, rad, edge, device=dev).reshape(-1)
    index = shell_index(wshape, device=dev)
    shell_win = int(pbox * px / opt.randomize_at)

    curves, resolutions = [], []
    for start in range(0, points.shape[0], opt.batch_size):
        pts = points[start : start + opt.batch_size]
        idx = _window_index(pts - box // 2 + box, box, size)  # (b, box^3)
        cut = padded[:, idx] * window  # (4, b, box^3)
        # FSCs do not depend on where the window sits in the padded box: no centring.
        ft = torch.fft.rfftn(cut.reshape(4, -1, box, box, box), s=wshape, dim=(-3, -2, -1))
        fm = fsc(ft[0], ft[1], wshape, index=index).double()
        fr = fsc(ft[2], ft[3], wshape, index=index).double()
        fm[:, 0] = torch.where(fm[:, 0] <= 0, 1.0, fm[:, 0])
        fr[:, 0] = torch.where(fr[:, 0] <= 0, 1.0, fr[:, 0])
        true = corrected_fsc(fm, fr, shell_win)
        cross = crossing_shells(true)
        res = torch.where(cross > 0, pbox * px / cross.clamp(min=1e-6), torch.inf)
        resolutions.append(res.clamp(min=2 * px, max=opt.min_resolution))
        curves.append(true)
    point_res = torch.cat(resolutions) if resolutions else torch.zeros(0, device=dev)
    point_fsc = torch.cat(curves) if curves else torch.zeros(0, pbox // 2 + 1, device=dev)

    # Window-weighted harmonic mean of the resolutions, and the locally filtered map.
    fsum = (f1 + f2) * bfactor_weights(shape, opt.bfactor, px, device=dev)
    sumw = torch.zeros(size**3, dtype=torch.float64, device=dev)
    inv_res = torch.zeros_like(sumw)
    filtered = torch.zeros_like(sumw)
    shells = torch.tensor([filter_shell(float(r), n, px) for r in point_res.cpu()], device=dev)
    # FSC of the window boxes on the N-box shell grid: shell i of N is shell i * P / N of P.
    on_full = torch.arange(n // 2 + 1, device=dev) * (pbox / n)
    j0 = on_full.floor().long().clamp(max=pbox // 2)
    j1 = (j0 + 1).clamp(max=pbox // 2)
    t = (on_full - j0).double()
    for s in torch.unique(shells).tolist():
        sel = shells == s
        pts = points[sel]
        idx = _window_index(pts - box // 2 + box, box, size).reshape(-1)
        w = window.double().repeat(pts.shape[0])
        sumw.index_add_(0, idx, w)
        inv_res.index_add_(0, idx, (w.reshape(pts.shape[0], -1) / point_res[sel, None]).reshape(-1))
        mean_fsc = point_fsc[sel].mean(0)
        fsc_full = mean_fsc[j0] * (1 - t) + mean_fsc[j1] * t
        weights = fsc_weights(fsc_full, shape).to(dev) * lowpass_weights(
            shape, n * px / max(s, 1), px, edge_width=opt.filter_edge_width, device=dev
        )
        local = F.pad(irfft_centered(fsum * weights, shape), (box,) * 6).reshape(-1).double()
        blend = torch.zeros_like(sumw).index_add_(0, idx, w)
        filtered += blend * local
    inner = (slice(box, box + n),) * 3
    sumw3 = sumw.reshape(size, size, size)[inner]
    covered = sumw3 > 0
    res_map = torch.where(covered, sumw3 / inv_res.reshape(size, size, size)[inner], 0.0)
    fil_map = torch.where(covered, filtered.reshape(size, size, size)[inner] / sumw3, 0.0)
    return LocalResResult(
        resolution_map=res_map.float(),
        filtered=fil_map.float(),
        points=points,
        point_resolution=point_res.float(),
    )
