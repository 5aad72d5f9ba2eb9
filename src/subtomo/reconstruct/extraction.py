"""Batched extraction kernels: pseudo-subtomogram slices cut from one tilt image.

Conventions (relion5-conventions.md §5.2, §6). Images are yx arrays, positions xyz/uv vectors
in *bin-1 tilt-series pixels* (0-based, integer values at pixel centres). Fourier arrays are the
unshifted rfft layout of :func:`subtomo.fourier.rfft_centered` (real-space centre N//2 at the
origin; x = 0..N/2, y wrapped), the layout RELION's FFTW code uses. All functions take a
leading batch dimension ``b`` (particles x tilts) and never loop over it in Python.

The chain for one tilt image and many particles is::

    cut_patches -> (precrop) -> rfft_centered -> fourier_resize -> * phase_ramp
        -> * (-CTF * dose) -> (2D stacks: / bin) -> circle_crop in real space

``splat_slices`` scatters such slices into RELION-4 style 3D pseudo-subtomograms (§5.4).

Why not ``torch_subpixel_crop.subpixel_crop_2d``: evaluated with torch-subpixel-crop 0.6, it
fills pixels outside the image with zeros where RELION repeats the edge pixel, rounds a
half-pixel position to even (``torch.round``) where RELION takes ``floor(u + 0.5)``, and wants
the same number of positions on every image, while the visible (particle, tilt) pairs here
are ragged; its sub-pixel Fourier shift is the :func:`phase_ramp` applied here in the same
rfft that bins and premultiplies.
"""

from __future__ import annotations

import functools
import math

import torch

from subtomo.fourier import fftfreq_grid

__all__ = [
    "circle_crop",
    "cone_weights",
    "cut_patches",
    "fourier_resize",
    "phase_ramp",
    "raised_cosine_mask",
    "splat_slices",
]


