"""Strong scaling of ``subtomo reconstruct`` and ``subtomo refine3d`` over torch.distributed
ranks (issue #20).

Simulates a data set once (reused from ``--workdir``), extracts 2D stacks and reconstructs a
reference, then runs each job with 1 process on 1 core (``OMP_NUM_THREADS=1``) and with
``torchrun --nproc_per_node N`` (each rank on cores / N threads), as a user runs them, start-up
included. Prints wall seconds, the speed-up ``t1 / tN`` and the parallel efficiency
``t1 / (N tN)``, plus one process on all cores for reference, and checks that the N-rank map
equals the one-process map (relative max difference).

    python benchmarks/scaling.py --workdir /tmp/bench_scaling --ranks 2
    python benchmarks/scaling.py --workdir /tmp/bench_scaling --ranks 4 --device cuda
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from subtomo.io import read_mrc


def _run(args: list[str], cwd: Path, threads: int | None, ranks: int = 1) -> float:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    prefix = [sys.executable, "-m", "subtomo.cli"]
    if ranks > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", str(ranks), "-m", "subtomo.cli"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([*prefix, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return time.perf_counter() - start


def _prepare(work: Path, particles: int, box: int) -> None:
    if (work / "rec" / "merged.mrc").is_file():
        return
    subprocess.run([sys.executable, "-m", "subtomo.cli", "simulate", "--out", str(work),
                    "--particles", str(particles), "--box", str(box), "--tilt-step", "3",
                    "--noise", "gaussian", "--snr", "0.05", "--pose-error-deg", "6",
                    "--shift-error-px", "1.5", "--tomograms", "4", "--seed", "1"],
                   check=True, capture_output=True)  # fmt: skip
    for step in (["extract", "--p", "particles_picked.star", "--t", "tomograms.star",
                  "--box", str(box), "--float32", "--o", "ext"],
                 ["reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec"]):  # fmt: skip
        subprocess.run([sys.executable, "-m", "subtomo.cli", *step], cwd=work, check=True,
                       capture_output=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_scaling"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--particles", type=int, default=200)
    parser.add_argument("--box", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    _prepare(work, args.particles, args.box)
    cores = os.cpu_count() or 1
    jobs = {
        "reconstruct": (["reconstruct", "--ios", "ext/optimisation_set.star",
                         "--device", args.device], "merged.mrc"),
        "refine3d": (["refine3d", "--ios", "ext/optimisation_set.star", "--ref",
                      "rec/merged.mrc", "--ini_high", "40", "--healpix_order", "3",
                      "--sigma_ang", "3", "--offset_range", "2", "--offset_step", "1",
                      "--iter", "3", "--device", args.device, "--random_seed", "1"],
                     "run_class001.mrc"),
    }  # fmt: skip
    print(f"{args.particles} particles x 41 tilts, box {args.box}, {cores} cores, "
          f"device {args.device}")  # fmt: skip
    print("job          1 rank/1 core  1 rank/all   N ranks   speed-up  efficiency  max diff")
    for name, (cmd, out) in jobs.items():
        times = {}
        for tag, threads, ranks in (("one", 1, 1), ("all", None, 1), ("n", None, args.ranks)):
            times[tag] = _run([*cmd, "--o", f"{name}_{tag}"], work, threads, ranks)
        a, _ = read_mrc(work / f"{name}_one" / out)
        b, _ = read_mrc(work / f"{name}_n" / out)
        diff = float((a - b).abs().max() / a.abs().max())
        speed = times["one"] / times["n"]
        print(f"{name:12s} {times['one']:10.1f} s {times['all']:9.1f} s {times['n']:8.1f} s "
              f"{speed:9.2f} {speed / args.ranks:10.0%}  {diff:8.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
