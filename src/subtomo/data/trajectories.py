"""RELION trajectory files (``motion.star``): per-particle, per-tilt displacements.

Conventions (relion5-conventions.md §3): ``data_general`` holds rlnParticleNumber; then one
loop per particle, named ``data_<rlnTomoParticleName>``, with one row per tilt-table row (same
order) and columns rlnOriginX/Y/ZAngst: the displacement ``t_f`` in Å, tomogram axes, added
to the static position.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.errors import InputError
from subtomo.io import numeric_column, read_star, require_columns, write_star

__all__ = ["Trajectories"]

_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")


class Trajectories:
    """Displacement tables by particle name (``tables[name]`` is a (t, 3) DataFrame)."""

    def __init__(
        self,
        tables: Mapping[str, pd.DataFrame],
        particle_number: int | None = None,
        *,
        path: Path | None = None,
    ) -> None:
        self.tables = {str(k): v.reset_index(drop=True) for k, v in tables.items()}
        self.particle_number = len(self.tables) if particle_number is None else particle_number
        self.path = path
        self.source: str | Path = path if path is not None else "trajectories (in memory)"
        for name, table in self.tables.items():
            require_columns(table, _COLUMNS, self.source, name)

    @classmethod
    def from_displacements(
        cls, particle_names: Sequence[str], displacements_angst: torch.Tensor | np.ndarray
    ) -> Trajectories:
        """From an ``(n, t, 3)`` array of xyz displacements in Å (tomogram axes)."""
        values = np.asarray(torch.as_tensor(displacements_angst).detach().cpu(), np.float64)
        tables = {
            str(name): pd.DataFrame(values[i], columns=list(_COLUMNS))
            for i, name in enumerate(particle_names)
        }
        return cls(tables)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Trajectories:
        path = Path(path)
        blocks = read_star(path)
        general = blocks.pop("general", None)
        if isinstance(general, pd.DataFrame):
            general = general.iloc[0].to_dict() if len(general) else {}
        number = None
        if general and "rlnParticleNumber" in general:
            frame = pd.DataFrame([general])
            number = int(numeric_column(frame, "rlnParticleNumber", path, "general")[0])
        tables = {}
        for name, block in blocks.items():
            tables[name] = pd.DataFrame([block]) if isinstance(block, dict) else block
        return cls(tables, number, path=path)

    def write(self, path: str | os.PathLike) -> None:
        """``data_general`` (rlnParticleNumber) then one loop per particle, atomically."""
        number = max(int(self.particle_number), len(self.tables))
        write_star(path, {"general": {"rlnParticleNumber": number}, **self.tables})

    def displacements_angst(self, particle_names: Sequence[str], n_tilts: int) -> torch.Tensor:
        """(n, t, 3) float64 displacements in Å; zeros for names without a table.

        ``InputError`` if a particle's table does not have exactly ``n_tilts`` rows.
        """
        out = np.zeros((len(particle_names), n_tilts, 3))
        for i, name in enumerate(particle_names):
            table = self.tables.get(str(name))
            if table is None:
                continue
            if len(table) != n_tilts:
                raise InputError(
                    f"{len(table)} rows, expected {n_tilts} (one per tilt)",
                    file=self.source,
                    block=str(name),
                )
            out[i] = np.stack(
                [numeric_column(table, c, self.source, str(name)) for c in _COLUMNS], axis=-1
            )
        return torch.from_numpy(out)
