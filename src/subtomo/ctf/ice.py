"""Beer–Lambert attenuation of the signal by the ice layer (RELION's per-tilt CTF scale, §11)."""

from __future__ import annotations

import torch

__all__ = ["ice_normal", "ice_scale"]


def ice_normal(normal_deg: torch.Tensor | float) -> torch.Tensor:
    """Unit ice normal ``(..., 3)`` (xyz, tomogram frame) at ``normal_deg`` degrees from z
    towards x, in the tilt plane (the tilt axis is y before the Z rotation, §1.3)."""
    phi = torch.deg2rad(torch.as_tensor(normal_deg, dtype=torch.float64))
    return torch.stack([torch.sin(phi), torch.zeros_like(phi), torch.cos(phi)], dim=-1)


def ice_scale(
    tilt_rotations: torch.Tensor,
    amplitude: torch.Tensor | float,
    kappa: torch.Tensor | float,
    normal_deg: torch.Tensor | float,
) -> torch.Tensor:
    """``a·κ^(1/|cos θ_f|)`` ``(t,)``: the signal left after the path through the ice in tilt f.

    ``tilt_rotations`` ``(t, 3, 3)`` the R_f of §1.3; θ_f is the angle between the viewing
    direction (row 3 of R_f, in tomogram axes) and the ice normal (:func:`ice_normal`);
    ``κ = exp(-thickness / mean free path)`` is the attenuation at normal incidence and ``a``
    the scale without ice. Differentiable in ``a``, ``κ`` and the normal angle.
    """
    view = tilt_rotations[..., 2, :].to(torch.float64)  # (t, 3)
    cos = (view * ice_normal(normal_deg)).sum(-1).abs().clamp_min(1e-3)
    return torch.as_tensor(amplitude, dtype=torch.float64) * torch.as_tensor(
        kappa, dtype=torch.float64
    ) ** (1.0 / cos)
