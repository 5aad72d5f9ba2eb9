"""ParticleSet on the real WarpTools export and on constructed tables: round trips, names,
coordinates, rotations and optics lookups against independent formulas."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.transform import Rotation

from subtomo.data import (
    ParticleSet,
    TomogramSet,
    pixel_size_of,
    stack_image_indices,
    validate_particles,
)
from subtomo.errors import InputError

WARP = "real/warptools_ribosome_subtilts/warptools_test_4-tomos_10-ptcls_box-32_angpix-12"


@pytest.fixture(scope="module")
def warp(shared_data) -> tuple[ParticleSet, TomogramSet]:
    tomos = TomogramSet.read(shared_data / f"{WARP}_tomograms.star")
    return ParticleSet.read(shared_data / f"{WARP}.star", tomos), tomos


def test_real_warp_particles(warp):
    """The WarpTools export: 40 2D-stack particles, 37-entry visible-frame vectors, box 32
    at 12 Å, and stacks that hold ALL 37 tilts with blank images where a tilt is not
    visible (near-zero; not RELION's sum(visible) images). Validation accepts exactly that."""
    particles, tomos = warp
    assert len(particles) == 40 and particles.is_2d_stacks
    assert pixel_size_of(particles) == 12.0
    np.testing.assert_array_equal(particles.image_size(), 32)
    np.testing.assert_allclose(particles.subtomogram_binning(), 7.19856)
    assert particles.ctf_premultiplied().all()
    visible = particles.visible_frames({n: tomos[n].n_tilts for n in tomos.names})
    assert all(len(v) == 37 for v in visible)
    assert sum(int(v.sum()) < 37 for v in visible) > 0  # some tilts are hidden
    for path, vis in zip(particles.image_paths(), visible, strict=True):
        with mrcfile.mmap(path, mode="r") as mrc:
            stack = np.asarray(mrc.data, dtype=np.float32)
        assert stack.shape == (37, 32, 32)
        spread = stack.std(axis=(1, 2))  # blanks are ~1e-5 (float16 noise), images ~0.3
        assert spread[~vis].max(initial=0) < 1e-3 * spread[vis].min()
        np.testing.assert_array_equal(stack_image_indices(vis, 37), np.flatnonzero(vis))
    validate_particles(particles, tomos)


def test_round_trip_real_and_constructed(warp, tmp_path):
    """write -> read keeps all three blocks identical (unknown columns kept)."""
    particles, _ = warp
    particles.write(tmp_path / "p.star")
    back = ParticleSet.read(tmp_path / "p.star")
    pd.testing.assert_frame_equal(back.particles, particles.particles)
    pd.testing.assert_frame_equal(back.optics, particles.optics)
    assert back.general == {"rlnTomoSubTomosAre2DStacks": 1}
    made = ParticleSet.from_tables(
        pd.DataFrame(
            {
                "rlnTomoName": ["TS_1", "TS_1"],
                "rlnCenteredCoordinateXAngst": [1.5, -2.0],
                "rlnCenteredCoordinateYAngst": [0.0, 3.25],
                "rlnCenteredCoordinateZAngst": [-7.0, 0.125],
                "rlnMyExtraColumn": ["a", "b"],
            }
        )
    )
    made.write(tmp_path / "m.star")
    again = ParticleSet.read(tmp_path / "m.star")
    pd.testing.assert_frame_equal(again.particles, made.particles)
    assert again.general == {"rlnTomoSubTomosAre2DStacks": 0} and again.optics.empty


def test_particle_names_created_per_tomogram():
    """Missing rlnTomoParticleName: "<tomo>/<k>", k from 1 in file order per tomogram."""
    particles = ParticleSet.from_tables(pd.DataFrame({"rlnTomoName": ["A", "B", "A", "A", "B"]}))
    assert particles.particles["rlnTomoParticleName"].tolist() == [
        "A/1", "B/1", "A/2", "A/3", "B/2",
    ]  # fmt: skip


def test_legacy_coordinates_converted(warp):
    """RELION-4 rlnCoordinateX/Y/Z are decentred bin-1 pixels: C = (p - size/2) * px,
    computed here by hand from the global table."""
    particles, tomos = warp
    c = particles.centered_coordinates_angst()
    row = tomos.global_table.set_index("rlnTomoName").loc["Unt_050.tomostar"]
    k = int(np.flatnonzero(particles.tomo_names == "Unt_050.tomostar")[3])
    p = particles.particles.loc[k, ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]]
    size = row[["rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"]].to_numpy(float)
    expected = (p.to_numpy(float) - size / 2) * row["rlnTomoTiltSeriesPixelSize"]
    np.testing.assert_allclose(c[k].numpy(), expected, rtol=1e-12)
    without = ParticleSet.from_tables(particles.particles, particles.optics)
    with pytest.raises(InputError, match="legacy rlnCoordinateX/Y/Z need the tomograms"):
        without.centered_coordinates_angst()


