"""MRC/MRCS volumes and stacks via ``mrcfile``: float16/float32, voxel size, gzip input.

Arrays are zyx (stacks: image, y, x). Voxel sizes are in Å. Writers are atomic.
Unreadable, truncated or non-MRC files raise :class:`~subtomo.errors.InputError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import torch

from subtomo.errors import InputError
from subtomo.io.atomic import atomic_path
from subtomo.io.files import require_file

__all__ = [
    "MrcHeader",
    "map_pixel_size",
    "read_mrc",
    "read_mrc_header",
    "require_finite",
    "require_varying",
    "write_mrc",
]


@dataclass(frozen=True)
class MrcHeader:
    """What a job needs to know about an MRC file without reading its data."""

    shape: tuple[int, ...]  # zyx (nz = number of images for a stack)
    voxel_size: float  # Å, x axis
    mode: int
    is_stack: bool


def _open(path: Path, header_only: bool):
    require_file(path)
    try:
        return mrcfile.open(path, mode="r", header_only=header_only, permissive=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"not a readable MRC file ({exc})", file=path) from None


def read_mrc_header(path: str | os.PathLike) -> MrcHeader:
    """Shape, voxel size and mode of an MRC/MRCS file (checks that the data are complete)."""
    path = Path(path)
    with _open(path, header_only=True) as mrc:
        h = mrc.header
        shape = (int(h.nz), int(h.ny), int(h.nx))
        mode = int(h.mode)
        voxel = float(mrc.voxel_size.x)
        is_stack = path.suffix == ".mrcs" or (int(h.ispg) == 0 and shape[0] > 1)
        if path.suffix != ".gz":
            itemsize = {0: 1, 1: 2, 2: 4, 4: 8, 6: 2, 12: 2}.get(mode)
            expected = 1024 + int(h.nsymbt) + int(np.prod(shape)) * (itemsize or 0)
            if itemsize is not None and path.stat().st_size < expected:
                raise InputError(
                    f"truncated MRC file: {path.stat().st_size} bytes, header needs {expected}",
                    file=path,
                )
    return MrcHeader(shape=shape, voxel_size=voxel, mode=mode, is_stack=is_stack)


def read_mrc(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    finite: bool = False,
) -> tuple[torch.Tensor, float]:
    """Data (zyx, or nyx for a stack) as a tensor and the voxel size in Å.

    A 2D image comes back as (y, x); a ``.mrcs`` stack with one image as (1, y, x).
    ``finite``: ``InputError`` if any value is NaN or infinite (maps a job computes with).
    """
    path = Path(path)
    if path.suffix != ".gz":
        read_mrc_header(path)  # precise errors for missing/truncated files
    with _open(path, header_only=False) as mrc:
        data = np.asarray(mrc.data)
        voxel = float(mrc.voxel_size.x)
        if path.suffix == ".mrcs" and data.ndim == 2:
            data = data[None]
    tensor = torch.from_numpy(data.astype(np.float32, copy=True)).to(device=device, dtype=dtype)
    if finite:
        require_finite(tensor, path)
    return tensor, voxel


def require_finite(data: torch.Tensor, path: str | os.PathLike) -> None:
    """``InputError`` naming how many values of ``data`` (read from ``path``) are NaN or
    infinite and the zyx index of the first."""
    bad = ~torch.isfinite(data)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(
            f"{int(bad.sum())} of {data.numel()} values are NaN or infinite (the first at "
            f"zyx index {first})",
            file=path,
        )


def require_varying(data: torch.Tensor, path: str | os.PathLike) -> None:
    """``InputError`` when every value of ``data`` (a map read from ``path``) is the same:
    it holds no signal to correlate or sharpen (e.g. an all-zero map)."""
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise InputError(f"every value of the map is {low:g}: no signal", file=path)


def map_pixel_size(
    header_angst: float,
    given_angst: float,
    path: str | os.PathLike,
    *,
    required: bool = True,
    option: str | None = "--angpix",
) -> float:
    """The pixel size (Å) a map is used at: ``given_angst`` (from ``option``) when > 0, else
    the header's voxel size. ``InputError`` when that is negative, or 0 (not set) and
    ``required``; 0 comes back when not ``required``."""
    if given_angst > 0:
        return given_angst
    if header_angst > 0 or (header_angst == 0 and not required):
        return header_angst
    found = "no voxel size" if header_angst == 0 else f"voxel size {header_angst:g} Å"
    hint = f"; give {option}" if option else ""
    raise InputError(f"{found} in the header, expected > 0{hint}", file=path)


class _MrcWriter(mrcfile.mrcfile.MrcFile):
    """A new MRC file whose header statistics are given, not recomputed by ``set_data``
    (numpy reductions on float16 arrays are ~10x slower than on the float32 values)."""

    def __init__(self, path: Path, stats: tuple[float, float, float, float]) -> None:
        self._stats = stats
        super().__init__(path, mode="w+", overwrite=True)

    def update_header_stats(self) -> None:
        h = self.header
        h.dmin, h.dmax, h.dmean, h.rms = (np.float32(v) for v in self._stats)


_STATS_CHUNK = 1 << 24
"""Elements per chunk of the standard deviation of arrays above ``4 * _STATS_CHUNK``."""


def _header_stats(array: np.ndarray) -> tuple[float, float, float, float]:
    """min, max, mean and rms (standard deviation) as mrcfile computes them, in float32.

    ``np.std`` makes a temporary copy of the array; above 64 M elements (a tomogram) the
    deviations are summed over chunks of the first axis instead, so that writing a volume
    does not need it twice in memory."""
    if array.size == 0:
        return (0.0, -1.0, -2.0, -1.0)  # mrcfile's "not set" values
    mean = array.mean(dtype=np.float32)
    if array.size <= 4 * _STATS_CHUNK:
        std = float(array.std(dtype=np.float32))
    else:
        rows = max(1, _STATS_CHUNK * array.shape[0] // array.size)
        squares = sum(
            float(np.square(array[i : i + rows] - mean, dtype=np.float64).sum())
            for i in range(0, array.shape[0], rows)
        )
        std = float(np.sqrt(squares / array.size))
    return (float(array.min()), float(array.max()), float(mean), std)


#: Header bytes of files already written through mrcfile, by (shape, dtype, voxel size,
#: stack flag): a later file of the same kind only differs in its statistics.
_HEADERS: dict[tuple, np.ndarray] = {}


def write_mrc(
    path: str | os.PathLike,
    data: torch.Tensor | np.ndarray,
    voxel_size: float,
    *,
    float16: bool = False,
    is_stack: bool | None = None,
) -> None:
    """Write float32 (mode 2) or float16 (mode 12) data atomically with its voxel size (Å).

    ``is_stack`` marks a 3D array as an image stack (default: when the name ends in .mrcs).
    The header statistics (min, max, mean, rms) are those of the float32 values (before the
    rounding to float16). The first file of a shape is written by ``mrcfile``; later files
    of the same shape, dtype and voxel size reuse its header with their own statistics (an
    Extract job writes hundreds of such stacks; the files are byte for byte the same).
    """
    path = Path(path)
    if isinstance(data, torch.Tensor):
        tensor = data.detach().cpu()
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(data))
    values = tensor.to(torch.float32).contiguous()
    stats = _header_stats(values.numpy())
    array = values.half().numpy() if float16 else values.numpy()  # torch casts ~20x faster
    stack = is_stack if is_stack is not None else path.suffix == ".mrcs"
    key = (array.shape, array.dtype.str, float(voxel_size), stack)
    header = _HEADERS.get(key)
    if header is not None:
        header = header.copy()
        header["dmin"], header["dmax"], header["dmean"], header["rms"] = stats
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            out.write(header.tobytes())
            if array.size:  # memoryview cannot cast an empty array
                out.write(memoryview(array).cast("B"))
        return
    with atomic_path(path) as tmp:
        with _MrcWriter(tmp, stats) as mrc:
            mrc.set_data(array)
            if stack:
                mrc.set_image_stack()
            mrc.voxel_size = float(voxel_size)
            mrc.header.origin = (0.0, 0.0, 0.0)
            dtype = mrc.header.dtype
        # read back from the temporary file: a rank that does not write has no final file
        with open(tmp, "rb") as written:
            header = np.frombuffer(written.read(dtype.itemsize), dtype=dtype).copy()
    if int(header["nsymbt"][0]) == 0:  # the data follow the header directly
        _HEADERS[key] = header  # one dict store: safe from the Extract worker threads
