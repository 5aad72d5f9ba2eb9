"""Particle and tomogram set edits behind ``subtomo star`` (like ``relion_star_handler``).

Each tool reads RELION 5 files, returns a new set and never modifies its input.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from subtomo.data import ParticleSet, TomogramSet
from subtomo.errors import InputError
from subtomo.geometry import matrix_to_euler
from subtomo.subsets import recentred_origins

__all__ = [
    "apply_orientations",
    "combine_particles",
    "combine_tomograms",
    "convert_to_centred",
    "recentre",
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
