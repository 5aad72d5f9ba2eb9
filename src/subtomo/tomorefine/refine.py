"""Tomo CTF refinement of whole tilt series: the passes over the particles, per tomogram.

For each tilt series (§11, §23; the fits are :mod:`subtomo.tomorefine.ctf`):

1. one pass over its particles (this rank's batches under torch.distributed, the sums
   gathered from all ranks) accumulates the per-tilt statistics; with
   ``reference_spectrum`` the reference's smooth radial gain relative to the data is fitted
   and applied
   (:func:`~subtomo.tomorefine.ctf.reference_spectrum`: without it a half map from the data
   moves every tilt's defocus by a common offset, −544 Å at ``--kmin`` 100 Å on
   benchmarks/ctf_refine.py ``--reference data``); the defocus, astigmatism and scale of
   every tilt are fitted, with a Gaussian prior centred on the tilt's defocus from CTF
   estimation (``estimate``, kept in the tomograms.star by the job), not on its current one,
   so that running the job again does not count the same data twice;
2. with ``correct_bias`` (the default), a second pass fits *simulated* data
   (:meth:`TiltPredictor.batches` ``simulate``: the prediction at the fitted CTF, cut,
   windowed and/or circle-cropped as extraction did) the same way, its gain re-fitted: what
   it finds is the bias of the fit, which is subtracted (times the shrinkage of the prior
   on the per-tilt change) (the circle crop of the premultiplied stacks removes
   CTF-delocalised signal: against the true map at box 64, 5 Å/px and 3 µm the defocus comes
   out ~130 Å low at SNR 0.05, ~240 Å low at SNR 1 without this correction; against half
   maps from the data at SNR 0.05 it overshoots by ~+150 Å);
3. with ``per_particle``, one more pass (two with ``correct_bias``) fits each particle's
   defocus at the refined per-tilt CTFs, with a Gaussian prior on its total offset (the
   one it has from an earlier run plus the change: with a prior on the change alone, the
   offsets wandered over repeated runs, per-particle RMS error 199 -> 232 -> 247 Å in three
   rounds of benchmarks/ctf_refine.py ``--snr 1 --reference data --rounds 3``, now
   199 -> 210 -> 213 Å), its likelihood tempered as the tilts' is (step 5; κ² 1.3–4 on that
   benchmark, the offsets 199 -> 202 -> 202 Å); the tomogram's mean per-particle change is
   moved into its tilts (the same CTF for every observation), so the prior centre stays 0;
4. with ``reference_spectrum`` the series keeps its mean defocus: the tilts' changes and the
   particles' changes each have mean 0. A change common to every tilt reshapes the CTF shell
   by shell much as the reference's gain does, so against a map from the data the fit
   cannot tell the two apart: each further run moved the mean by +50…+100 Å
   (benchmarks/ctf_refine.py ``--snr 1 --reference data --kmin 100 --reference-spectrum
   --rounds 3``: per-tilt RMS / mean error 126 / +36, 159 / +100, 201 / +155 Å; now
   133 / −42, 132 / −42, 132 / −42 Å, the nominal's mean being −42 Å);
5. the per-tilt likelihood is widened by the ``κ² ≥ 1`` at which the fitted changes scatter
   as prior and likelihood predict (:func:`~subtomo.tomorefine.ctf.temper_likelihood`);
6. with aberrations, the sums of :class:`~subtomo.tomorefine.ctf.AberrationSums` at each
   tilt's fitted CTF, of the data and of the simulation (whose fit is the bias), which the job
   adds up per optics group and fits (:func:`~subtomo.tomorefine.ctf.fit_aberrations`).

The Beer–Lambert scale model is fitted afterwards over all tilt series
(:func:`~subtomo.tomorefine.ctf.fit_ice_scale`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.distributed import all_gather_object
from subtomo.ml.loader import ParticleState
from subtomo.reconstruct.particles import TiltSeriesCtf
from subtomo.tomorefine.ctf import (
    AberrationSums,
    DefocusFit,
    TiltStatistics,
    accumulate_tilts,
    fit_tilt_defocus,
    frequency_weights,
    particle_defocus_grid,
    particle_defocus_profiles,
    reference_spectrum,
    temper_likelihood,
    tempered_particle_changes,
)
from subtomo.tomorefine.predict import TiltPredictor

__all__ = ["CtfRefineOptions", "TomogramResult", "refine_tomogram", "updated_ctf"]

log = logging.getLogger("subtomo")


@dataclass(frozen=True)
class CtfRefineOptions:
    """What to fit (RELION's relion_tomo_refine_ctf flags in brackets).

    ``do_defocus`` (``--do_defocus``) with the grid ``d0``…``d1`` Å in ``steps`` steps
    (``--d0 --d1``), ``astigmatism`` ``"none" | "series" | "tilt"``, ``reg_lambda``
    (``--lambda`` with ``--do_reg_defocus``, else ``None``); ``do_scale`` (``--do_scale``);
    ``sigma_tilt`` the σ of the prior on each tilt's defocus change (Å, ``None``: none);
    ``per_particle`` defocus with prior σ ``sigma_particle`` Å; ``correct_bias``: the
    simulation passes (2. and 3. of the module docstring); ``reference_spectrum``: multiply
    the reference by its smooth radial gain relative to the data
    (:func:`~subtomo.tomorefine.ctf.reference_spectrum`) before fitting;
    ``even_aberrations``/``odd_aberrations``: the numbers of Zernike coefficients whose sums
    to keep (step 6; 0: none).
    """

    do_defocus: bool = True
    d0: float = -3000.0
    d1: float = 3000.0
    steps: int = 100
    astigmatism: str = "series"
    reg_lambda: float | None = None
    sigma_tilt: float | None = 500.0
    do_scale: bool = True
    per_particle: bool = False
    sigma_particle: float = 300.0
    correct_bias: bool = True
    reference_spectrum: bool = False
    even_aberrations: int = 0
    odd_aberrations: int = 0


@dataclass
class TomogramResult:
    """Results of one tilt series (CPU tensors, picklable for checkpoints).

    ``defocus_u``/``defocus_v``/``defocus_angle`` ``(t,)`` the new per-tilt CTF (Å, Å, deg),
    ``scale`` ``(t,)`` the per-tilt least-squares scale (absolute), ``cross``/``power``
    ``(t,)`` ``X``/``D`` relative to ``scale_before`` (for the Beer–Lambert fit), ``delta``
    ``(t,)`` the change of the mean defocus (Å) and ``sigma`` its posterior standard
    deviation (Å), ``cost_before``/``cost_after`` ``(t,)``,
    ``rows`` the particle rows (file order) and ``particle_delta`` their defocus changes (Å,
    empty without per-particle fitting); ``kappa2_tilts``/``kappa2_particles`` the κ² by which
    the tilts' and the particles' likelihoods were widened (1: not widened);
    ``aberration_sums`` ``(n, 7, K)`` the :class:`~subtomo.tomorefine.ctf.AberrationSums` of
    the data and (with the bias correction) of the simulation (``n`` 0 without aberrations).
    """

    name: str
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    scale_before: np.ndarray
    scale: np.ndarray
    cross: np.ndarray
    power: np.ndarray
    delta: np.ndarray
    sigma: np.ndarray
    cost_before: np.ndarray
    cost_after: np.ndarray
    rows: np.ndarray
    particle_delta: np.ndarray
    kappa2_tilts: float = 1.0
    kappa2_particles: float = 1.0
    aberration_sums: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 7, 0)))


def updated_ctf(
    ctf: TiltSeriesCtf, u: np.ndarray, v: np.ndarray, angle: np.ndarray, scale: np.ndarray
) -> TiltSeriesCtf:
    """``ctf`` with new per-tilt defocus (Å), astigmatism angle (deg) and scale."""

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.float32)

    return dataclasses.replace(
        ctf, defocus_u=t(u), defocus_v=t(v), defocus_angle=t(angle), scale=t(scale)
    )


def _tilt_statistics(
    predictor: TiltPredictor,
    state: ParticleState,
    rows: np.ndarray,
    name: str,
    n_tilts: int,
    **kwargs,
) -> TiltStatistics:
    """The per-tilt sums of one tilt series, over all ranks."""
    n_shells = predictor.loader.box // 2 + 1
    stats: dict[str, TiltStatistics] = {}
    for patches in predictor.batches(state, rows, shard=True, **kwargs):
        accumulate_tilts(patches, stats, {name: n_tilts}, n_shells)
    parts = [
        {k: v.cpu() for k, v in dataclasses.asdict(s).items()} for s in stats.values()
    ]  # this rank's (none if it had no batch)
    total = TiltStatistics.zeros(n_tilts, predictor.points.flat.shape[0], n_shells, "cpu")
    for gathered in all_gather_object(parts):
        for s in gathered:
            total.add(TiltStatistics(**s))
    dev = predictor.device
    return TiltStatistics(*(getattr(total, f.name).to(dev) for f in dataclasses.fields(total)))


def _particle_profiles(
    predictor: TiltPredictor,
    state: ParticleState,
    rows: np.ndarray,
    weights: dict[str, torch.Tensor],
    grid: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """The negative log-likelihood ``(len(rows), G)`` of each of ``rows`` at the defocus
    changes ``grid`` ``(G,)`` Å, over all ranks (in ``rows`` order)."""
    found: dict[int, np.ndarray] = {}
    for patches in predictor.batches(state, rows, shard=True, **kwargs):
        nll = particle_defocus_profiles(patches, weights, grid)
        found.update(zip(patches.index.tolist(), nll.cpu().numpy(), strict=True))
    merged: dict[int, np.ndarray] = {}
    for part in all_gather_object(found):
        merged.update(part)
    return torch.from_numpy(np.stack([merged[int(r)] for r in rows]))


def _particle_defocus(
    predictor: TiltPredictor,
    state: ParticleState,
    rows: np.ndarray,
    name: str,
    weights: dict[str, torch.Tensor],
    options: CtfRefineOptions,
    **kwargs,
) -> tuple[np.ndarray, float]:
    """Per-particle defocus change (Å) of ``rows`` (step 3 of the module docstring): the
    posterior modes with the likelihood tempered as the tilts' is, less (with
    ``correct_bias``) what the same fit finds on simulated data; and the κ²."""
    sigma = options.sigma_particle
    grid = particle_defocus_grid(sigma)
    nll = _particle_profiles(predictor, state, rows, weights, grid, **kwargs)
    current = predictor.loader.particles.defocus_offsets()[torch.as_tensor(rows)].double()
    sim = None
    if options.correct_bias:  # the fit to simulated data measures the bias of the change
        sim = _particle_profiles(predictor, state, rows, weights, grid, simulate=True, **kwargs)
    delta, k2 = tempered_particle_changes(grid, nll, sigma, current, sim)
    log.info("%s: the particles' likelihood widened by κ² = %.2f (empirical Bayes)", name, k2)
    return delta.numpy(), k2


def refine_tomogram(
    predictor: TiltPredictor,
    state: ParticleState,
    name: str,
    rows: np.ndarray,
    fsc_weight: torch.Tensor,
    options: CtfRefineOptions,
    estimate: np.ndarray | None = None,
) -> TomogramResult:
    """Refine the CTF of tilt series ``name`` from its particles ``rows`` (see the module
    docstring); ``fsc_weight`` ``(n//2+1,)`` per shell (:func:`~subtomo.tomorefine.fsc_weights`);
    ``estimate`` ``(t,)`` the mean defocus (Å) of CTF estimation, on which the prior on each
    tilt's defocus is centred (``None``: the current defocus)."""
    ctf = predictor.loader.ctfs[name]
    t = ctf.defocus_u.shape[0]
    pts = predictor.points
    stats = _tilt_statistics(predictor, state, rows, name, t)
    w = frequency_weights(stats, fsc_weight.to(predictor.device), pts.shell)
    extra: dict = {}  # passed to every later pass over the particles
    keep_mean = options.reference_spectrum and options.do_defocus  # step 4 of the docstring

    def anchored(delta: torch.Tensor) -> torch.Tensor:
        """The per-tilt changes, with mean 0 when the series keeps its mean defocus."""
        return delta - delta.mean() if keep_mean else delta

    if keep_mean:
        gain = reference_spectrum(stats, w, pts.shell)
        g = gain[pts.shell.clamp_max(len(gain) - 1)]
        stats = stats.filtered(g)
        extra["reference_filter"] = gain
    u0, v0, a0 = (x.double().numpy() for x in (ctf.defocus_u, ctf.defocus_v, ctf.defocus_angle))
    fit_args = {
        "d0": options.d0, "d1": options.d1, "steps": options.steps,
        "fit_defocus": options.do_defocus, "astigmatism": options.astigmatism,
        "reg_lambda": options.reg_lambda, "sigma_angst": options.sigma_tilt,
        # the prior is on the defocus relative to CTF estimation, not to the last run's
        "prior_centre": None if estimate is None else torch.from_numpy(estimate - (u0 + v0) / 2),
    }  # fmt: skip
    fit = fit_tilt_defocus(stats, w, pts.freq, predictor.defocus_phase, **fit_args)
    fit = dataclasses.replace(fit, delta=anchored(fit.delta))
    aberrations = []  # step 6: the data's sums, then the simulation's
    if options.even_aberrations or options.odd_aberrations:
        aberrations.append(
            AberrationSums.from_fit(stats, w, fit, pts.freq, predictor.defocus_phase)
        )
    scale0 = np.broadcast_to(np.asarray(torch.as_tensor(ctf.scale).double()), (t,)).copy()
    u, v, angle = fit.defocus(u0, v0, a0)
    x, d = fit.cross.cpu().numpy(), fit.power.cpu().numpy()
    scale = scale0 * fit.scale.cpu().numpy() if options.do_scale else scale0
    if options.correct_bias:
        model = {name: updated_ctf(ctf, u, v, angle, scale)}
        sim = _tilt_statistics(
            predictor, state, rows, name, t, tilt_ctf=model, simulate=True, **extra
        )
        if "reference_filter" in extra:  # as on the data: the crop's profile is absorbed too
            g = reference_spectrum(sim, w, pts.shell)[pts.shell.clamp_max(len(gain) - 1)]
            sim = sim.filtered(g)
        bias = fit_tilt_defocus(
            sim, w, pts.freq, predictor.defocus_phase, **{**fit_args, "sigma_angst": None}
        )
        if aberrations:
            aberrations.append(
                AberrationSums.from_fit(sim, w, bias, pts.freq, predictor.defocus_phase)
            )
        # the prior shrinks the fit, and so its bias, by k = 1 - σ_post²/σ_t² per tilt
        k = torch.ones_like(fit.delta)
        if options.sigma_tilt:
            k = (1 - fit.sigma.square() / options.sigma_tilt**2).clamp(0.0, 1.0)
        corrected = DefocusFit(
            delta=anchored(fit.delta - k * bias.delta),
            astigmatism=fit.astigmatism - bias.astigmatism,
            scale=fit.scale, cross=fit.cross, power=fit.power, cost_before=fit.cost_before,
            cost_after=fit.cost_after, sigma=fit.sigma,
        )  # fmt: skip
        u, v, angle = corrected.defocus(u0, v0, a0)
        bias_scale = bias.scale.cpu().numpy()
        x = x / bias_scale  # X/D becomes the corrected scale
        if options.do_scale:
            scale = scale / bias_scale
        fit = corrected
    k2, k2_particles = 1.0, 1.0
    if options.sigma_tilt and options.do_defocus:  # step 5 of the module docstring
        centre = fit_args["prior_centre"]
        centre = torch.zeros_like(fit.delta) if centre is None else centre.to(fit.delta)
        tempered, sigma, k2 = temper_likelihood(fit.delta, fit.sigma, centre, options.sigma_tilt)
        fit = dataclasses.replace(
            fit, delta=anchored(tempered).to(fit.delta), sigma=sigma.to(fit.sigma)
        )
        u, v, angle = fit.defocus(u0, v0, a0)
        log.info("%s: the tilts' likelihood widened by κ² = %.2f (empirical Bayes)", name, k2)
    delta = fit.delta.cpu().numpy()
    particle_delta = np.zeros(0)
    moved = 0.0  # the per-particle fit's mean, moved into the tilts
    if options.per_particle:
        model = {name: updated_ctf(ctf, u, v, angle, scale)}
        weights = {name: w}
        particle_delta, k2_particles = _particle_defocus(
            predictor, state, rows, name, weights, options, tilt_ctf=model, **extra
        )
        mean = float(particle_delta.mean()) if len(particle_delta) else 0.0
        particle_delta -= mean
        moved = 0.0 if keep_mean else mean
        u, v, delta = u + moved, v + moved, delta + moved
    log.info(
        "%s: mean defocus change %+.0f Å (RMS %.0f Å) over %d tilts%s",
        name, float(delta.mean()), float(np.sqrt((delta**2).mean())), t,
        f"; per-particle RMS {np.sqrt((particle_delta**2).mean()):.0f} Å, their mean "
        f"{moved:+.0f} Å moved into the tilts" if len(particle_delta) else "",
    )  # fmt: skip
    return TomogramResult(
        name=name, defocus_u=u, defocus_v=v, defocus_angle=angle, scale_before=scale0,
        scale=scale, cross=x, power=d, delta=delta, sigma=fit.sigma.cpu().numpy(),
        cost_before=fit.cost_before.cpu().numpy(), cost_after=fit.cost_after.cpu().numpy(),
        rows=np.asarray(rows), particle_delta=particle_delta, kappa2_tilts=k2,
        kappa2_particles=k2_particles,
        aberration_sums=np.stack([torch.cat([a.a, a.b, a.p]).cpu().numpy() for a in aberrations])
        if aberrations else np.zeros((0, 7, 0)),
    )  # fmt: skip
