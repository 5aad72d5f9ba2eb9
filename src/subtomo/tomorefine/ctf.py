"""Tomo CTF refinement on observed/predicted tilt patches (§11, §23).

The model of a patch is ``Y ≈ A·s·c·P`` (:mod:`subtomo.tomorefine.predict`) with the trial
``CTF·dose`` ``c = Re[Q e^{iφδ}]`` for a defocus change ``δ(k)`` Å (``φ = -πλ|k|²``), so with
``C = cos φδ``, ``S = sin φδ``: ``c = Re Q·C − Im Q·S``. The noise of ``Y`` being ``A·N``,
each point is weighted by ``v = 1/(A² + ε|Q|²)`` (the likelihood of the recorded image,
bounded near the zeros of ``A``: :data:`WEIGHT_FLOOR`). The negative log-likelihood of a
tilt (frequency weights ``w = FSC weight / σ²``) is, up to a constant,

    L(δ, s) = −s·X(δ) + s²·D(δ)/2,
    X = Σ_k w (C·Σ vA Re(Ȳ P) Re Q − S·Σ vA Re(Ȳ P) Im Q),
    D = Σ_k w (C²·Σ vA²|P|² Re Q² − 2CS·Σ vA²|P|² Re Q Im Q + S²·Σ vA²|P|² Im Q²),

so five sums per tilt and Fourier point over the tilt's particles (:class:`TiltStatistics`)
give the cost of any defocus, astigmatism and scale of that tilt; the same sums per particle
over its tilts give the cost of a per-particle defocus. With the scale left free the best
``s = X/D`` and ``L = −X²/(2D)``.

* Defocus per tilt: a grid of ``δ`` from ``d0`` to ``d1`` (RELION: −3000…3000 Å, 100 steps)
  for every tilt at once, with a Gaussian prior ``δ²/(2σ_t²)`` on the change (ours: late,
  dose-damaged tilts carry almost no defocus information, and without it their best grid
  point is anywhere in the range), optionally regularised towards the series' mean
  (``λ·n_f·(δ_f − δ̄)²``, ``n_f`` the tilt's particles), then local refinement of ``δ`` and
  of the astigmatism change ``a₁ cos 2θ + a₂ sin 2θ`` (shared by the series, or per tilt) by
  L-BFGS on the same sums.
* Scale: ``s_f = X/D`` at the fitted defocus, then the Beer–Lambert law
  ``a·κ^(1/|cos θ_f|)`` (:func:`subtomo.ctf.ice_scale`) fitted to ``L`` of every tilt.
* Per-particle defocus: the posterior mode of ``L_p(δ) + δ²/(2σ²)`` over the particle's tilts
  (scale 1, the per-tilt scale being in ``Q``): a grid of ±4σ, then a parabola through the
  best point and its neighbours.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.ctf import ice_scale
from subtomo.tomorefine.predict import TiltPatches, shell_noise_sums

__all__ = [
    "AberrationSums",
    "DefocusFit",
    "IceFit",
    "TiltStatistics",
    "accumulate_tilts",
    "fit_aberrations",
    "fit_ice_scale",
    "fit_tilt_defocus",
    "frequency_weights",
    "particle_defocus_grid",
    "particle_defocus_modes",
    "particle_defocus_profiles",
    "reference_spectrum",
    "temper_likelihood",
    "tempered_particle_changes",
    "zernike_count",
]

_UNIT = 100.0  # Å: the optimiser's unit of defocus

#: ε of the point weights ``1/(A² + ε|Q|²)``: the stacks hold ``Y = A·X`` (the recorded
#: image premultiplied by the ``CTF·dose`` ``A`` of extraction), whose noise is ``A·N``, so
#: the likelihood of ``X`` weights ``|Y − A·c·P|²`` by ``1/A²``; the floor, relative to the
#: envelope ``|Q|²``, bounds it near the zeros of ``A``, where the circle crop leaves
#: signal that ``A`` does not predict (benchmarks/ctf_bound.py)
WEIGHT_FLOOR = 0.1

#: least gain in ``−2 log`` of the marginal likelihood for which :func:`temper_likelihood`
#: widens the likelihood (χ² with one degree of freedom at 5%)
KAPPA2_EVIDENCE = 3.84

#: degree of the polynomial in ``|k|`` of :func:`reference_spectrum`
REFERENCE_SPECTRUM_DEGREE = 3


@dataclass
class TiltStatistics:
    """Sums over the particles of one tilt series (float64), per tilt and Fourier point.

    ``cross`` ``(t, 2, K)``: ``Σ vA·Re(Ȳ P)·(Re Q, Im Q)``; ``power`` ``(t, 3, K)``:
    ``Σ vA²|P|²·(Re Q², Re Q·Im Q, Im Q²)`` (``v`` the point weights); ``count`` ``(t,)``
    observations; ``noise`` ``(2, n_shells)`` the
    :func:`~subtomo.tomorefine.shell_noise_sums` of the current CTF; ``imag`` ``(t, 2, K)``:
    ``Σ vA·Im(Ȳ P)·(Re Q, Im Q)`` (for the odd aberrations, :class:`AberrationSums`).
    """

    cross: torch.Tensor
    power: torch.Tensor
    count: torch.Tensor
    noise: torch.Tensor
    imag: torch.Tensor

    @classmethod
    def zeros(cls, n_tilts: int, n_points: int, n_shells: int, device) -> TiltStatistics:
        z = torch.zeros
        return cls(
            z((n_tilts, 2, n_points), dtype=torch.float64, device=device),
            z((n_tilts, 3, n_points), dtype=torch.float64, device=device),
            z(n_tilts, dtype=torch.float64, device=device),
            z((2, n_shells), dtype=torch.float64, device=device),
            z((n_tilts, 2, n_points), dtype=torch.float64, device=device),
        )

    def add(self, other: TiltStatistics) -> None:
        """Add ``other`` in place (e.g. another rank's sums)."""
        for name in ("cross", "power", "count", "noise", "imag"):
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))

    def filtered(self, gain: torch.Tensor) -> TiltStatistics:
        """The sums with the reference multiplied by ``gain`` ``(K,)`` at every point."""
        return dataclasses.replace(
            self, cross=self.cross * gain, power=self.power * gain.square(), imag=self.imag * gain
        )

    def noise_power(self) -> torch.Tensor:
        """``σ²`` per shell ``(n_shells,)`` of the recorded images (0 where unknown)."""
        num, den = self.noise
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def _sums(
    patches: TiltPatches, imag: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per observation ``(b, f, 2, K)`` cross and ``(b, f, 3, K)`` power terms, each point
    weighted by ``v = 1/(A² + ε|Q|²)`` (:data:`WEIGHT_FLOOR`), and with ``imag`` the
    ``(b, f, 2, K)`` terms of ``Im(Ȳ P)`` (else ``None``)."""
    a, q = patches.applied, patches.quadrature
    v = 1 / (a.square() + WEIGHT_FLOOR * q.abs().square()).clamp_min(1e-30)
    product = patches.observed.conj() * patches.predicted
    g = v * a * product.real
    h = v * (a * patches.predicted.abs()).square()
    qr, qi = q.real, q.imag
    cross = torch.stack([g * qr, g * qi], dim=2)
    power = torch.stack([h * qr * qr, h * qr * qi, h * qi * qi], dim=2)
    odd = None
    if imag:
        g = v * a * product.imag
        odd = torch.stack([g * qr, g * qi], dim=2).double()
    return cross.double(), power.double(), odd


def accumulate_tilts(
    patches: TiltPatches, stats: dict[str, TiltStatistics], n_tilts: dict[str, int], n_shells: int
) -> None:
    """Add the patches' sums to ``stats[rlnTomoName]`` (created with ``n_tilts[name]`` rows)."""
    cross, power, imag = _sums(patches, imag=True)
    dev = cross.device
    for name in dict.fromkeys(patches.tomo_names):
        rows = torch.from_numpy(np.flatnonzero(patches.tomo_names == name)).to(dev)
        if name not in stats:
            stats[name] = TiltStatistics.zeros(n_tilts[name], cross.shape[-1], n_shells, dev)
        st = stats[name]
        vis = patches.visible[rows]
        frames = patches.frames[rows][vis]
        st.cross.index_add_(0, frames, cross[rows][vis])
        st.power.index_add_(0, frames, power[rows][vis])
        st.imag.index_add_(0, frames, imag[rows][vis])
        st.count.index_add_(0, frames, torch.ones_like(frames, dtype=torch.float64))
        sub = dataclasses.replace(patches, **_select(patches, rows))
        num, den = shell_noise_sums(sub, sub.ctf, n_shells)
        st.noise[0] += num
        st.noise[1] += den


def _select(patches: TiltPatches, rows: torch.Tensor) -> dict:
    """The per-observation fields of ``patches`` at particle rows ``rows``."""
    names = ("observed", "predicted", "quadrature", "dose", "applied", "visible", "frames")
    return {n: getattr(patches, n)[rows] for n in names}


def frequency_weights(
    stats: TiltStatistics, fsc_weight: torch.Tensor, shells: torch.Tensor
) -> torch.Tensor:
    """``w = FSC weight / σ²`` ``(K,)`` at the points with shell numbers ``shells``."""
    sigma2 = stats.noise_power().to(fsc_weight.device)
    per_shell = torch.where(sigma2 > 0, fsc_weight.double() / sigma2.clamp_min(1e-300), 0.0)
    return per_shell[shells.clamp_max(len(per_shell) - 1)]


def reference_spectrum(
    stats: TiltStatistics,
    weights: torch.Tensor,
    shells: torch.Tensor,
    *,
    degree: int = REFERENCE_SPECTRUM_DEGREE,
    iterations: int = 3,
) -> torch.Tensor:
    """Smooth gain ``g`` per shell ``(n_shells,)`` of the reference relative to the data at
    the current CTF: ``g(k)`` a polynomial of ``degree`` in ``|k|``, fitted by least squares
    to ``Y ≈ A·s_f·g(|k|)·c·P`` over all tilts ``f`` of the series (alternating with the
    per-tilt scales ``s_f``), normalised to a weighted mean of 1; 1 at shells of weight 0.

    A half map reconstructed from the data is not the true map times a constant: the
    reconstruction's regularisation where ``CTF²`` is small (the rise of the first lobe), the
    errors of the CTFs it was made with and the windowing of the patches give it a smooth
    radial profile (±7% over 30–100 Å on benchmarks/ctf_refine.py ``--reference data``).
    Within the first CTF lobe a defocus change alters the CTF's radial shape much as such a
    profile does (by ~1.5% from 100 Å to the lobe's peak for 500 Å at 3 µm), so a fit against
    the map moves every tilt's defocus by a common offset (−540 Å at ``--kmin`` 100 Å there).
    Multiplying the reference by ``g`` leaves the fit what a smooth profile cannot mimic: the
    differences between tilts and the positions of the CTF zeros. The gain is smooth (not
    one value per shell) because near the zeros of the current CTF the per-shell ratio of
    data to model follows the tilts' defocus errors, not the map.
    """
    w = weights.to(stats.cross.device, torch.float64)
    n_shells = stats.noise.shape[-1]
    idx = shells.to(w.device).clamp_max(n_shells - 1)
    x = torch.zeros((stats.cross.shape[0], n_shells), dtype=torch.float64, device=w.device)
    d = torch.zeros_like(x)
    x.index_add_(1, idx, w * stats.cross[:, 0])  # (t, shells) at the current CTF (δ = 0)
    d.index_add_(1, idx, w * stats.power[:, 0])
    used = d.sum(0) > 0
    k = torch.arange(n_shells, dtype=torch.float64, device=w.device) / max(n_shells - 1, 1)
    basis = torch.stack([k**j for j in range(degree + 1)])  # (J, shells)
    g = torch.ones(n_shells, dtype=torch.float64, device=w.device)
    if not bool(used.any()):
        return g
    for _ in range(iterations):
        s = (x * g).sum(1) / (d * g.square()).sum(1).clamp_min(1e-300)  # (t,)
        u, v = (s[:, None] * x).sum(0), (s[:, None].square() * d).sum(0)  # (shells,)
        # minimise Σ_shells (v g² − 2 u g) over the coefficients of g
        normal = (basis[:, None] * basis[None] * v).sum(-1)
        coef = torch.linalg.lstsq(normal, (basis * u).sum(-1)[:, None]).solution[:, 0]
        g = torch.where(used, coef @ basis, 1.0)
        g = torch.where(used, g / ((g * v).sum() / v.sum()), 1.0)
    return g


def _terms(
    cross: torch.Tensor, power: torch.Tensor, w: torch.Tensor, phase: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``X, D`` ``(...)`` from sums ``(..., 2, K)``/``(..., 3, K)`` and the phase ``φδ``
    ``(..., K)`` (broadcast)."""
    c, s = torch.cos(phase), torch.sin(phase)
    x = (w * (c * cross[..., 0, :] - s * cross[..., 1, :])).sum(-1)
    d = w * (c * c * power[..., 0, :] - 2 * c * s * power[..., 1, :] + s * s * power[..., 2, :])
    return x, d.sum(-1)


def _grid_terms(
    cross: torch.Tensor, power: torch.Tensor, phase: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``X, D`` ``(n, G)`` for weighted sums ``(n, 2|3, K)`` (``w`` already multiplied in) at
    ``G`` trial phases ``(G, K)``, as matrix products."""
    c, s = torch.cos(phase), torch.sin(phase)
    x = cross[:, 0] @ c.T - cross[:, 1] @ s.T
    d = power[:, 0] @ (c * c).T - 2 * power[:, 1] @ (c * s).T + power[:, 2] @ (s * s).T
    return x, d


def _profile(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``L`` with the best non-negative scale: ``−max(X, 0)²/(2D)``."""
    return -x.clamp_min(0).square() / (2 * d.clamp_min(1e-300))


@dataclass
class DefocusFit:
    """Per-tilt results ``(t,)`` of one tilt series: ``delta`` the change of the mean defocus
    (Å), ``astigmatism`` ``(t, 2)`` the change of the astigmatism vector
    ``((U−V)/2·cos 2α, (U−V)/2·sin 2α)`` (Å), ``scale`` the least-squares scale relative to
    the current one (``X/D``), ``cross``/``power`` ``X``/``D`` there, ``cost_before``/
    ``cost_after`` ``L`` at the current CTF and at the fit (scale free), ``sigma`` the
    posterior standard deviation of ``delta`` from the curvature of ``L`` + prior (Å)."""

    delta: torch.Tensor
    astigmatism: torch.Tensor
    scale: torch.Tensor
    cross: torch.Tensor
    power: torch.Tensor
    cost_before: torch.Tensor
    cost_after: torch.Tensor
    sigma: torch.Tensor

    def defocus(
        self, u: np.ndarray, v: np.ndarray, angle_deg: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """New rlnDefocusU/V (Å, U ≥ V) and rlnDefocusAngle (deg) from the current ones."""
        mean = (u + v) / 2 + self.delta.cpu().numpy()
        alpha = np.deg2rad(angle_deg)
        half = (u - v) / 2
        ast = self.astigmatism.cpu().numpy()
        bx = half * np.cos(2 * alpha) + ast[:, 0]
        by = half * np.sin(2 * alpha) + ast[:, 1]
        h = np.hypot(bx, by)
        new_angle = np.rad2deg(np.arctan2(by, bx) / 2)
        return mean + h, mean - h, new_angle


def fit_tilt_defocus(
    stats: TiltStatistics,
    weights: torch.Tensor,
    freq: torch.Tensor,
    defocus_phase: torch.Tensor,
    *,
    d0: float = -3000.0,
    d1: float = 3000.0,
    steps: int = 100,
    fit_defocus: bool = True,
    astigmatism: str = "series",
    reg_lambda: float | None = None,
    sigma_angst: float | None = None,
    prior_centre: torch.Tensor | None = None,
    iterations: int = 50,
) -> DefocusFit:
    """Fit the defocus of every tilt of one series (see the module docstring).

    ``weights`` ``(K,)`` (:func:`frequency_weights`), ``freq`` ``(K, 2)`` the points' xy
    frequencies (any unit: only their direction θ is used), ``defocus_phase`` ``(K,)`` ``φ``
    (rad/Å). ``fit_defocus=False`` fits neither defocus nor astigmatism (only the scale).
    ``astigmatism``: ``"none"``, ``"series"`` (one change for all tilts: the lens
    does not change between tilts) or ``"tilt"`` (one per tilt, RELION's). ``reg_lambda``:
    pull each tilt's grid search towards the series' mean (``--do_reg_defocus``).
    ``sigma_angst``: σ_t of the Gaussian prior on each tilt's change (``None``: flat),
    centred on ``prior_centre`` ``(t,)`` Å (``None``: 0; e.g. the change that takes each
    tilt back to its CTF estimate).
    """
    cross, power, dev = stats.cross, stats.power, stats.cross.device
    w = weights.to(dev, torch.float64)
    phi = defocus_phase.to(dev, torch.float64)
    t = cross.shape[0]
    cost_before = _profile(*_terms(cross, power, w, torch.zeros_like(phi)))
    delta = torch.zeros(t, dtype=torch.float64, device=dev)
    centre = torch.zeros(t, dtype=torch.float64, device=dev)
    if prior_centre is not None:
        centre = torch.as_tensor(prior_centre, dtype=torch.float64).to(dev)
    if fit_defocus:
        grid = torch.linspace(d0, d1, steps + 1, dtype=torch.float64, device=dev)  # (G,)
        x, d = _grid_terms(cross * w, power * w, grid[:, None] * phi)
        cost = _profile(x, d)  # (t, G)
        if sigma_angst:
            cost = cost + (grid - centre[:, None]) ** 2 / (2 * sigma_angst**2)
        delta = grid[cost.argmin(1)]
        if reg_lambda:
            n = stats.count[:, None]
            for _ in range(10):
                mean = delta[stats.count > 0].mean() if bool((stats.count > 0).any()) else 0.0
                delta = grid[(cost + reg_lambda * n * (grid - mean) ** 2).argmin(1)]
    theta = torch.atan2(freq[:, 1].to(dev, torch.float64), freq[:, 0].to(dev, torch.float64))
    basis = torch.stack([torch.cos(2 * theta), torch.sin(2 * theta)])  # (2, K)
    n_ast = {"none": 0, "series": 1, "tilt": t}[astigmatism] if fit_defocus else 0
    p_delta = (delta / _UNIT).clone().requires_grad_(fit_defocus)
    p_ast = torch.zeros((max(n_ast, 1), 2), dtype=torch.float64, device=dev)
    p_ast.requires_grad_(n_ast > 0)
    params = [p for p in (p_delta, p_ast) if p.requires_grad]
    mean0 = delta[stats.count > 0].mean() if bool((stats.count > 0).any()) else 0.0

    def field() -> torch.Tensor:
        ast = (p_ast @ basis) if n_ast else torch.zeros_like(phi)
        return _UNIT * (p_delta[:, None] + ast) * phi  # (t, K)

    if params:
        optimiser = torch.optim.LBFGS(
            params, max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-9
        )

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = _profile(*_terms(cross, power, w, field())).sum()
            if reg_lambda:
                diff = _UNIT * p_delta - mean0
                loss = loss + reg_lambda * (stats.count * diff * diff).sum()
            if sigma_angst:
                loss = loss + ((_UNIT * p_delta - centre) ** 2).sum() / (2 * sigma_angst**2)
            loss.backward()
            return loss

        optimiser.step(closure)
    with torch.no_grad():
        x, d = _terms(cross, power, w, field())
        ast = (p_ast.detach() * _UNIT).expand(t, 2) if n_ast else torch.zeros(t, 2, device=dev)
        h = 50.0  # Å: curvature of L + prior by central differences
        around = [
            _profile(*_terms(cross, power, w, field() + s * h * phi))
            + (
                0.0
                if not sigma_angst
                else (_UNIT * p_delta + s * h - centre) ** 2 / (2 * sigma_angst**2)
            )
            for s in (-1, 0, 1)
        ]
        curvature = (around[0] - 2 * around[1] + around[2]) / h**2
        sigma = torch.where(curvature > 0, curvature.clamp_min(1e-300).rsqrt(), torch.inf)
        return DefocusFit(
            delta=(p_delta.detach() * _UNIT),
            astigmatism=ast.to(torch.float64),
            scale=torch.where(d > 0, x / d.clamp_min(1e-300), torch.ones_like(x)),
            cross=x,
            power=d,
            cost_before=cost_before,
            cost_after=_profile(x, d),
            sigma=sigma,
        )


def temper_likelihood(
    delta: torch.Tensor, sigma: torch.Tensor, centre: torch.Tensor, sigma_prior: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior modes and σ ``(t,)`` (Å) of a series' tilts with the likelihood widened by
    ``κ² ≥ 1``, estimated from the tilts themselves (empirical Bayes), and ``κ²``.

    With a Gaussian prior (centre ``centre``, σ ``sigma_prior``) and a likelihood of Fisher
    information ``I = 1/σ² − 1/σ_prior²``, the maximum-likelihood change of each tilt is
    ``centre + (δ − centre)·(I + 1/σ_prior²)/I`` and is distributed as
    ``N(centre, σ_prior² + κ²/I)`` over the tilts; ``κ²`` maximises that marginal likelihood
    (``κ² = 1``: the fits scatter as their own σ say). A likelihood sharper than the data
    support (half maps from a first Refine3D, ~32 Å: ``κ²`` 3.9 on
    benchmarks/tomo_refine_cycle.py) otherwise moves the tilts by twice what prior and
    likelihood predict and leaves them worse than before the fit (446 -> 519 Å RMS there).

    ``κ²`` is kept only where the data ask for it: when ``−2 log`` of the marginal likelihood
    at ``κ²`` is below its value at ``κ² = 1`` by more than :data:`KAPPA2_EVIDENCE` (a
    likelihood-ratio test, one parameter, 5%). When the likelihoods are much sharper than
    the prior (``1/I ≪ σ_prior²``) the marginal barely depends on ``κ²``, and its maximum
    follows the chance spread of the true changes about ``σ_prior`` instead (benchmarks/
    ctf_refine.py, SNR 1, true map: ``κ²`` 2.6 and 3.7 at a gain in ``−2 log L`` of 0.2 and
    0.3, per-tilt RMS error 110 -> 126 Å; on noise-free data ``κ²`` 37–62 and 39 -> 88 Å)."""
    d, s, c = (x.double() for x in (delta, sigma, centre))
    # tilts whose data say something (the others stay where they are, at the prior)
    used = s < 0.99 * sigma_prior
    if not bool(used.any()):
        return d, s, 1.0
    info = (1 / s.square() - 1 / sigma_prior**2).clamp_min(1e-12)
    ml = (d - c) * (info + 1 / sigma_prior**2) / info  # maximum-likelihood change - centre
    grid = torch.logspace(0, 2, 201, dtype=torch.float64, device=d.device)  # κ² 1 … 100
    var = sigma_prior**2 + grid[:, None] / info[used][None]  # (G, used)
    cost = (var.log() + ml[used].square() / var).sum(1)  # −2 log L + const
    best = int(cost.argmin())
    k2 = float(grid[best]) if float(cost[0] - cost[best]) > KAPPA2_EVIDENCE else 1.0
    precision = info / k2 + 1 / sigma_prior**2
    tempered = torch.where(used, c + ml * (info / k2) / precision, d)
    return tempered, torch.where(used, precision.rsqrt(), s), k2


def particle_defocus_grid(sigma_angst: float, steps: int = 160) -> torch.Tensor:
    """The trial per-particle defocus changes ``(steps + 1,)`` Å: ±4σ of the prior."""
    return torch.linspace(-4 * sigma_angst, 4 * sigma_angst, steps + 1, dtype=torch.float64)


def particle_defocus_profiles(
    patches: TiltPatches, weights: dict[str, torch.Tensor], grid: torch.Tensor
) -> torch.Tensor:
    """Each particle's ``L_p`` ``(b, G)`` at the defocus changes ``grid`` ``(G,)`` Å (negative
    log-likelihood over its tilts, scale 1). ``weights`` per rlnTomoName ``(K,)``; the
    patches' ``quadrature`` must hold the refined per-tilt CTFs."""
    cross, power, _ = _sums(patches)  # (b, f, ., K)
    cross, power = cross.sum(1), power.sum(1)
    dev = cross.device
    w = torch.stack([weights[str(n)].to(dev, torch.float64) for n in patches.tomo_names])
    phase = grid.to(dev)[:, None] * patches.defocus_phase.to(dev, torch.float64)  # (G, K)
    x, d = _grid_terms(cross * w[:, None], power * w[:, None], phase)  # (b, G)
    return -x + d / 2


def particle_defocus_modes(
    grid: torch.Tensor,
    nll: torch.Tensor,
    sigma_angst: float,
    *,
    current: torch.Tensor | None = None,
    kappa2: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-particle defocus change ``(b,)`` Å and its posterior σ ``(b,)`` Å: the mode of
    ``L_p/κ² + (current + δ)²/(2σ²)`` on ``grid`` refined by a parabola through the best
    point and its neighbours. The prior is on the particle's total offset, ``current``
    ``(b,)`` Å (the offset it has now; ``None``: 0) plus the change, so that refining again
    does not let the offsets wander; ``κ² ≥ 1`` widens the likelihood
    (:func:`temper_likelihood`)."""
    grid = grid.to(nll.device)
    total = grid if current is None else grid + current.to(nll.device, torch.float64)[:, None]
    cost = nll / kappa2 + total**2 / (2 * sigma_angst**2)  # (b, G)
    steps = grid.shape[0] - 1
    best = cost.argmin(1).clamp(1, steps - 1)
    lo, mid, hi = (cost.gather(1, (best + k)[:, None])[:, 0] for k in (-1, 0, 1))
    curvature = lo - 2 * mid + hi
    step = grid[1] - grid[0]
    shift = torch.where(curvature > 0, 0.5 * (lo - hi) / curvature.clamp_min(1e-300), 0.0)
    sigma = torch.where(curvature > 0, step * curvature.clamp_min(1e-300).rsqrt(), sigma_angst)
    return grid[best] + shift.clamp(-1, 1) * step, sigma.clamp(max=sigma_angst)


@dataclass
class AberrationSums:
    """What the aberration fit of an optics group needs, per Fourier point ``(K,)`` (float64),
    summed over its tilt series and their tilts at each tilt's fitted defocus, astigmatism and
    scale ``s_f`` (RELION fits aberrations with the scales fixed).

    With ``Q'`` the quadrature at the fitted CTF and ``w`` the frequency weights:
    ``a = Σ w s_f Σ vA Re(Ȳ P)·(Re Q', Im Q')``, ``b`` the same with ``Im(Ȳ P)``, ``p =
    Σ w s_f² Σ vA²|P|²·(Re Q'², Re Q' Im Q', Im Q'²)``. An even phase ``ψ`` added to ``γ``
    and an odd phase ``χ`` on the prediction (``Y ≈ A·s·Re[Q' e^{iψ}]·P·e^{iχ}``) cost
    ``L = −X + D/2`` with ``X = Σ cos χ (cos ψ a₀ − sin ψ a₁) − sin χ (cos ψ b₀ − sin ψ b₁)``
    and ``D = Σ cos²ψ p₀ − 2 cos ψ sin ψ p₁ + sin²ψ p₂``.
    """

    a: torch.Tensor  # (2, K)
    b: torch.Tensor  # (2, K)
    p: torch.Tensor  # (3, K)

    @classmethod
    def from_fit(
        cls,
        stats: TiltStatistics,
        weights: torch.Tensor,
        fit: DefocusFit,
        freq: torch.Tensor,
        defocus_phase: torch.Tensor,
    ) -> AberrationSums:
        """The sums of one tilt series at the CTF of ``fit`` (its ``delta``, ``astigmatism``
        and ``scale``, relative to the CTF of ``stats``); ``freq`` ``(K, 2)``, ``defocus_phase``
        ``(K,)`` as for :func:`fit_tilt_defocus`."""
        dev = stats.cross.device
        w = weights.to(dev, torch.float64)
        theta = torch.atan2(freq[:, 1].to(dev, torch.float64), freq[:, 0].to(dev, torch.float64))
        basis = torch.stack([torch.cos(2 * theta), torch.sin(2 * theta)])  # (2, K)
        change = fit.delta.to(dev)[:, None] + fit.astigmatism.to(dev) @ basis  # (t, K) Å
        phase = change * defocus_phase.to(dev, torch.float64)
        c, s = torch.cos(phase), torch.sin(phase)
        scale = fit.scale.to(dev, torch.float64)[:, None]

        def turned(sums: torch.Tensor) -> torch.Tensor:  # (t, 2, K) -> (2, K): Re, Im of Q'
            re = c * sums[:, 0] - s * sums[:, 1]
            im = s * sums[:, 0] + c * sums[:, 1]
            return (torch.stack([re, im], 1) * (w * scale)[:, None]).sum(0)

        p0, p1, p2 = stats.power.unbind(1)
        power = torch.stack([
            c * c * p0 - 2 * c * s * p1 + s * s * p2,
            c * s * (p0 - p2) + (c * c - s * s) * p1,
            s * s * p0 + 2 * c * s * p1 + c * c * p2,
        ], 1)  # fmt: skip
        return cls(
            turned(stats.cross), turned(stats.imag), (power * (w * scale**2)[:, None]).sum(0)
        )

    def __add__(self, other: AberrationSums) -> AberrationSums:
        return AberrationSums(self.a + other.a, self.b + other.b, self.p + other.p)

    def cost(self, even_phase: torch.Tensor, odd_phase: torch.Tensor) -> torch.Tensor:
        """``L`` (scalar) at the phases ``ψ`` and ``χ`` ``(K,)`` (radians)."""
        c, s = torch.cos(even_phase), torch.sin(even_phase)
        x = torch.cos(odd_phase) * (c * self.a[0] - s * self.a[1])
        x = x - torch.sin(odd_phase) * (c * self.b[0] - s * self.b[1])
        d = c * c * self.p[0] - 2 * c * s * self.p[1] + s * s * self.p[2]
        return (-x + d / 2).sum()


def zernike_count(order: int, parity: str) -> int:
    """Number of RELION's ``parity`` Zernike coefficients up to radial ``order`` (``--ne`` 4:
    9 even ones, ``--no`` 3: 6 odd ones; 0 below the lowest order)."""
    first = 0 if parity == "even" else 1
    return sum(n + 1 for n in range(first, order + 1, 2))


def fit_aberrations(
    sums: AberrationSums,
    kx: torch.Tensor,
    ky: torch.Tensor,
    n_even: int,
    n_odd: int,
    iterations: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The changes of the even ``(n_even,)`` and odd ``(n_odd,)`` Zernike coefficients
    (RELION's order, radians; :mod:`subtomo.ctf.aberrations`) that minimise ``sums.cost`` at
    points ``kx, ky`` ``(K,)`` (1/Å), by L-BFGS from 0 on polynomials scaled to a largest
    value of 1 over the points."""
    from subtomo.ctf.aberrations import zernike_indices, zernike_polynomial

    dev = sums.a.device
    kx, ky = kx.to(dev, torch.float64), ky.to(dev, torch.float64)

    def basis(count: int, parity: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not count:
            return torch.zeros(0, kx.shape[0], dtype=torch.float64, device=dev), torch.ones(0)
        z = torch.stack(
            [zernike_polynomial(n, m, kx, ky) for n, m in zernike_indices(count, parity)]
        )
        norm = z.abs().amax(1).clamp_min(1e-30)
        return z / norm[:, None], norm.cpu()

    even, even_norm = basis(n_even, "even")
    odd, odd_norm = basis(n_odd, "odd")
    ce = torch.zeros(n_even, dtype=torch.float64, device=dev, requires_grad=n_even > 0)
    co = torch.zeros(n_odd, dtype=torch.float64, device=dev, requires_grad=n_odd > 0)
    params = [p for p in (ce, co) if p.requires_grad]
    if params:
        scale = float(sums.p[0].sum().abs().clamp_min(1e-300))  # L is of the order of D
        optimiser = torch.optim.LBFGS(
            params, max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-12
        )

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = sums.cost(ce @ even, co @ odd) / scale
            loss.backward()
            return loss

        optimiser.step(closure)
    return ce.detach().cpu() / even_norm, co.detach().cpu() / odd_norm


def tempered_particle_changes(
    grid: torch.Tensor,
    nll: torch.Tensor,
    sigma_angst: float,
    current: torch.Tensor,
    simulated: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Per-particle defocus changes ``(b,)`` Å of one tilt series and the κ² of their
    likelihood: the posterior modes of the profiles ``nll`` ``(b, G)`` on ``grid``
    (:func:`particle_defocus_modes`, prior σ ``sigma_angst`` on the total offset, ``current``
    ``(b,)`` Å the offsets now), less the modes of ``simulated`` (the same fit on simulated
    data, which measures its bias; ``None``: no correction), with the likelihood widened by
    the κ² that :func:`temper_likelihood` finds on the bias-corrected modes. Corrected
    after tempering instead, the crop's bias (~−270 Å per particle at SNR 1 on
    benchmarks/ctf_refine.py) was read as scatter: κ² 4 and the offsets shrunk to 0.47 of the
    truth (per-particle RMS error 158 -> 183 Å)."""

    def modes(kappa2: float) -> tuple[torch.Tensor, torch.Tensor]:
        delta, sd = particle_defocus_modes(grid, nll, sigma_angst, current=current, kappa2=kappa2)
        if simulated is not None:
            delta = delta - particle_defocus_modes(grid, simulated, sigma_angst, kappa2=kappa2)[0]
        return delta, sd

    _, _, k2 = temper_likelihood(*modes(1.0), -current, sigma_angst)
    return modes(k2)[0], k2


@dataclass
class IceFit:
    """Beer–Lambert fit per tilt series: ``amplitude`` a, ``kappa`` κ, ``normal_deg`` φ."""

    amplitude: float
    kappa: float
    normal_deg: float

    @property
    def thickness_mfp(self) -> float:
        """Ice thickness in inelastic mean free paths, ``−ln κ``."""
        return -math.log(max(self.kappa, 1e-12))


def fit_ice_scale(
    tilt_rotations: list[torch.Tensor],
    cross: list[torch.Tensor],
    power: list[torch.Tensor],
    current: list[torch.Tensor],
    *,
    per_tomogram: bool = False,
    iterations: int = 200,
) -> tuple[list[IceFit], list[torch.Tensor]]:
    """Fit ``scale_f = a·κ^(1/|cos θ_f|)`` to the tilts of several series at once.

    Per series: ``tilt_rotations`` ``(t, 3, 3)`` R_f, ``cross``/``power`` ``(t,)`` ``X``/``D``
    of :class:`DefocusFit` (relative to the ``current`` rlnCtfScalefactor ``(t,)``). ``a`` is
    shared by all series unless ``per_tomogram``; κ and the ice-normal angle φ are per series.
    Returns the fits and the new absolute scales per series.
    """
    n = len(cross)
    x = [c.detach().double().cpu() for c in cross]
    d = [p.detach().double().cpu() for p in power]
    cur = [torch.as_tensor(c, dtype=torch.float64).cpu() for c in current]
    raw = [
        c * torch.where(dd > 0, xx / dd.clamp_min(1e-300), 1.0)
        for c, xx, dd in zip(cur, x, d, strict=True)
    ]
    log_a0 = math.log(max(float(torch.cat(raw).max()), 1e-6) / 0.88)
    log_a = torch.full((n if per_tomogram else 1,), log_a0, dtype=torch.float64)
    logit_k = torch.full((n,), 2.0, dtype=torch.float64)  # κ = 0.88
    phi = torch.zeros(n, dtype=torch.float64)
    params = [p.requires_grad_() for p in (log_a, logit_k, phi)]
    mats = [r.detach().double().cpu() for r in tilt_rotations]

    def model(i: int) -> torch.Tensor:
        a = torch.exp(log_a[i if per_tomogram else 0])
        return ice_scale(mats[i], a, torch.sigmoid(logit_k[i]), 10.0 * phi[i])

    optimiser = torch.optim.LBFGS(params, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.zeros((), dtype=torch.float64)
        for i in range(n):
            r = model(i) / cur[i]
            loss = loss + (-r * x[i] + r * r * d[i] / 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        fits = [
            IceFit(
                amplitude=float(torch.exp(log_a[i if per_tomogram else 0])),
                kappa=float(torch.sigmoid(logit_k[i])),
                normal_deg=float(10.0 * phi[i]),
            )
            for i in range(n)
        ]
        return fits, [model(i) for i in range(n)]
