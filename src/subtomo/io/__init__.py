"""Readers and writers for RELION 5 STAR, MRC, mdoc, IMOD and AreTomo files."""

from subtomo.io.atomic import atomic_path

__all__ = ["atomic_path"]
