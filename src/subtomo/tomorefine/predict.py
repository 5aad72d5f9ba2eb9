"""Observed and predicted tilt patches of particles, for CTF refinement and frame alignment.

Both refinements compare every visible tilt image of a particle with a prediction made from
the half map of the particle's own half set (rlnRandomSubset, §11, §23), never the other one,
so that each half set stays independent. A :class:`TiltPredictor` gives them, batch by batch,
on the ML engine's loaders and projectors (one code path for CPU and CUDA):

* ``observed`` ``Y``: the tilt images as :class:`~subtomo.ml.loader.StackLoader` reads them
  (rfft, centre ``n//2`` at the Fourier origin, premultiplied by the CTF the stacks were made
  with, ``A = CTF·w``, §5.6);
* ``predicted`` ``P``: the central slice of the half map at ``R_f A_sub A_part`` (§2.2, §4),
  moved to where the particle sits in the image (its offset ``o``: ``-[R_f A_sub o]_xy / px``
  pixels from the box centre, §1.3), **without** CTF or dose;
* ``applied`` ``A``: the filter on ``Y``, the ``CTF·dose`` of the tomograms.star the loader
  was given (with rlnCtfScalefactor and the particle's own defocus, §23);
* ``quadrature`` ``Q = (-sin γ + i cos γ)·w`` at the particle's depth with the modelled CTF
  (the same as ``A``'s unless :meth:`TiltPredictor.batches` is given other per-tilt CTFs or
  the predictor extra per-particle defoci): ``Re Q`` is that CTF, and the CTF with the
  defocus changed by ``δ`` Å is ``Re[Q·e^{iφδ}]`` with ``φ = defocus_phase = -πλ|k|²`` (rad
  per Å).

So the model of the data is ``Y ≈ A·s·Re[Q e^{iφδ}]·P + A·N`` (``s`` a scale, ``N`` the noise
of the recorded image, variance ``σ²(|k|)`` per real/imaginary part): a CTF fit varies ``δ``
and ``s``, a frame alignment multiplies ``P`` by shift phasors. The Gaussian log-likelihood is
``-Σ |Y - A·c·P|² / (2σ²)`` (the ``A²`` of the noise cancels against the ``A`` of the model),
so the least-squares fits weight frequencies by ``1/σ²`` (:func:`shell_noise_sums`) times the
FSC weight of :func:`fsc_weights`.

The stacks are assumed to have been extracted with the CTF of the tomograms.star given (as in
RELION's cycle, where every refinement is followed by a new extraction); rlnCtfBfactor is
left out as in relion_refine's 2D-stack CTF (§5.6).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.ctf import electron_wavelength_angstrom
from subtomo.errors import InputError
from subtomo.fourier import (
    FSC_THRESHOLD,
    fsc_maps,
    fsc_threshold_shell,
    irfft_centered,
    rfft_centered,
)
from subtomo.ml.batch import FourierPoints, fourier_points
from subtomo.ml.likelihood import shift_phases
from subtomo.ml.loader import ParticleState, StackLoader
from subtomo.ml.projector import Projector
from subtomo.reconstruct.extraction import circle_crop
from subtomo.reconstruct.particles import ctf_quadrature

__all__ = ["TiltPatches", "TiltPredictor", "fsc_weights", "shell_noise_sums"]


@dataclass
class TiltPatches:
    """``b`` particles with up to ``f`` visible tilts each, at ``K`` Fourier points.

    Attributes
    ----------
    index:
        ``(b,)`` long, particle rows in the particle set (file order).
    half:
        ``(b,)`` long, 0 or 1: the half set (rlnRandomSubset - 1) whose map made ``predicted``.
    tomo_names:
        ``(b,)`` rlnTomoName of each particle.
    visible:
        ``(b, f)`` bool, which stacked tilts exist (the rest are zero).
    frames:
        ``(b, f)`` long, tilt-table row of each stacked tilt (0 where not visible).
    tilt_rotations:
        ``(b, f, 3, 3)`` ``R_f A_sub`` (subtomogram frame -> tilt image, §2.2).
    depth_defocus:
        ``(b, f)`` Å, the particle's defocus relative to its tilt's central defocus
        (``hand·slope·px·dz_f``, §1.4, plus any per-particle defocus, §23).
    observed:
        ``(b, f, K)`` complex, premultiplied data ``Y``.
    predicted:
        ``(b, f, K)`` complex, projection ``P`` of the own half map at the particle's pose and
        offset, no CTF.
    quadrature:
        ``(b, f, K)`` complex, ``Q``; ``Re Q`` is the modelled ``CTF·dose``, ``dose`` the dose
        weights alone ``(b, f, K)``.
    applied:
        ``(b, f, K)`` real, ``A``: the ``CTF·dose`` already on ``observed``.
    points:
        The Fourier points (``points.freq`` cycles/pixel, ``points.shell`` ``round(|k| n)``).
    defocus_phase:
        ``(K,)`` ``φ = -πλ|k|²`` in radians per Å of defocus (float32).
    pixel_size:
        Å per pixel of the patches.
    """

    index: torch.Tensor
    half: torch.Tensor
    tomo_names: np.ndarray
    visible: torch.Tensor
    frames: torch.Tensor
    tilt_rotations: torch.Tensor
    depth_defocus: torch.Tensor
    observed: torch.Tensor
    predicted: torch.Tensor
    quadrature: torch.Tensor
    dose: torch.Tensor
    points: FourierPoints
    defocus_phase: torch.Tensor
    pixel_size: float
    applied: torch.Tensor

    @property
    def ctf(self) -> torch.Tensor:
        """``(b, f, K)`` the modelled ``CTF·dose`` (``Re Q``)."""
        return self.quadrature.real

    def trial_ctf(self, defocus_change: torch.Tensor) -> torch.Tensor:
        """``CTF·dose`` with the defocus changed by ``defocus_change`` Å (broadcast against
        ``(b, f, K)``, e.g. ``(b, f, 1)`` or ``(D, 1, 1, 1)`` for a grid of ``D`` trials)."""
        phase = self.defocus_phase * defocus_change
        return (self.quadrature * torch.polar(torch.ones_like(phase), phase)).real


class TiltPredictor:
    """:class:`TiltPatches` of a 2D-stack particle set against its two half maps.

    Parameters
    ----------
    loader
        The particles' :class:`~subtomo.ml.loader.StackLoader` (stacks, tilt geometry, CTFs).
    half_maps
        ``(2, n, n, n)`` half maps 1 and 2 (zyx, centre ``n//2``) at the stacks' box and pixel
        size, already masked if a mask is wanted.
    max_shell
        Highest Fourier shell ``round(|k| n)`` used (e.g. from :func:`fsc_weights`).
    device
        Where the projections and patches are computed.
    circle_cropped
        Whether extraction circle-cropped the stacks after premultiplying them (§5.2 step 7;
        ``subtomo extract`` and RELION do, unless ``--no_circle_crop``): :meth:`batches`
        ``simulate`` does it too.
    precropped
        Whether extraction circle-cropped each raw patch before the CTF (``--circle_precrop``,
        §5.2 step 2): :meth:`batches` ``simulate`` windows its raw image the same way.
    defocus_offset
        ``(N,)`` per-particle defocus in Å added to the particles' own (§23) in ``quadrature``
        (not in ``applied``), or ``None``.
    """

    def __init__(
        self,
        loader: StackLoader,
        half_maps: torch.Tensor,
        *,
        max_shell: int,
        device: torch.device | str = "cpu",
        padding: float = 2.0,
        defocus_offset: torch.Tensor | None = None,
        circle_cropped: bool = True,
        precropped: bool = False,
    ) -> None:
        n = loader.box
        if half_maps.shape != (2, n, n, n):
            raise InputError(
                f"half maps are {tuple(half_maps.shape[1:])} voxels, the particle stacks "
                f"{n} x {n} pixels (rlnImageSize); give maps of the stacks' box"
            )
        subset = loader.particles.random_subset()
        bad = np.flatnonzero((subset != 1) & (subset != 2))
        if len(bad):
            raise InputError(
                "rlnRandomSubset must be 1 or 2 (each particle is compared with its own half "
                "map)",
                file=loader.particles.source, block="particles", column="rlnRandomSubset",
                row=int(bad[0]) + 1,
            )  # fmt: skip
        self.loader = loader
        self.device = torch.device(device)
        self.half = torch.from_numpy(subset.astype(np.int64) - 1)
        self.projectors = [Projector(h[None].to(self.device), padding) for h in half_maps]
        self.points = fourier_points(n, max_shell, self.device)
        # for simulated observations: a canvas of twice the box up to the box's Nyquist
        # frequency (the data hold them all), and every frequency of the box
        self.canvas_points = fourier_points(2 * n, n, self.device)
        self.full_points = fourier_points(n, n, self.device)
        self.circle_cropped = circle_cropped
        self.precropped = precropped
        px = loader.pixel_size
        k2 = (self.points.freq.double() / px).square().sum(-1)  # (K,) 1/Å²
        lam = float(electron_wavelength_angstrom(loader.ctfs[loader.tomo_names[0]].voltage_kv))
        self.defocus_phase = (-np.pi * lam * k2).float()
        self.defocus_offset = defocus_offset

    def batches(
        self,
        state: ParticleState,
        indices: np.ndarray | None = None,
        *,
        shard: bool = False,
        tilt_ctf: dict | None = None,
        simulate: bool = False,
        reference_filter: torch.Tensor | None = None,
    ) -> Iterator[TiltPatches]:
        """Patches of ``indices`` (default all) at the poses of ``state``, batch by batch.

        ``shard``: only this rank's batches (see :meth:`StackLoader.batches`). ``tilt_ctf``
        ``{rlnTomoName: TiltSeriesCtf}`` replaces the loader's per-tilt CTFs in ``quadrature``
        (e.g. after a defocus update); ``observed`` is unchanged. ``reference_filter``
        ``(n//2+1,)`` multiplies the projections (and so the simulated data) per shell
        ``round(|k| n)`` of the box (e.g. :func:`~subtomo.tomorefine.ctf.reference_spectrum`).

        ``simulate``: ``observed`` is instead the noise-free data the model predicts,
        the particle's image with the modelled CTF (``Re Q``) made on a canvas of twice the
        box, cut to the box, premultiplied by ``A`` and circle-cropped as extraction does
        (§5.2–5.3), so the signal that the CTF delocalises out of the circle is lost as in the
        data. Fitting these
        patches like the data measures the bias of a fit (at box 64, 5 Å/px and 3 µm the
        defocus of a 250 Å particle comes out ~300 Å low without it; benchmarks/ctf_refine.py).
        """
        ld = self.loader
        for batch in ld.batches(state, indices, shard=shard):
            idx = batch.index
            f = batch.visible.shape[1]
            frames = ld.frames[idx, :f]
            depth = ld.depth[idx, :f]
            names = ld.tomo_names[idx.numpy()]
            geometry = (idx, frames, depth, batch.visible, names)
            pts = self.points
            quad, dose, shift = self._ctf(*geometry, tilt_ctf, self.defocus_offset, pts)
            applied = quad.real
            if tilt_ctf is not None or self.defocus_offset is not None:
                applied = self._ctf(*geometry, None, None, pts)[0].real
            tilt_rot = batch.tilt_rotations.to(self.device)
            mats = tilt_rot @ batch.rotations.to(self.device)[:, None]  # (b, f, 3, 3)
            half = self.half[idx].to(self.device)
            offsets = batch.offsets.to(self.device)[:, None]
            pred = self._project(mats, half, tilt_rot, offsets, pts, reference_filter)
            vis = batch.visible.to(self.device)[..., None]
            observed = pts.gather(batch.data.to(self.device))
            if simulate:
                canvas, full = self.canvas_points, self.full_points
                model = self._ctf(*geometry, tilt_ctf, self.defocus_offset, canvas)[0].real
                pred_canvas = self._project(mats, half, tilt_rot, offsets, canvas, reference_filter)
                image = canvas.scatter(model * pred_canvas)
                n = ld.box
                lo = n // 2
                raw = irfft_centered(image, (2 * n, 2 * n))[..., lo : lo + n, lo : lo + n]
                filt = full.scatter(self._ctf(*geometry, None, None, full)[0].real)
                pre = torch.from_numpy(ld.premultiplied)[idx].to(self.device)[:, None, None, None]
                binning = float(ld.binning[int(idx[0])])
                observed = pts.gather(self._extracted(raw, filt, pre, binning))
            yield TiltPatches(
                index=idx,
                half=half,
                tomo_names=names,
                visible=batch.visible.to(self.device),
                frames=frames.to(self.device),
                tilt_rotations=tilt_rot,
                depth_defocus=shift.to(self.device),
                observed=observed * vis,
                predicted=pred * vis,
                quadrature=quad * vis,
                dose=dose * vis,
                points=pts,
                defocus_phase=self.defocus_phase,
                pixel_size=ld.pixel_size,
                applied=applied * vis,
            )

    def _extracted(
        self, raw: torch.Tensor, filt: torch.Tensor, pre: torch.Tensor, binning: float
    ) -> torch.Tensor:
        """Spectra ``(b, f, n, n//2+1)`` of noise-free raw patches ``raw`` ``(b, f, n, n)``
        (centre ``n//2``) as the stacks hold them: windowed before the CTF if
        :attr:`precropped` (radius ``n/2``, the 5 bin-1 pixel fall-off), multiplied by
        ``filt`` (``A``, periodically in the box), circle-cropped after that if
        :attr:`circle_cropped`; stacks not premultiplied (``pre`` false) hold the cropped raw
        patch, which the loader multiplies by ``A``."""
        n = raw.shape[-1]
        if self.precropped:
            raw = circle_crop(raw, n / 2, 5.0 / binning)
        spectra = filt * rfft_centered(raw, 2)
        if self.circle_cropped:
            post = circle_crop(irfft_centered(spectra, (n, n)), n / 2)
            windowed = raw if self.precropped else circle_crop(raw, n / 2)
            spectra = torch.where(pre, rfft_centered(post, 2), filt * rfft_centered(windowed, 2))
        return spectra

    def _project(
        self,
        mats: torch.Tensor,
        half: torch.Tensor,
        tilt_rot: torch.Tensor,
        offsets: torch.Tensor,
        pts: FourierPoints,
        reference_filter: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``P e^{-2πi k.s}`` ``(b, f, K)`` at ``pts``: each particle's own half map at
        ``R_f A_sub A_part`` (``mats``), moved to where the particle sits (its offset), times
        ``reference_filter`` ``(n//2+1,)`` at the points' box shells if given."""
        b, f = mats.shape[:2]
        pred = torch.zeros((b, f, pts.flat.shape[0]), dtype=torch.complex64, device=self.device)
        for h, projector in enumerate(self.projectors):
            sel = half == h
            if bool(sel.any()):
                pred[sel] = projector.slices(0, mats[sel], pts)
        phase = shift_phases(tilt_rot, offsets, pts, self.loader.pixel_size)[:, 0]  # (b, f, K)
        pred = pred * torch.polar(torch.ones_like(phase), -phase)
        if reference_filter is not None:
            n = self.loader.box
            shell = torch.round(torch.linalg.vector_norm(pts.freq, dim=-1) * n).long()
            gain = reference_filter.to(self.device, torch.float32)
            pred = pred * gain[shell.clamp_max(len(gain) - 1)]
        return pred

    def _ctf(
        self,
        idx: torch.Tensor,
        frames: torch.Tensor,
        depth: torch.Tensor,
        visible: torch.Tensor,
        names: np.ndarray,
        tilt_ctf: dict | None,
        extra: torch.Tensor | None,
        pts: FourierPoints,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Q``, dose ``(b, f, K)`` at ``pts`` and the depth defocus ``(b, f)`` Å, per
        tomogram."""
        ld = self.loader
        b, f = frames.shape
        quad = torch.zeros((b, f, pts.flat.shape[0]), dtype=torch.complex64, device=self.device)
        dose = torch.zeros(quad.shape, dtype=torch.float32, device=self.device)
        shift = torch.zeros((b, f), dtype=torch.float64)
        offset = torch.zeros(b, dtype=torch.float64) if extra is None else extra[idx].double()
        for name in dict.fromkeys(names):
            rows = torch.from_numpy(np.flatnonzero(names == name))
            ctf = (tilt_ctf or ld.ctfs)[name]
            r, c = torch.nonzero(visible[rows], as_tuple=True)
            r = rows[r]
            fr, dz = frames[r, c].to(self.device), depth[r, c]
            q, w = ctf_quadrature(
                ctf, fr, dz, pts.box, float(ld.binning[int(idx[r[0]])]), use_bfactor=False,
                defocus_offset=offset[r],
            )  # fmt: skip
            quad[r, c] = pts.gather(q).to(torch.complex64)
            dose[r, c] = pts.gather(w).float()
            shift[r, c] = ctf.hand * ctf.defocus_slope * ctf.pixel_size * dz + offset[r]
        return quad, dose, shift


def fsc_weights(
    half_maps: torch.Tensor,
    pixel_size: float,
    *,
    mask: torch.Tensor | None = None,
    kmin_angst: float = 30.0,
    threshold: float = FSC_THRESHOLD,
) -> tuple[torch.Tensor, int]:
    """RELION's default frequency weight (§11): 1 from ``kmin_angst`` (Å, lower resolutions
    excluded) up to the last shell before the (masked) half-map FSC falls below
    ``threshold`` (shell 0, the mean, left out of that test), 0 elsewhere. Returns the
    weights per shell ``(n//2+1,)`` and that last shell."""
    n = half_maps.shape[-1]
    curve = fsc_maps(half_maps[0], half_maps[1], mask)
    # shell 0 is the mean: masked half maps have ~0 mean, so its FSC says nothing
    last = 1 + fsc_threshold_shell(curve[1:], threshold)
    shells = torch.arange(n // 2 + 1, device=curve.device)
    low = int(np.ceil(n * pixel_size / kmin_angst)) if kmin_angst > 0 else 0
    weights = ((shells >= low) & (shells <= last)).float()
    return weights, last


def shell_noise_sums(
    patches: TiltPatches, model_ctf: torch.Tensor, n_shells: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums per shell ``(n_shells,)`` for the noise power of the recorded images:
    ``Σ|Y - A·c·P|²/2`` and ``Σ A²`` over all visible patches, with ``c = model_ctf``
    ``(b, f, K)`` the modelled ``CTF·dose`` (e.g. :attr:`TiltPatches.ctf`), ``A`` =
    :attr:`TiltPatches.applied`. Their ratio,
    summed over batches (and ranks), estimates ``σ²(|k|)`` per real/imaginary part."""
    a = patches.applied
    residual = (patches.observed - a * model_ctf * patches.predicted).abs().square() / 2
    shell = patches.points.shell.clamp_max(n_shells - 1)
    num = torch.zeros(n_shells, dtype=torch.float64, device=a.device)
    den = torch.zeros(n_shells, dtype=torch.float64, device=a.device)
    num.index_add_(0, shell, residual.flatten(0, 1).sum(0).double())
    den.index_add_(0, shell, a.square().flatten(0, 1).sum(0).double())
    return num, den
