"""Detector movies with known motion: what a counting camera records for one tilt.

A movie of ``n_frames`` frames is made from a specimen image (the tilt image as it would
look without motion): frame ``i`` is the image moved by the drift ``s_i`` (and, optionally,
by a smooth local deformation), times the frame's dose, times the detector's
sensitivity, with Poisson counting noise. The gain reference a user would be given is
``1 / sensitivity``: RELION/MotionCor2 **multiply** frames by the gain.

Units and conventions: shifts ``(t, 2)`` xy in movie pixels, frame 0 = 0, content of frame
``i`` at ``x + s_i`` is the specimen at ``x`` (:mod:`subtomo.tilt.motion`); doses in e/Å²;
pixel size in Å; frames ``(t, h, w)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.errors import InputError

__all__ = [
    "MovieOptions",
    "MovieSimulation",
    "drift_trajectory",
    "gain_pattern",
    "local_deformation",
    "simulate_movie",
    "specimen_texture",
]


@dataclass(frozen=True)
class MovieOptions:
    """How to make the movies of a simulated data set: ``n_frames`` per tilt, drift of about
    ``drift_px`` and local deformation of ``local_px`` (movie px) per movie, a gain pattern
    of relative spread ``gain_spread`` written so that RELION's ``--gain_rot
    gain_rotation --gain_flip gain_flip`` restore it, the specimen's ``contrast`` in the
    frames and the ``file_format`` (``mrc``: float16 MRC stacks; ``tiff``: 8/16-bit)."""

    n_frames: int = 10
    drift_px: float = 4.0
    local_px: float = 0.0
    gain_spread: float = 0.1
    gain_rotation: int = 0
    gain_flip: int = 0
    contrast: float = 0.1
    file_format: str = "mrc"

    def __post_init__(self) -> None:
        if self.file_format not in ("mrc", "tiff"):
            raise InputError(f"--movie-format must be mrc or tiff, got {self.file_format!r}")
        if self.gain_flip not in (0, 1, 2):
            raise InputError(f"--movie-gain-flip must be 0, 1 or 2, got {self.gain_flip}")


@dataclass(frozen=True)
class MovieSimulation:
    """A simulated movie: ``frames`` ``(t, h, w)`` float32 integer counts, the true
    whole-frame ``shifts`` ``(t, 2)`` xy px and the true local ``deformation``
    ``(t, 2, gh, gw)`` xy px on a coarse grid spanning the frame (``None`` if none)."""

    frames: torch.Tensor
    shifts: torch.Tensor
    deformation: torch.Tensor | None


def drift_trajectory(
    n_frames: int, total_px: float, rng: np.random.Generator, *, jitter_px: float = 0.1
) -> np.ndarray:
    """A stage-drift path ``(t, 2)`` xy px, frame 0 = 0: a decelerating drift (fast at the
    start of the exposure, as beam-induced motion is) of length about ``total_px`` in a
    random direction, plus a random walk of ``jitter_px`` per frame."""
    direction = rng.uniform(0.0, 2.0 * math.pi)
    frames = np.arange(n_frames, dtype=np.float64)
    along = total_px * np.sqrt(frames / max(n_frames - 1, 1))
    path = along[:, None] * np.array([math.cos(direction), math.sin(direction)])
    walk = np.cumsum(rng.normal(0.0, jitter_px, size=(n_frames, 2)), axis=0)
    path = path + walk
    return path - path[:1]


def local_deformation(
    n_frames: int, amplitude_px: float, rng: np.random.Generator, grid: int = 9
) -> np.ndarray:
    """A smooth deformation ``(t, 2, grid, grid)`` xy px sampled on a grid spanning the frame
    (corners included): per axis a random quadratic field of the normalised position
    (x, x², y, y², xy; mean over the frame removed - that part is drift), of RMS
    ``amplitude_px`` at the last frame, growing linearly from 0 at frame 0 (as a specimen
    domes under the beam)."""
    u = np.linspace(-0.5, 0.5, grid)
    y, x = np.meshgrid(u, u, indexing="ij")
    terms = np.stack([x, x * x, y, y * y, x * y])  # (5, g, g)
    field = np.einsum("at,tij->aij", rng.normal(size=(2, 5)), terms)
    field -= field.mean(axis=(1, 2), keepdims=True)
    field *= amplitude_px / max(float(np.sqrt((field**2).sum(axis=0).mean())), 1e-12)
    time = np.arange(n_frames, dtype=np.float64) / max(n_frames - 1, 1)
    return time[:, None, None, None] * field[None]


def gain_pattern(
    shape: tuple[int, int], rng: np.random.Generator, spread: float = 0.1
) -> np.ndarray:
    """Detector sensitivity ``(h, w)`` around 1: per-column and per-pixel variations of
    relative size ``spread`` (a real gain has both), always > 0.2."""
    h, w = shape
    columns = rng.normal(0.0, spread, size=(1, w))
    pixels = rng.normal(0.0, spread, size=(h, w))
    return np.clip(1.0 + columns + pixels, 0.2, None).astype(np.float32)


def specimen_texture(
    shape: tuple[int, int], pixel_size: float, rng: np.random.Generator, *, resolution: float = 8.0
) -> np.ndarray:
    """A zero-mean, unit-variance random texture ``(h, w)`` with power down to
    ``resolution`` Å (a stand-in for ice and specimen when there is no tilt image)."""
    noise = torch.from_numpy(rng.normal(size=shape))
    ky = torch.fft.fftfreq(shape[0], dtype=torch.float64)[:, None] / pixel_size
    kx = torch.fft.rfftfreq(shape[1], dtype=torch.float64)[None, :] / pixel_size
    k = torch.sqrt(kx**2 + ky**2)
    image = torch.fft.irfft2(torch.fft.rfft2(noise) * torch.exp(-((k * resolution) ** 2)), s=shape)
    image = image - image.mean()
    return (image / image.std()).numpy().astype(np.float32)


def _moved(image: torch.Tensor, shift: torch.Tensor, field: torch.Tensor | None) -> torch.Tensor:
    """``image`` ``(h, w)`` with its content moved by ``shift`` (xy px) plus a deformation
    ``field`` ``(2, gh, gw)`` xy px interpolated over the frame (content at x goes to x + d)."""
    h, w = image.shape
    if field is None:
        ky = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
        kx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
        ramp = torch.exp(-2j * math.pi * (kx * shift[0] + ky * shift[1]))
        return torch.fft.irfft2(torch.fft.rfft2(image.double()) * ramp, s=(h, w)).float()
    d = torch.nn.functional.interpolate(
        field[None].double(), size=(h, w), mode="bicubic", align_corners=True
    )[0]  # (2, h, w)
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    # content at x goes to x + s + d(x): sample the image at x - s - d (d varies slowly)
    sx = x - shift[0] - d[0]
    sy = y - shift[1] - d[1]
    grid = torch.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], dim=-1)[None]
    out = torch.nn.functional.grid_sample(
        image.double()[None, None], grid, mode="bicubic", padding_mode="reflection",
        align_corners=True,
    )  # fmt: skip
    return out[0, 0].float()


def simulate_movie(
    specimen: np.ndarray | torch.Tensor,
    *,
    pixel_size: float,
    dose: float,
    n_frames: int,
    shifts: np.ndarray,
    contrast: float = 0.1,
    sensitivity: np.ndarray | None = None,
    deformation: np.ndarray | None = None,
    rng: np.random.Generator,
) -> MovieSimulation:
    """Counts ``(t, h, w)`` of a movie of ``specimen`` (zero mean, unit variance; e.g.
    :func:`specimen_texture` or a normalised tilt image) at total ``dose`` e/Å² spread
    evenly over ``n_frames``: the expected count of frame i at pixel x is
    ``sensitivity(x) · dose/t · px² · max(0, 1 + contrast · specimen(x − s_i − d_i(x)))``,
    then Poisson. ``shifts`` ``(t, 2)`` and ``deformation`` ``(t, 2, gh, gw)`` in px."""
    image = torch.as_tensor(np.asarray(specimen), dtype=torch.float32)
    electrons = dose / n_frames * pixel_size**2  # mean e/px per frame
    s = torch.as_tensor(shifts, dtype=torch.float64)
    fields = None if deformation is None else torch.as_tensor(deformation, dtype=torch.float64)
    gain = (
        torch.ones_like(image)
        if sensitivity is None
        else torch.as_tensor(sensitivity, dtype=torch.float32)
    )
    frames = torch.empty((n_frames, *image.shape), dtype=torch.float32)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    for i in range(n_frames):
        moved = _moved(image, s[i], None if fields is None else fields[i])
        rate = (electrons * gain * (1.0 + contrast * moved).clamp_min(0.0)).double()
        frames[i] = torch.poisson(rate, generator=generator).float()
    return MovieSimulation(frames=frames, shifts=s, deformation=fields)
