"""Benchmark and bars of ``subtomo initial-model`` (issue #18).

Simulates 300 particles in random orientations (box 64, 41 tilts, SNR 0.05, picked centres
1 px off; the initial model ignores the picked orientations), extracts 2D stacks and runs
the initial model; prints the wall time, peak RSS of the job and the Pearson correlation with
the truth at 30 Å after the best alignment, for the map as written and for its mirror image
(:func:`subtomo.ml.align_maps.align_maps`; bar >= 0.8 in <= 10 min on 2 cores), and the
median angular error of the poses once the map's frame is taken out.

Targets (``--targets``): ``ribosome`` (the asymmetric 70S ribosome, 10 Å/px) and
``proteasome`` (the D7 20S proteasome of :mod:`proteasome`, 5 Å/px, ``--sym D7``: C1 run,
then aligned to the D7 axes and symmetrised). ``--k2``: a 50/50 mixture of the 70S and the 50S
ribosome, K = 2: the correlation of each class with each species (bar: each class >= 0.8
with one species). ``--refine``: Refine3D of the ribosome particles from the initial model and
from the truth low-passed to 30 Å; the FSC of each result against the truth (after aligning
the de novo one) where it crosses 0.5 and 0.143 (bar: within one Fourier shell). Refine3D's
global searches take long on 2 shared cores (not run for the numbers in the README).

Measured (2 shared cores, load < 1): ribosome 168 s, 266 CPU s, 1.57 GiB, correlation 0.977
(mirror 0.885), poses 8.4 deg; proteasome 89 s, 149 CPU s, 0.992 (mirror 0.969); K = 2 (load
~13) 910 s, 379 CPU s, classes 0.982 with 70S and 0.982 with 50S, 296 of 300 particles in
their species' class (232 s, 403 CPU s at load < 1).

    python benchmarks/initial_model.py --workdir /tmp/bim [--targets ribosome proteasome]
        [--k2] [--refine] [--iter 15] [--extra "--grad_fin_subset 300"]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shlex
import subprocess
import time
from pathlib import Path

import torch

from proteasome import proteasome_map
from subtomo.data import ParticleSet
from subtomo.fourier import fsc_maps, lowpass_map, shell_resolution_angst
from subtomo.geometry import rotation_angle_deg
from subtomo.io import read_mrc, write_mrc
from subtomo.masks import soft_sphere
from subtomo.ml.align_maps import align_maps, mirror_z, transform_volume

DEMO = Path(__file__).resolve().parents[1] / "src" / "subtomo" / "demo_data"


def _sh(*args: str, cwd: Path) -> None:
    subprocess.run(args, check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def project(root: Path, maps: list[str], px: float, particles: int = 300) -> Path:
    """Simulate (if not there) and extract 2D stacks of box 64."""
    if not (root / "ext" / "optimisation_set.star").is_file():
        args = ["subtomo", "simulate", "--out", str(root), "--preset", "benchmark",
                "--particles", str(particles), "--box", "64", "--pixel-size", str(px),
                "--shift-error-px", "1"]  # fmt: skip
        for m in maps:
            args += ["--map", m]
        _sh(*args, cwd=Path("."))
        _sh("subtomo", "extract", "--particles", "particles_picked.star", "--tomograms",
            "tomograms.star", "--b", "64", "--o", "ext", "--device", "cpu", cwd=root)  # fmt: skip
    return root


def run_initial_model(root: Path, out: str, options: list[str]) -> str:
    """Run the job in ``root`` (if not done); its wall and CPU seconds (user + system, all
    threads) and the children's peak RSS."""
    if (root / out / "initial_model.mrc").is_file():
        return "(done before)"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    _sh("subtomo", "initial-model", "--ios", "ext/optimisation_set.star", "--device", "cpu",
        "--o", out, *options, cwd=root)  # fmt: skip
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return f"{wall:.0f} s wall, {cpu:.0f} CPU s, peak RSS {after.ru_maxrss / 2**20:.2f} GiB"


def correlations(truth: torch.Tensor, volume: torch.Tensor, px: float, res: float = 30.0):
    """Alignment of ``volume`` onto ``truth`` (both hands) at ``res`` Å."""
    return align_maps(truth.float(), volume.float(), px, res)


def frame_pose_error(data: Path, truth: Path) -> float:
    """Median angle (deg) between estimated and true ``A_part`` once one rotation of the whole
    map is taken out (the ``A_true^T A_est`` with most others within 20 deg)."""
    est = ParticleSet.read(data).particle_matrices().double()
    true = ParticleSet.read(truth).particle_matrices().double()
    rel = true.transpose(1, 2) @ est
    agree = (rotation_angle_deg(rel[:, None], rel[None]) < 20).sum(1)
    return float(rotation_angle_deg(rel, rel[int(agree.argmax())]).median())


def _last_data(job: Path) -> Path:
    return sorted(job.glob("run_it*_data.star"))[-1]


