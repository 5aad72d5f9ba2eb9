"""Detector movies (MRC, TIFF, EER) and gain references, read frame by frame.

Frames are ``(y, x)`` in MRC row order. TIFF pages (one per frame) are
flipped upside down on reading, as RELION reads them (TIFF's row 0 is the top of the image,
MRC's the bottom; ``relion_run_motioncorr`` gives the same shifts for a TIFF and an MRC
movie only with this flip), and on writing. A movie is opened once for its header (frame
count, size, pixel size) and then streamed in batches of frames, so memory holds one batch,
not the movie. Unreadable, truncated or inconsistent files raise
:class:`~subtomo.errors.InputError` naming the file. EER movies (:mod:`subtomo.io.eer`)
count their EER frames until :func:`render_eer` says how many make one frame.

Gain references follow RELION/MotionCor2: the frames are **multiplied** by the gain; the
gain is first rotated by ``rotation`` × 90° clockwise (as displayed with row 0 at the top,
``--gain_rot``) and then flipped (``--gain_flip``: 0 none, 1 upside down = flip y,
2 left-right = flip x).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from subtomo.errors import InputError
from subtomo.io.atomic import atomic_path
from subtomo.io.eer import EER_SUFFIX, eer_frame_count, read_eer_frames
from subtomo.io.files import require_file
from subtomo.io.mrc import read_mrc, read_mrc_header, write_mrc

__all__ = [
    "MOVIE_SUFFIXES",
    "MovieHeader",
    "orient_gain",
    "read_gain",
    "read_movie_arrays",
    "read_movie_frames",
    "read_movie_header",
    "render_eer",
    "unorient_gain",
    "write_movie",
]

#: File endings read as movies (case-insensitive).
MOVIE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", EER_SUFFIX)


@dataclass(frozen=True)
class MovieHeader:
    """What a movie holds: ``n_frames`` frames of ``shape`` = (h, w) pixels; ``pixel_size``
    in Å from the header (0: not recorded, as in TIFF and EER). An EER movie counts its EER
    frames (``eer_grouping`` 0) until :func:`render_eer` groups them into frames."""

    path: Path
    n_frames: int
    shape: tuple[int, int]
    pixel_size: float
    eer_grouping: int = 0
    eer_upsampling: int = 1

    @property
    def is_eer(self) -> bool:
        return self.path.suffix.lower() == EER_SUFFIX


def render_eer(header: MovieHeader, grouping: int, upsampling: int = 1) -> MovieHeader:
    """The frames RELION renders from an EER movie: ``grouping`` EER frames each (those
    after the last full group dropped), on a grid ``upsampling`` (1 or 2) times the sensor's.
    Other movies are returned as they are. An EER movie without a grouping (the fractionation)
    is an ``InputError`` naming the file. As in RELION, the movie pixel size the user gives
    (rlnMicrographOriginalPixelSize) is that of the rendered grid: half the physical one
    with ``upsampling`` 2."""
    if not header.is_eer:
        return header
    if grouping <= 0:
        raise InputError(
            "EER movie without a fractionation: give --eer_grouping (EER frames per frame)",
            file=header.path,
        )
    if upsampling not in (1, 2):
        raise InputError(f"--eer_upsampling {upsampling} must be 1 (sensor grid) or 2")
    if grouping > header.n_frames:
        raise InputError(
            f"--eer_grouping {grouping} is more than its {header.n_frames} EER frames",
            file=header.path,
        )
    h, w = header.shape
    return replace(
        header, n_frames=header.n_frames // grouping, shape=(h * upsampling, w * upsampling),
        eer_grouping=grouping, eer_upsampling=upsampling,
    )  # fmt: skip


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def _tiff_error(path: Path, exc: Exception) -> InputError:
    return InputError(f"not a readable TIFF movie ({type(exc).__name__}: {exc})", file=path)


def read_movie_header(path: str | os.PathLike) -> MovieHeader:
    """Frame count, frame size and pixel size of an MRC or TIFF movie (the MRC data are
    checked to be complete; every TIFF page must have the first page's size)."""
    path = require_file(path)
    if path.suffix.lower() not in MOVIE_SUFFIXES:
        raise InputError(
            f"unknown movie format {path.suffix!r}, expected one of {', '.join(MOVIE_SUFFIXES)}",
            file=path,
        )
    if path.suffix.lower() == EER_SUFFIX:
        n, shape = eer_frame_count(path)
        return MovieHeader(path, n, shape, 0.0)
    if not _is_tiff(path):
        header = read_mrc_header(path)
        nz, ny, nx = header.shape
        return MovieHeader(path, nz, (ny, nx), header.voxel_size)
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            shapes = {tuple(page.shape) for page in tif.pages}
            n = len(tif.pages)
            end = max(
                (
                    o + c
                    for page in tif.pages
                    for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)
                ),
                default=0,
            )
    except Exception as exc:  # tifffile raises many types on damaged files
        raise _tiff_error(path, exc) from None
    size = path.stat().st_size
    if end > size:
        raise InputError(f"truncated TIFF movie: {size} bytes, its frames need {end}", file=path)
    if n == 0 or len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InputError(f"TIFF pages are not frames of one 2D size: {sorted(shapes)}", file=path)
    ny, nx = next(iter(shapes))
    return MovieHeader(path, n, (int(ny), int(nx)), 0.0)


