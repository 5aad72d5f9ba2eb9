"""Central Fourier slices: batched trilinear extraction and its adjoint, forward splatting.

Layouts (see :mod:`subtomo.fourier.fft`): volumes are ``rfft_centered`` transforms in torch's
unshifted rfft layout ``(N, N, N//2 + 1)`` (zyx axes; x = 0..N/2, y and z wrapped), images
``(n, n, n//2 + 1)`` likewise. ``N`` is the padded box ``round(n * padding)``; a component at
integer frequency ``k`` of the n-box sits at ``k * N / n`` Fourier pixels of the N-box (exactly
``k * padding`` when ``n * padding`` is an integer).

Geometry (relion5-conventions §4): ``matrices`` are RELION's ``A`` (reference -> image, xyz);
the image component at ``k = (kx, ky)`` is ``F_ref(A^T (kx, ky, 0))``. Only the half
``x >= 0`` is stored, so a point ``q`` with ``q_x < 0`` reads (writes) ``conj F(-q)``.
Neighbours outside the stored grid (``|y|, |z| > N/2`` or ``x > N/2``) count as zero.
Components beyond ``max_radius`` (Fourier pixels of the n-box; default ``n/2``, RELION's
Nyquist circle) are neither read nor written.

Insertion is the exact adjoint of extraction, followed by the x = 0 plane completion of
relion5-conventions §5.4: what lands on voxel ``(0, y, z)`` is also added, conjugated, to its
mirror ``(0, -y, -z)``, so the accumulators stay Hermitian (RELION's backprojector does the
same with ``enforceHermitianSymmetry``). In formulas, for a Hermitian volume ``V`` (the
rfft of a real map) and any slices ``S``::

    Re <extract(V), S> == Re <V, insert(S)>_F

where ``<., .>_F`` counts the voxels of the x = 0 plane with weight 1/2.

Why not ``torch_image_interpolation.insert_into_image_3d`` (the insertion behind
torch-fourier-slice) behind an adapter: it is correct but was measured at ~400 slices/s at
box 64 on 2 CPU cores (DESIGN.md, "Dependencies"), where this module's batched insertion
reconstructs 5,800-8,300 tilt images/s (README, "Benchmarks").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from subtomo.fourier.fft import fftfreq_grid, rfft_centered

__all__ = [
    "MIN_SINC2",
    "extract_slices",
    "extract_volumes",
    "insert_slices",
    "insert_volumes",
    "padded_box",
    "projector_rfft",
    "trilinear_sinc2",
]

#: Gridding correction: values of sinc^2 below this are replaced by it (RELION).
MIN_SINC2 = 0.01

#: Samples (rotated frequency points) handled per chunk: bounds the temporaries to a few
#: tens of MB whatever the batch size.
CHUNK_SAMPLES = 1 << 16


def padded_box(box: int, padding: float) -> int:
    """The padded box ``N``: ``round(box * padding)``, made even when ``padding > 1``."""
    size = round(box * padding)
    return size + size % 2 if padding > 1 else size


def _image_box(padded: int, padding: float) -> int:
    """The n-box whose padded box is ``padded`` (inverse of :func:`padded_box`)."""
    return round(padded / padding)


def trilinear_sinc2(
    n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``sinc^2(r / n)`` ``(n, n, n)`` of the distance ``r`` (voxels) from the centre ``n//2``:
    the real-space transform of trilinear interpolation on an n-grid, floored at
    :data:`MIN_SINC2` (RELION's gridding correction divides by it)."""
    x = torch.arange(n, device=device, dtype=dtype) - n // 2
    r = torch.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2) / n
    s2 = torch.sinc(r) ** 2  # torch.sinc(x) = sin(pi x) / (pi x)
    return torch.where((s2 < MIN_SINC2) | (r > 1), MIN_SINC2, s2)


