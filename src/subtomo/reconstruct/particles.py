"""Particle slices from tilt series or from extracted 2D stacks, into half-set accumulators.

Conventions (relion5-conventions.md §1.3–1.5, §5, §6). Positions are in bin-1 tilt-series
pixels, image arrays yx, Fourier slices in the unshifted rfft layout with the box centre N//2
at the origin. Each observation is one (particle, tilt) pair; its rotation is
``R_f · A_sub · A_part`` (reference -> tilt-image axes), its data are premultiplied by
``-CTF · dose`` and its weight is ``(CTF · dose)^2``. Work is batched over pairs, so memory
depends on the batch and box size only; the caller keeps one tilt series in memory at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from subtomo.ctf import (
    aberration_phase,
    ctf_2d,
    dose_cutoff_mask,
    dose_weights,
    electron_wavelength_angstrom,
    particle_defocus,
)
from subtomo.errors import InputError
from subtomo.fourier import fftfreq_grid, rfft_centered
from subtomo.geometry import project_particles, tomogram_centre_px
from subtomo.geometry.deformation import deformation_shift
from subtomo.reconstruct.extraction import circle_crop, cut_patches, fourier_resize, phase_ramp
from subtomo.reconstruct.parallel import cpu_workers, map_batches

if TYPE_CHECKING:
    from subtomo.data import ParticleSet, TiltSeries, Trajectories

__all__ = [
    "ParticleGeometry",
    "TiltSeriesCtf",
    "ctf_of_tilt_series",
    "ctf_quadrature",
    "extract_slices",
    "insert_stacks",
    "insert_tilt_series",
    "particle_geometry",
    "premultiply_filter",
    "series_geometry",
    "visible_frames",
]

Progress = Callable[[int], None]


@dataclass(frozen=True)
class TiltSeriesCtf:
    """CTF and dose of one tilt series, per frame ``(t,)`` (tomograms.star, §1.4–1.5).

    Defocus in Å at the specimen centre (positive underfocus), angles in degrees, doses in
    e/Å², B-factors in Å², voltage kV, Cs mm, ``pixel_size`` the bin-1 tilt-series pixel (Å);
    ``even_zernike``/``odd_zernike`` the aberrations of the particles' optics group (RELION's
    rlnEvenZernike/rlnOddZernike, :mod:`subtomo.ctf.aberrations`; empty: none).
    """

    defocus_u: torch.Tensor
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor
    pre_exposure: torch.Tensor
    voltage_kv: float
    cs_mm: float
    amplitude_contrast: float
    pixel_size: float
    hand: float = 1.0
    defocus_slope: float = 1.0
    phase_shift: torch.Tensor | float = 0.0
    bfactor: torch.Tensor | float = 0.0
    scale: torch.Tensor | float = 1.0
    bfactor_per_electron_dose: float = 0.0
    even_zernike: tuple[float, ...] = ()
    odd_zernike: tuple[float, ...] = ()


def ctf_of_tilt_series(series, particles: ParticleSet | None = None) -> TiltSeriesCtf:
    """The :class:`TiltSeriesCtf` of a :class:`subtomo.data.TiltSeries`, with the aberrations
    of the optics group of its particles in ``particles`` (:meth:`ParticleSet.aberrations`)
    when given."""

    def as_tensor(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)

    aberrations = ((), ()) if particles is None else particles.aberrations(series.name)
    return TiltSeriesCtf(
        defocus_u=as_tensor(series.defocus_u),
        defocus_v=as_tensor(series.defocus_v),
        defocus_angle=as_tensor(series.defocus_angle),
        pre_exposure=as_tensor(series.pre_exposure),
        voltage_kv=series.voltage_kv,
        cs_mm=series.cs_mm,
        amplitude_contrast=series.amplitude_contrast,
        pixel_size=series.pixel_size,
        hand=float(series.hand),
        defocus_slope=series.defocus_slope,
        phase_shift=as_tensor(series.phase_shift),
        bfactor=as_tensor(series.ctf_bfactor),
        scale=as_tensor(series.ctf_scale),
        bfactor_per_electron_dose=series.bfactor_per_electron_dose or 0.0,
        **dict(zip(("even_zernike", "odd_zernike"), aberrations, strict=True)),
    )


@dataclass(frozen=True)
class ParticleGeometry:
    """Where ``n`` particles of one tilt series appear in its ``t`` tilts (float64).

    ``centres_px`` ``(n, 3)``: decentred bin-1 pixels including the origin offsets;
    ``uv`` ``(n, t, 2)``: image positions with trajectories; ``depth`` ``(n, t)``: depth in
    pixels for the CTF (without trajectories, §1.4, plus any per-particle defocus expressed
    as depth, §23); ``a_sub``/``a_part`` ``(n, 3, 3)``: the
    subtomogram and particle rotations; ``tilt_rotations`` ``(t, 3, 3)``: R_f.
    """

    centres_px: torch.Tensor
    uv: torch.Tensor
    depth: torch.Tensor
    a_sub: torch.Tensor
    a_part: torch.Tensor
    tilt_rotations: torch.Tensor

    def matrices(self, include_particle: bool = True) -> torch.Tensor:
        """``(n, t, 3, 3)`` = R_f · A_sub · A_part (or R_f · A_sub)."""
        a = self.a_sub @ self.a_part if include_particle else self.a_sub
        return self.tilt_rotations[None] @ a[:, None]


def particle_geometry(
    centered_angst: torch.Tensor,
    origins_angst: torch.Tensor,
    a_sub: torch.Tensor,
    a_part: torch.Tensor,
    projection: torch.Tensor,
    pixel_size: float,
    tomogram_size: Sequence[int],
    trajectories_angst: torch.Tensor | None = None,
    defocus_offset_angst: torch.Tensor | None = None,
    defocus_per_px: float = 1.0,
    deformation: tuple[torch.Tensor, tuple[int, int]] | None = None,
) -> ParticleGeometry:
    """Positions and rotations of ``n`` particles of one tilt series (§1.3, §2.2).

    ``centered_angst`` ``(n, 3)`` = rlnCenteredCoordinate*Angst, ``origins_angst`` ``(n, 3)``
    = rlnOrigin*Angst (subtomogram frame), ``a_sub``/``a_part`` ``(n, 3, 3)``, ``projection``
    the ``(t, 4, 4)`` P_f, ``trajectories_angst`` optional ``(n, t, 3)``. The centre is
    ``p = C/px + c_tomo - A_sub·o/px``. ``defocus_offset_angst`` ``(n,)`` per-particle
    defocus (§23) enters ``depth`` as ``offset / defocus_per_px`` (hand·slope·px, Å of
    defocus per pixel of depth, §1.4), so every CTF made from ``depth`` includes it.
    ``deformation``: a 2D deformation field ``(t, g_y, g_x, 2)`` and the image size (w, h)
    it spans (:mod:`subtomo.geometry.deformation`), added to ``uv``.
    """
    a_sub = torch.as_tensor(a_sub, dtype=torch.float64)
    centres = torch.as_tensor(centered_angst, dtype=torch.float64) / pixel_size
    centres = centres + tomogram_centre_px(tomogram_size)
    origins = torch.as_tensor(origins_angst, dtype=torch.float64) / pixel_size
    centres = centres - (a_sub @ origins[..., None])[..., 0]
    uv, depth = project_particles(
        projection, centres, tomogram_size, trajectories_angst, pixel_size
    )
    if deformation is not None:
        uv = uv + deformation_shift(uv, *deformation)
    if defocus_offset_angst is not None and bool((defocus_offset_angst != 0).any()):
        if defocus_per_px == 0:
            raise InputError("a per-particle defocus needs rlnTomoDefocusSlope != 0")
        depth = depth + torch.as_tensor(defocus_offset_angst, dtype=depth.dtype)[:, None] / (
            defocus_per_px
        )
    return ParticleGeometry(
        centres_px=centres,
        uv=uv,
        depth=depth,
        a_sub=a_sub,
        a_part=torch.as_tensor(a_part, dtype=torch.float64),
        tilt_rotations=projection[:, :3, :3].double(),
    )


def series_geometry(
    parts: ParticleSet,
    series: TiltSeries,
    motion: Trajectories | None,
    image_size: tuple[int, int] | None = None,
) -> ParticleGeometry:
    """:class:`ParticleGeometry` of the particles of ``parts`` (all in ``series``)."""
    names = parts.particles["rlnTomoParticleName"].astype(str).tolist()
    traj = None if motion is None else motion.displacements_angst(names, series.n_tilts)
    return particle_geometry(
        parts.centered_coordinates_angst(),
        parts.origins_angst(),
        parts.subtomogram_matrices(),
        parts.particle_matrices(),
        series.projection_matrices(image_size),
        series.pixel_size,
        series.tomogram_size,
        traj,
        parts.defocus_offsets(),
        series.hand * series.defocus_slope * series.pixel_size,
        _deformation(series, image_size),
    )


def _deformation(
    series: TiltSeries, image_size: tuple[int, int] | None
) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """``series``' deformation field and the image size it spans, or ``None``."""
    field = series.deformation
    if field is None:
        return None
    size = image_size if image_size is not None else series.image_size
    if size is None:
        raise InputError(
            "a deformation field needs the tilt image size: no rlnMicrographName/"
            "rlnTomoTiltSeriesName images", file=series.tilt_file, block=series.name,
        )  # fmt: skip
    return field, size


