"""Particle motion across tilts with RELION's Gaussian-process prior (§24).

A particle's trajectory ``t_f`` (Å, tomogram axes, motion.star §3) is zero at the first tilt
acquired and the cumulative sum of one 3D velocity per later tilt, in acquisition (dose)
order. The velocities of the ``n`` particles of a tilt series in one step are correlated by
their distance: ``cov(v_a, v_b) = σ_k² · k(|p_a - p_b|)`` with ``k(d) = exp(-d/σ_d)``
(RELION's default) or ``exp(-d²/(2σ_d²))`` (``--sq_exp_ker``), ``σ_k = s_vel · ΔD_k`` for a
step receiving ``ΔD_k`` e/Å² (``--s_vel`` in Å per e/Å², ``--s_div`` = σ_d in Å). Velocities
are written in the kernel's eigenbasis, ``v = σ_k · B c`` with ``B Bᵀ = K``, so the prior on
the coefficients ``c`` is a unit Gaussian: ``-log p = ½ Σ c²``.
"""

from __future__ import annotations

import torch

__all__ = ["gp_basis", "gp_kernel", "motion_steps", "trajectories_from_velocities"]


def gp_kernel(positions_angst: torch.Tensor, s_div: float, sq_exp: bool = False) -> torch.Tensor:
    """``(n, n)`` correlation of the velocities of particles at ``(n, 3)`` positions (Å)."""
    d = torch.cdist(positions_angst.double(), positions_angst.double())
    if s_div <= 0:
        return torch.eye(len(d), dtype=torch.float64, device=d.device)
    return torch.exp(-0.5 * (d / s_div) ** 2) if sq_exp else torch.exp(-d / s_div)


def gp_basis(
    positions_angst: torch.Tensor, s_div: float, sq_exp: bool = False, max_ed: int = -1
) -> torch.Tensor:
    """``(n, m)`` basis ``B`` with ``B Bᵀ ≈ K`` (:func:`gp_kernel`): eigenvectors scaled by the
    square roots of their eigenvalues, largest first; ``max_ed > 0`` keeps that many."""
    values, vectors = torch.linalg.eigh(gp_kernel(positions_angst, s_div, sq_exp))
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    keep = int(max_ed) if 0 < max_ed < len(values) else len(values)
    return vectors[:, :keep] * values[:keep].sqrt()


def motion_steps(pre_exposure: torch.Tensor, s_vel: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Acquisition order ``(t,)`` (table rows sorted by pre-exposure) and the σ ``(t-1,)`` in Å
    of the velocity into each later tilt: ``s_vel`` times the dose received in between."""
    order = torch.argsort(pre_exposure.double(), stable=True)
    dose = pre_exposure.double()[order]
    return order, s_vel * (dose[1:] - dose[:-1]).clamp_min(0.0)


def trajectories_from_velocities(velocities: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``(n, t, 3)`` trajectories in table-row order from ``(n, t-1, 3)`` velocities of the
    steps in acquisition ``order``: zero at the first tilt acquired, then cumulative sums."""
    n = velocities.shape[0]
    cumulative = torch.cat([velocities.new_zeros(n, 1, 3), velocities.cumsum(1)], dim=1)
    out = torch.empty_like(cumulative)
    out[:, order] = cumulative
    return out
