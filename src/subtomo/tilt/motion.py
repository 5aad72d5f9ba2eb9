"""Whole-frame motion of detector movies: estimate per-frame drift, then sum the aligned frames.

Conventions:

- Frames are ``(t, h, w)`` real images, their spectra ``(t, h, w//2+1)`` in the unshifted
  rfft layout (``torch.fft.rfft2``, backward norm).
- A frame's **shift** ``s = (sx, sy)`` in movie pixels is where its content sits relative to
  the first frame: frame ``i`` at ``x + s_i`` shows what frame 0 shows at ``x``; aligning
  moves each frame by ``-s_i``. RELION writes that correction, ``-s``, as
  ``rlnMicrographShiftX/Y`` (measured with ``relion_run_motioncorr --use_own`` 3.1 on
  simulated MRC movies), frame 1 = 0.
- Shifting an image by ``+s`` multiplies its spectrum by ``exp(-2πi k·s)`` (k in cycles/px).

The estimate is the iterative scheme of RELION's own implementation and MotionCor2:
each frame is cross-correlated with the aligned sum of all *other* frames (so a frame's own
shot noise does not pull the peak to its current shift), with a B-factor on the spectra,
until no shift changes by more than the tolerance. Correlations are computed on a
Fourier-cropped grid (frequencies up to ``align_pixel_size``'s Nyquist) and the peak is
located to 1/``upsample`` of a grid pixel with a matrix DFT around the integer peak
(Guizar-Sicairos et al. 2008), so the cropped grid costs no precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "FrameAlignment",
    "accumulated_motion",
    "align_frames",
    "crop_shape",
    "fourier_crop",
    "irfft2_by_rows",
    "phase_ramp",
    "shifted_sum",
]


@dataclass(frozen=True)
class FrameAlignment:
    """Per-frame shifts ``(t, 2)`` xy in movie pixels (frame 0 = 0), the iterations used and
    the largest change of the last one (pixels)."""

    shifts: torch.Tensor
    iterations: int
    last_change: float


def crop_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """Even ``(h, w)`` of an image of ``shape`` Fourier-cropped by ``factor`` >= 1."""
    return tuple(max(2, 2 * round(n / (2 * factor))) for n in shape)  # type: ignore[return-value]


def _crop_rows_columns(spectra: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The frequencies of the smaller even ``shape`` (h', w') of rfft spectra ``(..., h,
    w//2+1)``, unscaled (:func:`fourier_crop` scales them); a new tensor."""
    h = spectra.shape[-2]
    ho, wo = shape
    rows = torch.cat([torch.arange(ho // 2), torch.arange(h - ho // 2, h)]).to(spectra.device)
    return spectra[..., rows, : wo // 2 + 1]


def fourier_crop(spectra: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Keep the frequencies of a smaller even ``shape`` = (h', w') of rfft spectra
    ``(..., h, w//2+1)`` -> ``(..., h', w'//2+1)``, scaled so that the real-space mean is
    kept (a Fourier-cropped image has the same values per pixel, at a larger pixel)."""
    h = spectra.shape[-2]
    w = 2 * (spectra.shape[-1] - 1)
    ho, wo = shape
    if ho > h or wo > w:
        raise ValueError(f"cannot crop {h} x {w} to {ho} x {wo}")
    return _crop_rows_columns(spectra, shape).mul_((ho * wo) / (h * w))


def irfft2_by_rows(spectrum: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``torch.fft.irfft2(spectrum, s=shape)`` of one rfft spectrum ``(h, w//2+1)``, as two
    1D transforms along contiguous rows: the inverse along y on the transposed spectrum,
    then the complex-to-real one along x. MKL's 2D complex-to-real transform of a 4k frame
    takes 190-210 ms on our cores, this 115-120 ms (same values to float32 rounding)."""
    columns = torch.fft.ifft(spectrum.t().contiguous(), n=shape[0], dim=-1)  # (w', h)
    return torch.fft.irfft(columns.t().contiguous(), n=shape[1], dim=-1)  # (h, w)


def _frequencies(shape: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``ky (h,)`` and ``kx (w//2+1,)`` in cycles per pixel for the rfft layout."""
    h, w = shape
    ky = torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64)
    return ky, kx


def _ramp_factors(
    shape: tuple[int, int], shifts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The separable factors ``exp(-2πi ky sy)`` ``(b, h)`` and ``exp(-2πi kx sx)``
    ``(b, w//2+1)`` complex64 of :func:`phase_ramp`."""
    ky, kx = _frequencies(shape, shifts.device)
    s = shifts.to(torch.float64)
    ey = torch.exp(-2j * math.pi * ky[None, :] * s[:, 1:2]).to(torch.complex64)
    ex = torch.exp(-2j * math.pi * kx[None, :] * s[:, 0:1]).to(torch.complex64)
    return ey, ex


def phase_ramp(shape: tuple[int, int], shifts: torch.Tensor) -> torch.Tensor:
    """``exp(-2πi k·s)`` ``(b, h, w//2+1)`` complex64 that shifts images of ``shape`` (h, w)
    by ``shifts`` ``(b, 2)`` xy pixels (content at ``x`` moves to ``x + s``)."""
    ey, ex = _ramp_factors(shape, shifts)
    return ey[:, :, None] * ex[:, None, :]


def _bfactor_weights(shape: tuple[int, int], pixel_size: float, bfactor: float, device):
    """``exp(-B |k|²/4)`` (k in 1/Å) ``(h, w//2+1)``, zero at k = 0 (the mean carries no
    shift and dominates a count image)."""
    ky, kx = _frequencies(shape, device)
    k2 = (ky[:, None] ** 2 + kx[None, :] ** 2) / pixel_size**2
    weights = torch.exp(-0.25 * bfactor * k2)
    weights[0, 0] = 0.0
    return weights.to(torch.float32)


def _dft_matrices(n: int, centres: torch.Tensor, offsets: torch.Tensor, rfft: bool) -> torch.Tensor:
    """``exp(2πi k r / n)`` for r = centre + offset, ``(b, p, k)`` (rfft: k = 0..n//2), as
    the product of a per-centre and a per-offset factor (two small ``exp`` calls)."""
    freq = torch.fft.rfftfreq if rfft else torch.fft.fftfreq
    k = freq(n, device=centres.device, dtype=torch.float64) * n
    by_centre = torch.exp(2j * math.pi * centres.to(torch.float64)[:, None] * k / n)  # (b, k)
    by_offset = torch.exp(2j * math.pi * offsets[:, None] * k / n)  # (p, k)
    return by_centre[:, None, :] * by_offset[None, :, :]


def fft_size(n: int) -> int:
    """The smallest even size >= ``n`` whose only prime factors are 2, 3, 5 and 7 (a fast
    FFT length: 692 = 4 x 173 transforms 3-5x slower than 700)."""
    m = n + n % 2
    while True:
        rest = m
        for p in (2, 3, 5, 7):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 2


def _integer_peaks(
    cross: torch.Tensor, shape: tuple[int, int], max_shift: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer maxima ``(ix, iy)`` ``(b,)`` (grid px of ``shape`` (h, w), wrapped to
    -n/2 .. n/2-1) of the correlations whose rfft spectra are ``cross`` ``(b, h, w//2+1)``,
    within ``max_shift`` grid px of 0 if given. The spectra are zero-padded to fast FFT
    sizes (:func:`fft_size`) first: the correlation sampled on a slightly finer grid,
    whose maximum is rounded back to the nearest pixel of ``shape``."""
    h, w = shape
    big = (fft_size(h), fft_size(w))
    if big != shape:
        padded = cross.new_zeros((cross.shape[0], big[0], big[1] // 2 + 1))
        padded[:, : h // 2, : w // 2 + 1] = cross[:, : h // 2]
        padded[:, big[0] - (h - h // 2) :, : w // 2 + 1] = cross[:, h // 2 :]
        if w % 2 == 0:
            padded[:, :, w // 2] *= 0.5  # the Nyquist column is two columns on the big grid
        cross = padded
    image = torch.fft.irfft2(cross, s=big)  # (b, H, W)
    ry = torch.fft.fftfreq(big[0], 1 / big[0], device=cross.device)[:, None] * (h / big[0])
    rx = torch.fft.fftfreq(big[1], 1 / big[1], device=cross.device)[None, :] * (w / big[1])
    if max_shift is not None:
        image = image.masked_fill(rx**2 + ry**2 > max_shift**2, -torch.inf)
    flat = image.flatten(1).argmax(dim=1)
    iy = torch.round(ry[:, 0][flat // big[1]]).long()
    ix = torch.round(rx[0][flat % big[1]]).long()
    return ix, iy


def _peaks(
    cross: torch.Tensor,
    shape: tuple[int, int],
    upsample: int,
    around: torch.Tensor | None,
    max_shift: float | None = None,
    minus: _SeparableTerm | None = None,
) -> torch.Tensor:
    """Sub-pixel peak positions ``(b, 2)`` xy (grid pixels, in (-n/2, n/2]) of the cross-
    correlations whose rfft spectra are ``cross`` ``(b, h, w//2+1)`` (minus the separable
    term ``minus``, when given: it is subtracted inside the matrix DFT, or from ``cross``
    in place before an inverse FFT).

    The correlation is evaluated by matrix DFT on a ``1/upsample`` grid pixel lattice, ±1
    grid pixel around its integer maximum (inverse FFT) or around ``around`` ``(b, 2)``
    rounded (a previous estimate; no inverse FFT); a maximum on the lattice's edge falls
    back to the inverse FFT. The last step is a parabola through the best lattice point's
    neighbours. ``max_shift`` (grid px): the integer maximum is searched within that radius only.
    """
    h, w = shape
    if around is None and minus is not None:
        minus.subtract_from(cross)
        minus = None
    if around is None:
        ix, iy = _integer_peaks(cross, shape, max_shift)
    else:
        ix, iy = around.round().long().unbind(dim=1)
    steps = torch.arange(-upsample, upsample + 1, device=cross.device, dtype=torch.float64)
    offsets = steps / upsample
    ey = _dft_matrices(h, iy, offsets, rfft=False)  # (b, p, h)
    ex = _dft_matrices(w, ix, offsets, rfft=True)  # (b, p, w')
    # Hermitian symmetry: columns 1..w/2-1 stand for two frequencies each
    col = torch.full((w // 2 + 1,), 2.0, dtype=torch.float64, device=cross.device)
    col[0] = 1.0
    col[-1] = 1.0 if w % 2 == 0 else 2.0
    ey, ex = ey.to(torch.complex64), (ex * col).to(torch.complex64)
    fine = (ey @ cross @ ex.transpose(1, 2)).real.double()  # (b, p, p)
    if minus is not None:
        fine -= minus.matrix_dft(ey, ex)
    p = len(offsets)
    best = fine.flatten(1).argmax(dim=1)
    by, bx = best // p, best % p
    if around is not None and bool(((by % (p - 1) == 0) | (bx % (p - 1) == 0)).any()):
        return _peaks(cross, shape, upsample, None, max_shift, minus)

    def parabola(values: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Vertex offset (in lattice steps) of the parabola through i-1, i, i+1."""
        i = i.clamp(1, p - 2)
        rows = torch.arange(len(i), device=values.device)
        a, b, c = values[rows, i - 1], values[rows, i], values[rows, i + 1]
        denom = a - 2 * b + c
        vertex = torch.where(denom < 0, 0.5 * (a - c) / denom, torch.zeros_like(denom))
        return i + vertex.clamp(-1, 1)

    rows = torch.arange(len(best), device=cross.device)
    y = iy + offsets[0] + parabola(fine[rows, :, bx], by) / upsample
    x = ix + offsets[0] + parabola(fine[rows, by, :], bx) / upsample
    return torch.stack([x, y], dim=1)


_BLOCK_BYTES = 1 << 19  # rows of a spectrum summed at once on the CPU: they stay in cache


def _block_rows(spectra: torch.Tensor) -> int:
    """Rows per block of :func:`_ramped_sum`: ~512 kB on the CPU (a 4k frame's sum over
    10 frames 249 -> 182 ms: the product and the running sum stay in cache), all on a GPU
    (one kernel per frame)."""
    if spectra.device.type != "cpu":
        return spectra.shape[-2]
    return max(1, _BLOCK_BYTES // (spectra.shape[-1] * spectra.element_size()))


def _ramped_sum(
    spectra: torch.Tensor,
    ey: torch.Tensor,
    ex: torch.Tensor,
    weights: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_i w_i n F_i ey_i ex_i`` ``(h, w')`` of spectra ``(t, h, w')`` with separable
    factors ``ey`` ``(t, h)`` and ``ex`` ``(t, w')`` and optional real ``weights`` ``w``
    ``(t, h, w')`` with their common factor ``norm`` ``n`` ``(h, w')``.
    Summed in blocks of rows (:func:`_block_rows`), every frame's block multiplied into one
    small buffer and accumulated with its y factor (``addcmul_``): no full-size temporary."""
    h = spectra.shape[-2]
    total = torch.empty_like(spectra[0])
    rows = _block_rows(spectra)
    term = torch.empty((min(rows, h), spectra.shape[-1]), dtype=spectra.dtype,
                       device=spectra.device)  # fmt: skip
    for y in range(0, h, rows):
        block = total[y : y + rows]
        for i in range(len(spectra)):
            out = block if i == 0 else term[: len(block)]
            torch.mul(spectra[i, y : y + rows], ex[i], out=out)
            if weights is not None:
                out.mul_(weights[i, y : y + rows])
                if norm is not None:
                    out.mul_(norm[y : y + rows])
            if i == 0:
                block.mul_(ey[i, y : y + rows, None])
            else:
                block.addcmul_(out, ey[i, y : y + rows, None])
    return total


@dataclass(frozen=True)
class _SeparableTerm:
    """``P_i ⊙ (ay_i ⊗ ax_i)`` ``(t, h, w')``: a real ``P`` ``(t, h, w')`` times a separable
    complex factor, ``ay`` ``(t, h)``, ``ax`` ``(t, w')``. Its matrix DFT ``Ey (P ⊙ a) Exᵀ
    = (Ey ⊙ ay) P (Ex ⊙ ax)ᵀ`` needs no full-size product: real matrix products with ``P``."""

    power: torch.Tensor
    ay: torch.Tensor
    ax: torch.Tensor

    def matrix_dft(self, ey: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        """Real part of ``ey (P ⊙ a) exᵀ`` ``(t, p, p)`` float64 for ``ey`` ``(t, p, h)``
        and ``ex`` ``(t, p, w')``."""
        left = torch.view_as_real(ey * self.ay[:, None, :])  # (t, p, h, 2)
        right = ex * self.ax[:, None, :]  # (t, p, w')
        # (t, 2p, h) @ (t, h, w') -> rows: real and imaginary parts of (Ey ⊙ ay) P
        lr = left.permute(0, 3, 1, 2).flatten(1, 2) @ self.power  # (t, 2p, w')
        p = ey.shape[1]
        product = torch.complex(lr[:, :p], lr[:, p:]) @ right.transpose(1, 2)  # (t, p, p)
        return product.real.double()

    def subtract_from(self, cross: torch.Tensor) -> None:
        """``cross -= P ⊙ (ay ⊗ ax)`` in place."""
        term = torch.empty_like(cross[0])
        for i in range(len(cross)):
            torch.mul(self.power[i], self.ax[i], out=term)
            cross[i].addcmul_(term, self.ay[i][:, None], value=-1)


@dataclass(frozen=True)
class _Grid:
    """The weighted spectra ``(t, h, w')`` an alignment iterates on, their power ``|C|²``
    and the movie pixels per grid pixel (xy)."""

    spectra: torch.Tensor
    power: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.spectra.shape[-2], 2 * (self.spectra.shape[-1] - 1))

    def cropped(self, shape: tuple[int, int]) -> _Grid:
        """The grid Fourier-cropped to ``shape`` (weights are those of the frequencies)."""
        h, w = self.shape
        factor = (shape[0] * shape[1]) / (h * w)
        scale = self.scale * torch.tensor([w / shape[1], h / shape[0]], dtype=torch.float64,
                                          device=self.scale.device)  # fmt: skip
        return _Grid(
            _crop_rows_columns(self.spectra, shape).mul_(factor),
            _crop_rows_columns(self.power, shape).mul_(factor**2),
            scale,
        )


def _refine(
    grid: _Grid,
    shifts: torch.Tensor,
    max_iterations: int,
    tolerance: float,
    upsample: int,
    *,
    searched: bool,
    max_shift: float | None = None,
) -> FrameAlignment:
    """Iterate the alignment from ``shifts`` on ``grid``; ``searched``: ``shifts`` are
    already near the peaks, so no iteration needs a full inverse FFT of the correlations.
    Shifts in and out are in movie pixels.

    Frame ``i``'s correlation with the aligned sum of the others, ``conj(S − C_i R_i) C_i``
    (``S = Σ_j C_j R_j``, ``R`` the separable phase ramps), is computed as ``conj(S) C_i −
    |C_i|² conj(R_i)``: one full-size product per frame; the second, separable term goes
    into the peak's matrix DFT (:class:`_SeparableTerm`)."""
    small, cropped, scale = grid.shape, grid.spectra, grid.scale
    cross = torch.empty_like(cropped)
    change = math.inf
    iteration = 0
    while iteration < max_iterations and change > tolerance:
        iteration += 1
        ey, ex = _ramp_factors(small, -shifts / scale)  # (t, h'), (t, w')
        total = _ramped_sum(cropped, ey, ex).conj_physical()
        torch.mul(cropped, total, out=cross)  # conj(S) C_i
        own = _SeparableTerm(grid.power, ey.conj_physical(), ex.conj_physical())
        guess = shifts / scale if searched or iteration > 1 else None
        limit = None if max_shift is None else max_shift / float(scale.min())
        new = _peaks(cross, small, upsample, guess, limit, own) * scale
        new = new - new[:1]
        change = float((new - shifts).norm(dim=1).max())
        shifts = new
    return FrameAlignment(shifts=shifts, iterations=iteration, last_change=change)


def align_frames(
    spectra: torch.Tensor,
    pixel_size: float,
    *,
    bfactor: float = 150.0,
    align_pixel_size: float = 4.0,
    max_iterations: int = 10,
    tolerance: float = 0.02,
    upsample: int = 10,
    max_shift: float | None = None,
) -> FrameAlignment:
    """Whole-frame shifts of the frames whose rfft spectra are ``spectra`` ``(t, h, w//2+1)``.

    ``pixel_size`` (Å) is the frames'; correlations use frequencies up to the Nyquist of
    ``align_pixel_size`` (Å, Fourier crop; not below the frames' own), weighted by
    ``exp(-bfactor |k|²/4)``. Iterates until the largest shift change is below
    ``tolerance`` pixels or ``max_iterations`` is reached, first on a grid of twice that
    pixel size (to 0.25 px; 4x fewer pixels), then on the full one. Shifts are in movie
    pixels, frame 0 = 0 (module docstring for the sign). ``max_shift`` (movie px) bounds
    each frame's shift from the aligned sum (patches of an already aligned movie).
    """
    shifts = torch.zeros(spectra.shape[0], 2, dtype=torch.float64, device=spectra.device)
    if spectra.shape[0] < 2:
        return FrameAlignment(shifts=shifts, iterations=0, last_change=0.0)
    # both grids are cut from one weighted crop to the fine grid (one pass over the full
    # spectra; the weights depend on the frequency only, so the coarse grid's are a crop)
    shape = (spectra.shape[-2], 2 * (spectra.shape[-1] - 1))
    fine_shape = crop_shape(shape, max(1.0, align_pixel_size / pixel_size))
    grid_pixel_size = pixel_size * shape[0] / fine_shape[0]
    weights = _bfactor_weights(fine_shape, grid_pixel_size, bfactor, spectra.device)
    weights *= (fine_shape[0] * fine_shape[1]) / (shape[0] * shape[1])  # fourier_crop's scale
    cropped = _crop_rows_columns(spectra, fine_shape).mul_(weights)  # (t, h', w')
    parts = torch.view_as_real(cropped)
    power = parts[..., 0].square().addcmul_(parts[..., 1], parts[..., 1])  # |C_i|²
    unit = torch.tensor([shape[1] / fine_shape[1], shape[0] / fine_shape[0]],
                        dtype=torch.float64, device=spectra.device)  # fmt: skip
    fine_grid = _Grid(cropped, power, unit)
    coarse = None
    if 2 * align_pixel_size > 1.5 * pixel_size:
        coarse_shape = crop_shape(fine_shape, max(1.0, 2 * align_pixel_size / grid_pixel_size))
        coarse = _refine(
            fine_grid.cropped(coarse_shape), shifts, max_iterations, max(tolerance, 0.25),
            upsample, searched=False, max_shift=max_shift,
        )  # fmt: skip
        shifts = coarse.shifts
    fine = _refine(
        fine_grid, shifts, max_iterations, tolerance, upsample,
        searched=coarse is not None, max_shift=max_shift,
    )  # fmt: skip
    used = fine.iterations + (coarse.iterations if coarse is not None else 0)
    return FrameAlignment(shifts=fine.shifts, iterations=used, last_change=fine.last_change)


def shifted_sum(
    spectra: torch.Tensor,
    shifts: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_i w_i F_i exp(+2πi k·s_i)``: the frames aligned (moved by ``-s_i``) and summed,
    ``(h, w//2+1)``. ``weights`` ``(t, h, w//2+1)`` (dose weights) are scaled by
    ``sqrt(t / Σ w²)`` at each frequency (Grant & Grigorieff 2015): the noise power of the
    weighted sum is that of the plain sum, which it equals where all weights are 1 (the
    mean count). Summed by :func:`_ramped_sum` (blocks of rows, no full-size temporary)."""
    shape = (spectra.shape[-2], 2 * (spectra.shape[-1] - 1))
    ey, ex = _ramp_factors(shape, -shifts)
    norm = None if weights is None else (len(spectra) / weights.square().sum(dim=0)).sqrt()
    return _ramped_sum(spectra, ey, ex, weights, norm)


def accumulated_motion(
    shifts: np.ndarray, pre_exposure: float, dose_per_frame: float, early_dose: float = 4.0
) -> tuple[float, float, float]:
    """RELION's ``rlnAccumMotionTotal/Early/Late`` of ``shifts`` ``(t, 2)`` (movie px):
    the path length Σ‖s_n − s_{n−1}‖ over frames n = 2..t (1-based), split at frame
    ``c = (early_dose − pre_exposure) / dose_per_frame``: steps with n <= c are early."""
    steps = np.linalg.norm(np.diff(np.asarray(shifts, dtype=np.float64), axis=0), axis=1)
    n = np.arange(2, len(shifts) + 1)
    cut = (early_dose - pre_exposure) / dose_per_frame
    early = float(steps[n <= cut].sum())
    total = float(steps.sum())
    return total, early, total - early
