"""Benchmark of ``subtomo frame-align``: per-tilt shift and particle-position errors against
the truth before and after, the FSC of the re-extracted reconstruction against the true map,
wall time and peak RSS of the job.

Simulates (default: the issue's data set, 300 particles in 2 tomograms, box 64, 5 Å/px, 41
tilts, SNR 0.05) with per-tilt shift errors (σ 1.5 px) and particle motion (RELION's prior,
0.5 Å per e/Å², 3 e/Å² per tilt; tomograms of 1024 x 1024 x 128 px so that
150 ribosomes fit in each at 5 Å/px), extracts 2D stacks with the nominal alignment, reconstructs
the half maps, runs frame alignment against them (``--motion``), re-extracts with its
tomograms, particles and motion.star and reconstructs again. Errors are image positions
against the true alignment and motion (:func:`subtomo.simulate.truth.image_position_error`):
over all (particle, tilt) pairs, and the per-tilt mean (the per-tilt shift).

    python benchmarks/frame_align.py --work /tmp/bench_fa
    python benchmarks/frame_align.py --work /tmp/bench_fa_small --particles 60 --tomograms 1
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _setup import add_data_arguments, files, fsc_shells, simulate, subtomo
from subtomo.simulate.truth import image_position_error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    add_data_arguments(ap)
    ap.add_argument("--shift-error-px", type=float, default=1.5)
    ap.add_argument("--s-vel", type=float, default=0.5, help="simulated motion, Å/(e/Å²)")
    ap.add_argument("--extra", default="", help="more frame-align options")
    a = ap.parse_args()
    root = a.work.resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    box = str(a.box)
    if not (root / "ext/particles.star").is_file():
        t = simulate(a, "--tilt-shift-error-px", str(a.shift_error_px), "--motion-s-vel",
                     str(a.s_vel), cwd=root)  # fmt: skip
        print(f"simulate: {t:.1f} s")
        subtomo("extract", "--p", "particles.star", "--t", "tomograms.star", "--box", box,
                "--float32", "--o", "ext", cwd=root)  # fmt: skip
        subtomo("reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec", cwd=root)
    wall, rss = subtomo("frame-align", "--ios", "ext/optimisation_set.star", "--ref1",
                        "rec/half1.mrc", "--ref2", "rec/half2.mrc", "--motion", "--s_vel",
                        str(a.s_vel), "--o", "fa", *a.extra.split(), cwd=root)  # fmt: skip
    subtomo("extract", "--ios", "fa/optimisation_set.star", "--box", box, "--float32",
            "--o", "ext2", cwd=root)  # fmt: skip
    subtomo("reconstruct", "--ios", "ext2/optimisation_set.star", "--o", "rec2", cwd=root)
    truth = files(root, "true_alignment.star", "particles.star", "true_motion.star")
    before = image_position_error(truth, files(root, "tomograms.star", "ext/particles.star",
                                                None))  # fmt: skip
    after = image_position_error(truth, files(root, "fa/tomograms.star", "fa/particles.star",
                                               "fa/motion.star"))  # fmt: skip
    tomos, parts, _ = files(root, "tomograms.star", "ext/particles.star", None)
    n_images = int(sum(v.sum() for v in parts.visible_frames({t.name: t.n_tilts for t in tomos})))
    print(f"frame-align: {wall:.1f} s, {n_images / wall:.0f} tilt images/s, peak RSS {rss:.0f} MB")
    print(f"per-tilt shift RMS error: {before[1]:.3f} -> {after[1]:.3f} px")
    print(f"image-position RMS error (all particle x tilt): {before[0]:.3f} -> {after[0]:.3f} px")
    (b05, b143), (a05, a143) = (
        fsc_shells(root / r / "merged.mrc", root / "truth.mrc") for r in ("rec", "rec2")
    )
    res = a.box * a.pixel_size
    for label, b, c in (("0.5", b05, a05), ("0.143", b143, a143)):
        print(f"FSC to truth {label}: shell {b:.2f} ({res / b:.1f} Å) -> {c:.2f} ({res / c:.1f} Å)")


if __name__ == "__main__":
    main()
