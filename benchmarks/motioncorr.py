"""Accuracy, throughput and peak memory of ``subtomo motioncorr`` against the truth and peers.

Simulates counting movies (:mod:`subtomo.simulate.movies`: 3 e/Å² per tilt in ``--frames``
frames at 1.35 Å/px, 10 % specimen contrast, a gain pattern, ~5 px decelerating drift),
written as 8-bit TIFF with an mdoc and a gain reference, imports them (``subtomo import``)
and runs, each as its own process on the same threads:

- ``subtomo motioncorr`` (the job: streaming, gain, alignment, sums, STAR files);
- ``relion_run_motioncorr --use_own`` (RELION 3.1's CPU implementation, Debian package), when
  installed and ``--relion``;
- teamtomo's ``torch_motion_correction.estimate_global_motion`` on the gain-corrected frames
  (in-process, alignment only), when installed and ``--tmc``.

Prints per tool the RMS error of the frame shifts against the truth (movie px, mean and worst
movie), frames per second of the whole command (start-up included) and peak memory (RSS).

    python benchmarks/motioncorr.py --size 512 --movies 8 --relion --tmc
    python benchmarks/motioncorr.py --size 4096 --movies 3 --relion
    python benchmarks/motioncorr.py --size 4096 --movies 41 --relion   # one tilt series

Measured (2 threads on 2 cores shared with other work, ``OMP_WAIT_POLICY=PASSIVE nice -n 5``;
branch ``motion`` against ``main`` 7928671 in the same quarter hour, two runs each, so
ranges; CPU s/frame is user + system time of the whole command, start-up included):

- 4096² x 10 frames, 3 movies, machine load ~3.5: subtomo 0.027 px RMS (worst 0.033),
  5.56-8.14 frames/s as typed (job alone 7.3-11.5), 0.169-0.179 CPU s/frame, 1.76-1.81 GB
  peak; RELION 3.1 ``--use_own`` in the same runs 0.125 px (worst 0.146), 1.71-1.88
  frames/s, 0.563-0.583 CPU s/frame, 1.56-1.58 GB: ours is 3.3x its throughput per CPU
  second and 3.3-4.3x its frames/s. main: same errors, 4.21-4.35 frames/s (job
  5.3-5.5), 0.229-0.236 CPU s/frame, 2.1 GB. With neighbours loading the machine to 6-7:
  subtomo 0.243-0.280 CPU s/frame, 2.4-2.6 frames/s; RELION 0.762-0.840, 0.79-0.81
  frames/s (3.0-3.1x); main 0.295-0.357.
- 512² x 10 frames, 8 movies, load ~3.5: subtomo 0.205 px (worst 0.324), 44.8 frames/s
  (job 133), 0.022 CPU s/frame, 0.40 GB (main 39.5 frames/s, 0.025 CPU s/frame); RELION
  0.736 px (worst 1.301), 269 frames/s, 0.004 CPU s/frame (Python's and torch's start-up,
  ~1.5 CPU s, is most of ours at this size).
- The same 4k command on the quiet machine (load 0), after the gc.freeze start-up commit of
  that branch was reverted: subtomo 5.71 frames/s (job 8.33), 0.243 CPU s/frame, 1.75 GB;
  RELION 2.63 frames/s, 0.715 CPU s/frame: 2.2x its frames/s and 2.9x per CPU second (RELION
  gains more from a quiet machine than we do).
- One whole tilt series on the quiet machine (``--movies 41``), where start-up is amortised as
  in use: 4096², subtomo 0.025 px (worst 0.037), 9.67 frames/s (job 10.05), 0.155 CPU
  s/frame, 1.93 GB; RELION 0.103 px (worst 0.147), 2.78 frames/s, 0.676 CPU s/frame, 1.58 GB:
  3.5x its frames/s, 4.4x per CPU second. 512²: subtomo 0.221 px, 157 frames/s (job 293),
  0.40 GB; RELION 0.760 px, 506 frames/s, 0.05 GB: RELION is faster at this toy size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.io import read_star, write_mdoc, write_mrc, write_star
from subtomo.io.movies import read_gain, read_movie_frames, read_movie_header, write_movie
from subtomo.jobs.motioncorr import output_root, read_motion_star
from subtomo.simulate.movies import (
    drift_trajectory,
    gain_pattern,
    simulate_movie,
    specimen_texture,
)

PIXEL_SIZE = 1.35  # Å
DOSE = 3.0  # e/Å² per tilt


def make_movies(size: int, n_movies: int, n_frames: int, seed: int) -> dict[str, np.ndarray]:
    """Movies, gain.mrc and ts.mdoc in the working directory; ``{movie: RELION-sign truth}``."""
    rng = np.random.default_rng(seed)
    sensitivity = gain_pattern((size, size), rng)
    write_mrc("gain.mrc", 1.0 / sensitivity, PIXEL_SIZE)
    truth, names = {}, []
    for i in range(n_movies):
        shifts = drift_trajectory(n_frames, 5.0, rng)
        movie = simulate_movie(
            specimen_texture((size, size), PIXEL_SIZE, rng), pixel_size=PIXEL_SIZE, dose=DOSE,
            n_frames=n_frames, shifts=shifts, sensitivity=sensitivity, rng=rng,
        )  # fmt: skip
        name = f"frames/ts_{i + 1:03d}_{3.0 * i:.1f}.tif"
        write_movie(name, movie.frames.numpy(), PIXEL_SIZE)
        truth[name] = -shifts  # RELION writes the correction
        names.append(Path(name).name)
    start = datetime(2026, 1, 1, 9, 0, 0)
    write_mdoc(
        "ts.mdoc", 3.0 * np.arange(n_movies), DOSE, PIXEL_SIZE, 300, sub_frame_paths=names,
        date_times=[start + timedelta(minutes=i) for i in range(n_movies)],
        frames_per_tilt=n_frames,
    )  # fmt: skip
    return truth


def timed(argv: list[str], threads: int) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MiB) and CPU seconds (user + system, all threads) of one
    command run as its own process (GNU time: measured from the command's exec, not from a
    fork of this process). CPU time is the measure that other processes on shared cores
    change least."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M %U %S", *argv], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {done.stderr[-2000:]}")
    rss, user, system = done.stderr.strip().splitlines()[-1].split()
    return wall, int(rss) / 1024, float(user) + float(system)


def rms_errors(truth: dict[str, np.ndarray], estimates: dict[str, np.ndarray]) -> np.ndarray:
    return np.array(
        [np.sqrt(((estimates[m] - t) ** 2).sum(axis=1).mean()) for m, t in truth.items()]
    )


SUBTOMO = [sys.executable, "-c", "from subtomo.cli.main import main; main()"]


def run_subtomo(truth: dict, threads: int) -> dict:
    argv = [*SUBTOMO, "motioncorr", "--i", "Import/job001/tilt_series.star",
            "--gain_ref", "gain.mrc", "--device", "cpu"]  # fmt: skip
    wall, rss, cpu = timed(argv, threads)
    job = sorted(Path("MotionCorr").iterdir())[-1]
    estimates = {m: read_motion_star(job / (output_root(m) + ".star"))[1] for m in truth}
    finished = (job / "run.out").read_text().rsplit("# finished in ", 1)[1].split()[0]
    return {
        "wall": wall,
        "rss": rss,
        "cpu": cpu,
        "errors": rms_errors(truth, estimates),
        "job": float(finished),
    }


def run_relion(truth: dict, threads: int) -> dict:
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
        "rlnMicrographOriginalPixelSize": [PIXEL_SIZE], "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
    })  # fmt: skip
    movies = pd.DataFrame({"rlnMicrographMovieName": list(truth), "rlnOpticsGroup": 1})
    write_star("movies.star", {"optics": optics, "movies": movies})
    argv = ["relion_run_motioncorr", "--i", "movies.star", "--o", "RelionMC/", "--use_own",
            "--j", str(threads), "--gainref", "gain.mrc", "--bfactor", "150"]  # fmt: skip
    wall, rss, cpu = timed(argv, threads)
    estimates = {}
    for movie in truth:
        shifts = read_star(Path("RelionMC") / (output_root(movie) + ".star"))["global_shift"]
        estimates[movie] = shifts[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
    return {"wall": wall, "rss": rss, "cpu": cpu, "errors": rms_errors(truth, estimates)}


def run_tmc(truth: dict, threads: int) -> dict:
    """teamtomo's global estimate (in-process; integer-pixel peaks, one reference frame)."""
    from torch_motion_correction import estimate_global_motion

    torch.set_num_threads(threads)
    estimates, start = {}, time.perf_counter()
    for movie in truth:
        header = read_movie_header(movie)
        gain = torch.from_numpy(read_gain("gain.mrc", header.shape))
        frames = torch.cat(list(read_movie_frames(header))).float() * gain
        field = estimate_global_motion(frames, PIXEL_SIZE)
        yx = field.data[:, :, 0, 0].T.double().numpy() / PIXEL_SIZE  # (t, yx) Å -> px
        shifts = yx[:, ::-1] - yx[:1, ::-1]
        estimates[movie] = -shifts
    wall = time.perf_counter() - start
    return {"wall": wall, "rss": float("nan"), "cpu": float("nan"),
            "errors": rms_errors(truth, estimates)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="frame size (px), square")
    parser.add_argument("--movies", type=int, default=8)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relion", action="store_true", help="also relion_run_motioncorr")
    parser.add_argument("--tmc", action="store_true", help="also torch-motion-correction")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        truth = make_movies(args.size, args.movies, args.frames, args.seed)
        subprocess.run(
            [*SUBTOMO, "import", "--movies", "frames/*.tif", "--mdocs", "ts.mdoc"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        results = {"subtomo motioncorr": run_subtomo(truth, args.threads)}
        if args.relion:
            results["relion_run_motioncorr --use_own"] = run_relion(truth, args.threads)
        if args.tmc:
            results["torch-motion-correction (align only)"] = run_tmc(truth, args.threads)
    frames = args.movies * args.frames
    print(
        f"{args.movies} movies of {args.frames} frames, {args.size}x{args.size} px at "
        f"{PIXEL_SIZE} Å/px, {DOSE} e/Å² per movie, {args.threads} threads"
    )
    print(
        f"{'tool':38s} {'RMS err px':>10s} {'worst':>6s} {'frames/s':>9s} {'peak MiB':>9s}"
        f" {'CPU s/frame':>11s}  (the whole command: frames/s, CPU user+sys per frame; "
        "subtomo's job alone, without start-up, after it)"
    )
    for name, r in results.items():
        job = f"  job: {frames / r['job']:.2f} frames/s" if "job" in r else ""
        print(
            f"{name:38s} {r['errors'].mean():10.3f} {r['errors'].max():6.3f} "
            f"{frames / r['wall']:9.2f} {r['rss']:9.0f} {r['cpu'] / frames:11.3f}{job}"
        )


if __name__ == "__main__":
    main()
