"""Pose scores of premultiplied tilt images as dense matrix products.

For a particle with premultiplied tilt images ``Y_f = CTF_f w_f X_f`` (weights
``CTF2_f = (CTF_f w_f)^2``) and noise spectrum ``sigma2`` (per real/imaginary part), the
log-likelihood of a pose (class c, rotation A, 3D offset o) is, up to a pose-independent
constant, the Gaussian likelihood of the recorded images ``X_f = CTF_f w_f P_f + noise``::

    S = sum_f sum_k [Re(conj(Y_f e^{2 pi i k.s_f}) P_f) - CTF2_f |P_f|^2 / 2] / sigma2(|k|)

with ``P_f = F_c(M_f^T k)`` the central slice at ``M_f = R_f A_sub A`` and ``s_f = -[R_f A_sub
o]_xy / px`` the particle centre in tilt f (pixels from the box centre, §1.3).

The engine contracts complex values as real pairs: per tilt, the real and the imaginary
parts of a particle's shifted data ``(T, K)`` and of its slices ``(J, K)`` give the first terms
as real matrix products ``(T, K) @ (K, J)``, summed over tilts and parts (the slices stay in
the ``(f, 2, J, K)`` layout the projector samples them in); the second term is
``(J, K) @ (K, 1)`` on ``|P|^2`` per tilt; slices shared by a batch (global searches, same
tilt geometry) stack the particles' translations into one ``(b T, K) @ (K, J)`` product.
The data are shifted to offsets one lattice step apart by
one complex multiplication with a step phasor (:func:`shifted_data`) instead of a sine and
cosine per value. Phases are computed in the data's precision (float32 for complex64 data).
"""

from __future__ import annotations

import math

import torch

from subtomo.ml.batch import FourierPoints

__all__ = [
    "centred_data",
    "plane_scores",
    "pose_scores",
    "projected_shifts_px",
    "shift_phases",
    "shifted_data",
    "split_parts",
]


def projected_shifts_px(
    tilt_rotations: torch.Tensor, offsets_angst: torch.Tensor, pixel_size: float
) -> torch.Tensor:
    """Particle centre in each tilt image, pixels from the box centre (xy).

    ``tilt_rotations`` ``(b, f, 3, 3)`` = ``R_f A_sub``; ``offsets_angst`` ``(b, T, 3)``
    subtomogram-frame offsets ``o``. Returns ``(b, T, f, 2)`` = ``-[R_f A_sub o]_xy / px``.
    """
    r = tilt_rotations[:, None, :, :2, :].to(offsets_angst.dtype)  # (b, 1, f, 2, 3)
    return -(r @ offsets_angst[:, :, None, :, None]).squeeze(-1) / pixel_size


