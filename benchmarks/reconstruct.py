"""Throughput and peak memory of ``subtomo extract`` and ``subtomo reconstruct`` (issue #3).

Simulates a data set once (``subtomo simulate --preset benchmark``, noise on, with the box,
particle and tilt counts asked for; reused when ``--workdir`` already holds it), then times the
Extract job (2D stacks) and the Reconstruct job (from the tilt series) as a user runs them, each
in a child process so that its peak RSS (``ru_maxrss``) is its own. Prints wall and CPU seconds,
particles/s, tilt images/s (particles x tilts) and peak RSS; at bin 1 also the FSC of the
merged map to the true map. With ``--relion-bin DIR`` it runs ``relion_tomo_subtomo`` and
``relion_tomo_reconstruct_particle`` on the same files and prints the time ratio (skipped when
the binaries are missing). On CPU it also times the ``subtomo extract`` / ``subtomo reconstruct``
commands end to end, start-up included. For scale: RELION 5.0.1's CPU build on 2 cores
extracts 300 x 41 tilts at box 64 in 1.7 s and reconstructs them in 2.2 s (0.35 GB).

    python benchmarks/reconstruct.py --box 64 --bin 1 --workdir /tmp/bench64
    python benchmarks/reconstruct.py --box 128 --bin 2 --particles 300 --relion-bin /opt/relion/bin
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def _simulate(args: argparse.Namespace, out: Path) -> None:
    """The benchmark preset at box ``box * bin`` (bin-1 pixels), unless already there."""
    if (out / "simulation.json").is_file():
        return
    from subtomo.jobs.simulate import SimulateJob, run
    from subtomo.simulate import SimulationParams

    size = max(512, 4 * args.box * args.bin)
    params = SimulationParams.from_preset(
        "benchmark",
        box=args.box * args.bin,
        particles=args.particles,
        tomograms=args.tomograms,
        tilt_step=120.0 / (args.tilts - 1),
        tomogram_size=(size, size, max(128, args.box * args.bin)),
        device=args.device,
    )
    start = time.perf_counter()
    run(SimulateJob(out=out, simulation=params))
    print(f"simulated {args.particles} particles x {args.tilts} tilts in "
          f"{time.perf_counter() - start:.0f} s: {out}")  # fmt: skip


def _child(kind: str, params, threads: int | None, conn) -> None:
    """Run one job in this (child) process; send back (wall s, CPU s, peak RSS MiB, FSC
    summary). CPU time (user + system, all threads) is the load-independent measure when
    other processes share the cores."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if kind == "extract":
        from subtomo.jobs.extract import run
    else:
        from subtomo.jobs.reconstruct import run
    import matplotlib.figure  # noqa: F401  (the report's library: start-up, like torch)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    outputs = run(params)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_start
    rss = usage.ru_maxrss / 1024  # Linux: kB
    conn.send((wall, cpu, rss, _fsc_to_truth(outputs) if kind == "reconstruct" else ""))


def _fsc_to_truth(outputs: dict[str, str]) -> str:
    """FSC of merged.mrc to truth.mrc at 0.5 and 0.8 Nyquist (only when the shapes match)."""
    from subtomo.fourier import fsc_maps
    from subtomo.io import read_mrc

    merged = next(Path(p) for p in outputs if Path(p).name == "merged.mrc")
    truth_path = Path("truth.mrc")
    if not truth_path.is_file():
        return ""
    got, _ = read_mrc(merged)
    truth, _ = read_mrc(truth_path)
    if got.shape != truth.shape:
        return "FSC to truth: n/a (binned)"
    fsc = fsc_maps(got, truth)
    n = got.shape[-1] // 2
    return f"FSC to truth {fsc[n // 2]:.3f} at 0.5 Nyquist, {fsc[int(0.8 * n)]:.3f} at 0.8 Nyquist"


def _timed(kind: str, params, threads: int | None) -> tuple[float, float, float, str]:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(kind, params, threads, send))
    proc.start()
    result = recv.recv()
    proc.join()
    return result


def _command(kind: str, args: argparse.Namespace) -> float | None:
    """Wall seconds of the ``subtomo`` command a user types for ``kind`` (interpreter, imports,
    job and report), or None when the console script is not installed beside this Python."""
    exe = Path(sys.executable).with_name("subtomo")
    if not exe.is_file():
        print(f"command: {exe} not found; skipped")
        return None
    out = Path(f"{kind.capitalize()}/command")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(exe), kind, "--particles", "particles.star", "--tomograms", "tomograms.star",
           "--box", str(args.box), "--bin", str(args.bin), "--o", str(out)]  # fmt: skip
    if kind == "reconstruct":
        cmd += ["--from", "tilt_series"]
    return _wall(cmd, f"subtomo {kind}")