def cut_patches(
    images: torch.Tensor, uv: torch.Tensor, size: int, image_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Square patches ``(b, size, size)`` around projected positions, edges clamped.

    Parameters
    ----------
    images
        ``(h, w)`` tilt image, or ``(t, h, w)`` tilt stack with ``image_index`` choosing one
        image per patch.
    uv
        ``(b, 2)`` image positions (x, y) in pixels. The patch corner is
        ``round(u) - size//2`` (RELION), so ``round(u)`` sits at patch index ``size//2``.
    image_index
        ``(b,)`` index into the stack (required for a 3D ``images``).

    Out-of-image pixels take the value of the nearest edge pixel.
    """
    stack = images if images.ndim == 3 else images[None]
    t, h, w = stack.shape
    dev = stack.device
    int_dtype = torch.int32 if t * h * w < 2**31 else torch.int64  # index_select takes both
    if image_index is None:
        image_index = torch.zeros(uv.shape[0], dtype=int_dtype, device=dev)
    corner = torch.floor(uv.to(dev) + 0.5).to(int_dtype) - size // 2  # (b, 2) xy
    steps = torch.arange(size, device=dev, dtype=int_dtype)
    ix = (corner[:, 0, None] + steps).clamp(0, w - 1)  # (b, size)
    iy = (corner[:, 1, None] + steps).clamp(0, h - 1)  # (b, size)
    rows = image_index.to(dev, int_dtype) * (h * w)  # (b,) start of each patch's image
    linear = (rows[:, None] + iy * w)[:, :, None] + ix[:, None, :]  # (b, size, size)
    return stack.reshape(-1).index_select(0, linear.view(-1)).view(linear.shape)


def fourier_resize(spectra: torch.Tensor, size: int) -> torch.Tensor:
    """Crop (bin) or zero-pad 2D rfft spectra ``(b, n, n//2+1)`` to ``(b, size, size//2+1)``.

    The result is scaled by ``(size/n)^2`` so the real-space mean is preserved, i.e. Fourier
    binning by the factor ``n/size`` (RELION: "divide by bin").
    """
    n = spectra.shape[-2]
    out = spectra.new_zeros(*spectra.shape[:-2], size, size // 2 + 1)
    keep = min(n, size) // 2  # frequencies |k| < keep along y, 0..keep along x
    out[..., :keep, : keep + 1] = spectra[..., :keep, : keep + 1]
    out[..., size - keep :, : keep + 1] = spectra[..., n - keep :, : keep + 1]
    return out * (size / n) ** 2


def phase_ramp(shift_px: torch.Tensor, n: int) -> torch.Tensor:
    """``exp(-2πi k·d)`` ``(b, n, n//2+1)`` (rfft layout) for shifts ``d`` ``(b, 2)`` (x, y)
    pixels: multiplying a spectrum by it moves content at x to x + d. Separable:
    ``e^(a+b) = e^a e^b`` is formed from one factor per axis."""
    dev = shift_px.device
    d = -2 * math.pi * shift_px.to(dtype=torch.float32)  # (b, 2)
    kx = torch.fft.rfftfreq(n, device=dev, dtype=torch.float32)
    ky = torch.fft.fftfreq(n, device=dev, dtype=torch.float32)
    phase_x = torch.polar(torch.ones_like(kx), kx * d[:, :1])  # (b, n//2+1)
    phase_y = torch.polar(torch.ones_like(ky), ky * d[:, 1:])  # (b, n)
    return phase_y[:, :, None] * phase_x[:, None, :]


def raised_cosine_mask(
    shape: tuple[int, ...], radius: float, falloff: float = 5.0, device: torch.device | None = None
) -> torch.Tensor:
    """Soft sphere/circle around the centre N//2: 1 inside ``radius - falloff``, 0 beyond
    ``radius``, ``0.5 - 0.5 cos(pi (R - r) / falloff)`` between (RELION's circle crop)."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) - n // 2 for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    r = torch.sqrt(sum(g**2 for g in grids))
    inner = radius - falloff
    ramp = 0.5 - 0.5 * torch.cos(math.pi * (radius - r) / falloff)
    return torch.where(r <= inner, 1.0, torch.where(r >= radius, 0.0, ramp))


def circle_crop(images: torch.Tensor, radius: float, falloff: float = 5.0) -> torch.Tensor:
    """RELION's circle crop of ``(b, n, n)`` images about pixel n//2.

    The mean of the pixels at distance >= ``radius`` is subtracted from each image, then the
    image is multiplied by :func:`raised_cosine_mask`.
    """
    mask, outside = _circle_masks(images.shape[-1], float(radius), float(falloff), images.device)
    mean = (images.flatten(-2) @ outside.to(images.dtype)).reshape(*images.shape[:-2], 1, 1)
    return (images - mean) * mask.to(images.dtype)


@functools.lru_cache(maxsize=16)
def _circle_masks(
    n: int, radius: float, falloff: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(n, n)`` raised-cosine mask and the ``(n*n,)`` averaging weights of the pixels
    outside it (1/count where the mask is 0), cached: every batch of a job uses the same."""
    mask = raised_cosine_mask((n, n), radius, falloff, device=device)
    outside = (mask == 0).flatten().float()
    return mask, outside / outside.sum().clamp(min=1)


def cone_weights(
    size: int,
    matrices: torch.Tensor,
    cone_angle_deg: float = 10.0,
    sig0: float = 2.0,
) -> torch.Tensor:
    """RELION's cone weight ``(b, size, size, size//2+1)`` on the 3D rfft grid (§5.4).

    ``1 - exp(-t^2/2)`` with ``t = rho / (|q_z| sin(alpha/2) + sig0)``, ``q = M k``, ``M``
    the ``(b, 3, 3)`` particle rotation A_sub·A_part, ``k`` in Fourier pixels (xyz) and
    ``rho = |q_xy|``. It suppresses a double cone of half-angle ``alpha/2`` around ``q_z``.
    """
    k = fftfreq_grid((size, size, size), device=matrices.device) * size  # (z, y, x, 3)
    q = torch.einsum("bij,zyxj->bzyxi", matrices.to(k.dtype), k)
    rho = torch.linalg.vector_norm(q[..., :2], dim=-1)
    t = rho / (q[..., 2].abs() * math.sin(math.radians(cone_angle_deg) / 2) + sig0)
    return 1 - torch.exp(-0.5 * t**2)


def splat_slices(
    slices: torch.Tensor,
    weights: torch.Tensor,
    matrices: torch.Tensor,
    target: torch.Tensor,
    size: int,
    *,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward trilinear splatting of 2D slices into 3D pseudo-subtomograms (§5.4).

    Parameters
    ----------
    slices
        ``(b, s, s//2+1)`` complex 2D spectra (rfft layout), already premultiplied.
    weights
        ``(b, s, s//2+1)`` real CTF^2 weights of each slice.
    matrices
        ``(b, 3, 3)`` rotation taking volume coordinates to image coordinates (e.g.
        R_f·A_sub); the 2D frequency (x, y) lands at ``scale * M^T (x, y, 0)``.
    target
        ``(b,)`` long: which output volume each slice belongs to.
    size
        Output box ``s_c``; ``scale`` is ``s_c / s``.
    mask
        Optional ``(b, s, s//2+1)`` bool: frequencies to insert (e.g. the dose cut-off of
        :func:`subtomo.ctf.dose_cutoff_mask`); always limited to radius s/2.

    Returns
    -------
    ``(v, 3, size, size, size//2+1)`` complex: data sum, CTF^2-weight sum and multiplicity
    (the last two real-valued), for ``v = target.max() + 1`` volumes; each neighbour gets
    ``m = scale^2 * prod(1 - |delta|)``. Points landing at x < 0 go to the Friedel mate
    (conjugated); points on the x = 0 plane are also added to their mirror voxel.
    """
    b, s, half = slices.shape
    device = slices.device
    kx = torch.arange(half, device=device, dtype=torch.float32)
    ky = torch.fft.fftfreq(s, d=1.0 / s, device=device, dtype=torch.float32)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")  # (s, half)
    keep = gy.abs() < s / 2 if s % 2 == 0 else torch.ones_like(gy, dtype=torch.bool)
    keep = keep & (gx.square() + gy.square() <= (s / 2) ** 2)
    keep = keep.expand(b, s, half)
    if mask is not None:
        keep = keep & mask.to(device)
    k2 = torch.stack([gx, gy, torch.zeros_like(gx)], dim=-1)  # (s, half, 3)
    k3 = scale * torch.einsum("bji,yxj->byxi", matrices.to(device, torch.float32), k2)
    values = torch.stack(
        [slices, weights.to(slices.dtype), torch.ones_like(weights).to(slices.dtype)], dim=1
    )  # (b, 3, s, half)
    sel = keep.nonzero(as_tuple=True)
    k3 = k3[sel]  # (m, 3)
    vals = values.permute(0, 2, 3, 1)[sel]  # (m, 3)
    vol = target.to(device)[sel[0]]
    flip = k3[:, 0] < 0
    k3 = torch.where(flip[:, None], -k3, k3)
    vals = torch.where(flip[:, None], vals.conj(), vals)
    n_vol = int(target.max()) + 1
    half_out = size // 2 + 1
    out = torch.zeros(n_vol * size * size * half_out, 3, dtype=slices.dtype, device=device)
    base = torch.floor(k3)
    frac = k3 - base
    base = base.long()
    for corner in range(8):
        offs = torch.tensor([(corner >> i) & 1 for i in range(3)], device=device)
        idx = base + offs  # (m, 3) xyz
        wgt = torch.prod(torch.where(offs.bool(), frac, 1 - frac), dim=-1) * scale**2
        ok = (idx[:, 0] < half_out) & (idx[:, 1].abs() < size / 2) & (idx[:, 2].abs() < size / 2)
        ok &= (idx[:, 0] >= 0) & (wgt > 0)
        contrib = vals * wgt[:, None]
        for mirror in (False, True):
            if mirror:  # x = 0 plane: also the Friedel mate (0, -y, -z), conjugated
                ok = ok & (idx[:, 0] == 0) & ((idx[:, 1] != 0) | (idx[:, 2] != 0))
                idx = -idx
                contrib = contrib.conj()
            lin = ((vol * size + idx[:, 2] % size) * size + idx[:, 1] % size) * half_out
            lin = lin + idx[:, 0]
            out.index_add_(0, lin[ok], contrib[ok])
    return out.reshape(n_vol, size, size, half_out, 3).permute(0, 4, 1, 2, 3)
