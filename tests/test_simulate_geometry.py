"""Geometry proof of the simulator: where each particle lands in each tilt image.

A compact Gaussian blob is simulated noise-free, without CTF and dose weighting, so each
particle's image is its projected blob. The tilt images are checked against RELION's
projection (subtomo.geometry, from the written tables) and against a brute-force real-space
path that never touches Fourier slices: the blobs are put into a tomogram volume, which is
resampled along the tilt geometry with scipy and summed along z.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from subtomo.geometry import euler_to_matrix, particle_positions_px, project_particles
from subtomo.simulate import SimulationParams, Species, simulate

SIGMA = 1.5  # blob width, px
BOX = 24


def _blob(box: int = BOX) -> torch.Tensor:
    axis = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.exp(-(x**2 + y**2 + z**2) / (2 * SIGMA**2))


def _params(**kw) -> SimulationParams:
    base = dict(
        particles=6, box=BOX, tomogram_size=(128, 128, 32), tilt_range=60.0, tilt_step=20.0,
        dose_per_tilt=0.0, ctf=False, noise="none", tilt_axis_deg=85.0, seed=3,
    )  # fmt: skip
    return SimulationParams.from_preset("tiny", **{**base, **kw})


@pytest.fixture(scope="module")
def blob_sim():
    """Blobs with alignment errors: the images follow the true (perturbed) geometry."""
    params = _params(tilt_error_deg=2.0, tilt_shift_error_px=1.5)
    sim = simulate(params, [Species("blob", _blob(), params.pixel_size)])
    name, images = next(sim.tilt_series())
    return sim, name, images


def test_blob_centroids_at_projected_positions(blob_sim):
    """Each particle's density centroid sits within 0.5 px of RELION's projected position.

    Positions come from the written particle table (rlnCenteredCoordinate*) and the true
    projection matrices; a failure means the simulator places particles with another centre,
    axis order, rotation sense or shift convention than subtomo.geometry (RELION §1.3).
    """
    sim, name, images = blob_sim
    table = sim.particles
    size = tuple(int(sim.global_table[f"rlnTomoSize{a}"].iloc[0]) for a in "XYZ")
    coords = torch.as_tensor(
        table[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy(np.float64)
    )
    positions = particle_positions_px(coords, sim.params.pixel_size, size)
    uv, _ = project_particles(sim.true_matrices[name], positions, size)
    clean = -images.numpy()  # protein is dark in the raw images
    r = 4
    errors = []
    gaps = torch.cdist(uv.transpose(0, 1), uv.transpose(0, 1))  # (t, n, n) px
    gaps += torch.eye(uv.shape[0]) * 1e9
    for i in range(uv.shape[0]):
        for f in range(uv.shape[1]):
            if gaps[f, i].min() < 3 * r:  # overlapping projections bias the centroid
                continue
            u, v = uv[i, f].tolist()
            x0, y0 = round(u), round(v)
            patch = clean[f, y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
            ys, xs = np.mgrid[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
            cu, cv = (patch * xs).sum() / patch.sum(), (patch * ys).sum() / patch.sum()
            errors.append(np.hypot(cu - u, cv - v))
    assert len(errors) > uv.shape[0] * uv.shape[1] // 2
    assert max(errors) < 0.5, f"centroid off by up to {max(errors):.3f} px"
    # the true geometry differs from the nominal one by more than the tolerance
    uv_nominal, _ = project_particles(
        _nominal_matrices(sim, name, size, images.shape), positions, size
    )
    assert (uv_nominal - uv).norm(dim=-1).max() > 1.0


def _nominal_matrices(sim, name, size, shape):
    from subtomo.data import TomogramSet

    series = TomogramSet.from_tables(sim.global_table, {name: sim.tilt_tables[name]})[name]
    return series.projection_matrices((shape[-1], shape[-2]))


def test_tilt_images_match_brute_force_real_space(blob_sim):
    """The tilt images equal a brute-force tilt series of a blob tomogram.

    The tomogram volume holds a blob at every particle position (rlnCenteredCoordinate + W/2);
    each tilt image samples it at p = R_f^T((u, v, d) - P_f[:3, 3]) (the inverse of RELION's
    P_f: rotation by R_f about c_spec, shift by s_f/px and c_img) with scipy and sums along d.
    A mismatch means the simulator's images do not follow the RELION projection model.
    """
    sim, name, images = blob_sim
    px = sim.params.pixel_size
    size = tuple(int(sim.global_table[f"rlnTomoSize{a}"].iloc[0]) for a in "XYZ")
    coords = sim.particles[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy()
    positions = coords / px + np.asarray(size) / 2.0
    w, h, d = size
    pad = 8  # blobs near the top or bottom are not cut by the tomogram's nominal thickness
    z, y, x = np.meshgrid(np.arange(-pad, d + pad), np.arange(h), np.arange(w), indexing="ij")
    volume = np.zeros(z.shape)
    for p in positions:
        volume += np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * SIGMA**2))
    depth = 160  # covers every depth of the tilted tomogram
    for f, matrix in enumerate(sim.true_matrices[name].numpy()):
        rot, trans = matrix[:3, :3], matrix[:3, 3]
        offset_xyz = -rot.T @ (trans + np.array([0.0, 0.0, depth / 2])) + [0, 0, pad]
        tilted = ndi.affine_transform(
            volume, rot.T[::-1, ::-1], offset=offset_xyz[::-1], output_shape=(depth, h, w),
            order=3, mode="constant",
        )  # fmt: skip
        expected = tilted.sum(axis=0)
        got = -images[f].numpy()
        assert np.abs(got - expected).max() < 0.02 * expected.max(), f"tilt {f}"


def test_rotations_from_the_table_are_what_was_rendered():
    """An asymmetric map rendered at tilt 0 matches its brute-force projection by the pose
    written in the particle table (euler_to_matrix of rlnAngle*) and the image rotation
    Rz(rlnTomoZRot) of the tilt table (= the nominal tilt axis, 30 deg here), so the STAR
    angles are the true poses: a transposed or mis-ordered Euler convention, or a tilt axis
    read as RELION's ZRot - 90, would fail.
    """
    box = 32
    axis = np.arange(box) - box // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    vol = sum(
        a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * 1.5**2))
        for c, a in (((6, 0, 0), 1.0), ((0, -8, 0), 2.0), ((0, 0, 9), 3.0), ((-3, 3, -3), 1.5))
    ).astype(np.float32)
    params = _params(
        particles=1, box=box, tilt_range=0.0, tilt_step=10.0, tilt_axis_deg=30.0,
        tomogram_size=(96, 96, 48), seed=11,
    )  # fmt: skip
    sim = simulate(params, [Species("asym", torch.from_numpy(vol), params.pixel_size)])
    _, images = next(sim.tilt_series())
    row = sim.particles.iloc[0]
    a = euler_to_matrix(*(float(row[f"rlnAngle{c}"]) for c in ("Rot", "Tilt", "Psi"))).numpy()
    z_rot = float(sim.tilt_tables["TS_01"]["rlnTomoZRot"].iloc[0])
    assert z_rot == pytest.approx(30.0)
    c30, s30 = np.cos(np.radians(z_rot)), np.sin(np.radians(z_rot))
    a = np.array([[c30, -s30, 0.0], [s30, c30, 0.0], [0.0, 0.0, 1.0]]) @ a
    m = a.T[::-1, ::-1]  # rotated(p) = vol(A^T p), zyx index order
    c = np.full(3, box // 2)
    expected = ndi.affine_transform(vol, m, offset=c - m @ c, order=3).sum(axis=0)
    size = (96, 96, 48)
    coords = torch.as_tensor([[row[f"rlnCenteredCoordinate{k}Angst"] for k in "XYZ"]])
    uv, _ = project_particles(
        sim.true_matrices["TS_01"], particle_positions_px(coords, params.pixel_size, size), size
    )
    u, v = uv[0, 0].tolist()
    shifted = ndi.shift(expected, (v - round(v), u - round(u)), order=3)
    x0, y0 = round(u) - box // 2, round(v) - box // 2
    got = -images[0, y0 : y0 + box, x0 : x0 + box].numpy()
    corr = np.corrcoef(got.ravel(), shifted.ravel())[0, 1]
    assert corr > 0.995
