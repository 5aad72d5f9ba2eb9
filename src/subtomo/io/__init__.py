"""Readers and writers for RELION 5 STAR, MRC, mdoc, IMOD and AreTomo files."""

from subtomo.io.atomic import atomic_path
from subtomo.io.mrc import MrcHeader, read_mrc, read_mrc_header, write_mrc

__all__ = ["MrcHeader", "atomic_path", "read_mrc", "read_mrc_header", "write_mrc"]
