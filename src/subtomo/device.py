"""The compute device a job runs on (``--device auto|cpu|cuda[:N]``)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when one is available, else the CPU; else ``name``."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
