"""Surface picking (subtomo.picking, ``subtomo pick-surface``): fits against known spheres and
ellipsoids, lattice coverage, normals on the particle z axis with RELION's priors, bad input,
and the bar on simulated vesicles with membrane proteins (conventions §16.1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from subtomo.data import ParticleSet, TomogramSet
from subtomo.errors import InputError
from subtomo.geometry import euler_to_matrix
from subtomo.io import write_mrc, write_star
from subtomo.picking import (
    Ellipsoid,
    fit_ellipsoid,
    fit_sphere,
    mask_surfaces,
    normals_of_rows,
    sample_ellipsoid,
    sample_point_surface,
    surface_particle_rows,
)
from subtomo.simulate.layout import vesicle_layout


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def _on_sphere(rng, n, centre, radius):
    d = rng.normal(size=(n, 3))
    return centre + radius * d / np.linalg.norm(d, axis=1, keepdims=True)


def test_fit_sphere_and_its_bad_input():
    """Six noisy points give the sphere; points on one slice give the sphere of that great
    circle (the stated choice); two points or a line are one-line errors."""
    rng = np.random.default_rng(0)
    centre = np.array([100.0, 80.0, 40.0])
    fit = fit_sphere(_on_sphere(rng, 6, centre, 50.0) + rng.normal(scale=0.3, size=(6, 3)))
    np.testing.assert_allclose(fit.centre, centre, atol=1.0)
    assert abs(fit.axes[0] - 50) < 1.0 and fit.rms < 1.0
    t = rng.uniform(0, 2 * np.pi, 5)
    ring = centre + 30 * np.column_stack([np.cos(t), np.sin(t), 0 * t])
    fit = fit_sphere(ring)
    np.testing.assert_allclose(fit.centre, centre, atol=1e-6)
    np.testing.assert_allclose(fit.axes, 30, atol=1e-6)
    with pytest.raises(InputError, match=r"2 point.*do not determine a sphere") as err:
        fit_sphere(ring[:2])
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="on a line"):
        fit_sphere(np.outer(np.arange(5.0), [1, 2, 3]))


def test_fit_ellipsoid_any_orientation():
    """Twelve points of a rotated ellipsoid give its centre, axes and axis directions; eight
    points, or points on a plane, are errors."""
    rng = np.random.default_rng(1)
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    truth = Ellipsoid(np.array([200.0, 150.0, 60.0]), np.array([60.0, 45.0, 30.0]), rotation)
    d = rng.normal(size=(12, 3))
    points = truth.centre + (d / np.linalg.norm(d, axis=1, keepdims=True) * truth.axes) @ rotation.T
    fit = fit_ellipsoid(points + rng.normal(scale=0.2, size=points.shape))
    np.testing.assert_allclose(fit.centre, truth.centre, atol=1.0)
    np.testing.assert_allclose(np.sort(fit.axes), np.sort(truth.axes), atol=1.0)
    order = np.argsort(fit.axes)[::-1]
    np.testing.assert_allclose(np.abs(np.sum(fit.rotation[:, order] * rotation, 0)), 1, atol=1e-2)
    with pytest.raises(InputError, match="need 9"):
        fit_ellipsoid(points[:8])
    with pytest.raises(InputError, match="on a plane"):
        fit_ellipsoid(np.column_stack([rng.normal(size=(12, 2)), np.zeros(12)]))


@pytest.mark.parametrize("axes", [(40.0, 40.0, 40.0), (60.0, 40.0, 25.0)])
def test_lattice_covers_the_surface(axes):
    """Samples lie on the surface with the analytic normal, and every surface point is within
    one spacing of a sample (sphere: Fibonacci lattice; ellipsoid: thinned lattice)."""
    rng = np.random.default_rng(2)
    e = Ellipsoid(np.zeros(3), np.asarray(axes), np.linalg.qr(rng.normal(size=(3, 3)))[0])
    points, normals = sample_ellipsoid(e, 8.0)
    local = points @ e.rotation / e.axes
    np.testing.assert_allclose(np.linalg.norm(local, axis=1), 1, atol=1e-9)
    np.testing.assert_allclose(normals, e.normals(points), atol=1e-12)
    d = rng.normal(size=(2000, 3))
    probe = (d / np.linalg.norm(d, axis=1, keepdims=True) * e.axes) @ e.rotation.T
    gap = cKDTree(points).query(probe)[0]
    assert gap.max() < 8.0
    nearest = cKDTree(points).query(points, k=2)[0][:, 1]
    assert np.median(nearest) > 0.8 * 8.0  # spacing kept: not oversampled


def test_surface_rows_put_the_normal_on_z_with_relion_priors():
    """A_sub A_part e_z is the normal; A_part = (0, 90, 0) with priors 90/0, as RELION's sphere
    picker writes them (relion5-upstream.md §7.2)."""
    rng = np.random.default_rng(3)
    normals = rng.normal(size=(20, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    rows = surface_particle_rows(["TS"] * 20, np.zeros((20, 3)), normals)
    np.testing.assert_allclose(normals_of_rows(rows), normals, atol=1e-9)
    np.testing.assert_allclose(
        rows[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]], [[0, 90, 0]] * 20, atol=1e-9
    )
    assert (rows["rlnAngleTiltPrior"] == 90).all() and (rows["rlnAnglePsiPrior"] == 0).all()


def test_point_traced_surface_that_is_no_ellipsoid():
    """A peanut (two fused spheres) traced densely with 0.2 px error: picks cover it at the
    spacing with the true normals (local PCA, turned outwards) away from the crease where the
    spheres meet; points too sparse for the spacing are a one-line error."""
    rng = np.random.default_rng(6)
    centres = np.array([[-12.0, 0, 0], [12.0, 0, 0]])
    traced, true = [], []
    for c, other in (centres, centres[::-1]):
        p = _on_sphere(rng, 6000, c, 20.0)
        p = p[np.linalg.norm(p - other, axis=1) > 20]
        traced.append(p)
        true.append((p - c) / 20)
    traced, true = np.concatenate(traced), np.concatenate(true)
    picks, normals = sample_point_surface(traced + rng.normal(scale=0.2, size=traced.shape), 4.0)
    assert cKDTree(picks).query(traced)[0].max() < 4.0 + 1.0
    nearest = cKDTree(traced).query(picks)[1]
    away = np.abs(picks[:, 0]) > 4.0  # one spacing from the crease
    errors = _angle_deg(normals[away], true[nearest][away])
    assert np.median(errors) < 2.0 and np.percentile(errors, 95) < 5.0, np.percentile(errors, 95)
    with pytest.raises(InputError, match="too sparse to trace a surface"):
        sample_point_surface(_on_sphere(rng, 40, np.zeros(3), 20.0), 4.0)


def test_mask_surfaces_of_a_segmented_sphere():
    """A voxelised ball gives points within a voxel of its surface and radial normals."""
    z, y, x = np.mgrid[:48, :48, :48]
    mask = (x - 24) ** 2 + (y - 22) ** 2 + (z - 25) ** 2 <= 15**2
    ((points, normals),) = mask_surfaces(mask.astype(np.uint8), spacing=4.0)
    radial = points - [24, 22, 25]
    assert np.abs(np.linalg.norm(radial, axis=1) - 15).max() < 1.0
    assert np.percentile(_angle_deg(normals, radial), 95) < 10
    with pytest.raises(InputError, match="empty"):
        mask_surfaces(np.zeros((8, 8, 8)), 2.0)


def test_bar_membrane_proteins_on_simulated_vesicles():
    """The bar: membrane proteins placed by the simulator on vesicles (ellipsoids, known
    normals); 40 clicked points per vesicle (1 px error; a contour traced on a few slices) ->
    ellipsoid fit -> lattice at the particle radius. >= 95 % of the proteins lie within one
    spacing of a pick (measured 100 %), and 95 % of the picks' normals are within 5° of the
    true surface normal where they sit (measured 3.7°; with 12 points the 9-parameter fit is
    too noisy: 38°, see benchmarks/pick_surface.py)."""
    rng = np.random.default_rng(4)
    radius, spacing = 8.0, 8.0
    lay = vesicle_layout(rng, 150, (400, 400, 120), radius, lambda p: np.ones(len(p), bool))
    picks, pick_normals, true_normals = [], [], []
    for centre, axes in lay.vesicles:
        d = rng.normal(size=(40, 3))
        clicks = centre + d / np.linalg.norm(d, axis=1, keepdims=True) * axes
        fit = fit_ellipsoid(clicks + rng.normal(size=clicks.shape))
        points, normals = sample_ellipsoid(fit, spacing)
        truth = Ellipsoid(centre, axes, np.eye(3))
        picks.append(points)
        pick_normals.append(normals)
        true_normals.append(truth.normals(points))
    picks = np.concatenate(picks)
    distance = cKDTree(picks).query(lay.positions_px)[0]
    recall = np.mean(distance <= spacing)
    errors = _angle_deg(np.concatenate(pick_normals), np.concatenate(true_normals))
    assert recall >= 0.95, recall
    assert np.percentile(errors, 95) < 5.0, np.percentile(errors, 95)


def _tomograms(tmp_path, binning=4.0):
    table = pd.DataFrame(
        {
            "rlnTomoName": ["TS_01"],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.07],
            "rlnTomoTiltSeriesPixelSize": [2.0],
            "rlnTomoHand": [-1],
            "rlnTomoSizeX": [800],
            "rlnTomoSizeY": [800],
            "rlnTomoSizeZ": [200],
            "rlnTomoTomogramBinning": [binning],
        }
    )
    tilts = pd.DataFrame(
        {"rlnMicrographPreExposure": [0.0], "rlnTomoYTilt": [0.0], "rlnTomoZRot": [0.0]}
    )
    path = tmp_path / "tomograms.star"
    TomogramSet.from_tables(table, {"TS_01": tilts}).write(path, tmp_path / "tilt_series")
    return path


def test_pick_surface_job_on_a_relion_spheres_file(tmp_path, monkeypatch):
    """A RELION 5 ``_spheres.star`` (binned voxels) -> particles on each sphere at the given
    spacing, |C - centre| = radius, normals radial, priors written; the part of a sphere
    outside the tomogram is dropped; a 2-point vesicle in a CSV is a one-line error and leaves
    no job directory."""
    from subtomo.jobs.pick_surface import PickSurfaceParams, run

    monkeypatch.chdir(tmp_path)
    tomos = _tomograms(tmp_path)
    spheres = pd.DataFrame(
        {
            "rlnTomoName": ["TS_01"] * 3,
            "rlnCoordinateX": [50.0, 120.0, 100.0],
            "rlnCoordinateY": [60.0, 100.0, 100.0],
            "rlnCoordinateZ": [25.0, 30.0, 49.0],  # the third sphere pokes out of the top
            "rlnSphereRadius": [10.0, 6.0, 6.0],
        }
    )
    write_star(tmp_path / "TS_01_spheres.star", {"": spheres})
    run(
        PickSurfaceParams(
            tomograms=str(tomos), i="TS_01_spheres.star", spacing=40.0, output_dir="Picks/job001"
        )
    )
    parts = ParticleSet.read(tmp_path / "Picks/job001/particles.star")
    c = parts.centered_coordinates_angst().numpy()
    centres = (np.array([[50, 60, 25], [120, 100, 30], [100, 100, 49]]) * 4 - [400, 400, 100]) * 2.0
    radii = np.array([10.0, 6.0, 6.0]) * 8
    which = np.argmin(np.linalg.norm(c[:, None] - centres[None], axis=2), axis=1)
    np.testing.assert_allclose(np.linalg.norm(c - centres[which], axis=1), radii[which], atol=1e-6)
    expected = 4 * np.pi * radii**2 / (np.sqrt(3) / 2 * 40.0**2)
    np.testing.assert_allclose(np.bincount(which)[:2], expected[:2], rtol=0.05)
    assert np.all(np.abs(c) <= [800, 800, 200]) and np.all(c[which == 2, 2] <= 200)
    assert 0.3 * expected[2] < np.bincount(which)[2] < 0.7 * expected[2]  # the lower part
    np.testing.assert_allclose(
        _angle_deg(normals_of_rows(parts.particles), c - centres[which]), 0, atol=1e-4
    )
    full = parts.subtomogram_matrices() @ parts.particle_matrices()
    np.testing.assert_allclose(full.numpy()[:, :, 2], normals_of_rows(parts.particles), atol=1e-9)
    assert set(parts.particles["rlnAngleTiltPrior"]) == {90.0}
    np.testing.assert_allclose(
        euler_to_matrix(0.0, 90.0, 0.0).numpy(), parts.particle_matrices()[0].numpy(), atol=1e-6
    )

    pd.DataFrame({"x": [1.0, 2.0], "y": [3.0, 4.0], "z": [5.0, 1.0], "group": [1, 1]}).to_csv(
        tmp_path / "two.csv", index=False
    )
    with pytest.raises(InputError, match=r"vesicle 1: 2 point.*do not determine a sphere") as err:
        run(
            PickSurfaceParams(
                tomograms=str(tomos), i="two.csv", spacing=40.0, output_dir="Picks/job002"
            )
        )
    assert "\n" not in str(err.value)
    assert not (tmp_path / "Picks/job002").exists()


def test_pick_surface_job_on_a_mask(tmp_path, monkeypatch):
    """A segmentation (binned by 4) of one vesicle: particles on its surface in Å."""
    from subtomo.jobs.pick_surface import PickSurfaceParams, run

    monkeypatch.chdir(tmp_path)
    tomos = _tomograms(tmp_path)
    z, y, x = np.mgrid[:50, :200, :200]
    mask = ((x - 100) ** 2 + (y - 90) ** 2 + (z - 25) ** 2 <= 12**2).astype(np.float32)
    import torch

    write_mrc(tmp_path / "seg.mrc", torch.from_numpy(mask), 8.0)
    run(
        PickSurfaceParams(
            tomograms=str(tomos), mask="seg.mrc", spacing=32.0, output_dir="Picks/job001"
        )
    )
    c = ParticleSet.read(tmp_path / "Picks/job001/particles.star").centered_coordinates_angst()
    centre = (np.array([100, 90, 25]) * 4 - [400, 400, 100]) * 2.0
    r = np.linalg.norm(c.numpy() - centre, axis=1)
    assert np.abs(r - 96).max() < 8.0 and len(r) > 20
    write_mrc(tmp_path / "seg4.mrc", torch.from_numpy(mask), 4.0)  # says bin 2: wrong size
    with pytest.raises(InputError, match=r"200x200x50 voxels is not tomogram TS_01 binned by 2"):
        run(PickSurfaceParams(tomograms=str(tomos), mask="seg4.mrc", spacing=32.0))


def test_refine3d_with_the_surface_priors_beats_it_without(tmp_path, monkeypatch):
    """Membrane proteins on simulated vesicles, picked with 10° pose errors and the normal
    frame of the surface (rlnTomoSubtomogram*, tilt/psi priors 90/0 as pick-surface writes
    them), SNR 0.02, 9 tilts: refine3d with --sigma_tilt/--sigma_psi 3° ends closer to the true
    poses than the same run without the priors (median 9.3° -> 6.9°, normals 6.2° -> 4.0°)."""
    from typer.testing import CliRunner

    from subtomo.cli.main import app
    from subtomo.geometry import rotation_angle_deg

    def invoke(*args: str) -> None:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 0, result.output

    invoke("simulate", "--out", str(tmp_path), "--particles", "24", "--tilt-step", "15",
           "--layout", "vesicle", "--noise", "gaussian", "--snr", "0.02",
           "--pose-error-deg", "10", "--shift-error-px", "1", "--seed", "3")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    invoke("extract", "--p", "particles_picked.star", "--t", "tomograms.star", "--box", "24",
           "--bin", "2", "--float32", "--o", "ext")  # fmt: skip
    invoke("reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec")
    refine = ["refine3d", "--ios", "ext/optimisation_set.star", "--ref", "rec/merged.mrc",
              "--ini_high", "60", "--healpix_order", "3", "--auto_local_healpix_order", "3",
              "--offset_range", "1", "--offset_step", "1", "--iter", "3", "--device", "cpu",
              "--random_seed", "4"]  # fmt: skip
    invoke(*refine, "--o", "free")
    invoke(*refine, "--sigma_tilt", "3", "--sigma_psi", "3", "--o", "prior")
    truth = ParticleSet.read("particles.star")
    order = {n: i for i, n in enumerate(truth.particles["rlnTomoParticleName"])}

    def errors(path: str) -> tuple[float, float]:
        ps = ParticleSet.read(path)
        idx = [order[n] for n in ps.particles["rlnTomoParticleName"]]
        full = (ps.subtomogram_matrices() @ ps.particle_matrices()).double()
        true = (truth.subtomogram_matrices() @ truth.particle_matrices()).double()[idx]
        normal = _angle_deg(full[:, :, 2].numpy(), true[:, :, 2].numpy())
        return float(rotation_angle_deg(full, true).median()), float(np.median(normal))

    free, prior = errors("free/run_data.star"), errors("prior/run_data.star")
    assert prior[0] < 0.9 * free[0] and prior[1] < 0.8 * free[1], (free, prior)


def test_class3d_restrains_with_the_surface_priors():
    """class3d's --sigma_tilt/--sigma_psi reach the sampling that scores the poses (the prior
    term itself is refine3d's, tested above)."""
    from subtomo.jobs.class3d import Class3DParams, _sampling

    sampling = _sampling(Class3DParams(ref=("m.mrc",), sigma_tilt=3.0, sigma_psi=4.0), 10.0)
    assert (sampling.sigma_tilt_deg, sampling.sigma_psi_deg) == (3.0, 4.0)
    off = _sampling(Class3DParams(ref=("m.mrc",)), 10.0)
    assert (off.sigma_tilt_deg, off.sigma_psi_deg) == (None, None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imodmodel uses pydantic v1 API
def test_pick_surface_job_on_an_imod_model_with_ellipsoids(tmp_path, monkeypatch):
    """An IMOD model, one contour per vesicle (binned voxels, IMOD's half-voxel origin), fitted
    by ellipsoids: every particle lies on its true ellipsoid (to the fit's accuracy) with the
    true normal."""
    import imodmodel

    from subtomo.jobs.pick_surface import PickSurfaceParams, run

    monkeypatch.chdir(tmp_path)
    tomos = _tomograms(tmp_path)
    rng = np.random.default_rng(5)
    truths = [
        Ellipsoid(np.array([60.0, 70.0, 25.0]), np.array([14.0, 10.0, 8.0]), np.eye(3)),
        Ellipsoid(np.array([130.0, 120.0, 24.0]), np.array([9.0, 12.0, 7.0]), np.eye(3)),
    ]
    rows = []
    for k, e in enumerate(truths):
        d = rng.normal(size=(30, 3))
        p = e.centre + d / np.linalg.norm(d, axis=1, keepdims=True) * e.axes
        rows.append(pd.DataFrame({"x": p[:, 0] + 0.5, "y": p[:, 1] + 0.5, "z": p[:, 2],
                                  "object_id": 0, "contour_id": k}))  # fmt: skip
    imodmodel.write(pd.concat(rows, ignore_index=True), tmp_path / "TS_01.mod")
    run(PickSurfaceParams(tomograms=str(tomos), i="TS_01.mod", shape="ellipsoid", spacing=24.0,
                          output_dir="Picks/job001"))  # fmt: skip
    parts = ParticleSet.read("Picks/job001/particles.star")
    voxels = (parts.centered_coordinates_angst().numpy() / 2.0 + [400, 400, 100]) / 4
    normals = normals_of_rows(parts.particles)
    for e in truths:
        mine = np.linalg.norm((voxels - e.centre) / e.axes, axis=1) < 1.5
        radial = np.linalg.norm((voxels[mine] - e.centre) / e.axes, axis=1)
        np.testing.assert_allclose(radial, 1.0, atol=1e-6)
        assert np.abs(_angle_deg(normals[mine], e.normals(voxels[mine]))).max() < 1e-3
        assert mine.sum() > 20


def test_pick_surface_job_on_points_tracing_a_surface(tmp_path, monkeypatch):
    """--shape points: a vesicle traced by 2,000 points (CSV, binned voxels) gives picks on
    it with radial normals."""
    from subtomo.jobs.pick_surface import PickSurfaceParams, run

    monkeypatch.chdir(tmp_path)
    tomos = _tomograms(tmp_path)
    centre = np.array([100.0, 90.0, 25.0])
    p = _on_sphere(np.random.default_rng(7), 2000, centre, 15.0)
    pd.DataFrame({"x": p[:, 0], "y": p[:, 1], "z": p[:, 2], "group": "a"}).to_csv(
        "traced.csv", index=False
    )
    run(PickSurfaceParams(tomograms=str(tomos), i="traced.csv", shape="points", spacing=24.0,
                          output_dir="Picks/job001"))  # fmt: skip
    parts = ParticleSet.read("Picks/job001/particles.star")
    c = parts.centered_coordinates_angst().numpy()
    radial = c - (centre * 4 - [400, 400, 100]) * 2.0
    np.testing.assert_allclose(np.linalg.norm(radial, axis=1), 120.0, atol=1e-6)
    assert np.percentile(_angle_deg(normals_of_rows(parts.particles), radial), 95) < 5.0
    assert len(parts) > 50
