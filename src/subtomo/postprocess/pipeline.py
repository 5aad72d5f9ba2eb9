"""Post-processing of two half maps: masked FSC with phase-randomisation correction, final
resolution at FSC 0.143, MTF correction, FSC weighting, B-factor sharpening and low-pass.

Follows ``relion_postprocess`` (relion5-conventions section 8). Maps are zyx cubes with the
centre at ``N//2``; Fourier work uses rfft with ``norm="forward"`` (RELION's scaling).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from subtomo.fourier import (
    FSC_THRESHOLD,
    bfactor_weights,
    crossing_shell,
    fsc,
    fsc_threshold_shell,
    irfft_centered,
    lowpass_weights,
    rfft_centered,
    shell_index,
)
from subtomo.postprocess.fsc_correction import (
    corrected_fsc,
    particle_fraction_fsc,
    randomize_phases_beyond,
    randomize_shell,
)
from subtomo.postprocess.sharpen import (
    GuinierFit,
    fit_guinier,
    fsc_weights,
    guinier_curve,
    mtf_weights,
)

__all__ = ["PostprocessOptions", "PostprocessResult", "postprocess", "solvent_fraction"]

log = logging.getLogger("subtomo")


@dataclass
class PostprocessOptions:
    """Options as ``relion_postprocess`` flags (resolutions in Å, B-factors in Å^2)."""

    auto_bfac: bool = True  # --auto_bfac (Guinier fit)
    autob_lowres: float = 10.0  # --autob_lowres
    autob_highres: float = 0.0  # --autob_highres (0: up to Nyquist)
    adhoc_bfac: float = 0.0  # --adhoc_bfac (used when auto_bfac is off)
    skip_fsc_weighting: bool = False  # --skip_fsc_weighting
    low_pass: float = -1.0  # --low_pass: 0 off, negative: at the final resolution
    randomize_at_fsc: float = 0.8  # --randomize_at_fsc
    randomize_at_angst: float = -1.0  # --randomize_at_A (if positive)
    force_mask: bool = False  # --force_mask
    filter_edge_width: int = 2  # --filter_edge_width (shells)
    interpolate: bool = False  # report the interpolated 0.143 crossing as final resolution
    mtf_frequency: np.ndarray | None = None  # rlnResolutionInversePixel of --mtf
    mtf_value: np.ndarray | None = None  # rlnMtfValue of --mtf
    mtf_pixel_size: float | None = None  # --mtf_angpix
    half_maps: bool = False  # --half_maps: filter each half the same way
    random_seed: int = 0  # --random_seed


@dataclass
class PostprocessResult:
    """Everything ``postprocess.star`` and the report need, plus the sharpened map(s)."""

    sharpened: torch.Tensor  # zyx, unmasked
    fsc_unmasked: np.ndarray
    fsc_true: np.ndarray  # the FSC used (corrected, or unmasked after a fall-back)
    resolution: float  # Å, rlnFinalResolution
    resolution_shell: int
    resolution_interpolated: float  # Å, at the interpolated 0.143 crossing
    bfactor: float  # Å^2 applied
    guinier_x: np.ndarray
    guinier: dict[str, np.ndarray]  # label -> ln amplitudes (RELION column names)
    fsc_masked: np.ndarray | None = None
    fsc_random: np.ndarray | None = None
    fsc_particle_fraction: np.ndarray | None = None
    randomize_shell: int | None = None
    solvent_fraction: float | None = None
    fit: GuinierFit | None = None
    low_pass: float = 0.0  # Å applied (0: none)
    used_mask: bool = False
    half_maps: tuple[torch.Tensor, torch.Tensor] | None = None
    warnings: list[str] = field(default_factory=list)


def solvent_fraction(mask: torch.Tensor) -> float:
    """RELION's ``f``: 0.476 (sphere-in-cube volume) over the fraction of voxels > 0.5."""
    inside = float((mask > 0.5).sum()) / mask.numel()
    return 0.476 / inside if inside > 0 else float("inf")


def _fsc(a: torch.Tensor, b: torch.Tensor, shape, index) -> torch.Tensor:
    return fsc(a, b, shape, index=index).double()