def _wall(cmd: list[str], label: str) -> float | None:
    """Wall seconds of running ``cmd``, or None (and the end of its stderr) when it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(f"{label} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        return None
    return wall


def _relion(args: argparse.Namespace, name: str, flags: list[str]) -> float | None:
    """Wall seconds of a RELION program on the same files, or None when it is missing."""
    exe = Path(args.relion_bin) / name
    if not exe.is_file():
        print(f"RELION: {exe} not found; skipped")
        return None
    out = Path(f"Relion/{name}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [str(exe), "--p", "particles.star", "--t", "tomograms.star", "--b", str(args.box),
           "--bin", str(args.bin), "--j", str(args.threads or os.cpu_count()), "--o", f"{out}/",
           *flags]  # fmt: skip
    wall = _wall(cmd, f"RELION {name}")
    if wall is None:
        return None
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"RELION {name}: {wall:.2f} s (peak RSS of children so far {rss:.0f} MiB)")
    return wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=64, help="binned box (px)")
    parser.add_argument("--bin", type=int, default=1, help="binning factor")
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--tilts", type=int, default=41, help="tilts over ±60°")
    parser.add_argument("--tomograms", type=int, default=2, help="tilt series to spread them over")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--padding", type=float, default=None, help="reconstruct padding")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each job")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--relion-bin", default=None, help="directory of RELION binaries")
    parser.add_argument("--workdir", default=None, help="project directory (kept; reused)")
    args = parser.parse_args(argv)

    from subtomo.jobs.extract import ExtractParams
    from subtomo.jobs.reconstruct import ReconstructParams

    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # paths in the STAR files are relative to the project directory
    # In a child process: Linux carries a parent's peak RSS over into the children it
    # starts, so a simulation here would inflate the jobs' figures below.
    simulation = mp.get_context("spawn").Process(target=_simulate, args=(args, work))
    simulation.start()
    simulation.join()
    if simulation.exitcode != 0:
        sys.exit(f"simulation failed ({simulation.exitcode})")
    common = {"particles": "particles.star", "tomograms": "tomograms.star",
              "box": args.box, "binning": float(args.bin), "device": args.device}  # fmt: skip
    jobs = {
        "extract": ExtractParams(**common, output_dir="Extract/bench"),
        "reconstruct": ReconstructParams(
            **common, source="tilt_series", output_dir="Reconstruct/bench"
        ),
    }
    if args.padding:
        jobs["reconstruct"] = replace(jobs["reconstruct"], padding=args.padding)
    images = args.particles * args.tilts
    print(f"box {args.box}, bin {args.bin}, {args.particles} particles x {args.tilts} tilts, "
          f"device {args.device}, threads {args.threads or 'default'}, "
          f"padding {jobs['reconstruct'].padding:g}")  # fmt: skip
    walls = {}
    for kind, params in jobs.items():
        for k in range(args.repeats):
            shutil.rmtree(params.output_dir, ignore_errors=True)
            load = os.getloadavg()[0]
            wall, cpu, rss, note = _timed(kind, params, args.threads)
            walls[kind] = min(walls.get(kind, wall), wall)
            print(f"{kind:12s} run {k + 1}: {wall:6.2f} s (CPU {cpu:5.2f} s)  "
                  f"{args.particles / wall:5.0f} particles/s  {images / wall:6.0f} tilt images/s  "
                  f"peak RSS {rss:5.0f} MiB  (load {load:.1f}) {note}")  # fmt: skip
    commands = {}
    if args.device == "cpu" and not args.padding and not args.threads:
        for kind in jobs:
            commands[kind] = _command(kind, args)
            if commands[kind] is not None:
                print(f"{kind:12s} command: {commands[kind]:6.2f} s  (`subtomo {kind}` as typed: "
                      "Python and torch start-up, job and report)")  # fmt: skip
    if args.relion_bin:
        ratios = {
            "extract": _relion(args, "relion_tomo_subtomo", ["--stack2d"]),
            "reconstruct": _relion(args, "relion_tomo_reconstruct_particle", []),
        }
        for kind, wall in ratios.items():
            if wall is not None:
                whole = commands.get(kind)
                print(f"{kind}: RELION / subtomo time ratio {wall / walls[kind]:.2f} (job)"
                      + (f", {wall / whole:.2f} (command)" if whole else ""))  # fmt: skip
    if tmp is not None:
        os.chdir("/")
        tmp.cleanup()


if __name__ == "__main__":
    main()
