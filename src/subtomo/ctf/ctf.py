"""RELION's contrast transfer function (relion5-conventions.md §1.4, §1.5, §7.3).

Layout: 2D Fourier arrays ``(..., h, w//2+1)`` in the unshifted rfft layout of
:func:`subtomo.fourier.fftfreq_grid` (origin at index 0, x = 0..w/2, y wraps), frequencies in
cycles/Å. Angles are measured in the image from +x towards +y.

Why not ``torch_ctf.calculate_ctf_2d`` behind an adapter: evaluated with torch-ctf 0.6, an
adapter (defocus in µm as mean and half-difference, U/V swapped with the angle turned by 90°
when U < V, where the library returns NaN) does get the orientation right (its angle 0 puts
defocus U along image x, like RELION, despite its docstring), but it cannot match RELION's
formula to 1e-5: it derives the electron wavelength from CODATA constants, which differs from
RELION's ``12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` by 6e-6 relative, i.e. ~1e-3 rad of
phase at γ ~ 200 rad (typical 3-5 µm defocus near Nyquist), and it evaluates γ in float32,
another ~4e-5 of CTF error. Here γ is evaluated in float64 and only the CTF is float32.
"""

from __future__ import annotations

import math

import torch

from subtomo.ctf._params import Param, as_float64, frequency_grid_2d, resolve_device

__all__ = ["ctf_2d", "ctf_phase", "electron_wavelength_angstrom", "particle_defocus"]


def electron_wavelength_angstrom(voltage_kv: Param) -> torch.Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (RELION's)."""
    v = torch.as_tensor(voltage_kv, dtype=torch.float64) * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))


def ctf_2d(
    defocus_u_angst: Param,
    defocus_v_angst: Param,
    defocus_angle_deg: Param,
    voltage_kv: Param,
    cs_mm: Param,
    amplitude_contrast: Param,
    pixel_size: Param,
    image_size: int | tuple[int, int],
    *,
    phase_shift_deg: Param = 0.0,
    bfactor: Param = 0.0,
    scale: Param = 1.0,
    ignore_until_first_peak: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RELION CTF ``(..., h, w//2+1)`` float32 in the unshifted rfft layout.

    ``CTF(k) = -sin γ(k) · exp(-B |k|²/4) · scale`` with
    ``γ = -π λ Δf(θ) |k|² + (π/2) Cs λ³ |k|⁴ - φ - atan(Q0/√(1-Q0²))`` and
    ``Δf(θ) = U cos²(θ-α) + V sin²(θ-α)`` (θ of the frequency from image +x, α the defocus
    angle; U < V is allowed). Units: defocus Å (positive = underfocus), voltage kV, Cs mm,
    Q0 a fraction, pixel size Å, phase shift degrees, B Å². All parameters may be tensors;
    ``...`` is their broadcast shape. ``image_size`` is ``N`` or ``(h, w)`` in pixels.

    ``ignore_until_first_peak`` (``--ctf_intact_first_peak``): the ``-sin γ`` factor is 1
    wherever ``|γ| < π/2`` (envelope and scale still apply). Like RELION, values with
    ``|CTF| < 1e-8`` are set to 1e-8.
    """
    params = (
        defocus_u_angst,
        defocus_v_angst,
        defocus_angle_deg,
        voltage_kv,
        cs_mm,
        amplitude_contrast,
        pixel_size,
        phase_shift_deg,
        bfactor,
        scale,
    )
    dev = resolve_device(*params, device=device)
    u, v, alpha, kv, cs, q0, px, phi, b, s = as_float64(*params, device=dev)  # (..., 1, 1)
    kx, ky = frequency_grid_2d(image_size, dev)  # cycles/pixel, (h, w')
    gamma = ctf_phase(kx / px, ky / px, u, v, alpha, kv, cs, q0, phase_shift_deg=phi)
    k2 = (kx**2 + ky**2) / px**2  # (..., h, w') in 1/Å²
    ctf = -torch.sin(gamma)
    if ignore_until_first_peak:
        ctf = torch.where(gamma.abs() < 0.5 * math.pi, torch.ones_like(ctf), ctf)
    ctf = ctf * torch.exp(-0.25 * b * k2) * s
    ctf = torch.where(ctf.abs() < 1e-8, torch.full_like(ctf, 1e-8), ctf)
    return ctf.to(torch.float32)


def ctf_phase(
    kx: torch.Tensor,
    ky: torch.Tensor,
    defocus_u_angst: Param,
    defocus_v_angst: Param,
    defocus_angle_deg: Param,
    voltage_kv: Param,
    cs_mm: Param,
    amplitude_contrast: Param,
    *,
    phase_shift_deg: Param = 0.0,
) -> torch.Tensor:
    """RELION's CTF phase γ (radians, float64) at frequencies ``(kx, ky)`` in cycles/Å.

    ``γ = -π λ Δf(θ) |k|² + (π/2) Cs λ³ |k|⁴ - φ - atan(Q0/√(1-Q0²))`` with
    ``Δf(θ) = U cos²(θ-α) + V sin²(θ-α)`` (§1.5); ``CTF = -sin γ``. Frequencies and
    parameters broadcast against each other (any layout: a grid, a list of pixels, a batch
    of candidate defoci against shared frequencies); units as in :func:`ctf_2d`.
    """
    kx, ky = torch.as_tensor(kx, dtype=torch.float64), torch.as_tensor(ky, dtype=torch.float64)
    u, v, alpha, kv, cs, q0, phi = (
        torch.as_tensor(p, dtype=torch.float64, device=kx.device)
        for p in (
            defocus_u_angst,
            defocus_v_angst,
            defocus_angle_deg,
            voltage_kv,
            cs_mm,
            amplitude_contrast,
            phase_shift_deg,
        )
    )
    theta = torch.atan2(ky, kx)
    k2 = kx**2 + ky**2
    lam = electron_wavelength_angstrom(kv)
    defocus = 0.5 * (u + v) + 0.5 * (u - v) * torch.cos(2.0 * (theta - torch.deg2rad(alpha)))
    amplitude_phase = torch.atan(q0 / torch.sqrt(1.0 - q0**2))
    return (
        -math.pi * lam * defocus * k2
        + 0.5 * math.pi * (cs * 1e7) * lam**3 * k2**2
        - torch.deg2rad(phi)
        - amplitude_phase
    )


def particle_defocus(
    defocus_u: Param,
    defocus_v: Param,
    depth_px: torch.Tensor,
    pixel_size: Param,
    hand: Param,
    slope: Param = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-particle, per-tilt defocus ``(U', V')`` in Å (relion5-conventions.md §1.4).

    ``U' = U + hand · slope · px · dz`` (likewise V), with ``dz`` the depth in bin-1 pixels from
    :func:`subtomo.geometry.project_particles` (typically ``(n, t)``), ``px`` the tilt-series
    pixel size in Å, ``hand`` = rlnTomoHand (±1) and ``slope`` the defocus slope. Inputs
    broadcast (e.g. U, V per tilt ``(t,)`` against depth ``(n, t)``); the angle is unchanged.
    """
    depth = torch.as_tensor(depth_px)
    if not depth.is_floating_point():
        depth = depth.double()
    shift = hand * slope * pixel_size * depth
    return defocus_u + shift, defocus_v + shift
