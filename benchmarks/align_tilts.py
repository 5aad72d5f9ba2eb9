"""Tilt-series alignment against the truth (``subtomo align-tilts``, issue #16): the bar.

A simulated series (default 41 tilts, ±60°, of 256² at 10 Å/px, 50 ribosomes, Gaussian noise at
SNR 0.1) is rendered with alignment errors — shifts of σ 7 px (up to ~20 px), a tilt-axis error
of 3°, tilt angles off by σ 0.4° plus a common offset of 1°, in-plane rotations of σ 0.3° —
while ``tomograms.star`` keeps the nominal geometry. ``subtomo align-tilts`` aligns it; the
result is compared with ``true_alignment.star``:

* the gauge-free residual (``simulate.truth.alignment_error``: specimen points projected with
  the found and the true geometry, after the rigid motion of the specimen no alignment can
  see), RMS over tilts (bar ≤ 0.5 px), and the tilt-axis error (mean ZRot, bar ≤ 0.3°);
* Extract + Reconstruct of the particles with the true and with the found alignment (the
  particles moved by that rigid motion, as picking them in the found tomogram would): the
  FSC to the true map crosses 0.5 and 0.143 within one shell of the true alignment's (bar).

With ``--beads N`` the series also has N gold beads (radius ``--bead-radius`` px) and
``--mode`` picks fiducial-less (with ``align-tilts --erase_gold``, unless ``--keep-gold``),
fiducial (``align-tilts --fiducial``) or both, each measured against the same truth; the
fiducial mode also prints the recovered tilt offset.

Also measured: teamtomo's ``torch-tiltxcorr`` and ``torch-refine-tilt-axis-angle`` 0.6 on the
same images, given the true shifts/axis where they need them. Prints seconds and peak RSS.

    python benchmarks/align_tilts.py                  # the bar
    python benchmarks/align_tilts.py --noise none --particles 50
    python benchmarks/align_tilts.py --beads 12 --mode both   # fiducial vs fiducial-less
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _matrices(star: str, name: str, image: tuple[int, int]) -> torch.Tensor:
    """Projection matrices of a series in ascending nominal tilt."""
    from subtomo.data import TomogramSet

    series = TomogramSet.read(star)[name]
    order = np.argsort(series.tilts["rlnTomoNominalStageTiltAngle"].to_numpy(), kind="stable")
    return series.projection_matrices(image)[torch.from_numpy(order)]


def _moved_particles(source: str, target: str, motion: torch.Tensor, px: float, size) -> None:
    """particles.star with every particle moved by the rigid ``motion`` (bin-1 px, decentred)."""
    from subtomo.data import ParticleSet
    from subtomo.geometry import euler_to_matrix, matrix_to_euler

    parts = ParticleSet.read(source)
    table = parts.particles.copy()
    centre = torch.tensor([s / 2 for s in size], dtype=torch.float64)
    cols = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
    p = torch.tensor(table[cols].to_numpy(np.float64)) / px + centre
    moved = p @ motion[:3, :3].T + motion[:3, 3]
    table[cols] = ((moved - centre) * px).numpy()
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    rot = euler_to_matrix(*torch.tensor(table[angles].to_numpy(np.float64)).T)
    table[angles] = matrix_to_euler(motion[:3, :3] @ rot).numpy()
    ParticleSet.from_tables(table, parts.optics).write(target)


def _teamtomo(images, y_tilt, true) -> dict[str, float]:
    """teamtomo's packages on the same images: tilt axis from the true-shifted images (its
    precondition), and tiltxcorr shifts at the true axis (gauge-free error)."""
    out: dict[str, float] = {}
    try:
        from torch_refine_tilt_axis_angle import refine_tilt_axis_angle
        from torch_tiltxcorr import tiltxcorr
    except ImportError:
        return out
    from subtomo.tilt.alignment import _warp

    eye = torch.eye(2).expand(len(y_tilt), 2, 2)
    centred = _warp(images, eye, true["shifts"], tuple(images.shape[-2:]))
    start = time.perf_counter()
    # measured: teamtomo's tilt-axis angle is RELION's ZRot (given ZRot + 90 it returned
    # ZRot + 0.5); its answer is an axis direction, so compared modulo 180°
    found = refine_tilt_axis_angle(centred, tilt_axis_angle=float(true["z_rot"]))
    error = (found - float(true["z_rot"]) + 90.0) % 180.0 - 90.0
    out["refine_tilt_axis_angle error (deg)"] = error
    out["refine_tilt_axis_angle s"] = time.perf_counter() - start
    start = time.perf_counter()
    shifts = tiltxcorr(images, y_tilt.float(), tilt_axis_angle=float(true["z_rot"]))
    out["tiltxcorr s"] = time.perf_counter() - start
    out["tiltxcorr yx"] = shifts.double()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="tilt image size (px)")
    ap.add_argument("--pixel-size", type=float, default=10.0, help="Å/px")
    ap.add_argument("--tilts", type=int, default=41, help="tilts over ±60°")
    ap.add_argument("--particles", type=int, default=50)
    ap.add_argument("--noise", default="gaussian", help="gaussian | poisson | none")
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--shift-error", type=float, default=7.0, help="σ of shifts (px)")
    ap.add_argument("--axis-error", type=float, default=3.0, help="tilt-axis error (deg)")
    ap.add_argument("--tilt-offset", type=float, default=1.0, help="common tilt offset (deg)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--beads", type=int, default=0, help="gold beads per tomogram")
    ap.add_argument("--bead-radius", type=float, default=5.0, help="bead radius (px)")
    ap.add_argument("--mode", default="fiducial-less", help="fiducial-less | fiducial | both")
    ap.add_argument("--keep-gold", action="store_true", help="fiducial-less: do not erase beads")
    ap.add_argument("--no-fsc", action="store_true", help="skip Extract + Reconstruct")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temp folder")
    args = ap.parse_args()

    from subtomo.data import TomogramSet
    from subtomo.data.tomograms import tilt_images
    from subtomo.fourier import fsc_maps
    from subtomo.io import read_mrc
    from subtomo.jobs import align_tilts, extract, reconstruct
    from subtomo.jobs import simulate as simulate_job
    from subtomo.simulate.truth import alignment_error

    out = args.workdir or Path(tempfile.mkdtemp(prefix="subtomo_align_"))
    out.mkdir(parents=True, exist_ok=True)
    px, size = args.pixel_size, (args.size, args.size, 96)
    image = size[:2]
    seconds: dict[str, float] = {}
    with contextlib.chdir(out):
        start = time.perf_counter()
        simulate_job.run(simulate_job.SimulateParams(
            output_dir=Path("."), tomogram_size=size, pixel_size=px, box=48,
            particles=args.particles, tilt_step=120.0 / (args.tilts - 1), noise=args.noise,
            snr=args.snr, tilt_shift_error_px=args.shift_error, axis_error_deg=args.axis_error,
            tilt_offset_deg=args.tilt_offset, tilt_angle_error_deg=0.4, in_plane_error_deg=0.3,
            beads=args.beads, bead_radius_px=args.bead_radius, seed=args.seed,
        ))  # fmt: skip
        seconds["simulate"] = time.perf_counter() - start
        modes = ["fiducial-less", "fiducial"] if args.mode == "both" else [args.mode]
        name = TomogramSet.read("tomograms.star").names[0]
        true = _matrices("true_alignment.star", name, image)
        nominal, _ = alignment_error(true, _matrices("tomograms.star", name, image), size)
        key = "rlnTomoNominalStageTiltAngle"
        true_tilts = TomogramSet.read("true_alignment.star")[name].tilts.sort_values(key)
        shifts = true_tilts[["rlnTomoXShiftAngst", "rlnTomoYShiftAngst"]].to_numpy() / px
        print(f"project: {out}")
        print(f"injected: shifts up to {np.abs(shifts).max():.1f} px, axis "
              f"{args.axis_error:+.1f}°, tilt offset {args.tilt_offset:+.1f}° (+σ 0.4°), "
              f"in-plane σ 0.3°; noise {args.noise} SNR {args.snr}; "
              f"{args.beads} beads")  # fmt: skip
        print(f"residual error (gauge-free) with the nominal alignment: "
              f"{float(nominal.square().mean().sqrt()):.2f} px RMS")  # fmt: skip
        fsc = {}
        for mode in modes:
            start = time.perf_counter()
            align_tilts.run(align_tilts.AlignTiltsParams(
                i="tomograms.star", output_dir=f"Align/{mode}", fiducial=mode == "fiducial",
                bead_diameter=2 * args.bead_radius * px,
                erase_gold=mode == "fiducial-less" and args.beads > 0 and not args.keep_gold,
            ))  # fmt: skip
            seconds[f"align-tilts {mode}"] = time.perf_counter() - start
            aligned = f"Align/{mode}/aligned_tilt_series.star"
            found = _matrices(aligned, name, image)
            rms, motion = alignment_error(true, found, size)
            found_tilts = TomogramSet.read(aligned)[name].tilts
            axis = float(found_tilts["rlnTomoZRot"].mean() - true_tilts["rlnTomoZRot"].mean())
            offset = float(found_tilts["rlnTomoYTilt"].mean() - true_tilts["rlnTomoYTilt"].mean())
            print(f"{mode}: residual error (gauge-free) {float(rms.square().mean().sqrt()):.3f} "
                  f"px RMS (bar 0.5), worst tilt {float(rms.max()):.2f} px; tilt axis error "
                  f"{axis:+.3f}° (bar 0.3); mean tilt angle error {offset:+.3f}° (injected "
                  f"{args.tilt_offset:+.1f}°); flagged tilts "
                  f"{int(found_tilts['subtomoAlignFlagged'].sum())}")  # fmt: skip
            if not args.no_fsc:
                _moved_particles("particles.star", f"particles_{mode}.star", motion, px, size)
                runs = [(mode, aligned, f"particles_{mode}.star")]
                if not fsc:
                    runs.insert(0, ("true", "true_alignment.star", "particles.star"))
                for kind, tomograms, particles in runs:
                    start = time.perf_counter()
                    extract.run(extract.ExtractParams(
                        particles=particles, tomograms=tomograms, box=48, device="cpu",
                        output_dir=f"Extract/{kind}"))  # fmt: skip
                    reconstruct.run(reconstruct.ReconstructParams(
                        ios=f"Extract/{kind}/optimisation_set.star", device="cpu",
                        output_dir=f"Reconstruct/{kind}"))  # fmt: skip
                    seconds[f"extract+reconstruct {kind}"] = time.perf_counter() - start
                    fsc[kind] = fsc_maps(read_mrc(f"Reconstruct/{kind}/merged.mrc")[0],
                                         read_mrc("truth.mrc")[0]).numpy()  # fmt: skip
                gap = np.abs(fsc["true"][1:] - fsc[mode][1:])
                print(f"{mode}: FSC to truth, true vs found alignment: largest difference "
                      f"{gap.max():.3f} (shell {int(gap.argmax()) + 1} of {len(gap)})")  # fmt: skip
                for threshold in (0.5, 0.143):
                    shells = {}
                    for kind in ("true", mode):
                        below = np.flatnonzero(fsc[kind][1:] < threshold)
                        shells[kind] = int(below[0]) if below.size else len(fsc[kind]) - 1
                    print(f"{mode}: FSC to truth crosses {threshold}: true alignment shell "
                          f"{shells['true']} ({48 * px / max(shells['true'], 1):.1f} Å), found "
                          f"shell {shells[mode]} ({48 * px / max(shells[mode], 1):.1f} Å) "
                          f"(bar: within 1)")  # fmt: skip

        if "fiducial-less" in modes:
            series = TomogramSet.read("tomograms.star")[name]
            order = torch.from_numpy(np.argsort(series.tilts[key].to_numpy(), kind="stable"))
            images = tilt_images(series)[order]
            y_nominal = torch.tensor(series.tilts[key].to_numpy())[order]
            given = {"shifts": torch.from_numpy(shifts), "z_rot": true_tilts["rlnTomoZRot"].mean()}
            tt = _teamtomo(images, y_nominal, given)
            if tt:
                from subtomo.tilt.alignment import TiltAlignment

                yx = tt.pop("tiltxcorr yx")
                al = TiltAlignment(torch.tensor(true_tilts["rlnTomoYTilt"].to_numpy()),
                                   torch.tensor(true_tilts["rlnTomoZRot"].to_numpy()),
                                   yx[:, [1, 0]])  # fmt: skip
                # the sign that fits best (their yx shifts correct the images; ours place them)
                flipped = TiltAlignment(al.y_tilt, al.z_rot, -al.shifts)
                errors = [float(alignment_error(true, al_.matrices(px, size, image), size)[0]
                                .square().mean().sqrt()) for al_ in (al, flipped)]  # fmt: skip
                print(f"teamtomo tiltxcorr (true tilts and axis given): {min(errors):.2f} px RMS "
                      f"in {tt['tiltxcorr s']:.1f} s; refine_tilt_axis_angle (true shifts given): "
                      f"axis error {tt['refine_tilt_axis_angle error (deg)']:+.2f}° in "
                      f"{tt['refine_tilt_axis_angle s']:.1f} s")  # fmt: skip
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
