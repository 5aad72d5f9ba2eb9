"""Tomographic frame alignment (RELION's ``relion_tomo_align``, §11, §24).

For one tilt series, every visible (particle, tilt) pair gives a whitened, dose-weighted
cross-correlation between its tilt image and the projection of the particle's own half map
(gold standard), from the patches of :class:`~subtomo.tomorefine.predict.TiltPredictor`
(``Y ≈ s·A²·P``, §23). As a function of a change ``δ`` (bin-1 px) of the particle's image
position it is the shift-dependent part of the Gaussian log-likelihood

    CC(δ) = Σ_k s·Re[Y(k)·conj(P(k))·e^{2πi k·δ/b}] / σ²(|k|)

(``σ²`` the noise power per real or imaginary part, ``s`` the least-squares scale, ``b`` the
binning of the stacks, the Hermitian half counted twice), over the shells up to the half
maps' FSC = 0.143 (RELION's flat weight). Phase shifts are exact and differentiable, so no CC
map is interpolated.

The image position of particle ``i`` in tilt ``f`` is ``uv_if = P_f(θ)·(c_i + d_i + t_if/px)``
with the projection matrix rebuilt from the tilt's angles plus three Tait-Bryan increments
and its shift plus a 2D increment (§1.3), a static 3D offset ``d_i`` (px, tomogram axes) and
the trajectory ``t_if`` of :mod:`subtomo.tomorefine.motion` (Å), plus, with a deformation,
the tilt's field at that position (:mod:`subtomo.geometry.deformation`). Everything is maximised
together with L-BFGS against the motion prior, after a grid search of each tilt's shift
within ``max_shift_px`` on the summed CC of its particles. Gauge: a rigid motion of the whole
specimen is invisible, so when the per-tilt shifts are fitted the mean static offset is held
at zero, and the angle increments are zero-mean over the tilts. The predictions keep the
input orientation (angle increments move positions only; a fraction of a degree does not
change a projection at these resolutions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from subtomo.geometry import alignment_from_projection_matrices, projection_matrices
from subtomo.geometry.deformation import deformation_shift
from subtomo.ml.loader import ParticleState
from subtomo.tomorefine.motion import gp_basis, motion_steps, trajectories_from_velocities
from subtomo.tomorefine.predict import TiltPredictor, shell_noise_sums

__all__ = [
    "FrameAlignSettings",
    "SeriesFit",
    "SeriesGeometry",
    "SeriesObservations",
    "align_series",
    "observe_particles",
]


@dataclass(frozen=True)
class FrameAlignSettings:
    """What is fitted (RELION's ``relion_tomo_align`` flags, §11).

    ``shift_only``: per-tilt 2D shifts only (no angles, offsets or motion); ``const_a``,
    ``const_s``, ``const_p``: freeze the per-tilt angles, per-tilt shifts, particle offsets;
    ``motion``: fit trajectories with ``s_vel`` (Å per e/Å²), ``s_div`` (Å), ``sq_exp_ker``
    and ``max_ed`` (§24); ``max_shift_px`` the grid search of the per-tilt shifts (bin-1 px);
    ``iterations`` L-BFGS iterations per stage; ``range_reg`` a penalty
    ``range_reg·Σ|s_f|²`` (px⁻²) on the per-tilt shift increments; ``deformation``: fit a 2D
    deformation of each tilt image on a ``(g_x, g_y)`` grid of nodes
    (:mod:`subtomo.geometry.deformation`; its mean over the nodes is left to the per-tilt
    shift) with a Gaussian prior ``def_reg·Σ|d|²/2`` (px⁻²) on the node displacements.
    """

    shift_only: bool = False
    const_a: bool = False
    const_s: bool = False
    const_p: bool = False
    motion: bool = False
    s_vel: float = 0.5
    s_div: float = 5000.0
    sq_exp_ker: bool = False
    max_ed: int = -1
    max_shift_px: float = 20.0
    iterations: int = 50
    range_reg: float = 0.0
    deformation: tuple[int, int] | None = None
    def_reg: float = 0.1


@dataclass
class SeriesObservations:
    """The CC terms of the ``m`` visible (particle, tilt) pairs of one tilt series.

    ``x`` ``(m, K)`` complex: ``2·a·Y·conj(P)/σ²`` (times 2 off the ``k_x = 0`` column);
    ``freq`` ``(K, 2)`` xy in cycles per half-map pixel; ``particle``/``frame`` ``(m,)``;
    ``binning`` half-map pixel / tilt-series pixel; ``scale`` the fitted ``a``.
    """

    x: torch.Tensor
    freq: torch.Tensor
    particle: torch.Tensor
    frame: torch.Tensor
    binning: float
    scale: float

    def cc(self, shifts_px: torch.Tensor) -> torch.Tensor:
        """``(m,)`` CC of each pair at its image shift ``(m, 2)`` (bin-1 px)."""
        angle = (2 * math.pi / self.binning) * (shifts_px.to(self.freq.dtype) @ self.freq.T)
        return (self.x.real * torch.cos(angle) - self.x.imag * torch.sin(angle)).sum(-1)


def observe_particles(
    predictor: TiltPredictor,
    state: ParticleState,
    indices: np.ndarray | None = None,
) -> dict[str, SeriesObservations]:
    """The :class:`SeriesObservations` of each tilt series (``{rlnTomoName: ...}``) from the
    patches of :class:`~subtomo.tomorefine.predict.TiltPredictor` (§23: ``Y ≈ s·A²·P``).

    ``indices``: the particles to use (default all); a series' ``particle`` entries count
    its particles in file order among those. The noise power ``σ²(|k|)`` (per real or
    imaginary part, :func:`~subtomo.tomorefine.predict.shell_noise_sums`) is pooled over
    all of them; each series gets its own least-squares scale ``s``.
    """
    loader = predictor.loader
    index = np.arange(len(loader)) if indices is None else np.asarray(indices)
    names = loader.tomo_names
    local = np.zeros(len(loader), dtype=np.int64)  # particle -> place in its series
    for name in dict.fromkeys(names[index]):
        rows = index[names[index] == name]
        local[rows] = np.arange(len(rows))
    n_shells = loader.box // 2 + 1
    noise = torch.zeros(n_shells, dtype=torch.float64, device=predictor.device)
    weight = torch.zeros_like(noise)
    pairs: dict[str, list[tuple[torch.Tensor, ...]]] = {}
    for patches in predictor.batches(state, index):
        num, den = shell_noise_sums(patches, patches.ctf, n_shells)
        noise += num
        weight += den
        b, f = torch.nonzero(patches.visible, as_tuple=True)
        batch_names = patches.tomo_names[b.cpu().numpy()]
        for name in dict.fromkeys(batch_names):
            sel = torch.from_numpy(batch_names == name).to(b.device)
            bb, ff = b[sel], f[sel]
            pairs.setdefault(name, []).append((
                torch.from_numpy(local[patches.index.numpy()])[bb.cpu()],
                patches.frames[bb, ff].cpu(),
                patches.observed[bb, ff],
                patches.predicted[bb, ff],
                patches.ctf[bb, ff],
            ))  # fmt: skip
    points = predictor.points
    sigma2 = (noise / weight.clamp_min(1e-30)).clamp_min(1e-30)[points.shell].float()
    keep = points.shell > 0
    hermitian = torch.where(points.freq[:, 0] > 0, 2.0, 1.0).to(sigma2.device)
    binning = float(loader.binning[index[0]])
    out = {}
    for name, parts in pairs.items():
        particle, frame, y, p, a = (torch.cat(x) for x in zip(*parts, strict=True))
        cross = (y * p.conj()) * (hermitian / sigma2)  # (m, K)
        scale = float(cross.real.sum() / (a.square() * p.abs().square() * hermitian / sigma2)
                      .sum().clamp_min(1e-30))  # fmt: skip
        out[name] = SeriesObservations(
            x=(scale * cross)[:, keep], freq=points.freq[keep], particle=particle,
            frame=frame, binning=binning, scale=scale,
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class SeriesGeometry:
    """The current model of one tilt series with ``n`` particles and ``t`` tilts.

    ``projection`` ``(t, 4, 4)`` the P_f (§1.3); ``centres_px`` ``(n, 3)`` the particle
    centres (decentred bin-1 px, origins included); ``trajectories_angst`` ``(n, t, 3)`` their
    trajectories (zeros for none); ``pre_exposure`` ``(t,)`` e/Å²; ``pixel_size`` the bin-1
    tilt-series pixel (Å); ``tomogram_size`` (x, y, z) and ``image_size`` (w, h) in px;
    ``deformation`` ``(t, g_y, g_x, 2)`` the series' 2D deformation (``None``: none).
    """

    projection: torch.Tensor
    centres_px: torch.Tensor
    trajectories_angst: torch.Tensor
    pre_exposure: torch.Tensor
    pixel_size: float
    tomogram_size: tuple[int, int, int]
    image_size: tuple[int, int]
    deformation: torch.Tensor | None = None

    def cpu_double(self) -> SeriesGeometry:
        """The same geometry with every tensor float64 on the CPU."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(
            self, **{k: v.double().cpu() for k, v in values.items() if torch.is_tensor(v)}
        )


