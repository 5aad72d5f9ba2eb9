"""Putting a reference on the data's grey scale (for references not on absolute grey scale)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from subtomo.ml.batch import ParticleBatch, fourier_points
from subtomo.ml.estep import slice_matrices
from subtomo.ml.likelihood import centred_data
from subtomo.ml.projector import Projector
from subtomo.ml.sampling import translation_grid

__all__ = ["fit_reference_scale"]


def fit_reference_scale(
    references: torch.Tensor,
    batches: Iterable[ParticleBatch],
    sigma2: torch.Tensor,
    *,
    box: int,
    pixel_size: float,
    resolution_angst: float,
    offset_range_angst: float = 0.0,
    offset_step_angst: float = 1.0,
    padding: float = 2.0,
    device: torch.device | str = "cpu",
) -> float:
    """Least-squares scale ``s = argmin sum |Y - s CTF2 P|^2 / sigma2`` of ``references``
    ``(K, n, n, n)`` to premultiplied data ``Y``, up to ``resolution_angst``.

    Each particle is taken at its current rotation and class and at its best offset on a
    grid of ``offset_range_angst``/``offset_step_angst`` around its current offset (so picking
    errors of a few pixels do not bias the scale towards zero). This replaces RELION's
    first-iteration cross-correlation; NaN when the data carry no signal to fit.
    """
    points = fourier_points(box, max(1, round(box * pixel_size / resolution_angst)), device)
    projector = Projector(references.to(device), padding)
    deltas = torch.zeros(1, 3, dtype=torch.float64)
    if offset_range_angst > 0:
        deltas = translation_grid(offset_range_angst, offset_step_angst)
    num = den = 0.0
    for batch in batches:
        batch = batch.to(device)
        mats = slice_matrices(batch.tilt_rotations.double(), batch.rotations.double()[:, None])
        inv_s2 = 1.0 / sigma2.to(device)[batch.optics_group][:, points.shell]  # (b, K)
        offsets = batch.offsets.double()[:, None] + deltas.to(device)[None]  # (b, T, 3)
        y = centred_data(points.gather(batch.data), batch.tilt_rotations, offsets, points,
                         pixel_size)  # fmt: skip
        c2 = points.gather(batch.ctf2)
        for c in batch.classes.unique().tolist():
            sel = batch.classes == c
            p = projector.slices(c, mats[sel][:, 0], points)  # (m, f, K)
            w = c2[sel] * inv_s2[sel][:, None]  # (m, f, K)
            cross = ((y[sel].conj() * p[:, None]).real * w[:, None]).sum(dim=(2, 3))  # (m, T)
            num += float(cross.amax(dim=1).sum())
            den += float((c2[sel] * p.abs() ** 2 * w).sum())
    return num / den if den > 0 else float("nan")
