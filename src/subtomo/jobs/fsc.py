"""FSC between any two maps (e.g. a half map and the truth): table, crossings and a plot.

Not a pipeline job: prints the curve and its 0.5 / 0.143 crossings and writes
``<output_prefix>.star`` (data_fsc with RELION's labels) and ``<output_prefix>.png``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.data import read_map_checked
from subtomo.device import resolve_device
from subtomo.fourier import crossing_shell, fsc_maps, fsc_threshold_shell
from subtomo.io import write_star
from subtomo.project.options import argument, device_option, option
from subtomo.report import plot_fsc

__all__ = ["FscParams", "FscResult", "run"]

log = logging.getLogger("subtomo")


@dataclass
class FscParams:
    """Two maps, an optional mask, the pixel size and where to write the curve."""

    map1: str = argument(help="First map.")
    map2: str = argument(help="Second map.")
    mask: str | None = option(None, "--mask", help="Mask applied to both maps.")
    angpix: float = option(-1.0, "--angpix", help="Pixel size; <= 0: the header's.", unit="Å")
    output_prefix: str = option(
        "fsc", "--o", help="Output prefix of the .star and .png (a file name, not a job)."
    )
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.143])
    device: str = device_option()


@dataclass
class FscResult:
    """The FSC per shell and, per threshold, the resolution (Å) at the last shell above it
    and at the interpolated crossing."""

    fsc: np.ndarray
    angstrom: np.ndarray  # per shell (999 at shell 0)
    crossings: dict[float, tuple[float, float]]


def run(params: FscParams) -> FscResult:
    """Compute, write and return the FSC."""
    device = resolve_device(params.device)
    m1, px = read_map_checked(
        params.map1, what="map 1", device=device, angpix=params.angpix, cubic=True,
        varying=True,
    )  # fmt: skip
    m2, _ = read_map_checked(
        params.map2, what="map 2", device=device, angpix=px, cubic=True, shape=m1.shape,
        against="map 1", varying=True,
    )  # fmt: skip
    mask = None
    if params.mask:
        mask, _ = read_map_checked(
            params.mask, what="the mask", device=device, angpix=px, shape=m1.shape,
            against="the maps",
        )  # fmt: skip
    curve = fsc_maps(m1, m2, mask).double().cpu()
    n = m1.shape[-1]
    i = np.arange(curve.numel())
    ang = np.where(i > 0, n * px / np.maximum(i, 1), 999.0)
    crossings = {}
    for t in params.thresholds:
        shell = fsc_threshold_shell(curve, t)
        cross = crossing_shell(curve, t)
        crossings[t] = (
            n * px / shell if shell > 0 else 999.0,
            n * px / cross if cross > 0 else 999.0,
        )
    out = Path(params.output_prefix)
    table = pd.DataFrame(
        {
            "rlnSpectralIndex": i,
            "rlnResolution": 1.0 / ang,
            "rlnAngstromResolution": ang,
            "rlnFourierShellCorrelation": curve.numpy(),
        }
    )
    write_star(out.with_name(out.name + ".star"), {"fsc": table})
    res143 = crossings.get(0.143, (None, None))[1]
    plot_fsc(
        out.with_name(out.name + ".png"),
        1.0 / ang,
        {f"{Path(params.map1).name} vs {Path(params.map2).name}": curve.numpy()},
        thresholds=params.thresholds,
        resolution=res143,
    )
    return FscResult(fsc=curve.numpy(), angstrom=ang, crossings=crossings)
