"""Image formation: tilt images as RELION 5 models them, plus noise.

For particle ``i`` (centre ``p_i`` in decentred px, RELION matrix ``A_i`` reference ->
tomogram) and tilt ``f`` (projection matrix ``P_f`` with rotation ``R_f``, §1.3), the
particle's image is the projection along z of the map rotated by ``M = R_f A_i``
(``F(k) = F_map(M^T k)``, :mod:`subtomo.simulate.projection`), multiplied in Fourier space by

* the CTF (RELION's ``-sin γ``) with the particle's depth-dependent defocus
  (:func:`subtomo.ctf.particle_defocus`, depth from :func:`subtomo.geometry.project_particles`),
* the dose weight of the tilt's pre-exposure (:func:`subtomo.ctf.dose_weights`),
* optionally a detector MTF (applied to the signal only),
* a phase ramp putting its centre at the exact projected position ``(u, v)`` (0-based pixel
  centres).

The tilt image is MINUS the sum of the particle images (protein dark, as in raw data), plus
noise. Particle images are rendered in patches of twice the box (the 2x padded projection, so
rotated corners and CTF delocalisation are kept) and added into the tilt images; batches of at
most ``batch_size`` patches bound the memory whatever the number of particles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.ctf import aberration_phase, ctf_2d, dose_weights, particle_defocus
from subtomo.fourier import fftfreq_grid, irfft_centered
from subtomo.geometry import project_particles
from subtomo.geometry.deformation import deformation_shift
from subtomo.simulate.projection import VolumeProjector, project_rfft

__all__ = ["Optics", "TiltGeometry", "add_noise", "particle_pixel_mask", "render_tilt_series"]


@dataclass(frozen=True)
class Optics:
    """Microscope and detector. Voltage kV, Cs mm, Q0 fraction, pixel size Å, hand ±1.

    ``mtf`` is ``(frequency, value)``: a detector MTF sampled at frequencies in cycles per
    tilt-image pixel (rlnResolutionInversePixel); ``None`` for none. ``ctf=False`` leaves out
    the CTF (geometry tests). ``even_zernike``/``odd_zernike``: aberrations as RELION's
    rlnEvenZernike/rlnOddZernike (:mod:`subtomo.ctf.aberrations`; with the CTF only).
    """

    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    pixel_size: float = 10.0
    hand: int = -1
    ctf: bool = True
    mtf: tuple[np.ndarray, np.ndarray] | None = None
    even_zernike: tuple[float, ...] = ()
    odd_zernike: tuple[float, ...] = ()


@dataclass(frozen=True)
class TiltGeometry:
    """One tilt series as the images are made: ``t`` tilts in table order.

    ``matrices`` ``(t, 4, 4)`` projection matrices (the *true* ones, with any alignment error),
    ``defocus_u``/``defocus_v`` (Å) and ``defocus_angle`` (deg) the central CTF per tilt,
    ``pre_exposure`` (e/Å²) per tilt, ``tomogram_size`` (W, H, D) and ``image_size`` (w, h) px;
    ``scale`` ``(t,)`` the signal scale of each tilt (rlnCtfScalefactor, e.g. ice attenuation
    :func:`subtomo.ctf.ice_scale`), ``None`` for 1; ``deformation`` ``(t, g_y, g_x, 2)`` a 2D
    deformation of each image (:mod:`subtomo.geometry.deformation`), ``None`` for none.
    """

    matrices: torch.Tensor
    defocus_u: torch.Tensor
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor
    pre_exposure: torch.Tensor
    tomogram_size: tuple[int, int, int]
    image_size: tuple[int, int]
    scale: torch.Tensor | None = None
    deformation: torch.Tensor | None = None


def _mtf_grid(optics: Optics, size: int, device: torch.device) -> torch.Tensor | None:
    """The MTF on the ``(size, size//2+1)`` rfft grid, linearly interpolated in |k| (cycles/px)."""
    if optics.mtf is None:
        return None
    freq, value = (np.asarray(a, dtype=np.float64) for a in optics.mtf)
    k = fftfreq_grid((size, size), dtype=torch.float64).norm(dim=-1).numpy()
    grid = np.interp(k, freq, value)
    return torch.as_tensor(grid, dtype=torch.float32, device=device)


def _add_patches(
    images: torch.Tensor, patches: torch.Tensor, corners: torch.Tensor, tilt_index: torch.Tensor
) -> None:
    """``images[f, y0+i, x0+j] += patches[..., i, j]`` (in place), dropping pixels off the image.

    ``patches`` ``(m, s, s)``, ``corners`` ``(m, 2)`` integer (x0, y0), ``tilt_index`` ``(m,)``.
    """
    _, h, w = images.shape
    s = patches.shape[-1]
    offsets = torch.arange(s, device=images.device)
    x = corners[:, 0, None, None] + offsets[None, None, :]  # (m, 1, s)
    y = corners[:, 1, None, None] + offsets[None, :, None]  # (m, s, 1)
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)  # (m, s, s)
    flat = tilt_index[:, None, None] * (h * w) + y * w + x
    images.view(-1).index_add_(0, flat[inside], patches[inside])