def _origin_one(curve: torch.Tensor) -> torch.Tensor:
    """RELION's fix-up: an FSC <= 0 at the origin becomes 1."""
    if curve[0] <= 0:
        curve = curve.clone()
        curve[0] = 1.0
    return curve


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, ...]
    pixel_size: float
    index: torch.Tensor


@dataclass
class _Sharpened:
    map: torch.Tensor
    bfactor: float
    low_pass: float
    fit: GuinierFit | None
    guinier_x: np.ndarray
    guinier: dict[str, np.ndarray]


def _sharpen(
    f: torch.Tensor,
    fsc_true: torch.Tensor,
    grid: _Grid,
    opt: PostprocessOptions,
    low_pass: float,
    bfactor: float | None,
) -> _Sharpened:
    """MTF -> FSC weighting -> B-factor (fitted when ``bfactor`` is None and auto_bfac) ->
    low-pass (``low_pass`` Å, 0: none); Guinier curves recorded after each step."""
    shape, px, index = grid.shape, grid.pixel_size, grid.index
    n = shape[0]
    gx, gy = guinier_curve(f, shape, px, index)
    guinier = {"rlnLogAmplitudesOriginal": gy}
    if opt.mtf_frequency is not None and opt.mtf_value is not None:
        f = f / mtf_weights(
            shape,
            px,
            opt.mtf_frequency,
            opt.mtf_value,
            mtf_pixel_size=opt.mtf_pixel_size,
            device=f.device,
        )
        guinier["rlnLogAmplitudesMTFCorrected"] = guinier_curve(f, shape, px, index)[1]
    if not opt.skip_fsc_weighting:
        f = f * fsc_weights(fsc_true, shape).to(f.device)
        guinier["rlnLogAmplitudesWeighted"] = guinier_curve(f, shape, px, index)[1]
    fit = None
    if bfactor is None:
        bfactor = opt.adhoc_bfac
        if opt.auto_bfac:
            weighted = guinier.get("rlnLogAmplitudesWeighted", guinier["rlnLogAmplitudesOriginal"])
            if "rlnLogAmplitudesMTFCorrected" in guinier and opt.skip_fsc_weighting:
                weighted = guinier["rlnLogAmplitudesMTFCorrected"]
            fit = fit_guinier(
                gx, weighted, n, px, lowres=opt.autob_lowres, highres=opt.autob_highres
            )
            bfactor = fit.bfactor
    if bfactor != 0:
        f = f * bfactor_weights(shape, bfactor, px, device=f.device)
        guinier["rlnLogAmplitudesSharpened"] = guinier_curve(f, shape, px, index)[1]
    if fit is not None:
        guinier["rlnLogAmplitudesIntercept"] = np.full(gx.size, fit.intercept)
    if 0 < low_pass < 999.0:
        f = f * lowpass_weights(
            shape, low_pass, px, edge_width=opt.filter_edge_width, device=f.device
        )
    else:
        low_pass = 0.0
    return _Sharpened(
        map=irfft_centered(f, shape, norm="forward"),
        bfactor=bfactor,
        low_pass=low_pass,
        fit=fit,
        guinier_x=gx,
        guinier=guinier,
    )


