"""Strong scaling of ``subtomo reconstruct`` and ``subtomo refine3d`` over torch.distributed
ranks (issue #20).

Simulates two data sets once (reused from ``--workdir``): for refine3d ``--particles``
extracted as 2D stacks with a reconstructed reference; for reconstruct ``--rec-particles``
(default 1200, in tomograms of 512 x 512 x 96 px holding 240 each) reconstructed from the
tilt series at ``--rec-box`` (default 128; cutting, CTF and insertion: the job's whole
work, about a minute of single-core work, so that the ranks' start-up of a few seconds
does not hide the scaling). Then runs each job with 1 process on 1 core
(``OMP_NUM_THREADS=1``) and with ``torchrun --nproc_per_node N`` (each rank on cores / N
threads), as a user runs them, start-up included, ``--repeats`` times back to back. Prints
per repeat the wall seconds, the speed-up ``t1 / tN`` and the parallel efficiency
``t1 / (N tN)`` (and the same from the jobs' own times in run.out, start-up excluded), the
CPU seconds of the one process and of all ranks with their launcher (their ratio falls
below 100% by the work the ranks repeat: start-up and torch imports, whatever each rank
prepares; it does not depend on other load the way wall times do), plus one process on all
cores for reference, and checks that the N-rank map equals the one-process map (relative
max difference). Prints the load average before and after (a shared machine's other work
slows the ranks unevenly).

    python benchmarks/scaling.py --workdir /tmp/bench_scaling --ranks 2 --repeats 3
    python benchmarks/scaling.py --jobs reconstruct --rec-particles 2400 --repeats 2

Measured (quiet 2 cores, reconstruct, 2 ranks): 1200 particles median 77% (81/77/73%);
2400 particles 72/91/94/85%, median 88% (the one-core run varied 58.6-78.1 s between
repeats: the machine's speed, not the job's).
    python benchmarks/scaling.py --workdir /tmp/bench_scaling --ranks 4 --device cuda
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from subtomo.io import read_mrc


def _run(args: list[str], cwd: Path, threads: int | None, ranks: int = 1) -> tuple[float, float]:
    """Wall and CPU seconds (all processes) of one command line."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    prefix = [sys.executable, "-m", "subtomo.cli"]
    if ranks > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", str(ranks), "-m", "subtomo.cli"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([*prefix, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _simulate(out: Path, particles: int, box: int, width: int = 256) -> None:
    """``particles`` in tomograms of ``width`` x ``width`` x 96 px holding at most
    ``60 (width / 256)^2`` each (the layout places about 73 per 256^2 at box 48)."""
    per_tomogram = 60 * (width // 256) ** 2
    subprocess.run([sys.executable, "-m", "subtomo.cli", "simulate", "--out", str(out),
                    "--particles", str(particles), "--box", str(box), "--tilt-step", "3",
                    "--tomogram-size", f"{width},{width},96", "--noise", "gaussian",
                    "--snr", "0.05", "--pose-error-deg", "6", "--shift-error-px", "1.5",
                    "--tomograms", str(max(4, -(-particles // per_tomogram))), "--seed", "1"],
                   check=True, capture_output=True)  # fmt: skip


def _reconstruct_data(particles: int) -> str:
    """The reconstruct data set's folder (one per particle count)."""
    return f"reconstruct_data_{particles}"


def _prepare(work: Path, particles: int, rec_particles: int, box: int, jobs: list[str]) -> None:
    """The data sets of ``jobs`` not yet in ``work``."""
    data = work / _reconstruct_data(rec_particles)
    if "reconstruct" in jobs and not (data / "particles.star").is_file():
        _simulate(data, rec_particles, box, width=512)
    if "refine3d" not in jobs or (work / "rec" / "merged.mrc").is_file():
        return
    _simulate(work, particles, box)
    for step in (["extract", "--p", "particles_picked.star", "--t", "tomograms.star",
                  "--box", str(box), "--float32", "--o", "ext"],
                 ["reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec"]):  # fmt: skip
        subprocess.run([sys.executable, "-m", "subtomo.cli", *step], cwd=work, check=True,
                       capture_output=True)  # fmt: skip


def _job_seconds(job: Path) -> float:
    """The job's own time from its ``run.out`` (``# finished in X s``: no start-up)."""
    found = re.findall(r"# finished in ([0-9.]+) s", (job / "run.out").read_text())
    return float(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_scaling"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--particles", type=int, default=150)
    parser.add_argument("--rec-particles", type=int, default=1200)
    parser.add_argument("--rec-box", type=int, default=128, help="reconstruct's box (px)")
    parser.add_argument("--repeats", type=int, default=1, help="back-to-back runs of each")
    parser.add_argument("--jobs", nargs="+", default=["reconstruct", "refine3d"])
    parser.add_argument("--box", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    _prepare(work, args.particles, args.rec_particles, args.box, args.jobs)
    cores = os.cpu_count() or 1
    rec_data = _reconstruct_data(args.rec_particles)
    jobs = {
        "reconstruct": (["reconstruct", "--p", f"{rec_data}/particles.star",
                         "--t", f"{rec_data}/tomograms.star", "--from", "tilt_series",
                         "--box", str(args.rec_box), "--device", args.device], "merged.mrc"),
        "refine3d": (["refine3d", "--ios", "ext/optimisation_set.star", "--ref",
                      "rec/merged.mrc", "--ini_high", "40", "--healpix_order", "3",
                      "--sigma_ang", "3", "--offset_range", "2", "--offset_step", "1",
                      "--iter", "3", "--device", args.device, "--random_seed", "1"],
                     "run_class001.mrc"),
    }  # fmt: skip
    print(f"reconstruct {args.rec_particles}, refine3d {args.particles} particles x 41 tilts, "
          f"box {args.box}, {cores} cores, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("job          1 rank/1 core  1 rank/all   N ranks   speed-up  efficiency  max diff"
          "   in-job 1/N (s), efficiency   CPU s 1/N, CPU 1/N")  # fmt: skip
    for name in args.jobs:
        cmd, out = jobs[name]
        efficiency = []
        for _ in range(args.repeats):
            times, cpu = {}, {}
            for tag, threads, ranks in (("one", 1, 1), ("n", None, args.ranks), ("all", None, 1)):
                times[tag], cpu[tag] = _run([*cmd, "--o", f"{name}_{tag}"], work, threads, ranks)
            inside = {tag: _job_seconds(work / f"{name}_{tag}") for tag in times}
            a, _ = read_mrc(work / f"{name}_one" / out)
            b, _ = read_mrc(work / f"{name}_n" / out)
            diff = float((a - b).abs().max() / a.abs().max())
            speed = times["one"] / times["n"]
            efficiency.append(speed / args.ranks)
            print(f"{name:12s} {times['one']:10.1f} s {times['all']:9.1f} s {times['n']:8.1f} s "
                  f"{speed:9.2f} {speed / args.ranks:10.0%}  {diff:8.1e}   "
                  f"{inside['one']:.1f}/{inside['n']:.1f}, "
                  f"{inside['one'] / inside['n'] / args.ranks:.0%}   "
                  f"{cpu['one']:.0f}/{cpu['n']:.0f}, {cpu['one'] / cpu['n']:.0%}",
                  flush=True)  # fmt: skip
        if args.repeats > 1:
            print(f"{name:12s} median efficiency {float(np.median(efficiency)):.0%}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
