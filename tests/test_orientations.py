"""HEALPix orientation grids, symmetry reduction and local neighbourhoods."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from subtomo.geometry import (
    euler_to_matrix,
    healpix_directions,
    healpix_order_step_deg,
    local_orientations,
    orientation_grid,
    rotation_angle_deg,
    symmetry_matrices,
)


def _unit(rot: torch.Tensor, tilt: torch.Tensor) -> torch.Tensor:
    """Viewing directions from (rot, tilt) in degrees, written out here independently."""
    r, t = np.radians(rot.numpy()), np.radians(tilt.numpy())
    return torch.tensor(np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], -1))


def _max_gap_deg(points: torch.Tensor, n_probe: int = 4000) -> float:
    """Largest angle from a random direction to its nearest point (covering radius)."""
    x = torch.tensor(np.random.default_rng(5).normal(size=(n_probe, 3)))
    x = x / x.norm(dim=1, keepdim=True)
    return float(torch.rad2deg(torch.arccos((x @ points.T).amax(dim=1).clamp(-1, 1))).max())


def test_step_sizes() -> None:
    """RELION's steps: order 2 -> 15°, 3 -> 7.5°, 4 -> 3.75° (conventions §7.2)."""
    assert [healpix_order_step_deg(o) for o in (0, 2, 3, 4)] == [60.0, 15.0, 7.5, 3.75]


@pytest.mark.parametrize("order", range(8))
def test_direction_counts(order: int) -> None:
    """12·4^order directions for RELION's orders 0..7, tilt in [0, 180], rot in [0, 360)."""
    rot, tilt = healpix_directions(order)
    assert rot.shape == tilt.shape == (12 * 4**order,)
    assert tilt.min() > 0 and tilt.max() < 180 and rot.min() >= 0 and rot.max() < 360


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_directions_are_uniform(order: int) -> None:
    """Median nearest-neighbour angle is close to the step, and the sphere has no hole.

    A failure means the (theta, phi) -> (tilt, rot) mapping or the nside is wrong.
    """
    step = healpix_order_step_deg(order)
    v = _unit(*healpix_directions(order))
    cos = (v @ v.T).fill_diagonal_(-2.0)
    nearest = torch.rad2deg(torch.arccos(cos.amax(dim=1).clamp(-1, 1)))
    assert 0.9 * step < float(nearest.median()) <= step
    assert _max_gap_deg(v) < 0.8 * step
    # each direction is the RELION viewing direction, row 3 of A(rot, tilt, 0)
    rot, tilt = healpix_directions(order)
    assert torch.allclose(euler_to_matrix(rot, tilt, torch.zeros_like(rot))[:, 2], v)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_orientation_grid_full(order: int) -> None:
    """Directions x psi (step 360/(6·2^order)) with RELION matrices of the returned angles.

    Matrices are checked against scipy's ZYZ convention (conventions §4), and the grid covers
    SO(3): a random rotation is within about one step of a grid rotation.
    """
    angles, mats = orientation_grid(order)
    n_psi = 6 * 2**order
    assert angles.shape == (12 * 4**order * n_psi, 3) and mats.shape == (len(angles), 3, 3)
    step = healpix_order_step_deg(order)
    assert torch.allclose(angles[:n_psi, 2], torch.arange(n_psi, dtype=torch.float64) * step)
    want = Rotation.from_euler("ZYZ", angles.numpy(), degrees=True).as_matrix().transpose(0, 2, 1)
    assert np.allclose(mats.numpy(), want, atol=1e-12)
    probe = torch.tensor(Rotation.random(200, random_state=2).as_matrix())
    nearest = rotation_angle_deg(probe[:, None], mats[None]).amin(dim=1)
    assert float(nearest.max()) < 1.3 * step


@pytest.mark.parametrize("symmetry", ["C1", "C4", "D3", "T", "O", "I", "I3"])
def test_symmetry_reduced_grid_covers_sphere(symmetry: str) -> None:
    """The reduced grid keeps ~1/|G| of the directions, and the group applied to it covers
    the sphere almost as densely as the full grid; a failure means the reduction dropped
    whole regions (no asymmetric unit) or kept equivalent copies."""
    order = 3
    step = healpix_order_step_deg(order)
    group = symmetry_matrices(symmetry)
    angles, mats = orientation_grid(order, symmetry)
    n_psi = 6 * 2**order
    n_dir = len(angles) // n_psi
    assert len(angles) == n_dir * n_psi
    assert abs(n_dir - 768 / len(group)) <= 0.05 * 768 / len(group) + 2
    kept = _unit(angles[::n_psi, 0], angles[::n_psi, 1])  # (k, 3)
    images = torch.einsum("gij,kj->gki", group, kept).reshape(-1, 3)
    assert _max_gap_deg(images) < 1.3 * step
    assert torch.allclose(mats, euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]))


def test_local_orientations(device: torch.device) -> None:
    """Offsets lie within n_sigma·sigma of each centre with prior -d²/(2σ²), and a random true
    rotation in range is represented to within the lattice covering radius step·√3/2
    (typically ~step/2)."""
    sigma, step = 2.0, 1.0
    centres = torch.tensor(Rotation.random(3, random_state=4).as_matrix(), device=device)
    mats, log_prior = local_orientations(centres, sigma, step)
    b, m = log_prior.shape
    assert mats.shape == (b, m, 3, 3) and b == 3 and mats.device == device
    assert m == sum(
        1
        for i in range(-6, 7)
        for j in range(-6, 7)
        for k in range(-6, 7)
        if i * i + j * j + k * k <= 36
    )
    d = rotation_angle_deg(mats, centres[:, None])  # (b, m)
    assert float(d.max()) <= 6.0 + 1e-6
    assert torch.allclose(log_prior, -(d**2) / (2 * sigma**2), atol=1e-6)
    assert float(log_prior.max()) == 0.0  # the centre itself
    # random true rotations within 5.5° of each centre
    rng = np.random.default_rng(6)
    axes = rng.normal(size=(50, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angle = rng.uniform(0, 5.5, size=(50, 1))
    offset = torch.tensor(Rotation.from_rotvec(np.radians(angle) * axes).as_matrix())
    true = offset.to(device)[:, None] @ centres[None]  # (50, b, 3, 3)
    err = rotation_angle_deg(true[:, :, None], mats[None]).amin(dim=-1)  # (50, b)
    assert float(err.max()) <= step * math.sqrt(3) / 2 * 1.02
    assert 0.3 * step < float(err.mean()) < 0.6 * step
