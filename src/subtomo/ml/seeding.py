"""First-iteration classes from the data: k-means on the leading principal components of the
particles' low-resolution residuals against the reference.

RELION starts a K-class run from random subsets. Their references differ by noise only, and
at low SNR every particle then keeps the class it was dealt: its own noise in its class's
reference outweighs the small difference between the species (the self term that
:func:`subtomo.ml.engine.self_term_scores` removes later). Here iteration 1 instead starts
from classes in which the species already differ. Each particle's residual
``(Y - CTF2 P) / sigma2`` at its current pose, up to ``resolution_angst``, is binned into a
small 3D Fourier grid in the reference frame (nearest voxel of ``M^T k``; Friedel mates
added); the grid's covariance over all particles gives the principal directions, and
k-means on the first ``K - 1`` component scores gives the classes. Two passes over the
particles keep memory at one batch plus the ``D x D`` covariance (``D <= 15^3 + 1``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from subtomo.ml.batch import ParticleBatch, fourier_points
from subtomo.ml.estep import slice_matrices
from subtomo.ml.likelihood import centred_data
from subtomo.ml.projector import Projector

__all__ = ["pca_classes", "residual_features"]

_MAX_RADIUS = 7  # grid of at most 15^3 voxels; finer resolutions are binned onto it


def residual_features(
    projector: Projector,
    sigma2: torch.Tensor,
    batch: ParticleBatch,
    resolution_angst: float,
) -> torch.Tensor:
    """``(b, D)`` float64 low-resolution residuals of ``batch`` against the projector's map.

    Real and imaginary parts of the Friedel-symmetric half of a ``G^3`` Fourier grid
    (``G = 2 R + 1``, ``R = min(round(n px / resolution), 7)``), in units of ``1/sigma2``
    (``sigma2`` ``(G, n//2+1)`` noise spectra).
    """
    n, px = batch.box, batch.pixel_size
    shell = max(1, round(n * px / resolution_angst))
    radius = min(shell, _MAX_RADIUS)
    g = 2 * radius + 1
    points = fourier_points(n, shell, batch.data.device)
    data = points.gather(batch.data)
    ctf2 = points.gather(batch.ctf2)
    inv_s2 = (1.0 / sigma2.to(data.device)[batch.optics_group][:, points.shell]).to(ctf2.dtype)
    tilts = batch.tilt_rotations.double()
    centred = centred_data(data, tilts, batch.offsets[:, None].to(tilts), points, px)[:, 0]
    mats = slice_matrices(tilts, batch.rotations.double()[:, None])[:, 0]  # (b, f, 3, 3)
    planes = projector.slices(0, mats, points).to(data.dtype)
    resid = (centred - ctf2 * planes) * inv_s2[:, None, :] * batch.visible[:, :, None]
    k3 = torch.zeros(*mats.shape[:2], points.freq.shape[0], 3, dtype=torch.float64,
                     device=data.device)  # fmt: skip
    k3[..., :2] = points.freq.double() * n
    xyz = torch.einsum("bfij,bfki->bfkj", mats, k3) * (radius / shell)  # M^T k, grid units
    idx = torch.round(xyz).long() + radius
    inside = ((idx >= 0) & (idx < g)).all(-1)
    flat = torch.where(inside, (idx[..., 2] * g + idx[..., 1]) * g + idx[..., 0], 0)
    resid = torch.where(inside, resid, 0)
    b = batch.size
    rows = (torch.arange(b, device=data.device) * g**3)[:, None, None]
    grid = resid.new_zeros(b * g**3).index_add_(0, (flat + rows).flatten(), resid.flatten())
    grid = grid.view(b, g**3)
    grid = grid + grid.view(b, g, g, g).flip(1, 2, 3).reshape(b, -1).conj()
    half = grid[:, : (g**3 + 1) // 2]
    return torch.cat([half.real, half.imag], 1).double()


def pca_classes(
    reference: torch.Tensor,
    sigma2: torch.Tensor,
    batches: Callable[[], Iterable[ParticleBatch]],
    n_particles: int,
    n_classes: int,
    resolution_angst: float,
    *,
    padding: float = 2.0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """0-based classes ``(N,)`` for iteration 1 (module docstring); ``batches()`` is read twice.

    ``reference`` ``(n, n, n)`` on the data's grey scale and *not* low-passed below
    ``resolution_angst`` (a filtered reference leaves the same residual in every particle and
    hides the species); ``sigma2`` ``(G, n//2+1)``. Components: the ``K - 1`` leading
    eigenvectors of the feature covariance; k-means (k-means++ start, ``seed``) on the
    particles' scores. Particles are indexed by ``batch.index``.
    """
    device = torch.device(device) if device is not None else reference.device
    projector = Projector(reference[None].to(device), padding)
    total = mean = cov = None
    for batch in batches():
        f = residual_features(projector, sigma2, batch.to(device), resolution_angst)
        if cov is None:
            total = 0
            mean = torch.zeros(f.shape[1], dtype=torch.float64, device=device)
            cov = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=device)
        total += f.shape[0]
        mean += f.sum(0)
        cov += f.T @ f
    mean /= total
    cov = cov / total - torch.outer(mean, mean)
    m = max(1, n_classes - 1)
    axes = torch.linalg.eigh(cov)[1][:, -m:]  # (D, m), largest eigenvalues last
    scores = torch.zeros(n_particles, m, dtype=torch.float64)
    for batch in batches():
        f = residual_features(projector, sigma2, batch.to(device), resolution_angst)
        scores[batch.index.cpu()] = ((f - mean) @ axes).cpu()
    _, labels = kmeans2(scores.numpy(), n_classes, minit="++", seed=np.random.default_rng(seed))
    return torch.from_numpy(labels.astype(np.int64))
