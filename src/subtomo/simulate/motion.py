"""Simulated particle motion across tilts, drawn from the frame-alignment prior (§24)."""

from __future__ import annotations

import numpy as np
import torch

from subtomo.tomorefine.motion import gp_basis, motion_steps, trajectories_from_velocities

__all__ = ["particle_motion"]


def particle_motion(
    rng: np.random.Generator,
    positions_angst: np.ndarray,
    pre_exposure: np.ndarray,
    s_vel: float,
    s_div: float,
) -> np.ndarray:
    """``(n, t, 3)`` trajectories in Å (tomogram axes, table-row order, motion.star §3).

    One draw of :mod:`subtomo.tomorefine.motion`'s Gaussian process: velocities of σ
    ``s_vel`` Å per e/Å² of dose between tilts, correlated over the distance between
    particles with the exponential kernel of length ``s_div`` Å; zero at the first tilt.
    """
    order, sigma = motion_steps(torch.as_tensor(pre_exposure, dtype=torch.float64), s_vel)
    basis = gp_basis(torch.as_tensor(positions_angst, dtype=torch.float64), s_div)
    coeffs = torch.as_tensor(rng.normal(size=(basis.shape[1], len(sigma), 3)))
    velocities = torch.einsum("nm,msk->nsk", basis, coeffs) * sigma[None, :, None]
    return trajectories_from_velocities(velocities, order).numpy()
