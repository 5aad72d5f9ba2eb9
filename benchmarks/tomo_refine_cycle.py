"""Benchmark of RELION's "CTF and alignment refinement cycle" (issue 19): Refine3D ->
ctf-refine -> frame-align -> Extract -> Refine3D, run twice, against the simulated truth.

Simulates (``--preset benchmark`` with the issue's errors: per-tilt defocus σ 500 Å,
per-particle defocus σ 300 Å, per-tilt shifts σ 1.5 px, particle motion 0.5 Å per e/Å²;
picked poses off by ``--pose-error-deg`` and ``--shift-error-px``), extracts 2D stacks at the
picked poses with the nominal tomograms, reconstructs a 30 Å reference and refines
(``--refine`` options: local searches by default). Each cycle then runs ``ctf-refine
--per_particle_defocus`` and ``frame-align --motion`` against the Refine3D half maps, each
half set against its own (with a mask made from the Refine3D map, as a user would),
re-extracts and refines again from the previous map. Prints per stage the per-tilt defocus
RMS error, the per-particle defocus RMS error, the per-tilt shift and image-position RMS
errors (:func:`subtomo.simulate.truth.image_position_error`) and the Fourier shells where
the Refine3D map's FSC against the true map crosses 0.5 and 0.143 (and where its half maps'
gold-standard FSC crosses 0.143), with wall times. ``--deformation σ`` deforms the tilt
images (σ px at 3 x 3 nodes) and frame-align fits the fields. The default size is the issue's (300
particles, 2 tomograms); on a loaded machine use e.g. ``--particles 100 --tomograms 1
--tomogram-size 768,768,128``.

    python benchmarks/tomo_refine_cycle.py --work /tmp/bench_cycle
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

import numpy as np

from _setup import add_data_arguments, files, fsc_shells, rms, simulate, subtomo
from subtomo.data import OptimisationSet, ParticleSet, TomogramSet
from subtomo.fourier import lowpass_map
from subtomo.io import read_mrc, write_mrc
from subtomo.masks.create import suggest_threshold
from subtomo.simulate.truth import image_position_error

REFINE = "--healpix_order 3 --sigma_ang 3 --offset_range 2 --offset_step 1"
# RELION's --kmin 30 Å leaves no shell below the resolution Refine3D reaches here (~28 Å)
CTF_REFINE = "--kmin 100 --reference_spectrum"
HERE = Path(".")


def _wall(*args: str) -> float:
    """Wall time (s) of one ``subtomo`` command line in the working directory."""
    return subtomo(*args)[0]


def _defocus(path: str) -> np.ndarray:
    """Mean defocus (Å) of every tilt of every series, series in file order."""
    return np.concatenate([(s.defocus_u + s.defocus_v) / 2 for s in TomogramSet.read(path)])


def _particle_defocus(path: str, names: list[str]) -> np.ndarray:
    """Per-particle defocus offsets (Å, §23) of ``names`` (0 where the column is absent)."""
    parts = ParticleSet.read(path)
    by_name = dict(zip(parts.particles["rlnTomoParticleName"].astype(str),
                       parts.defocus_offsets().numpy(), strict=True))  # fmt: skip
    return np.array([by_name[n] for n in names])


def _mask(volume_path: str, out: str) -> None:
    """The reference mask of ctf-refine and frame-align, from a refined map as a user makes
    it: low-passed to 20 Å, thresholded at the Otsu level, extended 3 px, soft edge 5 px."""
    volume, px = read_mrc(volume_path)
    threshold = suggest_threshold(lowpass_map(volume, 20.0, px))
    _wall("mask", "--i", volume_path, "--lowpass", "20", "--ini_threshold", f"{threshold:.6g}",
          "--extend_inimask", "3", "--width_soft_edge", "5", "--o", out)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    add_data_arguments(ap)
    ap.add_argument("--pose-error-deg", type=float, default=3.0)
    ap.add_argument("--shift-error-px", type=float, default=1.0)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--refine", default=REFINE, help="refine3d options")
    ap.add_argument("--ctf-refine", default=CTF_REFINE, help="more ctf-refine options")
    ap.add_argument("--deformation", type=float, default=0.0,
                    help="σ (px) of simulated 2D deformations of the tilt images (3 x 3 "
                    "nodes), then fitted by frame-align --deformation; 0: none")  # fmt: skip
    ap.add_argument(
        "--rigid",
        action="store_true",
        help="with --deformation: frame-align without --deformation (the baseline)",
    )
    ap.add_argument(
        "--frame-align-first", action="store_true",
        help="per cycle: frame-align, Extract, ctf-refine (against the same half maps), "
        "Extract, Refine3D: the defocus fitted on aligned tilts",
    )  # fmt: skip
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    os.chdir(a.work)
    box = str(a.box)
    if not Path("truth.mrc").is_file():
        t = simulate(a, "--defocus-error", "500", "--particle-defocus-error", "300",
                     "--tilt-shift-error-px", "1.5", "--motion-s-vel", "0.5",
                     "--pose-error-deg", str(a.pose_error_deg), "--shift-error-px",
                     str(a.shift_error_px), "--deformation", str(a.deformation))  # fmt: skip
        print(f"simulate: {t:.0f} s")
    if not Path("r0/run_class001.mrc").is_file():
        _wall("extract", "--p", "particles_picked.star", "--t", "tomograms.star", "--box",
              box, "--float32", "--o", "e0")  # fmt: skip
        _wall("reconstruct", "--ios", "e0/optimisation_set.star", "--o", "rec0")
        vol, px = read_mrc("rec0/merged.mrc")
        write_mrc("rec0/ref30.mrc", lowpass_map(vol, 30.0, px), px)
        t = _wall("refine3d", "--ios", "e0/optimisation_set.star", "--ref", "rec0/ref30.mrc",
                  "--ini_high", "30", *shlex.split(a.refine), "--o", "r0")  # fmt: skip
        print(f"refine3d r0: {t:.0f} s")
    truth = files(HERE, "true_alignment.star", "particles.star", "true_motion.star")
    true_defocus = _defocus("true_alignment.star")
    names = truth[1].particles["rlnTomoParticleName"].astype(str).tolist()
    true_particle = _particle_defocus("particles.star", names)

    def report(stage: str, tomograms: str, particles: str, motion: str | None) -> None:
        shifts = image_position_error(truth, files(HERE, tomograms, particles, motion))
        kept = ParticleSet.read(particles).particles["rlnTomoParticleName"].astype(str)
        sel = [names.index(n) for n in kept]
        per_particle = _particle_defocus(particles, list(kept)) - true_particle[sel]
        print(f"  {stage}: defocus RMS {rms(_defocus(tomograms) - true_defocus):.0f} Å, "
              f"particle defocus RMS {rms(per_particle):.0f} Å, per-tilt shift RMS "
              f"{shifts[1]:.2f} px, image positions {shifts[0]:.2f} px")  # fmt: skip

    align = ["--motion", *(["--deformation"] if a.deformation and not a.rigid else [])]
    _print_fsc("r0")
    report("r0", "tomograms.star", "r0/run_data.star", None)
    previous = "r0"
    for c in range(1, a.cycles + 1):
        ios = f"{previous}/run_optimisation_set.star"
        _mask(f"{previous}/run_class001.mrc", f"mask{c}")
        mask = ("--mask", f"mask{c}/mask.mrc")
        if a.frame_align_first:
            halves = ("--ref1", f"{previous}/run_half1_class001_unfil.mrc",
                      "--ref2", f"{previous}/run_half2_class001_unfil.mrc")  # fmt: skip
            t2 = _wall("frame-align", "--ios", ios, *mask, *align, "--o", f"fa{c}")
            t3 = _wall("extract", "--ios", f"fa{c}/optimisation_set.star", "--box", box,
                       "--float32", "--o", f"e{c}a")  # fmt: skip
            t1 = _wall("ctf-refine", "--ios", f"e{c}a/optimisation_set.star", *halves, *mask,
                       "--per_particle_defocus", *shlex.split(a.ctf_refine),
                       "--o", f"ctf{c}")  # fmt: skip
            t3 += _wall("extract", "--ios", f"ctf{c}/optimisation_set.star", "--box", box,
                        "--float32", "--o", f"e{c}")  # fmt: skip
        else:
            t1 = _wall("ctf-refine", "--ios", ios, *mask, "--per_particle_defocus",
                       *shlex.split(a.ctf_refine), "--o", f"ctf{c}")  # fmt: skip
            t2 = _wall("frame-align", "--ios", f"ctf{c}/optimisation_set.star", *mask,
                       *align, "--o", f"fa{c}")  # fmt: skip
            t3 = _wall("extract", "--ios", f"fa{c}/optimisation_set.star", "--box", box,
                       "--float32", "--o", f"e{c}")  # fmt: skip
        t4 = _wall("refine3d", "--ios", f"e{c}/optimisation_set.star", "--ref",
                   f"{previous}/run_class001.mrc", "--ini_high", "30",
                   *shlex.split(a.refine), "--o", f"r{c}")  # fmt: skip
        print(f"cycle {c}: ctf-refine {t1:.0f} s, frame-align {t2:.0f} s, extract {t3:.0f} s, "
              f"refine3d {t4:.0f} s")  # fmt: skip
        report("after ctf-refine", f"ctf{c}/tomograms.star", f"ctf{c}/particles.star",
               _motion_of(f"ctf{c}/optimisation_set.star"))  # fmt: skip
        report("after frame-align", f"fa{c}/tomograms.star", f"fa{c}/particles.star",
               f"fa{c}/motion.star")  # fmt: skip
        _print_fsc(f"r{c}")
        previous = f"r{c}"


def _print_fsc(job: str) -> None:
    """The Refine3D map's FSC against the truth, and the gold-standard FSC of its unfiltered
    half maps (unmasked): honest when the half maps' 0.143 shell is near the truth's 0.5."""
    truth = fsc_shells(Path(f"{job}/run_class001.mrc"), Path("truth.mrc"))
    gold = fsc_shells(Path(f"{job}/run_half1_class001_unfil.mrc"),
                      Path(f"{job}/run_half2_class001_unfil.mrc"))  # fmt: skip
    print(f"Refine3D {job}: FSC to truth 0.5 at shell {truth[0]:.2f}, 0.143 at {truth[1]:.2f}; "
          f"half maps (gold standard) 0.143 at {gold[1]:.2f}")  # fmt: skip


def _motion_of(ios: str) -> str | None:
    """The trajectories file an optimisation set names, if any."""
    path = OptimisationSet.read(ios).trajectories
    return str(path) if path else None


if __name__ == "__main__":
    main()
