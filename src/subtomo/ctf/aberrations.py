"""Higher-order aberrations as RELION stores them (``rlnEvenZernike``, ``rlnOddZernike``).

RELION's documented convention (relion5-conventions.md §1.5; RELION's "Conventions" page):
the coefficients multiply *unnormalised* Zernike polynomials ``Z_n^m = R_n^|m|(r)·cos(mθ)``
(``m ≥ 0``) or ``R_n^|m|(r)·sin(|m|θ)`` (``m < 0``) of the spatial frequency in 1/Å
(``r = |k|``, ``θ`` from image x towards y), e.g. ``Z_3^-1 = (3r³ − 2r)·sin θ = 3(kx² +
ky²)·ky − 2ky``. Order of the vectors: odd ``Z_1^-1, Z_1^1, Z_3^-3, Z_3^-1, Z_3^1, Z_3^3,
Z_5^-5, …``; even ``Z_0^0, Z_2^-2, Z_2^0, Z_2^2, Z_4^-4, Z_4^-2, Z_4^0, Z_4^2, Z_4^4, …``
(the 7th even term, ``Z_4^0``, is a change of Cs). Both are phases in radians.

* The even phase ``χ_e = Σ c_j Z_j`` is added to the CTF's ``γ``: ``CTF = −sin(γ + χ_e)·E``.
* The odd phase ``χ_o`` multiplies the image: a recorded tilt image's transform is
  ``e^{iχ_o(k)}·CTF(k)·P(k)`` (``P`` the projection; the forward transform
  ``Σ f(x) e^{−2πik·x}``), so Extract multiplies the data by ``e^{−iχ_o}``. This follows from
  the weak-phase image with the wave aberration ``−(γ + χ_e + χ_o)`` (RELION's ``γ`` is minus
  the usual one): its symmetric part gives ``−sin(γ + χ_e)``, its antisymmetric part the
  factor ``e^{iχ_o}``. Not checked against a RELION run (none is possible here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["aberration_phase", "zernike_indices", "zernike_polynomial"]


def zernike_indices(count: int, parity: str) -> list[tuple[int, int]]:
    """``(n, m)`` of the first ``count`` polynomials in RELION's order for ``parity``
    ``"even"`` (``n`` = 0, 2, 4, …) or ``"odd"`` (``n`` = 1, 3, 5, …), ``m`` from ``-n`` to
    ``n`` in steps of 2."""
    if parity not in ("even", "odd"):
        raise ValueError(f"parity must be 'even' or 'odd', got {parity!r}")
    out: list[tuple[int, int]] = []
    n = 0 if parity == "even" else 1
    while len(out) < count:
        out.extend((n, m) for m in range(-n, n + 1, 2))
        n += 2
    return out[:count]


def zernike_polynomial(n: int, m: int, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Unnormalised ``Z_n^m`` at frequencies ``kx, ky`` (1/Å, any shape, float64)."""
    r = torch.hypot(kx, ky)
    theta = torch.atan2(ky, kx)
    a = abs(m)
    radial = torch.zeros_like(r)
    for s in range((n - a) // 2 + 1):
        coef = (-1) ** s * math.factorial(n - s)
        coef /= math.factorial(s) * math.factorial((n + a) // 2 - s)
        coef /= math.factorial((n - a) // 2 - s)
        radial = radial + coef * r ** (n - 2 * s)
    return radial * (torch.cos(a * theta) if m >= 0 else torch.sin(a * theta))


def aberration_phase(
    coefficients: Sequence[float], parity: str, kx: torch.Tensor, ky: torch.Tensor
) -> torch.Tensor:
    """``Σ c_j Z_j(k)`` (radians) for RELION's ``rlnEvenZernike`` / ``rlnOddZernike`` vector
    ``coefficients`` at frequencies ``kx, ky`` (1/Å); zeros for an empty vector."""
    kx, ky = kx.double(), ky.double()
    phase = torch.zeros(torch.broadcast_shapes(kx.shape, ky.shape), dtype=torch.float64,
                        device=kx.device)  # fmt: skip
    for c, (n, m) in zip(coefficients, zernike_indices(len(coefficients), parity), strict=True):
        if c:
            phase = phase + float(c) * zernike_polynomial(n, m, kx, ky)
    return phase
