"""Tilt-series acquisition: tilt angles, dose order, per-tilt defocus and alignment errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TiltScheme", "alignment_errors", "ctf_errors", "tilt_defocus", "tilt_scheme"]


@dataclass(frozen=True)
class TiltScheme:
    """Tilts in ascending angle order (the row order of the per-tilt table).

    ``angles_deg`` nominal stage tilts; ``order`` the 0-based position of each tilt in the
    acquisition; ``pre_exposure`` the dose (e/Å²) received before each tilt
    (rlnMicrographPreExposure).
    """

    angles_deg: np.ndarray
    order: np.ndarray
    pre_exposure: np.ndarray


def tilt_scheme(
    tilt_range_deg: float,
    tilt_step_deg: float,
    dose_per_tilt: float,
    dose_symmetric: bool = True,
    group_size: int = 2,
) -> TiltScheme:
    """Tilts from ``-range`` to ``+range`` in steps, and their acquisition order.

    Dose-symmetric (Hagen et al. 2017): 0°, then groups of ``group_size`` tilts alternately on
    the positive and negative side, moving outwards (0, +1, +2, -1, -2, +3, +4, ... steps);
    when one side is exhausted the other continues. Sequential: from ``-range`` upwards.
    """
    n_side = int(np.floor(tilt_range_deg / tilt_step_deg + 1e-6))
    steps = np.arange(-n_side, n_side + 1)
    angles = np.round(steps * tilt_step_deg, 6)
    if dose_symmetric:
        sequence = [0]
        pos, neg = list(range(1, n_side + 1)), list(range(-1, -n_side - 1, -1))
        side = 0
        while pos or neg:
            current = (pos, neg)[side] or (neg, pos)[side]
            sequence += current[:group_size]
            del current[:group_size]
            side = 1 - side
    else:
        sequence = list(steps)
    order = np.empty(len(steps), dtype=np.int64)
    order[np.asarray(sequence) + n_side] = np.arange(len(steps))
    return TiltScheme(angles_deg=angles, order=order, pre_exposure=order * float(dose_per_tilt))


def tilt_defocus(
    rng: np.random.Generator,
    n_tilts: int,
    defocus_um: float,
    spread_um: float,
    astigmatism_um: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-tilt central defocus ``(U, V, angle)`` in Å, Å, degrees (U >= V, RELION's sign).

    The mean defocus of each tilt is uniform in ``defocus ± spread``; the astigmatism
    ``U - V`` and its angle (uniform in [-90, 90)) are shared by the tilt series.
    """
    mean = (defocus_um + rng.uniform(-spread_um, spread_um, n_tilts)) * 1e4
    half = 0.5 * astigmatism_um * 1e4
    angle = np.full(n_tilts, rng.uniform(-90.0, 90.0))
    return mean + half, mean - half, angle


def alignment_errors(
    rng: np.random.Generator,
    n_tilts: int,
    angle_error_deg: float,
    shift_error_px: float,
    *,
    y_tilt_error_deg: float = 0.0,
    z_rot_error_deg: float = 0.0,
    axis_error_deg: float = 0.0,
    tilt_offset_deg: float = 0.0,
) -> dict[str, np.ndarray]:
    """Per-tilt alignment errors (added to the nominal geometry of each tilt).

    Gaussian, σ = ``angle_error_deg`` on each of the X-tilt, Y-tilt and Z-rotation angles
    (deg) and σ = ``shift_error_px`` on the x and y shifts (px); σ = ``y_tilt_error_deg`` more
    on the tilt angles alone, σ = ``z_rot_error_deg`` more on the in-plane rotations alone;
    ``axis_error_deg`` added to every Z rotation (an error of the nominal tilt-axis angle) and
    ``tilt_offset_deg`` to every tilt angle (a specimen pre-tilt). The extra terms draw from
    ``rng`` only when non-zero, so a seed without them gives the same data as before.
    """
    angles = rng.normal(0.0, 1.0, (3, n_tilts)) * angle_error_deg
    shifts = rng.normal(0.0, 1.0, (2, n_tilts)) * shift_error_px
    if y_tilt_error_deg:
        angles[1] += rng.normal(0.0, y_tilt_error_deg, n_tilts)
    if z_rot_error_deg:
        angles[2] += rng.normal(0.0, z_rot_error_deg, n_tilts)
    return {
        "x_tilt": angles[0],
        "y_tilt": angles[1] + tilt_offset_deg,
        "z_rot": angles[2] + axis_error_deg,
        "x_shift_px": shifts[0],
        "y_shift_px": shifts[1],
    }


def ctf_errors(
    seed: int,
    tomogram: int,
    n_tilts: int,
    n_particles: int,
    tilt_sigma: float,
    particle_sigma: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Defocus errors in Å: ``(n_tilts,)`` per tilt (on U and V, σ ``tilt_sigma``) and
    ``(n_particles,)`` per particle (σ ``particle_sigma``, §20), Gaussian, from their own
    generator (seeded by ``seed`` and the tomogram index), so the rest of a data set does not
    change with them."""
    rng = np.random.default_rng([seed, tomogram, 2_000_003])
    return rng.normal(0.0, tilt_sigma, n_tilts), rng.normal(0.0, particle_sigma, n_particles)