def postprocess(
    half1: torch.Tensor,
    half2: torch.Tensor,
    pixel_size: float,
    mask: torch.Tensor | None = None,
    options: PostprocessOptions | None = None,
) -> PostprocessResult:
    """Run the post-processing of two half maps (zyx cubes, Å/px ``pixel_size``).

    ``mask`` (values in [0, 1]) enables the masked and phase-randomised FSCs.
    ``ValueError`` for inconsistent inputs or when no B-factor can be fitted.
    """
    opt = options or PostprocessOptions()
    if half1.shape != half2.shape or half1.ndim != 3 or len(set(half1.shape)) != 1:
        raise ValueError(f"half maps must be equal cubes, got {half1.shape} and {half2.shape}")
    if mask is not None and mask.shape != half1.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from the maps' {half1.shape}")
    shape = tuple(half1.shape)
    n = shape[0]
    dev = half1.device
    index = shell_index(shape, device=dev)
    warnings: list[str] = []

    f1 = rfft_centered(half1.float(), 3, norm="forward")
    f2 = rfft_centered(half2.float(), 3, norm="forward")
    fsc_unmasked = _fsc(f1, f2, shape, index)
    result_extra: dict = {}
    fsc_true = fsc_unmasked
    if mask is not None:
        m = mask.to(dev).float()
        fsc_masked = _origin_one(
            _fsc(
                rfft_centered(half1 * m, 3, norm="forward"),
                rfft_centered(half2 * m, 3, norm="forward"),
                shape,
                index,
            )
        )
        shell = randomize_shell(
            fsc_unmasked,
            n,
            pixel_size,
            at_fsc=opt.randomize_at_fsc,
            at_angst=opt.randomize_at_angst,
        )
        gen = torch.Generator().manual_seed(opt.random_seed)
        r1 = irfft_centered(randomize_phases_beyond(f1, shape, shell, gen), shape, norm="forward")
        r2 = irfft_centered(randomize_phases_beyond(f2, shape, shell, gen), shape, norm="forward")
        fsc_random = _origin_one(
            _fsc(
                rfft_centered(r1 * m, 3, norm="forward"),
                rfft_centered(r2 * m, 3, norm="forward"),
                shape,
                index,
            )
        )
        del r1, r2
        fsc_true = corrected_fsc(fsc_masked, fsc_random, shell)
        frac = solvent_fraction(m)
        result_extra = dict(
            fsc_masked=fsc_masked.cpu().numpy(),
            fsc_random=fsc_random.cpu().numpy(),
            fsc_particle_fraction=particle_fraction_fsc(fsc_unmasked, frac).cpu().numpy(),
            randomize_shell=shell,
            solvent_fraction=frac,
            used_mask=True,
        )
        res_i = fsc_threshold_shell(fsc_true)
        unmasked_i = fsc_threshold_shell(fsc_unmasked)
        if unmasked_i > res_i and not opt.force_mask:
            warnings.append(
                "the unmasked FSC extends beyond the solvent-corrected FSC; using the unmasked "
                "FSC (adjust the mask, or force it with --force-mask)"
            )
            fsc_true = fsc_unmasked
        elif unmasked_i > res_i:
            warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC")
        elif float(fsc_random[res_i]) > 0.1:
            warnings.append(
                "the phase-randomised FSC is larger than 0.10 at the estimated resolution; "
                "use a softer, less featureful mask"
            )

    res_i = fsc_threshold_shell(fsc_true)
    zero = float(fsc_true[0]) < FSC_THRESHOLD
    cross = crossing_shell(fsc_true)
    res_shell = 999.0 if zero or res_i == 0 else n * pixel_size / res_i
    res_interp = 999.0 if zero or cross <= 0 else n * pixel_size / cross
    resolution = res_interp if opt.interpolate else res_shell
    low_pass = resolution if opt.low_pass < 0 else opt.low_pass

    # Sharpening of the average of the halves, in RELION's order.
    ctx = _Grid(shape, pixel_size, index)
    mean = _sharpen((f1 + f2) * 0.5, fsc_true, ctx, opt, low_pass, bfactor=None)
    halves = None
    if opt.half_maps:
        halves = tuple(
            _sharpen(f, fsc_true, ctx, opt, mean.low_pass, bfactor=mean.bfactor).map
            for f in (f1, f2)
        )
    for w in warnings:
        log.warning("WARNING: %s", w)
    return PostprocessResult(
        sharpened=mean.map,
        fsc_unmasked=fsc_unmasked.cpu().numpy(),
        fsc_true=fsc_true.cpu().numpy(),
        resolution=resolution,
        resolution_shell=res_i,
        resolution_interpolated=res_interp,
        bfactor=mean.bfactor,
        guinier_x=mean.guinier_x,
        guinier=mean.guinier,
        fit=mean.fit,
        low_pass=mean.low_pass,
        half_maps=halves,
        warnings=warnings,
        **result_extra,
    )
