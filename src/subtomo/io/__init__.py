"""Readers and writers for RELION 5 STAR and MRC files (and mdoc)."""

from subtomo.io.atomic import atomic_path
from subtomo.io.mrc import MrcHeader, read_mrc, read_mrc_header, write_mrc
from subtomo.io.star import (
    format_vector,
    numeric_column,
    parse_vector,
    read_star,
    require_block,
    require_columns,
    write_star,
)

__all__ = [
    "MrcHeader",
    "atomic_path",
    "format_vector",
    "numeric_column",
    "parse_vector",
    "read_mrc",
    "read_mrc_header",
    "read_star",
    "require_block",
    "require_columns",
    "write_mrc",
    "write_star",
]
