"""Atomic file output: write to a temporary name in the same folder, then rename.

A job killed mid-write leaves either the previous file or none, never half a file. Under
``torch.distributed`` only rank 0 writes: on the other ranks (which run the same code) the
writer fills a private temporary file that is then deleted, except for the files of their
own share inside :func:`subtomo.distributed.own_files`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from subtomo.distributed import writes_files

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary name keeps the final suffix (``.mrc``, ``.star``) so that writers which
    look at the extension behave the same. On a rank other than 0 of a ``torch.distributed``
    run (outside :func:`subtomo.distributed.own_files`) the file is written to a private
    temporary folder and discarded.
    """
    final = Path(path)
    if not writes_files():
        with tempfile.TemporaryDirectory(prefix="subtomo-rank") as scratch:
            yield Path(scratch) / final.name
        return
    if not final.parent.is_dir():  # one stat; mkdir(exist_ok) costs a failing syscall
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
