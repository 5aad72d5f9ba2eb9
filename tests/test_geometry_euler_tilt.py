"""RELION Euler convention and tilt-series projection, against independent constructions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from subtomo.geometry import (
    alignment_from_projection_matrices,
    euler_to_matrix,
    matrix_to_euler,
    particle_positions_px,
    project_particles,
    projection_matrices,
)


def test_euler_matches_relion_closed_form_and_scipy():
    rng = np.random.default_rng(0)
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(50, 3))
    a = euler_to_matrix(*torch.from_numpy(angles).T).numpy()
    for (rot, tilt, psi), m in zip(angles, a, strict=True):
        # RELION 5 docs: A = from_euler('ZYZ', [rot, tilt, psi]).as_matrix().T
        ref = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T
        np.testing.assert_allclose(m, ref, atol=1e-12)
    # Row 3 is the viewing direction in reference axes: (sin t cos r, sin t sin r, cos t).
    r, t = np.deg2rad(angles[:, 0]), np.deg2rad(angles[:, 1])
    view = np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], -1)
    np.testing.assert_allclose(a[:, 2, :], view, atol=1e-12)


@pytest.mark.parametrize(
    "angles",
    [(10.0, 0.0, 30.0), (10.0, 180.0, 30.0), (0.0, 90.0, 0.0), (-170.0, 45.0, 120.0), (0, 0, 0)],
)
def test_euler_round_trip_including_gimbal_lock(angles):
    m = euler_to_matrix(*torch.tensor(angles, dtype=torch.float64))
    back = matrix_to_euler(m)
    np.testing.assert_allclose(euler_to_matrix(*back).numpy(), m.numpy(), atol=1e-10)
    assert 0.0 <= float(back[1]) <= 180.0


def test_projection_matrix_round_trip_and_centre():
    tilts = torch.linspace(-60, 60, 41, dtype=torch.float64)
    x_tilt = torch.full_like(tilts, 1.5)
    z_rot = torch.full_like(tilts, 85.3)
    xs, ys = torch.randn(41, dtype=torch.float64) * 20, torch.randn(41, dtype=torch.float64) * 20
    p = projection_matrices(x_tilt, tilts, z_rot, xs, ys, 1.35, (4000, 4000, 1500), (4096, 4096))
    back = alignment_from_projection_matrices(p, 1.35, (4000, 4000, 1500), (4096, 4096))
    for key, ref in [
        ("rlnTomoXTilt", x_tilt),
        ("rlnTomoYTilt", tilts),
        ("rlnTomoZRot", z_rot),
        ("rlnTomoXShiftAngst", xs),
        ("rlnTomoYShiftAngst", ys),
    ]:
        np.testing.assert_allclose(back[key].numpy(), ref.numpy(), atol=1e-9)
    # The specimen centre lands on the image centre plus the shift (in pixels).
    centre = p @ torch.tensor([2000.0, 2000.0, 750.0, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(centre[:, 0].numpy(), 2048 + xs.numpy() / 1.35, atol=1e-9)
    np.testing.assert_allclose(centre[:, 1].numpy(), 2048 + ys.numpy() / 1.35, atol=1e-9)


def test_particle_projection_matches_simplified_even_size_formula():
    """(u, v) = [R_f (C - A_sub o + t_f)]_xy / px + s_f / px + (w//2, h//2) for even sizes."""
    px, size, image = 2.0, (1000, 800, 300), (1024, 900)
    rng = np.random.default_rng(1)
    n, t = 5, 7
    c = torch.from_numpy(rng.normal(0, 300, (n, 3)))
    o = torch.from_numpy(rng.normal(0, 10, (n, 3)))
    a_sub = euler_to_matrix(*torch.from_numpy(rng.uniform(-180, 180, (3, n))))
    traj = torch.from_numpy(rng.normal(0, 5, (n, t, 3)))
    ang = [torch.from_numpy(rng.uniform(-60, 60, t)) for _ in range(3)]
    sh = [torch.from_numpy(rng.normal(0, 30, t)) for _ in range(2)]
    p = projection_matrices(*ang, *sh, px, size, image)
    pos = particle_positions_px(c, px, size, o, a_sub)
    uv, depth = project_particles(p, pos, size, traj, px)
    r = p[:, :3, :3]
    centre = c - (a_sub @ o[..., None])[..., 0]
    moved = centre[:, None, :] + traj
    expect = torch.einsum("tij,ntj->nti", r, moved)[..., :2] / px
    expect = expect + torch.stack(sh, -1) / px + torch.tensor([512.0, 450.0], dtype=torch.float64)
    np.testing.assert_allclose(uv.numpy(), expect.numpy(), atol=1e-9)
    np.testing.assert_allclose(
        depth.numpy(), torch.einsum("tj,nj->nt", r[:, 2], centre).numpy() / px, atol=1e-9
    )