def _per_frame(value: torch.Tensor | float, frames: torch.Tensor) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value.to(frames.device)[frames]
    return value


@functools.lru_cache(maxsize=4)
def _series_tables(
    ctf: TiltSeriesCtf,
    px: float,
    size: int,
    use_bfactor: bool,
    cutoff_fract: float | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tilt tables of one tilt series, cached per ``ctf`` object (every batch of a series
    uses the same; treat a :class:`TiltSeriesCtf` as immutable).

    ``G = (-sin γ_t + i cos γ_t)·E_t·D_t`` ``(t, size, size//2+1)`` complex: the CTF of the
    tilt at the specimen centre (real part; envelope ``E_t`` = B-factor and scale) and its
    quadrature (imaginary part), times the dose weights ``D_t`` ``(t, size, size//2+1)``
    (zero beyond the dose cut-off when ``cutoff_fract`` is given), which come second; then
    ``-π λ k_y²`` ``(size,)`` and ``-π λ k_x²`` ``(size//2+1,)`` in rad per Å of defocus
    change (float64)."""
    frames = torch.arange(ctf.defocus_u.shape[0], device=device)

    def table(quarter_turns: float) -> torch.Tensor:  # γ - π/2: -sin(γ - π/2) = cos γ
        return ctf_2d(
            ctf.defocus_u.to(device), ctf.defocus_v.to(device), ctf.defocus_angle.to(device),
            ctf.voltage_kv, ctf.cs_mm, ctf.amplitude_contrast, px, size,
            phase_shift_deg=_per_frame(ctf.phase_shift, frames) + 90.0 * quarter_turns,
            bfactor=_per_frame(ctf.bfactor, frames) if use_bfactor else 0.0,
            scale=_per_frame(ctf.scale, frames), device=device,
        )  # fmt: skip

    dose = dose_weights(
        ctf.pre_exposure.to(device),
        px,
        size,
        bfactor_per_electron_dose=ctf.bfactor_per_electron_dose,
        device=device,
    )
    if cutoff_fract is not None:
        dose = dose * dose_cutoff_mask(dose, cutoff_fract)
    scale = -math.pi * float(electron_wavelength_angstrom(ctf.voltage_kv)) / px**2
    ky = torch.fft.fftfreq(size, d=1.0 / size, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(size, d=1.0 / size, device=device, dtype=torch.float64)
    quadrature = torch.complex(table(0.0), table(1.0)) * dose
    if ctf.even_zernike:  # −sin(γ + χ) + i cos(γ + χ) = (−sin γ + i cos γ)·e^{iχ}
        chi = aberration_phase(ctf.even_zernike, "even", *_frequencies_angst(size, px, device))
        quadrature = quadrature * torch.polar(torch.ones_like(chi), chi).to(quadrature.dtype)
    return quadrature, dose, scale * (ky / size) ** 2, scale * (kx / size) ** 2


def _frequencies_angst(size: int, px: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``kx, ky`` (1/Å, float64) of the rfft grid ``(size, size//2+1)`` at pixel ``px`` Å."""
    k = fftfreq_grid((size, size), pixel_size=px, device=device, dtype=torch.float64)
    return k[..., 0], k[..., 1]


@functools.lru_cache(maxsize=4)
def odd_aberration_correction(
    ctf: TiltSeriesCtf, size: int, binning: float, device: torch.device
) -> torch.Tensor | None:
    """``e^{−iχ_o}`` ``(size, size//2+1)`` complex64, the correction Extract applies to the
    data for the odd aberrations of ``ctf`` (:mod:`subtomo.ctf.aberrations`) at pixel
    ``binning · ctf.pixel_size``; ``None`` without odd aberrations."""
    if not ctf.odd_zernike:
        return None
    kx, ky = _frequencies_angst(size, binning * ctf.pixel_size, device)
    chi = aberration_phase(ctf.odd_zernike, "odd", kx, ky)
    return torch.polar(torch.ones_like(chi), -chi).to(torch.complex64)


def ctf_quadrature(
    ctf: TiltSeriesCtf,
    frames: torch.Tensor,
    depth_px: torch.Tensor,
    size: int,
    binning: float,
    *,
    use_bfactor: bool = True,
    cutoff_fract: float | None = None,
    defocus_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-sin γ + i cos γ)·E·dose`` ``(b, size, size//2+1)`` complex, and the dose weights.

    The real part is the ``CTF · dose`` of :func:`premultiply_filter`; the imaginary part is
    its quadrature, so that the CTF with the defocus changed by ``δ`` Å is
    ``Re[Q · e^{-iπλδ|k|²}]`` (what CTF refinement scans). ``defocus_offset`` ``(b,)`` Å is
    added to the depth-dependent defocus of each observation (a per-particle defocus, §23).
    See :func:`premultiply_filter` for the other parameters.
    """
    dev = frames.device
    quadrature, dose, phase_y, phase_x = _series_tables(
        ctf, binning * ctf.pixel_size, size, use_bfactor, cutoff_fract, dev
    )
    shift, _ = particle_defocus(
        0.0, 0.0, depth_px.to(dev), ctf.pixel_size, ctf.hand, ctf.defocus_slope
    )  # (b,) Å
    shift = shift.double()
    if defocus_offset is not None:
        shift = shift + defocus_offset.to(dev, torch.float64)
    shift = shift[:, None]
    turn_y = torch.polar(torch.ones_like(phase_y), shift * phase_y).to(quadrature.dtype)
    turn_x = torch.polar(torch.ones_like(phase_x), shift * phase_x).to(quadrature.dtype)
    turned = quadrature[frames] * turn_y[:, :, None]
    return turned.mul_(turn_x[:, None, :]), dose[frames]


def premultiply_filter(
    ctf: TiltSeriesCtf,
    frames: torch.Tensor,
    depth_px: torch.Tensor,
    size: int,
    binning: float,
    *,
    use_bfactor: bool = True,
    cutoff_fract: float | None = None,
    defocus_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CTF · dose`` for ``b`` observations ``(b, size, size//2+1)`` and the dose weights.

    ``frames`` ``(b,)`` indexes the tilt, ``depth_px`` ``(b,)`` is the depth of the particle
    in that tilt (bin-1 pixels, §1.4); ``defocus_offset`` ``(b,)`` an optional per-particle
    defocus in Å on top of it (§23). The pixel size is ``binning · ctf.pixel_size``.
    ``use_bfactor=False`` drops the per-tilt rlnCtfBfactor (relion_refine's 2D-stack CTF);
    with ``cutoff_fract`` both are zero beyond the dose cut-off
    (:func:`subtomo.ctf.dose_cutoff_mask`, RELION's ``--cutoff_fract``).

    The depth shifts both defoci by ``Δz`` Å, i.e. ``γ`` by ``δ = -π λ Δz |k|²``; so the CTF
    is evaluated once per tilt (:func:`subtomo.ctf.ctf_2d`, float64; cached per series, see
    :func:`_series_tables`) and per observation only
    ``-sin(γ + δ)·E = Re[(-sin γ + i cos γ)·E·e^{iδ}]`` (:func:`ctf_quadrature`), where
    ``e^{iδ}`` is the outer product of ``e^{-iπλΔz k_y²}`` and ``e^{-iπλΔz k_x²}`` (formed in
    float64). Unlike :func:`~subtomo.ctf.ctf_2d` there is no 1e-8 floor on ``|CTF|``: nothing
    divides by it.
    """
    quadrature, dose = ctf_quadrature(
        ctf, frames, depth_px, size, binning, use_bfactor=use_bfactor,
        cutoff_fract=cutoff_fract, defocus_offset=defocus_offset,
    )  # fmt: skip
    return torch.real(quadrature).contiguous(), dose


def visible_frames(uv: torch.Tensor, image_size: Sequence[int], margin_px: float) -> torch.Tensor:
    """``(n, t)`` bool: the projected centre lies strictly inside the image minus ``margin``.

    ``uv`` is ``(n, t, 2)`` in bin-1 pixels, ``image_size`` the tilt image (w, h) (§5.2).
    """
    w, h = image_size
    u, v = uv[..., 0], uv[..., 1]
    return (u > margin_px) & (u < w - margin_px) & (v > margin_px) & (v < h - margin_px)


def extract_slices(
    images: torch.Tensor,
    frames: torch.Tensor,
    uv: torch.Tensor,
    depth_px: torch.Tensor,
    ctf: TiltSeriesCtf,
    *,
    box: int,
    binning: float,
    precrop: bool,
    no_ctf: bool = False,
    invert_contrast: bool = True,
    cutoff_fract: float | None = None,
    centre_at_origin: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Premultiplied Fourier slices of ``b`` (particle, tilt) observations (§5.2 steps 2–5).

    Parameters
    ----------
    images
        ``(t, h, w)`` the tilt series.
    frames, uv, depth_px
        ``(b,)`` tilt index, ``(b, 2)`` image position (bin-1 px, with trajectory) and
        ``(b,)`` depth for the CTF.
    box, binning
        Output box ``s`` (binned pixels) and the binning factor; patches are
        ``round(binning · box)`` bin-1 pixels.
    precrop
        Circle-crop the patch (radius s0/2, 5 px fall-off) before the FFT (§6).
    cutoff_fract
        If given, frequencies beyond the dose cut-off are zeroed (§1.5 ``--cutoff_fract``).
    centre_at_origin
        True: the particle centre is at the Fourier origin (``rfft_centered`` layout, for
        insertion). False: at pixel ``box//2`` of the image a plain ``irfftn`` gives back.

    Returns
    -------
    data ``(b, box, box//2+1)`` complex ``-CTF·dose·F`` (``F`` without CTF if ``no_ctf``)
    and weight ``(b, box, box//2+1)`` ``(CTF·dose)^2`` (the dose^2 only if ``no_ctf``).
    """
    s0 = round(binning * box)
    patches = cut_patches(images, uv, s0, image_index=frames)
    if precrop:
        patches = circle_crop(patches, s0 / 2)
    spectra = torch.fft.rfftn(patches, dim=(-2, -1))  # patch centre s0//2 still at s0//2
    if s0 != box:
        spectra = fourier_resize(spectra, box)
    offset = (uv.to(images.device) - torch.floor(uv.to(images.device) + 0.5)) / binning
    # One phase ramp moves the sub-pixel position to s/2 and the patch centre to the origin
    # (rfft_centered(x) = rfft(x) · exp(2πi k·c/s0), c = s0//2, in box pixels c·box/s0),
    # or straight to box//2 (an integer shift of box//2 is the fftshift of irfft_centered).
    centre = (s0 // 2) * box / s0 - (0 if centre_at_origin else box // 2)
    factor = phase_ramp(-offset - centre, box)
    ctfw, dose = premultiply_filter(ctf, frames, depth_px, box, binning, cutoff_fract=cutoff_fract)
    filt = dose if no_ctf else ctfw
    factor.mul_(-filt if invert_contrast else filt)
    odd = odd_aberration_correction(ctf, box, binning, images.device)
    if odd is not None:  # the data's odd phase removed, as RELION's extraction does (§5.2)
        factor.mul_(odd)
    return spectra.mul_(factor), filt.square()


def _insert_halves(
    accumulators: Sequence, halves: torch.Tensor, data, weight, matrices, max_radius
) -> None:
    """Insert each observation into ``accumulators[halves[i]]`` (no copy when all share one)."""
    for h, acc in enumerate(accumulators):
        sel = halves == h
        if bool(sel.all()):
            acc.insert(data, weight, matrices, max_radius=max_radius)
        elif bool(sel.any()):
            acc.insert(data[sel], weight[sel], matrices[sel], max_radius=max_radius)


def _private_accumulators(accumulators: Sequence, workers: int) -> list[Sequence]:
    """Per worker: the accumulators themselves (worker 0) or zeroed copies to merge later."""
    copies = [[acc.zeros_like() for acc in accumulators] for _ in range(workers - 1)]
    return [accumulators, *copies]


def _merge_private(accumulators: Sequence, private: list[Sequence]) -> None:
    for copies in private[1:]:
        for acc, copy in zip(accumulators, copies, strict=True):
            acc += copy


def insert_tilt_series(
    accumulators: Sequence,
    images: torch.Tensor,
    uv: torch.Tensor,
    depth_px: torch.Tensor,
    visible: torch.Tensor,
    matrices: torch.Tensor,
    halves: torch.Tensor,
    ctf: TiltSeriesCtf,
    *,
    box: int,
    binning: float,
    batch_size: int = 1024,
    no_ctf: bool = False,
    circle_precrop: bool = True,
    cutoff_fract: float = 0.01,
    max_radius: float | None = None,
    progress: Progress | None = None,
) -> int:
    """Insert every visible tilt of ``n`` particles of one tilt series (relion_tomo_reconstruct).

    Parameters
    ----------
    accumulators
        One :class:`~subtomo.reconstruct.FourierAccumulator` per half set (anything with
        ``insert(slices, weights, matrices, max_radius)``, ``zeros_like()`` and ``+=``).
    images
        ``(t, h, w)`` tilt images.
    uv, depth_px, visible
        ``(n, t, 2)`` bin-1 positions with trajectories, ``(n, t)`` depths, ``(n, t)`` bool.
    matrices
        ``(n, t, 3, 3)`` rotations ``R_f · A_sub · A_part``.
    halves
        ``(n,)`` long: accumulator index of each particle (rlnRandomSubset - 1).

    Batches of ``batch_size`` pairs are shared out over the CPU cores
    (:func:`subtomo.reconstruct.parallel.map_batches`, each worker summing into its own
    copies of the accumulators, added to ``accumulators`` at the end); ``progress`` may be
    called from those worker threads. Returns the number of tilt images inserted.
    """
    pairs = visible.nonzero()  # (m, 2): particle, frame
    pairs = pairs[torch.argsort(halves.to(pairs.device)[pairs[:, 0]], stable=True)]  # one half each
    dev = images.device
    uv, depth_px, halves = uv.to(dev), depth_px.to(dev), halves.to(dev)
    matrices = matrices.to(dev, torch.float32)
    workers = cpu_workers(dev, pairs.shape[0])
    step = max(1, -(-batch_size // workers))  # the workers share the memory of one batch
    starts = range(0, pairs.shape[0], step)
    private = _private_accumulators(accumulators, min(workers, len(starts)))

    def insert_batch(worker: int, start: int) -> None:
        p, f = pairs[start : start + step].to(dev).unbind(-1)
        data, weight = extract_slices(
            images, f, uv[p, f], depth_px[p, f], ctf, box=box, binning=binning,
            precrop=circle_precrop, no_ctf=no_ctf, cutoff_fract=cutoff_fract,
        )  # fmt: skip
        _insert_halves(private[worker], halves[p], data, weight, matrices[p, f], max_radius)
        if progress is not None:
            progress(len(p))

    map_batches(insert_batch, starts, len(private))
    _merge_private(accumulators, private)
    return int(pairs.shape[0])


def insert_stacks(
    accumulators: Sequence,
    stacks: torch.Tensor,
    frames: torch.Tensor,
    depth_px: torch.Tensor,
    matrices: torch.Tensor,
    halves: torch.Tensor,
    ctf: TiltSeriesCtf,
    *,
    binning: float,
    premultiplied: bool = True,
    cutoff_fract: float | None = 0.01,
    max_radius: float | None = None,
    shifts_px: torch.Tensor | None = None,
) -> None:
    """Insert ``b`` images of extracted 2D stacks (relion_refine's reading, §5.6).

    ``stacks`` ``(b, s, s)`` are the stack images (already ``-CTF·dose`` premultiplied and
    divided by ``binning`` by extraction; the division is undone here so both paths share one
    grey scale), ``frames`` ``(b,)`` their tilt indices, ``depth_px`` ``(b,)`` the depths of
    the particle (with origins) for the CTF, ``matrices`` ``(b, 3, 3)`` = R_f·A_sub·A_part,
    ``halves`` ``(b,)`` the accumulator index. The weight is ``(CTF·dose)^2`` with the
    per-tilt rlnCtfBfactor left out, as relion_refine does. ``shifts_px`` ``(b, 2)`` (x, y
    pixels) move each image before insertion: ``[R_f A_sub o]_xy / px`` brings the centre of a
    particle whose offsets ``o`` changed after extraction back to the box centre (stacks are
    cut at the coordinates, the offsets are applied in Fourier space, as relion_refine does).
    """
    size = stacks.shape[-1]
    spectra = rfft_centered(stacks.to(torch.float32), 2) * binning
    if shifts_px is not None:
        spectra = spectra * phase_ramp(shifts_px, size)
    ctfw, dose = premultiply_filter(
        ctf, frames, depth_px, size, binning, use_bfactor=False, cutoff_fract=cutoff_fract
    )
    weight = ctfw.square()
    if not premultiplied:
        data = spectra * (-ctfw)
    elif cutoff_fract is not None:
        data = spectra * (dose > 0)  # the dose weights are exactly zero beyond the cut-off
    else:
        data = spectra
    _insert_halves(accumulators, halves, data, weight, matrices.to(torch.float32), max_radius)
