"""Throughput and memory of tomogram reconstruction (``subtomo reconstruct-tomograms``, issue #16).

A 1k x 1k x 41 tilt series (-60..60°, tilt axis 84°, shifts of a few pixels; the image content
does not change the cost) is reconstructed into a ``W x H x D`` bin-1 tomogram at each
``--bin``: WBP (ramp), WBP with CTF phase flipping in depth strips (4 µm underfocus at
1.35 Å/px), with ``--ctf-3d`` at every voxel depth, and ``--sirt`` SIRT iterations. Prints
wall and CPU seconds, output voxels/s, voxel-tilt samples/s, the number of depth strips and
the peak memory (RSS on CPU; allocated CUDA memory on a GPU). The tilt images are binned
(Fourier crop) inside the timing.

    python benchmarks/tomograms.py                          # bin 4, 1024 x 1024 x 512
    python benchmarks/tomograms.py --bin 1 --thickness 64   # bin 1 on a 64-slice slab
    python benchmarks/tomograms.py --device cuda
    python benchmarks/tomograms.py --size 512 --thickness 128 --bin 2 --sirt 0 --ctf-3d

On shared cores set ``OMP_WAIT_POLICY=PASSIVE`` (as the ``subtomo`` command does): spinning
OpenMP threads otherwise count as CPU seconds (bin-4 SIRT x3: 64 CPU s in a run beside another
benchmark without it, 42 CPU s with it).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from subtomo.geometry import projection_matrices
from subtomo.tilt.tomogram import (
    CtfParams,
    fourier_bin,
    reconstruct_sirt,
    reconstruct_wbp,
    strip_depths,
    tomogram_grid,
)

PX = 1.35


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="tilt image edge (px)")
    ap.add_argument("--tilts", type=int, default=41)
    ap.add_argument("--thickness", type=int, default=512, help="bin-1 tomogram depth (px)")
    ap.add_argument("--bin", type=int, nargs="+", default=[4])
    ap.add_argument("--sirt", type=int, default=3, help="SIRT iterations (0: skip)")
    ap.add_argument("--ctf-3d", action="store_true", help="also WBP + CTF at every voxel depth")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    t, n = args.tilts, args.size
    tilts = torch.linspace(-60.0, 60.0, t, dtype=torch.float64)
    columns = (
        torch.zeros(t, dtype=torch.float64),
        tilts,
        84.0 + 0.3 * torch.randn(t, generator=g, dtype=torch.float64),
        5 * torch.randn(t, generator=g, dtype=torch.float64),
        5 * torch.randn(t, generator=g, dtype=torch.float64),
    )
    size = (n, n, args.thickness)
    matrices = projection_matrices(*columns, PX, size, (n, n))
    images = torch.randn(t, n, n, generator=g).to(device)
    ctf = CtfParams(
        torch.full((t,), 40000.0),
        torch.full((t,), 40500.0),
        torch.zeros(t),
        torch.zeros(t),
        300.0,
        2.7,
        0.07,
        -1,
        1.0,
        PX,
    )
    print(f"{t} tilts of {n}x{n}, tomogram {n}x{n}x{args.thickness} (bin 1), {device}")
    for b in args.bin:
        grid = tomogram_grid(matrices, size, (n, n), b)
        voxels = grid.shape[0] * grid.shape[1] * grid.shape[2]
        runs = [
            ("WBP", lambda x, grid=grid: reconstruct_wbp(x, grid, pixel_size=PX)),
            ("WBP + CTF", lambda x, grid=grid: reconstruct_wbp(x, grid, ctf=ctf, pixel_size=PX)),
        ]
        if args.ctf_3d:
            runs.append(
                (
                    "WBP + CTF 3D",
                    lambda x, grid=grid: reconstruct_wbp(
                        x, grid, ctf=ctf, pixel_size=PX, ctf_3d=True
                    ),
                )
            )
        if args.sirt:
            runs.append(
                (
                    f"SIRT x{args.sirt}",
                    lambda x, grid=grid: reconstruct_sirt(
                        x, grid, iterations=args.sirt, pixel_size=PX
                    ),
                )
            )
        for name, method in runs:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, cpu = time.perf_counter(), time.process_time()
            volume = method(fourier_bin(images, b))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            strips = len(strip_depths(grid, ctf, 0.0, "3D" in name)) if "CTF" in name else 1
            passes = 2 * args.sirt + 1 if name.startswith("SIRT") else 1
            print(
                f"bin {b} {name:10s} {grid.shape[2]}x{grid.shape[1]}x{grid.shape[0]}: "
                f"{seconds:7.1f} s ({cpu:.1f} s CPU), {voxels / seconds / 1e6:7.2f} Mvoxel/s, "
                f"{voxels * t * passes / seconds / 1e6:7.1f} M samples/s, {strips} strips, "
                f"peak {peak_memory_mib(device):.0f} MiB"
            )
            del volume


if __name__ == "__main__":
    main()
