"""Benchmark and quality bars of ``subtomo class3d`` (issue #5).

Speed (default): simulate a project (box 64, 41 tilts, ``--particles``, picked poses 8 deg /
2 px off), extract 2D stacks, run K=1 local searches (HEALPix order 3, sigma 3 deg, offsets
2 px) and print seconds per iteration, coarse-pass E-step pose evaluations per second
(particles x rotations x translations x classes / seconds; the oversampled second pass is not
counted) and the peak RSS of the classification (simulation and extraction run in
subprocesses). ``--relion-bin relion_refine`` runs RELION on the same data and cores.

Quality (``--bars``): median angular error after local refinement from poses 8 deg / 2 px
off (bar: < 2 deg, full rotation matrices), K=2 separation of a 50/50 70S/50S mixture with
true poses (bar: >= 95%) and K=4 purity (bar: no class > 5% of the other species).

Usage: ``python benchmarks/class3d.py --workdir /tmp/c3d [--particles 1000] [--iter 2]
[--bars] [--relion-bin PATH] [--threads N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from subtomo.data import ParticleSet
from subtomo.geometry import euler_to_matrix, rotation_angle_deg
from subtomo.io import read_mrc, write_mrc
from subtomo.jobs.class3d import Class3DParams, _sampling, _search_size, run

DEMO = Path(__file__).resolve().parents[1] / "src" / "subtomo" / "demo_data"


def _sh(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(args, check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def project(root: Path, particles: int, box: int, px: float, maps: list[str], **extra) -> Path:
    """Simulate (if not there) and extract 2D stacks; returns the project directory."""
    if not (root / "ext" / "optimisation_set.star").is_file():
        args = ["subtomo", "simulate", "--out", str(root), "--preset", "benchmark", "--particles",
                str(particles), "--box", str(box), "--pixel-size", str(px)]  # fmt: skip
        for m in maps:
            args += ["--map", str(DEMO / f"{m}_4v4r_5A.mrc.gz")]
        for k, v in extra.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        _sh(*args)
        _sh("subtomo", "extract", "--particles", "particles_picked.star", "--tomograms",
            "tomograms.star", "--b", str(box), "--o", "ext", "--device", "cpu",
            cwd=root)  # fmt: skip
    return root


def _iteration_seconds(run_out: Path) -> list[float]:
    return [float(s) for s in re.findall(r"iteration \d+ \(([\d.]+) s\)", run_out.read_text())]


def speed(args) -> None:
    root = project(args.workdir / "speed", args.particles, 64, 10.0, ["ribosome70S"],
                   pose_error_deg=8, shift_error_px=2)  # fmt: skip
    with contextlib.chdir(root):
        params = Class3DParams(
            ios="ext/optimisation_set.star", ref=("truth.mrc",), ini_high=40.0, iter=args.iter,
            healpix_order=3, sigma_ang=3.0, offset_range=2, offset_step=1,
            particle_diameter=300.0, device=args.device, output_dir="subtomo",
        )  # fmt: skip
        start = time.perf_counter()
        run(params)
        total = time.perf_counter() - start
        per_iter = _iteration_seconds(Path("subtomo/run.out"))
        n_rot, n_trans = _search_size(_sampling(params, 10.0))
        n = len(ParticleSet.read("ext/particles.star"))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"subtomo: {n} particles x 41 tilts, box 64, local search {n_rot} rotations x "
              f"{n_trans} translations")  # fmt: skip
        print(f"  seconds per iteration: {', '.join(f'{s:.1f}' for s in per_iter)} "
              f"(job total {total:.1f} s)")  # fmt: skip
        print(f"  coarse E-step pose evaluations per second: "
              f"{n * n_rot * n_trans / np.mean(per_iter):.3g}")  # fmt: skip
        print(f"  peak RSS: {rss:.2f} GiB")
        if args.relion_bin:
            relion(args, root)


def relion(args, root: Path) -> None:
    """relion_refine (CPU) on the same data: K=1 classification, local searches."""
    Path("relion").mkdir(exist_ok=True)
    cmd = [
        args.relion_bin, "--ios", "ext/optimisation_set.star", "--ref", "truth.mrc",
        "--firstiter_cc", "--ini_high", "40", "--K", "1", "--iter", str(args.iter),
        "--tau2_fudge", "1", "--particle_diameter", "300", "--healpix_order", "3",
        "--sigma_ang", "3", "--offset_range", "2", "--offset_step", "1", "--sym", "C1",
        "--pad", "2", "--flatten_solvent", "--zero_mask", "--norm", "--scale",
        "--dont_combine_weights_via_disc", "--pool", "10", "--j", str(args.threads),
        "--cpu", "--o", "relion/run",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=root, stdout=subprocess.DEVNULL)
    print(f"RELION: {(time.perf_counter() - start) / args.iter:.1f} s per iteration (incl. setup)")


def bars(args) -> None:
    # alignment: K=1 local searches from poses 8 deg / 2 px off
    root = project(args.workdir / "align", args.particles, 64, 10.0, ["ribosome70S"],
                   pose_error_deg=8, shift_error_px=2)  # fmt: skip
    with contextlib.chdir(root):
        run(Class3DParams(
            ios="ext/optimisation_set.star", ref=("truth.mrc",), ini_high=40.0,
            iter=args.iter, healpix_order=4, sigma_ang=3.0, offset_range=3, offset_step=1,
            particle_diameter=300.0, device=args.device, output_dir="aligned",
        ))  # fmt: skip
        truth = ParticleSet.read("particles.star").particle_matrices()
        start = ParticleSet.read("particles_picked.star").particle_matrices()
        last = sorted(Path("aligned").glob("run_it*_data.star"))[-1]
        d = starfile.read(last)["particles"]
        est = euler_to_matrix(
            *(torch.tensor(d[f"rlnAngle{a}"].to_numpy()) for a in ("Rot", "Tilt", "Psi"))
        )
        before = float(rotation_angle_deg(start, truth).median())
        after = float(rotation_angle_deg(est, truth).median())
        print(f"alignment: median angular error {before:.2f} -> {after:.2f} deg (bar < 2)")
    # classification without alignment: 50/50 70S/50S, true poses
    root = project(args.workdir / "mix", args.particles, 32, 20.0,
                   ["ribosome70S", "ribosome50S"], tomogram_size="512,512,96")  # fmt: skip
    with contextlib.chdir(root):
        if not Path("mix.mrc").is_file():
            a, px = read_mrc("truth_ribosome70S_4v4r_5A.mrc")
            b, _ = read_mrc("truth_ribosome50S_4v4r_5A.mrc")
            write_mrc("mix.mrc", 0.5 * (a + b), px)
        # the stacks are of the true poses: particles.star, not the picked ones
        for k in (2, 4):
            out = f"K{k}"
            run(Class3DParams(
                particles="ext/particles.star", tomograms="tomograms.star", ref=("mix.mrc",),
                K=k, iter=25, skip_align=True, strict_highres_exp=60.0,
                particle_diameter=0.8 * 32 * 20.0, device=args.device, output_dir=out,
            ))  # fmt: skip
            d = starfile.read(f"{out}/run_it025_data.star")["particles"]
            table = pd.crosstab(d["rlnClassNumber"], d["subtomoSpecies"])
            print(f"K={k}:\n{table}")
            if k == 2:
                agree = float(np.mean(table.max(axis=1).sum() / len(d)))
                print(f"  K=2 separation {100 * agree:.1f}% (bar >= 95%)")
            else:
                minority = (table.min(axis=1) / table.sum(axis=1)).max()
                print(f"  K=4 worst class impurity {100 * minority:.1f}% (bar <= 5%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/subtomo_class3d_bench"))
    p.add_argument("--particles", type=int, default=1000)
    p.add_argument("--iter", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--relion-bin", default=None)
    p.add_argument("--bars", action="store_true", help="measure the quality bars instead")
    args = p.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    (bars if args.bars else speed)(args)


if __name__ == "__main__":
    sys.exit(main())
