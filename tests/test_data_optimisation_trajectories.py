"""OptimisationSet (the real WarpTools file and round trips) and Trajectories (motion.star)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.data import OptimisationSet, ParticleSet, TomogramSet, Trajectories
from subtomo.errors import InputError

WARP = "real/warptools_ribosome_subtilts/warptools_test_4-tomos_10-ptcls_box-32_angpix-12"


def test_real_warp_optimisation_set(shared_data):
    """WarpTools names its files relative to the optimisation set's own folder, not the
    working directory: they must still resolve and load."""
    opt = OptimisationSet.read(shared_data / f"{WARP}_optimisation_set.star")
    assert opt.particles.is_file() and opt.tomograms.is_file()
    assert opt.trajectories is None and opt.reference_map1 is None
    tomos = TomogramSet.read(opt.tomograms)
    assert len(ParticleSet.read(opt.particles, tomos)) == 40


def test_optimisation_set_round_trip(tmp_path, monkeypatch):
    """RELION-style project-relative paths resolve against the working directory first and
    come back unchanged after write -> read; unknown keys are kept."""
    monkeypatch.chdir(tmp_path)
    for name in ("Refine3D/job010/run_data.star", "Import/job001/tomograms.star"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text("data_\n")
    opt = OptimisationSet(
        particles=Path("Refine3D/job010/run_data.star"),
        tomograms=Path("Import/job001/tomograms.star"),
        reference_fsc=Path("PostProcess/job012/postprocess.star"),
        extra={"rlnSomethingNew": "x"},
    )
    opt.write("Refine3D/job010/run_optimisation_set.star")
    back = OptimisationSet.read("Refine3D/job010/run_optimisation_set.star")
    assert back.particles == opt.particles and back.tomograms == opt.tomograms
    assert back.reference_fsc == opt.reference_fsc  # absent file: kept as written
    assert back.extra == {"rlnSomethingNew": "x"}
    assert back.manifolds is None


def test_optimisation_set_needs_key_value_block(tmp_path):
    (tmp_path / "o.star").write_text("data_\n\nloop_\n_rlnTomoParticlesFile\na.star\nb.star\n")
    with pytest.raises(InputError, match="expected a key-value block"):
        OptimisationSet.read(tmp_path / "o.star")


def test_trajectories_round_trip_and_lookup(tmp_path):
    """motion.star: one table per particle (names with '/'), rows = tilts. Unknown
    particles get zero displacement; the values are the written ones, in tilt order."""
    disp = torch.arange(2 * 3 * 3, dtype=torch.float64).reshape(2, 3, 3) / 7
    traj = Trajectories.from_displacements(["TS_01/1", "TS_01/7"], disp)
    traj.write(tmp_path / "motion.star")
    back = Trajectories.read(tmp_path / "motion.star")
    assert back.particle_number == 2 and list(back.tables) == ["TS_01/1", "TS_01/7"]
    for name in traj.tables:
        pd.testing.assert_frame_equal(back.tables[name], traj.tables[name])
    got = back.displacements_angst(["TS_01/7", "TS_01/3", "TS_01/1"], 3)
    torch.testing.assert_close(got, torch.stack([disp[1], torch.zeros(3, 3), disp[0]]))


def test_trajectory_length_mismatch(tmp_path):
    """A table whose row count differs from the number of tilts is an error (as RELION)."""
    Trajectories.from_displacements(["TS_01/1"], np.zeros((1, 5, 3))).write(tmp_path / "m.star")
    with pytest.raises(InputError, match=r"m\.star, block data_TS_01/1: 5 rows, expected 4"):
        Trajectories.read(tmp_path / "m.star").displacements_angst(["TS_01/1"], 4)
