"""Pose scores of premultiplied tilt images as dense matrix products.

For a particle with premultiplied tilt images ``Y_f = CTF_f w_f X_f`` (weights
``CTF2_f = (CTF_f w_f)^2``) and noise spectrum ``sigma2`` (per real/imaginary part), the
log-likelihood of a pose (class c, rotation A, 3D offset o) is, up to a pose-independent
constant, the Gaussian likelihood of the recorded images ``X_f = CTF_f w_f P_f + noise``::

    S = sum_f sum_k [Re(conj(Y_f e^{2 pi i k.s_f}) P_f) - CTF2_f |P_f|^2 / 2] / sigma2(|k|)

with ``P_f = F_c(M_f^T k)`` the central slice at ``M_f = R_f A_sub A`` and ``s_f = -[R_f A_sub
o]_xy / px`` the particle centre in tilt f (pixels from the box centre, §1.3).

The engine works on *planes*: real and imaginary parts as an axis of size 2 next to the
frequencies, ``(..., f, 2, K)``. The shifted data of a particle ``(T, f, 2, K)`` and its
slices ``(J, f, 2, K)`` then give all first terms as one real matrix product
``(T, 2fK) @ (2fK, J)`` (tilts, real/imaginary parts and frequencies contracted at once),
the second term as ``(J, fK) @ (fK, 1)`` on ``|P|^2``; slices shared by a batch (global
searches, same tilt geometry) make it one ``(b T, 2fK) @ (2fK, J)`` product. Phases are
computed in the data's precision (float32 for complex64 data).
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
    "shifted_planes",
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


def shifted_planes(data: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """``data * e^{i phases}`` as planes ``(b, T, f, 2, K)`` (real, imaginary).

    ``data`` ``(b, f, K)`` complex; ``phases`` ``(b, T, f, K)`` from :func:`shift_phases`
    (overwritten: its storage holds the sines).
    """
    cos = torch.cos(phases)
    sin = phases.sin_()
    yr, yi = data.real[:, None], data.imag[:, None]  # (b, 1, f, K)
    out = cos.new_empty((*cos.shape[:3], 2, cos.shape[3]))
    re, im = out[:, :, :, 0], out[:, :, :, 1]
    torch.mul(cos, yr, out=re).addcmul_(sin, yi, value=-1.0)
    torch.mul(sin, yr, out=im).addcmul_(cos, yi)
    return out


def plane_scores(
    shifted: torch.Tensor, weights: torch.Tensor, slices: torch.Tensor
) -> torch.Tensor:
    """Scores ``(b, T, J)`` from planes (module docstring), up to a pose-independent constant.

    ``shifted`` ``(b, T, f, 2, K)`` data divided by ``sigma2`` and shifted to each
    translation; ``weights`` ``(b, f, K)`` ``CTF2 / sigma2``; ``slices`` ``(B, J, f, 2, K)``
    with ``B = b`` (one set per particle) or ``B = 1`` (shared by all particles).
    """
    b, t = shifted.shape[:2]
    n_sets, j = slices.shape[:2]
    y = shifted.reshape(b, t, -1)
    p = slices.reshape(n_sets, j, -1)
    p2 = slices.square().sum(-2).reshape(n_sets, j, -1)  # (B, J, fK) |P|^2
    w = weights.to(p2.dtype).reshape(b, -1)
    if n_sets == 1:
        cross = (y.reshape(b * t, -1) @ p[0].T).reshape(b, t, j)
        power = w @ p2[0].T  # (b, J)
    else:
        cross = torch.bmm(y, p.transpose(1, 2))
        power = torch.bmm(p2, w[:, :, None])[..., 0]
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
    y = centred * inv_sigma2[:, None, None, :]
    shifted = torch.stack([y.real, y.imag], dim=3).to(slices.dtype)  # (b, T, f, 2, K)
    planes = slices.permute(1, 3, 2, 0, 4).contiguous()  # (B, J, f, 2, K)
    return plane_scores(shifted, weights * inv_sigma2[:, None, :], planes)
