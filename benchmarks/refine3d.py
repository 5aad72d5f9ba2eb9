"""Benchmark of ``subtomo refine3d``: wall time to convergence, iterations, resolution, FSC and
pose error against the truth, peak RSS; optionally the same run of a RELION binary.

Simulates particles picked with pose errors (default 6 deg, 1.5 px), extracts 2D stacks,
reconstructs a reference at the picked poses low-passed to 30 Å, and refines. Reports the
gold-standard resolution (FSC 0.143 of the unfiltered halves), where the final map's FSC
against the (binned) truth crosses 0.5, and the median angular error.

``--c6`` replaces the ribosome by a C6 object (six copies of an asymmetric three-blob subunit
about z, :func:`c6_object`) and refines the same particles twice, with C1 and with C6, to show
what the symmetry gains (issue 6: a symmetric object refined with its symmetry reaches a
better resolution than C1 with the same particles).

    python benchmarks/refine3d.py --work /tmp/bench_refine --particles 200 --box 32 --bin 2
    python benchmarks/refine3d.py ... --relion-bin "mpirun -n 3 relion_refine_mpi"
    python benchmarks/refine3d.py --work /tmp/bench_c6 --c6 --particles 60 --box 32 --bin 1
"""

from __future__ import annotations

import argparse
import resource
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import torch

from subtomo.data import ParticleSet
from subtomo.fourier import fsc_maps, lowpass_map
from subtomo.geometry import euler_to_matrix, rotation_angle_deg
from subtomo.io import read_mrc, write_mrc
from subtomo.postprocess import crossing_shell


def _run(args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, cwd=cwd, check=True)
    return time.perf_counter() - t0


