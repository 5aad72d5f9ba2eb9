"""Where particles are and how they are turned: random placement, vesicles, pose errors.

Positions are decentred bin-1 tomogram pixels (xyz, float64). Rotations are RELION matrices
(reference -> tomogram, :mod:`subtomo.geometry`), built in numpy from a
``numpy.random.Generator`` so that layouts do not depend on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.errors import InputError
from subtomo.geometry import matrix_to_euler, surface_orientations

__all__ = [
    "Layout",
    "euler_deg",
    "random_layout",
    "random_rotations",
    "rotations_by_angle",
    "surface_orientations",
    "vesicle_layout",
]

#: ``fits(points (m, 3)) -> bool (m,)``: whether a candidate centre stays inside every tilt image.
FitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Layout:
    """Particle centres ``(n, 3)`` (decentred px) and, for surface picks, the normals ``(n, 3)``
    and the vesicles placed, ``(centre (3,), semi-axes (3,))`` in px, axis-aligned.
    """

    positions_px: np.ndarray
    normals: np.ndarray | None = None
    vesicles: tuple[tuple[np.ndarray, np.ndarray], ...] = ()


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` rotation matrices ``(n, 3, 3)`` uniform on SO(3) (normalised Gaussian quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def rotations_by_angle(rng: np.random.Generator, n: int, angle_deg: float) -> np.ndarray:
    """``n`` rotations ``(n, 3, 3)`` by exactly ``angle_deg`` about uniformly random axes."""
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    k = np.zeros((n, 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(0, 2, 1)
    t = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k  # Rodrigues


def _select_non_overlapping(
    candidates: np.ndarray, accepted: list[np.ndarray], radii: np.ndarray, n: int
) -> list[int]:
    """Greedily append candidates that overlap no accepted one (in place, up to ``n`` in all):
    the ``k``-th accepted particle has radius ``radii[k]`` and keeps at least the sum of the
    radii from every other; returns the indices of the candidates taken.
    """
    taken = []
    for i, c in enumerate(candidates):
        k = len(accepted)
        if k >= n:
            break
        if k and np.min(np.linalg.norm(np.asarray(accepted) - c, axis=1) - radii[:k]) < radii[k]:
            continue
        accepted.append(c)
        taken.append(i)
    return taken


def random_layout(
    rng: np.random.Generator,
    n: int,
    tomogram_size: tuple[int, int, int],
    radius_px: float | np.ndarray,
    fits: FitsFn,
    max_rounds: int = 50,
) -> Layout:
    """``n`` non-overlapping centres, uniform in the tomogram shrunk by the largest radius,
    each projecting inside every tilt image (``fits``). ``radius_px``: one radius for all, or
    one per particle ``(n,)`` (several species: particle ``i`` of the layout has
    ``radius_px[i]``, and two particles keep the sum of their radii apart; the largest are
    placed first).
    """
    radii = np.broadcast_to(np.asarray(radius_px, dtype=np.float64), (n,))
    order = np.argsort(-radii, kind="stable")  # the largest first: they need the most room
    size = np.asarray(tomogram_size, dtype=np.float64)
    lo, hi = np.full(3, radii.max()), size - radii.max()
    if np.any(hi <= lo):
        raise InputError(f"tomogram {tuple(tomogram_size)} px is too small for the particles")
    accepted: list[np.ndarray] = []
    for _ in range(max_rounds):
        candidates = rng.uniform(lo, hi, size=(4 * n + 16, 3))
        _select_non_overlapping(candidates[fits(candidates)], accepted, radii[order], n)
        if len(accepted) == n:
            positions = np.empty((n, 3))
            positions[order] = np.asarray(accepted)
            return Layout(positions_px=positions)
    raise InputError(
        f"could only place {len(accepted)} of {n} non-overlapping particles in a tomogram of "
        f"{tuple(tomogram_size)} px: use fewer particles, more tomograms or a larger tomogram"
    )


def vesicle_layout(
    rng: np.random.Generator,
    n: int,
    tomogram_size: tuple[int, int, int],
    radius_px: float,
    fits: FitsFn,
    max_vesicles: int = 400,
) -> Layout:
    """``n`` non-overlapping centres on the surfaces of random ellipsoidal vesicles.

    Vesicle semi-axes are uniform in [2.5, 4] particle radii, the z semi-axis at most what
    fits in the tomogram thickness (thin tomograms give flattened vesicles, as in thin ice);
    vesicles do not intersect and may extend past the tomogram's x/y edges. Candidate points
    are spread over each surface and kept when inside the tomogram (by a radius) and
    ``fits``; the normal of ``(x/a)² + (y/b)² + (z/c)² = 1`` is ``(x/a², y/b², z/c²)``
    (normalised).
    """
    size = np.asarray(tomogram_size, dtype=np.float64)
    accepted: list[np.ndarray] = []
    normals: list[np.ndarray] = []
    vesicles: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(max_vesicles):
        if len(accepted) == n:
            break
        axes = rng.uniform(2.5, 4.0, 3) * radius_px
        axes[2] = min(axes[2], size[2] / 2 - radius_px - 1)  # centres stay inside in z
        if axes[2] < 0.5 * radius_px:
            raise InputError(f"tomogram {tuple(tomogram_size)} px is too thin for vesicles")
        low = np.array([0.0, 0.0, axes[2] + radius_px])
        centre = rng.uniform(low, size - low)
        if any(np.linalg.norm(centre - c) < axes.max() + a.max() for c, a in vesicles):
            continue
        vesicles.append((centre, axes))
        n_points = int(16 * axes.mean() ** 2 / radius_px**2) + 1  # 4x the area / footprint
        direction = rng.normal(size=(n_points, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        points = centre + direction * axes
        normal = direction / axes
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        inside = np.all((points >= radius_px) & (points <= size - radius_px), axis=1)
        ok = inside & fits(points)
        taken = _select_non_overlapping(points[ok], accepted, np.full(n, radius_px), n)
        normals += list(normal[ok][taken])
    if len(accepted) < n:
        raise InputError(
            f"could only place {len(accepted)} of {n} particles on vesicles in a tomogram of "
            f"{tuple(tomogram_size)} px: use fewer particles, more tomograms or a larger tomogram"
        )
    return Layout(
        positions_px=np.asarray(accepted), normals=np.asarray(normals), vesicles=tuple(vesicles)
    )


def euler_deg(matrices: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees ``(n, 3)`` of matrices ``(n, 3, 3)``."""
    return matrix_to_euler(torch.as_tensor(matrices, dtype=torch.float64)).numpy()
