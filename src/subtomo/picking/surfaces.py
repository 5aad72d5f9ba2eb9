"""Surface picking: spheres and ellipsoids fitted to a few points per vesicle, closed surfaces
of a segmentation mask, and particles sampled on them at a chosen spacing with their normals.

Points are xyz vectors in any one length unit (the jobs use bin-1 tomogram pixels); masks are
zyx arrays whose voxel (k, j, i) is the point (i, j, k). Normals point outwards. A surface
pick's orientation puts the normal on the particle's z axis
(:func:`subtomo.geometry.surface_orientations`, conventions §16.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from subtomo.errors import InputError

__all__ = [
    "Ellipsoid",
    "fit_ellipsoid",
    "fit_sphere",
    "mask_surfaces",
    "sample_ellipsoid",
    "sample_point_surface",
    "thin_points",
]

# Points whose spread across one direction is below this fraction of the largest spread lie
# on a plane (or a line) for the fits.
_FLAT = 1e-3


@dataclass(frozen=True)
class Ellipsoid:
    """``centre`` (3,), semi-axes ``axes`` (3,) and ``rotation`` (3, 3) whose columns are the
    directions of those axes; a sphere has three equal axes. ``rms`` is the root-mean-square
    distance of the fitted points from the surface (0 for a surface given directly)."""

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray
    rms: float = 0.0

    @classmethod
    def sphere(cls, centre: np.ndarray, radius: float) -> Ellipsoid:
        """The sphere of ``radius`` about ``centre``."""
        return cls(np.asarray(centre, dtype=np.float64), np.full(3, float(radius)), np.eye(3))

    def normals(self, points: np.ndarray) -> np.ndarray:
        """Outward unit normals ``(n, 3)`` at surface ``points`` ``(n, 3)``: the gradient of
        ``|diag(1/axes) R^T (p - c)|^2``."""
        local = (points - self.centre) @ self.rotation / self.axes**2
        n = local @ self.rotation.T
        return n / np.linalg.norm(n, axis=1, keepdims=True)

    def area(self) -> float:
        """Surface area (Knud Thomsen's formula, within 1.1 %; exact for spheres)."""
        p = 1.6075
        a, b, c = self.axes**p
        return 4 * math.pi * ((a * b + a * c + b * c) / 3) ** (1 / p)


def _spread(points: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid, singular values and right singular vectors of ``points``; ``InputError`` if
    there are fewer than three or they lie on a line."""
    if points.ndim != 2 or points.shape[1] != 3 or not np.all(np.isfinite(points)):
        raise InputError(f"{what}: expected finite xyz points")
    if len(points) < 3:
        raise InputError(f"{what}: {len(points)} point(s) do not determine a sphere (need >= 3)")
    mean = points.mean(axis=0)
    _, s, vt = np.linalg.svd(points - mean, full_matrices=False)
    if s[1] <= _FLAT * s[0]:
        raise InputError(f"{what}: the {len(points)} points lie on a line, not on a sphere")
    return mean, s, vt


def fit_sphere(points: np.ndarray, what: str = "points") -> Ellipsoid:
    """Least-squares sphere through ``points`` ``(n, 3)`` (algebraic fit
    ``|p|^2 = 2 c.p + r^2 - |c|^2``).

    Four or more points off one plane determine the sphere. Points on one plane (three points,
    or points clicked on one tomogram slice) determine only a circle: the sphere is then the
    one whose great circle that is (centre in the plane, radius of the circle), the stated
    choice of conventions §16.1. Fewer than three points, or points on a line, are an
    ``InputError`` naming ``what``.
    """
    points = np.asarray(points, dtype=np.float64)
    mean, s, vt = _spread(points, what)
    planar = s[2] <= _FLAT * s[0] if len(s) > 2 else True
    local = points - mean
    if planar:
        uv = local @ vt[:2].T  # in-plane coordinates
        design = np.column_stack([2 * uv, np.ones(len(uv))])
        sol = np.linalg.lstsq(design, (uv**2).sum(axis=1), rcond=None)[0]
        centre = mean + sol[:2] @ vt[:2]
        radius2 = sol[2] + sol[:2] @ sol[:2]
    else:
        design = np.column_stack([2 * local, np.ones(len(local))])
        sol = np.linalg.lstsq(design, (local**2).sum(axis=1), rcond=None)[0]
        centre = mean + sol[:3]
        radius2 = sol[3] + sol[:3] @ sol[:3]
    radius = math.sqrt(max(radius2, 0.0))
    rms = float(np.sqrt(np.mean((np.linalg.norm(points - centre, axis=1) - radius) ** 2)))
    return Ellipsoid(centre, np.full(3, radius), np.eye(3), rms)


def fit_ellipsoid(points: np.ndarray, what: str = "points") -> Ellipsoid:
    """Least-squares ellipsoid (any orientation) through ``points`` ``(n, 3)``, ``n >= 9``.

    Fits the quadric ``p^T M p + 2 v.p = 1`` (algebraic distance, points centred and scaled
    first) and reads off centre ``-M^-1 v``, axes and directions from the eigen-decomposition
    of ``M``. ``InputError`` naming ``what`` if there are fewer than 9 points, they lie on a
    plane, or the quadric through them is not an ellipsoid (a hyperboloid or cylinder: points
    on too small a patch of the surface).
    """
    points = np.asarray(points, dtype=np.float64)
    mean, s, _ = _spread(points, what)
    if len(points) < 9:
        raise InputError(f"{what}: {len(points)} points do not determine an ellipsoid (need 9)")
    if s[2] <= _FLAT * s[0]:
        raise InputError(f"{what}: the {len(points)} points lie on a plane, not an ellipsoid")
    scale = np.sqrt((s**2).sum() / len(points))
    x, y, z = ((points - mean) / scale).T
    design = np.column_stack(
        [x * x, y * y, z * z, 2 * y * z, 2 * x * z, 2 * x * y, 2 * x, 2 * y, 2 * z]
    )
    a, b, c, f, g, h, p, q, r = np.linalg.lstsq(design, np.ones(len(x)), rcond=None)[0]
    m = np.array([[a, h, g], [h, b, f], [g, f, c]])
    v = np.array([p, q, r])
    eigval, eigvec = np.linalg.eigh(m)
    if np.any(eigval <= 0):
        raise InputError(
            f"{what}: the quadric through the {len(points)} points is not an ellipsoid "
            "(give points spread over the whole vesicle)"
        )
    centre = -np.linalg.solve(m, v)
    k = 1 + centre @ m @ centre
    if k <= 0:
        raise InputError(f"{what}: the quadric through the points is empty")
    axes = np.sqrt(k / eigval) * scale
    ellipsoid = Ellipsoid(mean + centre * scale, axes, eigvec)
    local = (points - ellipsoid.centre) @ eigvec / axes
    # distance along the radial line, a first-order estimate of the distance to the surface
    radial = np.linalg.norm(local, axis=1)
    rms = float(
        np.sqrt(np.mean(((radial - 1) * np.linalg.norm(local * axes, axis=1) / radial) ** 2))
    )
    return Ellipsoid(ellipsoid.centre, axes, eigvec, rms)


def _fibonacci_directions(n: int) -> np.ndarray:
    """``n`` unit vectors ``(n, 3)`` on the Fibonacci (golden-angle) lattice, near-uniform."""
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    phi = math.pi * (3 - math.sqrt(5)) * k
    rho = np.sqrt(1 - z * z)
    return np.column_stack([rho * np.cos(phi), rho * np.sin(phi), z])


def thin_points(points: np.ndarray, spacing: float) -> np.ndarray:
    """Indices of a subset of ``points`` ``(n, 3)`` at least ``spacing`` apart, taken greedily
    in order, so that every point lies within ``spacing`` of one kept."""
    tree = cKDTree(points)
    free = np.ones(len(points), dtype=bool)
    kept = []
    for i in range(len(points)):
        if free[i]:
            kept.append(i)
            free[tree.query_ball_point(points[i], spacing)] = False
    return np.asarray(kept, dtype=np.int64)


def sample_ellipsoid(ellipsoid: Ellipsoid, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(m, 3)`` on the surface about ``spacing`` apart and their outward normals.

    A sphere gets the Fibonacci lattice with one point per hexagonal cell of side ``spacing``
    (``m = area / (sqrt(3)/2 spacing^2)``); other ellipsoids get a Fibonacci lattice 3x as
    fine mapped onto the surface and thinned to points ``spacing`` apart (:func:`thin_points`),
    because the map stretches the lattice unevenly.
    """
    if not spacing > 0:
        raise InputError(f"spacing must be positive, got {spacing:g}")
    cell = math.sqrt(3) / 2 * spacing**2
    is_sphere = np.ptp(ellipsoid.axes) <= 1e-6 * ellipsoid.axes.max()
    fine = 1 if is_sphere else 9
    n = max(1, round(fine * ellipsoid.area() / cell))
    local = _fibonacci_directions(n) * ellipsoid.axes
    points = ellipsoid.centre + local @ ellipsoid.rotation.T
    if not is_sphere:
        points = points[thin_points(points, spacing)]
    return points, ellipsoid.normals(points)


def sample_point_surface(
    points: np.ndarray, spacing: float, what: str = "points"
) -> tuple[np.ndarray, np.ndarray]:
    """Picks about ``spacing`` apart on a closed surface given densely by ``points`` ``(n, 3)``
    (a membrane traced on every slice, a segmentation exported as points), with normals.

    The points are thinned to ``spacing`` (:func:`thin_points`); the normal at each pick is
    the direction of least spread of the points within ``spacing`` of it (local PCA), turned
    away from the centroid of all points, so the surface must be seen whole from its
    centroid (star-shaped: vesicles, not a cup). The points must be denser than ``spacing``.
    ``InputError`` naming ``what`` when a pick has fewer than 6 points around it.
    """
    points = np.asarray(points, dtype=np.float64)
    _spread(points, what)
    tree = cKDTree(points)
    picks = points[thin_points(points, spacing)]
    normals = np.empty_like(picks)
    for i, near in enumerate(tree.query_ball_point(picks, spacing)):
        if len(near) < 6:
            raise InputError(
                f"{what}: {len(near)} points within {spacing:g} of {np.round(picks[i], 1)}: "
                "too sparse to trace a surface (trace more points or use --shape ellipsoid)"
            )
        local = points[near] - points[near].mean(axis=0)
        normals[i] = np.linalg.eigh(local.T @ local)[1][:, 0]
    outward = np.sign(np.sum(normals * (picks - points.mean(axis=0)), axis=1))
    return picks, normals * np.where(outward == 0, 1.0, outward)[:, None]


def mask_surfaces(
    mask: np.ndarray, spacing: float, sigma: float = 1.5, min_voxels: int = 27
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Points about ``spacing`` voxels apart on the boundary of each connected object of a
    segmentation ``mask`` (zyx, nonzero = inside), with outward normals.

    Boundary voxels are those inside with a face neighbour outside; the normal is minus the
    gradient of the object's own mask smoothed by a Gaussian of ``sigma`` voxels. Objects of
    fewer than ``min_voxels`` voxels are dropped. Returns one ``(points (m, 3) xyz voxels,
    normals (m, 3))`` per object, in label order.
    """
    labels, n_objects = ndimage.label(np.asarray(mask) != 0)
    if n_objects == 0:
        raise InputError("the segmentation mask is empty")
    pad = int(4 * sigma) + 2
    out = []
    for label, box in enumerate(ndimage.find_objects(labels), 1):
        # each object in its own padded box: memory stays that of one object, and a
        # neighbouring object does not tilt its normals
        box = tuple(
            slice(max(b.start - pad, 0), min(b.stop + pad, n))
            for b, n in zip(box, labels.shape, strict=True)
        )
        obj = labels[box] == label
        if obj.sum() < min_voxels:
            continue
        smooth = ndimage.gaussian_filter(obj.astype(np.float32), sigma)
        zyx = np.argwhere(obj & ~ndimage.binary_erosion(obj))
        gradient = np.stack([g[tuple(zyx.T)] for g in np.gradient(smooth)], axis=-1)
        normals = -gradient[:, ::-1].astype(np.float64)  # zyx -> xyz
        norm = np.linalg.norm(normals, axis=1)
        ok = norm > 0
        points = (zyx[ok] + [b.start for b in box])[:, ::-1].astype(np.float64)
        normals = normals[ok] / norm[ok, None]
        keep = thin_points(points, spacing)
        out.append((points[keep], normals[keep]))
    return out
