"""Per-tilt CTF estimation, tilt-aware: defocus U/V/angle (and phase shift), the defocus
gradient across each tilted image, sample thickness from the Thon-ring nodes, and the hand.

Model (RELION's conventions, §1.4-1.5; the phase γ is :func:`subtomo.ctf.ctf_phase`): a tile's
power spectrum is ``B(k) + E(k) · ½ (1 - sinc(π λ t |k|²) · cos 2γ(k))``, the CTF² averaged over
a slab whose defocus spans ``t`` (thickness along the beam, ``T/cos θ`` for a slab ``T`` thick;
Elferich et al., eLife 2024); its Thon rings vanish at the nodes ``λ t |k|² = n`` and change
sign between them. Steps, for each tilt:

1. **Spectra** (:func:`tile_spectra`): periodograms of overlapping ``box`` tiles (Hann
   window), averaged over the tiles of each *strip*, tiles grouped by their position along
   the defocus gradient (:func:`subtomo.tilt.depth_gradient`; one strip at 0° tilt). Each
   strip's spectrum is averaged into polar bins (``sectors`` directions x ``bins`` steps of
   ``|k|²``) with the pixel counts as weights; in ``|k|²`` the rings are equally spaced.
2. **Normalisation**: a search of the mean defocus on the rotational average, with the same
   moving average (in ``|k|²``) taken from data and model (unbiased whatever the background),
   gives the ring period; the background is then the moving average over two ring periods
   (which removes the rings) and the residual is divided by its local RMS.
3. **Astigmatism**: ``Δf(θ) = m + p cos 2θ + q sin 2θ`` (U, V = m ± √(p²+q²), angle
   ½ atan2(q, p)); a grid over (m, p, q) to 10 Å (below the first thickness node), then
   L-BFGS of the correlation (torch autograd) over the fit range.
4. **Gradient**: the mean defocus of each strip (the rest fixed), regressed on the strips'
   positions along the gradient: the tilt's defocus slope (Å/px). The rings of one tile are
   also damped by the gradient inside it, modelled exactly (:meth:`_Fitter.in_tile`).
5. **Thickness and hand** (whole series): the signed ring amplitude of every Thon ring
   fitted by ``a · exp(-b s) · sinc(λ t_f s)``, ``t_f = T · slab_depth_factor_f``, with a free
   envelope per tilt so that only nodes and sign flips decide ``T``
   (:func:`series_thickness`); the slopes against ``px · |g_f|`` give the regression
   coefficient ``hand · rlnTomoDefocusSlope`` (:func:`series_hand`). Defocus and the strips'
   defoci are refitted at the thickness found and both are estimated again (twice).
6. **Central defocus**: (m, p, q) refined on all strips jointly, each strip's model at its
   defocus offset ``hand · px · g · (u, v)`` (Thon rings of a tilted image do not blur).
7. **Fit resolution**: correlation per Thon ring (averaged over 3 rings); the fit resolution
   is the outer edge of the first run of rings whose correlation is 3σ above what noise gives
   (rings at a thickness node skipped). **Figure of merit**: the correlation over the fit
   range; below 5σ of noise's, the tilt has no Thon rings.

Why not teamtomo's torch-ctf-estimation (0.6.0): it requires torchvision, and the only
torchvision for torch 2.13 our package index has (0.28.0, a CUDA build) fails to import beside
torch 2.13.0+cpu ("operator torchvision::nms does not exist"), so it cannot be installed
with our CPU torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.ctf import ctf_phase, electron_wavelength_angstrom
from subtomo.tilt.geometry import depth_gradient, slab_depth_factor

__all__ = [
    "CtfFit",
    "CtfSearch",
    "SeriesFit",
    "SpectrumGrid",
    "TiltSpectra",
    "diagnostic_image",
    "estimate_series",
    "fit_tilt",
    "refine_central",
    "series_hand",
    "series_thickness",
    "strip_offsets",
    "tile_spectra",
]


@dataclass(frozen=True)
class CtfSearch:
    """Search ranges (CTFFIND's names where they exist). Resolutions and defoci in Å,
    thickness in nm, angles in degrees; ``box`` tile size in pixels."""

    box: int = 512
    res_min: float = 30.0
    res_max: float = 5.0
    defocus_min: float = 5000.0
    defocus_max: float = 50000.0
    defocus_step: float = 100.0
    astigmatism_max: float = 2000.0
    phase_shift: bool = False
    thickness: bool = True
    thickness_max_nm: float = 500.0
    strips: int = 5
    sectors: int = 24
    bins: int = 512


@dataclass
class SpectrumGrid:
    """Polar bins of an rfft tile spectrum: bin index of every rfft pixel (-1 outside),
    the bin centres' frequencies ``kx, ky`` (cycles/Å, ``(sectors, bins)``) and ``s = |k|²``
    per bin step."""

    index: torch.Tensor
    kx: torch.Tensor
    ky: torch.Tensor
    s: torch.Tensor
    sectors: int
    bins: int

    @classmethod
    def build(cls, box: int, pixel_size: float, sectors: int, bins: int,
              device: torch.device) -> SpectrumGrid:  # fmt: skip
        ky = torch.fft.fftfreq(box, pixel_size, dtype=torch.float64, device=device)[:, None]
        kx = torch.fft.rfftfreq(box, pixel_size, dtype=torch.float64, device=device)[None, :]
        s = (kx**2 + ky**2).expand(box, box // 2 + 1)
        s_max = 0.25 / pixel_size**2
        angle = torch.atan2(ky, kx).expand_as(s)  # (-π/2, π/2] on the kx >= 0 half plane
        sector = ((angle + math.pi / 2) / math.pi * sectors).floor().clamp(0, sectors - 1)
        step = (s / s_max * bins).floor()
        inside = (step < bins) & (s > 0)
        index = torch.where(inside, sector * bins + step, torch.full_like(s, -1)).long()
        centre_s = (torch.arange(bins, dtype=torch.float64, device=device) + 0.5) * s_max / bins
        centre_a = (torch.arange(sectors, dtype=torch.float64, device=device) + 0.5) / sectors
        centre_a = centre_a * math.pi - math.pi / 2
        k = centre_s.sqrt()[None, :]
        return cls(index.flatten(), k * centre_a.cos()[:, None], k * centre_a.sin()[:, None],
                   centre_s, sectors, bins)  # fmt: skip

    def bin(self, spectra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of ``spectra`` ``(..., box, box//2+1)`` per polar bin and the pixel counts:
        ``(..., sectors, bins)`` each."""
        lead = spectra.shape[:-2]
        flat = spectra.reshape(-1, spectra.shape[-2] * spectra.shape[-1]).double()
        keep = self.index >= 0
        n = self.sectors * self.bins
        sums = torch.zeros(flat.shape[0], n, dtype=torch.float64, device=flat.device)
        sums.index_add_(1, self.index[keep], flat[:, keep])
        counts = torch.zeros(n, dtype=torch.float64, device=flat.device)
        counts.index_add_(
            0, self.index[keep], torch.ones_like(self.index[keep], dtype=torch.float64)
        )
        mean = sums / counts.clamp(min=1)
        shape = (*lead, self.sectors, self.bins)
        return mean.reshape(shape), counts.reshape(self.sectors, self.bins).expand(shape)


@dataclass
class TiltSpectra:
    """One tilt's binned spectra: ``power`` ``(strips, sectors, bins)`` and ``counts``, each
    strip's mean tile offset along the gradient ``position`` (px, ``(strips,)``, 0 for one
    strip), the gradient ``g`` (depth px per image px, ``(2,)``) and the whole-image mean rfft
    spectrum ``mean`` ``(box, box//2+1)`` (diagnostics)."""

    power: torch.Tensor
    counts: torch.Tensor
    position: torch.Tensor
    gradient: torch.Tensor
    mean: torch.Tensor


def _tiles(image: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles ``(n, box, box)`` at half-box steps (the last flush with the edge) and their
    centres' offsets from the image centre ``(w//2, h//2)`` as ``(n, 2)`` xy pixels."""
    h, w = image.shape

    def starts(n: int) -> list[int]:
        last = n - box
        out = list(range(0, last + 1, box // 2))
        return out if out[-1] == last else [*out, last]

    ys, xs = starts(h), starts(w)
    tiles = torch.stack([image[y : y + box, x : x + box] for y in ys for x in xs])
    centres = torch.tensor([(x + box / 2 - w // 2, y + box / 2 - h // 2) for y in ys for x in xs],
                           dtype=torch.float64)  # fmt: skip
    return tiles, centres


def tile_spectra(
    image: torch.Tensor, gradient: torch.Tensor, grid: SpectrumGrid, box: int, strips: int
) -> TiltSpectra:
    """Tile periodograms of one tilt image ``(h, w)``, averaged per strip along ``gradient``
    (``(2,)`` depth px per image px; strips only where the defocus changes across the image
    by more than a tenth of the tile) and binned on ``grid``."""
    tiles, centres = _tiles(image.double(), box)
    window = torch.hann_window(box, periodic=False, dtype=torch.float64, device=image.device)
    tiles = (tiles - tiles.mean((-2, -1), keepdim=True)) * (window[:, None] * window[None, :])
    power = torch.fft.rfft2(tiles).abs() ** 2 / box**2  # (n, box, box//2+1)
    norm = float(gradient.norm())
    along = centres @ (gradient.cpu() / norm) if norm > 1e-6 else torch.zeros(len(centres))
    n_strips = strips if norm * float(along.max() - along.min()) > 0.1 * box else 1
    if n_strips > 1:
        edges = torch.linspace(float(along.min()), float(along.max()) + 1e-6, n_strips + 1)
        label = torch.bucketize(along, edges[1:-1], right=True)
        used = label.unique()
        strip_power = torch.stack([power[label == k].mean(0) for k in used])
        position = torch.stack([along[label == k].mean() for k in used])
    else:
        strip_power, position = power.mean(0, keepdim=True), torch.zeros(1, dtype=torch.float64)
    binned, counts = grid.bin(strip_power)
    return TiltSpectra(binned, counts, position.to(torch.float64), gradient.cpu(), power.mean(0))


def _moving_average(x: torch.Tensor, width: int) -> torch.Tensor:
    """Mean over ``width`` (odd) neighbours along the last axis, shrinking at the ends."""
    width = max(1, width | 1)
    flat = x.reshape(-1, 1, x.shape[-1])
    kernel = torch.ones(1, 1, width, dtype=x.dtype, device=x.device)
    pad = width // 2
    total = torch.nn.functional.conv1d(flat, kernel, padding=pad)
    count = torch.nn.functional.conv1d(torch.ones_like(flat[:1]), kernel, padding=pad)
    return (total / count).reshape(x.shape)


@dataclass
class CtfFit:
    """One tilt's fit: defoci U >= V (Å, underfocus positive), angle of U from image x (deg,
    (-90, 90]), phase shift (deg, in [0, 180): a power spectrum cannot tell φ
    from φ + 180°), thickness along the beam (Å), the fitted defocus slope
    along the gradient (Å per px, NaN for one strip), fit resolution (Å), figure of merit,
    and whether Thon rings were found (``signal``)."""

    defocus_u: float
    defocus_v: float
    defocus_angle: float
    phase_shift: float
    thickness: float
    slope: float
    resolution: float
    figure_of_merit: float
    signal: bool


class _Fitter:
    """The normalised spectra of one tilt and the correlation of a model with them."""

    def __init__(
        self,
        spectra: TiltSpectra,
        grid: SpectrumGrid,
        optics: tuple[float, float, float],
        search: CtfSearch,
        pixel_size: float,
    ) -> None:
        self.grid, self.search = grid, search
        self.spread = pixel_size * spectra.gradient  # (2,) Å of defocus per tile pixel
        self.voltage, self.cs, self.q0 = optics
        self.lam = float(electron_wavelength_angstrom(self.voltage))
        self.power, self.all_counts = spectra.power, spectra.counts  # (K, A, R)
        self.position = spectra.position
        self.ds = float(grid.s[1] - grid.s[0])
        keep = (grid.s >= search.res_min**-2) & (grid.s <= 0.9 * grid.s[-1])
        self.columns = torch.nonzero(keep).flatten()  # bins a model is evaluated on
        self.s = grid.s[self.columns]
        self.kx, self.ky = grid.kx[:, self.columns], grid.ky[:, self.columns]
        self.counts = self.all_counts[..., self.columns]
        self.fit = self.s <= search.res_max**-2
        self.low = self.fit & (self.s <= max(search.res_max, 10.0) ** -2)
        self.data = torch.zeros_like(self.counts)
        self.tile_damping = self.in_tile(self.s)

    def in_tile(self, s: torch.Tensor) -> torch.Tensor:
        """Damping of the rings by the defocus gradient inside one tile, ``(len(s),)``: the
        mean of ``cos(2π λ δ s)`` over the tile's pixels weighted by the Hann window squared
        (what a pixel adds to the power), δ the pixel's defocus offset from the tile centre
        (exact for a linear gradient; the sine part vanishes by symmetry)."""
        n = min(self.search.box, 64)
        x = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # tile fraction, subsampled
        w = torch.sin(math.pi * x) ** 4  # Hann² along one axis
        r = (x - 0.5) * self.search.box
        offset = (self.spread[0] * r[None, :] + self.spread[1] * r[:, None]).flatten()  # Å
        weight = (w[:, None] * w[None, :]).flatten()
        phase = 2 * math.pi * self.lam * offset[:, None] * s[None, :]
        return (weight[:, None] * torch.cos(phase)).sum(0) / weight.sum()

    # --- model -------------------------------------------------------------------------
    def model(self, m: torch.Tensor, p: torch.Tensor, q: torch.Tensor, phase: torch.Tensor,
              thickness: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``-sinc(λ t s) D(s) cos 2γ`` (normalised sinc; ``D`` the in-tile damping, see
        :meth:`in_tile`) on the polar bins; parameters ``(...)`` broadcast to ``(..., A, R)``."""
        gamma = self._gamma(m, p, q, phase)
        e = (..., None, None)
        damping = torch.sinc(self.lam * thickness[e] * self.s) * self.tile_damping
        return -damping * torch.cos(2 * gamma)

    def correlation(
        self, model: torch.Tensor, data: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """Weighted correlation over the last two axes (no mean removed: both oscillate)."""
        num = (weight * data * model).sum((-2, -1))
        den = torch.sqrt((weight * data**2).sum((-2, -1)) * (weight * model**2).sum((-2, -1)))
        return num / den.clamp(min=1e-30)

    # --- steps -------------------------------------------------------------------------
    def coarse_defocus(self) -> tuple[float, float]:
        """Mean defocus (and phase shift) on the rotational average, the same moving average
        removed from data and models (step 2)."""
        w = self.all_counts.sum((0, 1))  # (R,)
        profile = (self.power * self.all_counts).sum((0, 1)) / w.clamp(min=1)
        width = max(3, self.search.bins // 32)
        d = profile - _moving_average(profile, width)
        d = d / _moving_average(d**2, 4 * width).sqrt().clamp(min=1e-30)
        defoci = torch.arange(self.search.defocus_min, self.search.defocus_max + 1,
                              self.search.defocus_step, dtype=torch.float64)  # fmt: skip
        phases = torch.arange(0.0, 180.0, 10.0 if self.search.phase_shift else 360.0,
                              dtype=torch.float64)  # fmt: skip
        mm, ph = torch.meshgrid(defoci, phases, indexing="ij")
        k, e = self.grid.s.sqrt(), (..., None)
        gamma = ctf_phase(k, 0.0, mm[e], mm[e], 0.0, self.voltage, self.cs, self.q0,
                          phase_shift_deg=ph[e])  # fmt: skip
        model = -torch.cos(2 * gamma)
        model = model - _moving_average(model, width)
        low = (self.grid.s >= self.search.res_min**-2) & (
            self.grid.s <= max(self.search.res_max, 10.0) ** -2
        )
        weight = (w * low).expand_as(model)
        score = self.correlation(model[..., None, :], d.expand_as(model)[..., None, :],
                                 weight[..., None, :])  # fmt: skip
        best = int(score.argmax())
        return float(mm.flatten()[best]), float(ph.flatten()[best])

    def normalise(self, defocus: float) -> None:
        """Background = moving average over two ring periods; residual over local RMS."""
        period = 1.0 / (self.lam * max(defocus, 1000.0))
        width = max(3, round(2 * period / self.ds))
        counts = self.all_counts
        mean = (self.power * counts).sum(1) / counts.sum(1).clamp(min=1)  # (K, R)
        background = _moving_average(mean, width)
        residual = self.power - background[:, None, :]
        rms = (residual**2 * counts).sum(1) / counts.sum(1).clamp(min=1)
        rms = _moving_average(rms, 2 * width).sqrt().clamp(min=1e-30)
        self.data = (residual / rms[:, None, :])[..., self.columns]

    def _weight(self, mask: torch.Tensor) -> torch.Tensor:
        return self.counts * mask

    def grid_astigmatism(self, m0: float, phase: float) -> tuple[float, float, float]:
        """(m, p, q) on a grid to 10 Å, thickness 0 (step 3), whole-image spectrum."""
        data = (self.data * self.counts).sum(0) / self.counts.sum(0).clamp(min=1)  # (A, R)
        half = self.search.astigmatism_max / 2
        pq = torch.arange(-half, half + 1, max(half / 10, 25.0), dtype=torch.float64)
        ms = m0 + torch.arange(-300.0, 301.0, 50.0, dtype=torch.float64)
        m, p, q = torch.meshgrid(ms, pq, pq, indexing="ij")
        keep = p**2 + q**2 <= half**2 + 1e-6
        m, p, q = m[keep], p[keep], q[keep]
        zero = torch.zeros_like(m)
        weight = self._weight(self.low)[0]
        scores = torch.cat([
            self.correlation(self.model(m[i:i + 64], p[i:i + 64], q[i:i + 64],
                                        zero[i:i + 64] + phase, zero[i:i + 64]), data, weight)
            for i in range(0, len(m), 64)
        ])  # fmt: skip
        best = int(scores.argmax())
        return float(m[best]), float(p[best]), float(q[best])

    def joint_score(self, m, p, q, phase, thickness, offsets) -> torch.Tensor:
        """Correlation over all strips, strip ``k`` modelled at ``m + offsets[k]``."""
        model = self.model(m + offsets, p, q, phase, thickness)  # (K, A, R)
        weight = self._weight(self.fit)
        num = (weight * self.data * model).sum()
        den = torch.sqrt((weight * self.data**2).sum() * (weight * model**2).sum())
        return num / den

    def refine(self, start: tuple[float, float, float, float], thickness: float,
               offsets: torch.Tensor) -> tuple[float, float, float, float]:  # fmt: skip
        """L-BFGS of (m, p, q[, phase]) maximising :meth:`joint_score`; steps of 100 Å (and
        10°) are one unit of the optimised variables."""
        base = torch.tensor(start, dtype=torch.float64)
        scale = torch.tensor([100.0, 100.0, 100.0, 10.0], dtype=torch.float64)
        free = torch.tensor([1.0, 1.0, 1.0, float(self.search.phase_shift)], dtype=torch.float64)
        y = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS([y], lr=1, max_iter=20, line_search_fn="strong_wolfe")
        t = torch.tensor(thickness, dtype=torch.float64)

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            v = base + y * scale * free
            loss = -self.joint_score(v[0], v[1], v[2], v[3], t, offsets)
            loss.backward()
            return loss

        optimiser.step(closure)
        v = (base + y * scale * free).detach()
        return float(v[0]), float(v[1]), float(v[2]), float(v[3])

    def _bands(self, m: float) -> torch.Tensor:
        """Thon-ring band (one ring period of ``|k|²`` at defocus ``m``, from res_min) of
        every evaluated bin, ``(R',)`` long."""
        period = 1.0 / (self.lam * max(m, 1000.0))
        return ((self.s - self.search.res_min**-2) / period).floor().long()

    def thickness_scores(
        self, mpq: tuple[float, float, float, float], thickness: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        """``-χ²`` for each candidate thickness along the beam (Å) ``(n,)``: the signed ring
        amplitude of every band (data against the undamped model) fitted by
        ``a · exp(-b s) · sinc(λ t s) · D(s)``, ``a`` by least squares and ``b`` on a
        grid. The free envelope keeps the signal's fall-off with resolution from passing for
        thickness: only the nodes and sign flips of the rings decide."""
        m, p, q, phase = (torch.tensor(v, dtype=torch.float64) for v in mpq)
        with torch.no_grad():
            undamped = -torch.cos(2 * self._gamma(m + offsets, p, q, phase))  # (K, A, R')
        band = self._bands(float(m))
        n = int(band.max()) + 1
        w = self.counts
        num = torch.zeros(n, dtype=torch.float64).index_add_(
            0, band, (w * self.data * undamped).sum((0, 1))
        )
        den = torch.zeros(n, dtype=torch.float64).index_add_(0, band, (w * undamped**2).sum((0, 1)))
        s_band = torch.zeros(n, dtype=torch.float64).index_add_(0, band, self.s) / torch.bincount(
            band, minlength=n
        ).clamp(min=1)
        amplitude, weight = num / den.clamp(min=1e-30), den  # noise variance of amplitude: 1/den
        decay = torch.linspace(0.0, 60.0 / float(s_band[-1]), 31, dtype=torch.float64)  # b in Å²
        shape = (
            torch.sinc(self.lam * thickness[:, None, None] * s_band)
            * self.in_tile(s_band)
            * torch.exp(-decay[None, :, None] * s_band)
        )  # (n_t, n_b, bands)
        a = (weight * amplitude * shape).sum(-1) / (weight * shape**2).sum(-1).clamp(min=1e-30)
        chi2 = (weight * (amplitude - a[..., None] * shape) ** 2).sum(-1)  # (n_t, n_b)
        return -chi2.min(1).values

    def _gamma(self, m, p, q, phase) -> torch.Tensor:
        a = torch.sqrt(p**2 + q**2 + 1e-6)
        angle = torch.rad2deg(0.5 * torch.atan2(q, p))
        e = (..., None, None)
        return ctf_phase(self.kx, self.ky, (m + a)[e], (m - a)[e], angle[e], self.voltage,
                         self.cs, self.q0, phase_shift_deg=phase[e])  # fmt: skip

    def strip_defoci(self, mpq: tuple[float, float, float, float], thickness: float,
                     span: float) -> torch.Tensor:  # fmt: skip
        """Best mean-defocus offset of each strip from ``m`` (Å, ``(K,)``) within ``±span``,
        with a parabola through the best grid point and its neighbours."""
        m, p, q, phase = mpq
        deltas = torch.arange(-span, span + 1, 25.0, dtype=torch.float64)
        t = torch.tensor(thickness, dtype=torch.float64)
        model = self.model(m + deltas, torch.tensor(p), torch.tensor(q),
                           torch.tensor(phase), t)  # (D, A, R)  # fmt: skip
        weight = self._weight(self.fit)
        scores = torch.stack([self.correlation(model, self.data[k], weight[k])
                              for k in range(len(self.data))])  # (K, D)  # fmt: skip
        best = scores.argmax(1).clamp(1, len(deltas) - 2)
        k = torch.arange(len(best))
        lo, mid, hi = scores[k, best - 1], scores[k, best], scores[k, best + 1]
        curvature = (lo - 2 * mid + hi).clamp(max=-1e-12)
        shift = (0.5 * (lo - hi) / curvature).clamp(-1, 1)
        return deltas[best] + shift * 25.0

    def ring_correlation(self, mpq, thickness: float, offsets: torch.Tensor) -> tuple[float, float]:
        """(fit resolution Å, figure of merit): per-ring correlation of data and model. The
        resolution is 999 when the figure of merit is not 5σ above noise's or no ring fits."""
        m, p, q, phase = (torch.tensor(v, dtype=torch.float64) for v in mpq)
        t = torch.tensor(thickness, dtype=torch.float64)
        with torch.no_grad():
            model = self.model(m + offsets, p, q, phase, t)
            fom = float(self.joint_score(m, p, q, phase, t, offsets))
        s = self.s
        lo = self.search.res_min**-2
        period = 1.0 / (self.lam * max(float(m), 1000.0))
        band = ((s - lo) / period).floor()
        node = (torch.sinc(self.lam * t * s) * self.tile_damping).abs() < 0.3
        weight = self.counts
        num = torch.zeros(int(band.max()) + 1, dtype=torch.float64)
        dd, mm_ = torch.zeros_like(num), torch.zeros_like(num)
        valid = band >= 0
        b = band[valid].long()
        num.index_add_(0, b, (weight * self.data * model).sum((0, 1))[valid])
        dd.index_add_(0, b, (weight * self.data**2).sum((0, 1))[valid])
        mm_.index_add_(0, b, (weight * model**2).sum((0, 1))[valid])
        corr = num / torch.sqrt(dd * mm_).clamp(min=1e-30)
        at_node = torch.zeros_like(num).index_add_(0, b, node[valid].double()) > 0
        smooth = _moving_average(corr, 3)
        bins = torch.zeros_like(num).index_add_(0, b, (weight > 0).sum((0, 1))[valid].double())
        fits = smooth >= 3.0 / torch.sqrt(bins.clamp(min=2) / 2)  # 3σ of noise's correlation
        passed = fits | at_node
        resolution = 999.0
        first = int(torch.nonzero(fits)[0]) if bool(fits.any()) else -1
        independent = float((self.counts[..., self.fit] > 0).sum()) / 2  # Hann: pairs correlate
        if fom < 5.0 / math.sqrt(max(independent, 1.0)):
            first = -1  # no more Thon-ring signal than noise gives
        if first >= 0:  # from the first ring that fits to the first that does not
            stop = first
            while stop + 1 < len(passed) and bool(passed[stop + 1]):
                stop += 1
            resolution = min(float((lo + (stop + 1) * period) ** -0.5), 999.0)
        return resolution, fom


def strip_offsets(position: torch.Tensor, gradient: torch.Tensor, pixel_size: float,
                  hand_slope: float) -> torch.Tensor:  # fmt: skip
    """Defocus offset (Å) of each strip: ``hand · slope · px · |g| · position``."""
    return hand_slope * pixel_size * float(gradient.norm()) * position


def fit_tilt(
    spectra: TiltSpectra,
    grid: SpectrumGrid,
    optics: tuple[float, float, float],
    pixel_size: float,
    search: CtfSearch,
) -> tuple[CtfFit, _Fitter, tuple[float, float, float, float]]:
    """Steps 2-3 and 5 for one tilt (flat image model, no hand yet): the fit, its fitter
    (for the series steps) and (m, p, q, phase)."""
    fitter = _Fitter(spectra, grid, optics, search, pixel_size)
    m0, phase = fitter.coarse_defocus()
    fitter.normalise(m0)
    m, p, q = fitter.grid_astigmatism(m0, phase)
    zeros = torch.zeros(len(spectra.position), dtype=torch.float64)
    mpq = fitter.refine((m, p, q, phase), 0.0, zeros)
    fitter.normalise(mpq[0])
    slope, offsets = float("nan"), zeros
    if len(spectra.position) > 2:
        for _ in range(2):  # strips' defoci, then (m, p, q) with the strips at those offsets
            slope = _strip_slope(fitter, mpq, 0.0, spectra, pixel_size)
            offsets = slope * spectra.position
            mpq = fitter.refine(mpq, 0.0, offsets)
    return _result(fitter, mpq, 0.0, offsets, slope), fitter, mpq


def _strip_slope(fitter: _Fitter, mpq, thickness: float, spectra: TiltSpectra,
                 pixel_size: float) -> float:  # fmt: skip
    """Defocus slope along the gradient (Å per px): the strips' defoci (at ``thickness``
    along the beam, Å) regressed on their positions; NaN with fewer than 3 strips."""
    if len(spectra.position) < 3:
        return float("nan")
    span = pixel_size * float(spectra.gradient.norm()) * float(spectra.position.abs().max())
    deltas = fitter.strip_defoci(mpq, thickness, 1.5 * span + 200.0)
    x = spectra.position - spectra.position.mean()
    return float((x * (deltas - deltas.mean())).sum() / (x**2).sum())


def _result(fitter: _Fitter, mpq, thickness: float, offsets: torch.Tensor, slope: float) -> CtfFit:
    m, p, q, phase = mpq
    a = math.hypot(p, q)
    resolution, fom = fitter.ring_correlation(mpq, thickness, offsets)
    angle = 0.5 * math.degrees(math.atan2(q, p))
    return CtfFit(
        defocus_u=m + a, defocus_v=m - a, defocus_angle=angle if angle > -90 else angle + 180,
        phase_shift=phase % 180.0, thickness=thickness, slope=slope, resolution=resolution,
        figure_of_merit=fom, signal=resolution < 999.0,
    )  # fmt: skip


def series_hand(slopes: np.ndarray, gradients: np.ndarray, pixel_size: float,
                usable: np.ndarray) -> tuple[int, float, float]:  # fmt: skip
    """Hand from per-tilt defocus slopes along the gradient (Å/px) against the expected
    ``px · |g_f|``: least-squares coefficient β (= hand · rlnTomoDefocusSlope), its standard
    error, and the hand ``sign(β)`` (0 when no tilt had strips)."""
    x = pixel_size * np.linalg.norm(gradients, axis=1)
    ok = usable & np.isfinite(slopes) & (x > 0)
    if ok.sum() < 2:
        return 0, float("nan"), float("nan")
    x, y = x[ok], slopes[ok]
    beta = float((x * y).sum() / (x**2).sum())
    residual = y - beta * x
    se = float(np.sqrt((residual**2).sum() / max(len(x) - 1, 1) / (x**2).sum()))
    return (1 if beta > 0 else -1), beta, se


def series_thickness(scores: np.ndarray, candidates_nm: np.ndarray) -> float:
    """Slab thickness (nm): the candidate maximising the summed per-tilt scores
    ``(tilts, candidates)`` (each tilt evaluated at ``T · slab_depth_factor``)."""
    return float(candidates_nm[int(np.nanargmax(np.nansum(scores, axis=0)))])


def refine_central(fitter: _Fitter, mpq, thickness: float, offsets: torch.Tensor,
                   slope: float) -> tuple[CtfFit, tuple[float, float, float, float]]:  # fmt: skip
    """Step 6: (m, p, q) on all strips at their offsets, at the series' thickness."""
    mpq = fitter.refine(mpq, thickness, offsets)
    return _result(fitter, mpq, thickness, offsets, slope), mpq


def diagnostic_image(fitter: _Fitter, spectra: TiltSpectra, mpq, thickness: float,
                     pixel_size: float, box: int) -> torch.Tensor:  # fmt: skip
    """CTFFIND-style diagnostic ``(box, box)`` float32, centred (``box//2`` is frequency 0):
    left half the whole image's spectrum less its background (rotational moving average),
    scaled to its mean absolute value; right half the fitted model."""
    ky = torch.fft.fftfreq(box, pixel_size, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(box, pixel_size, dtype=torch.float64)[None, :]
    s = kx**2 + ky**2
    mean = spectra.mean.double()
    binned, counts = fitter.grid.bin(mean)
    radial = (binned * counts).sum(0) / counts.sum(0).clamp(min=1)
    width = max(3, round(2 / (fitter.lam * max(mpq[0], 1000.0)) / fitter.ds))
    background = np.interp(s.numpy(), fitter.grid.s.numpy(), _moving_average(radial, width).numpy())
    data = mean - torch.from_numpy(background)
    data = (data / data.abs().mean().clamp(min=1e-30)).clamp(-3, 3) / 3
    m, p, q, phase = (torch.tensor(v, dtype=torch.float64) for v in mpq)
    a = torch.sqrt(p**2 + q**2)
    gamma = ctf_phase(kx, ky, m + a, m - a, torch.rad2deg(0.5 * torch.atan2(q, p)),
                      fitter.voltage, fitter.cs, fitter.q0, phase_shift_deg=phase)  # fmt: skip
    model = -torch.sinc(fitter.lam * thickness * s) * torch.cos(2 * gamma)
    half = box // 2
    image = torch.zeros(box, box, dtype=torch.float64)
    image[:, half:] = torch.fft.fftshift(model, dim=0)[:, : box - half]  # kx >= 0
    # kx < 0 from the Friedel mate (-kx, -ky): row ky -> -ky, column x -> -x
    mirror = torch.fft.fftshift(data.flip(0).roll(1, 0), dim=0)
    image[:, :half] = mirror[:, 1 : half + 1].flip(1)
    return image.float()


@dataclass
class SeriesFit:
    """A tilt series' CTF: per-tilt fits (table row order; ``None`` for a tilt without
    signal), the hand from the defocus gradient (±1, 0 when undetermined) with β (=
    hand · slope) and its standard error, the slab thickness (nm, NaN when not fitted) and
    each tilt's diagnostic image (``None`` without signal)."""

    fits: list[CtfFit | None]
    hand: int
    hand_beta: float
    hand_error: float
    thickness_nm: float
    diagnostics: list[torch.Tensor | None]


def estimate_series(
    images: Callable[[int], torch.Tensor],
    rotations: torch.Tensor,
    optics: tuple[float, float, float],
    pixel_size: float,
    search: CtfSearch,
    *,
    progress: Callable[[int], None] | None = None,
    device: torch.device | str = "cpu",
) -> SeriesFit:
    """Steps 1-7 for one tilt series: ``images(f)`` returns tilt ``f`` ``(h, w)``;
    ``rotations`` ``(t, 3, 3)`` (:func:`subtomo.tilt.table_rotations`). A tilt whose image is
    constant, or whose spectrum shows no Thon ring above the noise, has no fit."""
    device = torch.device(device)
    grid = SpectrumGrid.build(search.box, pixel_size, search.sectors, search.bins, device)
    gradients = depth_gradient(rotations)  # (t, 2)
    factors = slab_depth_factor(rotations)  # (t,)
    n = len(rotations)
    first: list[tuple[CtfFit, _Fitter, tuple, TiltSpectra] | None] = []
    for f in range(n):
        image = images(f).to(device)
        if float(image.std()) == 0.0:
            first.append(None)
        else:
            spectra = tile_spectra(image, gradients[f].to(device), grid, search.box, search.strips)
            fit, fitter, mpq = fit_tilt(spectra, grid, optics, pixel_size, search)
            first.append((fit, fitter, mpq, spectra) if fit.signal else None)
        if progress is not None:
            progress(1)
    usable = np.array([r is not None and abs(float(np.degrees(np.arccos(min(1.0, 1 / float(
        factors[f])))))) >= 15.0 for f, r in enumerate(first)])  # fmt: skip
    slopes = np.array([r[0].slope if r is not None else np.nan for r in first])
    thickness_nm = float("nan")
    candidates = np.arange(0.0, search.thickness_max_nm + 1e-6, 5.0)
    fitted = search.thickness and any(r is not None for r in first)
    for _ in range(2 if fitted else 0):  # the gradient and the thickness inform each other
        hand = series_hand(slopes, gradients.numpy(), pixel_size, usable)[0]
        scores = np.full((n, len(candidates)), np.nan)
        for f, r in enumerate(first):
            if r is not None:
                offsets = strip_offsets(r[3].position, r[3].gradient, pixel_size, float(hand))
                along_beam = torch.tensor(candidates * 10.0 * float(factors[f]))
                scores[f] = r[1].thickness_scores(r[2], along_beam, offsets).numpy()
        thickness_nm = series_thickness(scores, candidates)
        for f, r in enumerate(first):  # defocus and slope at the thickness found
            if r is not None:
                along = thickness_nm * 10.0 * float(factors[f])
                offsets = strip_offsets(r[3].position, r[3].gradient, pixel_size, float(hand))
                mpq = r[1].refine(r[2], along, offsets)
                first[f] = (r[0], r[1], mpq, r[3])
                slopes[f] = _strip_slope(r[1], mpq, along, r[3], pixel_size)
    hand, beta, error = series_hand(slopes, gradients.numpy(), pixel_size, usable)
    offsets = [strip_offsets(r[3].position, r[3].gradient, pixel_size, float(hand))
               if r is not None else None for r in first]  # fmt: skip
    fits: list[CtfFit | None] = []
    diagnostics: list[torch.Tensor | None] = []
    for f, r in enumerate(first):
        if r is None:
            fits.append(None)
            diagnostics.append(None)
            continue
        along = 0.0 if math.isnan(thickness_nm) else thickness_nm * 10.0 * float(factors[f])
        fit, mpq = refine_central(r[1], r[2], along, offsets[f], float(slopes[f]))
        fits.append(fit)
        diagnostics.append(diagnostic_image(r[1], r[3], mpq, along, pixel_size, search.box))
    return SeriesFit(fits, hand, beta, error, thickness_nm, diagnostics)
