"""Throughput of Fourier slice insertion and extraction (subtomo.fourier.slices).

Prints slices/s for ``insert_slices`` and ``extract_slices`` at random orientations and the
peak memory (RSS on CPU, allocated CUDA memory on a GPU). For scale: RELION 5's CPU
reconstruction handles ~5,600 tilt images/s at box 64 on 2 cores, including cutting them from
the tilt series.

    python benchmarks/insert_slices.py --box 64 --n 20000 --padding 2 --device cpu
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

from subtomo.fourier.slices import extract_slices, insert_slices, padded_box
from subtomo.geometry import euler_to_matrix


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_matrices(n: int, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    rot, psi = 360 * u[:, 0], 360 * u[:, 2]
    tilt = torch.rad2deg(torch.arccos(1 - 2 * u[:, 1]))  # uniform on the sphere
    return euler_to_matrix(rot, tilt, psi).float()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--n", type=int, default=20000, help="number of slices")
    parser.add_argument("--padding", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-radius", type=float, default=None, help="Fourier px (n-box)")
    parser.add_argument("--batch", type=int, default=2000, help="slices per call")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    real = getattr(torch, args.dtype)
    cplx = torch.complex64 if real == torch.float32 else torch.complex128
    gen = torch.Generator().manual_seed(0)
    n, size = args.box, padded_box(args.box, args.padding)
    mats = _random_matrices(args.n, gen).to(device)
    slices = torch.randn(args.batch, n, n // 2 + 1, dtype=torch.complex64, generator=gen)
    slices, weights = slices.to(device), slices.real.abs().to(device)
    data = torch.zeros(size, size, size // 2 + 1, dtype=cplx, device=device)
    weight = torch.zeros(data.shape, dtype=real, device=device)
    volume = torch.randn(data.shape, dtype=torch.complex64, generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def insert(m: torch.Tensor) -> None:
        insert_slices(data, weight, slices[: len(m)], weights[: len(m)], m,
                      padding=args.padding, max_radius=args.max_radius)  # fmt: skip

    def extract(m: torch.Tensor) -> None:
        extract_slices(volume, m, padding=args.padding, max_radius=args.max_radius)

    print(
        f"box {n} (padded {size}), {args.n} slices, batch {args.batch}, "
        f"max_radius {args.max_radius}, {args.dtype} accumulators, device {device}, "
        f"{torch.get_num_threads()} threads"
    )
    for name, fn in (("insert", insert), ("extract", extract)):
        fn(mats[: min(args.batch, 64)])  # warm-up (caches, kernels)
        best, cpu = float("inf"), float("inf")
        for _ in range(args.repeats):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for start in range(0, args.n, args.batch):
                fn(mats[start : start + args.batch])
            _sync(device)
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
        print(
            f"{name:8s} {args.n / best:10.0f} slices/s wall ({best:.2f} s; "
            f"process CPU time {cpu:.2f} s, load average {os.getloadavg()[0]:.1f})"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    print(f"peak RSS {rss / (2**20 if sys.platform == 'darwin' else 2**10):.0f} MiB")
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
