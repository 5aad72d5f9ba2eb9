"""Local (patch) motion on top of the whole-frame drift, with RELION's polynomial model as the
smoothness prior.

After the whole-frame alignment (:mod:`subtomo.tilt.motion`, same shift convention: ``s``
is where content moved to), the frames are cut into ``patches = (px, py)`` overlapping
patches on the alignment grid and each patch stack is aligned again, which gives a residual
shift per patch and frame. The residuals are fitted with RELION's third-order model
(``rlnMotionModelVersion 1``): the shift at frame ``z`` (0 = first frame) and normalised
position ``(x/w − 0.5, y/h − 0.5)`` is ``Σ c · (z, z², z³) × (1, x, x², y, y², xy)``, 18
coefficients per axis, zero at frame 0 - a smooth field in space and time that no single
noisy patch can bend much (least squares with a small ridge). RELION writes the coefficients
of the correction (``-s``), x block then y block.
"""

from __future__ import annotations

import torch

from subtomo.tilt.motion import crop_shape, fourier_crop, phase_ramp

__all__ = ["fit_motion_model", "local_shifts", "model_shifts", "patch_residuals", "unwarp"]


def _basis(z: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(..., 18)``: (z, z², z³) x (1, x, x², y, y², xy) in RELION's order (time major)."""
    space = torch.stack([torch.ones_like(x), x, x * x, y, y * y, x * y], dim=-1)  # (..., 6)
    time = torch.stack([z, z * z, z * z * z], dim=-1)  # (..., 3)
    return (time[..., :, None] * space[..., None, :]).flatten(-2)


def _edge_window(n: int) -> torch.Tensor:
    """1 in the middle, a raised cosine over the outer eighth at each end (a patch's cut
    edges would otherwise correlate at zero shift)."""
    edge = max(1, n // 8)
    window = torch.ones(n, dtype=torch.float64)
    ramp = 0.5 - 0.5 * torch.cos(torch.pi * (torch.arange(edge, dtype=torch.float64) + 0.5) / edge)
    window[:edge] = ramp
    window[n - edge :] = ramp.flip(0)
    return window


def patch_residuals(
    spectra: torch.Tensor,
    shifts: torch.Tensor,
    pixel_size: float,
    patches: tuple[int, int],
    *,
    align_pixel_size: float = 4.0,
    bfactor: float = 150.0,
    max_iterations: int = 10,
    max_shift: float = 8.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual shifts ``(p, t, 2)`` xy movie px of ``patches`` = (nx, ny) patches (each
    twice the grid step wide, so neighbours overlap by half) of the frames whose spectra are
    ``spectra`` ``(t, h, w//2+1)``, after removing the whole-frame ``shifts`` ``(t, 2)``;
    and the patch centres ``(p, 2)`` normalised to (-0.5, 0.5) xy. A residual is searched
    within ``max_shift`` movie px (beyond it a small noisy patch finds chance peaks)."""
    from subtomo.tilt.motion import align_frames

    shape = (spectra.shape[-2], 2 * (spectra.shape[-1] - 1))
    small = crop_shape(shape, max(1.0, align_pixel_size / pixel_size))
    scale = torch.tensor([shape[1] / small[1], shape[0] / small[0]], dtype=torch.float64)
    cropped = fourier_crop(spectra, small) * phase_ramp(small, -shifts / scale.to(shifts.device))
    frames = torch.fft.irfft2(cropped, s=small)  # (t, h', w') globally aligned
    nx, ny = patches
    h, w = small
    size_y, size_x = 2 * (h // (ny + 1) // 2), 2 * (w // (nx + 1) // 2)
    taper = torch.outer(_edge_window(size_y), _edge_window(size_x)).to(frames)
    residuals, centres = [], []
    for j in range(ny):
        y0 = round(j * (h - size_y) / max(ny - 1, 1))
        for i in range(nx):
            x0 = round(i * (w - size_x) / max(nx - 1, 1))
            patch = frames[:, y0 : y0 + size_y, x0 : x0 + size_x]
            patch = (patch - patch.mean(dim=(-2, -1), keepdim=True)) * taper
            found = align_frames(
                torch.fft.rfft2(patch), pixel_size * shape[0] / h, bfactor=bfactor,
                align_pixel_size=pixel_size * shape[0] / h, max_iterations=max_iterations,
                max_shift=max_shift / float(scale.min()),
            )  # fmt: skip
            residuals.append(found.shifts.cpu() * scale)
            centres.append([(x0 + size_x / 2) / w - 0.5, (y0 + size_y / 2) / h - 0.5])
    return torch.stack(residuals), torch.tensor(centres, dtype=torch.float64)


def _least_squares(residuals: torch.Tensor, centres: torch.Tensor, ridge: float) -> torch.Tensor:
    """The 36 coefficients fitted to ``residuals`` ``(p, t, 2)`` at ``centres`` ``(p, 2)``."""
    p, t, _ = residuals.shape
    z = torch.arange(t, dtype=torch.float64)[None, :].expand(p, t)
    design = _basis(z, centres[:, 0:1].expand(p, t), centres[:, 1:2].expand(p, t)).reshape(-1, 18)
    norms = design.norm(dim=0).clamp_min(1e-12)  # columns scaled alike (z³ >> z)
    scaled = design / norms
    normal = scaled.T @ scaled + ridge * torch.eye(18, dtype=torch.float64)
    target = residuals.reshape(-1, 2).double()
    coefficients = torch.linalg.solve(normal, scaled.T @ target) / norms[:, None]  # (18, 2)
    return coefficients.T.reshape(36)


def fit_motion_model(
    residuals: torch.Tensor, centres: torch.Tensor, ridge: float = 1e-3, max_step: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION's 36 coefficients (x block, y block) of the residual shifts ``(p, t, 2)`` at the
    normalised ``centres`` ``(p, 2)`` and which patches were used ``(p,)`` bool.

    Least squares on unit-norm basis columns with a ``ridge`` that keeps an under-determined
    fit smooth. Patches without signal (empty areas, holes) give random residuals: a patch
    whose residual jumps by more than ``max_step`` px between two frames is left out, then,
    twice, one that the fit misses by more than 3x the median miss (+0.25 px). With no patch
    left the model is zero (whole-frame motion only).
    """
    residuals = residuals.double()
    steps = residuals.diff(dim=1).norm(dim=-1).amax(dim=1)  # (p,) largest jump, px
    keep = steps <= max_step
    frames = torch.arange(residuals.shape[1], dtype=torch.float64)[None, :]
    for _ in range(2):
        if not keep.any():
            return torch.zeros(36, dtype=torch.float64), keep
        coefficients = _least_squares(residuals[keep], centres[keep], ridge)
        fitted = model_shifts(coefficients, frames, centres[:, 0:1], centres[:, 1:2])
        miss = (fitted - residuals).norm(dim=-1).mean(dim=1)  # (p,)
        keep &= miss <= 3 * miss[keep].median() + 0.25
    return _least_squares(residuals[keep], centres[keep], ridge), keep


def model_shifts(coefficients: torch.Tensor, z: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Shifts ``(..., 2)`` xy of the 36-coefficient model at frame(s) ``z`` and normalised
    positions ``x``, ``y`` (broadcast together)."""
    z, x, y = torch.broadcast_tensors(z.double(), x.double(), y.double())
    basis = _basis(z, x, y)  # (..., 18)
    return torch.stack([basis @ coefficients[:18], basis @ coefficients[18:]], dim=-1)


def local_shifts(coefficients: torch.Tensor, frame: int, shape: tuple[int, int]) -> torch.Tensor:
    """The model's shift field ``(h, w, 2)`` xy px of one frame over an image of ``shape``."""
    h, w = shape
    y = (torch.arange(h, dtype=torch.float64) / h - 0.5)[:, None]
    x = (torch.arange(w, dtype=torch.float64) / w - 0.5)[None, :]
    return model_shifts(coefficients, torch.tensor(float(frame)), x, y)


def unwarp(image: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``image`` ``(h, w)`` with content that moved by ``shifts`` ``(h, w, 2)`` xy px put
    back: the value at ``x`` is read at ``x + shifts(x)`` (bicubic, edges reflected)."""
    h, w = image.shape
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=image.device),
        torch.arange(w, dtype=torch.float64, device=image.device),
        indexing="ij",
    )
    sx = x + shifts[..., 0].to(image.device)
    sy = y + shifts[..., 1].to(image.device)
    grid = torch.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], dim=-1)[None]
    out = torch.nn.functional.grid_sample(
        image[None, None], grid.to(image.dtype), mode="bicubic", padding_mode="reflection",
        align_corners=True,
    )  # fmt: skip
    return out[0, 0]
