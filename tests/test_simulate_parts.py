"""Building blocks of the simulator: map rescaling, tilt schemes, layouts and orientations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from subtomo.errors import InputError
from subtomo.geometry import euler_to_matrix, matrix_to_euler, rotation_angle_deg
from subtomo.simulate import demo_species, rescale_map
from subtomo.simulate.acquisition import tilt_scheme
from subtomo.simulate.layout import (
    random_layout,
    random_rotations,
    rotations_by_angle,
    surface_orientations,
    vesicle_layout,
)
from subtomo.simulate.maps import particle_radius_px


def _gaussian(n: int, px: float, centre_angst=(15.0, -10.0, 5.0), sigma: float = 20.0):
    """A Gaussian (σ in Å) sampled on an n³ grid of px Å whose origin is voxel n//2."""
    axis = (torch.arange(n, dtype=torch.float64) - n // 2) * px
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    c = centre_angst
    r2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
    return torch.exp(-r2 / (2 * sigma**2)).float()


@pytest.mark.parametrize("source_size", [96, 82, 81])
def test_rescale_map_preserves_values_and_centre(source_size):
    """A Gaussian sampled at 5 Å and rescaled to 10 Å in a box of 48 equals the same Gaussian
    sampled at 10 Å (values, not sums, preserved; centre N//2 kept) -- also for source sizes
    that must be padded first (82: 41 voxels at 10 Å would be odd; 81: odd source).
    A failure means torch-fourier-rescale changed the density scale or shifted the map.
    """
    got = rescale_map(_gaussian(source_size, 5.0), 5.0, 10.0, 48)
    expected = _gaussian(48, 10.0)
    assert got.shape == (48, 48, 48)
    assert (got - expected).abs().max() < 1e-4


def test_rescale_map_refuses_to_cut_density():
    """A map larger than the box is an error, not a silently truncated truth."""
    big = _gaussian(96, 5.0, centre_angst=(0.0, 0.0, 0.0), sigma=60.0)
    with pytest.raises(InputError, match="does not fit"):
        rescale_map(big, 5.0, 10.0, 24)


def test_demo_maps_load_with_their_pixel_size():
    """The embedded demo maps ship in the package with 5 Å voxels and a ribosome-sized
    particle (radius 100-200 Å); otherwise the presets would simulate the wrong scale.
    """
    for species in demo_species(["ribosome70S", "ribosome50S"]):
        assert species.voxel_size == pytest.approx(5.0)
        assert 20 <= particle_radius_px(species.volume) <= 40


def test_dose_symmetric_scheme():
    """Hagen's scheme: 0, then groups of two alternating sides, outwards; pre-exposure is the
    dose of the tilts acquired before (RELION's rlnMicrographPreExposure).
    """
    s = tilt_scheme(6.0, 2.0, 3.0, dose_symmetric=True)
    np.testing.assert_allclose(s.angles_deg, [-6, -4, -2, 0, 2, 4, 6])
    acquired = s.angles_deg[np.argsort(s.order)]
    np.testing.assert_allclose(acquired, [0, 2, 4, -2, -4, 6, -6])
    np.testing.assert_allclose(s.pre_exposure, [18, 12, 9, 0, 3, 6, 15])
    seq = tilt_scheme(6.0, 2.0, 3.0, dose_symmetric=False)
    np.testing.assert_allclose(seq.pre_exposure, [0, 3, 6, 9, 12, 15, 18])


def test_rotations_by_angle_have_that_angle():
    """Pose errors are rotations by exactly the requested angle (about random axes)."""
    rng = np.random.default_rng(0)
    r = torch.as_tensor(rotations_by_angle(rng, 50, 7.5))
    angle = rotation_angle_deg(r, torch.eye(3, dtype=torch.float64).expand(50, 3, 3))
    torch.testing.assert_close(angle, torch.full((50,), 7.5, dtype=torch.float64))
    torch.testing.assert_close(
        r @ r.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    )


def test_random_rotations_are_uniform():
    """Uniform rotations send z to directions with mean ~0 and <cos²> ~1/3 (not biased to a
    pole, which would make the simulated data preferentially oriented).
    """
    r = random_rotations(np.random.default_rng(1), 20000)
    z = r[:, :, 2]
    assert np.abs(z.mean(axis=0)).max() < 0.02
    np.testing.assert_allclose((z**2).mean(axis=0), 1 / 3, atol=0.01)


def test_surface_orientations_follow_relion_picker_convention():
    """Reference z along the normal; A_sub A_part = A; A_part angles (-φ, 90, 0) so that the
    priors rlnAngleTiltPrior = 90 and rlnAnglePsiPrior = 0 are the truth (RELION 5 pickers).
    """
    rng = np.random.default_rng(2)
    normals = rng.normal(size=(20, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    phi = rng.uniform(-170, 170, 20)
    a_sub, a_part = surface_orientations(normals, phi)
    full = a_sub @ a_part
    np.testing.assert_allclose(full[:, :, 2], normals, atol=1e-12)  # A e_z = n
    angles = matrix_to_euler(torch.as_tensor(a_part)).numpy()
    np.testing.assert_allclose(angles[:, 1], 90.0, atol=1e-9)
    np.testing.assert_allclose(angles[:, 2], 0.0, atol=1e-9)
    np.testing.assert_allclose(angles[:, 0], -phi, atol=1e-9)
    rebuilt = euler_to_matrix(*torch.as_tensor(angles).T).numpy()
    np.testing.assert_allclose(rebuilt, a_part, atol=1e-12)


def test_random_layout_is_non_overlapping_and_inside():
    """Centres are at least two radii apart, inside the tomogram by one radius, and only
    where ``fits`` allows; impossible requests fail with a clear error.
    """
    rng = np.random.default_rng(3)

    def fits(points):
        return points[:, 0] < 60  # an arbitrary admissible region

    lay = random_layout(rng, 30, (100, 80, 40), 5.0, fits)
    p = lay.positions_px
    d = np.linalg.norm(p[:, None] - p[None], axis=-1) + np.eye(len(p)) * 1e9
    assert d.min() >= 10.0
    assert (p >= 5.0).all() and (p <= np.array([100, 80, 40]) - 5.0).all()
    assert (p[:, 0] < 60).all()
    with pytest.raises(InputError, match="could only place"):
        random_layout(rng, 500, (100, 80, 40), 5.0, fits, max_rounds=3)


def test_vesicle_layout_points_lie_on_ellipsoids_with_unit_normals():
    """Vesicle picks are inside the tomogram, apart, and their normals are unit vectors that
    point away from a common centre for neighbours on one vesicle (outward surface normals),
    so the true poses put the particles' z axes along the membrane normal.
    """
    rng = np.random.default_rng(4)
    size = (200, 200, 60)
    lay = vesicle_layout(rng, 20, size, 5.0, lambda p: np.ones(len(p), dtype=bool))
    p, n = lay.positions_px, lay.normals
    assert p.shape == n.shape == (20, 3)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0)
    assert (p >= 5.0).all() and (p <= np.array(size) - 5.0).all()
    d = np.linalg.norm(p[:, None] - p[None], axis=-1) + np.eye(20) * 1e9
    assert d.min() >= 10.0
    # neighbours on a convex surface: the chord between them makes an obtuse angle with the
    # first normal minus a small tolerance (no normal points inwards)
    near = d < 14.0
    i, j = np.nonzero(near)
    chord = p[j] - p[i]
    assert (np.einsum("ij,ij->i", chord, n[i]) <= 0.2 * np.linalg.norm(chord, axis=1)).all()
