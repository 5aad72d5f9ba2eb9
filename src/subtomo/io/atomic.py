"""Atomic file output: write to a temporary name in the same folder, then rename.

A job killed mid-write leaves either the previous file or none, never half a file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary name keeps the final suffix (``.mrc``, ``.star``) so that writers which
    look at the extension behave the same.
    """
    final = Path(path)
    if not final.parent.is_dir():  # one stat; mkdir(exist_ok) costs a failing syscall
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