def test_rotations_offsets_and_defaults():
    """A_sub and A_part are RELION matrices = scipy intrinsic ZYZ, transposed (conventions
    §4); missing columns give identity rotations, zero offsets and subset 0."""
    angles = np.array([[10.0, 40.0, -70.0], [200.0, 95.0, 33.0]])
    table = pd.DataFrame(
        {
            "rlnTomoName": ["T", "T"],
            "rlnAngleRot": angles[:, 0],
            "rlnAngleTilt": angles[:, 1],
            "rlnAnglePsi": angles[:, 2],
            "rlnOriginXAngst": [1.0, 2.0],
            "rlnRandomSubset": [2, 1],
        }
    )
    particles = ParticleSet.from_tables(table)
    expected = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(particles.particle_matrices().numpy(), expected, atol=1e-12)
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    torch.testing.assert_close(particles.subtomogram_matrices(), eye)
    np.testing.assert_array_equal(particles.origins_angst().numpy(), [[1, 0, 0], [2, 0, 0]])
    np.testing.assert_array_equal(particles.random_subset(), [2, 1])
    plain = ParticleSet.from_tables(pd.DataFrame({"rlnTomoName": ["T"]}))
    torch.testing.assert_close(plain.particle_matrices(), eye[:1])
    np.testing.assert_array_equal(plain.random_subset(), [0])


def test_subset_and_optics_lookup():
    """subset keeps the selected rows in order; optics values follow each particle's
    rlnOpticsGroup (not the row order of data_optics)."""
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [2, 1],
            "rlnVoltage": [200.0, 300.0],
            "rlnTomoTiltSeriesPixelSize": [1.0, 1.5],
            "rlnTomoSubtomogramBinning": [4.0, 2.0],
        }
    )
    table = pd.DataFrame({"rlnTomoName": ["A", "B", "C"], "rlnOpticsGroup": [1, 2, 1]})
    particles = ParticleSet.from_tables(table, optics)
    np.testing.assert_array_equal(particles.voltage_kv(), [300.0, 200.0, 300.0])
    np.testing.assert_array_equal(particles.image_pixel_size(), [3.0, 4.0, 3.0])
    with pytest.raises(InputError, match="different pixel sizes"):
        pixel_size_of(particles)
    picked = particles.subset(np.array([True, False, True]))
    assert picked.particles["rlnTomoName"].tolist() == ["A", "C"]
    assert pixel_size_of(picked) == 3.0
    assert particles.subset([2, 0]).particles["rlnTomoName"].tolist() == ["C", "A"]


def test_optics_built_from_tomograms(warp):
    """A picked particle file without data_optics gets one optics group per
    rlnOpticsGroupName of the tomograms, numbered in order of first use, as RELION does."""
    _, tomos = warp
    picks = pd.DataFrame({"rlnTomoName": ["Unt_076.tomostar", "Unt_083.tomostar"] * 2})
    particles = ParticleSet(picks, tomograms=tomos)
    assert particles.optics["rlnOpticsGroupName"].tolist() == ["opticsGroup3", "opticsGroup1"]
    assert particles.particles["rlnOpticsGroup"].tolist() == [1, 2, 1, 2]
    np.testing.assert_allclose(particles.tilt_series_pixel_size(), 1.667)
    np.testing.assert_allclose(particles.amplitude_contrast(), 0.07)


def test_stack_image_indices_rules():
    """RELION stacks hold only visible tilts; Warp stacks hold all; anything else is None."""
    vis = np.array([1, 0, 1, 1], dtype=bool)
    np.testing.assert_array_equal(stack_image_indices(vis, 3), [0, 1, 2])
    np.testing.assert_array_equal(stack_image_indices(vis, 4), [0, 2, 3])
    assert stack_image_indices(vis, 2) is None


def test_unmodelled_optics_are_named_once(tmp_path, caplog):
    """Beam tilt and anisotropic magnification, which RELION would apply and subtomo does not
    model: one warning per file and column with a non-neutral value; the neutral values
    RELION writes (zeros, the identity) and the aberrations (modelled) are silent."""
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1, 2], "rlnVoltage": [300.0, 300.0],
        "rlnSphericalAberration": [2.7, 2.7], "rlnAmplitudeContrast": [0.07, 0.07],
        "rlnTomoTiltSeriesPixelSize": [2.0, 2.0],
        "rlnEvenZernike": ["[0,0,0,0,0,0,0,0,0]", "[0,0,0,0,0,0,0.3,0,0]"],
        "rlnOddZernike": ["[0,0,0,0,0,0]", "[0,0,0,0,0,0]"],
        "rlnMagMat00": [1.0, 1.0], "rlnMagMat11": [1.0, 1.01],
        "rlnBeamTiltX": [0.0, 0.2],
    })  # fmt: skip
    particles = pd.DataFrame({"rlnTomoName": ["TS_01"], "rlnOpticsGroup": [2]})
    path = tmp_path / "particles.star"
    ParticleSet.from_tables(particles, optics).write(path)
    with caplog.at_level("WARNING", logger="subtomo"):
        ParticleSet.read(path)
        ParticleSet.read(path)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "optics group 2 has rlnBeamTiltX = 0.2 (beam tilt)" in lines[0]
    assert "rlnMagMat11 = 1.01" in lines[1] and "anisotropic magnification" in lines[1]
