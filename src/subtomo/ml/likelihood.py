"""Pose scores of premultiplied tilt images as dense batched matrix products.

For a particle with premultiplied tilt images ``Y_f = CTF_f w_f X_f`` (weights
``CTF2_f = (CTF_f w_f)^2``) and noise spectrum ``sigma2`` (per real/imaginary part), the
log-likelihood of a pose (class c, rotation A, 3D offset o) is, up to a pose-independent
constant, the Gaussian likelihood of the recorded images ``X_f = CTF_f w_f P_f + noise``::

    S = sum_f sum_k [Re(conj(Y_f e^{2 pi i k.s_f}) P_f) - CTF2_f |P_f|^2 / 2] / sigma2(|k|)

with ``P_f = F_c(M_f^T k)`` the central slice at ``M_f = R_f A_sub A`` and ``s_f = -[R_f A_sub
o]_xy / px`` the particle centre in tilt f (pixels from the box centre, §1.3). The first
term is, per tilt, two real matmuls of the shifted data ``(b, translations, K)`` with the
reference slices ``(b, K, orientations)`` (real and imaginary parts), summed over tilts; the
second ``(b, 1, K) @ (b, K, orientations)`` on ``|P|^2``. With slices shared by the batch
(global searches, same tilt geometry) the particles and offsets form one matrix
``(b translations, K)`` per tilt.
"""

from __future__ import annotations

import math

import torch

from subtomo.ml.batch import FourierPoints

__all__ = ["centred_data", "pose_scores", "projected_shifts_px"]


def projected_shifts_px(
    tilt_rotations: torch.Tensor, offsets_angst: torch.Tensor, pixel_size: float
) -> torch.Tensor:
    """Particle centre in each tilt image, pixels from the box centre (xy).

    ``tilt_rotations`` ``(b, f, 3, 3)`` = ``R_f A_sub``; ``offsets_angst`` ``(b, T, 3)``
    subtomogram-frame offsets ``o``. Returns ``(b, T, f, 2)`` = ``-[R_f A_sub o]_xy / px``.
    """
    r = tilt_rotations[:, None, :, :2, :].to(offsets_angst.dtype)  # (b, 1, f, 2, 3)
    return -(r @ offsets_angst[:, :, None, :, None]).squeeze(-1) / pixel_size


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
    :func:`projected_shifts_px`.
    """
    s = projected_shifts_px(tilt_rotations, offsets_angst, pixel_size)  # (b, T, f, 2)
    freq = points.freq.to(s.dtype)  # (K, 2)
    phase = (2 * math.pi) * (s @ freq.T)  # (b, T, f, K)
    return data[:, None] * torch.polar(torch.ones_like(phase), phase).to(data.dtype)


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
        (tilt-major, as :meth:`subtomo.ml.projector.Projector.sample` returns them), or
        ``(2, 1, f, J, K)`` shared by the whole batch (then each tilt is one matmul of all
        particles' offsets against all orientations).

    Returns
    -------
    ``(b, T, J)`` scores.
    """
    b, t, f, k = centred.shape
    j = slices.shape[3]
    dtype = slices.dtype
    y = (centred * inv_sigma2[:, None, None, :]).transpose(1, 2)  # (b, f, T, K)
    w = (weights * inv_sigma2[:, None, :]).to(dtype)  # (b, f, K)
    p_re, p_im = slices[0], slices[1]  # (B, f, J, K)
    p2 = p_re.square() + p_im.square()
    if slices.shape[1] == 1 and b > 1:
        y = y.transpose(0, 1).reshape(f, b * t, k)  # (f, bT, K)
        cross = y.real.to(dtype) @ p_re[0].transpose(1, 2) + y.imag.to(dtype) @ p_im[0].transpose(
            1, 2
        )  # (f, bT, J)
        cross = cross.sum(0).reshape(b, t, j)
        power = (w.transpose(0, 1) @ p2[0].transpose(1, 2)).sum(0)  # (b, J)
    else:
        cross = y.real.to(dtype) @ p_re.transpose(2, 3) + y.imag.to(dtype) @ p_im.transpose(2, 3)
        cross = cross.sum(1)  # (b, T, J)
        power = (w[:, :, None, :] @ p2.transpose(2, 3)).sum(1)  # (b, 1, J)
        power = power[:, 0]
    return cross - 0.5 * power[:, None, :]
