"""RELION ``optimisation_set.star``: one key-value block ``data_`` naming a job's inputs.

Conventions (relion5-conventions.md §3). Paths in the file are relative to the project
directory (the working directory); files exported by WarpTools name them relative to the
optimisation set itself, so that folder is tried next (:func:`~subtomo.data.paths.resolve_path`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from subtomo.data.paths import resolve_path
from subtomo.errors import InputError
from subtomo.io import read_star, write_star

__all__ = ["OptimisationSet"]

_LABELS = {
    "particles": "rlnTomoParticlesFile",
    "tomograms": "rlnTomoTomogramsFile",
    "trajectories": "rlnTomoTrajectoriesFile",
    "manifolds": "rlnTomoManifoldsFile",
    "reference_map1": "rlnTomoReferenceMap1File",
    "reference_map2": "rlnTomoReferenceMap2File",
    "reference_mask": "rlnTomoReferenceMaskFile",
    "reference_fsc": "rlnTomoReferenceFscFile",
}


@dataclass
class OptimisationSet:
    """The files of an optimisation set (``None`` where absent); ``extra`` keeps other keys."""

    particles: Path | None = None
    tomograms: Path | None = None
    trajectories: Path | None = None
    manifolds: Path | None = None
    reference_map1: Path | None = None
    reference_map2: Path | None = None
    reference_mask: Path | None = None
    reference_fsc: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> OptimisationSet:
        """Read the key-value block; each named file is resolved (cwd, then beside ``path``)."""
        path = Path(path)
        blocks = read_star(path)
        block = blocks.get("")
        if block is None:
            block = next((b for b in blocks.values() if isinstance(b, dict)), None)
        if not isinstance(block, dict) or not set(block) & set(_LABELS.values()):
            raise InputError(
                "not an optimisation set: expected a key-value block data_ with "
                "rlnTomoParticlesFile, rlnTomoTomogramsFile, ...",
                file=path,
            )
        by_label = {label: name for name, label in _LABELS.items()}
        values: dict[str, Any] = {"extra": {}, "path": path}
        for key, value in block.items():
            if key in by_label:
                values[by_label[key]] = resolve_path(str(value), path)
            else:
                values["extra"][key] = value
        return cls(**values)

    def write(self, path: str | os.PathLike) -> None:
        """Write the block ``data_`` with the files that are set, atomically."""
        block: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _LABELS and getattr(self, f.name) is not None:
                block[_LABELS[f.name]] = str(getattr(self, f.name))
        block.update(self.extra)
        write_star(path, {"": block})