@dataclass
class SeriesFit:
    """The result for one tilt series (float64, CPU).

    ``matrices`` ``(t, 4, 4)`` refined P_f; ``alignment`` RELION's five per-tilt columns of
    them (§1.3); ``offsets_px`` ``(n, 3)`` static offsets (bin-1 px, tomogram axes);
    ``trajectories_angst`` ``(n, t, 3)`` (input trajectory plus the fitted motion, §3);
    ``tilt_shifts_px`` ``(t, 2)`` the mean image shift of each tilt's particles;
    ``cc_before``/``cc_after`` the summed CC; ``deformation`` ``(t, g_y, g_x, 2)`` the 2D
    deformation (the input one plus the fitted change; ``None``: none).
    """

    matrices: torch.Tensor
    alignment: dict[str, torch.Tensor]
    offsets_px: torch.Tensor
    trajectories_angst: torch.Tensor
    tilt_shifts_px: torch.Tensor
    cc_before: float
    cc_after: float
    deformation: torch.Tensor | None = None


class _SeriesModel(torch.nn.Module):
    """Image positions ``(n, t, 2)`` of the particles as a function of the fitted parameters
    (float64 on the CPU: the positions are small; the CC terms stay on their device)."""

    def __init__(self, geometry: SeriesGeometry, settings: FrameAlignSettings) -> None:
        super().__init__()
        g = geometry.cpu_double()
        t, n = g.projection.shape[0], g.centres_px.shape[0]
        self.alignment = alignment_from_projection_matrices(
            g.projection, g.pixel_size, g.tomogram_size, g.image_size
        )
        self.geometry = g
        # one angle unit moves a point half the tomogram's width away by about one pixel
        self.degrees_per_unit = math.degrees(2.0 / max(g.tomogram_size[:2]))
        fit_a = not (settings.const_a or settings.shift_only)
        fit_p = not (settings.const_p or settings.shift_only)
        fit_m = settings.motion and not settings.shift_only
        self.fixed_gauge = not settings.const_s
        self.angles = torch.nn.Parameter(torch.zeros(t, 3, dtype=torch.float64), fit_a)
        self.shifts = torch.nn.Parameter(
            torch.zeros(t, 2, dtype=torch.float64), not settings.const_s
        )
        self.offsets = torch.nn.Parameter(torch.zeros(n, 3, dtype=torch.float64), fit_p)
        self.order, sigma = motion_steps(g.pre_exposure, settings.s_vel)
        basis = gp_basis(
            g.centres_px * g.pixel_size, settings.s_div, settings.sq_exp_ker, settings.max_ed
        )
        self.velocity_basis = basis[None] * (sigma / g.pixel_size)[:, None, None]  # (t-1, n, m)
        self.coefficients = torch.nn.Parameter(
            torch.zeros(basis.shape[1], max(t - 1, 0), 3, dtype=torch.float64), fit_m
        )
        gx, gy = settings.deformation or (1, 1)
        if g.deformation is not None and settings.deformation:
            if tuple(g.deformation.shape[1:3]) != (gy, gx):
                raise ValueError(
                    f"the series has a {g.deformation.shape[2]} x {g.deformation.shape[1]} "
                    f"deformation grid, {gx} x {gy} was asked for"
                )
        self.field = torch.nn.Parameter(
            torch.zeros(t, gy, gx, 2, dtype=torch.float64), settings.deformation is not None
        )
        self.fit_field = settings.deformation is not None

    def deformation(self) -> torch.Tensor | None:
        """``(t, g_y, g_x, 2)`` px: the input field plus the fitted change (zero mean over
        the nodes of each tilt: a mean is a per-tilt shift); ``None`` without either."""
        base = self.geometry.deformation
        if not self.fit_field:
            return base
        change = self.field - self.field.mean(dim=(1, 2), keepdim=True)
        return change if base is None else base + change

    def matrices(self) -> torch.Tensor:
        """``(t, 4, 4)`` P_f with the fitted increments (§1.3)."""
        delta = self.angles * self.degrees_per_unit
        delta = delta - delta.mean(0)
        a, g = self.alignment, self.geometry
        return projection_matrices(
            a["rlnTomoXTilt"] + delta[:, 0], a["rlnTomoYTilt"] + delta[:, 1],
            a["rlnTomoZRot"] + delta[:, 2],
            a["rlnTomoXShiftAngst"] + self.shifts[:, 0] * g.pixel_size,
            a["rlnTomoYShiftAngst"] + self.shifts[:, 1] * g.pixel_size,
            g.pixel_size, g.tomogram_size, g.image_size,
        )  # fmt: skip

    def static_offsets(self) -> torch.Tensor:
        """``(n, 3)`` px; zero-mean when the per-tilt shifts are fitted (gauge)."""
        return self.offsets - self.offsets.mean(0) if self.fixed_gauge else self.offsets

    def trajectories_angst(self) -> torch.Tensor:
        """``(n, t, 3)``: the input trajectories plus the fitted motion."""
        velocities = torch.einsum("snm,msk->nsk", self.velocity_basis, self.coefficients)
        motion = trajectories_from_velocities(velocities, self.order) * self.geometry.pixel_size
        return self.geometry.trajectories_angst + motion

    def positions(self) -> torch.Tensor:
        """``(n, t, 2)`` image positions (bin-1 px)."""
        p = self.matrices()
        g = self.geometry
        x = (g.centres_px + self.static_offsets())[:, None] + self.trajectories_angst() / (
            g.pixel_size
        )  # (n, t, 3)
        uv = torch.einsum("tij,ntj->nti", p[:, :2, :3], x) + p[:, :2, 3]
        field = self.deformation()
        return uv if field is None else uv + deformation_shift(uv, field, g.image_size)

    def prior(self, range_reg: float, def_reg: float) -> torch.Tensor:
        """``½ Σ c²`` (unit Gaussian on the motion coefficients) + ``range_reg·Σ|s_f|²`` +
        ``def_reg·Σ|d|²/2`` on the fitted change of the deformation's nodes."""
        out = 0.5 * self.coefficients.square().sum() + range_reg * self.shifts.square().sum()
        if self.fit_field:
            change = self.field - self.field.mean(dim=(1, 2), keepdim=True)
            out = out + 0.5 * def_reg * change.square().sum()
        return out


