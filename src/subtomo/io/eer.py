"""Thermo Fisher EER movies (Falcon 4/4i/C): electron events, rendered into counting frames.

An EER file is a little-endian BigTIFF whose pages are detector frames of a few milliseconds
(hundreds per movie), each one strip of compression 65000/65001/65002 with the acquisition
metadata as XML in tag 65001. Every event is coded as a run of empty pixels (in raster order)
followed by its sub-pixel position; a pixel holds at most one event per EER frame.

Like RELION's motion correction, frames are *rendered*: ``grouping`` consecutive EER frames
(``--eer_grouping``) are summed into one frame, and EER frames left over after the last full
group are dropped; ``upsampling`` 2 (``--eer_upsampling``) places events on the 2x finer
("8K") grid from their sub-pixel bits, 1 on the sensor grid. Decoding is tifffile's (with
imagecodecs' EER codec), not the ``eerfile`` package: eerfile 0.0.4 groups frames by a dose
rather than by RELION's frame count and cannot upsample, and it wraps the same tifffile reader.

:func:`write_eer` writes the simplest valid EER (compression 65000: 8-bit runs, 2 + 2
sub-pixel bits, all sub-pixel bits 0) for tests and simulations: tifffile cannot write EER.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from subtomo.errors import InputError
from subtomo.io.atomic import atomic_path

__all__ = ["EER_SUFFIX", "eer_frame_count", "read_eer_frames", "write_eer"]

EER_SUFFIX = ".eer"
_EER_COMPRESSIONS = (65000, 65001, 65002)


def _error(path: Path, exc: Exception) -> InputError:
    return InputError(f"not a readable EER movie ({type(exc).__name__}: {exc})", file=path)


def eer_frame_count(path: Path) -> tuple[int, tuple[int, int]]:
    """Number of EER frames and the sensor frame size (h, w) of an EER movie; every EER page
    must have one size and lie inside the file (a truncated file is an ``InputError``)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.is_eer:
                raise InputError("not an EER movie: no EER metadata (tag 65001)", file=path)
            pages = [p for p in tif.pages if p.compression in _EER_COMPRESSIONS]
            shapes = {tuple(p.shape) for p in pages}
            end = max((o + c for p in pages
                       for o, c in zip(p.dataoffsets, p.databytecounts, strict=True)),
                      default=0)  # fmt: skip
    except InputError:
        raise
    except Exception as exc:  # tifffile raises many types on damaged files
        raise _error(path, exc) from None
    size = path.stat().st_size
    if end > size:
        raise InputError(f"truncated EER movie: {size} bytes, its frames need {end}", file=path)
    if not pages or len(shapes) != 1:
        raise InputError(f"EER frames are not of one 2D size: {sorted(shapes)}", file=path)
    h, w = next(iter(shapes))
    return len(pages), (int(h), int(w))


def read_eer_frames(
    path: Path, n_frames: int, grouping: int, upsampling: int, batch: int
) -> Iterator[np.ndarray]:
    """The first ``n_frames`` rendered frames (each the sum of ``grouping`` EER frames, on the
    grid ``upsampling`` times finer), ``(b, h, w)`` uint16 in batches of ``batch``."""
    import tifffile

    try:
        with tifffile.TiffFile(path, superres=upsampling - 1) as tif:
            for start in range(0, n_frames, batch):
                stop = min(start + batch, n_frames)
                out = None
                for j in range(start, stop):
                    for k in range(j * grouping, (j + 1) * grouping):
                        events = tif.asarray(key=k, series=0)
                        if out is None:
                            out = np.zeros((stop - start, *events.shape), dtype=np.uint16)
                        out[j - start] += events
                yield out
    except InputError:
        raise
    except Exception as exc:
        raise _error(path, exc) from None


def _encode_frame(events: np.ndarray) -> bytes:
    """One EER frame (0/1 per pixel) as compression-65000 code: per event an 8-bit run of
    empty pixels (255 = 255 empty pixels, no event yet) and 4 sub-pixel bits (0), least
    significant bit first; a final run reaches the last pixel; padded to an even length."""
    out = bytearray()
    acc = bits = position = 0

    def put(value: int, width: int) -> None:
        nonlocal acc, bits
        acc |= value << bits
        bits += width
        while bits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            bits -= 8

    def run(length: int) -> None:
        while length >= 255:
            put(255, 8)
            length -= 255
        put(length, 8)

    for index in np.flatnonzero(events.ravel()):
        run(int(index) - position)
        put(0, 4)
        position = int(index) + 1
    run(events.size - position)
    if bits:
        out.append(acc & 0xFF)
    if len(out) % 2:
        out.append(0)
    return bytes(out)


def write_eer(path: str | os.PathLike, events: np.ndarray, pixel_size: float = 0.0) -> None:
    """Write events ``(t, h, w)`` (0/1 per pixel and frame) as an EER movie (BigTIFF, one
    compression-65000 strip per frame, metadata XML with the frame count, sensor size and
    ``pixel_size`` Å), atomically."""
    events = np.asarray(events)
    if events.ndim != 3 or events.min(initial=0) < 0 or events.max(initial=0) > 1:
        raise ValueError("EER events must be (t, h, w) with 0 or 1 per pixel")
    t, h, w = events.shape
    metadata = (
        f'<metadata><item name="numberOfFrames">{t}</item>'
        f'<item name="sensorImageWidth">{w}</item><item name="sensorImageHeight">{h}</item>'
        f'<item name="sensorPixelSize.width">{pixel_size * 1e-10:g}</item>'
        f'<item name="sensorPixelSize.height">{pixel_size * 1e-10:g}</item></metadata>'
    ).encode()
    strips = [_encode_frame(frame) for frame in events]
    data = bytearray(b"II+\x00") + struct.pack("<HHQ", 8, 0, 0)  # BigTIFF, first IFD later
    offsets = []
    for strip in strips:
        offsets.append(len(data))
        data += strip
    metadata_at = len(data)
    data += metadata + b"\x00" * (len(metadata) % 2)
    link = 8  # where the offset of the next IFD goes
    for i, strip in enumerate(strips):
        tags = [(256, 4, 1, w), (257, 4, 1, h), (259, 3, 1, 65000), (273, 16, 1, offsets[i]),
                (277, 3, 1, 1), (278, 4, 1, h), (279, 16, 1, len(strip))]  # fmt: skip
        if i == 0:
            tags.append((65001, 7, len(metadata), metadata_at))
        data[link : link + 8] = struct.pack("<Q", len(data))
        data += struct.pack("<Q", len(tags))
        for tag, kind, count, value in tags:
            data += struct.pack("<HHQQ", tag, kind, count, value)
        link = len(data)
        data += struct.pack("<Q", 0)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(bytes(data))
