"""Benchmark of ``subtomo template-match`` (issue #17): a 20S proteasome in a crowded simulated
tomogram, against the truth.

The tomogram (bin-4 scale directly: 10 Å voxels, 200 x 200 x 64) holds proteasomes (D7, PDB
3J9I, ``proteasome.py``; ~650 kDa, scaled to the ribosome maps' density per mass), 70S and 50S
ribosomes (2.5 and 1.6 MDa) at random non-overlapping positions and orientations, and a carbon
film beyond an edge; 41 tilts ±60° step 3°, dose-symmetric 3 e/Å² per tilt, 3 µm defocus,
Poisson noise at SNR 0.05 per tilt, WBP with CTF phase flipping (``subtomo.simulate.tomograms``).
The job gets the tomograms.star, the proteasome at 5 Å (resampled by the job), D7, a 7° step,
a tomogram mask that leaves out the carbon (and 3 voxels past its edge) and the automatic
cut-off. A pick is a hit when it lies within half a particle radius of a proteasome's centre
(one pick per particle); recall counts the proteasomes outside the carbon (where the mask lets
picks lie) and all of them; the angular error of a hit is its rotation from the truth modulo
D7.
Prints recall, precision, the median angular error, the cut-offs, orientations x voxels per
second of the search and the peak memory (RSS on CPU; allocated CUDA memory on a GPU).

    python benchmarks/template_match.py --work /tmp/bench_tmatch
    python benchmarks/template_match.py --work /tmp/bench_tmatch --device cuda
"""

from __future__ import annotations

import argparse
import math
import re
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from proteasome import proteasome_map
from subtomo.data import ParticleSet, TomogramSet
from subtomo.geometry import (
    euler_to_matrix,
    orientation_grid_by_step,
    rotation_angle_deg,
    symmetry_matrices,
)
from subtomo.io import write_mrc
from subtomo.jobs.template_match import TemplateMatchParams, run
from subtomo.simulate import SimulationParams, Species, demo_species, simulate
from subtomo.simulate.tomograms import CarbonEdge, simulated_tomograms

PX = 10.0
SIZE = (200, 200, 64)
RADIUS_ANGST = 75.0  # the proteasome's radius (150 Å long, 110 Å wide); a hit: within half
KDA = {"proteasome": 650.0, "ribosome70S": 2500.0}


def proteasome_species() -> Species:
    """The proteasome at 10 Å with the 70S map's density per kDa (weak ringing cut)."""
    ribosome = demo_species(["ribosome70S"])[0]
    per_kda = float(ribosome.volume.sum()) * ribosome.voxel_size**3 / KDA["ribosome70S"]
    volume = torch.from_numpy(proteasome_map(PX, 32))
    volume = torch.where(volume > 0.03 * volume.max(), volume, 0.0)
    volume *= per_kda * KDA["proteasome"] / (float(volume.sum()) * PX**3)
    return Species("proteasome", volume, PX)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CARBON = CarbonEdge(angle_deg=20.0, offset_px=70.0)
MASK_MARGIN = 3.0  # px left out before the carbon edge


def outside_carbon(x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
    """Where the tomogram mask lets picks lie: before the carbon edge by ``MASK_MARGIN``
    (decentred voxel coordinates)."""
    theta = math.radians(CARBON.angle_deg)
    along = (x_px - SIZE[0] / 2) * math.cos(theta) + (y_px - SIZE[1] / 2) * math.sin(theta)
    return along < CARBON.offset_px - MASK_MARGIN


def make_project(work: Path, particles: int, snr: float, seed: int) -> pd.DataFrame:
    """Simulate, reconstruct and write tomograms.star, the tomogram, the template (5 Å) and the
    tomogram mask under ``work``; returns the true particles."""
    species = [proteasome_species(), *demo_species(["ribosome70S", "ribosome50S"])]
    params = SimulationParams(
        particles=particles, species_fraction=(0.5, 0.25, 0.25), pixel_size=PX, box=32,
        tomogram_size=SIZE, tilt_step=3.0, dose_per_tilt=3.0, defocus_um=3.0,
        noise="poisson", snr=snr, seed=seed, device="cpu",
    )  # fmt: skip
    sim = simulate(params, species=species)
    name, tomogram = next(simulated_tomograms(sim, carbon=CARBON))
    work.mkdir(parents=True, exist_ok=True)
    write_mrc(work / f"{name}.mrc", tomogram, PX)
    d, h, w = tomogram.shape
    _, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (d, h, w)),
                             indexing="ij")  # fmt: skip
    write_mrc(
        work / f"{name}_mask.mrc",
        torch.from_numpy(outside_carbon(x.numpy(), y.numpy())).float(),
        PX,
    )
    table = sim.global_table.copy()
    table["rlnTomoReconstructedTomogram"] = str(work / f"{name}.mrc")
    table["rlnTomoTomogramBinning"] = 1.0
    TomogramSet.from_tables(table, sim.tilt_tables).write(
        work / "tomograms.star", work / "tilt_series"
    )
    write_mrc(work / "proteasome_5A.mrc", torch.from_numpy(proteasome_map(5.0, 64)), 5.0)
    return sim.particles