def projector_rfft(
    volume: torch.Tensor, padding: float = 2.0, gridding_correction: bool = True
) -> torch.Tensor:
    """The volume :func:`extract_slices` expects: ``volume`` ``(n, n, n)`` (zyx, centre n//2)
    divided by :func:`trilinear_sinc2` of the padded box (RELION's projector does this so
    that trilinear slices are not apodised), zero-padded to ``N = padded_box(n, padding)``
    (centre kept at N//2) and ``rfft_centered``: ``(N, N, N//2 + 1)`` complex."""
    n = volume.shape[-1]
    size = padded_box(n, padding)
    lo = size // 2 - n // 2
    padded = volume.new_zeros(size, size, size)
    padded[lo : lo + n, lo : lo + n, lo : lo + n] = volume
    if gridding_correction:
        padded = padded / trilinear_sinc2(size, volume.device, volume.dtype)
    return rfft_centered(padded, 3)


class _Plan(NamedTuple):
    """The n-box rfft components in use and how they map onto the N-box."""

    grid: torch.Tensor  # (P, d) integer frequencies k (xyz, float32), |k| <= radius
    flat: torch.Tensor  # (P,) their flat indices into the n-box rfft array
    scale: float  # N / n: k lands at scale * A^T k
    reach: int  # every rotated point has |q_i| <= reach (N-box Fourier pixels)