def read_movie_arrays(header: MovieHeader, batch: int = 4) -> Iterator[np.ndarray]:
    """The frames of a movie as numpy arrays ``(b, h, w)`` of at most ``batch`` frames in
    the file's own dtype and byte order, read from disk as they are asked for, without
    copies where a view does: TIFF pages read into one array per batch and returned with
    their rows flipped by a negative stride; MRC frames as slices of the memory map (valid
    while the next batch is read); EER frames rendered as :func:`render_eer` set them."""
    path = header.path
    if header.is_eer:
        if header.eer_grouping <= 0:
            render_eer(header, 0)  # the error naming the file
        yield from read_eer_frames(path, header.n_frames, header.eer_grouping,
                                   header.eer_upsampling, batch)  # fmt: skip
        return
    if _is_tiff(path):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                for start in range(0, header.n_frames, batch):
                    stop = min(start + batch, header.n_frames)
                    first = tif.pages[start]
                    pages = np.empty((stop - start, *first.shape), dtype=first.dtype)
                    for j in range(start, stop):
                        tif.pages[j].asarray(out=pages[j - start])
                    yield pages[:, ::-1]
        except InputError:
            raise
        except Exception as exc:
            raise _tiff_error(path, exc) from None
        return
    import mrcfile

    with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
        data = mrc.data if mrc.data.ndim == 3 else mrc.data[None]
        for start in range(0, header.n_frames, batch):
            yield data[start : start + batch]


def read_movie_frames(header: MovieHeader, batch: int = 4) -> Iterator[torch.Tensor]:
    """The frames of a movie as ``(b, h, w)`` CPU tensors of at most ``batch`` frames, in the
    file's own dtype (counts are often 8-bit: convert on the compute device), read from disk
    as they are asked for (MRC memory-mapped, TIFF page by page; TIFF rows flipped; EER
    frames rendered as :func:`render_eer` set them, not flipped; :func:`read_movie_arrays`)."""
    for frames in read_movie_arrays(header, batch):
        native = frames.dtype.newbyteorder("=")
        own = frames.flags.c_contiguous and frames.flags.writeable and frames.dtype == native
        yield torch.from_numpy(frames if own else np.array(frames, dtype=native))


def orient_gain(gain: np.ndarray, rotation: int = 0, flip: int = 0) -> np.ndarray:
    """``gain`` rotated by ``rotation`` × 90° clockwise, then flipped (0 none, 1 flip y,
    2 flip x) - RELION's ``--gain_rot`` / ``--gain_flip``."""
    if flip not in (0, 1, 2):
        raise ValueError(f"gain flip must be 0, 1 or 2, got {flip}")
    out = np.rot90(gain, k=-(rotation % 4))
    if flip == 1:
        out = out[::-1]
    elif flip == 2:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def unorient_gain(gain: np.ndarray, rotation: int = 0, flip: int = 0) -> np.ndarray:
    """The inverse of :func:`orient_gain`: the file that ``--gain_rot rotation --gain_flip
    flip`` turn into ``gain``."""
    out = gain[::-1] if flip == 1 else gain[:, ::-1] if flip == 2 else gain
    return np.ascontiguousarray(np.rot90(out, k=rotation % 4))


def write_movie(path: str | os.PathLike, frames: np.ndarray, pixel_size: float) -> None:
    """Write counts ``(t, h, w)`` atomically: ``.tif``/``.tiff`` as one 8-bit (16-bit when a
    count exceeds 255) page per frame (rows flipped, as they are read back), otherwise a
    float16 MRC stack (exact for counts up to 2048) with the pixel size (Å)."""
    path = Path(path)
    if not _is_tiff(path):
        write_mrc(path, frames, pixel_size, float16=True, is_stack=True)
        return
    import tifffile

    dtype = np.uint8 if frames.max() <= 255 else np.uint16
    with atomic_path(path) as tmp:
        pages = np.ascontiguousarray(np.asarray(frames)[:, ::-1]).astype(dtype)
        tifffile.imwrite(tmp, pages, photometric="minisblack")


def read_gain(
    path: str | os.PathLike, shape: tuple[int, int], rotation: int = 0, flip: int = 0
) -> np.ndarray:
    """The gain reference (MRC or TIFF, one image) oriented for frames of ``shape`` (h, w);
    ``InputError`` when it is not one 2D image of that shape or has non-finite values."""
    path = require_file(path)
    if _is_tiff(path):
        import tifffile

        try:
            gain = tifffile.imread(path)[..., ::-1, :].astype(np.float32)
        except Exception as exc:
            raise _tiff_error(path, exc) from None
    else:
        gain = read_mrc(path)[0].numpy()
    if gain.ndim == 3 and gain.shape[0] == 1:
        gain = gain[0]
    if gain.ndim != 2:
        raise InputError(f"gain reference has shape {gain.shape}, expected one image", file=path)
    gain = orient_gain(gain, rotation, flip)
    if gain.shape != tuple(shape):
        raise InputError(
            f"gain reference is {gain.shape[1]} x {gain.shape[0]} px after --gain_rot "
            f"{rotation} / --gain_flip {flip}; the movies are {shape[1]} x {shape[0]} px",
            file=path,
        )
    if not np.isfinite(gain).all():
        raise InputError("gain reference has NaN or infinite values", file=path)
    return gain
