"""Wall time and peak memory of ``subtomo simulate`` (default: the demo preset, < 2 min target).

Runs the whole job (layout, rendering, noise, writing every file) into a temporary project
directory and prints the wall time, the rendered patches (particle x tilt images) per
second and the peak memory (RSS on CPU, allocated CUDA memory on a GPU).

    python benchmarks/simulate.py --preset demo --device cpu
    python benchmarks/simulate.py --preset benchmark --out /tmp/sim_benchmark
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from subtomo.jobs.simulate import SimulateJob, run
from subtomo.simulate import SimulationParams, resolve_device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=["tiny", "demo", "benchmark"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=None, help="patches rendered at once")
    parser.add_argument("--out", default=None, help="project directory (default: temporary)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    params = SimulationParams.from_preset(args.preset, device=args.device, batch_size=args.batch)
    device = resolve_device(params.device)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "project"
        start = time.perf_counter()
        run(SimulateJob(out=out, simulation=params))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start

    n_tilts = int(2 * (params.tilt_range // params.tilt_step) + 1)
    patches = params.particles * n_tilts
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(
        f"preset {args.preset}: {params.particles} particles x {n_tilts} tilts in "
        f"{params.tomograms} tomograms, box {params.box}, {params.pixel_size:g} Å/px, "
        f"device {device}, {torch.get_num_threads()} threads"
    )
    print(f"wall time {elapsed:.1f} s, {patches / elapsed:.0f} particle images/s")
    print(f"peak RSS {rss_mb:.0f} MB", end="")
    if device.type == "cuda":
        print(f", peak CUDA {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB", end="")
    print()
    if args.preset == "demo" and elapsed > 120:
        print("WARNING: the demo preset took longer than 2 minutes", file=sys.stderr)


if __name__ == "__main__":
    main()
