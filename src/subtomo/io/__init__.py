"""Readers and writers for RELION 5 STAR and MRC files (and mdoc).

Names load on first use (:mod:`subtomo._lazy`): reading a STAR file does not import torch.
"""

from typing import TYPE_CHECKING

from subtomo._lazy import lazy_exports

if TYPE_CHECKING:
    from subtomo.io.atomic import atomic_path
    from subtomo.io.files import require_file
    from subtomo.io.mdoc import MdocTiltSeries, read_mdoc, write_mdoc
    from subtomo.io.mrc import (
        MrcHeader,
        map_pixel_size,
        read_mrc,
        read_mrc_header,
        require_finite,
        require_varying,
        write_mrc,
    )
    from subtomo.io.star import (
        NAME_COLUMNS,
        as_written,
        format_vector,
        number_problem,
        numeric_column,
        parse_vector,
        read_star,
        require_block,
        require_columns,
        write_star,
    )

__all__ = [
    "NAME_COLUMNS",
    "MdocTiltSeries",
    "MrcHeader",
    "as_written",
    "atomic_path",
    "format_vector",
    "map_pixel_size",
    "number_problem",
    "numeric_column",
    "parse_vector",
    "read_mdoc",
    "read_mrc",
    "read_mrc_header",
    "read_star",
    "require_block",
    "require_columns",
    "require_file",
    "require_finite",
    "require_varying",
    "write_mdoc",
    "write_mrc",
    "write_star",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