def evaluate(truth: pd.DataFrame, picks: pd.DataFrame) -> dict[str, float]:
    """Recall, precision and median angular error (modulo D7) of the proteasome picks."""
    cols = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
    target = truth[truth["subtomoSpecies"] == "proteasome"]
    x, y = (target[c].to_numpy() / PX + n / 2 for c, n in zip(cols[:2], SIZE[:2], strict=True))
    in_mask = outside_carbon(x, y)
    t_pos, p_pos = target[cols].to_numpy(), picks[cols].to_numpy()
    dist = np.linalg.norm(p_pos[:, None] - t_pos[None], axis=2)  # (picks, truth)
    hits, used = [], set()
    for i in np.argsort(-picks["rlnAutopickFigureOfMerit"].to_numpy()):
        j = int(np.argmin(dist[i])) if len(t_pos) else -1
        if j >= 0 and dist[i, j] <= RADIUS_ANGST / 2 and j not in used:
            used.add(j)
            hits.append((i, j))
    angles = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")

    def matrices(df: pd.DataFrame) -> torch.Tensor:
        return euler_to_matrix(*(torch.tensor(df[c].to_numpy()) for c in angles))

    errors = np.array([])
    if hits:
        a_pick = matrices(picks.iloc[[i for i, _ in hits]])
        a_true = matrices(target.iloc[[j for _, j in hits]])
        group = symmetry_matrices("D7").double()
        errors = rotation_angle_deg(a_pick[:, None], a_true[:, None] @ group).amin(1).numpy()
    position = [dist[i, j] for i, j in hits]
    return {
        "proteasomes": len(t_pos),
        "picks": len(p_pos),
        "proteasomes outside the carbon (the tomogram mask)": int(in_mask.sum()),
        "recall outside the carbon": sum(in_mask[j] for _, j in hits) / max(1, in_mask.sum()),
        "recall of all": len(hits) / max(1, len(t_pos)),
        "precision": len(hits) / max(1, len(p_pos)),
        "median angular error (deg)": float(np.median(errors)) if len(errors) else math.nan,
        "median position error (Å)": float(np.median(position)) if position else math.nan,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_tmatch"))
    ap.add_argument("--particles", type=int, default=48)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--step", type=float, default=7.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    truth = make_project(args.work, args.particles, args.snr, args.seed)
    print(f"simulated and reconstructed in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    run(TemplateMatchParams(
        i=str(args.work / "tomograms.star"), template=str(args.work / "proteasome_5A.mrc"),
        sym="D7", angular_step=args.step, tomogram_mask=str(args.work / "{name}_mask.mrc"),
        batch=args.batch, device=args.device, output_dir=str(args.work / "job"),
        project_dir=str(args.work),
    ))  # fmt: skip
    wall = time.perf_counter() - t0
    picks = ParticleSet.read(args.work / "job" / "particles.star").particles
    report = (args.work / "job" / "report.html").read_text()
    for key, value in evaluate(truth, picks).items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    voxels = math.prod(SIZE)
    n_orientations = len(orientation_grid_by_step(args.step, "D7")[0])
    cells = re.findall(r"<td>([^<]*)</td>", report)
    cut = next((c for c in cells if c.count(" / ") == 2), "?")
    print(f"cut-offs (Gaussian search space / fitted tail / used): {cut}")
    print(
        f"{n_orientations} orientations x {voxels / 1e6:.2f} M voxels in {wall:.0f} s (job wall, "
        f"I/O and peaks included): {n_orientations * voxels / wall:.3g} orientations x voxels "
        f"/ s on {device}; peak memory {peak_memory_mib(device):.0f} MiB"
    )


if __name__ == "__main__":
    main()
