"""Particle batches for the ML engine from extracted 2D stacks (relion5-conventions §5.3, §5.6).

A :class:`StackLoader` turns a RELION 5 particle set of 2D stacks (``subtomo extract`` or
WarpTools output, :func:`subtomo.data.stack_image_indices`) into
:class:`~subtomo.ml.batch.ParticleBatch` es the way relion_refine reads them: each visible
tilt f, in tilt-table order, is one image with rotation ``R_f A_sub`` and the CTF of the
particle's depth (rlnCtfBfactor left out, §5.6); premultiplied stacks keep their data, others
are premultiplied here (``-CTF*w*F``); the weight is ``(CTF*w)^2``. Stack images are
multiplied back by the binning (extraction divides by it, §5.2 step 6), so references built
by ``subtomo reconstruct`` from the same stacks share their grey scale.

Only one batch lives on the device at a time. The rfft'd stacks are read from disk in every
pass, or kept in (CPU) memory after the first pass when they fit ``cache_bytes``. The
particles' geometry (tilt rotations, depths) is computed once; their current poses live in a
:class:`ParticleState` that the caller updates after each iteration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.data import ParticleSet, TomogramSet, pixel_size_of, stack_image_indices
from subtomo.distributed import shard as shard_items
from subtomo.errors import InputError
from subtomo.fourier import rfft_centered
from subtomo.io import read_mrc
from subtomo.ml.batch import ParticleBatch
from subtomo.ml.engine import ParticleResults
from subtomo.reconstruct.particles import ctf_of_tilt_series, particle_geometry, premultiply_filter

__all__ = ["ParticleState", "StackLoader", "batch_size_for_memory"]

_BYTES_PER_COMPONENT = 8 + 4  # complex64 data + float32 CTF^2


@dataclass
class ParticleState:
    """Current per-particle values of ``N`` particles (file order), updated every iteration.

    ``rotations`` ``(N, 3, 3)`` ``A_part`` (float64, RELION matrices), ``offsets`` ``(N, 3)``
    rlnOrigin*Angst (Å, subtomogram frame), ``classes`` ``(N,)`` 0-based, and the statistics
    of the last E-step ``log_likelihood``, ``pmax``, ``n_significant`` ``(N,)`` (zeros before
    the first).
    """

    rotations: torch.Tensor
    offsets: torch.Tensor
    classes: torch.Tensor
    log_likelihood: torch.Tensor
    pmax: torch.Tensor
    n_significant: torch.Tensor

    @classmethod
    def from_particles(cls, particles: ParticleSet, n_classes: int = 1) -> ParticleState:
        """Poses from rlnAngle*/rlnOrigin*Angst, classes from rlnClassNumber (0 if absent or
        beyond ``n_classes``)."""
        n = len(particles)
        classes = torch.zeros(n, dtype=torch.long)
        if "rlnClassNumber" in particles.particles.columns:
            c = particles.particles["rlnClassNumber"].to_numpy(dtype=np.float64)
            c = np.where(np.isfinite(c) & (c >= 1) & (c <= n_classes), c - 1, 0)
            classes = torch.from_numpy(c.astype(np.int64))
        return cls(
            rotations=particles.particle_matrices().double(),
            offsets=particles.origins_angst().double(),
            classes=classes,
            log_likelihood=torch.zeros(n, dtype=torch.float64),
            pmax=torch.zeros(n, dtype=torch.float64),
            n_significant=torch.zeros(n, dtype=torch.long),
        )

    def __len__(self) -> int:
        return self.classes.shape[0]

    def update(self, results: ParticleResults) -> None:
        """Write the best poses and statistics of ``results`` at their particle indices."""
        i = results.index.long()
        self.rotations[i] = results.rotations.double()
        self.offsets[i] = results.offsets.double()
        self.classes[i] = results.classes.long()
        self.log_likelihood[i] = results.log_likelihood.double()
        self.pmax[i] = results.pmax.double()
        self.n_significant[i] = results.n_significant.long()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of every tensor (for checkpoints)."""
        return {f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ParticleState:
        return cls(**{k: v.clone() for k, v in state.items()})


def batch_size_for_memory(
    memory_bytes: float,
    n_tilts: int,
    box: int,
    *,
    n_translations: int = 1,
    n_poses: int = 1,
) -> int:
    """Particles per batch so that one E-step fits ``memory_bytes`` (an estimate).

    Per particle: its images ``f n (n/2+1)`` (complex64 data + float32 CTF^2), the data
    shifted to every trial offset (complex64, ~3 copies in the scores) and the posterior over
    ``n_poses`` = classes x rotations x translations (float64, ~6 arrays in the E-step).
    """
    k = box * (box // 2 + 1)
    per = n_tilts * k * (_BYTES_PER_COMPONENT + 3 * 8 * n_translations) + 6 * 8 * n_poses
    return max(1, int(memory_bytes // max(per, 1)))


class StackLoader:
    """Builds :class:`ParticleBatch` es of a 2D-stack particle set (see module docstring).

    Parameters
    ----------
    particles, tomograms
        The particle set (rlnTomoSubTomosAre2DStacks = 1, rlnImageName = the stacks) and its
        tomograms (tilt geometry, CTF and dose).
    batch_size
        Particles per batch (e.g. from :func:`batch_size_for_memory`).
    cache_bytes
        Keep the rfft'd stacks in CPU memory when all of them fit (0: always stream).
    """

    def __init__(
        self,
        particles: ParticleSet,
        tomograms: TomogramSet,
        *,
        batch_size: int = 64,
        cache_bytes: float = 0.0,
    ) -> None:
        if not particles.is_2d_stacks:
            raise InputError(
                "the particles are 3D pseudo-subtomograms; this program reads 2D stacks "
                "(extract with --stack2d)",
                file=particles.source,
                block="general",
                column="rlnTomoSubTomosAre2DStacks",
            )
        self.particles = particles
        self.batch_size = max(1, int(batch_size))
        self.pixel_size = pixel_size_of(particles)
        sizes = particles.image_size()
        if np.ptp(sizes) != 0:
            raise InputError(
                f"particles have different box sizes ({sizes.min()} to {sizes.max()})",
                file=particles.source,
                block="optics",
                column="rlnImageSize",
            )
        self.box = int(sizes[0])
        self.binning = particles.subtomogram_binning()
        self.premultiplied = particles.ctf_premultiplied()
        self.optics_group = torch.from_numpy(particles.optics_rows().astype(np.int64))
        self.n_optics_groups = len(particles.optics)
        self.paths = particles.image_paths()
        self._geometry(tomograms)
        self.angle_priors = _angle_priors(particles)
        per = self.visible.sum(1).double() * self.box * (self.box // 2 + 1)
        self.cache_enabled = float(per.sum()) * _BYTES_PER_COMPONENT <= cache_bytes
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def max_tilts(self) -> int:
        """Largest number of visible tilts of a particle."""
        return int(self.visible.sum(1).max())

    def _geometry(self, tomograms: TomogramSet) -> None:
        """Per particle: visible frames, ``R_f A_sub`` and depths, packed in tilt order
        ``(N, F)`` with F the largest number of visible tilts."""
        parts = self.particles
        names = parts.tomo_names
        parts.require_tomograms(tomograms)
        n_tilts = {name: tomograms[name].n_tilts for name in dict.fromkeys(names)}
        visible = parts.visible_frames(n_tilts)
        counts = np.array([int(v.sum()) for v in visible])
        if (counts == 0).any():
            row = int(np.flatnonzero(counts == 0)[0])
            raise InputError(
                "no visible tilt", file=parts.source, block="particles",
                column="rlnTomoVisibleFrames", row=row + 1,
            )  # fmt: skip
        n, f = len(parts), int(counts.max())
        self.visible = torch.arange(f)[None] < torch.from_numpy(counts)[:, None]  # (N, F)
        self.frames = torch.zeros(n, f, dtype=torch.long)
        self.tilt_rotations = torch.eye(3, dtype=torch.float64).repeat(n, f, 1, 1)
        self.depth = torch.zeros(n, f, dtype=torch.float64)
        self.ctfs = {name: ctf_of_tilt_series(tomograms[name], parts) for name in n_tilts}
        self.tomo_names = names
        self.visible_by_tomo = visible
        for name in n_tilts:
            rows = np.flatnonzero(names == name)
            series = tomograms[name]
            sub = parts.subset(rows)
            geo = particle_geometry(
                sub.centered_coordinates_angst(tomograms), sub.origins_angst(),
                sub.subtomogram_matrices(), sub.particle_matrices(),
                series.projection_matrices((2, 2)), series.pixel_size, series.tomogram_size,
                defocus_offset_angst=sub.defocus_offsets(),
                defocus_per_px=series.hand * series.defocus_slope * series.pixel_size,
            )  # fmt: skip
            tilts = geo.matrices(include_particle=False)  # (m, t, 3, 3) R_f A_sub
            for j, i in enumerate(rows):
                fr = torch.from_numpy(np.flatnonzero(visible[i]))
                c = len(fr)
                self.frames[i, :c] = fr
                self.tilt_rotations[i, :c] = tilts[j, fr]
                self.depth[i, :c] = geo.depth[j, fr]

    def _read(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Data and CTF^2 ``(b, F_b, n, n//2+1)`` of particles ``index`` (disk or cache)."""
        if self.cache_enabled and all(int(i) in self._cache for i in index):
            parts = [self._cache[int(i)] for i in index]
        else:
            parts = self._load(index)
            if self.cache_enabled:
                self._cache.update(zip((int(i) for i in index), parts, strict=True))
        f = max(p[0].shape[0] for p in parts)
        shape = (len(index), f, self.box, self.box // 2 + 1)
        data = torch.zeros(shape, dtype=torch.complex64)
        ctf2 = torch.zeros(shape, dtype=torch.float32)
        for j, (d, c) in enumerate(parts):
            data[j, : d.shape[0]] = d
            ctf2[j, : c.shape[0]] = c
        return data, ctf2

    def _load(self, index: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Read, rfft and premultiply the stacks of ``index`` (CTFs batched per tomogram)."""
        images = []
        for i in index:
            stack, _ = read_mrc(self.paths[i])
            if stack.shape[-1] != self.box or stack.shape[-2] != self.box:
                raise InputError(
                    f"stack images are {stack.shape[-1]} x {stack.shape[-2]}, rlnImageSize "
                    f"is {self.box}",
                    file=self.paths[i],
                )
            vis = self.visible_by_tomo[i]
            pos = stack_image_indices(vis, stack.shape[0])
            if pos is None:
                raise InputError(
                    f"stack has {stack.shape[0]} images; rlnTomoVisibleFrames marks "
                    f"{int(vis.sum())} of {len(vis)} tilts visible",
                    file=self.paths[i],
                )
            images.append(stack[torch.from_numpy(pos)])
        counts = [im.shape[0] for im in images]
        owner = torch.repeat_interleave(torch.arange(len(index)), torch.tensor(counts))
        slot = torch.cat([torch.arange(c) for c in counts])
        rows = torch.from_numpy(np.asarray(index))[owner]
        spectra = rfft_centered(torch.cat(images), 2)  # (m, n, n//2+1)
        spectra = spectra * torch.from_numpy(self.binning)[rows, None, None].float()
        ctfw = torch.empty(spectra.shape, dtype=torch.float32)
        names = self.tomo_names[rows.numpy()]
        for name in dict.fromkeys(names):
            sel = torch.from_numpy(names == name)
            r, s = rows[sel], slot[sel]
            ctfw[sel] = premultiply_filter(
                self.ctfs[name], self.frames[r, s], self.depth[r, s], self.box,
                float(self.binning[int(r[0])]), use_bfactor=False,
            )[0].float()  # fmt: skip
        pre = torch.from_numpy(self.premultiplied)[rows][:, None, None]
        data = torch.where(pre, spectra, -ctfw * spectra).to(torch.complex64)
        ctf2 = ctfw.square()
        return [(d, c) for d, c in zip(data.split(counts), ctf2.split(counts), strict=True)]

    def batches(
        self, state: ParticleState, indices: np.ndarray | None = None, *, shard: bool = False
    ) -> Iterator[ParticleBatch]:
        """Batches of ``indices`` (default all particles, in file order) with the current
        poses and classes of ``state``; deterministic for a given batch size. ``shard``: only
        this rank's batches under torch.distributed (every world-size-th one, the same
        batches as one process makes, so each particle's E-step does not depend on the
        number of ranks)."""
        index = np.arange(len(self)) if indices is None else np.asarray(indices)
        starts = range(0, len(index), self.batch_size)
        for start in shard_items(starts) if shard else starts:
            idx = index[start : start + self.batch_size]
            data, ctf2 = self._read(idx)
            f = data.shape[1]
            t = torch.from_numpy(idx)
            yield ParticleBatch(
                data=data,
                ctf2=ctf2,
                visible=self.visible[t, :f],
                tilt_rotations=self.tilt_rotations[t, :f],
                rotations=state.rotations[t],
                offsets=state.offsets[t],
                optics_group=self.optics_group[t],
                index=t.long(),
                classes=state.classes[t],
                pixel_size=self.pixel_size,
                angle_priors=None if self.angle_priors is None else self.angle_priors[t],
            )


def _angle_priors(particles: ParticleSet) -> torch.Tensor | None:
    """``(N, 2)`` rlnAngleTiltPrior / rlnAnglePsiPrior in degrees (NaN where absent)."""
    table = particles.particles
    columns = ("rlnAngleTiltPrior", "rlnAnglePsiPrior")
    if not any(c in table.columns for c in columns):
        return None
    out = np.full((len(table), 2), np.nan)
    for j, c in enumerate(columns):
        if c in table.columns:
            out[:, j] = table[c].to_numpy(dtype=np.float64)
    return torch.from_numpy(out)