def _aberrated_ctf(
    optics: Optics,
    u: torch.Tensor,
    v: torch.Tensor,
    angle: torch.Tensor,
    s: int,
    k: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """``CTF·e^{iχ_o}`` ``(b, t, s, s//2+1)`` (real without odd aberrations) with the even
    aberrations added to ``γ``: ``−sin(γ + χ_e) = CTF·cos χ_e − CTF₉₀·sin χ_e``, ``CTF₉₀``
    the CTF at a phase shift of 90° (``cos γ``); ``k`` the grid's frequencies (cycles/px)."""

    def ctf(phase_shift: float) -> torch.Tensor:
        return ctf_2d(
            u, v, angle, optics.voltage_kv, optics.cs_mm, optics.amplitude_contrast,
            optics.pixel_size, s, phase_shift_deg=phase_shift, device=device,
        )  # fmt: skip

    out = ctf(0.0)
    kx, ky = k[..., 0] / optics.pixel_size, k[..., 1] / optics.pixel_size
    if optics.even_zernike:
        chi = aberration_phase(optics.even_zernike, "even", kx, ky).to(out.dtype)
        out = out * torch.cos(chi) - ctf(90.0) * torch.sin(chi)
    if optics.odd_zernike:
        chi = aberration_phase(optics.odd_zernike, "odd", kx, ky)
        out = out * torch.polar(torch.ones_like(chi), chi).to(torch.complex64)
    return out


def render_tilt_series(
    projectors: Sequence[VolumeProjector],
    species: torch.Tensor,
    rotations: torch.Tensor,
    positions_px: torch.Tensor,
    geometry: TiltGeometry,
    optics: Optics,
    batch_size: int = 1024,
    displacements_px: torch.Tensor | None = None,
    defocus_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise-free tilt images ``(t, h, w)`` float32: minus the sum of the particle images.

    Parameters
    ----------
    projectors
        One prepared map per species (all the same padded size).
    species
        ``(n,)`` index into ``projectors`` for each particle.
    rotations
        ``(n, 3, 3)`` RELION matrices ``A = A_sub A_part`` (reference -> tomogram).
    positions_px
        ``(n, 3)`` particle centres, decentred bin-1 px (xyz).
    batch_size
        Most patches (particle x tilt) rendered at once; peak memory grows with it, not with n.
    displacements_px
        Optional ``(n, t, 3)`` particle motion (px, tomogram axes, §3): moves the image
        position, not the depth of the CTF.
    defocus_offsets
        ``(n,)`` per-particle defocus in Å added to the depth-dependent one (§23), or ``None``.
    """
    device = projectors[0].dft.device
    s = projectors[0].size
    w, h = geometry.image_size
    t = geometry.matrices.shape[0]
    images = torch.zeros(t, h, w, dtype=torch.float32, device=device)
    tilt_rot = geometry.matrices[:, :3, :3].to(device=device, dtype=torch.float64)  # (t, 3, 3)
    weights = dose_weights(geometry.pre_exposure, optics.pixel_size, s, device=device)  # (t,s,s')
    mtf = _mtf_grid(optics, s, device)
    if mtf is not None:
        weights = weights * mtf
    if geometry.scale is not None:
        weights = weights * geometry.scale.to(device=device, dtype=weights.dtype)[:, None, None]
    k = fftfreq_grid((s, s), device=device, dtype=torch.float64)  # (s, s', xy) cycles/px
    per_batch = max(1, batch_size // t)
    tilts = torch.arange(t, device=device)
    for sp, projector in enumerate(projectors):
        members = torch.nonzero(species == sp).flatten().tolist()
        for start in range(0, len(members), per_batch):
            idx = torch.as_tensor(members[start : start + per_batch])
            uv, depth = project_particles(
                geometry.matrices, positions_px[idx], geometry.tomogram_size,
                None if displacements_px is None else displacements_px[idx],
            )  # fmt: skip
            if geometry.deformation is not None:
                uv = uv + deformation_shift(uv, geometry.deformation.to(uv), geometry.image_size)
            uv, depth = uv.to(device), depth.to(device)  # (b, t, 2), (b, t)
            rot = tilt_rot @ rotations[idx].to(device=device, dtype=torch.float64)[:, None]
            spectra = project_rfft(projector, rot) * weights  # (b, t, s, s')
            if optics.ctf:
                u, v = particle_defocus(
                    geometry.defocus_u.to(device), geometry.defocus_v.to(device), depth,
                    optics.pixel_size, optics.hand,
                )  # fmt: skip
                if defocus_offsets is not None:
                    extra = defocus_offsets[idx].to(device=device, dtype=u.dtype)[:, None]
                    u, v = u + extra, v + extra
                spectra = spectra * _aberrated_ctf(
                    optics, u, v, geometry.defocus_angle.to(device), s, k, device
                )
            centre = torch.round(uv)
            frac = (uv - centre)[..., None, None, :]  # (b, t, 1, 1, 2)
            phase = torch.exp(-2j * torch.pi * (k * frac).sum(-1)).to(spectra.dtype)
            patches = irfft_centered(spectra * phase, (s, s))  # (b, t, s, s), centre at s//2
            corners = (centre - s // 2).long().reshape(-1, 2)
            tilt_index = tilts.expand(len(idx), t).reshape(-1)
            _add_patches(images, -patches.reshape(-1, s, s), corners, tilt_index)
    return images


def particle_pixel_mask(
    uv: torch.Tensor, radius_px: float, image_shape: tuple[int, int, int], batch_size: int = 4096
) -> torch.Tensor:
    """Pixels within ``radius_px`` of any projected particle centre: bool ``(t, h, w)``.

    ``uv`` ``(n, t, 2)`` projected centres (0-based px); ``image_shape`` ``(t, h, w)``.
    """
    t, h, w = image_shape
    mask = torch.zeros(t * h * w, dtype=torch.float32, device=uv.device)
    r = int(np.ceil(radius_px))
    offsets = torch.arange(-r, r + 1, device=uv.device)
    disc = (offsets[None, :] ** 2 + offsets[:, None] ** 2 <= radius_px**2).float()
    flat_uv = uv.reshape(-1, 2)
    tilt_index = torch.arange(t, device=uv.device).expand(uv.shape[0], t).reshape(-1)
    stamps = mask.view(t, h, w)
    for start in range(0, flat_uv.shape[0], batch_size):
        centre = torch.round(flat_uv[start : start + batch_size]).long()
        m = centre.shape[0]
        _add_patches(
            stamps, disc.expand(m, -1, -1).contiguous(), centre - r, tilt_index[start : start + m]
        )
    return stamps > 0


def add_noise(
    images: torch.Tensor,
    signal_mask: torch.Tensor,
    kind: str,
    snr: float,
    electrons_per_pixel: float,
    generator: torch.Generator,
    specimen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tilt images with noise at a target SNR (new tensor).

    ``SNR = var(noise-free image over the pixels covered by particles) / noise variance``:
    the variance of the noise-free images over ``signal_mask`` (pixels within the particle
    radius of any projected centre, all tilts pooled) divided by the per-pixel noise variance.
    ``specimen``: the images whose variance sets the noise instead (the specimen without gold
    beads, so that beads do not raise the noise on the particles).

    * ``gaussian``: white Gaussian noise of that variance.
    * ``poisson``: electron counting. Each pixel receives ``N0 = electrons_per_pixel`` (dose
      per tilt x pixel area) electrons on average, modulated by the contrast ``κ x image`` with
      ``κ`` set so that the expected SNR is ``snr`` (``N0 κ² var = snr``); counts are drawn
      from a Poisson law and mapped back to the image scale as ``(counts / N0 - 1) / κ``, so the
      signal keeps the scale of the other modes and only the noise law differs (shot noise,
      signal-dependent).
    * ``none``: the images unchanged.

    Noise is drawn on the CPU from ``generator`` (the same numbers on every device).
    """
    if kind == "none":
        return images.clone()
    reference = images if specimen is None else specimen
    signal_var = float(reference[signal_mask].var()) if bool(signal_mask.any()) else 0.0
    if signal_var <= 0 or snr <= 0:
        raise ValueError("noise at a target SNR needs particles in the images and snr > 0")
    if kind == "gaussian":
        sigma = (signal_var / snr) ** 0.5
        noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
        return images + sigma * noise.to(images.device)
    if kind == "poisson":
        if electrons_per_pixel <= 0:
            raise ValueError("Poisson noise needs a dose per tilt > 0")
        kappa = (snr / (electrons_per_pixel * signal_var)) ** 0.5
        rate = electrons_per_pixel * (1.0 + kappa * images.cpu().double()).clamp_min(0.0)
        counts = torch.poisson(rate, generator=generator)
        noisy = (counts / electrons_per_pixel - 1.0) / kappa
        return noisy.to(device=images.device, dtype=torch.float32)
    raise ValueError(f"unknown noise kind {kind!r} (gaussian, poisson or none)")
