"""Checks shared by the readers: a path that is a regular file, text that is UTF-8."""

from __future__ import annotations

import os
from pathlib import Path

from subtomo.errors import InputError

__all__ = ["read_utf8", "require_file"]


def require_file(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path`; ``InputError`` if it is missing, a directory or
    not a regular file (a FIFO or device would block or read forever)."""
    path = Path(path)
    if path.is_dir():
        raise InputError("is a directory, expected a file", file=path)
    if not path.exists():
        raise InputError("file not found", file=path)
    if not path.is_file():
        raise InputError("not a regular file", file=path)
    return path


def read_utf8(path: Path) -> str:
    """The text of ``path``; ``InputError`` naming the first byte that is not UTF-8 (its
    offset from the start of the file and its line)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line})",
            file=path,
        ) from None
