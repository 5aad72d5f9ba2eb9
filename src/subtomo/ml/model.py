"""The model of RELION's regularised likelihood optimisation (``_model.star`` in tensors).

Noise and signal spectra use RELION's per-component convention: a complex Fourier
component of noise ``N`` has ``E|N|^2 = 2 sigma2`` and the prior on a reference component is
``exp(-|V|^2 / (2 tau2))``. Both are in the units of :func:`subtomo.fourier.rfft_centered`
with norm ``"backward"`` (unnormalised sums) of the image box ``n`` and its ``n^3`` volume.
Shells are ``round(|k| n)``, ``0..n//2``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from subtomo.fourier import lowpass_map, radial_average, rfft_centered

__all__ = ["MLModel", "reference_tau2"]


@dataclass
class MLModel:
    """State of the optimisation between iterations.

    Attributes
    ----------
    references:
        ``(K, n, n, n)`` real maps (zyx, centre ``n//2``), one per class.
    class_priors:
        ``(K,)`` ``rlnClassDistribution`` (sums to 1).
    sigma2:
        ``(G, n//2+1)`` noise spectrum per optics group (``rlnSigma2Noise``).
    tau2:
        ``(K, n//2+1)`` signal power per class (``rlnReferenceTau2``).
    sigma_offset_angst:
        ``rlnSigmaOffsetsAngst``: width of the Gaussian prior on offset changes.
    pixel_size:
        Å per pixel.
    current_size:
        ``rlnCurrentImageSize`` (even, <= n): shells ``<= current_size // 2`` are used.
    iteration:
        Number of completed iterations.
    ssnr:
        ``(K, n//2+1)`` ``rlnSsnrMap`` of the last M-step (zeros before the first).
    self_denominator:
        ``(K, n//2+1)`` ``Wbar + 1/(T tau2)`` per shell of the last M-step's reconstructions
        (mean weight of one voxel plus the prior term; ``None`` before the first): how much
        one particle's data weigh in its class's reference (leave-one-out scores).
    """

    references: torch.Tensor
    class_priors: torch.Tensor
    sigma2: torch.Tensor
    tau2: torch.Tensor
    sigma_offset_angst: float
    pixel_size: float
    current_size: int
    iteration: int = 0
    ssnr: torch.Tensor | None = None
    self_denominator: torch.Tensor | None = None

    @property
    def n_classes(self) -> int:
        return self.references.shape[0]

    @property
    def box(self) -> int:
        return self.references.shape[-1]

    @property
    def current_resolution_angst(self) -> float:
        """Resolution (Å) of the outermost shell in use."""
        return self.box * self.pixel_size / max(self.current_size // 2, 1)

    @classmethod
    def initial(
        cls,
        references: torch.Tensor,
        sigma2: torch.Tensor,
        pixel_size: float,
        *,
        sigma_offset_angst: float = 10.0,
        current_size: int | None = None,
        ini_high_angst: float | None = None,
    ) -> MLModel:
        """Model at iteration 0: uniform class priors, tau2 from the references' power.

        ``references`` ``(K, n, n, n)``; ``ini_high_angst`` low-passes them (RELION's
        "Initial low-pass filter", ``--ini_high``, raised-cosine edge) *after* tau2 is taken
        from their full power, so that the prior does not pin the filtered shells to zero.
        ``sigma2`` ``(G, n//2+1)`` e.g. from :func:`subtomo.ml.mstep.initial_sigma2`.
        """
        k = references.shape[0]
        n = references.shape[-1]
        tau2 = reference_tau2(references)
        if ini_high_angst:
            references = lowpass_map(references, ini_high_angst, pixel_size)
        return cls(
            references=references,
            class_priors=torch.full((k,), 1.0 / k, dtype=torch.float64),
            sigma2=sigma2.double(),
            tau2=tau2,
            sigma_offset_angst=float(sigma_offset_angst),
            pixel_size=float(pixel_size),
            current_size=min(current_size or n, n),
            ssnr=torch.zeros(k, n // 2 + 1, dtype=torch.float64),
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically (tensors moved to the CPU)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
        return out

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], device: torch.device | str | None = None
    ) -> MLModel:
        """Inverse of :meth:`state_dict`; tensors go to ``device``."""
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        return cls(**kw)


def reference_tau2(references: torch.Tensor) -> torch.Tensor:
    """Per-class signal power ``radial_mean |V_k|^2 / 2`` ``(K, n//2+1)`` (classification tau2)."""
    n = references.shape[-1]
    f = rfft_centered(references.double(), 3)
    return radial_average(f.abs() ** 2 / 2, (n, n, n))
