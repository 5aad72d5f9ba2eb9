"""Particle batches for the ML engine: 2D tilt images of many particles, premultiplied.

A particle is the set of its visible tilt images (relion5-conventions §5.6). In a
:class:`ParticleBatch` they are stacked to a common number of tilts ``f`` with a visibility
mask, in the unshifted rfft layout of :func:`subtomo.fourier.rfft_centered` (norm
``"backward"``, box centre ``n//2`` at the Fourier origin), so that the central slice
``F_ref(M^T k)`` of ``rfft_centered(reference)`` models an image whose real-space centre is
the particle centre. The data are *premultiplied* as RELION's 2D stacks: ``X = -CTF*w * F_img``
with weight ``CTF2 = (CTF*w)^2``.

Offsets follow RELION 5 (§1.3, §2.2): the particle centre is ``C - A_sub o``, so in tilt
``f`` the particle sits at ``-[R_f A_sub o]_xy / px`` pixels from the box centre.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from subtomo.fourier import fftfreq_grid

__all__ = ["FourierPoints", "ParticleBatch", "fourier_points"]


@dataclass
class ParticleBatch:
    """``b`` particles with up to ``f`` tilt images each, box ``n`` (pixel size ``pixel_size`` Å).

    Attributes
    ----------
    data:
        ``(b, f, n, n//2+1)`` complex, premultiplied tilt images ``-CTF*w*F`` (zero where
        not visible).
    ctf2:
        ``(b, f, n, n//2+1)`` real, ``(CTF*w)^2`` (zero where not visible).
    visible:
        ``(b, f)`` bool, which stacked tilt images exist.
    tilt_rotations:
        ``(b, f, 3, 3)`` ``R_f @ A_sub``: subtomogram frame -> tilt-image frame.
    rotations:
        ``(b, 3, 3)`` current ``A_part`` (RELION matrices, reference -> subtomogram frame).
    offsets:
        ``(b, 3)`` current ``rlnOriginX/Y/ZAngst`` (Å, subtomogram frame, xyz).
    optics_group:
        ``(b,)`` long, 0-based optics group.
    index:
        ``(b,)`` long, position of each particle in the whole set (for results and seeds).
    classes:
        ``(b,)`` long, current 0-based class (for classification statistics).
    angle_priors:
        ``(b, 2)`` (tilt, psi) prior centres in degrees (``rlnAngleTilt/PsiPrior``), NaN where
        none, or ``None``.
    pixel_size:
        Å per pixel of the images.
    """

    data: torch.Tensor
    ctf2: torch.Tensor
    visible: torch.Tensor
    tilt_rotations: torch.Tensor
    rotations: torch.Tensor
    offsets: torch.Tensor
    optics_group: torch.Tensor
    index: torch.Tensor
    classes: torch.Tensor
    pixel_size: float
    angle_priors: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of particles ``b``."""
        return self.data.shape[0]

    @property
    def box(self) -> int:
        """Image box ``n`` in pixels."""
        return self.data.shape[-2]

    def to(self, device: torch.device | str) -> ParticleBatch:
        """The same batch with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


@dataclass(frozen=True)
class FourierPoints:
    """The rfft components of an ``n x n`` image used at the current image size.

    ``flat`` ``(K,)`` indexes the flattened ``(n, n//2+1)`` rfft grid; ``freq`` ``(K, 2)`` are
    their xy frequencies in cycles/pixel; ``shell`` ``(K,)`` is ``round(|k| n)``.
    """

    flat: torch.Tensor
    freq: torch.Tensor
    shell: torch.Tensor
    box: int

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., n, n//2+1)`` -> ``(..., K)``."""
        return x.flatten(-2)[..., self.flat]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """``(..., K)`` -> ``(..., n, n//2+1)`` with zeros elsewhere."""
        n = self.box
        out = values.new_zeros((*values.shape[:-1], n * (n // 2 + 1)))
        out[..., self.flat] = values
        return out.unflatten(-1, (n, n // 2 + 1))


def fourier_points(box: int, max_shell: int, device: torch.device | str | None) -> FourierPoints:
    """Components of an rfft ``box`` image with shell ``round(|k| box) <= max_shell``."""
    k = fftfreq_grid((box, box), device=device)  # (n, n//2+1, 2) xy cycles/pixel
    shell = torch.round(torch.linalg.vector_norm(k, dim=-1) * box).long()
    flat = torch.nonzero((shell <= min(max_shell, box // 2)).flatten()).squeeze(1)
    return FourierPoints(flat, k.flatten(0, 1)[flat], shell.flatten()[flat], box)