def _lbfgs(model: _SeriesModel, loss_fn, iterations: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or iterations <= 0:
        return
    optimiser = torch.optim.LBFGS(
        params, lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-9, tolerance_change=1e-12,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimiser.step(closure)


def _grid_search_shifts(obs: SeriesObservations, n_tilts: int, radius: float) -> torch.Tensor:
    """``(t, 2)`` px: for each tilt, the whole-pixel shift within ``radius`` that maximises
    the summed CC of its particles (RELION's ``--r``)."""
    r = math.floor(radius)
    steps = torch.arange(-r, r + 1, dtype=torch.float32, device=obs.x.device)
    grid = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), -1).reshape(-1, 2)
    grid = grid[grid.norm(dim=-1) <= radius]
    angle = (2 * math.pi / obs.binning) * (grid @ obs.freq.T.float())  # (G, K)
    cos, sin = torch.cos(angle), torch.sin(angle)
    summed = torch.zeros(n_tilts, obs.x.shape[1], dtype=obs.x.dtype, device=obs.x.device)
    summed.index_add_(0, obs.frame, obs.x)  # (t, K)
    cc = summed.real @ cos.T - summed.imag @ sin.T  # (t, G)
    best = grid[cc.argmax(-1)].double().cpu()
    return torch.where(torch.bincount(obs.frame.cpu(), minlength=n_tilts)[:, None] > 0, best, 0.0)


