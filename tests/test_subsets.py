"""Duplicate removal, half sets, recentring and folding on constructed cases."""

from __future__ import annotations

import numpy as np
import torch

from subtomo.geometry import (
    euler_to_matrix,
    particle_positions_px,
    project_particles,
    projection_matrices,
)
from subtomo.subsets import (
    duplicate_keep_mask,
    random_half_sets,
    recentred_origins,
)


def test_duplicates_keep_the_later_of_each_close_pair_per_tomogram():
    """Pairs within the distance drop the earlier particle; other tomograms never interact."""
    centres = np.array(
        [[0, 0, 0], [5, 0, 0], [100, 0, 0], [300, 0, 0], [309, 0, 0], [0, 0, 1.0]], float
    )
    groups = np.array(["a", "a", "a", "a", "a", "b"])
    keep = duplicate_keep_mask(centres, groups, 10.0)
    np.testing.assert_array_equal(keep, [False, True, True, False, True, True])
    # A chain of three within range: every pair drops its earlier member -> only the last.
    chain = np.array([[0, 0, 0], [8, 0, 0], [16, 0, 0]], float)
    np.testing.assert_array_equal(duplicate_keep_mask(chain, np.zeros(3), 10.0), [0, 0, 1])


def test_random_half_sets_are_balanced_and_seeded():
    halves = random_half_sets(101, seed=3)
    assert set(halves) == {1, 2} and abs((halves == 1).sum() - (halves == 2).sum()) == 1
    np.testing.assert_array_equal(halves, random_half_sets(101, seed=3))
    assert not np.array_equal(halves, random_half_sets(101, seed=4))


def test_recentred_particle_projects_where_the_reference_point_projects():
    """After recentring on r, the new centre's image in every tilt is where the old pose put
    the reference point r: uv_old + [R_f A_sub A_part r]_xy (px)."""
    rng = np.random.default_rng(0)
    n, px, size, image = 6, 4.0, (800, 800, 200), (800, 800)
    a_sub = euler_to_matrix(*torch.from_numpy(rng.uniform(-180, 180, (3, n))))
    a_part = euler_to_matrix(*torch.from_numpy(rng.uniform(-180, 180, (3, n))))
    c = torch.from_numpy(rng.normal(0, 200, (n, 3)))
    o = torch.from_numpy(rng.normal(0, 8, (n, 3)))
    r = torch.tensor([3.0, -2.0, 2.75], dtype=torch.float64)  # reference-box pixels
    tilts = torch.linspace(-60, 60, 5, dtype=torch.float64)
    zeros = torch.zeros_like(tilts)
    p = projection_matrices(zeros, tilts, zeros + 80, zeros, zeros, px, size, image)
    uv_old, _ = project_particles(p, particle_positions_px(c, px, size, o, a_sub), size)
    o_new = recentred_origins(o, a_part, r, px)
    uv_new, _ = project_particles(p, particle_positions_px(c, px, size, o_new, a_sub), size)
    full = p[:, :3, :3][None] @ (a_sub @ a_part)[:, None]  # (n, t, 3, 3)
    expected = uv_old + (full @ r)[..., :2]
    np.testing.assert_allclose(uv_new.numpy(), expected.numpy(), atol=1e-9)
