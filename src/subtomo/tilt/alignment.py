"""Fiducial-less tilt-series alignment: cosine-stretched cross-correlation, tilt-axis refinement
by common lines, and projection matching with patch tracking (conventions §18).

Geometry (conventions §1.3): tilt ``f`` shows specimen point ``q`` (xyz px from the specimen
centre) at raw image pixel ``c + s_f + [Rz(φ_f) Ry(θ_f) q]_xy``, ``c = (w//2, h//2)``,
``s_f`` the shift (rlnTomoX/YShiftAngst / px), ``φ_f`` rlnTomoZRot (the tilt axis, CCW from
image y), ``θ_f`` rlnTomoYTilt; rlnTomoXTilt stays 0. In the *axis frame* ``a = Rz(-φ)(r -
c - s)`` a thin specimen appears stretched along ``a_x`` by ``cos θ``.

1. **Coarse shifts** (:func:`coarse_shifts`): pairs of tilts 1 and 2 apart in tilt angle; the
   higher tilt is stretched by ``cos θ_a / cos θ_b`` across its axis and cross-correlated with
   the lower one; the shifts are the least-squares solution of all pairs, ``s = 0`` at the
   tilt nearest 0°. teamtomo's ``torch-tiltxcorr`` 0.6 chains neighbours only, with one
   tilt-axis angle for the whole series (we stretch each tilt about its own ZRot) and
   whole-pixel peaks: on the benchmark series (``benchmarks/align_tilts.py``, 41 x 256², SNR 1,
   true tilts and axis given) 1.01 px RMS in 8.2 s; ours (neighbours only, then) took 0.2 s
   for the same step (projection matching then refines it).
2. **Tilt axis** (:func:`refine_axis_common_lines`): every tilt summed across its axis over the
   same strip of the specimen gives the same profile along the axis when the axis is right (the
   common line, in real space: the specimen projected onto the axis); a wrong axis by δ tilts
   profile f by about ``δ cos θ_f``. The global change of every ZRot that makes the profiles agree
   best, pairs weighted by ``(cos θ_f - cos θ_g)²`` and each taken at its best relative shift along
   the axis (≤ 3 px), is found on a grid and refined by a parabola; twice, with the coarse shifts
   redone in between: within ``±axis_search_deg`` by the correlations of the profiles, then within
   ±1° by their squared differences at fixed scales (less biased by noise, a shorter reach).
   Measured with the whole image and one criterion, on a 256² series of 50 ribosomes at SNR 0.1
   with the true shifts: 0.04° (a 0°-frame window instead of the whole image: 1.4°; unweighted
   pairs: 0.17°). teamtomo's ``torch-refine-tilt-axis-angle`` 0.6 (its angle is RELION's ZRot)
   finds the axis from the summed spectra of the shift-corrected images: given the true shifts of
   the benchmark series (SNR 1) it is 0.50° off, ours from the coarse shifts 0.16° (bar 0.3°).
3. **Projection matching** (:func:`projection_matching`): the tilts are split into ``groups``
   interleaved sets; each set is compared with projections of a WBP reconstruction
   (:mod:`subtomo.tilt.tomogram`) from all other tilts, kept only in its strongest features
   (``FEATURE_FRACTION`` of the volume with the most local energy, from a reconstruction of all
   tilts: particles and dense bodies, like markers). A whole-slab reference projected at a tilt
   is made mostly of the neighbouring tilts (at low resolution their central slices overlap
   through the slab's thin Fourier extent), so errors smooth in tilt angle (shifts across the
   axis, the axis itself) left it nearly unchanged; a compact feature's density is told by far
   tilts too. On the benchmark series (SNR 0.1, seeds 1-10) the residual went 0.547 -> 0.283 px
   mean (fraction 0.15: 0.423, 0.08: 0.366, 0.04: 0.310, 0.01: 0.291). Patches of image and
   projection are cross-correlated; per tilt, the patch displacements ``d(a)`` (``a`` in the
   axis frame, from the projected specimen centre) are fitted by a shift and a 2x2 map whose
   antisymmetric part is the in-plane rotation, averaged with the rotation the whole image
   tells (:func:`_in_plane_rotations`; the two are about as good, and the mean beat either on
   every benchmark series: SNR 0.1 seeds 1-10 0.560 -> 0.547 px mean, SNR 1 and noise-free
   0.348 -> 0.344). The tilt angle comes from the whole image: the projections at
   ``θ ± ANGLE_STEP_DEG`` give the change of the projection with the tilt angle (the foreshortening
   across the axis *and* the parallax of the specimen's depths, which a 2D map of patch shifts
   cannot see at low tilt), and the image is fitted by the projection, its two gradients (a
   shift) and that change, whose coefficient over the projection's is the angle's error
   (:func:`_tilt_angle_changes`). The RMS of the patch residuals is the tilt's residual; a tilt
   is *flagged* when its correlation with its projection is below half the median or its
   residual above three times the median plus 1 px, and from the next round on it is left out
   of the reconstructions (still aligned itself): on the benchmark series with 12 erased gold
   beads at SNR 1, seed 2, two flagged high tilts had pulled their neighbours' tilt angles up
   to 1.9° off (0.662 px RMS; left out 0.436 px).
4. **Tilt axis again** (:func:`refine_axis_projection_matching`): after the rounds, the change
   of every ZRot that best matches the tilts to their feature-masked references, scanned over
   ±1°, then one more round. Common lines are limited by noise at SNR 0.1 (0.21° mean error
   on the benchmark series, 6 of 10 seeds within 0.3°; at the true alignment too); the scan:
   0.077° mean, all 10 within 0.23° (a second scan over ±0.5° and round: 0.074°, not kept).

Gauge: a rigid motion of the specimen changes every tilt's parameters consistently and cannot
be seen in the images; the reference tilt's shift starts at 0, and the mean changes of the tilt
angles and (with the axis refined by steps 2 and 4) of the in-plane rotations are removed. The
changes of the tilt angles in proportion to the angle (a scale of the tilt range) are removed
too: the images hardly tell them (nearly a change of the specimen's thickness), and the
reference at the ends of the range, built from lower tilts only, pulled them inwards by 0.08°
at 60° per round on the benchmark series at SNR 0.1 (the scale comes from the stage).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from subtomo.geometry import projection_matrices
from subtomo.tilt.tomogram import (
    TomogramGrid,
    fourier_bin,
    project,
    reconstruct_wbp,
    tomogram_grid,
)

__all__ = [
    "AlignmentResult",
    "TiltAlignment",
    "align_tilt_series",
    "coarse_shifts",
    "projection_matching",
    "refine_axis_common_lines",
    "refine_axis_projection_matching",
]

log = logging.getLogger("subtomo")

NOISY_PEAK = 0.6  # coarse shifts: below this median peak of neighbours, pairs 2 apart too
MAX_PAIR_DEG = 7.0  # coarse shifts: pairs beyond neighbours at most this far apart in tilt
MAX_STEP_DEG = 1.0  # largest change of a tilt angle or ZRot in one round of projection matching
ANGLE_STEP_DEG = 0.5  # projection matching: the change of the projection per tilt angle over ±this
FEATURE_FRACTION = 0.02  # projection matching: the share of the volume kept in the references
AXIS_SCAN_DEG = 1.0  # the tilt axis by projection matching: ± span of the scan


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


def _filtered(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Gaussian band-pass (cycles/px: ``low`` high-pass edge, ``high`` low-pass edge)."""
    h, w = images.shape[-2:]
    ky = torch.fft.fftfreq(h, device=images.device)[:, None]
    kx = torch.fft.rfftfreq(w, device=images.device)[None, :]
    k2 = kx**2 + ky**2
    filt = torch.exp(-k2 / (2 * high**2)) * (1 - torch.exp(-k2 / (2 * low**2)))
    return torch.fft.irfft2(torch.fft.rfft2(images) * filt, s=(h, w))


