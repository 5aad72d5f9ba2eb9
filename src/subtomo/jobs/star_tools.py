"""Particle and tomogram set edits behind ``subtomo star`` (like ``relion_star_handler``).

Each tool reads RELION 5 files, returns a new set and never modifies its input. Each
command's options are a dataclass (:class:`RecentreParams`, ...) and its ``*_files`` function
reads the input files, runs the tool and writes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from subtomo.data import ParticleSet, TomogramSet
from subtomo.errors import InputError
from subtomo.geometry import matrix_to_euler
from subtomo.io import read_star
from subtomo.project.options import argument, option
from subtomo.subsets import recentred_origins

__all__ = [
    "ApplyOrientationsParams",
    "CombineParams",
    "ConvertParams",
    "PrintParams",
    "RecentreParams",
    "apply_orientations",
    "apply_orientations_files",
    "combine_files",
    "combine_particles",
    "combine_tomograms",
    "convert_files",
    "convert_to_centred",
    "print_table",
    "recentre",
    "recentre_files",
]

_ORIGINS = [f"rlnOrigin{a}Angst" for a in "XYZ"]
_CENTRED = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]


def recentre(particles: ParticleSet, point_px: tuple[float, float, float]) -> ParticleSet:
    """Origins that put ``point_px`` (reference-box pixels from its centre) at the box centre.

    As ``relion_star_handler --center``: only rlnAngle* enter, rlnOriginZAngst is updated
    when present. Run extraction afterwards to apply the new offsets.
    """
    out = particles.subset(np.arange(len(particles)))
    new = recentred_origins(
        particles.origins_angst(),
        particles.particle_matrices(),
        torch.tensor(point_px, dtype=torch.float64),
        torch.from_numpy(particles.image_pixel_size()),
    ).numpy()
    for axis, column in enumerate(_ORIGINS):
        if column in out.particles.columns or axis < 2:
            out.particles[column] = new[:, axis]
    return out


def apply_orientations(particles: ParticleSet, tomograms: TomogramSet | None = None) -> ParticleSet:
    """Fold rlnAngle* into rlnTomoSubtomogram* (A_sub <- A_sub A_part) and apply the offsets
    (C <- C - A_sub o, o <- 0), as ``relion_tomo_subtomo --apply_orientations``.

    Angle priors refer to the old frame and are dropped.
    """
    out = particles.subset(np.arange(len(particles)))
    a_sub = particles.subtomogram_matrices()
    centres = (
        particles.centered_coordinates_angst(tomograms)
        - (a_sub @ particles.origins_angst()[..., None])[..., 0]
    )
    angles = matrix_to_euler(a_sub @ particles.particle_matrices()).numpy()
    table = out.particles
    for axis, column in enumerate(_CENTRED):
        table[column] = centres[:, axis].numpy()
    for axis, name in enumerate(("Rot", "Tilt", "Psi")):
        table[f"rlnTomoSubtomogram{name}"] = angles[:, axis]
        table[f"rlnAngle{name}"] = 0.0
    for column in _ORIGINS:
        table[column] = 0.0
    priors = [c for c in table.columns if c.startswith("rlnAngle") and c.endswith("Prior")]
    out.particles = table.drop(
        columns=priors + [f"rlnCoordinate{a}" for a in "XYZ"], errors="ignore"
    )
    return out


def convert_to_centred(particles: ParticleSet, tomograms: TomogramSet) -> ParticleSet:
    """RELION-4/Warp decentred pixel coordinates -> RELION 5 rlnCenteredCoordinate*Angst."""
    out = particles.subset(np.arange(len(particles)))
    centres = particles.centered_coordinates_angst(tomograms).numpy()
    for axis, column in enumerate(_CENTRED):
        out.particles[column] = centres[:, axis]
    out.particles = out.particles.drop(
        columns=[f"rlnCoordinate{a}" for a in "XYZ"], errors="ignore"
    )
    return out


def combine_particles(sets: list[ParticleSet]) -> ParticleSet:
    """Join particle sets; optics groups are renumbered (same name = same group)."""
    if not sets:
        raise InputError("no particle sets to combine")
    names: list[str] = []
    optics_rows = []
    tables = []
    for s in sets:
        table = s.particles.copy()
        if not s.optics.empty:
            mapping = {}
            for _, row in s.optics.iterrows():
                name = str(row.get("rlnOpticsGroupName", f"opticsGroup{row['rlnOpticsGroup']}"))
                if name not in names:
                    names.append(name)
                    optics_rows.append(
                        {**row.to_dict(), "rlnOpticsGroupName": name, "rlnOpticsGroup": len(names)}
                    )
                mapping[int(row["rlnOpticsGroup"])] = names.index(name) + 1
            groups = table.get("rlnOpticsGroup", pd.Series(1, index=table.index))
            table["rlnOpticsGroup"] = [mapping[int(g)] for g in groups]
        tables.append(table)
    particles = pd.concat(tables, ignore_index=True)
    duplicated = particles["rlnTomoParticleName"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise InputError(
            f"particle name {particles['rlnTomoParticleName'][row]!r} occurs in two inputs",
            block="particles",
            column="rlnTomoParticleName",
            row=row + 1,
        )
    stacks = {bool(s.is_2d_stacks) for s in sets}
    if len(stacks) > 1:
        raise InputError("cannot combine 2D-stack and 3D particle sets")
    optics = pd.DataFrame(optics_rows) if optics_rows else None
    return ParticleSet.from_tables(particles, optics, sets[0].general)


def combine_tomograms(sets: list[TomogramSet]) -> TomogramSet:
    """Join tomogram sets (the same rlnTomoName twice is an error, naming the row)."""
    tables = [s.global_table for s in sets]
    tilts = {series.name: series.tilts for s in sets for series in s}
    return TomogramSet.from_tables(pd.concat(tables, ignore_index=True), tilts)


def _input(help: str = "Input particles.star.") -> Any:
    return option(..., "--i", help=help)


def _output(help: str = "Output particles.star.") -> Any:
    return option(..., "--o", help=help)


def _legacy_tomograms() -> Any:
    return option(None, "--tomograms", help="tomograms.star (for legacy pixel coordinates).")


@dataclass
class RecentreParams:
    """Options of ``subtomo star recentre``."""

    input: Path = _input()
    output_file: Path = _output()
    center_x: float = option(0.0, "--center-x", help="X in the reference box.", unit="px")
    center_y: float = option(0.0, "--center-y", help="Y in the reference box.", unit="px")
    center_z: float = option(0.0, "--center-z", help="Z in the reference box.", unit="px")


def recentre_files(params: RecentreParams) -> ParticleSet:
    """:func:`recentre` from and to files; returns the written set."""
    point = (params.center_x, params.center_y, params.center_z)
    out = recentre(ParticleSet.read(params.input), point)
    out.write(params.output_file)
    return out


@dataclass
class ApplyOrientationsParams:
    """Options of ``subtomo star apply-orientations``."""

    input: Path = _input()
    output_file: Path = _output()
    tomograms: Path | None = _legacy_tomograms()


def apply_orientations_files(params: ApplyOrientationsParams) -> ParticleSet:
    """:func:`apply_orientations` from and to files; returns the written set."""
    tomograms = TomogramSet.read(params.tomograms) if params.tomograms else None
    out = apply_orientations(ParticleSet.read(params.input, tomograms), tomograms)
    out.write(params.output_file)
    return out


@dataclass
class ConvertParams:
    """Options of ``subtomo star convert``."""

    input: Path = _input("RELION-4/Warp particles.star (pixel coordinates).")
    tomograms: Path = option(..., "--tomograms", help="tomograms.star.")
    output_file: Path = _output("Output RELION 5 particles.star.")


def convert_files(params: ConvertParams) -> ParticleSet:
    """:func:`convert_to_centred` from and to files; returns the written set."""
    tomograms = TomogramSet.read(params.tomograms)
    out = convert_to_centred(ParticleSet.read(params.input, tomograms), tomograms)
    out.write(params.output_file)
    return out


@dataclass
class CombineParams:
    """Options of ``subtomo star combine``."""

    inputs: tuple[Path, ...] = argument(help="particles.star or tomograms.star files.")
    output_file: Path = _output("Output file.")
    tomograms: bool = option(False, "--tomograms", help="The inputs are tomograms.star.")


def combine_files(params: CombineParams) -> ParticleSet | TomogramSet:
    """:func:`combine_particles` (or :func:`combine_tomograms`) from and to files; returns
    the written set."""
    if params.tomograms:
        out: ParticleSet | TomogramSet = combine_tomograms(
            [TomogramSet.read(p) for p in params.inputs]
        )
    else:
        out = combine_particles([ParticleSet.read(p) for p in params.inputs])
    out.write(params.output_file)
    return out


@dataclass
class PrintParams:
    """Options of ``subtomo star print``."""

    file: Path = argument(help="STAR file.")
    block: str = argument(help="Block name without data_, e.g. particles.")
    columns: tuple[str, ...] = argument((), help="Columns (default: all).")


def print_table(params: PrintParams) -> pd.DataFrame | dict[str, Any]:
    """The block (a key-value block as a dict) or its ``columns``, checked to exist."""
    blocks = read_star(params.file)
    if params.block not in blocks:
        raise InputError(
            f"no block data_{params.block} (has: {', '.join(blocks)})", file=params.file
        )
    data = blocks[params.block]
    if isinstance(data, dict):
        return data
    for column in params.columns:
        if column not in data.columns:
            raise InputError("no such column", file=params.file, block=params.block, column=column)
    return data[list(params.columns)] if params.columns else data