def align_series(
    obs: SeriesObservations, geometry: SeriesGeometry, settings: FrameAlignSettings
) -> SeriesFit:
    """Fit one tilt series (see the module docstring) from its current ``geometry``, at
    which the observations must have been made."""
    model = _SeriesModel(geometry, settings)
    with torch.no_grad():
        start = model.positions()
    t = geometry.projection.shape[0]
    pair = (obs.particle.cpu(), obs.frame.cpu())

    def cc_total() -> torch.Tensor:
        shifts = (model.positions() - start)[pair]
        return obs.cc(shifts.to(obs.x.device)).sum()

    with torch.no_grad():
        cc_before = float(cc_total())
    if not settings.const_s:
        with torch.no_grad():
            model.shifts.copy_(_grid_search_shifts(obs, t, settings.max_shift_px))

    def loss() -> torch.Tensor:
        return -cc_total() + model.prior(settings.range_reg, settings.def_reg)

    fit_motion = model.coefficients.requires_grad
    model.coefficients.requires_grad_(False)  # rigid parameters first, then deformations,
    model.field.requires_grad_(False)  # then motion
    _lbfgs(model, loss, settings.iterations)
    if model.fit_field:
        model.field.requires_grad_(True)
        _lbfgs(model, loss, settings.iterations)
    if fit_motion:
        model.coefficients.requires_grad_(True)
        _lbfgs(model, loss, settings.iterations)
    with torch.no_grad():
        cc_after = float(cc_total())
        shifts = model.positions() - start  # (n, t, 2)
        seen = torch.zeros(shifts.shape[:2], dtype=torch.bool)
        seen[pair] = True
        counts = seen.sum(0).clamp_min(1)[:, None]
        tilt_shifts = (shifts * seen[..., None]).sum(0) / counts
        matrices = model.matrices()
        return SeriesFit(
            matrices=matrices,
            alignment=alignment_from_projection_matrices(
                matrices, geometry.pixel_size, geometry.tomogram_size, geometry.image_size
            ),
            offsets_px=model.static_offsets(),
            trajectories_angst=model.trajectories_angst(),
            tilt_shifts_px=tilt_shifts,
            cc_before=cc_before,
            cc_after=cc_after,
            deformation=model.deformation(),
        )