def _children_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _binned_truth(truth: torch.Tensor, px: float, box: int, out_px: float) -> torch.Tensor:
    """The truth at ``out_px`` in a ``box`` cube (Fourier crop, then pad/crop; centre n//2)."""
    n = truth.shape[-1]
    m = round(n * px / out_px)
    f = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(truth.double())))
    c = n // 2
    f = f[c - m // 2 : c - m // 2 + m, c - m // 2 : c - m // 2 + m, c - m // 2 : c - m // 2 + m]
    small = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(f))).real
    out = torch.zeros(box, box, box, dtype=torch.float64)
    a, b = max(0, box // 2 - m // 2), max(0, m // 2 - box // 2)
    k = min(m, box)
    out[a : a + k, a : a + k, a : a + k] = small[b : b + k, b : b + k, b : b + k]
    return out


def c6_object(box: int = 48) -> torch.Tensor:
    """A C6 test object ``(box,)*3`` (zyx, centre ``box//2``): six copies, rotated by 60 deg
    about z, of a subunit of three Gaussian blobs of different sizes at different radii and
    heights (so the subunit itself has no symmetry)."""
    c = box // 2
    z, y, x = torch.meshgrid(*(torch.arange(box, dtype=torch.float64) - c,) * 3, indexing="ij")
    grid = torch.stack([x, y, z], -1)  # xyz
    blobs = torch.tensor([[0.18, 0.0, 0.08, 0.07, 1.0], [0.26, 0.05, -0.06, 0.05, 0.8],
                          [0.10, 0.08, -0.14, 0.04, 0.6]], dtype=torch.float64)  # fmt: skip
    vol = torch.zeros(box, box, box, dtype=torch.float64)
    for k in range(6):
        r = euler_to_matrix(60.0 * k, 0.0, 0.0).double()
        for bx, by, bz, sigma, amp in blobs.tolist():
            centre = r @ torch.tensor([bx, by, bz], dtype=torch.float64) * box
            d2 = ((grid - centre) ** 2).sum(-1)
            vol += amp * torch.exp(-d2 / (2 * (sigma * box) ** 2))
    return vol.float()


def _evaluate(root: Path, run_dir: Path, box: int, px: float) -> dict[str, float]:
    truth, tpx = read_mrc(root / "truth.mrc")
    ref = _binned_truth(truth, tpx, box, px)
    final, _ = read_mrc(run_dir / "run_class001.mrc")
    h1, _ = read_mrc(run_dir / "run_half1_class001_unfil.mrc")
    h2, _ = read_mrc(run_dir / "run_half2_class001_unfil.mrc")
    gold = crossing_shell(fsc_maps(h1.double(), h2.double()), 0.143)
    vs_truth = crossing_shell(fsc_maps(final.double(), ref), 0.5)
    t = ParticleSet.read(root / "particles.star")
    r = ParticleSet.read(run_dir / "run_data.star")
    order = {n: i for i, n in enumerate(t.particles["rlnTomoParticleName"])}
    idx = [order[n] for n in r.particles["rlnTomoParticleName"]]
    err = rotation_angle_deg(r.particle_matrices().double(), t.particle_matrices()[idx].double())
    return {
        "gold_standard_shell_0.143": gold,
        "gold_standard_angst": box * px / max(gold, 1e-9),
        "fsc_truth_0.5_shell": vs_truth,
        "fsc_truth_0.5_angst": box * px / max(vs_truth, 1e-9),
        "median_angle_error_deg": float(err.median()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--particles", type=int, default=200)
    ap.add_argument("--tomograms", type=int, default=2)
    ap.add_argument("--tilt-step", type=float, default=3.0)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--box", type=int, default=32, help="extracted box (binned px)")
    ap.add_argument("--bin", type=float, default=2.0)
    ap.add_argument("--sym", default="C1")
    ap.add_argument("--c6", action="store_true", help="C6 object, refined with C1 and C6")
    ap.add_argument("--preset", default="benchmark", help="simulate preset")
    ap.add_argument("--pose-error-deg", type=float, default=6.0)
    ap.add_argument("--shift-error-px", type=float, default=1.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extra", default="", help="more refine3d options")
    ap.add_argument("--relion-bin", default=None, help="e.g. 'relion_refine --j 2 --cpu'")
    a = ap.parse_args()
    root = a.work.resolve()
    exe = [shutil.which("subtomo") or "subtomo"]
    if not (root / "particles.star").is_file():
        maps = []
        if a.c6:
            root.mkdir(parents=True, exist_ok=True)
            write_mrc(root.parent / f"{root.name}_c6.mrc", c6_object(), 10.0)
            maps = ["--map", str(root.parent / f"{root.name}_c6.mrc")]
        _run([*exe, "simulate", "--out", str(root), "--preset", a.preset, *maps,
              "--particles", str(a.particles), "--tomograms", str(a.tomograms),
              "--tilt-step", str(a.tilt_step), "--noise", "gaussian", "--snr", str(a.snr),
              "--pose-error-deg", str(a.pose_error_deg),
              "--shift-error-px", str(a.shift_error_px)], root.parent)  # fmt: skip
        _run([*exe, "extract", "--p", "particles_picked.star", "--t", "tomograms.star",
              "--box", str(a.box), "--bin", str(a.bin), "--float32", "--o", "ext"],
             root)  # fmt: skip
        _run([*exe, "reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec"], root)
        vol, px = read_mrc(root / "rec" / "merged.mrc")
        write_mrc(root / "rec" / "ref30.mrc", lowpass_map(vol, 30.0, px), px)
    _, px = read_mrc(root / "rec" / "ref30.mrc")
    for sym in ("C1", "C6") if a.c6 else (a.sym,):
        out = root / f"refine_{sym}"
        args = [*exe, "refine3d", "--ios", "ext/optimisation_set.star", "--ref",
                "rec/ref30.mrc", "--ini_high", "30", "--sym", sym, "--device", a.device,
                "--o", str(out), *shlex.split(a.extra)]  # fmt: skip
        wall = _run(args, root)
        iterations = len(list(out.glob("run_it*_optimiser.star")))
        report = {"wall_s": wall, "iterations": iterations, "peak_rss_mb": _children_rss_mb()}
        report.update(_evaluate(root, out, a.box, px))
        for k, v in report.items():
            print(f"subtomo {sym} {k}: {v:.3f}" if isinstance(v, float)
                  else f"subtomo {sym} {k}: {v}")  # fmt: skip
    if a.relion_bin:
        rdir = root / f"relion_{a.sym}"
        rdir.mkdir(exist_ok=True)
        cmd = [*shlex.split(a.relion_bin), "--auto_refine", "--split_random_halves",
               "--ios", "ext/optimisation_set.star", "--ref", "rec/ref30.mrc", "--ini_high", "30",
               "--firstiter_cc", "--pad", "2", "--ctf", "--particle_diameter",
               str(0.9 * a.box * px), "--flatten_solvent", "--zero_mask", "--oversampling", "1",
               "--healpix_order", "2", "--auto_local_healpix_order", "4", "--offset_range", "5",
               "--offset_step", "1", "--sym", a.sym, "--low_resol_join_halves", "40", "--norm",
               "--scale", "--o", f"{rdir.name}/run"]  # fmt: skip
        t = _run(cmd, root)
        print(f"relion wall_s: {t:.1f}")
        print({k: round(v, 3) for k, v in _evaluate(root, rdir, a.box, px).items()})


if __name__ == "__main__":
    main()
