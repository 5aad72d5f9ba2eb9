"""Putting a reference on the data's grey scale (for references not on absolute grey scale)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from subtomo.ml.batch import ParticleBatch, fourier_points
from subtomo.ml.likelihood import shifted_data
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
    max_elements: int = 1 << 22,
) -> float:
    """Least-squares scale ``s = argmin sum |Y - s CTF2 P|^2 / sigma2`` of ``references``
    ``(K, n, n, n)`` to premultiplied data ``Y``, up to ``resolution_angst``.

    Each particle is taken at its current rotation and class and at its best offset on a
    grid of ``offset_range_angst``/``offset_step_angst`` around its current offset (so picking
    errors of a few pixels do not bias the scale towards zero). This replaces RELION's
    first-iteration cross-correlation; NaN when the data carry no signal to fit. The data are
    shifted (:func:`subtomo.ml.likelihood.shifted_data`) about ``max_elements`` values at
    a time.
    """
    points = fourier_points(box, max(1, round(box * pixel_size / resolution_angst)), device)
    projector = Projector(references.to(device), padding)
    deltas = torch.zeros(1, 3, dtype=torch.float64)
    if offset_range_angst > 0:
        deltas = translation_grid(offset_range_angst, offset_step_angst)
    plane = deltas.shape[0] * 2 * points.flat.numel()
    num = den = 0.0
    for batch in batches:
        batch = batch.to(device)
        inv_s2 = 1.0 / sigma2.to(device)[batch.optics_group][:, points.shell]  # (b, K)
        c2 = points.gather(batch.ctf2)
        w = c2 * inv_s2[:, None].to(c2.dtype)  # (b, f, K) CTF2 / sigma2
        y = points.gather(batch.data) * w
        offsets = batch.offsets.double()[:, None] + deltas.to(device)[None]  # (b, T, 3)
        mats = batch.tilt_rotations.double() @ batch.rotations.double()[:, None]  # (b, f, 3, 3)
        per = max(1, max_elements // (plane * batch.data.shape[1]))
        for c in batch.classes.unique().tolist():
            for sel in torch.nonzero(batch.classes == c)[:, 0].split(per):
                p = projector.sample_planes(c, mats[sel], points)  # (m, 2, f, K)
                shifted = shifted_data(y[sel], batch.tilt_rotations[sel], offsets[sel], points,
                                       pixel_size)  # fmt: skip
                planes = p.permute(0, 2, 3, 1).reshape(len(sel), -1, 1)  # (m, f K 2, 1)
                cross = (torch.view_as_real(shifted).flatten(2) @ planes)[..., 0]  # (m, T)
                num += float(cross.amax(dim=1).sum())
                den += float((c2[sel] * w[sel] * p.square().sum(1)).sum())
    return num / den if den > 0 else float("nan")
