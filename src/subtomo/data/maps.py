"""Maps and masks a job computes with, read and checked by one set of rules.

* **Values**: every value finite; a mask's values in [0, 1] (to :data:`MASK_TOLERANCE`, for
  float rounding), as ``relion_refine`` and ``relion_postprocess`` require of a mask.
* **Pixel size**: a map used with particles must have their pixel size: its header voxel
  size may differ from it by at most :data:`PIXEL_SIZE_TOLERANCE_ANGST` (0.001 Å, RELION's
  tolerance for pixel sizes that must agree, §1.1); a voxel size of 0 (not set) takes the
  particles' one, a negative one is an error. A map used on its own takes ``--angpix`` when
  given (> 0), else its header voxel size (:func:`~subtomo.io.map_pixel_size`).
* **Shape**: 3D, cubic where asked, and the shape of what it is used with.

Arrays are zyx; sizes in messages are x×y×z voxels, as MRC headers give them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from subtomo.data.optimisation_set import OptimisationSet
from subtomo.errors import InputError
from subtomo.io import map_pixel_size, read_mrc, require_varying

__all__ = [
    "MASK_TOLERANCE",
    "PIXEL_SIZE_TOLERANCE_ANGST",
    "HalfMaps",
    "read_half_maps",
    "read_map_checked",
]

#: Largest difference (Å) between a map's header voxel size and the particles' pixel size.
PIXEL_SIZE_TOLERANCE_ANGST = 1e-3
#: How far (absolute) a mask value may lie outside [0, 1] (float rounding).
MASK_TOLERANCE = 1e-6


def _voxels(shape: tuple[int, ...] | torch.Size) -> str:
    """``"nx x ny x nz"`` of a zyx shape (as many axes as it has)."""
    return "x".join(str(int(n)) for n in tuple(shape)[::-1])


def read_map_checked(
    path: str | os.PathLike,
    *,
    what: str = "the map",
    device: torch.device | str | None = None,
    pixel_size: float | None = None,
    angpix: float = -1.0,
    pixel_required: bool = True,
    shape: tuple[int, ...] | torch.Size | None = None,
    against: str = "",
    cubic: bool = False,
    mask: bool = False,
    varying: bool = False,
) -> tuple[torch.Tensor, float]:
    """A 3D map (zyx, float32) and the pixel size (Å) to use it at, checked by the module's
    rules; :class:`~subtomo.errors.InputError` naming the file and ``what`` otherwise.

    ``pixel_size``: the particles' pixel size the map must have (then returned). Without it,
    ``angpix`` (> 0) or the header voxel size is returned (0 when unknown and not
    ``pixel_required``). ``shape``: the zyx shape it must have, that of ``against`` (named in
    the message). ``cubic``: all sides equal. ``mask``: values in [0, 1]. ``varying``: not
    one constant value (a map to correlate or sharpen).
    """
    volume, header = read_mrc(path, device=device, finite=True)
    if volume.ndim != 3 or (cubic and len(set(volume.shape)) != 1):
        kind = "a cubic 3D map" if cubic else "a 3D map"
        raise InputError(f"expected {kind}, found shape {tuple(volume.shape)}", file=path)
    if shape is not None and tuple(volume.shape) != tuple(shape):
        raise InputError(
            f"{what} has {_voxels(volume.shape)} voxels, which differs from {against} "
            f"({_voxels(shape)})",
            file=path,
        )
    if pixel_size is None:
        pixel = map_pixel_size(header, angpix, path, required=pixel_required)
    else:
        voxel = map_pixel_size(header, -1.0, path, required=False, option=None)
        if voxel > 0 and abs(voxel - pixel_size) > PIXEL_SIZE_TOLERANCE_ANGST:
            raise InputError(
                f"{what} has voxel size {voxel:g} Å in the header; the particles' pixel size "
                f"is {pixel_size:g} Å (they must agree to {PIXEL_SIZE_TOLERANCE_ANGST:g} Å)",
                file=path,
            )
        pixel = pixel_size
    if mask:
        low, high = float(volume.min()), float(volume.max())
        if low < -MASK_TOLERANCE or high > 1 + MASK_TOLERANCE:
            raise InputError(f"mask values must lie in [0, 1], found {low:g}..{high:g}", file=path)
    if varying:
        require_varying(volume, path)
    return volume, pixel


@dataclass
class HalfMaps:
    """Two half maps (zyx), an optional mask, the pixel size (Å) and where they came from."""

    half1: torch.Tensor
    half2: torch.Tensor
    mask: torch.Tensor | None
    pixel_size: float
    path1: Path
    path2: Path
    mask_path: Path | None
    optimisation_set: OptimisationSet | None


def _other_half(path: Path) -> Path:
    name = path.name
    if "half1" not in name:
        raise InputError("cannot derive half 2 (no 'half1' in the name); give --i2", file=path)
    return path.with_name(name.replace("half1", "half2"))


def read_half_maps(
    i: str | None,
    i2: str | None,
    ios: str | None,
    mask: str | None,
    angpix: float,
    device: torch.device | str | None = None,
) -> HalfMaps:
    """The half maps (``--i`` and ``--i2``, half 2 by default ``--i`` with ``half1`` renamed
    ``half2``, or the optimisation set's reference maps) and the mask (``--mask``, or the
    optimisation set's), as ``relion_postprocess`` takes them; the pixel size is ``angpix``
    (> 0) or half 1's header voxel size."""
    oset = None
    if ios:
        oset = OptimisationSet.read(ios)
        if oset.reference_map1 is None or oset.reference_map2 is None:
            raise InputError("no rlnTomoReferenceMap1File/Map2File", file=ios, block="")
        p1, p2 = Path(oset.reference_map1), Path(oset.reference_map2)
        if mask is None and oset.reference_mask is not None:
            mask = str(oset.reference_mask)
    elif i:
        p1 = Path(i)
        p2 = Path(i2) if i2 else _other_half(p1)
    else:
        raise InputError("give the half maps with --i (and --i2) or --ios")
    h1, px = read_map_checked(
        p1, what="half map 1", device=device, angpix=angpix, cubic=True, varying=True
    )
    h2, _ = read_map_checked(
        p2, what="half map 2", device=device, angpix=px, cubic=True, shape=h1.shape,
        against="half map 1", varying=True,
    )  # fmt: skip
    m = None
    mpath = Path(mask) if mask else None
    if mpath is not None:
        m, _ = read_map_checked(
            mpath, what="the mask", device=device, angpix=px, shape=h1.shape,
            against="the half maps", mask=True,
        )  # fmt: skip
    return HalfMaps(h1, h2, m, px, p1, p2, mpath, oset)
