"""Fourier accumulators: the data and weight sums of a reconstruction (RELION's BackProjector).

Both are stored in torch's unshifted rfft layout of the padded box ``N = padded_box(box,
padding)``: ``data`` ``(N, N, N//2 + 1)`` complex (sum of premultiplied slices, e.g. -CTF·X)
and ``weight`` the same shape, real (sum of their weights, e.g. CTF^2), both Hermitian on the
x = 0 plane (see :mod:`subtomo.fourier.slices`). Partial sums from other batches, halves or
ranks add up exactly, so a job can split particles any way it likes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from subtomo.fourier.slices import extract_volumes, insert_slices, insert_volumes, padded_box

__all__ = ["FourierAccumulator"]


class FourierAccumulator:
    """Data (complex) and weight (real) sums of one reconstruction on the padded Fourier grid.

    Parameters
    ----------
    box
        Real-space box ``n`` of the images / the map (pixels).
    padding
        Oversampling of the Fourier grid (RELION's ``--pad``, 2 by default; 1 = no padding).
    device, dtype
        Where and in which real precision to accumulate (the data are ``complex`` of ``dtype``).
        float32 is the default; use float64 for very many (> ~10^6) slices per voxel shell.
    """

    def __init__(
        self,
        box: int,
        padding: float = 2.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.box = int(box)
        self.padding = float(padding)
        self.padded = padded_box(self.box, self.padding)
        shape = (self.padded, self.padded, self.padded // 2 + 1)
        self.weight = torch.zeros(shape, dtype=dtype, device=device)
        self.data = torch.zeros(shape, dtype=self.weight.dtype.to_complex(), device=device)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def insert(
        self,
        slices: torch.Tensor,
        weights: torch.Tensor,
        matrices: torch.Tensor,
        max_radius: float | None = None,
    ) -> None:
        """Add 2D rfft slices ``(b, box, box//2 + 1)`` with their weights at RELION rotations
        ``matrices`` ``(b, 3, 3)`` (reference -> image); ``max_radius`` in Fourier pixels of
        the box (default box/2). See :func:`subtomo.fourier.slices.insert_slices`."""
        insert_slices(
            self.data,
            self.weight,
            slices.to(self.device),
            weights.to(self.device),
            matrices.to(self.device),
            padding=self.padding,
            max_radius=max_radius,
        )

    def insert_volume(
        self,
        data_rfft: torch.Tensor,
        weight_rfft: torch.Tensor,
        matrices: torch.Tensor | None = None,
        max_radius: float | None = None,
    ) -> None:
        """Add 3D pseudo-subtomogram sums ``(box, box, box//2 + 1)`` (or a batch ``(b, ...)``).

        ``data_rfft`` is complex, ``weight_rfft`` real (e.g. RELION's CTF^2 volume); they are
        splatted at ``A^T k`` for ``matrices`` ``(b, 3, 3)`` (identity when ``None``: data
        already in the reference frame). With ``padding > 1`` a single unrotated volume only
        fills every ``padding``-th voxel; many orientations fill the grid, as with slices.
        """
        data = data_rfft if data_rfft.ndim == 4 else data_rfft[None]
        weight = weight_rfft if weight_rfft.ndim == 4 else weight_rfft[None]
        if matrices is None:
            matrices = torch.eye(3, dtype=torch.float64).expand(data.shape[0], 3, 3)
        insert_volumes(
            self.data,
            self.weight,
            data.to(self.device),
            weight.to(self.device),
            matrices.to(self.device),
            max_radius=max_radius,
        )

    def symmetrise(self, matrices: torch.Tensor) -> None:
        """Replace data and weight by their sums over the point group ``matrices`` ``(n, 3, 3)``
        (identity included; RELION symmetrises both before the division). A single operator
        (C1) leaves them unchanged.

        Each operator ``R`` contributes the accumulators resampled (trilinearly) at ``R^T k``;
        voxels beyond the padded Nyquist radius ``N/2`` are set to zero.
        """
        if matrices.shape[0] <= 1:  # C1
            return
        matrices = matrices.to(self.device)
        for name in ("data", "weight"):
            volume = getattr(self, name)
            total = torch.zeros_like(volume)
            for r in matrices:
                total += extract_volumes(volume, r[None], padding=1.0)[0]
            setattr(self, name, total)

    def zeros_like(self) -> FourierAccumulator:
        """An empty accumulator of the same box, padding, device and precision."""
        return FourierAccumulator(self.box, self.padding, self.device, self.weight.dtype)

    def _check_compatible(self, other: FourierAccumulator) -> None:
        if (self.box, self.padded) != (other.box, other.padded):
            raise ValueError(
                f"cannot add accumulators of box {other.box} (padded {other.padded}) "
                f"to box {self.box} (padded {self.padded})"
            )

    def __iadd__(self, other: FourierAccumulator) -> FourierAccumulator:
        self._check_compatible(other)
        self.data += other.data.to(self.device, self.data.dtype)
        self.weight += other.weight.to(self.device, self.weight.dtype)
        return self

    def merged_with(self, other: FourierAccumulator) -> FourierAccumulator:
        """A new accumulator holding the sums of ``self`` and ``other`` (e.g. the two halves)."""
        out = FourierAccumulator.from_state_dict(self.state_dict())
        out.data, out.weight = out.data.clone(), out.weight.clone()
        out += other
        return out

    def all_reduce(self) -> None:
        """Sum the accumulators over all ranks (torch.distributed); a no-op when not running
        distributed."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(torch.view_as_real(self.data))
            dist.all_reduce(self.weight)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (for ``torch.save``); tensors are not copied."""
        return {"box": self.box, "padding": self.padding, "data": self.data, "weight": self.weight}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], device: torch.device | str | None = None
    ) -> FourierAccumulator:
        """Rebuild an accumulator from :meth:`state_dict` (on ``device``, default its own)."""
        data, weight = state["data"], state["weight"]
        device = data.device if device is None else device
        out = cls(state["box"], state["padding"], device="meta", dtype=weight.dtype)
        if tuple(data.shape) != tuple(out.data.shape) or data.shape != weight.shape:
            raise ValueError(
                f"state of box {out.box} x {out.padding} needs shape {tuple(out.data.shape)}, "
                f"got data {tuple(data.shape)} and weight {tuple(weight.shape)}"
            )
        out.data, out.weight = data.to(device), weight.to(device)
        return out