@functools.lru_cache(maxsize=64)
def _half_grid(
    n: int, ndim: int, radius: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.round(fftfreq_grid((n,) * ndim, device=device, dtype=torch.float64) * n)
    k = k.reshape(-1, ndim)
    flat = torch.nonzero(k.square().sum(-1) <= radius**2).squeeze(1)
    return k[flat].float(), flat


def _plan(n: int, padded: int, ndim: int, max_radius: float | None, device) -> _Plan:
    """Components of the n-box (d = ``ndim``) with ``|k| <= max_radius`` (default n/2, at most
    n so that every point stays within ``|q| < N``)."""
    radius = n / 2 if max_radius is None else min(float(max_radius), float(n))
    grid, flat = _half_grid(n, ndim, radius, torch.device(device))
    scale = padded / n
    return _Plan(grid, flat, scale, math.ceil(radius * scale))


def _rotate(
    grid: torch.Tensor, matrices: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``scale * A^T k`` as ``(3, b, P)`` (x, y, z planes) flipped to ``x >= 0``, and the
    flip mask ``(b, P)``. ``grid`` ``(P, d)`` holds the frequencies ``k`` (xyz; d = 2 or 3).
    """
    a = (matrices.to(dtype) * scale).permute(2, 0, 1).contiguous()  # (3 out, b, 3 in)
    k = grid.to(dtype).T.contiguous()  # (d, P); q_i = sum_j A[j, i] k_j
    q = a[:, :, 0, None] * k[0]  # (3, b, P)
    for j in range(1, k.shape[0]):
        q.addcmul_(a[:, :, j, None], k[j])
    flip = q[0] < 0
    q.mul_(torch.where(flip, -1.0, 1.0).to(dtype))
    return q, flip


# Trilinear interpolation and splatting address the 8 neighbours of each point in one of two
# ways. On a *staging grid* (the frequencies ``-r-1 <= z, y <= r+1`` and ``0 <= x <= r+1`` of
# a point cloud of reach ``r``, centred, no wrap-around) they are the lower corner plus 8 fixed
# offsets; gathering reads a staged copy of the volume (zero off the stored grid), splatting
# adds into a zeroed staging grid that is then completed on its x = 0 plane and folded onto
# the rfft layout. That set-up and fold cost about as much as visiting the grid's voxels, so
# it pays only for many points per voxel (e.g. thousands of tilt images into a small box);
# otherwise the neighbours are looked up *directly* in the rfft layout through per-axis
# tables of wrapped offsets. Both give the same sums up to float rounding.

#: Stage when the points' neighbour visits outnumber the staging grid's voxels this many times
#: (measured on CPU: break-even at ~15).
STAGE_RATIO = 20


def _staging_pays(reach: int, points: int) -> bool:
    return 8 * points >= STAGE_RATIO * math.prod(_staging_shape(reach))


def _staging_shape(reach: int) -> tuple[int, int, int]:
    return (2 * reach + 3, 2 * reach + 3, reach + 2)


@functools.lru_cache(maxsize=16)
def _staging_axes(
    reach: int, padded: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For the y/z axis of the staging grid: the staging indices that lie on the stored grid
    (``|j| <= N//2``) and their rfft rows ``j mod N``; and the number of x columns kept."""
    j = torch.arange(-reach - 1, reach + 2, device=device)
    keep = torch.nonzero(j.abs() <= padded // 2).squeeze(1)
    return keep, j[keep].remainder(padded), min(reach + 2, padded // 2 + 1)


@functools.lru_cache(maxsize=16)
def _corner_offsets(reach: int, device: torch.device, int_dtype: torch.dtype) -> torch.Tensor:
    """Flat offsets ``(8, 1)`` of the 8 neighbours from the lower corner (z, y, x bits)."""
    _, sy, sz = _strides(reach)
    offsets = [z * sz + y * sy + x for z in (0, 1) for y in (0, 1) for x in (0, 1)]
    return torch.tensor(offsets, dtype=int_dtype, device=device)[:, None]


def _strides(reach: int) -> tuple[int, int, int]:
    _, h, w = _staging_shape(reach)
    return 1, w, h * w


def _staged_neighbours(
    q: torch.Tensor, reach: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The 8 trilinear neighbours of points ``q`` ``(3, b, P)`` (x, y, z planes, ``q_x >= 0``,
    ``|q_i| <= reach``): flat indices ``(b, 8, P)`` into the staging grid (z, y, x bits; this
    order keeps each slice's accesses together in memory) and the weights of the lower and
    upper neighbour along x, y and z, each ``(b, 2, P)``. ``q`` is overwritten."""
    shape = _staging_shape(reach)
    int_dtype = torch.int32 if math.prod(shape) < 2**31 else torch.int64
    _, sy, sz = _strides(reach)
    lower = torch.floor(q)
    frac = q.sub_(lower)
    corner = lower.to(int_dtype)
    flat = corner[2].mul_(sz).add_(corner[1], alpha=sy).add_(corner[0])
    flat.add_((reach + 1) * (sy + sz))  # (b, P) staging index of the lower neighbour
    idx = flat[:, None] + _corner_offsets(reach, q.device, int_dtype)
    wx, wy, wz = torch.stack((1 - frac, frac), dim=2)
    return idx, (wx, wy, wz)


@functools.lru_cache(maxsize=16)
def _axis_tables(
    padded: int, device: torch.device, int_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat-index offsets and validity (0/1) of a neighbour at signed index ``j`` along x, y and
    z of the rfft layout, flattened from ``(3, T)``: entry ``axis * T + j + N + 1`` for
    ``|j| <= N + 1`` (``|q| < N``)."""
    half = padded // 2
    j = torch.arange(-padded - 1, padded + 3, device=device)
    offsets, valid = [], []
    for stride, lo in ((1, 0), (half + 1, -half), ((half + 1) * padded, -half)):
        valid.append((j >= lo) & (j <= half))
        offsets.append(j.clamp(-half, half).remainder(padded) * stride)
    return torch.cat(offsets).to(int_dtype), torch.cat(valid)


def _direct_neighbours(
    q: torch.Tensor, padded: int, reach: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """As :func:`_staged_neighbours`, with indices into the ``(N, N, N//2+1)`` rfft array;
    neighbours off the stored grid get weight 0 (no test needed when ``reach <= N/2``: only
    zero-weight neighbours can then fall off it)."""
    int_dtype = torch.int32 if padded**3 < 2**31 else torch.int64
    offsets, valid = _axis_tables(padded, q.device, int_dtype)
    size = offsets.shape[0] // 3
    base = torch.arange(3, device=q.device, dtype=int_dtype)[:, None] * size + padded + 1
    lower = torch.floor(q)
    frac = q.sub_(lower)
    pos = lower.to(int_dtype).view(3, -1).add_(base).view(-1)  # table entry of the lower one

    def pair(table: torch.Tensor) -> torch.Tensor:  # (axis, b, lower/upper, P)
        first = table.index_select(0, pos).view(q.shape)
        return torch.stack((first, table[1:].index_select(0, pos).view(q.shape)), dim=2)

    jx, jy, jz = pair(offsets)
    w = torch.stack((1 - frac, frac), dim=2)
    if reach > padded // 2:
        w = w * pair(valid)
    idx = (jz[:, :, None, None] + jy[:, None, :, None]) + jx[:, None, None]  # (b, 2, 2, 2, P)
    return idx.flatten(1, 3), tuple(w)


def _outer(zy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(b, 8, P)`` products of ``zy`` ``(b, 2, 2, P)`` and ``x`` ``(b, 2, P)`` (z, y, x bits)."""
    return (zy[:, :, :, None] * x[:, None, None]).flatten(1, 3)


def _staged(volume: torch.Tensor, reach: int) -> torch.Tensor:
    """The rfft ``volume`` ``(N, N, N//2+1)`` on the staging grid of ``reach``, flattened."""
    keep, rows, columns = _staging_axes(reach, volume.shape[-3], volume.device)
    out = volume.new_zeros(_staging_shape(reach))
    block = volume.index_select(0, rows).index_select(1, rows)[..., :columns]
    out[keep[:, None], keep, :columns] = block
    return out.view(-1)


def _fold(staging: torch.Tensor, acc: torch.Tensor) -> None:
    """Add the staging grid ``(2r+3, 2r+3, r+2)`` of splatted points to the rfft ``acc``: its
    x = 0 plane is first completed by the conjugate mirror (0, -y, -z) (Hermitian symmetry),
    then every voxel on the stored grid is added at its wrapped position."""
    plane = staging[..., 0]
    mirror = torch.flip(plane, dims=(0, 1))  # staging index j -> 2r+2 - j: (-z, -y)
    plane.add_(mirror.conj() if mirror.is_complex() else mirror)
    keep, rows, columns = _staging_axes(staging.shape[-1] - 2, acc.shape[-3], acc.device)
    block = staging.index_select(0, keep).index_select(1, keep)[..., :columns]
    rows_z = acc.new_zeros(acc.shape[0], block.shape[1], columns).index_add_(0, rows, block)
    acc[..., :columns].index_add_(1, rows, rows_z)


def _chunks(b: int, points: int) -> Iterator[tuple[slice, slice]]:
    """(batch, point) slices covering ``b x points`` with at most ~CHUNK_SAMPLES each."""
    p_step = max(1, min(points, CHUNK_SAMPLES))
    b_step = max(1, CHUNK_SAMPLES // p_step)
    for b0 in range(0, b, b_step):
        for p0 in range(0, points, p_step):
            yield slice(b0, min(b0 + b_step, b)), slice(p0, min(p0 + p_step, points))


def _gather(volume: torch.Tensor, plan: _Plan, matrices: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``(b, P)`` of the rfft ``volume`` at ``scale * A^T k`` (Friedel-aware)."""
    padded, points = volume.shape[-3], plan.grid.shape[0]
    if _staging_pays(plan.reach, matrices.shape[0] * points):
        flat = _staged(volume, plan.reach)
        neighbours = functools.partial(_staged_neighbours, reach=plan.reach)
    else:
        flat = volume.reshape(-1)
        neighbours = functools.partial(_direct_neighbours, padded=padded, reach=plan.reach)
    real = flat.real if flat.is_complex() else flat
    out = flat.new_empty(matrices.shape[0], points)
    for sb, sp in _chunks(matrices.shape[0], points):
        q, flip = _rotate(plan.grid[sp], matrices[sb], plan.scale, real.dtype)
        idx, (wx, wy, wz) = neighbours(q)
        w = _outer(wz[:, :, None] * wy[:, None], wx)
        acc = (flat.index_select(0, idx.view(-1)).view(idx.shape) * w).sum(1)
        if acc.is_complex():
            acc = torch.where(flip, acc.conj(), acc)
        out[sb, sp] = acc
    return out


def _mirror_x0(acc: torch.Tensor, before: torch.Tensor) -> None:
    """The x = 0 plane of ``acc`` holds only this call's additions (it was zeroed): add them
    and their conjugates at the mirror voxels ``(0, -y, -z)`` to the saved plane ``before``."""
    plane = acc[..., 0]
    mirror = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))  # (-z, -y)
    plane.add_(mirror.conj() if mirror.is_complex() else mirror).add_(before)


def _splat(
    data_acc: torch.Tensor,
    weight_acc: torch.Tensor,
    plan: _Plan,
    values: torch.Tensor,
    weights: torch.Tensor,
    matrices: torch.Tensor,
) -> None:
    """Forward trilinear splatting of ``values``/``weights`` ``(b, P)`` at ``scale * A^T k``."""
    padded, points = data_acc.shape[-3], plan.grid.shape[0]
    staged = _staging_pays(plan.reach, matrices.shape[0] * points)
    if staged:
        shape = _staging_shape(plan.reach)
        data, weight = data_acc.new_zeros(shape), weight_acc.new_zeros(shape)
        neighbours = functools.partial(_staged_neighbours, reach=plan.reach)
    else:
        if not (data_acc.is_contiguous() and weight_acc.is_contiguous()):
            raise ValueError("accumulators must be contiguous tensors")
        data, weight = data_acc, weight_acc
        before = (data[..., 0].clone(), weight[..., 0].clone())
        data[..., 0] = 0
        weight[..., 0] = 0
        neighbours = functools.partial(_direct_neighbours, padded=padded, reach=plan.reach)
    dflat, wflat = data.view(-1), weight.view(-1)
    values = values.to(data_acc.dtype)
    weights = weights.to(weight_acc.dtype)
    for sb, sp in _chunks(matrices.shape[0], points):
        q, flip = _rotate(plan.grid[sp], matrices[sb], plan.scale, weight_acc.dtype)
        v = torch.where(flip, values[sb, sp].conj(), values[sb, sp])
        idx, (wx, wy, wz) = neighbours(q)
        idx, wzy = idx.reshape(-1), wz[:, :, None] * wy[:, None]
        # the sample and its weight times the x weights first: fewer products of 8 per point
        dflat.index_add_(0, idx, _outer(wzy, v[:, None] * wx).view(-1))
        wflat.index_add_(0, idx, _outer(wzy, weights[sb, sp][:, None] * wx).view(-1))
    if staged:
        _fold(data, data_acc)
        _fold(weight, weight_acc)
    else:
        _mirror_x0(data_acc, before[0])
        _mirror_x0(weight_acc, before[1])


def _extract(
    volume_rfft: torch.Tensor, matrices: torch.Tensor, n: int, ndim: int, max_radius: float | None
) -> torch.Tensor:
    """Rotated samples of the n-box rfft components (2D or 3D), zero beyond ``max_radius``."""
    plan = _plan(n, volume_rfft.shape[-3], ndim, max_radius, volume_rfft.device)
    b = matrices.shape[0]
    out = volume_rfft.new_zeros(b, n ** (ndim - 1) * (n // 2 + 1))
    if plan.grid.shape[0] and b:
        out[:, plan.flat] = _gather(volume_rfft, plan, matrices)
    return out.view(b, *(n,) * (ndim - 1), n // 2 + 1)


def extract_slices(
    volume_rfft: torch.Tensor,
    matrices: torch.Tensor,
    *,
    padding: float = 1.0,
    max_radius: float | None = None,
) -> torch.Tensor:
    """Central slices ``(b, n, n//2 + 1)`` of a 3D rfft volume, by trilinear interpolation.

    Parameters
    ----------
    volume_rfft
        ``(N, N, N//2 + 1)`` complex: ``rfft_centered`` of a centred real map zero-padded to
        ``N = padded_box(n, padding)``.
    matrices
        ``(b, 3, 3)`` RELION rotations ``A`` (reference -> image, xyz).
    padding
        ``N / n``; the slices are of the n-box, ``n = round(N / padding)``.
    max_radius
        Fourier pixels of the n-box; components beyond it are zero. Default ``n/2``.

    Returns
    -------
    The rfft (``rfft_centered`` layout, unnormalised) of the n-box projections along z of the
    map rotated by ``A``: component ``k`` is ``F_ref(A^T (kx, ky, 0) * N/n)``.
    """
    n = _image_box(volume_rfft.shape[-3], padding)
    return _extract(volume_rfft, matrices, n, 2, max_radius)


def extract_volumes(
    volume_rfft: torch.Tensor,
    matrices: torch.Tensor,
    *,
    padding: float = 1.0,
    max_radius: float | None = None,
) -> torch.Tensor:
    """Rotated 3D rfft volumes ``(b, n, n, n//2 + 1)``: voxel ``k`` is ``F_ref(A^T k * N/n)``.

    The 3D counterpart of :func:`extract_slices` (same arguments): the rfft of the n-box map
    rotated by ``A`` (reference -> subtomogram), for 3D pseudo-subtomograms and for
    symmetrisation (``padding=1``: resampling on the same grid).
    """
    n = _image_box(volume_rfft.shape[-3], padding)
    return _extract(volume_rfft, matrices, n, 3, max_radius)


def insert_slices(
    data_acc: torch.Tensor,
    weight_acc: torch.Tensor,
    slices: torch.Tensor,
    weights: torch.Tensor,
    matrices: torch.Tensor,
    *,
    padding: float = 1.0,
    max_radius: float | None = None,
) -> None:
    """Add 2D slices into 3D accumulators by forward trilinear splatting (in place).

    Parameters
    ----------
    data_acc, weight_acc
        ``(N, N, N//2 + 1)`` complex and real accumulators (contiguous; rfft layout of the
        padded box ``N = padded_box(n, padding)``).
    slices
        ``(b, n, n//2 + 1)`` complex rfft images (the caller premultiplies, e.g. by CTF).
    weights
        ``(b, n, n//2 + 1)`` real weight of each component (e.g. CTF^2).
    matrices
        ``(b, 3, 3)`` RELION rotations ``A``; component ``k`` lands at ``A^T (kx, ky, 0) * N/n``.
    padding
        ``N / n`` (checked against the shapes).
    max_radius
        Fourier pixels of the n-box; components beyond it are skipped. Default ``n/2``.
    """
    padded, n = data_acc.shape[-3], slices.shape[-2]
    if _image_box(padded, padding) != n:
        raise ValueError(f"accumulator box {padded} does not match slices of box {n} x {padding}")
    plan = _plan(n, padded, 2, max_radius, data_acc.device)
    b = slices.shape[0]
    if not (plan.grid.shape[0] and b):
        return
    values = slices.reshape(b, -1)[:, plan.flat]
    w = weights.reshape(b, -1)[:, plan.flat]
    _splat(data_acc, weight_acc, plan, values, w, matrices)


def insert_volumes(
    data_acc: torch.Tensor,
    weight_acc: torch.Tensor,
    volumes: torch.Tensor,
    weights: torch.Tensor,
    matrices: torch.Tensor,
    *,
    max_radius: float | None = None,
) -> None:
    """Add rotated 3D rfft volumes (pseudo-subtomograms) by forward trilinear splatting.

    ``volumes`` ``(b, n, n, n//2 + 1)`` complex and ``weights`` (same shape, real) are the
    n-box data and weight (e.g. CTF^2 sums); voxel ``k`` lands at ``A^T k * N/n`` of the
    ``(N, N, N//2 + 1)`` accumulators, with ``matrices`` ``(b, 3, 3)`` as in
    :func:`insert_slices` (the identity for data already in the reference frame).
    """
    padded, n = data_acc.shape[-3], volumes.shape[-2]
    plan = _plan(n, padded, 3, max_radius, data_acc.device)
    b = volumes.shape[0]
    if not (plan.grid.shape[0] and b):
        return
    values = volumes.reshape(b, -1)[:, plan.flat]
    w = weights.reshape(b, -1)[:, plan.flat]
    _splat(data_acc, weight_acc, plan, values, w, matrices)
