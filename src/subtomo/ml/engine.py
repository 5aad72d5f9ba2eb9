"""One iteration of RELION's regularised likelihood optimisation over batches of particles.

:func:`expectation_pass` runs the E-step batch by batch (memory bounded by the batch size
and ``max_slices``) and adds each batch to the M-step sums; :func:`maximise` turns the sums
into the next model; :func:`iterate` does both (classification and the initial model).
Gold-standard refinement runs :func:`expectation_pass` for each half, takes tau2 from the
half-set FSC (:mod:`subtomo.ml.autorefine`) and calls :func:`maximise` per half.

Everything is deterministic: the noise that fills the outside of the particle mask is drawn
from a generator seeded by (``seed``, iteration, first particle of the batch), so
``--continue`` from a saved :class:`~subtomo.ml.model.MLModel` reproduces the uninterrupted
run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from subtomo.distributed import all_gather_object
from subtomo.fourier.resolution import ssnr_resolution_shell
from subtomo.geometry.euler import rotation_angle_deg
from subtomo.geometry.orientations import orientation_grid
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.masks import soft_sphere
from subtomo.ml.batch import FourierPoints, ParticleBatch, fourier_points
from subtomo.ml.estep import EStepResult, expectation, score_batch, slice_matrices
from subtomo.ml.images import mask_images
from subtomo.ml.likelihood import centred_data
from subtomo.ml.model import MLModel, reference_tau2
from subtomo.ml.mstep import MStepSums, accumulate, weight_spectrum
from subtomo.ml.projector import Projector
from subtomo.ml.sampling import PoseGrid, Sampling, oversample, pose_grid
from subtomo.reconstruct import reconstruct

__all__ = [
    "EngineParams",
    "ParticleResults",
    "expectation_pass",
    "iterate",
    "maximise",
    "particle_sphere",
    "self_term_scores",
    "solvent_mask",
]


@dataclass(frozen=True)
class EngineParams:
    """Options of relion_refine that the engine implements.

    ``particle_diameter_angst`` (``--particle_diameter``), ``zero_mask`` (``--zero_mask``),
    ``tau2_fudge`` T (``--tau2_fudge``), ``padding`` (``--pad``), ``adaptive_fraction``
    (``--adaptive_fraction``), ``strict_highres_exp_angst`` ("Limit resolution E-step"),
    ``incr_size`` (``--incr_size``), ``reference_mask`` ``(n, n, n)`` (``--solvent_mask``;
    otherwise a soft sphere of the particle diameter flattens the solvent when
    ``flatten_solvent``), ``random_class_init``: in the first iteration with K > 1 each
    particle goes to one random class in the M-step (RELION's random initial subsets),
    ``seed`` (``--random_seed``), ``max_slices``: reference slices computed at once (1024:
    their sampling coordinates and values then stay in the cache; 4096 was 1.5x slower on the
    D7 benchmark). ``coarse_nearest``: the coarse pass of adaptive oversampling samples the
    slices at the nearest voxel of the padded reference (~4x faster than trilinear); the
    significant poses it finds are scored again trilinearly by the fine pass, so it only
    decides where the fine pass looks.
    ``seeded_classes``: the first iteration takes each particle's class from the batch
    (``batch.classes``, e.g. from :func:`subtomo.ml.seeding.pca_classes`) instead of a random
    one. ``leave_one_out``: without alignment, a particle's score for the class it was in
    leaves out its own contribution to that class's reference (:func:`self_term_scores`).
    ``mean_poses``: the results hold each particle's posterior mean pose near its most
    probable one instead of that grid point (Refine3D's final iteration).
    ``auto_solvent_mask``: without ``reference_mask``, gold-standard refinement flattens the
    references of the next iteration with the loose mask its FSC was taken in (see
    :func:`subtomo.ml.autorefine.gold_standard_iteration`). ``insert_padding``: the Fourier
    oversampling of the M-step accumulators (``None``: ``padding``, the projector's). The
    stack images are premultiplied periodically in their box; dividing their sums by the CTF²
    on a box-sized grid undoes that exactly, on a twice finer grid it does not (D7 benchmark,
    the same poses: masked FSC to the truth 0.82 vs 0.88 at 23 Å), so Refine3D's final map
    is reconstructed at 1 (conventions §7.1).
    """

    particle_diameter_angst: float
    zero_mask: bool = False
    tau2_fudge: float = 1.0
    padding: float = 2.0
    adaptive_fraction: float = 0.999
    strict_highres_exp_angst: float | None = None
    incr_size: int = 10
    reference_mask: torch.Tensor | None = None
    flatten_solvent: bool = True
    random_class_init: bool = True
    seed: int = 0
    max_slices: int = 1024
    coarse_nearest: bool = True
    seeded_classes: bool = False
    leave_one_out: bool = False
    mean_poses: bool = False
    auto_solvent_mask: bool = False
    insert_padding: float | None = None


@dataclass
class ParticleResults:
    """Per-particle outcome of an E-step (rows in ``index`` order of the batches).

    ``classes`` 0-based best class; ``rotations`` ``(N, 3, 3)`` best ``A_part``;
    ``offsets`` ``(N, 3)`` best offsets (Å); ``pmax``, ``n_significant``, ``log_likelihood``
    as in :class:`~subtomo.ml.estep.EStepResult`.
    """

    index: torch.Tensor
    classes: torch.Tensor
    rotations: torch.Tensor
    offsets: torch.Tensor
    pmax: torch.Tensor
    n_significant: torch.Tensor
    log_likelihood: torch.Tensor

    @classmethod
    def concat(cls, parts: list[ParticleResults]) -> ParticleResults:
        return cls(
            **{
                f.name: torch.cat([getattr(p, f.name) for p in parts])
                for f in dataclasses.fields(cls)
            }
        )

    def all_gathered(self) -> ParticleResults:
        """Every rank's results in ascending particle index (this one for one process,
        whose batches come in ascending index already)."""
        parts = all_gather_object(self)
        if len(parts) == 1:
            return self
        out = ParticleResults.concat(parts)
        order = torch.argsort(out.index, stable=True)
        return ParticleResults(
            **{f.name: getattr(out, f.name)[order] for f in dataclasses.fields(out)}
        )


def _batch_results(
    batch: ParticleBatch, poses: PoseGrid, res: EStepResult, mean_poses: bool
) -> ParticleResults:
    if mean_poses:
        rot, off = _posterior_mean_pose(poses, res)
    else:
        ar = torch.arange(batch.size, device=res.best.device)
        j, t = res.best[:, 1], res.best[:, 2]
        rot = poses.rotations[ar if poses.rotations.shape[0] > 1 else 0 * ar, j]
        off = poses.offsets[ar, poses.offset_index(j, t)]
    return ParticleResults(
        index=batch.index.cpu(),
        classes=res.best[:, 0].cpu(),
        rotations=rot.double().cpu(),
        offsets=off.cpu(),
        pmax=res.pmax.cpu(),
        n_significant=res.n_significant.cpu(),
        log_likelihood=res.log_evidence.cpu(),
    )


POSE_MEAN_RADIUS_DEG = 3.0
"""Poses within this angle of the most probable one enter the posterior mean pose."""


def _posterior_mean_pose(poses: PoseGrid, res: EStepResult) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean rotation ``(b, 3, 3)`` and offset ``(b, 3)`` Å of each particle in its
    most probable class, over the poses within :data:`POSE_MEAN_RADIUS_DEG` of its most
    probable rotation (so that distant modes cannot average in).

    RELION writes the most probable grid point; the mean lies between grid points where the
    posterior spans several of them, as it does at the finest local sampling. Only the
    final iteration writes it: the auto-refine rules judge convergence by grid poses that
    stop changing, and mean poses keep moving by small amounts. On the D7 benchmark
    (``benchmarks/refine3d.py --map proteasome``) the final median angular error went from
    1.14 to 1.08 deg (0.94 in the map's frame) and the position error from 1.30 to 1.23 Å.
    The mean rotation is the
    weighted sum of the matrices projected back onto SO(3) (the nearest rotation, by SVD).
    """
    b = res.weights.shape[0]
    ar = torch.arange(b, device=res.best.device)
    c, j = res.best[:, 0], res.best[:, 1]
    w = res.weights[ar, c].double()  # (b, J, T)
    rots = poses.rotations.double().expand(b, -1, -1, -1)  # (b, J, 3, 3)
    near = rotation_angle_deg(rots, rots[ar, j][:, None]) <= POSE_MEAN_RADIUS_DEG
    w = w * near[:, :, None]
    w = w / w.sum((1, 2), keepdim=True)
    u, _, vh = torch.linalg.svd(torch.einsum("bj,bjxy->bxy", w.sum(2), rots))
    flip = torch.ones(b, 3, dtype=w.dtype, device=w.device)
    flip[:, 2] = torch.det(u @ vh)
    rot = u @ (flip[:, :, None] * vh)
    index = poses.offset_index(
        torch.arange(poses.n_rot, device=w.device)[:, None],
        torch.arange(poses.n_trans, device=w.device)[None],
    ).expand(poses.n_rot, poses.n_trans)  # into poses.offsets
    per_offset = torch.zeros(b, poses.offsets.shape[1], dtype=w.dtype, device=w.device)
    per_offset.scatter_add_(1, index.reshape(1, -1).expand(b, -1), w.reshape(b, -1))
    off = torch.einsum("bt,btx->bx", per_offset, poses.offsets.double())
    return rot, off.to(poses.offsets.dtype)


def _initial_classes(
    res: EStepResult, classes: torch.Tensor | None, generator: torch.Generator
) -> EStepResult:
    """Move each particle's pose weights to one class: ``classes`` ``(b,)`` or random ones
    (first-iteration seeding)."""
    b, k = res.weights.shape[:2]
    if classes is None:
        classes = torch.randint(k, (b,), generator=generator)
    cls = classes.to(res.weights.device)
    merged = res.weights.sum(1)  # (b, J, T)
    w = torch.zeros_like(res.weights)
    w[torch.arange(b, device=w.device), cls] = merged
    best = res.best.clone()
    best[:, 0] = cls
    return dataclasses.replace(res, weights=w, best=best)


def _generator(params: EngineParams, iteration: int, batch: ParticleBatch) -> torch.Generator:
    seed = (params.seed * 1_000_003 + iteration * 7_919 + int(batch.index[0])) % (2**63)
    return torch.Generator().manual_seed(seed)


def _posterior(
    projector: Projector,
    data: torch.Tensor,
    ctf2: torch.Tensor,
    inv_sigma2: torch.Tensor,
    tilt_rotations: torch.Tensor,
    points: FourierPoints,
    pixel_size: float,
    log_class_priors: torch.Tensor,
    poses: PoseGrid,
    adaptive_fraction: float,
    self_term: torch.Tensor | None = None,
    interpolation: str = "bilinear",
) -> EStepResult:
    """Scores and posterior of one batch (``data``/``ctf2`` ``(b, f, K)`` at ``points``);
    ``self_term`` ``(b, C)`` is added to every pose of a class (leave-one-out);
    ``interpolation`` of the slices as in :func:`~subtomo.ml.estep.score_batch`."""
    scores = score_batch(
        projector, data, ctf2, inv_sigma2, tilt_rotations, poses, points, pixel_size,
        interpolation=interpolation,
    )  # fmt: skip
    if self_term is not None:
        scores += self_term[:, :, None, None].to(scores)
    return expectation(scores, log_class_priors, poses, adaptive_fraction)


SELF_OVERLAP = 0.78
"""kappa: the part of one Fourier component inserted into a reference that its slice reads
back at the same point (trilinear insertion and interpolation, gridding correction, crop and
solvent mask), measured against references rebuilt without the particle
(``tests/test_class3d.py::test_self_term_is_the_particles_own_contribution``)."""

LEAVE_OUT_SHARE = 0.64
"""The share of the self term Class3D removes (``kappa`` 0.78 x 0.64 = 0.5). The shell-mean
weight in the denominator describes the average particle, not each one, and a particle whose
self term is overestimated is pushed out of its class: removing all of it emptied one class
on one of three hard-mixture seeds (purity 0.93 after 2 iterations, 0.50 after 25), while
keeping a third as margin gave 0.91, 0.93 and 0.91, stable (``benchmarks/class3d.py --bars
hard``)."""


def self_term_scores(
    projector: Projector,
    data: torch.Tensor,
    ctf2: torch.Tensor,
    inv_sigma2: torch.Tensor,
    matrices: torch.Tensor,
    points: FourierPoints,
    own_class: torch.Tensor,
    denominator: torch.Tensor,
    share: float = 1.0,
) -> torch.Tensor:
    """Score changes ``(b, C)`` that leave each particle out of its own class's reference.

    A particle's data ``Y`` went into the reference of its class ``c`` (``own_class``) with
    weight one; its projection there holds ``Delta = kappa Y / (sigma2 (Wbar_c + 1/(T
    tau2_c)))`` of it (``denominator`` ``(C, n//2+1)``, per shell; kappa
    :data:`SELF_OVERLAP`, times ``share``). Scoring against ``P - Delta`` instead of ``P``
    changes the score
    ``Re(Y* P)/sigma2 - CTF2 |P|^2 / (2 sigma2)`` by the returned amount (zero for the other
    classes). Without it, each particle's own noise in its class's reference outweighs the
    difference between the species at low SNR, and no particle ever changes class.
    ``data`` ``(b, f, K)`` centred premultiplied data, ``ctf2`` ``(b, f, K)``,
    ``inv_sigma2`` ``(b, K)``, ``matrices`` ``(b, f, 3, 3)``.
    """
    b = data.shape[0]
    out = torch.zeros(b, projector.n_classes, dtype=torch.float64, device=data.device)
    y2 = data.abs() ** 2
    inv = inv_sigma2.double()[:, None, :]
    for c in range(projector.n_classes):
        own = own_class == c
        if not bool(own.any()):
            continue
        den = denominator[c].to(data.device)[points.shell]
        kappa = share * SELF_OVERLAP
        a = torch.where(den > 0, kappa / den.clamp(min=1e-300), 0.0)[None, None] * inv
        p = projector.slices(c, matrices[own], points).to(data.dtype)
        cross = (p.conj() * data[own]).real
        w = ctf2[own] * inv[own]
        change = -a[own] * y2[own] * inv[own] + w * a[own] * cross - 0.5 * w * a[own] ** 2 * y2[own]
        out[own, c] = change.sum((1, 2))
    return out


def expectation_pass(
    model: MLModel,
    batches: Iterable[ParticleBatch],
    sampling: Sampling,
    params: EngineParams,
    *,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[MStepSums, ParticleResults]:
    """E-step over all ``batches`` and the M-step sums (not yet all-reduced); under
    torch.distributed the results of this rank's batches only (gather them with
    :meth:`ParticleResults.all_gathered`)."""
    device = torch.device(device) if device is not None else model.references.device
    n, px = model.box, model.pixel_size
    projector = Projector(model.references.to(device), params.padding, params.max_slices)
    m_shell = model.current_size // 2
    e_shell = m_shell
    if params.strict_highres_exp_angst:
        e_shell = min(e_shell, round(n * px / params.strict_highres_exp_angst))
    points_e = fourier_points(n, e_shell, device)
    points_m = fourier_points(n, m_shell, device)
    global_rot = None
    if sampling.align and sampling.local_sigma_deg is None:
        global_rot = orientation_grid(sampling.healpix_order, sampling.symmetry)[1]
    mask = soft_sphere((n, n), params.particle_diameter_angst / (2 * px), 5.0, device=device)
    sigma2 = model.sigma2.to(device)
    log_prior = torch.log(model.class_priors.to(device).clamp(min=1e-300))
    padding = params.padding if params.insert_padding is None else params.insert_padding
    sums = MStepSums.empty(model.n_classes, sigma2.shape[0], n, padding, device)
    parts = []
    leave_one_out = (
        params.leave_one_out
        and not sampling.align
        and model.n_classes > 1
        and model.self_denominator is not None
    )
    for batch in batches:
        batch = batch.to(device)
        gen = _generator(params, model.iteration, batch)
        s2 = sigma2[batch.optics_group]  # (b, S)
        poses = pose_grid(sampling, batch, model.sigma_offset_angst, global_rot)
        masked = mask_images(
            batch.data, batch.ctf2, s2, mask, zero_mask=params.zero_mask, generator=gen
        )
        data_e, ctf2_e = points_e.gather(masked), points_e.gather(batch.ctf2)
        inv_s2 = (1.0 / s2[:, points_e.shell]).to(ctf2_e.dtype)

        args = (projector, data_e, ctf2_e, inv_s2, batch.tilt_rotations, points_e, px, log_prior)
        self_term = None
        if leave_one_out:
            centred = centred_data(data_e, batch.tilt_rotations, poses.offsets, points_e, px)
            mats = slice_matrices(batch.tilt_rotations, poses.rotations)[:, 0]
            self_term = self_term_scores(
                projector, centred[:, 0], ctf2_e, inv_s2, mats, points_e, batch.classes,
                model.self_denominator, LEAVE_OUT_SHARE,
            )  # fmt: skip
        fine_pass = sampling.align and sampling.oversampling > 0
        coarse = "nearest" if fine_pass and params.coarse_nearest else "bilinear"
        res = _posterior(*args, poses, params.adaptive_fraction, self_term, coarse)
        if fine_pass:
            poses = oversample(sampling, batch, poses, res.weights, model.sigma_offset_angst)
            res = _posterior(*args, poses, params.adaptive_fraction)
        if params.random_class_init and model.iteration == 0 and model.n_classes > 1:
            res = _initial_classes(res, batch.classes if params.seeded_classes else None, gen)
        accumulate(
            sums,
            batch,
            projector,
            poses,
            res,
            points_m.gather(batch.data),
            points_m.gather(batch.ctf2),
            sigma2,
            points_m,
            px,
        )
        parts.append(_batch_results(batch, poses, res, params.mean_poses))
        if progress is not None:
            progress(batch.size)
    return sums, ParticleResults.concat(parts)


def particle_sphere(
    params: EngineParams, box: int, pixel_size: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Soft sphere ``(n, n, n)`` of ``--particle_diameter`` with a 5-pixel edge (RELION's
    solvent-flattening mask when no ``--solvent_mask`` is given)."""
    radius = params.particle_diameter_angst / (2 * pixel_size)
    return soft_sphere((box, box, box), radius, 5.0, device=device)


def solvent_mask(
    params: EngineParams, box: int, pixel_size: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """The mask the references are flattened with: ``--solvent_mask`` or the particle
    sphere (:func:`particle_sphere`)."""
    if params.reference_mask is not None:
        return params.reference_mask.to(device)
    return particle_sphere(params, box, pixel_size, device)


def maximise(
    model: MLModel,
    sums: MStepSums,
    params: EngineParams,
    sampling: Sampling,
    *,
    tau2: torch.Tensor | None = None,
    ssnr: torch.Tensor | None = None,
) -> MLModel:
    """The next model from the (all-reduced) sums.

    Class priors are the summed class weights; sigma2 is updated in the shells that received
    data; the offset prior width is ``sqrt(sum w |delta|^2 / (3 sum w))`` (at least half the
    offset step, so that it cannot collapse when all offsets stay put); the references are
    solvent-flattened; the current image size follows the SSNR (§7.2).

    Classification: the reconstruction uses ``model.tau2`` and the SSNR is
    ``T tau2 * mean weight``; the next tau2 is the new reference's power plus the posterior
    variance ``1 / (mean weight + 1/tau2)`` per shell (the EM update of the prior variance;
    the reference power alone shrinks tau2 every iteration wherever SSNR < ~3, until those
    shells vanish), kept where no data arrived. Gold-standard refinement passes ``tau2`` and
    ``ssnr`` from the half-set FSC (:func:`~subtomo.ml.autorefine.gold_standard_spectra`).
    """
    n, device = model.box, model.references.device
    sym = None
    if sampling.symmetry.upper() != "C1":
        sym = symmetry_matrices(sampling.symmetry)
    tau2_used = (tau2 if tau2 is not None else model.tau2).to(torch.float64)
    refs = model.references.clone()
    ssnr_new = torch.zeros(model.n_classes, n // 2 + 1, dtype=torch.float64)
    weight = torch.zeros(model.n_classes, n // 2 + 1, dtype=torch.float64)
    denominator = torch.zeros_like(weight)
    for c, acc in enumerate(sums.accumulators):
        if float(sums.class_weight[c]) <= 0:
            continue
        if sym is not None:
            acc.symmetrise(sym.to(acc.weight.device))
        refs[c] = reconstruct(acc, tau2=tau2_used[c], tau2_fudge=params.tau2_fudge, taper=0).to(
            refs
        )
        weight[c] = weight_spectrum(acc).cpu()
        ssnr_new[c] = params.tau2_fudge * tau2_used[c].cpu() * weight[c]
        t2 = params.tau2_fudge * tau2_used[c].cpu()
        # shells without data or prior power are zero in the reference: no particle there
        used = (t2 > 0) & (weight[c] > 0)
        denominator[c] = torch.where(used, weight[c] + 1 / t2.clamp(min=1e-300), 0.0)
    if params.flatten_solvent:
        refs = refs * solvent_mask(params, n, model.pixel_size, refs.device).to(refs)
    if ssnr is not None:
        ssnr_new = ssnr.to(ssnr_new).expand_as(ssnr_new).clone()
    total = sums.class_weight.sum()
    priors = (sums.class_weight / total).cpu() if total > 0 else model.class_priors
    sig = model.sigma2.clone()
    den = sums.sigma2_den.to(sig.device)
    upd = den > 0
    sig[upd] = (sums.sigma2_num.to(sig.device)[upd] / den[upd]).clamp(min=1e-30)
    sigma_off = model.sigma_offset_angst
    if sampling.align and float(sums.offset_weight) > 0 and sampling.offset_range_angst > 0:
        sigma_off = math.sqrt(float(sums.offset2) / (3 * float(sums.offset_weight)))
        sigma_off = max(sigma_off, 0.5 * sampling.offset_step_angst)
    shell = ssnr_resolution_shell(ssnr_new)
    size = min(n, 2 * (shell + params.incr_size))
    return dataclasses.replace(
        model,
        references=refs.to(device),
        class_priors=priors.double(),
        sigma2=sig,
        tau2=_em_tau2(refs, model.tau2, weight) if tau2 is None else tau2_used,
        sigma_offset_angst=sigma_off,
        current_size=size,
        iteration=model.iteration + 1,
        ssnr=ssnr_new,
        self_denominator=denominator,
    )


def _em_tau2(refs: torch.Tensor, tau2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``tau2' = power(V) + 1/(W + 1/tau2)`` per shell where data arrived (``W > 0``)."""
    tau2 = tau2.cpu().double()
    var = 1 / (weight + 1 / tau2.clamp(min=1e-300))
    return torch.where(weight > 0, reference_tau2(refs).cpu() + var, tau2)


def iterate(
    model: MLModel,
    batches: Callable[[], Iterable[ParticleBatch]],
    sampling: Sampling,
    params: EngineParams,
    *,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[MLModel, ParticleResults]:
    """One E+M iteration (classification / initial model); ``batches()`` yields the batches."""
    sums, results = expectation_pass(
        model, batches(), sampling, params, device=device, progress=progress
    )
    sums.all_reduce()
    return maximise(model, sums, params, sampling), results.all_gathered()
