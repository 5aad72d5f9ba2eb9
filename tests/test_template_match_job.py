"""``subtomo template-match`` on a small crowded simulated tomogram (two species, noise, CTF,
a carbon edge masked out) against the truth, and its bad-input errors; the simulator's
several-species layout and carbon edge."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.data import ParticleSet, TomogramSet
from subtomo.errors import InputError
from subtomo.geometry import (
    euler_to_matrix,
    projection_matrices,
    rotation_angle_deg,
    symmetry_matrices,
)
from subtomo.io import read_mrc, write_mrc
from subtomo.jobs.template_match import TemplateMatchParams, run
from subtomo.simulate import SimulationParams, Species, simulate
from subtomo.simulate.layout import random_layout
from subtomo.simulate.tomograms import CarbonEdge, carbon_edge_images, simulated_tomograms

PX = 10.0
SIZE = (112, 112, 40)


def blobs(points: list[tuple[float, float, float]], n: int = 24, sigma: float = 1.4):
    """``(n, n, n)`` sum of Gaussian blobs at xyz voxel offsets from ``n//2``."""
    axis = torch.arange(n, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    out = torch.zeros(n, n, n)
    for cx, cy, cz in points:
        out += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return out


def target_map(n: int = 24) -> torch.Tensor:
    """A chiral C4 complex ~120 Å across: four twisted blades (each bending one way as it
    rises) around a hub, symmetric about z as RELION's C4."""
    points = [(0.0, 0.0, -2.0), (0.0, 0.0, 0.0)]
    for k in range(4):
        for r in (2.0, 3.5, 5.0, 6.0):
            phi = math.pi / 2 * k + 0.12 * r
            points.append((r * math.cos(phi), r * math.sin(phi), 0.6 * r - 1.5))
    return blobs(points, n)


def decoy_map(n: int = 24) -> torch.Tensor:
    """Another complex of about the same size: a hollow shell (ferritin-like)."""
    g = (1 + 5**0.5) / 2
    ico = [(0, s1, s2 * g) for s1 in (-1, 1) for s2 in (-1, 1)]
    ico = [p for v in ico for p in (v, (v[1], v[2], v[0]), (v[2], v[0], v[1]))]
    scale = 6.0 / math.hypot(1, g)
    return blobs([(scale * x, scale * y, scale * z) for x, y, z in ico], n, sigma=1.8)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """tomograms.star, the tomogram, a carbon mask and the template (at 5 Å) of one crowded
    simulated tomogram: 7 targets, 5 decoys, 31 tilts ±60°, SNR 0.1, carbon beyond an edge."""
    work = tmp_path_factory.mktemp("tmatch")
    species = [Species("target", target_map(), PX), Species("decoy", decoy_map(), PX)]
    params = SimulationParams(
        particles=12, species_fraction=(7, 5), pixel_size=PX, box=24, tomogram_size=SIZE,
        tilt_step=4.0, noise="gaussian", snr=0.1, seed=3, device="cpu",
    )  # fmt: skip
    sim = simulate(params, species=species)
    carbon = CarbonEdge(angle_deg=0.0, offset_px=36.0, thickness_px=12.0)
    _, tomogram = next(simulated_tomograms(sim, carbon=carbon))
    write_mrc(work / "tomo.mrc", tomogram, PX)
    x = torch.arange(SIZE[0], dtype=torch.float32) - SIZE[0] / 2
    write_mrc(
        work / "mask.mrc", (x < carbon.offset_px - 3).float().expand(SIZE[2], SIZE[1], -1), PX
    )
    table = sim.global_table.copy()
    table["rlnTomoReconstructedTomogram"] = str(work / "tomo.mrc")
    table["rlnTomoTomogramBinning"] = 1.0
    TomogramSet.from_tables(table, sim.tilt_tables).write(work / "tomograms.star", work / "ts")
    fine = torch.nn.functional.interpolate(target_map()[None, None], scale_factor=2.0,
                                           mode="trilinear", align_corners=False)[0, 0]  # fmt: skip
    write_mrc(work / "template_5A.mrc", fine, PX / 2)
    return work, sim.particles


def test_template_match_finds_the_targets_with_their_angles(project) -> None:
    work, truth = project
    out = run(TemplateMatchParams(
        i=str(work / "tomograms.star"), template=str(work / "template_5A.mrc"),
        angular_step=30.0, sym="C4", tomogram_mask=str(work / "mask.mrc"),
        output_dir=str(work / "job"), project_dir=str(work), device="cpu",
    ))  # fmt: skip
    assert any(p.endswith("particles.star") for p in out)
    picks = ParticleSet.read(work / "job" / "particles.star").particles
    cols = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
    targets = truth[(truth["subtomoSpecies"] == "target") & (truth[cols[0]] < 33 * PX)]
    dist = np.linalg.norm(picks[cols].to_numpy()[:, None] - targets[cols].to_numpy()[None], axis=2)
    hit = dist.min(axis=1) < 30.0  # half the particle radius
    assert hit.mean() >= 0.9, f"precision {hit.mean():.2f}"
    assert (dist.min(axis=0) < 30.0).mean() >= 0.9, "recall"
    angles = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    matched = targets.iloc[dist.argmin(axis=1)[hit]]
    found = euler_to_matrix(*(torch.tensor(picks[hit][c].to_numpy()) for c in angles))
    true = euler_to_matrix(*(torch.tensor(matched[c].to_numpy()) for c in angles))
    errors = rotation_angle_deg(found[:, None], true[:, None] @ symmetry_matrices("C4").double())
    assert float(errors.amin(1).median()) < 20.0  # a 30° grid
    assert (work / "job" / "tmatch" / "TS_01_scores.mrc").exists()
    assert (work / "job" / "TS_01_peak_scores.png").exists()
    assert "resampled to 24 at 10 Å" in (work / "job" / "report.html").read_text()
    rot, _ = read_mrc(work / "job" / "tmatch" / "TS_01_rot.mrc")
    assert rot.shape == (SIZE[2], SIZE[1], SIZE[0])


def test_bad_input_is_one_line_and_leaves_no_job(project, tmp_path) -> None:
    work, _ = project
    common = dict(
        i=str(work / "tomograms.star"), output_dir=str(tmp_path / "job"), project_dir=str(tmp_path)
    )
    big = tmp_path / "big.mrc"
    write_mrc(big, target_map(160), PX)
    with pytest.raises(InputError, match="larger than the tomogram"):
        run(TemplateMatchParams(template=str(big), **common))
    empty = tmp_path / "empty.mrc"
    write_mrc(empty, torch.zeros(48, 48, 48), PX / 2)
    with pytest.raises(InputError, match="mask is empty"):
        run(TemplateMatchParams(template=str(work / "template_5A.mrc"), mask=str(empty), **common))
    blank = tmp_path / "blank.mrc"
    write_mrc(blank, torch.zeros(SIZE[::-1]), PX)
    with pytest.raises(InputError, match="tomogram mask is empty"):
        run(TemplateMatchParams(
            template=str(work / "template_5A.mrc"), tomogram_mask=str(blank), **common
        ))  # fmt: skip
    table = TomogramSet.read(work / "tomograms.star")
    bare = table.global_table.drop(columns=["rlnTomoReconstructedTomogram"])
    TomogramSet.from_tables(bare, {s.name: s.tilts for s in table}).write(
        tmp_path / "bare.star", tmp_path / "ts"
    )
    with pytest.raises(InputError, match="reconstruct-tomograms"):
        run(TemplateMatchParams(
            template=str(work / "template_5A.mrc"), i=str(tmp_path / "bare.star"),
            output_dir=str(tmp_path / "job"), project_dir=str(tmp_path),
        ))  # fmt: skip
    assert not (tmp_path / "job").exists()


def test_layout_keeps_each_pair_the_sum_of_their_radii_apart() -> None:
    rng = np.random.default_rng(0)
    radii = np.array([4.0, 10.0] * 10)
    lay = random_layout(rng, 20, (100, 100, 40), radii, lambda p: np.ones(len(p), bool))
    d = np.linalg.norm(lay.positions_px[:, None] - lay.positions_px[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert np.all(d >= radii[:, None] + radii[None] - 1e-9)
    assert np.any(d < 2 * radii.max())  # small ones closer than two large radii


def test_carbon_edge_path_lengths() -> None:
    """Untilted: the film's thickness beyond the edge, nothing before it; tilted by 60° about
    y: the ray's length through the slab, 1/cos 60° = 2x."""
    t = torch.tensor([0.0, 60.0], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    p = projection_matrices(zero, t, zero, zero, zero, 1.0, (64, 64, 32), (64, 64))
    film = carbon_edge_images(CarbonEdge(angle_deg=90.0, offset_px=10.0, thickness_px=8.0),
                              p, (64, 64, 32), (64, 64))  # fmt: skip
    assert float(film[0, 50, 32]) == pytest.approx(8.0)  # y = 50 > 32 + 10
    assert float(film[0, 30, 32]) == 0.0
    assert float(film[1, 50, 32]) == pytest.approx(16.0)
