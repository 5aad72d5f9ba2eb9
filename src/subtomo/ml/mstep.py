"""M-step: probability-weighted sums over the significant poses, then the model update.

For each particle and significant (class c, rotation j) the data are summed over offsets
``D_cj = sum_t w_cjt Y e^{2 pi i k.s_t}`` (one batched matmul) and inserted with weight
``W_cj CTF2`` (``W_cj = sum_t w_cjt``) at ``M = R_f A_sub A_j``, both divided by ``sigma2``
as RELION does, into per-class Fourier accumulators. The MAP reconstruction is then
``V = sum D / sigma2 / (sum W CTF2 / sigma2 + 1 / (T tau2))`` (relion5-conventions §7.1).

The noise spectrum comes from the premultiplied residuals at the weighted poses,
``sigma2 = sum w |Y_t - CTF2 P|^2 / (2 sum w CTF2)`` per optics group and shell (unbiased:
``E|Y - CTF2 P|^2 = 2 CTF2 sigma2``). The offset prior width is
``sqrt(sum w |delta|^2 / (3 sum w))`` (3D offsets, §7.1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from subtomo.fourier import radial_average
from subtomo.ml.batch import FourierPoints, ParticleBatch
from subtomo.ml.estep import EStepResult, slice_matrices
from subtomo.ml.likelihood import shift_phases
from subtomo.ml.projector import Projector
from subtomo.ml.sampling import PoseGrid
from subtomo.reconstruct import FourierAccumulator

__all__ = [
    "MStepSums",
    "accumulate",
    "initial_sigma2",
    "ssnr_from_fsc",
    "weight_spectrum",
]


@dataclass
class MStepSums:
    """Sums of one iteration (add batches, then all-reduce across ranks).

    ``accumulators`` one :class:`FourierAccumulator` per class; ``sigma2_num``/``sigma2_den``
    ``(G, n//2+1)``; ``class_weight`` ``(C,)``; ``offset2``/``offset_weight``: summed
    ``w |delta|^2`` and ``w``; ``log_likelihood`` and ``pmax``: sums over particles;
    ``n_particles``.
    """

    accumulators: list[FourierAccumulator]
    sigma2_num: torch.Tensor
    sigma2_den: torch.Tensor
    class_weight: torch.Tensor
    offset2: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    offset_weight: torch.Tensor = field(
        default_factory=lambda: torch.zeros((), dtype=torch.float64)
    )
    log_likelihood: torch.Tensor = field(
        default_factory=lambda: torch.zeros((), dtype=torch.float64)
    )
    pmax: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    n_particles: int = 0

    @classmethod
    def empty(
        cls,
        n_classes: int,
        n_groups: int,
        box: int,
        padding: float,
        device: torch.device | str | None,
    ) -> MStepSums:
        return cls(
            accumulators=[FourierAccumulator(box, padding, device) for _ in range(n_classes)],
            sigma2_num=torch.zeros(n_groups, box // 2 + 1, dtype=torch.float64, device=device),
            sigma2_den=torch.zeros(n_groups, box // 2 + 1, dtype=torch.float64, device=device),
            class_weight=torch.zeros(n_classes, dtype=torch.float64, device=device),
        )

    def all_reduce(self) -> None:
        """Sum every statistic over torch.distributed ranks (no-op when not initialised)."""
        for acc in self.accumulators:
            acc.all_reduce()
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return
        for name in ("sigma2_num", "sigma2_den", "class_weight"):
            dist.all_reduce(getattr(self, name))
        scalars = torch.stack(
            [
                self.offset2,
                self.offset_weight,
                self.log_likelihood,
                self.pmax,
                torch.tensor(float(self.n_particles), dtype=torch.float64),
            ]
        ).to(self.class_weight.device)
        dist.all_reduce(scalars)
        self.offset2, self.offset_weight, self.log_likelihood, self.pmax = scalars[:4].cpu()
        self.n_particles = round(float(scalars[4]))


def _significant(
    w: torch.Tensor, limit: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
    """Significant ``(particle, rotation, offset)`` triples of weights ``(b, J, T)``.

    Returns the triples ``(n, 3)`` (particle-major, so each pair's triples are consecutive),
    the ``(particle, rotation)`` pairs ``(m, 2)``, the pair of each triple ``(n,)`` and chunks
    ``(pair0, pair1, triple0, triple1)`` of whole pairs with about ``limit`` triples each.
    """
    tri = torch.nonzero(w > 0)
    pair = tri[:, 0] * w.shape[1] + tri[:, 1]
    ids, inverse, counts = torch.unique_consecutive(pair, return_inverse=True, return_counts=True)
    pairs = torch.stack([ids // w.shape[1], ids % w.shape[1]], 1)
    ends = torch.cumsum(counts, 0).tolist()
    chunks, p0, t0 = [], 0, 0
    for p, end in enumerate(ends):
        if end - t0 >= limit or p == len(ends) - 1:
            chunks.append((p0, p + 1, t0, end))
            p0, t0 = p + 1, end
    return tri, pairs, inverse, chunks


def accumulate(
    sums: MStepSums,
    batch: ParticleBatch,
    projector: Projector,
    poses: PoseGrid,
    result: EStepResult,
    data: torch.Tensor,
    weights: torch.Tensor,
    sigma2: torch.Tensor,
    points: FourierPoints,
    pixel_size: float,
    *,
    max_elements: int = 1 << 22,
) -> None:
    """Add one batch to ``sums``.

    ``data`` ``(b, f, K)`` unmasked premultiplied images at ``points``; ``weights``
    ``(b, f, K)`` ``CTF2``; ``sigma2`` ``(G, n//2+1)`` current noise spectra. Only the
    significant (particle, rotation, offset) triples are shifted (``Y e^{2 pi i k.s}``,
    :func:`subtomo.ml.likelihood.shift_phases`), about ``max_elements / (f K)`` at a time.
    """
    w = result.weights  # (b, C, J, T)
    b, n_cls = w.shape[:2]
    f, k = data.shape[1], data.shape[2]
    real = data.real.dtype
    group = batch.optics_group
    inv_s2 = 1.0 / sigma2[group][:, points.shell].to(weights.dtype)  # (b, K)
    y2 = data.abs() ** 2  # (b, f, K): |Y| does not depend on the offset
    num = torch.zeros(sigma2.shape[0], k, dtype=torch.float64, device=w.device)  # (G, K)
    den = torch.zeros_like(num)
    tilts = batch.tilt_rotations.double()
    for c in range(n_cls):
        tri, pairs, inverse, chunks = _significant(w[:, c], max(1, max_elements // (f * k)))
        for a, z, t0, t1 in chunks:
            tp, tj, tt = tri[t0:t1].unbind(1)
            # one phasor per distinct (particle, offset): rotations share their offsets
            key = tp * poses.offsets.shape[1] + poses.offset_index(tj, tt)
            keys, which = torch.unique(key, return_inverse=True)
            up = keys // poses.offsets.shape[1]
            off = poses.offsets[up, keys % poses.offsets.shape[1]][:, None]
            phase = shift_phases(tilts[up], off, points, pixel_size, real)[:, 0]
            # a pair's triples share its particle: sum their weighted phasors, then multiply
            # by the particle's data once per pair
            phasors = torch.polar(torch.ones_like(phase), phase)[which]
            phasors *= w[tp, c, tj, tt].to(real)[:, None, None]
            pi, ji = pairs[a:z].unbind(1)
            d = phasors.new_zeros(z - a, f, k).index_add_(0, inverse[t0:t1] - a, phasors)
            d *= data[pi]
            wm = w[pi, c, ji].to(real).sum(-1)[:, None, None]  # (m, 1, 1)
            rot = poses.rotations[pi if poses.rotations.shape[0] > 1 else 0 * pi, ji]
            mats = slice_matrices(tilts[pi], rot[:, None])[:, 0]  # (m, f, 3, 3)
            p = projector.slices(c, mats, points).to(d.dtype)  # (m, f, K)
            ctf2 = weights[pi]
            # residual statistics for sigma2 (premultiplied residual of each pose)
            res = (
                wm * y2[pi]
                - 2 * ctf2 * (d.conj() * p).real
                + wm * ctf2**2 * (p.real**2 + p.imag**2)
            )
            num.index_add_(0, group[pi], res.sum(1).double())
            den.index_add_(0, group[pi], (2 * wm * ctf2).sum(1).double())
            # probability-weighted insertion of the visible tilts
            v = batch.visible[pi]  # (m, f)
            inv = inv_s2[pi][:, None, :]
            sums.accumulators[c].insert(
                points.scatter((d * inv)[v]),
                points.scatter((wm * ctf2 * inv)[v]),
                mats[v].float(),
                max_radius=int(points.shell.max()) + 1,
            )
        sums.class_weight[c] += w[:, c].sum()
    sums.sigma2_num.index_add_(1, points.shell, num)
    sums.sigma2_den.index_add_(1, points.shell, den)
    j_all = torch.arange(poses.n_rot, device=w.device)[:, None]
    t_all = torch.arange(poses.n_trans, device=w.device)[None]
    delta2 = (poses.deltas**2).sum(-1)[:, poses.offset_index(j_all, t_all)]  # (b, J, T)
    sums.offset2 += (w.sum(1) * delta2).sum().cpu()
    sums.offset_weight += w.sum().cpu()
    sums.log_likelihood += result.log_evidence.sum().cpu()
    sums.pmax += result.pmax.sum().cpu()
    sums.n_particles += b


def weight_spectrum(acc: FourierAccumulator) -> torch.Tensor:
    """Mean reconstruction weight per shell of the original box ``(n//2+1,)``.

    The padded accumulator's mean weight times ``padding^3`` (RELION's oversampling
    correction), so that it is in the units of one unpadded voxel.
    """
    w = acc.weight.double()
    size = w.shape[-2]
    box = acc.box
    mean = radial_average(w, (size, size, size))  # shells of the padded grid
    shells = torch.arange(box // 2 + 1, device=w.device)
    padded = torch.round(shells * size / box).long().clamp(max=mean.shape[-1] - 1)
    return mean[padded] * (size / box) ** 3


def ssnr_from_fsc(fsc: torch.Tensor, tau2_fudge: float) -> torch.Tensor:
    """``T FSC/(1-FSC)`` with the FSC clamped to [0.001, 0.999] (gold-standard, §7.1)."""
    f = fsc.double().clamp(0.001, 0.999)
    return tau2_fudge * f / (1 - f)


def initial_sigma2(batches: Iterable[ParticleBatch], n_groups: int, box: int) -> torch.Tensor:
    """Starting noise spectra ``(G, n//2+1)``: ``sum |Y|^2 / (2 sum CTF2)`` per group and shell.

    An upper bound (it includes the signal power), as RELION's average power spectrum.
    Shells without any CTF weight take the largest estimate of their group.
    """
    num = torch.zeros(n_groups, box // 2 + 1, dtype=torch.float64)
    den = torch.zeros_like(num)
    for batch in batches:
        p2 = radial_average((batch.data.abs() ** 2).sum(1).double(), (box, box))  # (b, S)
        c2 = radial_average(batch.ctf2.sum(1).double(), (box, box))
        g = batch.optics_group.cpu()
        num.index_add_(0, g, p2.cpu())
        den.index_add_(0, g, 2 * c2.cpu())
    out = num / den.clamp(min=1e-30)
    fallback = torch.where(den > 0, out, 0.0).amax(dim=1, keepdim=True).clamp(min=1e-30)
    return torch.where(den > 0, out, fallback)
