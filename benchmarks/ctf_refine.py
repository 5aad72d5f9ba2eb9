"""Accuracy, throughput and peak memory of ``subtomo ctf-refine`` (issue 19).

Simulates the bar's data set once (reused when ``--workdir`` holds it): 300 particles in 2
tomograms, box 64 at 5 Å/px, 41 tilts (±60°, dose-symmetric, 3 e/Å² per tilt), Gaussian
noise at ``--snr``, per-tilt defocus errors σ 500 Å, per-particle defocus errors σ 300 Å and
ice (κ 0.8, normal 5°). Extracts 2D stacks at the true poses with the nominal tomograms and
without the per-particle defoci (what a user has after Refine3D), then runs ``subtomo
ctf-refine --per_particle_defocus`` against the true map as both half maps (the CTF fit
alone; the full cycle with Refine3D and frame alignment is benchmarked elsewhere; the mask
from the true map), or with
``--reference data`` against half maps reconstructed from the stacks at the true poses
(``subtomo reconstruct``: with the nominal CTFs, as after a Refine3D), and prints
the per-tilt defocus RMS error before/after, the fits' own posterior σ (the information the
data hold), the per-particle defocus RMS error before/after, the scales' RMS error relative
to the true Beer–Lambert curve (up to the maps' grey scale), the wall and CPU time,
particles/s and the peak RSS (and CUDA memory).

    python benchmarks/ctf_refine.py --workdir /tmp/bench_ctf --snr 0.05
    python benchmarks/ctf_refine.py --workdir /tmp/bench_ctf --snr 0.05 --reference data
    python benchmarks/ctf_refine.py --workdir /tmp/bench_ctf --snr 1 --reference data --rounds 2

``--extract-crop precrop`` extracts the stacks with ``--circle_precrop --no_circle_crop`` (the
raw patch windowed before the CTF) instead of RELION's crop after it; ``--bias-correction off``
and ``--reference-spectrum`` switch ctf-refine's
corrections (§23). Besides the RMS errors it prints the mean signed per-tilt defocus error
(the common offset).

``--even-zernike`` / ``--odd-zernike`` simulate aberrations (rlnEvenZernike / rlnOddZernike
form, left out of the stacks' optics table) and fit them (``--do_even_aberrations`` /
``--do_odd_aberrations``), printing fitted against true coefficients and the phase error.

``--rounds 2`` runs the cycle twice (ctf-refine, then Extract with the refined CTF and, with
``--reference data``, Reconstruct, then ctf-refine again) and prints each round.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np

from _setup import add_data_arguments, rms, simulate, subtomo


def _prepare(args: argparse.Namespace, work: Path) -> None:
    if not (work / "truth.mrc").is_file():
        aberrations = []
        if args.even_zernike:
            aberrations += ["--even-zernike", args.even_zernike]
        if args.odd_zernike:
            aberrations += ["--odd-zernike", args.odd_zernike]
        t = simulate(args, "--tilt-step", "3", "--defocus-error", str(args.defocus_error),
                     "--particle-defocus-error", str(args.particle_error), "--ice-kappa",
                     str(args.kappa), "--ice-normal", "5", *aberrations, cwd=work)  # fmt: skip
        print(f"simulated in {t:.0f} s: {work}")
    if not (work / "ext/particles.star").is_file():
        from subtomo.data import DEFOCUS_OFFSET, ParticleSet

        nominal = ParticleSet.read(work / "particles.star")
        nominal.particles = nominal.particles.drop(columns=[DEFOCUS_OFFSET])
        unknown = [c for c in ("rlnEvenZernike", "rlnOddZernike") if c in nominal.optics]
        nominal.optics = nominal.optics.drop(columns=unknown)  # what a user has at first
        nominal.write(work / "particles_nominal.star")
        subtomo("extract", "--p", "particles_nominal.star", "--t", "tomograms.star",
                "--box", str(args.box), "--float32", "--o", "ext", cwd=work)  # fmt: skip
    if args.extract_crop == "precrop" and not (work / "ext_precrop/particles.star").is_file():
        subtomo("extract", "--p", "particles_nominal.star", "--t", "tomograms.star",
                "--box", str(args.box), "--float32", "--circle_precrop", "--no_circle_crop",
                "--o", "ext_precrop", cwd=work)  # fmt: skip
    if not (work / "mask/mask.mrc").is_file():  # the reference mask, from the true map
        subtomo("mask", "--i", "truth.mrc", "--lowpass", "20", "--ini_threshold", "2",
                "--extend_inimask", "3", "--width_soft_edge", "5", "--o", "mask",
                cwd=work)  # fmt: skip
    if args.reference == "data" and not (work / "rec/half1.mrc").is_file():
        subtomo("reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec", cwd=work)


def _per_tilt(path: Path, what: str) -> dict[str, np.ndarray]:
    """Per tilt series: the mean defocus (Å), rlnCtfScalefactor or rlnTomoYTilt (deg)."""
    from subtomo.data import TomogramSet

    values = {
        "defocus": lambda s: (s.defocus_u + s.defocus_v) / 2,
        "scale": lambda s: s.ctf_scale,
        "tilt": lambda s: np.asarray(s.tilts["rlnTomoYTilt"], dtype=np.float64),
    }[what]
    return {s.name: values(s) for s in TomogramSet.read(path)}


def _print_aberrations(true_set, fitted_set, args: argparse.Namespace) -> None:
    """Fitted against true Zernike coefficients, and the RMS / largest error of the phase
    they make over the Fourier points up to Nyquist (rad)."""
    import torch

    from subtomo.ctf import aberration_phase

    name = str(true_set.tomo_names[0])
    n = args.box
    k = torch.fft.rfftfreq(n, args.pixel_size, dtype=torch.float64)
    ky = torch.fft.fftfreq(n, args.pixel_size, dtype=torch.float64)
    kx, ky = k[None].expand(n, -1), ky[:, None].expand(-1, n // 2 + 1)
    inside = (kx**2 + ky**2).sqrt() <= 0.5 / args.pixel_size
    for parity, true, got in zip(("even", "odd"), true_set.aberrations(name),
                                 fitted_set.aberrations(name), strict=True):  # fmt: skip
        if not got:
            continue
        full = list(true) + [0.0] * (len(got) - len(true))
        error = aberration_phase([g - t for g, t in zip(got, full, strict=True)], parity, kx, ky)
        error = error[inside]
        print(f"  {parity} aberrations: true {[round(v, 1) for v in full]}, fitted "
              f"{[round(v, 1) for v in got]}; phase error RMS "
              f"{float(error.square().mean().sqrt()):.3f}, max {float(error.abs().max()):.3f} "
              f"rad")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_ctf_refine")
    add_data_arguments(parser)
    parser.add_argument("--defocus-error", type=float, default=500.0)
    parser.add_argument("--particle-error", type=float, default=300.0)
    parser.add_argument("--kappa", type=float, default=0.8)
    parser.add_argument("--kmin", type=float, default=30.0, help="ctf-refine --kmin (Å)")
    parser.add_argument(
        "--even-zernike",
        default="",
        help="simulated rlnEvenZernike, e.g. "
        "[0,0,0,0,0,0,0,0,8000]; fitted with --do_even_aberrations",
    )
    parser.add_argument(
        "--odd-zernike",
        default="",
        help="simulated rlnOddZernike, e.g. [0,0,600,0,0,800]; fitted with --do_odd_aberrations",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reference", choices=("truth", "data"), default="truth")
    parser.add_argument("--rounds", type=int, default=1, help="ctf-refine + extract cycles")
    parser.add_argument(
        "--extract-crop", choices=("relion", "precrop"), default="relion",
        help="Extract's circle crop: relion (after the CTF, the default) or precrop "
        "(--circle_precrop --no_circle_crop: the raw patch windowed before the CTF)",
    )  # fmt: skip
    parser.add_argument("--stack-crop", default="auto", help="ctf-refine --stack_crop")
    parser.add_argument("--reference-spectrum", action="store_true",
                        help="ctf-refine --reference_spectrum")  # fmt: skip
    parser.add_argument(
        "--bias-correction", choices=("on", "off"), default="on",
        help="ctf-refine --bias_correction (on, its default) or --no_bias_correction",
    )  # fmt: skip
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    _prepare(args, work)
    os.chdir(work)

    import torch

    from subtomo.data import OptimisationSet, ParticleSet
    from subtomo.jobs.ctf_refine import CtfRefineParams, run

    tag = int(time.time())
    bias = args.bias_correction == "on"
    crop_flags = ["--circle_precrop", "--no_circle_crop"] if args.extract_crop == "precrop" else []
    ios = Path("ext_precrop" if args.extract_crop == "precrop" else "ext") / "optimisation_set.star"
    refs = ("truth.mrc", "truth.mrc") if args.reference == "truth" else (
        "rec/half1.mrc", "rec/half2.mrc")  # fmt: skip
    true_set = ParticleSet.read("particles.star")
    truth_p = true_set.defocus_offsets().numpy()
    # the data cannot tell a series' mean per-particle offset from its tilts' defocus (the
    # job keeps the particles' mean 0): the comparable per-tilt truth includes that mean
    series_p = true_set.particles["rlnTomoName"].astype(str).to_numpy()
    mean_p = {n: truth_p[series_p == n].mean() for n in np.unique(series_p)}
    n_part = len(truth_p)
    print(f"data: {n_part} particles, {args.tomograms} tomograms, box {args.box} at "
          f"{args.pixel_size} Å/px, 41 tilts, SNR {args.snr}; "
          f"reference {args.reference}, --kmin {args.kmin:g} Å; extraction crop "
          f"{args.extract_crop}, ctf-refine --stack_crop {args.stack_crop}"
          + f", bias correction {'on' if bias else 'off'}"
          + (", reference spectrum" if args.reference_spectrum else ""))  # fmt: skip
    true = _per_tilt(Path("true_alignment.star"), "defocus")
    tomograms = Path("tomograms.star")
    for round_ in range(1, args.rounds + 1):
        if round_ > 1:  # the cycle: extract with the refined CTF (and reconstruct)
            subtomo("extract", "--ios", str(ios), "--box", str(args.box), "--float32",
                    *crop_flags, "--o", f"ext_{tag}_{round_}", cwd=Path.cwd())  # fmt: skip
            ios = Path(f"ext_{tag}_{round_}/optimisation_set.star")
            if args.reference == "data":
                subtomo("reconstruct", "--ios", str(ios), "--o", f"rec_{tag}_{round_}",
                        cwd=Path.cwd())  # fmt: skip
                refs = (f"rec_{tag}_{round_}/half1.mrc", f"rec_{tag}_{round_}/half2.mrc")
        out = Path(f"CtfRefine/bench_{tag}_{round_}")
        wall, cpu = time.perf_counter(), time.process_time()
        run(CtfRefineParams(ios=str(ios), ref1=refs[0], ref2=refs[1], mask="mask/mask.mrc",
                            per_particle_defocus=True, kmin=args.kmin, device=args.device,
                            stack_crop=args.stack_crop,
                            bias_correction=bias,
                            reference_spectrum=args.reference_spectrum,
                            do_even_aberrations=bool(args.even_zernike),
                            do_odd_aberrations=bool(args.odd_zernike),
                            output_dir=str(out)))  # fmt: skip
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        nominal = _per_tilt(tomograms, "defocus")
        fitted = _per_tilt(out / "tomograms.star", "defocus")
        before = np.concatenate([nominal[n] - true[n] for n in true])
        after = np.concatenate([fitted[n] - true[n] for n in true])
        after_mean = np.concatenate([fitted[n] - true[n] - mean_p[n] for n in true])
        check = torch.load(out / "ctf_refine_checkpoint.pt", weights_only=True)["results"]
        sigma = np.concatenate([check[n]["sigma"].numpy() for n in true])
        tilt = np.concatenate(list(_per_tilt(tomograms, "tilt").values()))
        low = np.abs(tilt) <= 20  # the tilts nearest 0°, least damaged by the dose
        scale = _per_tilt(out / "tomograms.star", "scale")
        true_scale = _per_tilt(Path("true_alignment.star"), "scale")
        ratio = [scale[n] / true_scale[n] for n in true]
        scale_error = rms(np.concatenate([r / r.mean() - 1 for r in ratio]))
        input_p = ParticleSet.read(OptimisationSet.read(ios).particles).defocus_offsets()
        fitted_p = ParticleSet.read(out / "particles.star").defocus_offsets().numpy()
        print(f"round {round_}:")
        print(
            f"  per-tilt defocus RMS error: all tilts {rms(before):.0f} -> {rms(after):.0f} Å "
            f"(fit's posterior σ RMS {rms(sigma):.0f} Å); "
            f"{rms(before[low]):.0f} -> {rms(after[low]):.0f} Å (σ {rms(sigma[low]):.0f} Å) "
            f"at |tilt| <= 20°"
        )
        print(f"  against the truth plus the series' mean per-particle offset (the data cannot "
              f"tell the two apart): {rms(after_mean):.0f} Å")  # fmt: skip
        print(f"  per-tilt defocus mean signed error (the common offset): "
              f"{before.mean():+.0f} -> {after.mean():+.0f} Å")  # fmt: skip
        print(f"  per-tilt scale RMS error (Beer–Lambert, up to the grey scale): "
              f"{scale_error:.1%}")  # fmt: skip
        print(f"  per-particle defocus RMS error: {rms(input_p.numpy() - truth_p):.0f} -> "
              f"{rms(fitted_p - truth_p):.0f} Å")  # fmt: skip
        if args.even_zernike or args.odd_zernike:
            _print_aberrations(true_set, ParticleSet.read(out / "particles.star"), args)
        print(f"  time {wall:.1f} s wall, {cpu:.1f} s CPU: {n_part / wall:.1f} particles/s, "
              f"{n_part * 41 / wall:.0f} tilt images/s; peak RSS {peak:.0f} MiB"
              + (f", CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
                 if torch.cuda.is_available() else ""))  # fmt: skip
        ios, tomograms = out / "optimisation_set.star", out / "tomograms.star"


if __name__ == "__main__":
    main()
