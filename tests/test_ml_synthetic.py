"""Synthetic particle batches for the ML engine tests, made independently of subtomo.ml.

Tilt images are real-space projections of a real map (rotated with scipy's trilinear
``affine_transform``, summed along z, shifted with ``ndimage.shift``), multiplied in Fourier
space by a CTF and dose weight, plus white Gaussian noise; then premultiplied as RELION's 2D
stacks. The helpers' own tests check them against the engine's geometric conventions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from subtomo.ctf import ctf_2d, dose_weights
from subtomo.fourier import fftfreq_grid, rfft_centered
from subtomo.fourier.slices import extract_slices
from subtomo.geometry import tilt_rotations
from subtomo.io import read_mrc
from subtomo.ml.batch import ParticleBatch
from subtomo.ml.projector import _sinc2, pad_centred

MAPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "maps"


@functools.lru_cache(maxsize=4)
def small_map(name: str, box: int) -> tuple[torch.Tensor, float]:
    """A shared ribosome map Fourier-cropped to ``box`` (zyx float64) and its pixel size."""
    vol, px = read_mrc(MAPS / name)
    n = vol.shape[-1]
    big = 92
    pad = torch.zeros(big, big, big, dtype=torch.float64)
    lo = big // 2 - n // 2
    pad[lo : lo + n, lo : lo + n, lo : lo + n] = vol.double()
    f = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(pad)))
    c, h = big // 2, box // 2
    f = f[c - h : c + h, c - h : c + h, c - h : c + h]
    out = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(f))).real * (box / big) ** 3
    return out / out.std(), px * big / box


def random_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3, 3)`` uniformly random rotations (float64)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def project_real_space(volume: np.ndarray, matrix: np.ndarray, shift_xy: np.ndarray) -> np.ndarray:
    """Projection along z of ``volume`` rotated by RELION ``matrix`` (a reference point r goes to
    ``matrix @ r`` about the centre n//2), then shifted by ``shift_xy`` pixels."""
    n = volume.shape[0]
    c = np.full(3, n // 2, dtype=np.float64)
    perm = np.eye(3)[::-1]  # xyz <-> zyx
    m = perm @ matrix.T @ perm  # out(x) = V(A^T (x - c) + c) in zyx index order
    rotated = ndimage.affine_transform(volume, m, offset=c - m @ c, order=1)
    return ndimage.shift(rotated.sum(0), (shift_xy[1], shift_xy[0]), order=3, mode="wrap")


@dataclass
class Truth:
    """Ground truth of a synthetic batch."""

    rotations: torch.Tensor  # (b, 3, 3) true A_part
    offsets: torch.Tensor  # (b, 3) true offsets, Å
    classes: torch.Tensor  # (b,)
    noise_sigma2: float  # RELION sigma2 (per real/imag part) of the white noise


def make_batch(
    maps: list[torch.Tensor],
    pixel_size: float,
    n_particles: int,
    *,
    tilts_deg: tuple[float, ...] = (-45.0, -30.0, -15.0, 0.0, 15.0, 30.0, 45.0),
    noise_std: float = 1.0,
    max_offset_angst: float = 0.0,
    seed: int = 0,
    random_subtomo: bool = True,
    index_start: int = 0,
    fourier: bool = False,
) -> tuple[ParticleBatch, Truth]:
    """A batch of premultiplied tilt-series particles with known poses and noise.

    Particle ``i`` shows ``maps[i % len(maps)]``. Noise is white in real space with standard
    deviation ``noise_std`` per pixel, i.e. RELION ``sigma2 = n^2 noise_std^2 / 2``.
    ``fourier=True`` makes the noise-free images exactly the engine's model instead (central
    slices of the padded map by ``subtomo.fourier.slices.extract_slices``, Fourier shift).
    """
    g = torch.Generator().manual_seed(seed)
    n = maps[0].shape[-1]
    f = len(tilts_deg)
    a_part = random_rotations(n_particles, g)
    a_sub = (
        random_rotations(n_particles, g)
        if random_subtomo
        else torch.eye(3, dtype=torch.float64).expand(n_particles, 3, 3)
    )
    offsets = (torch.rand(n_particles, 3, generator=g, dtype=torch.float64) * 2 - 1) * (
        max_offset_angst / 3**0.5
    )
    t64 = torch.tensor(tilts_deg, dtype=torch.float64)
    r_f = tilt_rotations(torch.zeros_like(t64), t64, torch.full_like(t64, 85.0))  # (f, 3, 3)
    tilt_rot = r_f[None] @ a_sub[:, None]  # (b, f, 3, 3)
    defocus = 40000.0 + 3000.0 * torch.rand(n_particles, f, generator=g, dtype=torch.float64)
    ctf = ctf_2d(defocus, defocus - 500.0, 30.0, 300.0, 2.7, 0.07, pixel_size, n)
    dose = dose_weights(
        3.0 * torch.arange(f, dtype=torch.float64).expand(n_particles, f), pixel_size, n
    )
    c = (ctf * dose).double()  # (b, f, n, n//2+1)
    classes = torch.arange(n_particles) % len(maps)
    if fourier:
        signal = _fourier_images(maps, classes, tilt_rot, a_part, offsets, pixel_size)
    else:
        images = np.empty((n_particles, f, n, n))
        for i in range(n_particles):
            vol = maps[int(classes[i])].numpy()
            for t in range(f):
                m = (tilt_rot[i, t] @ a_part[i]).numpy()
                s = -(tilt_rot[i, t] @ offsets[i]).numpy()[:2] / pixel_size
                images[i, t] = project_real_space(vol, m, s)
        signal = rfft_centered(torch.from_numpy(images), 2)
    noise = torch.randn(n_particles, f, n, n, generator=g, dtype=torch.float64) * noise_std
    x_raw = c * signal + rfft_centered(noise, 2)
    batch = ParticleBatch(
        data=(c * x_raw).to(torch.complex64),
        ctf2=(c**2).float(),
        visible=torch.ones(n_particles, f, dtype=torch.bool),
        tilt_rotations=tilt_rot,
        rotations=a_part,
        offsets=offsets,
        optics_group=torch.zeros(n_particles, dtype=torch.long),
        index=torch.arange(index_start, index_start + n_particles),
        classes=classes,
        pixel_size=pixel_size,
    )
    truth = Truth(a_part, offsets, classes, n * n * noise_std**2 / 2)
    return batch, truth


def _fourier_images(maps, classes, tilt_rot, a_part, offsets, pixel_size) -> torch.Tensor:
    """rfft images ``(b, f, n, n//2+1)``: slices at ``R_f A_sub A_part`` shifted to the centre
    ``-[R_f A_sub o]_xy / px``."""
    n = maps[0].shape[-1]
    out = torch.empty(*tilt_rot.shape[:2], n, n // 2 + 1, dtype=torch.complex128)
    k = fftfreq_grid((n, n), dtype=torch.float64)  # (n, n//2+1, 2) cycles/pixel
    for c, vol in enumerate(maps):
        sel = classes == c
        vol_rfft = rfft_centered(pad_centred(vol.double(), 2 * n) / _sinc2(2 * n, vol.device), 3)
        mats = tilt_rot[sel] @ a_part[sel][:, None]  # (m, f, 3, 3)
        sl = extract_slices(vol_rfft, mats.reshape(-1, 3, 3), padding=2.0)
        sl = sl.reshape(*mats.shape[:2], n, n // 2 + 1)
        s = -(tilt_rot[sel] @ offsets[sel][:, None, :, None])[..., :2, 0] / pixel_size
        phase = -2 * np.pi * (k[None, None] * s[:, :, None, None, :]).sum(-1)
        out[sel] = sl * torch.polar(torch.ones_like(phase), phase)
    return out


def perturb(rotations: torch.Tensor, angle_deg: float, generator: torch.Generator) -> torch.Tensor:
    """Rotations turned by exactly ``angle_deg`` about random axes."""
    axis = torch.randn(rotations.shape[0], 3, generator=generator, dtype=torch.float64)
    v = torch.deg2rad(torch.tensor(angle_deg)) * axis / axis.norm(dim=1, keepdim=True)
    zero = torch.zeros_like(v[:, 0])
    skew = torch.stack(
        [
            torch.stack([zero, -v[:, 2], v[:, 1]], -1),
            torch.stack([v[:, 2], zero, -v[:, 0]], -1),
            torch.stack([-v[:, 1], v[:, 0], zero], -1),
        ],
        -2,
    )
    return torch.linalg.matrix_exp(skew) @ rotations


def test_random_rotations_are_rotations() -> None:
    """random_rotations gives proper rotations; if not, every synthetic pose is invalid."""
    r = random_rotations(5, torch.Generator().manual_seed(1))
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(r @ r.transpose(1, 2), eye.expand(5, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(5, dtype=torch.float64))
