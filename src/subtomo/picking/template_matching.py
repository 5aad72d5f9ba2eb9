"""Template matching in a tomogram: the best normalised correlation and orientation per voxel.

Conventions. Volumes are zyx; vectors xyz; a template box of ``N`` voxels has its centre at
voxel ``N//2`` (conventions §0). An orientation is a RELION matrix ``A`` (reference ->
tomogram, §4; :func:`subtomo.geometry.euler_to_matrix`): a particle at voxel ``p`` with angles
``A`` has the density ``V(Aᵀ(x − p))``, so the rotated template is ``T_A(x) = V(Aᵀx)`` and the
angles found are the rlnAngleRot/Tilt/Psi a particles.star gives that particle (no
rlnTomoSubtomogram* angles). Tilt ``f`` of the series has the rotation ``R_f`` of its
projection matrix (§1.3, tomogram -> image): it measured the plane of the tomogram's Fourier
space orthogonal to ``n_f = R_fᵀ e_z``, so only matrices enter here, never the nominal tilt
axis.

**What the tomogram holds** (:func:`tilt_weights`). A weighted back-projection's Fourier
component ``K`` (cycles/Å, tomogram frame) mixes the tilts whose planes pass close to ``K``:
tilt ``f`` contributes with the angular tent ``s_f = max(0, 1 − α_f/Δ_f)``, ``α_f`` the angle
between ``K`` and its plane and ``Δ_f`` the angle to the nearest other tilt's plane, and
carries that tilt's CTF (at ``q = R_f K``, defocus per tilt, §1.5; ``|CTF|`` for a
phase-flipped tomogram) and dose weight. The template's filter is ``Σ s_f c_f d_f / max(1,
Σ s_f)``: the interpolated CTF and dose inside the measured region, falling to zero one tilt
step past the highest tilts (the missing wedge).

**The score** (:func:`match_template`) is the local normalised cross-correlation (Roseman
2003): for the filtered, rotated template ``t`` and the mask ``m`` (weights in [0, 1]),
``t`` is normalised to zero mean and unit variance under ``m``, and at every voxel ``x``

    score(x) = Σ_r m(r) t(r) T(x + r) / (Σ m · σ_m(x)),
    σ_m(x)² = Σ_r m(r) T(x + r)² / Σ m − (Σ_r m(r) T(x + r) / Σ m)²,

the Pearson correlation of template and tomogram under the mask placed at ``x`` (in [−1, 1]).
Sums over ``r`` are FFT correlations over the whole tomogram (periodic). A spherical mask is
the same in every orientation, so ``σ_m`` is computed once; any other mask turns with the
template (three more FFTs per orientation). The per-voxel maximum over orientations and its
orientation index are kept; ``sigma`` is the root-mean-square over orientations of each
orientation's score standard deviation over the voxels (pytom-match-pick's search statistics),
which sets the false-alarm cut-off (:mod:`subtomo.picking.peaks`).

Under torch.distributed the orientation batches are shared out over the ranks (one per GPU)
and the per-voxel maxima reduced (:func:`match_template`): the same scores, orientations and
``sigma`` as one process.

Memory: the tomogram's spectrum, the statistics volumes and ``batch`` orientations' score
volumes, whatever the number of orientations. Per orientation: the zero-padded template's
forward FFT, one product with the tomogram's spectrum (which carries, once, the phase ramp that
moves the template's centre to the origin) and one inverse FFT; the orientation's score
standard deviation is sampled on every 8th voxel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from subtomo.ctf import ctf_phase, dose_weight_at
from subtomo.distributed import all_gather_object, all_reduce, is_distributed, shard
from subtomo.fourier import fftfreq_grid
from subtomo.tilt.tomogram import CtfParams

__all__ = ["MatchResult", "match_template", "rotate_volumes", "tilt_weights"]


@dataclass
class MatchResult:
    """Per-voxel best ``scores`` ``(d, h, w)`` float32 and ``orientation`` (index into the
    matrices searched, int64); ``sigma``: the score standard deviation of one orientation
    (RMS over orientations); ``n_orientations``; ``seconds`` spent matching."""

    scores: torch.Tensor
    orientation: torch.Tensor
    sigma: float
    n_orientations: int
    seconds: float


def tilt_weights(
    rotations: torch.Tensor,
    box: int,
    voxel_size: float,
    *,
    ctf: CtfParams | None = None,
    phase_flipped: bool = True,
    pre_exposure: torch.Tensor | None = None,
    bfactor_per_electron_dose: float = 0.0,
) -> torch.Tensor:
    """The tomogram's transfer function on a template box: ``(box, box, box//2+1)`` float32,
    unshifted rfft layout, tomogram frame (see the module docstring).

    ``rotations`` ``(t, 3, 3)``: the tilts' ``R_f`` (the 3x3 part of their projection
    matrices); ``voxel_size`` in Å; ``ctf`` per tilt (None: no CTF; its defocus at the
    specimen centre: hand and slope are not used), ``phase_flipped`` the tomogram was CTF
    phase-flipped (the template gets ``|CTF|``); ``pre_exposure`` e/Å²
    ``(t,)`` (None: no dose weighting); ``bfactor_per_electron_dose`` β of §1.5 (0: Grant &
    Grigorieff).
    """
    r = torch.as_tensor(rotations, dtype=torch.float64)
    device = r.device
    k = fftfreq_grid((box,) * 3, pixel_size=voxel_size, device=device, dtype=torch.float64)
    q = torch.einsum("tij,zyxj->tzyxi", r, k)  # (t, z, y, x, 3): image-frame frequency
    k_norm = k.norm(dim=-1)  # (z, y, x) cycles/Å
    sin_alpha = (q[..., 2].abs() / k_norm.clamp_min(1e-12)).clamp(max=1.0)
    normals = r[:, 2, :]  # (t, 3): n_f
    cos_between = (normals @ normals.T).abs().clamp(max=1.0)
    cos_between.fill_diagonal_(-1.0)
    gap = torch.arccos(cos_between.amax(dim=1)).clamp_min(1e-6) if len(r) > 1 else None
    alpha = torch.arcsin(sin_alpha)
    if gap is None:
        share = (alpha < 1e-6).double()
    else:
        share = (1.0 - alpha / gap[:, None, None, None]).clamp_min(0.0)  # (t, z, y, x)
    share[:, k_norm == 0] = 1.0
    value = torch.ones_like(share)
    if ctf is not None:
        shape = (-1, 1, 1, 1)
        gamma = ctf_phase(
            q[..., 0], q[..., 1],
            *(torch.as_tensor(p, dtype=torch.float64, device=device).reshape(shape)
              for p in (ctf.defocus_u, ctf.defocus_v, ctf.defocus_angle)),
            ctf.voltage, ctf.cs, ctf.amplitude_contrast,
            phase_shift_deg=torch.as_tensor(ctf.phase_shift, dtype=torch.float64,
                                            device=device).reshape(shape),
        )  # fmt: skip
        value = -torch.sin(gamma)
        if phase_flipped:
            value = value.abs()
    if pre_exposure is not None:
        dose = torch.as_tensor(pre_exposure, dtype=torch.float64, device=device)
        value = value * dose_weight_at(k_norm, dose.reshape(-1, 1, 1, 1), bfactor_per_electron_dose)
    total = share.sum(0)
    return ((share * value).sum(0) / total.clamp_min(1.0)).float()


def rotate_volumes(volume: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``(b, N, N, N)``: ``volume`` ``(N, N, N)`` turned by each RELION matrix ``A`` about voxel
    ``N//2``, ``out(x) = volume(Aᵀx)`` (trilinear, zero outside)."""
    n = volume.shape[-1]
    c = n // 2
    a = torch.as_tensor(matrices, dtype=torch.float32, device=volume.device)
    axis = torch.arange(n, dtype=torch.float32, device=volume.device) - c
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    points = torch.stack([x, y, z], dim=-1).reshape(-1, 3)  # (N³, xyz) about the centre
    source = points @ a + c  # (b, N³, 3): Aᵀx as a row vector x·A, then decentred
    grid = (2.0 * source / (n - 1) - 1.0).reshape(len(a), n, n, n, 3)
    out = F.grid_sample(
        volume.expand(len(a), 1, n, n, n), grid, mode="bilinear", align_corners=True
    )
    return out[:, 0]


