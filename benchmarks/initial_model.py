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
with one species). ``--refine`` (with ``--pose-error-deg 6``): per target, Refine3D from the
initial model put into the truth's hand and frame (decided by the truth, as a user would by
a known structure) and from the truth low-passed to 30 Å, same particles and flags (local
searches from order 3, sigma 3 deg, +-2 px); masked FSC to the truth at 0.5 and 0.143 (bar:
within one Fourier shell). Measured (load 7-13): ribosome from the initial model 0.5 at shell
24.40 (26.2 Å), 0.143 at 32 (Nyquist, 20 Å); from the truth 25.32 (25.3 Å), 32: -0.93 and 0
shells (1547 s and 2813 s); proteasome (load 3-4) from the initial model and from the
truth both at Nyquist for 0.5 and 0.143 (+0.00 shells; FSC at Nyquist 0.698 and 0.700,
every shell within 0.002), 628 s and 728 s.

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
from subtomo.fourier import crossing_shell, fsc_maps, lowpass_map
from subtomo.geometry import rotation_angle_deg
from subtomo.io import read_mrc, write_mrc
from subtomo.masks import mask_from_map
from subtomo.ml.align_maps import align_maps, mirror_z, transform_volume

DEMO = Path(__file__).resolve().parents[1] / "src" / "subtomo" / "demo_data"
#: target -> (pixel size Å, symmetry, mask diameter Å)
TARGETS = {"ribosome": (10.0, "C1", 300), "proteasome": (5.0, "D7", 200)}


def _sh(*args: str, cwd: Path) -> None:
    subprocess.run(args, check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def project(root: Path, maps: list[str], px: float, pose_error_deg: float = 0.0) -> Path:
    """Simulate 300 particles (if not there; picks 1 px and ``pose_error_deg`` off) and
    extract 2D stacks of box 64."""
    if not (root / "ext" / "optimisation_set.star").is_file():
        args = ["subtomo", "simulate", "--out", str(root), "--preset", "benchmark",
                "--particles", "300", "--box", "64", "--pixel-size", str(px),
                "--shift-error-px", "1", "--pose-error-deg", str(pose_error_deg)]  # fmt: skip
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
    px, sym, diameter = TARGETS[name]
    if name == "ribosome":
        maps = [str(DEMO / "ribosome70S_4v4r_5A.mrc.gz")]
    else:
        wd.mkdir(parents=True, exist_ok=True)
        path = wd / "proteasome.mrc"
        if not path.is_file():
            write_mrc(path, torch.from_numpy(proteasome_map(px, 64)).float(), px)
        maps = [str(path)]
    root = project(wd / name, maps, px, args.pose_error_deg)
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


def _truth_frame(truth: torch.Tensor, volume: torch.Tensor, px: float) -> torch.Tensor:
    """``volume`` in the truth's hand and frame (:func:`align_maps` at 30 Å: the benchmark
    decides hand and frame by the truth, as a user would by a known structure)."""
    a = correlations(truth, volume, px)
    moving = mirror_z(volume) if a.mirrored else volume
    return transform_volume(moving.float(), a.rotation[None].float(), a.shift_px[None].float())[0]


def _fsc_shells(a: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    """Shells where the FSC of ``a`` and ``truth`` (soft mask of the truth: 2% of its
    maximum, extended 2 px, 4 px edge) falls below 0.5 and 0.143, and its value at Nyquist
    (what still tells two maps apart when both reach Nyquist)."""
    mask = mask_from_map(truth.float(), 0.02 * float(truth.max()), extend=2, soft_edge_width=4)
    curve = fsc_maps(a.double(), truth.double(), mask)
    return crossing_shell(curve, 0.5), crossing_shell(curve, 0.143), float(curve[-1])


def bar_refine(name: str, args) -> None:
    """Refine3D from (a) the initial model placed in the truth's hand and frame and (b) the
    truth low-passed to 30 Å: same particles (picks ``--pose-error-deg`` off), same flags
    (local searches from HEALPix order 3, sigma 3 deg, +-2 px); masked FSC to the truth."""
    root = args.workdir / name
    sym, diameter = TARGETS[name][1:]
    truth, px = read_mrc(root / "truth.mrc")
    initial, _ = read_mrc(root / "InitialModel" / "initial_model.mrc")
    write_mrc(root / "initial_truthframe.mrc", _truth_frame(truth, initial, px), px)
    write_mrc(root / "truth30.mrc", lowpass_map(truth, 30.0, px), px)
    n = truth.shape[-1]
    shells = {}
    for label, ref in (("initial model", "initial_truthframe.mrc"),
                       ("truth at 30 Å", "truth30.mrc")):  # fmt: skip
        out = "Refine_" + ref.removesuffix(".mrc")
        timing = "(done before)"
        if not (root / out / "run_class001.mrc").is_file():
            start = time.perf_counter()
            _sh("subtomo", "refine3d", "--ios", "ext/optimisation_set.star", "--ref", ref,
                "--ini_high", "30", "--particle_diameter", str(diameter), "--sym", sym,
                "--healpix_order", "3", "--sigma_ang", "3", "--offset_range", "2",
                "--offset_step", "1", "--device", "cpu", "--o", out, cwd=root)  # fmt: skip
            timing = f"{time.perf_counter() - start:.0f} s"
        vol, _ = read_mrc(root / out / "run_class001.mrc")
        shells[label] = _fsc_shells(vol, truth)
        s5, s143, nyquist = shells[label]
        print(f"  {name} Refine3D from the {label} ({timing}): masked FSC to the truth 0.5 at "
              f"shell {s5:.2f} ({n * px / s5:.1f} Å), 0.143 at shell {s143:.2f} "
              f"({n * px / s143:.1f} Å), {nyquist:.3f} at Nyquist")  # fmt: skip
    (a5, a143, _), (b5, b143, _) = shells.values()
    print(
        f"{name}: initial model minus truth start: {a5 - b5:+.2f} shells at FSC 0.5, "
        f"{a143 - b143:+.2f} at 0.143 (bar: within one shell)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--targets", nargs="*", default=["ribosome", "proteasome"])
    ap.add_argument("--k2", action="store_true")
    ap.add_argument("--refine", action="store_true")
    ap.add_argument("--iter", type=int, default=15)
    ap.add_argument(
        "--pose-error-deg",
        type=float,
        default=0.0,
        help="picks' orientation error (Refine3D's starting poses; 6 for --refine)",
    )
    ap.add_argument("--extra", default="", help="more initial-model options")
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    with contextlib.chdir(args.workdir.parent):
        for name in args.targets:
            bar_target(name, args)
            if args.refine:
                bar_refine(name, args)
        if args.k2:
            bar_k2(args)


if __name__ == "__main__":
    main()
