"""Fiducial-less tilt-series alignment: cosine-stretched cross-correlation, tilt-axis refinement
by common lines, and projection matching with patch tracking (conventions §16).

Geometry (conventions §1.3): tilt ``f`` shows specimen point ``q`` (xyz px from the specimen
centre) at raw image pixel ``c + s_f + [Rz(φ_f) Ry(θ_f) q]_xy``, ``c = (w//2, h//2)``,
``s_f`` the shift (rlnTomoX/YShiftAngst / px), ``φ_f`` rlnTomoZRot (the tilt axis, CCW from
image y), ``θ_f`` rlnTomoYTilt; rlnTomoXTilt stays 0. In the *axis frame* ``a = Rz(-φ)(r -
c - s)`` a thin specimen appears stretched along ``a_x`` by ``cos θ``.

1. **Coarse shifts** (:func:`coarse_shifts`): neighbours in tilt angle, outwards from the
   tilt nearest 0°; the higher tilt is stretched by ``cos θ_a / cos θ_b`` across its axis and
   cross-correlated with the lower one; shifts chain from ``s = 0`` at the reference tilt.
   teamtomo's ``torch-tiltxcorr`` 0.6 does the same, but with one tilt-axis angle for the whole
   series (we stretch each tilt about its own ZRot) and a whole-pixel peak.
2. **Tilt axis** (:func:`refine_axis_common_lines`): every tilt, resampled onto the 0° frame
   (stretched by ``1/cos θ``) and summed across the axis over a fixed window of the specimen,
   gives the same profile along the axis when the axis is right (the common line in real
   space); the global offset of all ZRot that makes the profiles agree best (grid, then a
   parabola) is the axis correction. teamtomo's ``torch-refine-tilt-axis-angle`` 0.6 sums the
   spectra of the whole, unstretched images instead; measured in ``benchmarks/align_tilts.py``.
3. **Projection matching** (:func:`projection_matching`): the tilts are split into
   ``groups`` interleaved sets; each set is compared with projections of a WBP reconstruction
   (:mod:`subtomo.tilt.tomogram`) from all other tilts. Patches of image and projection are
   cross-correlated; per tilt, the patch displacements ``d(r)`` (``r`` from the projected
   specimen centre) are fitted by ``Δs + Δφ·J r - tan θ·Δθ·(n·r) n`` (``J`` the 90° rotation,
   ``n`` the image direction across the axis): shift, in-plane rotation and tilt-angle
   corrections. The RMS of the patch residuals is the tilt's residual; a tilt is *flagged* when
   its correlation with its projection is below half the median or its residual above three
   times the median plus 1 px.

Gauge: a rigid motion of the specimen changes every tilt's parameters consistently and cannot
be seen in the images; the reference tilt's shift starts at 0 and the mean change of the tilt
angles is removed, so the tomogram keeps the nominal tilt angles on average.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from subtomo.geometry import projection_matrices
from subtomo.tilt.tomogram import fourier_bin, project, reconstruct_wbp, tomogram_grid

__all__ = [
    "AlignmentResult",
    "TiltAlignment",
    "align_tilt_series",
    "coarse_shifts",
    "projection_matching",
    "refine_axis_common_lines",
]

log = logging.getLogger("subtomo")

MAX_STEP_DEG = 1.0  # largest change of a tilt angle or ZRot in one round of projection matching


@dataclass(frozen=True)
class TiltAlignment:
    """Per-tilt geometry ``(t,)`` float64: tilt angle ``y_tilt`` and ``z_rot`` (deg), ``shifts``
    ``(t, 2)`` (bin-1 px, xy)."""

    y_tilt: torch.Tensor
    z_rot: torch.Tensor
    shifts: torch.Tensor

    def matrices(
        self, pixel_size: float, tomogram_size: tuple[int, int, int], image_size: tuple[int, int]
    ) -> torch.Tensor:
        """RELION projection matrices ``(t, 4, 4)`` (rlnTomoXTilt 0)."""
        return projection_matrices(
            torch.zeros_like(self.y_tilt),
            self.y_tilt,
            self.z_rot,
            self.shifts[:, 0] * pixel_size,
            self.shifts[:, 1] * pixel_size,
            pixel_size,
            tomogram_size,
            image_size,
        )

    def columns(self, pixel_size: float) -> dict[str, torch.Tensor]:
        """RELION 5 alignment columns (deg, Å)."""
        return {
            "rlnTomoXTilt": torch.zeros_like(self.y_tilt),
            "rlnTomoYTilt": self.y_tilt,
            "rlnTomoZRot": self.z_rot,
            "rlnTomoXShiftAngst": self.shifts[:, 0] * pixel_size,
            "rlnTomoYShiftAngst": self.shifts[:, 1] * pixel_size,
        }


@dataclass(frozen=True)
class AlignmentResult:
    """The alignment and, per tilt, its residual (RMS of patch displacements left after the
    fit, bin-1 px), its correlation with the projection of the others' reconstruction, and
    whether it is flagged as not aligning; ``axis_correction`` the common-line change of
    ZRot (deg)."""

    alignment: TiltAlignment
    residual_px: torch.Tensor
    correlation: torch.Tensor
    flagged: torch.Tensor
    axis_correction: float


# --- image helpers ------------------------------------------------------------------------


def _rot2(deg: torch.Tensor) -> torch.Tensor:
    """``(..., 2, 2)`` CCW rotation matrices."""
    t = torch.deg2rad(deg.double())
    c, s = t.cos(), t.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _warp(
    images: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """``(t, H, W)``: output pixel ``r`` (from the output centre ``(W//2, H//2)``) takes the
    input ``(t, h, w)`` bilinearly at ``c + matrix @ r + offset`` (xy px, 0 outside)."""
    h, w = images.shape[-2:]
    hh, ww = shape
    y = torch.arange(hh, dtype=torch.float64) - hh // 2
    x = torch.arange(ww, dtype=torch.float64) - ww // 2
    r = torch.stack(torch.meshgrid(x, y, indexing="xy"), -1)  # (H, W, 2) xy
    src = torch.einsum("tij,hwj->thwi", matrix.double(), r) + offset.double()[:, None, None]
    src = src + torch.tensor([w // 2, h // 2], dtype=torch.float64)
    norm = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)], dtype=torch.float64)
    grid = (src * norm - 1).to(images.dtype)
    return F.grid_sample(
        images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )[:, 0]


def _bandpass(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Gaussian band-pass (cycles/px: ``low`` high-pass edge, ``high`` low-pass edge), then
    zero mean and unit variance per image."""
    h, w = images.shape[-2:]
    ky = torch.fft.fftfreq(h, device=images.device)[:, None]
    kx = torch.fft.rfftfreq(w, device=images.device)[None, :]
    k2 = kx**2 + ky**2
    filt = torch.exp(-k2 / (2 * high**2)) * (1 - torch.exp(-k2 / (2 * low**2)))
    out = torch.fft.irfft2(torch.fft.rfft2(images) * filt, s=(h, w))
    out = out - out.mean(dim=(-2, -1), keepdim=True)
    return out / out.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def _taper(shape: tuple[int, int], width: float, device=None) -> torch.Tensor:
    """``(h, w)`` window: 1 inside, cosine fall-off to 0 over ``width`` px at the edges."""

    def ramp(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32, device=device)
        d = torch.minimum(i, n - 1 - i) / max(width, 1.0)
        return 0.5 - 0.5 * torch.cos(math.pi * d.clamp(0, 1))

    return ramp(shape[0])[:, None] * ramp(shape[1])[None, :]


def _xcorr_peak(
    a: torch.Tensor, b: torch.Tensor, max_shift: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-pixel ``d`` ``(n, 2)`` xy maximising ``Σ_r a(r) b(r + d)`` within ``|d| <=
    max_shift`` and the normalised peak value ``(n,)`` (both ``(n, h, w)``, zero-padded)."""
    n, h, w = a.shape
    fa = torch.fft.rfft2(a, s=(2 * h, 2 * w))
    fb = torch.fft.rfft2(b, s=(2 * h, 2 * w))
    cc = torch.fft.irfft2(fa.conj() * fb, s=(2 * h, 2 * w))
    cc = torch.fft.fftshift(cc, dim=(-2, -1))  # zero shift at (h, w)
    y = torch.arange(2 * h, device=a.device)[:, None] - h
    x = torch.arange(2 * w, device=a.device)[None, :] - w
    cc = torch.where((x**2 + y**2) <= max_shift**2, cc, torch.tensor(-torch.inf))
    flat = cc.reshape(n, -1).argmax(-1)
    iy, ix = flat // (2 * w), flat % (2 * w)
    peak = cc[torch.arange(n), iy, ix]

    def sub(m: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        m, p = torch.nan_to_num(m, neginf=0.0), torch.nan_to_num(p, neginf=0.0)
        den = m - 2 * c + p
        return torch.where(den < 0, 0.5 * (m - p) / den, torch.zeros_like(den)).clamp(-0.5, 0.5)

    rows = torch.arange(n)
    dy = sub(cc[rows, (iy - 1).clamp(0), ix], peak, cc[rows, (iy + 1).clamp(max=2 * h - 1), ix])
    dx = sub(cc[rows, iy, (ix - 1).clamp(0)], peak, cc[rows, iy, (ix + 1).clamp(max=2 * w - 1)])
    d = torch.stack([ix - w + dx, iy - h + dy], -1).double()
    norm = (a.square().sum((-2, -1)) * b.square().sum((-2, -1))).sqrt().clamp_min(1e-12)
    return d, peak / norm


# --- 1. coarse shifts ---------------------------------------------------------------------


def _stretch(theta_a: torch.Tensor, theta_b: torch.Tensor, phi_a, phi_b) -> torch.Tensor:
    """``M = Rz(φ_b) diag(cos θ_b / cos θ_a, 1) Rz(-φ_a)`` ``(n, 2, 2)``: offset in image a ->
    the offset of the same thin-specimen point in image b."""
    ratio = torch.cos(torch.deg2rad(theta_b.double())) / torch.cos(torch.deg2rad(theta_a.double()))
    d = torch.diag_embed(torch.stack([ratio, torch.ones_like(ratio)], -1))
    return _rot2(phi_b) @ d @ _rot2(-phi_a)


def coarse_shifts(
    images: torch.Tensor, y_tilt: torch.Tensor, z_rot: torch.Tensor, max_shift: float
) -> torch.Tensor:
    """Shifts ``(t, 2)`` (px of ``images``) by cosine-stretched cross-correlation of
    neighbouring tilts, 0 at the tilt nearest 0°. ``images`` band-passed ``(t, h, w)``."""
    t, h, w = images.shape
    order = torch.argsort(y_tilt)
    ref = int(torch.argmin(y_tilt[order].abs()))
    shifts = torch.zeros(t, 2, dtype=torch.float64)
    taper = _taper((h, w), 0.1 * min(h, w), images.device)
    pairs = [(order[k - 1], order[k]) for k in range(ref + 1, t)]
    pairs += [(order[k + 1], order[k]) for k in range(ref - 1, -1, -1)]
    if not pairs:
        return shifts
    a_idx = torch.stack([p[0] for p in pairs])
    b_idx = torch.stack([p[1] for p in pairs])
    m = _stretch(y_tilt[a_idx], y_tilt[b_idx], z_rot[a_idx], z_rot[b_idx])
    stretched = _warp(images[b_idx], m, torch.zeros(len(pairs), 2), (h, w))
    d, _ = _xcorr_peak(images[a_idx] * taper, stretched * taper, max_shift)
    for (a, b), m_k, d_k in zip(pairs, m, d, strict=True):  # chained outwards from ref
        shifts[b] = m_k @ (shifts[a] + d_k)
    return shifts


# --- 2. tilt axis -------------------------------------------------------------------------


def _axis_profiles(
    images: torch.Tensor, alignment: TiltAlignment, delta: float, half: int
) -> torch.Tensor:
    """``(t, 2·half)`` profiles along the tilt axis of each tilt on the 0° frame, ZRot + delta."""
    theta = alignment.y_tilt
    stretch = torch.diag_embed(
        torch.stack([torch.cos(torch.deg2rad(theta)), torch.ones_like(theta)], -1)
    )
    m = _rot2(alignment.z_rot + delta) @ stretch
    sampled = _warp(images, m, alignment.shifts, (2 * half, 2 * half))
    window = _taper((2 * half, 2 * half), 0.25 * half, images.device)
    profiles = (sampled * window).sum(-1)  # across the axis (x of the axis frame)
    profiles = profiles - profiles.mean(-1, keepdim=True)
    return profiles / profiles.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def refine_axis_common_lines(
    images: torch.Tensor,
    alignment: TiltAlignment,
    search_deg: float = 4.0,
    step_deg: float = 0.25,
) -> float:
    """The change of every ZRot (deg, within ``±search_deg``) that makes the tilts' common-line
    profiles agree best (mean correlation of each with the mean of the others)."""
    h, w = images.shape[-2:]
    half = int(0.45 * min(h, w))
    deltas = torch.arange(-search_deg, search_deg + step_deg / 2, step_deg, dtype=torch.float64)
    scores = []
    for delta in deltas.tolist():
        p = _axis_profiles(images, alignment, delta, half)
        total = p.sum(0, keepdim=True)
        scores.append(float((p * (total - p)).sum()))
    score = torch.tensor(scores)
    k = int(score.argmax())
    best = float(deltas[k])
    if 0 < k < len(deltas) - 1:
        m, c, p = score[k - 1], score[k], score[k + 1]
        den = float(m - 2 * c + p)
        if den < 0:
            best += step_deg * float(0.5 * (m - p) / den)
    return best


# --- 3. projection matching ---------------------------------------------------------------


def _fit_patches(
    d: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, z_rot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares of the patch displacements ``d`` ``(t, p, 2)`` at offsets ``r``
    ``(t, p, 2)`` from the projected specimen centre (weights ``(t, p)``): per tilt
    ``d ≈ Δs + ω J r + e (n·r) n`` (shift, in-plane rotation in rad, stretch across the axis
    direction ``n`` of ZRot ``z_rot``). Two passes (patches off by more than 3x the RMS, at
    least 1.5 px, dropped). Returns ``(t, 4)`` ``(Δs_x, Δs_y, ω, e)`` and the RMS ``(t,)``."""
    t, p, _ = d.shape
    normal = _rot2(z_rot)[:, None, :, 0]  # (t, 1, 2): image direction across the axis
    jr = torch.stack([-r[..., 1], r[..., 0]], -1)
    nr = (r * normal).sum(-1, keepdim=True) * normal
    ex = torch.zeros_like(r)
    ex[..., 0] = 1
    ey = torch.zeros_like(r)
    ey[..., 1] = 1
    design = torch.stack([ex, ey, jr, nr], -1)  # (t, p, 2, 4)
    w = weight.clone()
    for _ in range(2):
        a = (design * w[..., None, None].sqrt()).reshape(t, 2 * p, 4)
        b = (d * w[..., None].sqrt()).reshape(t, 2 * p, 1)
        normal_eq = a.transpose(1, 2) @ a
        scale = normal_eq.diagonal(dim1=1, dim2=2).amax(-1).clamp_min(1e-12)[:, None, None]
        params = torch.linalg.solve(
            normal_eq + 1e-6 * scale * torch.eye(4, dtype=a.dtype), a.transpose(1, 2) @ b
        )[..., 0]
        res = (d - (design @ params[:, None, :, None])[..., 0]).norm(dim=-1)  # (t, p)
        rms = ((res**2 * w).sum(1) / w.sum(1).clamp_min(1e-12)).sqrt()
        w = torch.where(res > torch.clamp(3 * rms, min=1.5)[:, None], torch.zeros_like(w), w)
    return params, rms


def projection_matching(
    images: torch.Tensor,
    alignment: TiltAlignment,
    tomogram_size: tuple[int, int, int],
    binning: int,
    *,
    groups: int = 4,
    patches: int = 4,
    max_shift: float = 8.0,
    lowpass: float = 0.25,
) -> tuple[TiltAlignment, torch.Tensor, torch.Tensor]:
    """One round: ``(updated alignment, residual (t,) bin-1 px, correlation (t,))``.

    ``images`` ``(t, h, w)`` bin-1; the reconstruction and comparison run at ``binning``;
    ``max_shift`` (binned px) bounds each patch's displacement; ``lowpass`` (cycles per binned
    px) the band-pass of images and projections. Groups of tilts interleave in tilt angle.
    """
    t, h, w = images.shape
    b = int(binning)
    binned = fourier_bin(images, b)
    hb, wb = binned.shape[-2:]
    band = _bandpass(binned, 2.0 / min(hb, wb), lowpass)
    matrices = alignment.matrices(1.0, tomogram_size, (w, h))
    grid = tomogram_grid(matrices, tomogram_size, (w, h), b)
    depths = torch.zeros(1, dtype=torch.float64)
    projections = torch.zeros_like(binned)
    footprint = torch.zeros_like(binned)
    ones = torch.ones(grid.shape, dtype=torch.float32, device=images.device)
    order = torch.argsort(alignment.y_tilt)
    n_groups = max(2, min(groups, t))
    for g in range(n_groups):
        held = order[g::n_groups]
        rest = torch.tensor(
            sorted(set(range(t)) - set(held.tolist())), dtype=torch.long, device=order.device
        )
        others = replace(grid, uv=grid.uv[rest], depth=grid.depth[rest])
        mine = replace(grid, uv=grid.uv[held], depth=grid.depth[held])
        volume = reconstruct_wbp(binned[rest], others)
        projections[held] = project(volume, mine, depths)[:, 0]
        footprint[held] = project(ones, mine, depths)[:, 0]
    # compare where the rays cross at least half the volume's thickness
    full = footprint.amax(dim=(-2, -1), keepdim=True)
    mask = (footprint > 0.5 * full).float()
    mask = F.avg_pool2d(mask[:, None], 9, stride=1, padding=4)[:, 0]  # soft edge
    proj = _bandpass(projections, 2.0 / min(hb, wb), lowpass)
    img = band * mask
    proj = proj * mask
    correlation = (img * proj).sum((-2, -1)) / (
        img.square().sum((-2, -1)) * proj.square().sum((-2, -1))
    ).sqrt().clamp_min(1e-12)

    # patches on a regular grid (binned px): displacement of the image against the projection
    size = 2 * (min(hb, wb) // (patches + 1))
    starts_y = torch.linspace(0, hb - size, patches).round().long()
    starts_x = torch.linspace(0, wb - size, patches).round().long()
    taper = _taper((size, size), size / 4, images.device)
    crops_i, crops_p, centres, weights = [], [], [], []
    for y0 in starts_y.tolist():
        for x0 in starts_x.tolist():
            m = mask[:, y0 : y0 + size, x0 : x0 + size]
            crops_i.append(img[:, y0 : y0 + size, x0 : x0 + size] * taper)
            crops_p.append(proj[:, y0 : y0 + size, x0 : x0 + size] * taper)
            centres.append([x0 + size // 2, y0 + size // 2])
            weights.append(m.mean((-2, -1)))
    n_p = len(centres)
    a = torch.stack(crops_p, 1).reshape(t * n_p, size, size)
    bb = torch.stack(crops_i, 1).reshape(t * n_p, size, size)
    d, peak = _xcorr_peak(a, bb, max_shift)
    d = d.reshape(t, n_p, 2) * b  # bin-1 px
    coverage = torch.stack(weights, 1).double()  # (t, p)
    weight = torch.where(coverage > 0.5, peak.reshape(t, n_p).double().clamp_min(0), 0.0)
    centre = torch.tensor(centres, dtype=torch.float64) * b  # bin-1 px
    # offsets from the projected specimen centre
    r = (
        centre[None]
        - (torch.tensor([w // 2, h // 2], dtype=torch.float64) + alignment.shifts)[:, None]
    )
    params, rms = _fit_patches(d, weight, r, alignment.z_rot)
    tan = torch.tan(torch.deg2rad(alignment.y_tilt))
    d_theta = torch.rad2deg(-params[:, 3] * tan / (tan**2 + math.tan(math.radians(15)) ** 2))
    d_theta = d_theta.clamp(-MAX_STEP_DEG, MAX_STEP_DEG)
    d_theta = d_theta - d_theta.mean()  # gauge: the tilt angles' mean stays
    d_phi = torch.rad2deg(params[:, 2]).clamp(-MAX_STEP_DEG, MAX_STEP_DEG)
    updated = TiltAlignment(
        y_tilt=alignment.y_tilt + d_theta,
        z_rot=alignment.z_rot + d_phi,
        shifts=alignment.shifts + params[:, :2],
    )
    return updated, rms, correlation.double()


def _flags(residual: torch.Tensor, correlation: torch.Tensor) -> torch.Tensor:
    """Tilts that do not align: correlation below half the median, or residual above three
    times the median plus 1 px."""
    return (correlation < 0.5 * correlation.median()) | (residual > 3 * residual.median() + 1.0)


def align_tilt_series(
    images: torch.Tensor,
    y_tilt: torch.Tensor,
    z_rot: torch.Tensor,
    tomogram_size: tuple[int, int, int],
    *,
    shifts: torch.Tensor | None = None,
    coarse_binning: int = 2,
    max_shift: float = 60.0,
    axis_search_deg: float = 4.0,
    rounds: int = 4,
    fine_binning: int = 1,
    refine_axis: bool = True,
) -> AlignmentResult:
    """Align a tilt series ``(t, h, w)`` (bin-1, table row order) from the nominal tilt angles
    and ZRot (deg, ``(t,)``; ``shifts`` ``(t, 2)`` px to start from, default 0).

    ``max_shift`` bin-1 px between neighbouring tilts; ``rounds`` of projection matching, the
    first half at ``coarse_binning``, the rest at ``fine_binning``. Raises ``ValueError`` for
    fewer than 3 tilts.
    """
    t, h, w = images.shape
    if t < 3:
        raise ValueError(f"{t} tilt(s): alignment needs at least 3")
    images = images.float()
    alignment = TiltAlignment(
        y_tilt=y_tilt.double().clone(),
        z_rot=z_rot.double().clone(),
        shifts=torch.zeros(t, 2, dtype=torch.float64) if shifts is None else shifts.double(),
    )
    b = int(coarse_binning)
    binned = _bandpass(fourier_bin(images, b), 2.0 / (min(h, w) // b), 0.2)
    axis_total = 0.0
    for _ in range(2 if refine_axis else 1):
        found = coarse_shifts(binned, alignment.y_tilt, alignment.z_rot, max_shift / b) * b
        alignment = replace(alignment, shifts=found)
        if refine_axis:
            scaled = replace(alignment, shifts=alignment.shifts / b)
            delta = refine_axis_common_lines(binned, scaled, search_deg=axis_search_deg)
            alignment = replace(alignment, z_rot=alignment.z_rot + delta)
            axis_total += delta
            axis_search_deg = 1.0
            log.info("tilt axis: ZRot %+.2f deg (common lines)", delta)
    residual = correlation = torch.zeros(t, dtype=torch.float64)
    for k in range(rounds):
        binning = b if k < rounds // 2 else int(fine_binning)
        alignment, residual, correlation = projection_matching(
            images, alignment, tomogram_size, binning
        )
        log.info(
            "projection matching round %d (bin %d): residual median %.2f px, correlation %.3f",
            k + 1, binning, float(residual.median()), float(correlation.median()),
        )  # fmt: skip
    return AlignmentResult(
        alignment=alignment,
        residual_px=residual,
        correlation=correlation,
        flagged=_flags(residual, correlation),
        axis_correction=axis_total,
    )
