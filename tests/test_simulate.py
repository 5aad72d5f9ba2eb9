"""The simulator end to end: CTF sign, noise level, determinism, files, batching, pose errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import torch
from typer.testing import CliRunner

from subtomo.cli.main import app
from subtomo.ctf import ctf_2d, particle_defocus
from subtomo.data import ParticleSet, TomogramSet, read_mtf, tilt_images
from subtomo.geometry import (
    euler_to_matrix,
    particle_positions_px,
    project_particles,
    rotation_angle_deg,
)
from subtomo.io import read_mrc, write_mrc
from subtomo.io.mdoc import read_mdoc
from subtomo.simulate import SimulationParams, simulate
from subtomo.simulate import imaging as imaging_module
from subtomo.simulate.maps import particle_radius_px

SMALL = dict(particles=6, tilt_step=20.0, tomogram_size=(160, 160, 64), seed=5)


def _small(**kw) -> SimulationParams:
    return SimulationParams.from_preset("tiny", **{**SMALL, **kw})


def _size(sim) -> tuple[int, int, int]:
    return tuple(int(sim.global_table[f"rlnTomoSize{a}"].iloc[0]) for a in "XYZ")


def _project(sim, table: pd.DataFrame, name: str = "TS_01"):
    """(uv, depth) of the table's particles, from the table alone (RELION's §1.3)."""
    coords = torch.as_tensor(
        table[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy(np.float64)
    )
    positions = particle_positions_px(coords, sim.params.pixel_size, _size(sim))
    return project_particles(sim.true_matrices[name], positions, _size(sim))


def _rotations(table: pd.DataFrame) -> torch.Tensor:
    """Full RELION rotations A = A_sub A_part from a particle table."""

    def angles(prefix):
        return [
            torch.tensor(table[f"{prefix}{c}"].to_numpy(np.float64)) for c in ("Rot", "Tilt", "Psi")
        ]

    a = euler_to_matrix(*angles("rlnAngle"))
    if "rlnTomoSubtomogramRot" in table.columns:
        a = euler_to_matrix(*angles("rlnTomoSubtomogram")) @ a
    return a


def test_ctf_sign_protein_white_after_extraction():
    """-CTF applied to a raw tilt image gives +CTF² times the projection: protein white.

    One particle, one untilted image (tilt axis 0: image axes = specimen axes), no dose
    weighting. The reference is a brute-force
    projection of the truth map by the pose in the table (scipy), placed at the projected
    position and filtered by CTF² with the particle's depth-dependent defocus (rlnTomoHand
    -1). A negative correlation means the raw images have the wrong contrast (RELION's
    extraction would give black protein); a low one, a wrong defocus or CTF placement.
    """
    params = _small(particles=1, tilt_range=0.0, dose_per_tilt=0.0, tilt_axis_deg=0.0)
    sim = simulate(params)
    _, images = next(sim.tilt_series())
    image = images[0].double()
    h, w = image.shape
    uv, depth = _project(sim, sim.particles)
    tilt = sim.tilt_tables["TS_01"].iloc[0]
    u_def, v_def = particle_defocus(
        float(tilt.rlnDefocusU), float(tilt.rlnDefocusV), depth[0, 0], params.pixel_size, -1
    )
    ctf = ctf_2d(
        u_def, v_def, float(tilt.rlnDefocusAngle), 300.0, 2.7, 0.07, params.pixel_size, (h, w)
    ).double()
    corrected = torch.fft.irfftn(torch.fft.rfftn(image) * -ctf, s=(h, w)).numpy()

    truth = sim.maps[0].double().numpy()
    a = _rotations(sim.particles)[0].numpy()
    m, c = a.T[::-1, ::-1], np.full(3, params.box // 2)
    projection = ndi.affine_transform(truth, m, offset=c - m @ c, order=3).sum(axis=0)
    placed = np.zeros((h, w))
    u, v = uv[0, 0].tolist()
    x0, y0 = round(u) - params.box // 2, round(v) - params.box // 2
    placed[y0 : y0 + params.box, x0 : x0 + params.box] = projection
    placed = ndi.shift(placed, (v - round(v), u - round(u)), order=3)
    reference = torch.fft.irfftn(torch.fft.rfftn(torch.as_tensor(placed)) * ctf**2, s=(h, w))
    corr = np.corrcoef(corrected.ravel(), reference.numpy().ravel())[0, 1]
    assert corr > 0.98


@pytest.mark.parametrize("kind", ["gaussian", "poisson"])
def test_noise_reaches_target_snr(kind):
    """var(noise-free image over particle pixels) / var(noise) equals --snr (its definition),
    with the particle pixels found independently from the table (within the particle radius
    of each projected centre). A failure means the noise level is not what was asked for.
    """
    clean_params = _small(noise="none")
    clean_sim = simulate(clean_params)
    _, clean = next(clean_sim.tilt_series())
    _, noisy = next(simulate(_small(noise=kind, snr=0.5)).tilt_series())
    uv, _ = _project(clean_sim, clean_sim.particles)
    radius = particle_radius_px(clean_sim.maps[0])
    t, h, w = clean.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = torch.zeros(t, h, w, dtype=torch.bool)
    for f in range(t):
        for u, v in torch.round(uv[:, f]).tolist():
            mask[f] |= (xs - u) ** 2 + (ys - v) ** 2 <= radius**2
    noise = (noisy - clean).double()
    snr = clean.double()[mask].var() / noise.var()
    assert float(snr) == pytest.approx(0.5, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * float(noise.std())


def test_same_seed_same_data_other_seed_other_data():
    """Deterministic from the seed (tables and noisy images); another seed changes both."""
    params = _small(noise="gaussian", particles=3, tilt_range=20.0)
    first, second = simulate(params), simulate(params)
    pd.testing.assert_frame_equal(first.particles, second.particles)
    pd.testing.assert_frame_equal(first.tilt_tables["TS_01"], second.tilt_tables["TS_01"])
    assert torch.equal(next(first.tilt_series())[1], next(second.tilt_series())[1])
    other = simulate(_small(noise="gaussian", particles=3, tilt_range=20.0, seed=6))
    assert not np.allclose(other.particles.rlnAngleRot, first.particles.rlnAngleRot)


def test_particles_stay_inside_every_tilt_image():
    """Every particle projects at least box/2 px inside every tilt (nominal and true
    geometry), so extraction with the simulation box sees it in all tilts; particles do not
    overlap (centres two radii apart); subsets are balanced; species follow the fractions.
    """
    params = SimulationParams.from_preset(
        "demo", tomograms=2, particles=40, tilt_error_deg=1.0, tilt_shift_error_px=2.0
    )
    sim = simulate(params)
    box = params.box
    w, h, _ = _size(sim)
    for name, table in sim.particles.groupby("rlnTomoName"):
        uv, _ = _project(sim, table, name)
        assert (uv > box / 2).all() and (uv[..., 0] < w - 1 - box / 2).all()
        assert (uv[..., 1] < h - 1 - box / 2).all()
        p = table[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy()
        d = np.linalg.norm(p[:, None] - p[None], axis=-1) + np.eye(len(p)) * 1e9
        radius = max(particle_radius_px(m) for m in sim.maps)
        assert d.min() >= 2 * radius * params.pixel_size - 1e-6
    counts = sim.particles.rlnRandomSubset.value_counts()
    assert counts[1] == counts[2] == 20
    species = sim.particles.subtomoSpecies.value_counts()
    assert species["ribosome70S"] == 27 and species["ribosome50S"] == 13


@pytest.mark.parametrize("layout", ["random", "vesicle"])
def test_picked_poses_carry_the_requested_errors(layout):
    """particles_picked.star differs from the truth by exactly --pose-error-deg (full
    rotation A_sub A_part) and --shift-error-px (position); surface picks keep RELION's
    priors (tilt 90, psi 0), which the true poses satisfy exactly.
    """
    params = _small(
        layout=layout, particles=10, pose_error_deg=4.0, shift_error_px=2.5,
        tomogram_size=(320, 320, 128),
    )  # fmt: skip
    sim = simulate(params)
    true, picked = sim.particles, sim.particles_picked
    angle = rotation_angle_deg(_rotations(picked), _rotations(true))
    torch.testing.assert_close(angle, torch.full_like(angle, 4.0), atol=1e-6, rtol=0)
    cols = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
    moved = np.linalg.norm(picked[cols].to_numpy() - true[cols].to_numpy(), axis=1)
    np.testing.assert_allclose(moved, 2.5 * params.pixel_size)
    if layout == "vesicle":
        np.testing.assert_allclose(true.rlnAngleTilt, 90.0, atol=1e-6)
        np.testing.assert_allclose(true.rlnAnglePsi, 0.0, atol=1e-6)
        assert (true.rlnAngleTiltPrior == 90.0).all() and (true.rlnAnglePsiPrior == 0.0).all()
    else:
        assert "rlnTomoSubtomogramRot" not in true.columns


def test_mtf_multiplies_the_signal(shared_data):
    """A flat MTF of 0.5 halves the noise-free images (it multiplies every particle image);
    the RELION MTF files of the reference data read as frequency/value curves.
    """
    freq, value = read_mtf(shared_data / "formats/mtf/mtf_falcon4EC_300kV.star")
    assert freq[0] == 0 and 0.45 < freq[-1] <= 0.5 and np.all(np.diff(freq) > 0)
    assert 0.99 < value[0] <= 1.0
    params = _small(particles=2, tilt_range=20.0)
    _, plain = next(simulate(params).tilt_series())
    flat = (np.array([0.0, 0.5]), np.array([0.5, 0.5]))
    _, halved = next(simulate(params, mtf=flat).tilt_series())
    torch.testing.assert_close(halved, 0.5 * plain, rtol=0, atol=1e-4 * float(plain.abs().max()))


def test_batching_bounds_the_patches_in_memory(monkeypatch):
    """However many particles, no more than ``batch_size`` patches are rendered at once
    (peak memory is set by the batch, not by the data set), and every patch is rendered.
    """
    seen: list[int] = []
    real = imaging_module.project_rfft

    def recording(projector, rotations):
        seen.append(rotations.shape[:-2].numel())
        return real(projector, rotations)

    monkeypatch.setattr(imaging_module, "project_rfft", recording)
    for n in (3, 12):
        seen.clear()
        params = _small(particles=n, tilt_range=20.0, batch_size=9)  # 3 tilts -> 3 particles
        next(simulate(params).tilt_series())
        assert max(seen) <= 9
        assert sum(seen) == 3 * n


def _blob_map(path, px: float, offset: float) -> None:
    axis = torch.arange(16, dtype=torch.float32) - 8
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    write_mrc(path, torch.exp(-((x - offset) ** 2 + y**2 + z**2) / 4.0), px)


def test_cli_writes_a_readable_relion_project(tmp_path):
    """``subtomo simulate`` writes every file, and they read back consistently: the tilt
    images equal a re-simulation from simulation.json (so the JSON holds every parameter),
    the tables read as TomogramSet/ParticleSet, the mdoc lists the tilts in acquisition order
    with their doses, and the truth maps are the maps used (two species from --map files).
    """
    _blob_map(tmp_path / "a.mrc", 10.0, 0.0)
    _blob_map(tmp_path / "b.mrc", 10.0, 2.0)
    out = tmp_path / "project"
    args = ["simulate", "--out", str(out), "--preset", "tiny", "--particles", "4"]
    args += ["--map", str(tmp_path / "a.mrc"), "--map", str(tmp_path / "b.mrc")]
    args += ["--species-fraction", "3", "--species-fraction", "1", "--tilt-step", "30"]
    args += ["--noise", "gaussian", "--box", "16", "--tomogram-size", "96,96,32", "--seed", "9"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    record = json.loads((out / "simulation.json").read_text())
    fields = {k: v for k, v in record.items() if k in SimulationParams.__dataclass_fields__}
    params = SimulationParams(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    )
    from subtomo.jobs.simulate import read_species

    sim = simulate(params, read_species(params.maps))
    _, expected = next(sim.tilt_series())

    tomograms = TomogramSet.read(out / "tomograms.star")
    series = tomograms["TS_01"]
    assert series.tomogram_size == (96, 96, 32) and series.hand == -1
    assert series.pixel_size == 10.0
    assert torch.equal(tilt_images(series), expected)
    for path in series.micrograph_paths:
        assert read_mrc(path)[1] == pytest.approx(10.0)

    particles = ParticleSet.read(out / "particles.star")
    assert list(particles.particles.subtomoSpecies) == list(sim.particles.subtomoSpecies)
    assert sorted(set(sim.particles.subtomoSpecies)) == ["a", "b"]
    assert (particles.particles.subtomoSpecies == "a").sum() == 3
    np.testing.assert_allclose(
        particles.particles.rlnAngleRot.to_numpy(), sim.particles.rlnAngleRot.to_numpy()
    )
    picked = ParticleSet.read(out / "particles_picked.star")
    assert len(picked) == 4 and list(particles.optics.rlnOpticsGroupName) == ["optics1"]

    mdoc = read_mdoc(out / "TS_01.mdoc")
    table = series.tilts
    angles, doses = table.rlnTomoNominalStageTiltAngle, table.rlnMicrographPreExposure
    by_angle = dict(zip(angles, doses, strict=True))
    np.testing.assert_allclose(mdoc.pre_exposure, [by_angle[a] for a in mdoc.tilt_angles_deg])
    np.testing.assert_allclose(mdoc.pre_exposure, np.arange(len(mdoc.pre_exposure)) * 3.0)

    for name, volume in (
        ("truth", sim.maps[0]),
        ("truth_a", sim.maps[0]),
        ("truth_b", sim.maps[1]),
    ):
        data, voxel = read_mrc(out / f"{name}.mrc")
        assert voxel == pytest.approx(10.0) and torch.equal(data, volume)
