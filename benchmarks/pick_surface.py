"""Benchmark of surface picking (``subtomo pick-surface``, conventions §16.1) against the
simulator's membrane proteins, and of refine3d with and without the surface priors.

1. **Picking.** The simulator's vesicle layout (:func:`subtomo.simulate.layout.vesicle_layout`:
   ellipsoidal vesicles with proteins on them and their true normals) in a 400 x 400 x 120 px
   tomogram, particle radius 8 px. For each vesicle, ``--clicks`` points on its surface with
   ``--click-error`` px Gaussian error are fitted by a sphere and by an ellipsoid; or each
   vesicle is traced by one point per 4 px² (same error) for ``--shape points``; or the
   vesicles are voxelised into a segmentation (binned by 2) for the mask mode; the surfaces
   are sampled at spacing = particle radius. Reported per mode, over ``--seeds`` layouts:
   recall (share of true proteins within one spacing of a pick), precision (share of picks
   within one spacing of a protein: a lattice oversamples by design), picks per protein, the
   95th percentile and the share < 5° of the angle between each pick's normal and the true
   surface normal at that pick, and the throughput (picks per second of fitting and sampling).
2. **Priors** (``--refine``). A vesicle project (``--particles``, 24 per tomogram, SNR
   ``--snr``, picks with 10° pose errors carrying the surface frame and priors 90/0) is
   extracted (box 24, bin 2), a reference reconstructed at the picked poses, and refine3d run
   twice on the same particles, without and with ``--sigma_tilt/--sigma_psi`` ``--sigma``;
   median angular and normal errors against the truth.

Peak RSS of the process at the end.

    python benchmarks/pick_surface.py --seeds 5
    python benchmarks/pick_surface.py --seeds 1 --refine --work /tmp/bench_pick --particles 48
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from subtomo.errors import InputError
from subtomo.picking import (
    Ellipsoid,
    fit_ellipsoid,
    fit_sphere,
    mask_surfaces,
    sample_ellipsoid,
    sample_point_surface,
)
from subtomo.simulate.layout import vesicle_layout

SIZE = (400, 400, 120)
RADIUS = 8.0


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def _voxelised(vesicles, binning: int) -> np.ndarray:
    """A zyx segmentation (binned) with every vesicle filled."""
    shape = tuple(s // binning for s in SIZE[::-1])
    z, y, x = (np.arange(n) * binning for n in shape)
    z, y, x = np.meshgrid(z, y, x, indexing="ij")
    mask = np.zeros(shape, dtype=np.uint8)
    for label, (c, a) in enumerate(vesicles, 1):
        inside = ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((z - c[2]) / a[2]) ** 2
        mask[inside <= 1] = label
    return mask


MASK_BINNING = 2


def _picks(mode: str, vesicles, rng, clicks: int, error: float, spacing: float, mask=None):
    """(points, normals, true normals at the points) of every vesicle for one mode."""
    if mode == "mask":
        binning = MASK_BINNING
        points, normals = [], []
        for p, n in mask_surfaces(mask, spacing / binning):
            points.append(p * binning)
            normals.append(n)
        points, normals = np.concatenate(points), np.concatenate(normals)
        # the true vesicle of each pick: the one whose scaled radius is nearest 1
        true = np.empty_like(normals)
        best = np.full(len(points), np.inf)
        for c, a in vesicles:
            r = np.linalg.norm((points - c) / a, axis=1)
            closer = np.abs(r - 1) < best
            best[closer] = np.abs(r - 1)[closer]
            true[closer] = Ellipsoid(c, a, np.eye(3)).normals(points[closer])
        return points, normals, true
    out = ([], [], [])
    for c, a in vesicles:
        if mode == "traced":  # one point per 4 px² of membrane, as contours 2 px apart
            e = Ellipsoid(c, a, np.eye(3))
            d = rng.normal(size=(int(e.area() / 4), 3))
            pts = c + d / np.linalg.norm(d, axis=1, keepdims=True) * a
            p, n = sample_point_surface(pts + rng.normal(scale=error, size=pts.shape), spacing)
            out[0].append(p)
            out[1].append(n)
            out[2].append(e.normals(p))
            continue
        d = rng.normal(size=(clicks, 3))
        pts = c + d / np.linalg.norm(d, axis=1, keepdims=True) * a
        pts = pts + rng.normal(scale=error, size=pts.shape)
        try:
            fit = fit_sphere(pts) if mode == "sphere" else fit_ellipsoid(pts)
        except InputError:  # not an ellipsoid: this vesicle gets no picks
            continue
        p, n = sample_ellipsoid(fit, spacing)
        out[0].append(p)
        out[1].append(n)
        out[2].append(Ellipsoid(c, a, np.eye(3)).normals(p))
    return tuple(np.concatenate(v) for v in out)


def picking(seeds: int, clicks: list[int], error: float) -> None:
    spacing = RADIUS
    modes = [("sphere", k) for k in clicks] + [("ellipsoid", k) for k in clicks if k >= 9]
    modes += [("traced", 0), ("mask", 0)]
    print(f"picking: spacing {spacing:g} px = particle radius, click error {error:g} px")
    print(f"{'mode':>10} {'clicks':>6} {'recall':>7} {'precision':>9} {'picks/prot':>10} "
          f"{'normal p95':>10} "
          f"{'<5 deg':>7} {'picks/s':>9}")  # fmt: skip
    for mode, k in modes:
        recall, precision, ratio, p95, below, rate = [], [], [], [], [], []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            lay = vesicle_layout(rng, 150, SIZE, RADIUS, lambda p: np.ones(len(p), bool))
            mask = _voxelised(lay.vesicles, MASK_BINNING) if mode == "mask" else None
            t0 = time.perf_counter()
            points, normals, true = _picks(mode, lay.vesicles, rng, k, error, spacing, mask)
            rate.append(len(points) / (time.perf_counter() - t0))
            distance = cKDTree(points).query(lay.positions_px)[0]
            errors = _angle_deg(normals, true)
            recall.append(np.mean(distance <= spacing))
            precision.append(np.mean(cKDTree(lay.positions_px).query(points)[0] <= spacing))
            ratio.append(len(points) / len(lay.positions_px))
            p95.append(np.percentile(errors, 95))
            below.append(np.mean(errors < 5))
        print(f"{mode:>10} {k or '-':>6} {np.mean(recall):7.3f} {np.mean(precision):9.3f} "
              f"{np.mean(ratio):10.1f} "
              f"{np.mean(p95):9.1f}° {np.mean(below):7.3f} {np.mean(rate):9.0f}")  # fmt: skip


def refine(work: Path, particles: int, snr: float, sigma: float) -> None:
    from typer.testing import CliRunner

    from subtomo.cli.main import app
    from subtomo.data import ParticleSet
    from subtomo.geometry import rotation_angle_deg

    def invoke(*args: str) -> float:
        t0 = time.perf_counter()
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return time.perf_counter() - t0

    work.mkdir(parents=True, exist_ok=True)
    tomograms = str(-(-particles // 24))  # 24 membrane proteins fit the default tomogram
    invoke("simulate", "--out", str(work), "--particles", str(particles), "--tilt-step", "10",
           "--tomograms", tomograms,
           "--layout", "vesicle", "--noise", "gaussian", "--snr", str(snr),
           "--pose-error-deg", "10", "--shift-error-px", "1", "--seed", "3")  # fmt: skip
    os.chdir(work)
    invoke("extract", "--p", "particles_picked.star", "--t", "tomograms.star", "--box", "24",
           "--bin", "2", "--float32", "--o", "ext")  # fmt: skip
    invoke("reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec")
    base = ["refine3d", "--ios", "ext/optimisation_set.star", "--ref", "rec/merged.mrc",
            "--ini_high", "60", "--healpix_order", "3", "--auto_local_healpix_order", "3",
            "--offset_range", "1", "--offset_step", "1", "--iter", "3", "--device", "cpu",
            "--random_seed", "4"]  # fmt: skip
    truth = ParticleSet.read("particles.star")
    order = {n: i for i, n in enumerate(truth.particles["rlnTomoParticleName"])}
    true_all = (truth.subtomogram_matrices() @ truth.particle_matrices()).double()
    print(f"refine3d on {particles} membrane proteins, SNR {snr:g}, picks with 10° errors")
    runs = {"picked": (None, "ext/particles.star"), "no priors": ([], "free/run_data.star"),
            f"priors {sigma:g}°": (["--sigma_tilt", str(sigma), "--sigma_psi", str(sigma)],
                                   "prior/run_data.star")}  # fmt: skip
    for label, (extra, path) in runs.items():
        wall = 0.0
        if extra is not None:
            wall = invoke(*base, *extra, "--o", path.split("/")[0])
        ps = ParticleSet.read(path)
        idx = [order[n] for n in ps.particles["rlnTomoParticleName"]]
        full = (ps.subtomogram_matrices() @ ps.particle_matrices()).double()
        angle = rotation_angle_deg(full, true_all[idx]).median()
        normal = np.median(_angle_deg(full[:, :, 2].numpy(), true_all[idx][:, :, 2].numpy()))
        print(f"  {label:>12}: median angular error {angle:5.2f}°, normal {normal:5.2f}°"
              + (f", refine3d {wall:.1f} s" if wall else ""))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--clicks", type=int, nargs="+", default=[6, 12, 20, 40])
    parser.add_argument("--click-error", type=float, default=1.0)
    parser.add_argument("--refine", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_pick_surface"))
    parser.add_argument("--particles", type=int, default=48)
    parser.add_argument("--snr", type=float, default=0.02)
    parser.add_argument("--sigma", type=float, default=3.0)
    args = parser.parse_args()
    picking(args.seeds, [c for c in args.clicks if c >= 4], args.click_error)
    if args.refine:
        refine(args.work, args.particles, args.snr, args.sigma)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
