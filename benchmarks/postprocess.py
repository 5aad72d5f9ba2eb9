"""Benchmark: post-processing of 256^3 half maps and local resolution of 128^3 half maps.

Prints wall-clock seconds and the peak resident memory. Run:
``python benchmarks/postprocess.py [--threads 2] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from subtomo.fourier import bfactor_weights, irfft_centered, rfft_centered
from subtomo.masks import soft_sphere
from subtomo.postprocess import LocalResOptions, PostprocessOptions, local_resolution, postprocess


def _halves(n: int, px: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random density blurred by B = 150 inside a sphere, plus independent noise per half."""
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(n, n, n, generator=g) * soft_sphere((n,) * 3, n / 3, 4)
    sig = irfft_centered(rfft_centered(truth, 3) * bfactor_weights((n,) * 3, 150.0, px), (n,) * 3)
    noise = [0.3 * torch.randn(n, n, n, generator=g) for _ in range(2)]
    return (sig + noise[0]).to(device), (sig + noise[1]).to(device)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    n, px = 256, 1.0
    h1, h2 = _halves(n, px, dev)
    mask = soft_sphere((n,) * 3, n / 3 + 4, 6, device=dev)
    t = time.perf_counter()
    res = postprocess(h1, h2, px, mask, PostprocessOptions(autob_lowres=10.0))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(
        f"postprocess {n}^3: {time.perf_counter() - t:.2f} s "
        f"(resolution {res.resolution:.2f} Å, B {res.bfactor:.0f}); "
        f"peak RSS {_peak_rss_gb():.2f} GB"
    )
    del h1, h2, mask, res

    n, px = 128, 2.0
    h1, h2 = _halves(n, px, dev)
    t = time.perf_counter()
    lr = local_resolution(h1, h2, px, options=LocalResOptions())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(
        f"localres {n}^3: {time.perf_counter() - t:.2f} s ({lr.points.shape[0]} points, "
        f"median {lr.point_resolution.median():.2f} Å); peak RSS {_peak_rss_gb():.2f} GB"
    )


if __name__ == "__main__":
    main()
