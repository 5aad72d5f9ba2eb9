"""STAR files via ``starfile``, with RELION 5 formatting and validation that names the place.

Blocks come back as a dict ``{name: DataFrame | dict}`` (loops as DataFrames, key-value
blocks as dicts), unknown columns kept. CR+LF line endings are accepted. Writing is atomic;
vector-valued labels (``[1,0,1]``) are written as one token with no spaces, booleans as 0/1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from subtomo.errors import InputError
from subtomo.io.atomic import atomic_path
from subtomo.io.files import read_utf8, require_file

__all__ = [
    "NAME_COLUMNS",
    "as_written",
    "format_vector",
    "number_problem",
    "numeric_column",
    "parse_vector",
    "read_star",
    "require_block",
    "require_columns",
    "write_star",
]

# Enough significant digits that values read from RELION files (<= 6 decimals) come back
# unchanged and computed values keep 1e-12 relative precision.
_FLOAT_FORMAT = "%.12g"

# Name columns kept as text even when they look like numbers ("001" must not become 1).
NAME_COLUMNS = ("rlnTomoName", "rlnTomoParticleName", "rlnOpticsGroupName")


def read_star(
    path: str | os.PathLike, *, parse_as_string: Iterable[str] = NAME_COLUMNS
) -> dict[str, pd.DataFrame | dict[str, Any]]:
    """All blocks of a STAR file; ``InputError`` if it is missing, not UTF-8 text, has no
    ``data_`` block or one twice, or cannot be parsed.

    Columns named in ``parse_as_string`` stay text (default: the tomogram, particle and
    optics-group name columns).
    """
    path = require_file(path)
    _check_blocks(path)
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=list(parse_as_string))
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        raise InputError(
            f"not a readable STAR file ({type(exc).__name__}: {exc})", file=path
        ) from None
    return {name: {} if block is None else block for name, block in blocks.items()}


def _check_blocks(path: Path) -> None:
    """``InputError`` unless ``path`` is UTF-8 text whose ``data_`` lines name each block
    once (``starfile`` would read undecodable bytes as no blocks and keep only the last of
    two blocks with one name)."""
    text = read_utf8(path)
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped.startswith("data_"):
            continue
        name = stripped[5:]
        if name in first_line:
            raise InputError(
                f"block data_{name} appears twice (lines {first_line[name]} and {number})",
                file=path,
            )
        first_line[name] = number
    if not first_line:
        raise InputError("no data_ blocks found (not a STAR file?)", file=path)


def as_written(values: np.ndarray) -> np.ndarray:
    """``values`` rounded as :func:`write_star` writes them (``%.12g``): what a resumed run
    reads back, so that quantities derived from them agree with a run that never stopped."""
    return np.vectorize(lambda v: float(_FLOAT_FORMAT % v), otypes=[np.float64])(values)


def _format_float(value: float) -> str:
    """``%.12g``, with ``.0`` kept on integral values so the column reads back as float."""
    text = _FLOAT_FORMAT % value
    return text if any(c in text for c in ".enia") else text + ".0"


def _star_value(value: Any) -> Any:
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, float | np.floating):
        return _format_float(float(value))
    return value


def write_star(path: str | os.PathLike, blocks: Mapping[str, pd.DataFrame | Mapping]) -> None:
    """Write blocks atomically (loops for DataFrames, key-value lists for dicts).

    Floats are written with 12 significant digits and keep a decimal point (``-1.0``), so a
    written table reads back with the same values and dtypes; booleans are written as 0/1.
    """
    out: dict[str, pd.DataFrame | dict] = {}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            df = block.copy()
            for col in df.columns:
                if df[col].dtype == bool:
                    df[col] = df[col].astype(int)
                elif pd.api.types.is_float_dtype(df[col].dtype):
                    df[col] = [_format_float(v) for v in df[col].to_numpy(dtype=np.float64)]
            out[name] = df
        else:
            out[name] = {k: _star_value(v) for k, v in block.items()}
    with atomic_path(path) as tmp:
        starfile.write(out, tmp, float_format=_FLOAT_FORMAT)


def require_block(
    blocks: Mapping[str, Any], name: str, path: str | os.PathLike, *, loop: bool = True
) -> pd.DataFrame | dict[str, Any]:
    """The block ``name``; a key-value block is turned into a one-row table if ``loop``."""
    if name not in blocks:
        raise InputError(f"missing block data_{name}", file=path)
    block = blocks[name]
    if loop and isinstance(block, dict):
        block = pd.DataFrame([block] if block else [])
    return block


def require_columns(
    df: pd.DataFrame, columns: Iterable[str], path: str | os.PathLike, block: str
) -> None:
    """``InputError`` naming the first required column that ``df`` lacks."""
    for col in columns:
        if col not in df.columns:
            raise InputError("missing required column", file=path, block=block, column=col)


def numeric_column(
    df: pd.DataFrame,
    column: str,
    path: str | os.PathLike,
    block: str,
    *,
    default: float | None = None,
    dtype: type = np.float64,
    positive: bool = False,
) -> np.ndarray:
    """Column values as finite numbers (``positive``: also > 0, e.g. pixel sizes); errors
    name the first bad row (1-based).

    A missing column gives ``default`` for every row, or an error if no default is given.
    """
    if column not in df.columns:
        if default is None:
            raise InputError("missing required column", file=path, block=block, column=column)
        return np.full(len(df), default, dtype=dtype)
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if positive:
        bad |= values <= 0
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        problem = number_problem(df[column].iloc[row], values[row], positive=positive)
        raise InputError(problem, file=path, block=block, column=column, row=row + 1)
    return values.astype(dtype)


def number_problem(raw: Any, value: float, *, positive: bool = False) -> str | None:
    """Why ``value`` (parsed from the STAR text ``raw``) is not a usable number, or None."""
    found = repr(raw) if isinstance(raw, str) else str(raw)  # 'abc' quoted, numbers bare
    if not np.isfinite(value):
        return f"expected a finite number, found {found}"
    if positive and value <= 0:
        return f"expected a positive number, found {found}"
    return None


def parse_vector(text: Any) -> list[float]:
    """``"[1,0,1]"`` -> ``[1.0, 0.0, 1.0]`` (RELION's vector-valued labels)."""
    s = str(text).strip()
    if not (s.startswith("[") and s.endswith("]")):
        raise ValueError(f"expected a vector like [1,0,1], found {s!r}")
    inner = s[1:-1].strip()
    return [float(v) for v in inner.split(",")] if inner else []


def format_vector(values: Iterable[float]) -> str:
    """``[1, 0, 1]`` -> ``"[1,0,1]"``; integral values are written without decimals."""
    parts = []
    for v in values:
        fv = float(v)
        parts.append(str(int(fv)) if fv.is_integer() else repr(fv))
    return "[" + ",".join(parts) + "]"
