"""Cross-file checks of a particle set against its tomograms, before any job starts.

Each problem raises one :class:`~subtomo.errors.InputError` naming the file, block, column
and row and what was expected, instead of failing later deep inside numpy.
"""

from __future__ import annotations

import numpy as np

from subtomo.data.particles import ParticleSet, stack_image_indices
from subtomo.data.tomograms import TiltSeries, TomogramSet
from subtomo.errors import InputError
from subtomo.io import read_mrc_header

__all__ = ["require_box_fits", "require_particles", "validate_particles"]

_PIXEL_SIZE_TOLERANCE = 1e-3  # Å, as RELION
# TiltSeries values the jobs read: global (sizes, optics, hand) and per tilt (CTF, dose)
_SERIES_VALUES = (
    "pixel_size",
    "tomogram_size",
    "hand",
    "voltage_kv",
    "cs_mm",
    "amplitude_contrast",
    "defocus_slope",
    "bfactor_per_electron_dose",
    "pre_exposure",
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "phase_shift",
    "ctf_bfactor",
    "ctf_scale",
)


def validate_particles(
    particles: ParticleSet, tomograms: TomogramSet, check_files: bool = True
) -> None:
    """Check that ``particles`` can be used with ``tomograms``.

    Checks, in order: every rlnTomoName is in the tomograms, its global row and per-tilt
    table can be read and hold usable numbers (positive pixel and tomogram sizes and
    voltage, finite angles, shifts, defoci and doses); particle positions, offsets and angles
    are finite; optics rlnTomoTiltSeriesPixelSize is positive and agrees with the
    tomogram's within 1e-3 Å; rlnTomoVisibleFrames (required for 2D stacks) has one 0/1
    entry per tilt. With
    ``check_files``, every image file (rlnImageName, and rlnCtfImage for 3D) is a complete
    MRC file, and each 2D stack holds sum(rlnTomoVisibleFrames) images (RELION's
    extraction) or one image per tilt (WarpTools, blank where invisible).
    """
    particles.require_tomograms(tomograms)
    names = particles.tomo_names
    used = list(dict.fromkeys(names))
    n_tilts = {name: tomograms[name].n_tilts for name in used}
    for name in used:
        _check_tilt_series(tomograms[name])
    _check_geometry(particles)
    _check_pixel_sizes(particles, tomograms, used)
    if particles.is_2d_stacks and "rlnTomoVisibleFrames" not in particles.particles.columns:
        raise InputError(
            "missing required column (2D-stack particles, rlnTomoSubTomosAre2DStacks = 1)",
            file=particles.source,
            block="particles",
            column="rlnTomoVisibleFrames",
        )
    visible = particles.visible_frames(n_tilts)
    if check_files and "rlnImageName" in particles.particles.columns:
        _check_image_files(particles, visible)


def require_particles(particles: ParticleSet) -> None:
    """``InputError`` when the set is empty (a data_particles table without rows)."""
    if len(particles) == 0:
        raise InputError(
            "no particles (the table has no rows)", file=particles.source, block="particles"
        )


def require_box_fits(
    particles: ParticleSet, tomograms: TomogramSet, extent_px: float, option: str
) -> None:
    """``InputError`` when a box of ``extent_px`` bin-1 pixels (``option`` says which
    options set it) is wider or taller than the tilt images of a tomogram the particles
    use: no particle of it could be visible in any tilt. Tomograms whose tables name no
    image files are skipped."""
    for name in dict.fromkeys(particles.tomo_names):
        series = tomograms[name]
        size = series.image_size  # (w, h)
        if size is not None and extent_px > min(size):
            raise InputError(
                f"{option} spans {extent_px:g} px (bin 1), more than the {size[0]} x {size[1]} "
                f"px tilt images of {name}: no particle would be visible",
                file=series.tilt_file,
                block=name,
            )


def _check_tilt_series(series: TiltSeries) -> None:
    """Read every value of ``series`` the jobs use; each reader names the bad cell."""
    for name in _SERIES_VALUES:
        getattr(series, name)
    series.projection_matrices((2, 2))  # any image size: only the table is checked


def _check_geometry(particles: ParticleSet) -> None:
    """Read positions, offsets and both Euler triplets; each reader names the bad cell."""
    particles.centered_coordinates_angst()
    particles.origins_angst()
    particles.subtomogram_matrices()
    particles.particle_matrices()


def _check_pixel_sizes(particles: ParticleSet, tomograms: TomogramSet, used: list[str]) -> None:
    optics_px = particles.tilt_series_pixel_size()
    rows = particles.optics_rows()
    names = particles.tomo_names
    for name in used:
        tomo_px = tomograms[name].pixel_size
        bad = (names == name) & (np.abs(optics_px - tomo_px) > _PIXEL_SIZE_TOLERANCE)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise InputError(
                f"{optics_px[first]:g} Å differs by more than {_PIXEL_SIZE_TOLERANCE:g} Å from "
                f"{tomo_px:g} Å of tomogram {str(name)!r} in {tomograms.source} "
                f"(used by particle row {first + 1})",
                file=particles.source,
                block="optics",
                column="rlnTomoTiltSeriesPixelSize",
                row=int(rows[first]) + 1,
            )


def _check_image_files(particles: ParticleSet, visible: list[np.ndarray]) -> None:
    columns = ["rlnImageName"]
    if not particles.is_2d_stacks and "rlnCtfImage" in particles.particles.columns:
        columns.append("rlnCtfImage")
    for column in columns:
        for row, path in enumerate(particles.image_paths(column)):
            try:
                header = read_mrc_header(path)
            except InputError as exc:
                raise InputError(
                    f"{path}: {exc.reason}",
                    file=particles.source,
                    block="particles",
                    column=column,
                    row=row + 1,
                ) from None
            if column == "rlnImageName" and particles.is_2d_stacks:
                n_images = header.shape[0]
                if stack_image_indices(visible[row], n_images) is None:
                    raise InputError(
                        f"{path} holds {n_images} images; expected sum(rlnTomoVisibleFrames)"
                        f" = {int(visible[row].sum())}, or one per tilt ({len(visible[row])})",
                        file=particles.source,
                        block="particles",
                        column=column,
                        row=row + 1,
                    )