def _bandpass(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """:func:`_filtered`, then zero mean and unit variance per image."""
    out = _filtered(images, low, high)
    out = out - out.mean(dim=(-2, -1), keepdim=True)
    return out / out.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def _raised_cosine(t: torch.Tensor) -> torch.Tensor:
    """0 for ``t <= 0``, ``(1 - cos πt) / 2`` between, 1 for ``t >= 1``."""
    return 0.5 - 0.5 * torch.cos(math.pi * t.clamp(0, 1))


def _taper(shape: tuple[int, int], width: float, device=None) -> torch.Tensor:
    """``(h, w)`` window: 1 inside, cosine fall-off to 0 over ``width`` px at the edges."""

    def ramp(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32, device=device)
        return _raised_cosine(torch.minimum(i, n - 1 - i) / max(width, 1.0))

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


def _pair_shifts(
    images: torch.Tensor,
    y_tilt: torch.Tensor,
    z_rot: torch.Tensor,
    pairs: list[tuple[int, int]],
    max_shift: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For pairs ``(a, b)``: the stretch ``M`` ``(n, 2, 2)``, the peak ``d`` ``(n, 2)`` with
    ``s_b = M (s_a + d)``, and the normalised peak height ``(n,)``."""
    h, w = images.shape[-2:]
    a_idx = torch.tensor([p[0] for p in pairs])
    b_idx = torch.tensor([p[1] for p in pairs])
    m = _stretch(y_tilt[a_idx], y_tilt[b_idx], z_rot[a_idx], z_rot[b_idx])
    stretched = _warp(images[b_idx], m, torch.zeros(len(pairs), 2), (h, w))
    taper = _taper((h, w), 0.1 * min(h, w), images.device)
    d, peak = _xcorr_peak(images[a_idx] * taper, stretched * taper, max_shift)
    return m, d, peak


def coarse_shifts(
    images: torch.Tensor,
    y_tilt: torch.Tensor,
    z_rot: torch.Tensor,
    max_shift: float,
    lags_used: int = 2,
) -> torch.Tensor:
    """Shifts ``(t, 2)`` (px of ``images``) by cosine-stretched cross-correlation of tilts
    1 to ``lags_used`` apart in tilt angle, 0 at the tilt nearest 0°. ``images`` band-passed
    ``(t, h, w)``.

    Every pair ``(a, b)`` (``b`` the higher tilt) says ``s_b - M s_a = M d``; the shifts are
    their least-squares solution, all pairs alike but those whose correlation peak is below
    half the neighbours' median (a tilt that does not align: ``1e-3``, and the tilts on either
    side of it are paired too). Pairs beyond neighbours are used where the neighbours' median
    peak is below ``NOISY_PEAK`` (noise-limited) and at most ``MAX_PAIR_DEG`` apart.

    Why: neighbours alone chain their errors into a random walk, smooth in tilt angle, which
    projection matching hardly corrects (its reference for a tilt is mostly the neighbouring
    tilts): on the 256² benchmark series at SNR 0.1 (seed 2, true angles) a random walk of
    0.62 px RMS was still 0.49 px after 5 rounds, white errors of 1.0 px were 0.36 px after 2.
    Pairs 2 apart shorten the walk: coarse shifts 0.45 / 0.50 -> 0.30 / 0.39 px (seeds 1 / 2);
    after the whole alignment, seeds 1-10, 0.611 -> 0.588 px mean RMS and tilt axis 0.33 ->
    0.21° mean error (neighbours' median peak 0.43). But the specimen's depth biases pairs
    further apart (error against the truth, the mean depth removed: 0.11 / 0.15 / 0.61 px RMS
    1 / 2 / 3 tilts of 3° apart at SNR 0.1; noise-free 0.03 / 0.10 / 0.42 px), which costs
    more than the walk where the noise is low: with them, SNR 1 seeds 1-6 0.347 -> 0.377 px,
    noise-free seeds 1/2/4 0.353 -> 0.399 px (peaks 0.83 and 0.91: now neighbours only)."""
    t = images.shape[0]
    order = torch.argsort(y_tilt).tolist()

    def pair(k: int, j: int) -> tuple[int, int]:  # rows of the k-th and j-th tilt, lower first
        a, b = order[k], order[j]
        return (a, b) if abs(float(y_tilt[a])) <= abs(float(y_tilt[b])) else (b, a)

    if t < 2:
        return torch.zeros(t, 2, dtype=torch.float64)
    keys = [(k, k + 1) for k in range(t - 1)]
    m, d, peak = _pair_shifts(images, y_tilt, z_rot, [pair(*k) for k in keys], max_shift)
    median = float(peak.median())
    # a peak below half the median: a tilt that does not align, which would cut the chain of
    # neighbours; the tilts on either side of it are paired
    floor = 0.5 * median
    more = [(k, k + 2) for k in range(t - 2) if peak[k] < floor]
    if median < NOISY_PEAK:  # noise-limited: pairs further apart as well
        more += [
            (k, k + lag)
            for lag in range(2, lags_used + 1)
            for k in range(t - lag)
            if abs(float(y_tilt[order[k + lag]] - y_tilt[order[k]])) <= MAX_PAIR_DEG
        ]
    more = list(dict.fromkeys(more))
    if more:
        m_2, d_2, peak_2 = _pair_shifts(images, y_tilt, z_rot, [pair(*k) for k in more], max_shift)
        keys += more
        m, d, peak = torch.cat([m, m_2]), torch.cat([d, d_2]), torch.cat([peak, peak_2])
    pairs = [pair(*k) for k in keys]
    outlier = peak < floor
    n, rows = len(pairs), torch.arange(len(pairs))
    # equations (n, 2) in the unknowns (t, 2); the reference tilt (nearest 0°) is held at 0
    # by one more equation per axis
    design = torch.zeros(n, 2, t, 2, dtype=torch.float64)
    design[rows, :, torch.tensor([p[1] for p in pairs])] = torch.eye(2).double()
    design[rows, :, torch.tensor([p[0] for p in pairs])] = -m
    design = design.reshape(2 * n, 2 * t)
    target = (m @ d[..., None]).reshape(-1)
    pin = torch.zeros(2, t, 2, dtype=torch.float64)
    pin[:, int(y_tilt.abs().argmin())] = torch.eye(2).double()
    pin = pin.reshape(2, 2 * t)
    weight = torch.where(outlier, 1e-3, 1.0).double()
    w = torch.cat([weight.repeat_interleave(2), torch.ones(2, dtype=torch.float64)]).sqrt()
    a_mat = torch.cat([design, pin]) * w[:, None]
    b_vec = torch.cat([target, torch.zeros(2, dtype=torch.float64)]) * w
    # normal equations: solve() gives the same bits on every call, threaded lstsq does not
    shifts = torch.linalg.solve(a_mat.T @ a_mat, a_mat.T @ b_vec)
    return shifts.reshape(t, 2)


# --- 2. tilt axis -------------------------------------------------------------------------


def _axis_profiles(
    images: torch.Tensor, alignment: TiltAlignment, delta: float, half: int
) -> torch.Tensor:
    """``(t, 2·half)`` profiles along the tilt axis (ZRot + ``delta``): each tilt summed across
    the axis, zero-mean. Every tilt sums the same strip of the specimen: within
    ``half·cos θ`` of the axis (cosine edge over ``0.1·min(h, w)·cos θ``), where the specimen
    within ``half`` of the axis projects at tilt θ. Summed over the whole image, the high tilts
    also carried specimen that the low tilts do not see (axis errors on the 256² benchmark
    series, SNR 1, seeds 1-6: -0.16/+0.39/+0.16/-0.26/+0.35/-0.13° whole image,
    +0.02/+0.05/+0.02/-0.14/+0.24/+0.03° with the strip). Every pixel is
    split linearly between the two profile bins around its coordinate along the axis, so the
    noise in a bin does not depend on the angle (resampling the image at each angle and
    normalising biased the axis by 1-2° on noisy series)."""
    t, h, w = images.shape
    taper = _taper((h, w), 0.1 * min(h, w), images.device)
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64) - h // 2,
        torch.arange(w, dtype=torch.float64) - w // 2,
        indexing="ij",
    )
    phi = torch.deg2rad(alignment.z_rot + delta)[:, None, None]  # axis (-sin φ, cos φ)
    dx = x - alignment.shifts[:, 0, None, None]
    dy = y - alignment.shifts[:, 1, None, None]
    along = -torch.sin(phi) * dx + torch.cos(phi) * dy + half  # (t, h, w) bins
    cos = torch.cos(torch.deg2rad(alignment.y_tilt))[:, None, None]
    edge = 0.1 * min(h, w) * cos
    inner = (half * cos - (torch.cos(phi) * dx + torch.sin(phi) * dy).abs()) / edge
    strip = _raised_cosine(inner)
    low = along.floor()
    frac = (along - low).float()
    values = (images * taper * strip).float()
    profiles = torch.zeros(t, 2 * half + 1, dtype=torch.float32, device=images.device)
    rows = torch.arange(t, device=images.device)[:, None, None] * (2 * half + 1)
    for offset, weight in ((0, 1 - frac), (1, frac)):
        index = (low + offset).long()
        inside = (index >= 0) & (index <= 2 * half)
        flat = (rows + index.clamp(0, 2 * half)).reshape(-1)
        profiles.view(-1).index_add_(0, flat, (values * weight * inside).reshape(-1))
    profiles = profiles[:, : 2 * half]
    return profiles - profiles.mean(-1, keepdim=True)


def refine_axis_common_lines(
    images: torch.Tensor,
    alignment: TiltAlignment,
    search_deg: float = 4.0,
    step_deg: float = 0.25,
    slack: int = 3,
    fixed_scale: bool = False,
) -> float:
    """The change of every ZRot (deg, within ``±search_deg``) that makes the tilts' common-line
    profiles agree best: the least sum of the squared differences of every pair of profiles,
    weighted by ``(cos θ_f - cos θ_g)²`` (a wrong axis tilts profile f by ``δ cos θ_f``; pairs
    that differ little in ``cos θ`` add only noise). Each pair's difference is its least over
    relative shifts along the axis of up to ``slack`` px, so that shifts not yet right along
    the axis (which projection matching fits to the axis it is given) do not hold the axis
    back. Tilts that agree with the others less than half as well as the median tilt are
    left out.

    The profiles are scaled to unit norm at each trial angle (the criterion is then the sum of
    their correlations), or with ``fixed_scale`` by one factor per tilt for all trial angles
    (their norm at the given axis). Unit norm at each angle follows the share of signal in
    the profile, which changes with the angle and the particles' layout: at the true
    alignment of 256² series at SNR 0.1, seeds 1 and 2, it is best at +0.45° and +0.85°,
    fixed scales at +0.24° and -0.07°. Fixed scales favour the angles whose profiles carry
    less energy, which far from the truth can win (seed 3 from ±4°: -2.05°):
    :func:`align_tilt_series` searches wide at unit norm, then ±1° with fixed scales."""
    h, w = images.shape[-2:]
    half = int(0.45 * min(h, w))
    deltas = torch.arange(-search_deg, search_deg + step_deg / 2, step_deg, dtype=torch.float64)
    # a wrong axis tilts tilt f's profile by δ·cos θ_f: pairs far apart in cos θ tell most
    cos = torch.cos(torch.deg2rad(alignment.y_tilt)).float()
    pair_weight = (cos[:, None] - cos[None, :]).square()
    scale = _axis_profiles(images, alignment, 0.0, half).norm(dim=-1) if fixed_scale else None

    def pair_differences(delta: float) -> torch.Tensor:
        """``(t, t)`` squared differences of the scaled profiles, least over the slack."""
        p = _axis_profiles(images, alignment, delta, half)  # (t, n)
        p = p / (p.norm(dim=-1) if scale is None else scale).clamp_min(1e-12)[:, None]
        n = p.shape[-1]
        spectra = torch.fft.rfft(p, n=2 * n)
        cc = torch.fft.irfft(spectra[:, None].conj() * spectra[None], n=2 * n)  # (t, t, 2n)
        best = torch.cat([cc[..., : slack + 1], cc[..., 2 * n - slack :]], -1).amax(-1)
        energy = p.square().sum(-1)
        return energy[:, None] + energy[None, :] - 2 * best

    # at the given axis the profiles have unit norm either way: 1 - difference/2 is their
    # correlation; tilts whose profile agrees with the others' less than half as well as the
    # median's (a tilt that does not align) are left out
    agreement = (1 - pair_differences(0.0) / 2).fill_diagonal_(0).sum(1)
    keep = (agreement >= 0.5 * agreement.median()).float()
    pair_weight = pair_weight * keep[:, None] * keep[None, :]
    scores = [-float((pair_weight * pair_differences(d)).sum()) for d in deltas.tolist()]
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


@dataclass(frozen=True)
class _PatchFit:
    """Per tilt: ``shift`` ``(t, 2)`` (image xy px), in-plane ``rotation`` (rad) and ``rms`` of
    the patch residuals (px)."""

    shift: torch.Tensor
    rotation: torch.Tensor
    rms: torch.Tensor


def _fit_patches(
    d: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, z_rot: torch.Tensor
) -> _PatchFit:
    """Weighted least squares, per tilt, of the patch displacements ``d`` ``(t, p, 2)`` at
    offsets ``r`` ``(t, p, 2)`` from the projected specimen centre (weights ``(t, p)``) by an
    affine map in the axis frame (``a = Rz(-ZRot) r``): ``d_a ≈ t + L a``. ``L`` splits into
    the stretch across the axis ``L_xx`` (a wrong tilt angle: fitted so that it does not bias
    the rest), the rotation ``(L_yx - L_xy)/2`` and the symmetric shear ``(L_yx + L_xy)/2``
    (which a wrong tilt axis leaves, fitted so that it does not bias the rotation); ``L_yy``
    takes a magnification along the axis. Two passes (patches off by more than 3x the RMS, at
    least 1.5 px, dropped)."""
    t, p, _ = d.shape
    rot = _rot2(z_rot)[:, None]  # (t, 1, 2, 2)
    d_a = (rot.transpose(-1, -2) @ d[..., None])[..., 0]
    a = (rot.transpose(-1, -2) @ r[..., None])[..., 0]
    zero, one = torch.zeros_like(a[..., 0]), torch.ones_like(a[..., 0])
    # columns: t_x, t_y, L_xx, L_xy, L_yx, L_yy; rows: the x and y equations
    row_x = torch.stack([one, zero, a[..., 0], a[..., 1], zero, zero], -1)
    row_y = torch.stack([zero, one, zero, zero, a[..., 0], a[..., 1]], -1)
    design = torch.stack([row_x, row_y], -2)  # (t, p, 2, 6)
    w = weight.clone()
    eye = torch.eye(6, dtype=d.dtype)
    for _ in range(2):
        a_mat = (design * w[..., None, None].sqrt()).reshape(t, 2 * p, 6)
        b_vec = (d_a * w[..., None].sqrt()).reshape(t, 2 * p, 1)
        normal_eq = a_mat.transpose(1, 2) @ a_mat
        scale = normal_eq.diagonal(dim1=1, dim2=2).amax(-1).clamp_min(1e-12)[:, None, None]
        normal_eq = normal_eq + 1e-6 * scale * eye
        params = torch.linalg.solve(normal_eq, a_mat.transpose(1, 2) @ b_vec)[..., 0]
        res = (d_a - (design @ params[:, None, :, None])[..., 0]).norm(dim=-1)  # (t, p)
        rms = ((res**2 * w).sum(1) / w.sum(1).clamp_min(1e-12)).sqrt()
        w = torch.where(res > torch.clamp(3 * rms, min=1.5)[:, None], torch.zeros_like(w), w)
    return _PatchFit(
        shift=(rot[:, 0] @ params[:, :2, None])[..., 0],
        rotation=0.5 * (params[:, 4] - params[:, 3]),
        rms=rms,
    )


def _gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y derivatives (per px) of ``(t, h, w)`` images, exact in Fourier space."""
    h, w = images.shape[-2:]
    spectrum = torch.fft.rfft2(images)
    ky = torch.fft.fftfreq(h, device=images.device)[:, None]
    kx = torch.fft.rfftfreq(w, device=images.device)[None, :]
    return tuple(torch.fft.irfft2(spectrum * (2j * math.pi * k), s=(h, w)) for k in (kx, ky))


def _fit_over_projection(
    image: torch.Tensor,
    projection: torch.Tensor,
    gradients: tuple[torch.Tensor, torch.Tensor],
    change: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Per tilt, the least-squares fit within ``mask`` of ``image`` by the ``projection``, its
    x and y ``gradients`` (:func:`_gradients`; a shift) and ``change`` (all ``(t, h, w)``,
    band-passed alike): ``image ≈ a (P + g·s + c·change)``; returns ``c`` ``(t,)`` float64
    (0 where ``a <= 0``)."""
    gx, gy = gradients
    t = projection.shape[0]
    columns = torch.stack([projection, gx, gy, change], -1) * mask[..., None]
    columns = columns.reshape(t, -1, 4).double()
    target = (image * mask).reshape(t, -1, 1).double()
    normal_eq = columns.transpose(1, 2) @ columns
    scale = normal_eq.diagonal(dim1=1, dim2=2).amax(-1).clamp_min(1e-12)[:, None, None]
    eye = torch.eye(4, dtype=torch.float64, device=columns.device)
    coef = torch.linalg.solve(normal_eq + 1e-9 * scale * eye, columns.transpose(1, 2) @ target)
    coef = coef[..., 0]
    return torch.where(coef[:, 0] > 0, coef[:, 3] / coef[:, 0].clamp_min(1e-12), 0.0)


def _tilt_angle_changes(
    image: torch.Tensor,
    projection: torch.Tensor,
    slope: torch.Tensor,
    mask: torch.Tensor,
    low: float,
    high: float,
) -> torch.Tensor:
    """Per tilt, the tilt angle's error (deg, ``(t,)`` float64): the band-passed ``image``
    (``(t, h, w)``, unit variance) fitted by the same band-pass (cycles/px ``low``, ``high``)
    of the ``projection`` and of its change per degree of tilt angle ``slope``
    (:func:`_fit_over_projection`).

    Measured at the true alignment of the 256² benchmark series (σ 0.4° errors put on the
    tilt angles): the estimate's error 0.23° RMS at SNR 0.1 (seed 2) and 0.19° noise-free
    (seed 4); the affine map of the patch shifts (its stretch across the axis, the estimate
    before) 0.28° and 0.21°."""
    p = _filtered(projection, low, high)
    return _fit_over_projection(image, p, _gradients(p), _filtered(slope, low, high), mask)


def _in_plane_rotations(
    image: torch.Tensor,
    projection: torch.Tensor,
    centre: torch.Tensor,
    mask: torch.Tensor,
    low: float,
    high: float,
) -> torch.Tensor:
    """Per tilt, the in-plane rotation (deg, CCW, ``(t,)``) of ``image`` against the
    ``projection`` about ``centre`` ``(t, 2)`` (xy px): the change of the band-passed
    projection P by a rotation is ``(y - c_y) ∂P/∂x - (x - c_x) ∂P/∂y`` per radian
    (:func:`_fit_over_projection`)."""
    p = _filtered(projection, low, high)
    gx, gy = _gradients(p)
    h, w = p.shape[-2:]
    y = torch.arange(h, dtype=torch.float64, device=p.device)[None, :, None]
    x = torch.arange(w, dtype=torch.float64, device=p.device)[None, None, :]
    dy = (y - centre[:, 1, None, None]).to(p.dtype)
    dx = (x - centre[:, 0, None, None]).to(p.dtype)
    return torch.rad2deg(_fit_over_projection(image, p, (gx, gy), dy * gx - dx * gy, mask))


def _without_mean_and_scale(d_theta: torch.Tensor, y_tilt: torch.Tensor) -> torch.Tensor:
    """``d_theta`` less its least-squares fit by ``c0 + c1·(y_tilt - mean)``: the tilt angles'
    mean (gauge) and scale (see the module's gauge note) stay."""
    centred = y_tilt - y_tilt.mean()
    d_theta = d_theta - d_theta.mean()
    return d_theta - centred * (d_theta * centred).sum() / centred.square().sum().clamp_min(1e-12)


def _feature_mask(volume: torch.Tensor, fraction: float) -> torch.Tensor:
    """A soft mask ``(d, h, w)`` of the ``fraction`` of ``volume`` with the highest local
    energy (the squared density box-averaged twice over 5 voxels, about a Gaussian of σ 2
    voxels), grown by 2 voxels and softened over 5: the strongest features (particles, dense
    bodies), whatever their contrast's sign."""
    energy = volume.square()[None, None]
    for _ in range(2):
        energy = F.avg_pool3d(energy, 5, stride=1, padding=2, count_include_pad=False)
    sample = energy.flatten()[:: max(1, energy.numel() // 200_000)]  # quantile's size limit
    binary = (energy > torch.quantile(sample, 1.0 - fraction)).float()
    grown = F.max_pool3d(binary, 5, stride=1, padding=2)
    return F.avg_pool3d(grown, 5, stride=1, padding=2)[0, 0]


def _tilts_of(grid: TomogramGrid, rows: torch.Tensor) -> TomogramGrid:
    """The grid seen by the tilts ``rows`` only."""
    return replace(grid, uv=grid.uv[rows], depth=grid.depth[rows])


def _grid_of(
    alignment: TiltAlignment,
    tomogram_size: tuple[int, int, int],
    image_size: tuple[int, int],
    binning: int,
) -> TomogramGrid:
    """The binned tomogram's grid under ``alignment`` (bin-1 ``image_size`` ``(w, h)``)."""
    matrices = alignment.matrices(1.0, tomogram_size, image_size)
    return tomogram_grid(matrices, tomogram_size, image_size, binning)


def _reference_features(
    band: torch.Tensor, grid: TomogramGrid, left_out: torch.Tensor | None
) -> torch.Tensor:
    """The mask ``(d, h, w)`` of projection matching's references: :func:`_feature_mask`
    (``FEATURE_FRACTION``) of the WBP of the band-passed images ``band`` of every tilt but
    those ``left_out``."""
    kept = torch.arange(len(band)) if left_out is None else torch.nonzero(~left_out).flatten()
    return _feature_mask(reconstruct_wbp(band[kept], _tilts_of(grid, kept)), FEATURE_FRACTION)


def projection_matching(
    binned: torch.Tensor,
    alignment: TiltAlignment,
    tomogram_size: tuple[int, int, int],
    image_size: tuple[int, int],
    binning: int,
    *,
    groups: int = 4,
    patches: int = 4,
    max_shift: float = 8.0,
    lowpass: float = 0.25,
    axis_from_common_lines: bool = True,
    refine_tilt_angles: bool = True,
    left_out: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
) -> tuple[TiltAlignment, _PatchFit, torch.Tensor]:
    """One round: ``(updated alignment, patch fit, correlation (t,))``.

    ``binned`` ``(t, h/b, w/b)`` the images Fourier-binned by ``binning`` from the bin-1
    ``image_size`` ``(w, h)``, on which the reconstruction and comparison run; ``max_shift``
    (binned px) bounds each patch's displacement; ``lowpass`` (cycles per binned
    px) the band-pass of images and projections. Groups of tilts interleave in tilt angle.
    ``axis_from_common_lines``: the in-plane rotations change by zero on average (their mean
    is left to :func:`refine_axis_common_lines` and :func:`refine_axis_projection_matching`);
    ``refine_tilt_angles``: change the tilt
    angles too (else shifts and in-plane rotations only); ``left_out`` ``(t,)`` bool: tilts
    kept out of every reconstruction (those that did not align), still compared and moved;
    the references keep only the volume's strongest features: ``features`` (a mask
    ``(d, h, w)``), by default :func:`_reference_features` at this alignment.
    """
    t, (hb, wb) = binned.shape[0], binned.shape[-2:]
    w, h = image_size
    b = int(binning)
    band = _bandpass(binned, 2.0 / min(hb, wb), lowpass)
    grid = _grid_of(alignment, tomogram_size, (w, h), b)
    depths = torch.zeros(1, dtype=torch.float64)
    projections = torch.zeros_like(binned)
    footprint = torch.zeros_like(binned)
    slope = torch.zeros_like(binned)  # change of the projection per degree of tilt angle
    ones = torch.ones(grid.shape, dtype=torch.float32, device=binned.device)
    steps = (ANGLE_STEP_DEG, -ANGLE_STEP_DEG) if refine_tilt_angles else ()
    tilted = [
        _grid_of(replace(alignment, y_tilt=alignment.y_tilt + step), tomogram_size, (w, h), b)
        for step in steps
    ]
    if features is None:
        features = _reference_features(band, grid, left_out)
    order = torch.argsort(alignment.y_tilt)
    n_groups = max(2, min(groups, t))
    for g in range(n_groups):
        held = order[g::n_groups]
        unused = set(held.tolist())
        if left_out is not None:
            unused |= set(torch.nonzero(left_out).flatten().tolist())
        rest = torch.tensor(sorted(set(range(t)) - unused), dtype=torch.long, device=order.device)
        volume = reconstruct_wbp(binned[rest], _tilts_of(grid, rest)) * features
        projections[held] = project(volume, _tilts_of(grid, held), depths)[:, 0]
        footprint[held] = project(ones, _tilts_of(grid, held), depths)[:, 0]
        if tilted:
            up, down = (project(volume, _tilts_of(g, held), depths)[:, 0] for g in tilted)
            slope[held] = (up - down) / (2 * ANGLE_STEP_DEG)
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
    taper = _taper((size, size), size / 4, binned.device)
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
    specimen = torch.tensor([w // 2, h // 2], dtype=torch.float64) + alignment.shifts
    r = centre[None] - specimen[:, None]  # offsets from the projected specimen centre
    fit = _fit_patches(d, weight, r, alignment.z_rot)
    d_theta = torch.zeros(t, dtype=torch.float64)
    if refine_tilt_angles:
        aligns = correlation >= 0.5 * correlation.median()  # the others' angles stay
        found = _tilt_angle_changes(band, projections, slope, mask, 2.0 / min(hb, wb), lowpass)
        d_theta = torch.where(aligns, found.clamp(-MAX_STEP_DEG, MAX_STEP_DEG), 0.0)
        d_theta = _without_mean_and_scale(d_theta, alignment.y_tilt)
    # the patches' rotations and the whole image's, alike: at the true alignment (σ 0.3°
    # put on) their errors are 0.14 / 0.17° noise-free, 0.20 / 0.19° at SNR 0.1
    whole = _in_plane_rotations(band, projections, specimen / b, mask, 2.0 / min(hb, wb), lowpass)
    d_phi = 0.5 * (torch.rad2deg(fit.rotation) + whole)
    d_phi = d_phi.clamp(-MAX_STEP_DEG, MAX_STEP_DEG)
    if axis_from_common_lines:  # their mean is nearly a turn of the reconstruction
        d_phi = d_phi - d_phi.mean()
    updated = TiltAlignment(
        y_tilt=alignment.y_tilt + d_theta,
        z_rot=alignment.z_rot + d_phi,
        shifts=alignment.shifts + fit.shift,
    )
    return updated, fit, correlation.double()


def refine_axis_projection_matching(
    binned: torch.Tensor,
    alignment: TiltAlignment,
    tomogram_size: tuple[int, int, int],
    image_size: tuple[int, int],
    binning: int,
    span_deg: float,
    left_out: torch.Tensor | None = None,
    lowpass: float = 0.25,
) -> float:
    """The change of every ZRot (deg, within ``±span_deg``) that best matches the tilts to
    their references: the mean correlation of :func:`projection_matching` (the other
    parameters held) at 5 changes across the span, the vertex of its least-squares parabola.
    The references' features are masked once, from the given alignment: masked anew at each
    change they follow it (on the benchmark series at SNR 0.1, seeds 1-10, the axis then ended
    0.13° off on average, biased: mean -0.12°).

    With references kept to the strongest features, far tilts tell the axis (a wrong axis
    shears a tilt against them by about ``δ (cos θ - mean cos θ)``); whole-slab references are
    dominated by the neighbouring tilts, against which the shear is nil: at the true alignment
    of the 256² benchmark series the correlation then changed by 0.1 % over ±1°, and the axis
    from common lines stayed the estimate (SNR 0.1, seeds 1-10: 0.21° mean error, 6 within
    0.3°; with the scan 0.077°, all within 0.23°)."""
    offsets = torch.linspace(-span_deg, span_deg, 5, dtype=torch.float64)
    grid = _grid_of(alignment, tomogram_size, image_size, binning)
    band = _bandpass(binned, 2.0 / min(binned.shape[-2:]), lowpass)
    features = _reference_features(band, grid, left_out)
    scores = torch.tensor(
        [
            float(
                projection_matching(
                    binned,
                    replace(alignment, z_rot=alignment.z_rot + o),
                    tomogram_size,
                    image_size,
                    binning,
                    refine_tilt_angles=False,
                    left_out=left_out,
                    lowpass=lowpass,
                    features=features,
                )[2].mean()
            )
            for o in offsets.tolist()
        ],
        dtype=torch.float64,
    )
    design = torch.stack([torch.ones_like(offsets), offsets, offsets.square()], 1)
    _, slope, curve = torch.linalg.lstsq(design, scores[:, None]).solution[:, 0].tolist()
    best = -slope / (2 * curve) if curve < 0 else float(offsets[scores.argmax()])
    return min(span_deg, max(-span_deg, best))


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
    binning: int = 2,
    max_shift: float = 60.0,
    axis_search_deg: float = 4.0,
    rounds: int = 4,
    refine_axis: bool = True,
    refine_tilt_angles: bool = True,
    tilt_angle_rounds: int = 4,
    bead_radius_px: float = 0.0,
) -> AlignmentResult:
    """Align a tilt series ``(t, h, w)`` (bin-1, table row order) from the nominal tilt angles
    and ZRot (deg, ``(t,)``); the shifts are found anew (the coarse step needs none).

    Everything runs on the images Fourier-binned by ``binning`` (measured on a 256² series:
    rounds at bin 1 after bin 2 gave 0.277 instead of 0.274 px RMS, in 4x the time);
    ``max_shift`` bin-1 px between neighbouring tilts; ``axis_search_deg`` the ± range of the
    tilt-axis search; ``rounds`` of projection matching, the tilt angles refined in the first
    ``tilt_angle_rounds`` (all 4 by default: the drift of later rounds at low SNR was the scale
    of the tilt range, now held); ``bead_radius_px`` > 0 (bin-1 px):
    gold beads of that radius are erased from the binned images first
    (:func:`subtomo.tilt.gold.erase_beads`). Raises ``ValueError`` for fewer than 3 tilts.
    """
    t, h, w = images.shape
    if t < 3:
        raise ValueError(f"{t} tilt(s): alignment needs at least 3")
    images = images.float()
    alignment = TiltAlignment(
        y_tilt=y_tilt.double().clone(),
        z_rot=z_rot.double().clone(),
        shifts=torch.zeros(t, 2, dtype=torch.float64),
    )
    b = int(binning)
    binned = fourier_bin(images, b)
    if bead_radius_px > 0:
        from subtomo.tilt.gold import erase_beads  # gold -> fiducials -> alignment

        binned, found = erase_beads(binned, bead_radius_px, b)
        log.info("gold: %.1f beads erased per tilt", float(found.double().mean()))
    low = 2.0 / (min(h, w) // b)
    coarse = _bandpass(binned, low, 0.2)
    sharp = _bandpass(binned, low, 0.5)  # common lines: measured best without a low-pass
    axis_total = 0.0

    def axis(alignment: TiltAlignment, search: float, fixed_scale: bool) -> TiltAlignment:
        nonlocal axis_total
        scaled = replace(alignment, shifts=alignment.shifts / b)
        delta = refine_axis_common_lines(sharp, scaled, search, fixed_scale=fixed_scale)
        axis_total += delta
        log.info("tilt axis: ZRot %+.2f deg (common lines)", delta)
        return replace(alignment, z_rot=alignment.z_rot + delta)

    # wide at unit norm, then ±1° with fixed scales (refine_axis_common_lines): on the 256²
    # benchmark series at SNR 0.1, seeds 1-5, axis errors -0.11/+0.69/-0.09/-0.19/+0.31°
    # instead of +0.16/+0.98/+0.28/-0.25/+0.66° at unit norm in both
    for search, fixed in (
        ((axis_search_deg, False), (1.0, True)) if refine_axis else ((0.0, False),)
    ):
        found = coarse_shifts(coarse, alignment.y_tilt, alignment.z_rot, max_shift / b) * b
        alignment = replace(alignment, shifts=found)
        if refine_axis:
            alignment = axis(alignment, search, fixed)
    residual = correlation = torch.zeros(t, dtype=torch.float64)
    # the rounds, then the axis scan and one more round at the axis it found (refining the
    # tilt angles as the last round did)
    scan = refine_axis and rounds > 0
    for k in range(rounds + scan):
        left_out = _flags(residual, correlation) if k > 0 else None
        if k == rounds:
            delta = refine_axis_projection_matching(
                binned, alignment, tomogram_size, (w, h), b, AXIS_SCAN_DEG, left_out
            )
            axis_total += delta
            log.info("tilt axis: ZRot %+.2f deg (projection matching)", delta)
            alignment = replace(alignment, z_rot=alignment.z_rot + delta)
        alignment, fit, correlation = projection_matching(
            binned,
            alignment,
            tomogram_size,
            (w, h),
            b,
            axis_from_common_lines=refine_axis,
            refine_tilt_angles=refine_tilt_angles and min(k, rounds - 1) < tilt_angle_rounds,
            left_out=left_out,
        )
        residual = fit.rms
        log.info(
            "projection matching round %d (bin %d): residual median %.2f px, correlation %.3f",
            k + 1, b, float(residual.median()), float(correlation.median()),
        )  # fmt: skip
    return AlignmentResult(
        alignment=alignment,
        residual_px=residual,
        correlation=correlation,
        flagged=_flags(residual, correlation),
        axis_correction=axis_total,
    )