def bar_target(name: str, args) -> None:
    wd = args.workdir
    if name == "ribosome":
        px, maps, sym, diameter = 10.0, [str(DEMO / "ribosome70S_4v4r_5A.mrc.gz")], "C1", 300
    else:
        px, sym, diameter = 5.0, "D7", 200
        wd.mkdir(parents=True, exist_ok=True)
        path = wd / "proteasome.mrc"
        if not path.is_file():
            write_mrc(path, torch.from_numpy(proteasome_map(px, 64)).float(), px)
        maps = [str(path)]
    root = project(wd / name, maps, px)
    opts = ["--iter", str(args.iter), "--particle_diameter", str(diameter), "--maxres", "30",
            "--sym", sym, *shlex.split(args.extra)]  # fmt: skip
    timing = run_initial_model(root, "InitialModel", opts)
    truth, _ = read_mrc(root / "truth.mrc")
    final, _ = read_mrc(root / "InitialModel" / "initial_model.mrc")
    a = correlations(truth, final, px)
    same, mirror = (a.other_hand_correlation, a.correlation) if a.mirrored else (
        a.correlation, a.other_hand_correlation)  # fmt: skip
    line = (
        f"{name} ({sym}, 300 particles, box 64, {px:g} Å/px): {timing}; correlation with "
        f"the truth at 30 Å: {same:.3f} as written, {mirror:.3f} mirrored (bar >= 0.8)"
    )
    if sym == "C1":  # (the pose error below ignores symmetry copies)
        err = frame_pose_error(_last_data(root / "InitialModel"), root / "particles.star")
        line += f"; median pose error in the map's frame {err:.1f} deg"
    print(line)


def bar_k2(args) -> None:
    maps = [str(DEMO / f"ribosome{s}_4v4r_5A.mrc.gz") for s in ("70S", "50S")]
    root = project(args.workdir / "mix", maps, 10.0)
    opts = ["--iter", str(args.iter), "--K", "2", "--particle_diameter", "300", "--maxres",
            "30", *shlex.split(args.extra)]  # fmt: skip
    timing = run_initial_model(root, "InitialModel", opts)
    job = root / "InitialModel"
    it = _last_data(job).name[:9]
    species = {s: read_mrc(root / f"truth_ribosome{s}_4v4r_5A.mrc")[0] for s in ("70S", "50S")}
    print(f"K=2 (70S/50S 50/50, 300 particles): {timing}")
    for c in (1, 2):
        vol, _ = read_mrc(job / f"{it}_class{c:03d}.mrc")
        ccs = {s: correlations(t, vol, 10.0).correlation for s, t in species.items()}
        print(f"  class {c}: " + ", ".join(f"{s} {v:.3f}" for s, v in ccs.items())
              + " (bar: >= 0.8 with one species)")  # fmt: skip
    parts = ParticleSet.read(_last_data(job)).particles
    print(
        "  class x species counts:\n"
        + str(parts.groupby(["rlnClassNumber", "subtomoSpecies"]).size().unstack(fill_value=0))
    )


def _fsc_shells(a: torch.Tensor, b: torch.Tensor, px: float) -> tuple[int, int]:
    n = a.shape[-1]
    curve = fsc_maps(a.float(), b.float(), soft_sphere((n,) * 3, n / 2 - 6, 4.0))
    out = []
    for level in (0.5, 0.143):
        below = torch.nonzero(curve[1:] < level)
        out.append(int(below[0]) if len(below) else len(curve) - 1)
    return out[0], out[1]


def bar_refine(args) -> None:
    root = args.workdir / "ribosome"
    truth, px = read_mrc(root / "truth.mrc")
    write_mrc(root / "truth30.mrc", lowpass_map(truth, 30.0, px), px)
    res = shell_resolution_angst(33, 64, px)
    for label, ref in (("from the initial model", "InitialModel/initial_model.mrc"),
                       ("from the truth at 30 Å", "truth30.mrc")):  # fmt: skip
        out = "Refine_" + ref.split("/")[0].replace(".mrc", "")
        if not (root / out / "run_class001.mrc").is_file():
            start = time.perf_counter()
            _sh("subtomo", "refine3d", "--ios", "ext/optimisation_set.star", "--ref", ref,
                "--ini_high", "30", "--particle_diameter", "300", "--device", "cpu",
                "--o", out, cwd=root)  # fmt: skip
            print(f"  refine3d {label}: {time.perf_counter() - start:.0f} s")
        vol, _ = read_mrc(root / out / "run_class001.mrc")
        a = align_maps(truth, vol, px, 20.0)
        moving = mirror_z(vol) if a.mirrored else vol
        placed = transform_volume(moving, a.rotation[None].float(), a.shift_px[None].float())[0]
        s5, s143 = _fsc_shells(placed, truth, px)
        print(f"Refine3D {label}: FSC to the truth 0.5 at shell {s5} ({float(res[s5]):.1f} Å), "
              f"0.143 at shell {s143} ({float(res[s143]):.1f} Å)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--targets", nargs="*", default=["ribosome", "proteasome"])
    ap.add_argument("--k2", action="store_true")
    ap.add_argument("--refine", action="store_true")
    ap.add_argument("--iter", type=int, default=15)
    ap.add_argument("--extra", default="", help="more initial-model options")
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    with contextlib.chdir(args.workdir.parent):
        for name in args.targets:
            bar_target(name, args)
        if args.k2:
            bar_k2(args)
        if args.refine:
            bar_refine(args)


if __name__ == "__main__":
    main()
