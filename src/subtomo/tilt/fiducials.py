"""Fiducial tilt-series alignment: gold-bead detection, tracking and a least-squares fit of the
projection model with the beads' 3D positions as unknowns, as IMOD's tiltalign (conventions
§20).

Geometry (§1.3, :mod:`subtomo.tilt.alignment`): bead ``k`` at ``q_k`` (xyz px from the tomogram
centre) appears in tilt ``f`` at ``c + s_f + [Rz(φ_f) Ry(θ_f) q_k]_xy``, ``c = (w//2, h//2)``.

1. **Detection** (:func:`detect_beads`): each tilt (Fourier-binned so that a bead's radius is
   >= 3 px) is correlated with the projected chord of a sphere of the bead's radius, made
   zero-mean over a box of 4 radii (a matched filter; beads are dark); local maxima above
   ``threshold`` robust standard deviations (MAD) of the score map and above the largest
   fall of the tilt's scores by 3x (on clean images particles pass the threshold too),
   refined by a parabola per axis.
2. **Tracking** (:func:`track_beads`): beads are seeded from the detections of the tilt nearest
   0° (depth 0) and followed outwards in ``|θ|``, alternating sides: each new tilt's beads are
   predicted with the current model, the median offset to the nearest detections corrects the
   tilt's shift, then each bead takes the nearest detection within 2 radii (mutual nearest,
   one detection per bead); the model is refitted after every tilt added. Then every tilt is
   matched again with the fitted model (after the tilt's median offset to the nearest
   detections, within one radius), leaving out beads that overlap another (closer than 2.5
   radii) in that tilt.
3. **Fit** (:func:`fit_projection_model`): Levenberg-Marquardt over per-tilt shifts, tilt
   angles and in-plane rotations (a global ZRot change plus per-tilt deviations) and the
   beads' ``q``; observations whose residual exceeds ``max(3·RMS, 1.5 px)`` are
   dropped and the fit repeated (outlier rejection). Gauge: the reference tilt's shift stays
   fixed (x, y), the beads' mean depth is 0 (z), and per-tilt deviations of the tilt angle and
   in-plane rotation are held by a weak prior (``PRIOR_PX_PER_DEG``: 1° costs 0.1 px, against
   residuals of ~0.2 px per bead), which also fixes the series' mean tilt angle (a rotation of
   the specimen about the tilt axis, which no image shows).
4. **Levelling**: the beads lie on the specimen's surfaces; the rotation about the tilt axis
   that makes a plane (one intercept per surface) through them level is the tilt-angle offset
   (IMOD's "angle offset"), added to every tilt angle (the beads rotated with it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from subtomo.geometry import tilt_rotations
from subtomo.tilt.alignment import TiltAlignment, _bandpass, coarse_shifts
from subtomo.tilt.tomogram import fourier_bin

__all__ = [
    "BeadModel",
    "align_fiducials",
    "detect_beads",
    "fit_projection_model",
    "track_beads",
]

log = logging.getLogger("subtomo")

BEAD_GAP = 3.0  # a fall of the detection scores by this factor separates beads from the rest
PRIOR_PX_PER_DEG = 0.1  # weak prior on per-tilt tilt-angle and in-plane deviations (px per deg)


@dataclass(frozen=True)
class BeadModel:
    """A fitted bead model: the alignment; per tilt its bead residual ``residual_px`` (RMS, px,
    NaN without beads), ``beads_per_tilt`` and ``flagged``; per bead its position
    ``positions`` ``(n, 3)`` (xyz px from the tomogram centre) and ``bead_residual_px``; the
    observations ``observed`` ``(t, n, 2)`` (px, NaN where not tracked or rejected); the RMS
    of all bead residuals ``rms_px``, the change of the mean ZRot ``axis_correction`` and the
    levelling tilt offset ``tilt_offset`` (deg)."""

    alignment: TiltAlignment
    residual_px: torch.Tensor
    beads_per_tilt: torch.Tensor
    flagged: torch.Tensor
    positions: torch.Tensor
    bead_residual_px: torch.Tensor
    observed: torch.Tensor
    rms_px: float
    axis_correction: float
    tilt_offset: float


# --- 1. detection -------------------------------------------------------------------------


def detect_beads(
    images: torch.Tensor, radius_px: float, threshold: float = 6.0
) -> list[torch.Tensor]:
    """Bead candidates per tilt: ``[(k, 3)]`` rows ``(x, y, score)`` (px of ``images``, score in
    robust standard deviations of the matched filter), above ``threshold`` and above the
    largest fall of the tilt's scores by ``BEAD_GAP`` or more. ``images`` ``(t, h, w)``;
    beads dark."""
    t, h, w = images.shape
    half = math.ceil(2 * radius_px)
    y, x = torch.meshgrid(
        torch.arange(-half, half + 1, dtype=torch.float32),
        torch.arange(-half, half + 1, dtype=torch.float32),
        indexing="ij",
    )
    chord = 2 * (radius_px**2 - x**2 - y**2).clamp_min(0).sqrt()
    template = torch.zeros(h, w)
    template[: 2 * half + 1, : 2 * half + 1] = chord - chord.mean()
    template = torch.roll(template, (-half, -half), (0, 1))  # centred at pixel (0, 0)
    score = torch.fft.irfft2(
        torch.fft.rfft2(-images.float()) * torch.fft.rfft2(template).conj(), s=(h, w)
    )
    median = score.flatten(1).median(1).values[:, None, None]
    mad = (score - median).abs().flatten(1).median(1).values[:, None, None]
    score = (score - median) / (1.4826 * mad).clamp_min(1e-12)
    window = 2 * int(radius_px) + 1
    peaks = (score == F.max_pool2d(score[:, None], window, 1, window // 2)[:, 0]) & (
        score > threshold
    )
    edge = math.ceil(radius_px)
    peaks[:, :edge] = peaks[:, -edge:] = False
    peaks[:, :, :edge] = peaks[:, :, -edge:] = False
    # beads score far above anything else: where a tilt's scores fall by BEAD_GAP or more
    # from one to the next (in descending order), what is below is not a bead (12 beads in a
    # 256² tilt at 0°: 183-228 against particles' 6-10 at SNR 1, 373-429 against 10-20
    # noise-free; every particle passed the threshold of 6)
    for f in range(t):
        ranked = score[f][peaks[f]].sort(descending=True).values
        if len(ranked) > 1:
            ratio = ranked[:-1] / ranked[1:]
            k = int(ratio.argmax())
            if float(ratio[k]) >= BEAD_GAP:
                peaks[f] &= score[f] >= ranked[k]
    out = []
    for f in range(t):
        iy, ix = torch.nonzero(peaks[f], as_tuple=True)
        s = score[f]

        def parabola(m: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            den = m - 2 * c + p
            return torch.where(den < 0, 0.5 * (m - p) / den, 0.0).clamp(-0.5, 0.5)

        c = s[iy, ix]
        dx = parabola(s[iy, ix - 1], c, s[iy, ix + 1])
        dy = parabola(s[iy - 1, ix], c, s[iy + 1, ix])
        out.append(torch.stack([ix + dx, iy + dy, c], -1).double())
    return out


# --- 3. the fit ---------------------------------------------------------------------------


def _rotations(y_tilt: torch.Tensor, z_rot: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``A = [Rz(φ) Ry(θ)]_xy`` ``(t, 2, 3)`` (§1.3, rlnTomoXTilt 0) and its derivatives by θ and
    by φ (per degree)."""
    t, p = torch.deg2rad(y_tilt), torch.deg2rad(z_rot)
    ct, st, cp, sp = t.cos(), t.sin(), p.cos(), p.sin()
    zero = torch.zeros_like(t)

    def mat(rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    a = mat([[cp * ct, -sp, cp * st], [sp * ct, cp, sp * st]])
    d_t = mat([[-cp * st, zero, cp * ct], [-sp * st, zero, sp * ct]]) * (math.pi / 180)
    d_p = mat([[-sp * ct, -cp, -sp * st], [cp * ct, -sp, cp * st]]) * (math.pi / 180)
    return a, d_t, d_p


def _project(
    y_tilt: torch.Tensor,
    z_rot: torch.Tensor,
    shifts: torch.Tensor,
    positions: torch.Tensor,
    centre: torch.Tensor,
) -> torch.Tensor:
    """``(t, n, 2)`` image positions of beads ``(n, 3)`` (px from the tomogram centre)."""
    a = _rotations(y_tilt, z_rot)[0]
    return centre + shifts[:, None] + torch.einsum("tij,nj->tni", a, positions)


def fit_projection_model(
    observed: torch.Tensor,
    start: TiltAlignment,
    positions: torch.Tensor,
    image_size: tuple[int, int],
    ref: int,
    iterations: int = 20,
) -> tuple[TiltAlignment, torch.Tensor]:
    """Least-squares fit of the projection model to bead observations ``(t, n, 2)`` (px, NaN
    where not seen): ``(alignment, positions (n, 3))`` starting from ``start`` and
    ``positions``.

    Unknowns: the shifts of every tilt but ``ref`` (kept), tilt angles and in-plane rotations
    (a common change of ZRot and per-tilt deviations, all held by the weak prior), the beads'
    positions (their mean depth held at 0). Levenberg-Marquardt on the normal equations with
    the analytic Jacobian (scipy's least_squares spent seconds per call in a threaded SVD on
    a shared 2-core machine; this takes milliseconds).
    """
    t, n, _ = observed.shape
    seen = (~observed[..., 0].isnan()).double()  # (t, n)
    obs = torch.nan_to_num(observed)
    centre = torch.tensor([image_size[0] // 2, image_size[1] // 2], dtype=torch.float64)
    free = [f for f in range(t) if f != ref]
    n_par = 2 * t + 1 + 2 * (t - 1) + 3 * n
    o_phi0, o_s, o_q = 2 * t, 2 * t + 1, 2 * t + 1 + 2 * (t - 1)
    prior = PRIOR_PX_PER_DEG

    def unpack(x: torch.Tensor):
        shifts = start.shifts.clone()
        shifts[free] += x[o_s:o_q].reshape(t - 1, 2)
        return (
            start.y_tilt + x[:t],
            start.z_rot + x[o_phi0] + x[t : 2 * t],
            shifts,
            positions + x[o_q:].reshape(n, 3),
        )

    def residual_and_jacobian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, z, s, q = unpack(x)
        a, d_t, d_p = _rotations(y, z)
        uv = centre + s[:, None] + torch.einsum("tij,nj->tni", a, q)
        w = seen[..., None]  # (t, n, 1)
        data = ((uv - obs) * w).reshape(-1)
        jac = torch.zeros(t, n, 2, n_par, dtype=torch.float64)
        tilts = torch.arange(t)
        jac[tilts, :, :, tilts] = torch.einsum("tij,nj->tni", d_t, q)
        jac[tilts, :, :, t + tilts] = torch.einsum("tij,nj->tni", d_p, q)
        jac[..., o_phi0] = jac[tilts, :, :, t + tilts]
        for k, f in enumerate(free):
            jac[f, :, 0, o_s + 2 * k] = 1.0
            jac[f, :, 1, o_s + 2 * k + 1] = 1.0
        beads = torch.arange(n)
        for i in range(3):
            jac[:, beads, :, o_q + 3 * beads + i] = a[None, :, :, i].expand(n, t, 2)  # (n, t, 2)
        jac = (jac * w[..., None]).reshape(2 * t * n, n_par)
        extra = torch.zeros(2 * t + 2, n_par, dtype=torch.float64)
        extra[: 2 * t + 1, : 2 * t + 1] = prior * torch.eye(2 * t + 1, dtype=torch.float64)
        extra[-1, o_q + 2 :: 3] = 10.0 / n
        values = torch.cat([data, prior * x[: 2 * t + 1], 10.0 * q[:, 2].mean()[None]])
        return values, torch.cat([jac, extra])

    x = torch.zeros(n_par, dtype=torch.float64)
    damping = 1e-3
    r, j = residual_and_jacobian(x)
    cost = float(r.square().sum())
    for _ in range(iterations):
        normal = j.T @ j
        gradient = j.T @ r
        diagonal = normal.diagonal().clamp_min(1e-9)
        step = torch.linalg.solve(normal + damping * torch.diag(diagonal), -gradient)
        r_new, j_new = residual_and_jacobian(x + step)
        new_cost = float(r_new.square().sum())
        if new_cost < cost:
            x, r, j = x + step, r_new, j_new
            damping = max(damping / 10, 1e-9)
            converged = cost - new_cost < 1e-10 * max(cost, 1e-12)
            cost = new_cost
            if converged:
                break
        else:
            damping *= 10
    y, z, s, q = unpack(x)
    return TiltAlignment(y_tilt=y, z_rot=z, shifts=s), q


# --- 2. tracking --------------------------------------------------------------------------


def _match(predicted: torch.Tensor, found: torch.Tensor, within: float) -> torch.Tensor:
    """``(n,)`` index into ``found`` ``(k, 2)`` of each ``predicted`` ``(n, 2)`` bead's mutual
    nearest detection within ``within`` px, -1 where none."""
    out = torch.full((len(predicted),), -1, dtype=torch.long)
    if not len(found) or not len(predicted):
        return out
    d = torch.cdist(predicted, found)
    j = d.argmin(1)
    mutual = d.argmin(0)[j] == torch.arange(len(predicted))
    ok = mutual & (d.gather(1, j[:, None])[:, 0] <= within)
    out[ok] = j[ok]
    return out


def _median_offset(predicted: torch.Tensor, found: torch.Tensor, within: float) -> torch.Tensor:
    """``(2,)`` median offset (px) from the ``predicted`` beads ``(n, 2)`` to their nearest
    detections ``(k, 2)``, over those within ``within`` px; 0 where none is."""
    if not len(found) or not len(predicted):
        return torch.zeros(2, dtype=torch.float64)
    near = torch.cdist(predicted, found).min(1)
    close = near.values <= within
    if not bool(close.any()):
        return torch.zeros(2, dtype=torch.float64)
    return (found[near.indices[close]] - predicted[close]).median(0).values


def _subset(alignment: TiltAlignment, tilts: list[int]) -> TiltAlignment:
    return TiltAlignment(
        alignment.y_tilt[tilts], alignment.z_rot[tilts], alignment.shifts[tilts].clone()
    )


def _put(alignment: TiltAlignment, tilts: list[int], part: TiltAlignment) -> TiltAlignment:
    y, z, s = alignment.y_tilt.clone(), alignment.z_rot.clone(), alignment.shifts.clone()
    y[tilts], z[tilts], s[tilts] = part.y_tilt, part.z_rot, part.shifts
    return TiltAlignment(y, z, s)


def track_beads(
    detections: list[torch.Tensor],
    start: TiltAlignment,
    image_size: tuple[int, int],
    radius_px: float,
    search_px: float,
) -> tuple[torch.Tensor, TiltAlignment, torch.Tensor]:
    """Follow the beads of the tilt nearest 0° through the series: ``(observed (t, n, 2) px,
    NaN where not found; alignment; positions (n, 3))``. ``detections`` ``[(k, >=2)]`` xy px
    per tilt; ``start`` the nominal angles and coarse shifts; a tilt's predicted beads move
    together by the median offset to their nearest detections within ``search_px``, then each
    takes its mutual nearest detection within ``radius_px``."""
    t = len(detections)
    order = torch.argsort(start.y_tilt.abs(), stable=True).tolist()
    ref = order[0]
    seeds = detections[ref][:, :2]
    n = len(seeds)
    observed = torch.full((t, n, 2), torch.nan, dtype=torch.float64)
    observed[ref] = seeds
    centre = torch.tensor([image_size[0] // 2, image_size[1] // 2], dtype=torch.float64)
    rot = tilt_rotations(0.0 * start.y_tilt[ref], start.y_tilt[ref], start.z_rot[ref])[:2, :2]
    positions = torch.zeros(n, 3, dtype=torch.float64)
    positions[:, :2] = torch.linalg.solve(rot, (seeds - centre - start.shifts[ref]).T).T
    alignment = start
    done = [ref]
    for f in order[1:]:
        predicted = _project(
            alignment.y_tilt[f : f + 1], alignment.z_rot[f : f + 1],
            alignment.shifts[f : f + 1], positions, centre,
        )[0]  # fmt: skip
        found = detections[f][:, :2]
        offset = _median_offset(predicted, found, search_px)
        match = _match(predicted + offset, found, 2 * radius_px)
        if int((match >= 0).sum()) < 2:
            continue
        observed[f, match >= 0] = found[match[match >= 0]]
        shifts = alignment.shifts.clone()
        shifts[f] += offset
        alignment = TiltAlignment(alignment.y_tilt, alignment.z_rot, shifts)
        done.append(f)
        part, positions = fit_projection_model(
            observed[done], _subset(alignment, done), positions, image_size, 0
        )
        alignment = _put(alignment, done, part)
    return observed, alignment, positions


# --- 4. the whole alignment ---------------------------------------------------------------


def _level(positions: torch.Tensor, radius_px: float) -> float:
    """The rotation about the tilt axis (deg) that makes the beads' surfaces level: a plane
    ``z = a·x + b·y + c_g`` with one intercept per surface (two when the beads' depths have a
    gap wider than 4 radii, split there) is level after the specimen turns by ``-β`` about y,
    ``tan β = -a``; every tilt angle becomes ``θ + β``."""
    z = positions[:, 2]
    order = torch.argsort(z)
    gaps = z[order].diff()
    groups = torch.zeros(len(z), dtype=torch.long)
    if len(gaps) and float(gaps.max()) > 4 * radius_px:
        groups[order[int(gaps.argmax()) + 1 :]] = 1
    design = torch.cat([positions[:, :2], F.one_hot(groups, int(groups.max()) + 1).double()], 1)
    solution = torch.linalg.lstsq(design, z[:, None]).solution[:, 0]
    return math.degrees(math.atan(-float(solution[0])))


def align_fiducials(
    images: torch.Tensor,
    y_tilt: torch.Tensor,
    z_rot: torch.Tensor,
    bead_radius_px: float,
    *,
    max_shift: float = 60.0,
    threshold: float = 6.0,
) -> BeadModel:
    """Align a tilt series ``(t, h, w)`` (bin-1, any row order) on its gold beads, from the
    nominal tilt angles and ZRot (deg, ``(t,)``); ``bead_radius_px`` bin-1 px; ``max_shift``
    bin-1 px between neighbouring tilts (the coarse cross-correlation that starts the
    tracking); ``threshold`` of the detection (robust standard deviations). Raises
    ``ValueError`` when the tilt nearest 0° shows fewer than 3 beads."""
    t, h, w = images.shape
    b = max(1, int(bead_radius_px // 3))
    binned = fourier_bin(images.float(), b)
    start = TiltAlignment(
        y_tilt.double().clone(), z_rot.double().clone(), torch.zeros(t, 2, dtype=torch.float64)
    )
    band = _bandpass(binned, 2.0 / min(binned.shape[-2:]), 0.2)
    start = TiltAlignment(
        start.y_tilt, start.z_rot, coarse_shifts(band, start.y_tilt, start.z_rot, max_shift / b) * b
    )
    detections = [
        d * torch.tensor([b, b, 1.0]) for d in detect_beads(binned, bead_radius_px / b, threshold)
    ]
    ref = int(start.y_tilt.abs().argmin())
    if len(detections[ref]) < 3:
        raise ValueError(f"{len(detections[ref])} bead(s) found in the tilt nearest 0°: need 3")
    radius = max(float(bead_radius_px), 2.0)
    observed, alignment, positions = track_beads(detections, start, (w, h), radius, 4 * radius)
    centre = torch.tensor([w // 2, h // 2], dtype=torch.float64)

    def errors() -> torch.Tensor:
        uv = _project(alignment.y_tilt, alignment.z_rot, alignment.shifts, positions, centre)
        return (uv - observed).norm(dim=-1)  # (t, n), NaN where not observed

    for _ in range(2):  # every tilt matched again with the fitted model, outliers dropped
        uv = _project(alignment.y_tilt, alignment.z_rot, alignment.shifts, positions, centre)
        # beads closer than 2.5 radii to another in a tilt overlap there: not used
        near = torch.cdist(uv, uv) + torch.eye(len(positions)) * 1e9
        overlap = near.amin(-1) < 2.5 * radius  # (t, n)
        for f in range(t):  # the tilt's median offset first: a tilt the fit left off
            offset = _median_offset(uv[f], detections[f][:, :2], 2 * radius)
            match = _match(uv[f] + offset, detections[f][:, :2], radius)
            found = detections[f][match.clamp_min(0), :2]
            observed[f] = torch.where(((match >= 0) & ~overlap[f])[:, None], found, torch.nan)
        for _ in range(2):
            alignment, positions = fit_projection_model(observed, alignment, positions, (w, h), ref)
            error = errors()
            rms = float(error[~error.isnan()].square().mean().sqrt())
            observed[error > max(3 * rms, 1.5)] = torch.nan
    alignment, positions = fit_projection_model(observed, alignment, positions, (w, h), ref)
    beta = _level(positions, radius)
    positions = positions @ tilt_rotations(
        *torch.tensor([0.0, beta, 0.0], dtype=torch.float64)
    )  # Ry(-β) q
    alignment = TiltAlignment(alignment.y_tilt + beta, alignment.z_rot, alignment.shifts)
    error = errors()
    seen = ~error.isnan()
    squared = torch.nan_to_num(error).square()
    per_tilt = (squared.sum(1) / seen.sum(1)).sqrt()  # NaN without beads
    count = seen.sum(1)
    median = float(per_tilt.nanmedian())
    flagged = (count < 3) | (per_tilt > 3 * median + 1.0)
    model = BeadModel(
        alignment=alignment,
        residual_px=per_tilt,
        beads_per_tilt=count,
        flagged=flagged,
        positions=positions,
        bead_residual_px=(squared.sum(0) / seen.sum(0)).sqrt(),
        observed=observed,
        rms_px=float((squared.sum() / seen.sum()).sqrt()),
        axis_correction=float((alignment.z_rot - z_rot.double()).mean()),
        tilt_offset=beta,
    )
    log.info(
        "fiducials: %d beads, %.0f per tilt, residual %.2f px RMS, ZRot %+.2f deg, tilt "
        "offset %+.2f deg", len(positions), float(count.double().mean()), model.rms_px,
        model.axis_correction, beta,
    )  # fmt: skip
    return model