def shift_phases(
    tilt_rotations: torch.Tensor,
    offsets_angst: torch.Tensor,
    points: FourierPoints,
    pixel_size: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Phases ``2 pi k.s`` ``(b, T, f, K)`` (radians, ``dtype``) of the shifts ``s`` of
    :func:`projected_shifts_px` at the frequencies of ``points``."""
    s = projected_shifts_px(tilt_rotations, offsets_angst, pixel_size).to(dtype)
    freq = (2 * math.pi) * points.freq.to(dtype)  # (K, 2)
    phase = s[..., 0:1] * freq[:, 0]
    return phase.addcmul_(s[..., 1:2], freq[:, 1])


def centred_data(
    data: torch.Tensor,
    tilt_rotations: torch.Tensor,
    offsets_angst: torch.Tensor,
    points: FourierPoints,
    pixel_size: float,
) -> torch.Tensor:
    """Data shifted so that the particle centre of each trial offset is at the box centre.

    ``data`` ``(b, f, K)`` complex (at ``points``); ``offsets_angst`` ``(b, T, 3)``.
    Returns ``(b, T, f, K)``: ``Y(k) exp(2 pi i k.s)`` with ``s`` from
    :func:`projected_shifts_px` (phases in the precision of ``data``).
    """
    phase = shift_phases(tilt_rotations, offsets_angst, points, pixel_size, data.real.dtype)
    return data[:, None] * torch.complex(torch.cos(phase), torch.sin(phase))


def _lattice_steps(offsets: torch.Tensor, tol: float = 1e-6) -> tuple[list[int], torch.Tensor]:
    """How each offset follows from an earlier one by one axis step, the same for all rows.

    ``offsets`` ``(R, T, 3)``. Returns ``parent`` (``T`` ints, -1 for the offsets computed
    directly) and ``step`` ``(T, 3)`` with ``offsets[:, t] = offsets[:, parent[t]] + step[t]``
    for every row; the parent is the earlier offset at the smallest axis-aligned distance.
    """
    o = offsets.detach().to("cpu", torch.float64)
    r, t = o.shape[:2]
    if r * t * t > 1 << 22:  # too many pairs to compare: compute every offset directly
        return [-1] * t, torch.zeros(t, 3, dtype=torch.float64)
    d = o[:, :, None] - o[:, None]  # (R, T, T, 3): d[., t, u] = o_t - o_u
    shared = (d - d[:1]).abs().amax(dim=(0, 3)) <= tol
    one_axis = ((d[0].abs() > tol).sum(-1) == 1) & shared
    dist = d[0].abs().sum(-1).masked_fill(~torch.tril(one_axis, -1), math.inf)
    best = dist.argmin(1)
    parent = torch.where(torch.isfinite(dist.amin(1)), best, -1)
    step = d[0][torch.arange(t), best]
    return parent.tolist(), step


def shifted_data(
    data: torch.Tensor,
    tilt_rotations: torch.Tensor,
    offsets_angst: torch.Tensor,
    points: FourierPoints,
    pixel_size: float,
) -> torch.Tensor:
    """``Y e^{2 pi i k.s}`` ``(b, T, f, K)`` for the shifts of :func:`projected_shifts_px`.

    Equals :func:`centred_data` (to float rounding), built by recurrence: the phase is linear
    in the offset, so an offset one axis step from an earlier one (the same step for all
    ``b`` rows, as on a translation lattice) is that one's shifted data times the step's
    phasor. Only the remaining offsets (one for a lattice) and the distinct steps take a
    sine and cosine per value. ``data`` ``(b, f, K)`` complex; ``offsets_angst`` ``(b, T, 3)``.
    """
    real = data.real.dtype
    b, t = offsets_angst.shape[:2]
    parent, step = _lattice_steps(offsets_angst)
    out = data.new_empty(b, t, *data.shape[1:])
    roots = [i for i in range(t) if parent[i] < 0]
    out[:, roots] = centred_data(data, tilt_rotations, offsets_angst[:, roots], points, pixel_size)
    linked = [i for i in range(t) if parent[i] >= 0]
    if linked:
        steps, which = torch.unique(torch.round(step[linked] * 1e6), dim=0, return_inverse=True)
        steps = (steps / 1e6).to(offsets_angst)[None].expand(b, -1, -1)
        phase = shift_phases(tilt_rotations, steps, points, pixel_size, real)
        phasors = torch.polar(torch.ones_like(phase), phase)  # (b, S, f, K)
        for i, s in zip(linked, which.tolist(), strict=True):
            torch.mul(out[:, parent[i]], phasors[:, s], out=out[:, i])
    return out


def split_parts(shifted: torch.Tensor) -> torch.Tensor:
    """``(b, T, f, K)`` complex -> ``(b, f, 2, T, K)`` real: per tilt, the real and the
    imaginary parts of all translations as two ``(T, K)`` matrices (:func:`plane_scores`)."""
    return torch.view_as_real(shifted).permute(0, 2, 4, 1, 3).contiguous()


def plane_scores(
    shifted: torch.Tensor, weights: torch.Tensor, planes: torch.Tensor
) -> torch.Tensor:
    """Scores ``(b, T, J)`` (module docstring), up to a pose-independent constant.

    ``shifted`` ``(b, f, 2, T, K)`` real (:func:`split_parts`): the data divided by
    ``sigma2`` and shifted to each translation; ``weights`` ``(b, f, K)`` ``CTF2 / sigma2``;
    ``planes`` ``(B, f, 2, J, K)`` real slices, the layout the projector samples them in, with
    ``B = b`` (one set per particle) or ``B = 1`` (shared by all particles). The cross term is
    one ``(T, K) @ (K, J)`` product per (particle, tilt, part), summed over tilts and parts
    (the slices are never copied into another layout).
    """
    b, f, _, t, k = shifted.shape
    n_sets, j = planes.shape[0], planes.shape[3]
    p2 = planes[:, :, 0].square().add_(planes[:, :, 1].square())  # (B, f, J, K) |P|^2
    w = weights.to(p2.dtype)
    if n_sets == 1:
        y = shifted.permute(1, 2, 0, 3, 4).reshape(f, 2, b * t, k)
        cross = torch.matmul(y, planes[0].transpose(-1, -2)).sum((0, 1)).view(b, t, j)
        power = torch.matmul(w.transpose(0, 1), p2[0].transpose(-1, -2)).sum(0)  # (b, J)
    else:
        cross = torch.matmul(shifted, planes.transpose(-1, -2)).sum((1, 2))
        power = torch.matmul(p2, w[..., None]).sum(1)[..., 0]  # (b, J)
    return cross.sub_(0.5 * power[:, None, :])


def pose_scores(
    centred: torch.Tensor, weights: torch.Tensor, inv_sigma2: torch.Tensor, slices: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood (up to a pose-independent constant) of every (translation, orientation).

    Parameters
    ----------
    centred:
        ``(b, T, f, K)`` complex data from :func:`centred_data`.
    weights:
        ``(b, f, K)`` ``CTF2`` (zero for invisible tilts).
    inv_sigma2:
        ``(b, K)`` ``1 / sigma2`` of each particle's optics group at each component.
    slices:
        ``(2, b, f, J, K)`` real and imaginary parts of the reference slices per particle
        (tilt-major), or ``(2, 1, f, J, K)`` shared by the whole batch.

    Returns
    -------
    ``(b, T, J)`` scores (:func:`plane_scores` in the precision of ``slices``).
    """
    planes = slices.permute(1, 2, 0, 3, 4).contiguous()  # (B, f, 2, J, K)
    y = split_parts(centred * inv_sigma2[:, None, None, :]).to(planes.dtype)
    return plane_scores(y, weights * inv_sigma2[:, None, :], planes)
