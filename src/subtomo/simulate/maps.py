"""Species maps for the simulator: the embedded demo maps and rescaling to the simulation box.

Maps are zyx with the centre at ``N//2``; voxel and pixel sizes in Å. Rescaling goes through
teamtomo's ``torch-fourier-rescale`` (Fourier cropping/padding) behind :func:`rescale_map`:
checked in ``tests/test_simulate_maps.py`` to preserve voxel *values* (a Gaussian sampled at
5 Å and rescaled to 10 Å equals the same Gaussian sampled at 10 Å), for even sizes only -- the
library centres with ``fftshift``, which is off by one voxel for odd sizes, so the map is first
padded/cropped to an even size here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch_fourier_rescale import fourier_rescale_3d

from subtomo.errors import InputError
from subtomo.io import read_mrc

__all__ = ["DEMO_MAPS", "Species", "demo_species", "particle_radius_px", "rescale_map"]

log = logging.getLogger("subtomo")

#: Embedded demo maps (PDB 4V4R density, 5 Å/voxel; see demo_data/NOTICE).
DEMO_MAPS = {
    "ribosome70S": "ribosome70S_4v4r_5A.mrc.gz",
    "ribosome50S": "ribosome50S_4v4r_5A.mrc.gz",
}


@dataclass(frozen=True)
class Species:
    """One kind of particle: a name (``subtomoSpecies``) and its map (zyx, voxel size Å)."""

    name: str
    volume: torch.Tensor
    voxel_size: float


def demo_species(names: tuple[str, ...] | list[str]) -> list[Species]:
    """The embedded demo maps by name (keys of :data:`DEMO_MAPS`)."""
    out = []
    for name in names:
        if name not in DEMO_MAPS:
            raise InputError(f"unknown demo map {name!r}; choose from {sorted(DEMO_MAPS)}")
        ref = resources.files("subtomo").joinpath("demo_data", DEMO_MAPS[name])
        with resources.as_file(ref) as path:
            volume, voxel = read_mrc(path)
        out.append(Species(name=name, volume=volume, voxel_size=voxel))
    return out


def _centre_crop_or_pad(volume: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad or crop a cube to ``size`` keeping voxel ``N//2`` at ``size//2``."""
    n = volume.shape[-1]
    low = size // 2 - n // 2
    high = (size - size // 2) - (n - n // 2)
    return F.pad(volume, [low, high] * 3)


def rescale_map(
    volume: torch.Tensor, voxel_size: float, pixel_size: float, box: int
) -> torch.Tensor:
    """The map ``(box, box, box)`` at ``pixel_size`` Å, centred at ``box//2``, values preserved.

    The map is first padded/cropped (real space, around ``N//2``) to the even edge
    ``n = round(box * pixel_size / voxel_size)`` covering the same physical box, then Fourier
    cropped/padded to ``box``. When ``box * pixel_size / voxel_size`` is not an even integer the
    effective pixel size is ``voxel_size * n / box`` (logged; the truth map is the rescaled map,
    so the simulation stays self-consistent). Raises :class:`InputError` if density (> 1% of the
    maximum) would be cut off.
    """
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"species maps must be cubic, got shape {tuple(volume.shape)}")
    if box % 2:
        raise InputError(f"the box must be even, got {box}")
    ratio = box * pixel_size / voxel_size
    n = max(2, 2 * round(ratio / 2))
    if abs(n - ratio) > 1e-6:
        log.warning(
            "map rescaled from %.4g to %.4g Å/px instead of %.4g (box %d)",
            voxel_size, voxel_size * n / box, pixel_size, box,
        )  # fmt: skip
    volume = volume.float()
    fitted = _centre_crop_or_pad(volume, n)
    lost = volume.abs().sum() - fitted.abs().sum()
    if lost > 0.01 * volume.abs().sum():
        raise InputError(
            f"the map ({volume.shape[-1]} voxels of {voxel_size:g} Å) does not fit in the box of "
            f"{box} x {pixel_size:g} Å: increase --box"
        )
    if n == box:
        return fitted
    rescaled, _ = fourier_rescale_3d(fitted, target_shape=(box, box, box), preserve_mean=True)
    return rescaled


def particle_radius_px(volume: torch.Tensor, threshold: float = 0.02) -> float:
    """Radius (voxels) of the sphere about ``N//2`` holding all voxels above ``threshold * max``."""
    n = volume.shape[-1]
    axis = torch.arange(n, device=volume.device, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    r = torch.sqrt(x**2 + y**2 + z**2)
    inside = volume > threshold * volume.max()
    return float(r[inside].max()) if bool(inside.any()) else 0.0
