"""Accuracy and speed of CTF estimation and X-ray erasing against simulated truth (issue #15).

Simulates tilt series of sample background only (:mod:`subtomo.simulate.detector`: a slab of
known thickness, the defocus gradient of each tilted image with a known hand, Poisson counts,
hot pixels and X-ray streaks), runs :func:`subtomo.tilt.ctffind.estimate_series` (the
algorithm of ``subtomo ctffind``) and the X-ray eraser on them and prints, against the bar:

* defocus: median |error| of the mean defocus at 0° and at |tilt| >= 55° (bar 100 / 300 Å);
* astigmatism angle: median error where U - V >= 500 Å (bar 10°);
* hand: right on every series; thickness: |error| per series (bar 20 nm);
* X-rays: defects found (bar >= 99 %) and clean pixels changed (bar <= 0.01 %);
* tilts/s and peak RSS (simulation excluded from the timing).

    python benchmarks/ctffind.py                      # 4 series, 1024² at 2 Å/px, box 512
    python benchmarks/ctffind.py --size 512 --box 256 --series 2   # quick
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from subtomo.simulate.detector import DetectorParams, detector_series
from subtomo.tilt import table_rotations
from subtomo.tilt.ctffind import CtfSearch, estimate_series
from subtomo.tilt.xrays import erase_defects, find_defects

#: (hand, thickness nm) of the simulated series, cycled.
CASES = [(-1, 100.0), (1, 150.0), (-1, 200.0), (1, 250.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024, help="image size (px)")
    ap.add_argument("--box", type=int, default=512, help="tile size (px)")
    ap.add_argument("--step", type=float, default=15.0, help="tilt step (deg)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    zero, high, angle_err, fit_time, n_tilts = [], [], [], 0.0, 0
    found = total = changed = clean = 0
    erase_time, erased_px = 0.0, 0
    for k in range(args.series):
        hand, thickness = CASES[k % len(CASES)]
        params = DetectorParams(hand=hand, thickness_nm=thickness, hot_pixels=20, xrays=10)
        s = detector_series(f"TS_{k + 1:02d}", params=params, image_size=(args.size, args.size),
                            tilt_step=args.step, astigmatism_um=0.08, seed=k)  # fmt: skip
        start = time.perf_counter()
        fit = estimate_series(lambda f, s=s: s.images[f], table_rotations(s.tilts),
                              (300.0, 2.7, 0.07), 2.0, CtfSearch(box=args.box),
                              device=args.device)  # fmt: skip
        fit_time += time.perf_counter() - start
        n_tilts += len(s.tilts)
        for f, result in enumerate(fit.fits):
            row = s.tilts.iloc[f]
            tilt = float(row["rlnTomoNominalStageTiltAngle"])
            if result is None:
                print(f"  {s.name} {tilt:+.0f}°: no fit")
                continue
            err = 0.5 * (result.defocus_u + result.defocus_v - row.rlnDefocusU - row.rlnDefocusV)
            (zero if abs(tilt) < 1 else high if abs(tilt) >= 55 else []).append(abs(err))
            if row.rlnDefocusU - row.rlnDefocusV >= 500:
                d = (result.defocus_angle - row.rlnDefocusAngle + 90) % 180 - 90
                angle_err.append(abs(d))
        print(f"{s.name}: hand {fit.hand:+d} (true {hand:+d}, β {fit.hand_beta:.2f} ± "
              f"{fit.hand_error:.2f}), thickness {fit.thickness_nm:.0f} nm (true "
              f"{thickness:.0f}, error {fit.thickness_nm - thickness:+.0f})")  # fmt: skip
        generator = torch.Generator().manual_seed(k)
        for f in range(len(s.images)):
            start = time.perf_counter()
            mask = find_defects(s.images[f])
            out = erase_defects(s.images[f], mask, generator)
            erase_time += time.perf_counter() - start
            erased_px += s.images[f].numel()
            moved, truth = out != s.images[f], s.defect_mask[f]
            changed += int((moved & ~truth).sum())
            clean += int((~truth).sum())
            for _, d in s.defects[s.defects["tilt"] == f].iterrows():
                total += 1
                found += bool(moved[int(d["subtomoY"]), int(d["subtomoX"])])
    print(f"defocus median |error|: {np.median(zero):.0f} Å at 0° (bar 100), "
          f"{np.median(high):.0f} Å at |tilt| >= 55° (bar 300)")  # fmt: skip
    print(f"astigmatism angle median |error| (U - V >= 500 Å): {np.median(angle_err):.1f}° "
          f"(bar 10), {np.mean(np.array(angle_err) <= 10) * 100:.0f} % of tilts within 10°, "
          f"max {np.max(angle_err):.1f}°")  # fmt: skip
    print(
        f"X-rays: {found}/{total} defects found ({100 * found / total:.2f} %, bar 99), "
        f"{changed} of {clean} clean pixels changed ({100 * changed / clean:.4f} %, bar 0.01)"
    )
    print(f"CTF: {n_tilts / fit_time:.2f} tilts/s ({args.size}², box {args.box}); erasing: "
          f"{erased_px / erase_time / 1e6:.1f} Mpixel/s")  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
