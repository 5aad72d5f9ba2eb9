"""Shared set-up of the tomo refinement benchmarks (ctf_refine.py, frame_align.py,
tomo_refine_cycle.py): ``subtomo`` child processes, the simulated data set, errors against
the truth."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from subtomo.data import ParticleSet, TomogramSet, Trajectories
from subtomo.fourier import crossing_shell, fsc_maps
from subtomo.io import read_mrc


def subtomo(*args: str, cwd: Path | None = None) -> tuple[float, float]:
    """One ``subtomo`` command line in a child process (its memory is not ours); its wall
    time (s) and the peak RSS of the children so far (MiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "subtomo.cli", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.perf_counter() - t0, max(peak, before) / 1024


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulated data set's options; defaults are the issue's (300 particles in 2
    tomograms of 1024 x 1024 x 128 px, box 64 at 5 Å/px, SNR 0.05)."""
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--tomograms", type=int, default=2)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--pixel-size", type=float, default=5.0)
    parser.add_argument("--tomogram-size", default="1024,1024,128", help="W,H,D px")
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)


def simulate(args: argparse.Namespace, *extra: str, cwd: Path | None = None) -> float:
    """``subtomo simulate --preset benchmark`` into ``cwd`` with the options of
    :func:`add_data_arguments` and ``extra``; its wall time (s)."""
    wall, _ = subtomo(
        "simulate", "--out", ".", "--preset", "benchmark", "--particles", str(args.particles),
        "--tomograms", str(args.tomograms), "--box", str(args.box), "--pixel-size",
        str(args.pixel_size), "--tomogram-size", args.tomogram_size, "--snr", str(args.snr),
        "--seed", str(args.seed), *extra, cwd=cwd,
    )  # fmt: skip
    return wall


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def files(root: Path, tomograms: str, particles: str, motion: str | None) -> tuple:
    """Tomograms, particles and trajectories (or ``None``) under ``root``, as
    :func:`subtomo.simulate.truth.image_position_error` takes them."""
    tomos = TomogramSet.read(root / tomograms)
    return (tomos, ParticleSet.read(root / particles, tomos),
            Trajectories.read(root / motion) if motion else None)  # fmt: skip


def fsc_shells(path: Path, truth: Path) -> tuple[float, float]:
    """Shells where the map's FSC against the true map crosses 0.5 and 0.143 (shell 0, the
    mean, skipped)."""
    volume, _ = read_mrc(path)
    true_map, _ = read_mrc(truth)
    curve = fsc_maps(volume.double(), true_map.double())[1:]
    return 1 + crossing_shell(curve, 0.5), 1 + crossing_shell(curve, 0.143)
