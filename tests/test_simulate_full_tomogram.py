"""``subtomo simulate --full-tomogram``: the crowded simulation's tomograms written beside the
tilt series, named in tomograms.star, with the particles where the truth says."""

from __future__ import annotations

import numpy as np

from conftest import run_subtomo
from subtomo.data import ParticleSet, TomogramSet
from subtomo.io import read_mrc


def test_full_tomogram_has_the_particles_at_the_truth(tmp_path) -> None:
    run_subtomo(["simulate", "--out", "p", "--tomograms", "1", "--particles", "8",
                 "--tilt-step", "10", "--snr", "1", "--seed", "3", "--full-tomogram"])  # fmt: skip
    series = next(iter(TomogramSet.read("p/tomograms.star")))
    assert float(series.row["rlnTomoTomogramBinning"]) == 1.0
    volume, voxel = read_mrc(f"p/{series.row['rlnTomoReconstructedTomogram']}")
    w, h, d = series.tomogram_size
    assert tuple(volume.shape) == (d, h, w) and voxel == series.pixel_size
    truth = ParticleSet.read("p/particles.star").particles
    centred = truth[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy()
    at = np.round(centred / voxel + np.array([w, h, d]) / 2).astype(int)  # §1.3, voxel xyz
    rng = np.random.default_rng(0)
    elsewhere = np.stack([rng.integers(8, s - 8, 200) for s in (w, h, d)], axis=1)
    tomo = volume.numpy()

    def local_mean(xyz: np.ndarray) -> np.ndarray:
        return np.array([tomo[z - 3 : z + 4, y - 3 : y + 4, x - 3 : x + 4].mean()
                         for x, y, z in xyz])  # fmt: skip

    background = local_mean(elsewhere)
    particles = local_mean(at)
    # the particles' density stands out from the background by many standard deviations
    # (a tomogram at the wrong place or mirrored would not)
    score = np.abs(particles - np.median(background)) / background.std()
    assert np.median(score) > 3, score