def _ramp(n_fft: int, n_keep: int, shift: int, device: torch.device) -> torch.Tensor:
    """``exp(2πi k shift / n_fft)`` for the first ``n_keep`` frequencies: moves a signal by
    ``−shift`` samples (cyclically)."""
    k = torch.arange(n_keep, device=device, dtype=torch.float64)
    return torch.polar(torch.ones_like(k), 2 * math.pi * k * shift / n_fft).to(torch.complex64)


class _Padded:
    """rfft over the tomogram's shape of small boxes ``(b, N, N, N)`` zero-padded at the end
    (pocketfft's padded transform beat pruning the zeros axis by axis 1.5x). :meth:`centred`
    multiplies a tomogram spectrum by the phase ramp that moves the boxes' centre ``N//2``
    to voxel 0, so ``irfft(conj(pad(g)) · centred(F_T))(x) = Σ_r g(r) T(x + r)``."""

    def __init__(self, shape: tuple[int, int, int], n: int, device: torch.device) -> None:
        d, h, w = shape
        c = n // 2
        self.shape = shape
        self.ramp = (
            _ramp(d, d, -c, device)[:, None, None]
            * _ramp(h, h, -c, device)[:, None]
            * _ramp(w, w // 2 + 1, -c, device)
        )

    def __call__(self, boxes: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfftn(boxes, s=self.shape, dim=(-3, -2, -1))

    def centred(self, spectrum: torch.Tensor) -> torch.Tensor:
        return spectrum * self.ramp


def _local_stats(
    tomo_f: torch.Tensor, tomo2_f: torch.Tensor, mask_f: torch.Tensor, shape, mask_sum: float
) -> torch.Tensor:
    """``1 / (Σm · σ_m(x))`` (0 where the tomogram is flat) for mask spectra ``(b, ...)``."""
    mean = torch.fft.irfftn(mask_f.conj() * tomo_f, s=shape) / mask_sum
    mean2 = torch.fft.irfftn(mask_f.conj() * tomo2_f, s=shape) / mask_sum
    sigma = (mean2 - mean**2).clamp_min(0.0).sqrt()
    floor = 1e-6 * float(sigma.amax()) + 1e-30
    return torch.where(sigma > floor, 1.0 / (mask_sum * sigma.clamp_min(floor)), 0.0)


def _normalised(templates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``m·t'`` with ``t'`` of zero mean and unit variance under the weights ``m``."""
    dims = (-3, -2, -1)
    total = mask.sum(dim=dims, keepdim=True)
    mean = (templates * mask).sum(dim=dims, keepdim=True) / total
    centred = templates - mean
    var = (mask * centred**2).sum(dim=dims, keepdim=True) / total
    return mask * centred / var.clamp_min(1e-30).sqrt()


def match_template(
    tomogram: torch.Tensor,
    template: torch.Tensor,
    mask: torch.Tensor,
    matrices: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    spherical_mask: bool = True,
    valid: torch.Tensor | None = None,
    batch: int = 4,
    progress: Callable[[int], None] | None = None,
) -> MatchResult:
    """Search every orientation of ``matrices`` ``(m, 3, 3)`` (RELION ``A``) over the tomogram.

    ``tomogram`` ``(d, h, w)``; ``template`` and ``mask`` ``(N, N, N)`` at the tomogram's voxel
    size, centred at ``N//2`` (contrast as in the tomogram); ``weights`` the template filter of
    :func:`tilt_weights` ``(N, N, N//2+1)`` (None: none); ``spherical_mask``: the mask is the
    same in every orientation; ``valid`` (bool ``(d, h, w)``) the voxels whose scores enter
    ``sigma`` (None: all); ``batch`` orientations at once (memory); ``progress`` gets the
    number of orientations done after each batch. Runs on the tomogram's device; under
    torch.distributed every rank passes the same arguments, searches its share of the
    batches and returns the result over all of them.
    """
    start = time.perf_counter()
    device = tomogram.device
    shape = tuple(tomogram.shape)
    tomo = tomogram.float()
    tomo = tomo - tomo.mean()
    template, mask = template.float().to(device), mask.float().to(device)
    mask_sum = float(mask.sum())
    if mask_sum <= 0:
        raise ValueError("the mask is empty")
    pad = _Padded(shape, template.shape[-1], device)
    tomo_f = pad.centred(torch.fft.rfftn(tomo))
    tomo2_f = pad.centred(torch.fft.rfftn(tomo**2))
    inv_sigma = None
    if spherical_mask:
        inv_sigma = _local_stats(tomo_f, tomo2_f, pad(mask[None]), shape, mask_sum)[0]
    best = torch.full(shape, -2.0, device=device)
    best_index = torch.zeros(shape, dtype=torch.int64, device=device)
    a = torch.as_tensor(matrices, dtype=torch.float64)
    sparse = (slice(None, None, 2),) * 3  # sigma from every 8th voxel
    n_sample = int(valid[sparse].sum()) if valid is not None else math.prod(best[sparse].shape)
    variances = {}  # first orientation of a batch -> its share of the score variance
    for first in shard(range(0, len(a), batch)):
        chunk = a[first : first + batch].to(device)
        rotated = rotate_volumes(template, chunk)
        if weights is not None:
            rotated = torch.fft.irfftn(
                torch.fft.rfftn(rotated, dim=(-3, -2, -1)) * weights.to(device),
                s=rotated.shape[-3:],
                dim=(-3, -2, -1),
            )
        if spherical_mask:
            masks = mask.expand_as(rotated)
            scale = inv_sigma
        else:
            masks = rotate_volumes(mask, chunk).clamp(0.0, 1.0)
            sums = masks.sum(dim=(-3, -2, -1))
            masks = masks * (mask_sum / sums.clamp_min(1e-30))[:, None, None, None]
            scale = _local_stats(tomo_f, tomo2_f, pad(masks), shape, mask_sum)
        scores = torch.fft.irfftn(pad(_normalised(rotated, masks)).conj() * tomo_f, s=shape)
        scores = scores * scale
        sample = scores[(slice(None), *sparse)]
        sample = sample if valid is None else sample[:, valid[sparse]]
        variances[first] = float((sample.reshape(len(chunk), -1) ** 2).sum()) / n_sample
        top, where = scores.max(dim=0)
        better = top > best
        best = torch.maximum(best, top)
        best_index.masked_scatter_(better, where[better] + first)
        if progress is not None:
            progress(len(chunk))
    # over the ranks: the best score, the first orientation reaching it (as one process
    # keeps the first), the variances summed in batch order (the same bits as one process)
    if is_distributed():
        local = best.clone()
        all_reduce(best, "max")
        unset = torch.iinfo(torch.int64).max
        best_index = all_reduce(torch.where(local == best, best_index, unset), "min")
    variance_sum = 0.0
    for _, share in sorted(v for part in all_gather_object(variances) for v in part.items()):
        variance_sum += share
    return MatchResult(
        scores=best,
        orientation=best_index,
        sigma=math.sqrt(variance_sum / len(a)),
        n_orientations=len(a),
        seconds=time.perf_counter() - start,
    )
