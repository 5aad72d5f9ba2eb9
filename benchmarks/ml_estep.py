"""Benchmark of the ML engine's E-step: pose evaluations per second and peak memory.

A pose evaluation is one (particle, class, rotation, 3D offset) likelihood over all of the
particle's tilt images. Default: box 64, 40 tilts, local search (sigma 3 deg on a 1.875 deg
lattice = HEALPix order 5), offsets +-2 px on a 1 px lattice, K = 1, all frequencies to
Nyquist (``--max-shell`` restricts them, RELION's current image size). The slices are read
at the nearest voxel as in the engine's coarse pass (``--interpolation bilinear``: trilinear, as
in its fine pass and the M-step).

    python benchmarks/ml_estep.py --box 64 --tilts 40 --particles 16 --device cpu
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from subtomo.masks import soft_sphere
from subtomo.ml.batch import ParticleBatch, fourier_points
from subtomo.ml.estep import expectation, score_batch
from subtomo.ml.images import mask_images
from subtomo.ml.projector import Projector
from subtomo.ml.sampling import Sampling, pose_grid


def _random_rotations(n: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    return q * torch.linalg.det(q)[:, None, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--tilts", type=int, default=40)
    ap.add_argument("--particles", type=int, default=16, help="total particles")
    ap.add_argument("--batch", type=int, default=4, help="particles per batch")
    ap.add_argument("--classes", type=int, default=1)
    ap.add_argument("--sigma-deg", type=float, default=3.0)
    ap.add_argument("--healpix-order", type=int, default=5)
    ap.add_argument("--offset-range-px", type=float, default=2.0)
    ap.add_argument("--max-shell", type=int, default=None)
    ap.add_argument("--max-slices", type=int, default=1024)
    ap.add_argument("--interpolation", choices=("nearest", "bilinear"), default="nearest")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    n, f, px = args.box, args.tilts, 10.0
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(args.classes, n, n, n, generator=g).to(device)
    projector = Projector(refs, 2.0, args.max_slices)
    sampling = Sampling(
        healpix_order=args.healpix_order,
        offset_range_angst=args.offset_range_px * px,
        offset_step_angst=px,
        local_sigma_deg=args.sigma_deg,
    )
    points = fourier_points(n, args.max_shell or n // 2, device)
    sigma2 = torch.ones(args.batch, n // 2 + 1, device=device)
    mask = soft_sphere((n, n), n / 2 - 6, 5.0, device=device)
    evaluations, images, elapsed = 0, 0, 0.0
    for start in range(0, args.particles, args.batch):
        b = min(args.batch, args.particles - start)
        tilt = torch.linspace(-60, 60, f, dtype=torch.float64)
        ry = torch.zeros(f, 3, 3, dtype=torch.float64)
        ry[:, 0, 0] = ry[:, 2, 2] = torch.cos(torch.deg2rad(tilt))
        ry[:, 0, 2], ry[:, 2, 0] = torch.sin(torch.deg2rad(tilt)), -torch.sin(torch.deg2rad(tilt))
        ry[:, 1, 1] = 1
        batch = ParticleBatch(
            data=torch.randn(b, f, n, n // 2 + 1, dtype=torch.complex64, generator=g),
            ctf2=torch.rand(b, f, n, n // 2 + 1, generator=g),
            visible=torch.ones(b, f, dtype=torch.bool),
            tilt_rotations=ry.expand(b, f, 3, 3).clone(),
            rotations=_random_rotations(b, g),
            offsets=torch.zeros(b, 3, dtype=torch.float64),
            optics_group=torch.zeros(b, dtype=torch.long),
            index=torch.arange(start, start + b),
            classes=torch.zeros(b, dtype=torch.long),
            pixel_size=px,
        ).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        poses = pose_grid(sampling, batch, 2 * px)
        masked = mask_images(batch.data, batch.ctf2, sigma2[:b], mask, zero_mask=False, generator=g)
        scores = score_batch(
            projector,
            points.gather(masked),
            points.gather(batch.ctf2),
            1 / sigma2[:b, points.shell],
            batch.tilt_rotations,
            poses,
            points,
            px,
            interpolation=args.interpolation,
        )
        expectation(scores, torch.zeros(args.classes, device=device), poses)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        evaluations += scores.numel()
        images += b * f
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"box {n}, {f} tilts, {points.flat.numel()} Fourier components/image, "
        f"{poses.n_rot} rotations x {poses.n_trans} offsets x {args.classes} classes per particle"
    )
    print(f"{args.particles} particles in {elapsed:.2f} s on {device}")
    print(f"pose evaluations/s: {evaluations / elapsed:,.0f}")
    print(f"tilt-image pose evaluations/s: {evaluations * f / elapsed:,.0f}")
    slices = evaluations // poses.n_trans * f  # one slice per (particle, class, rotation, tilt)
    print(
        f"reference slice samples/s ({args.interpolation}): "
        f"{slices * points.flat.numel() / elapsed:,.0f}"
    )
    print(f"peak RSS: {rss:,.0f} MiB")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
