"""A detector MTF: RELION's MTF STAR file (``--mtf`` of postprocess, the simulator's MTF)."""

from __future__ import annotations

import os

import numpy as np

from subtomo.errors import InputError
from subtomo.io import numeric_column, read_star, require_block

__all__ = ["read_mtf"]


def read_mtf(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(rlnResolutionInversePixel, rlnMtfValue) of a RELION MTF STAR file, checked."""
    blocks = read_star(path)
    name = next(iter(blocks))
    table = require_block(blocks, name, path)
    freq = numeric_column(table, "rlnResolutionInversePixel", path, name)
    value = numeric_column(table, "rlnMtfValue", path, name)
    bad = np.flatnonzero(value < 1e-10)
    if bad.size:
        raise InputError(
            "MTF values must be positive",
            file=path,
            block=name,
            column="rlnMtfValue",
            row=int(bad[0]) + 1,
        )
    if np.any(np.diff(freq) <= 0):
        raise InputError(
            "resolutions must increase", file=path, block=name, column="rlnResolutionInversePixel"
        )
    return freq, value
