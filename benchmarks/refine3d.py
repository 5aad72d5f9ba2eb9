"""Benchmark of ``subtomo refine3d``: wall time to convergence, and per iteration the median
angular and position errors of the poses and the FSC of the map against the truth; peak RSS;
optionally the same run of a RELION binary.

Simulates particles picked with pose errors (default 6 deg, 1.5 px), extracts 2D stacks,
reconstructs a reference at the picked poses low-passed to 30 Å, and refines. Reports the
gold-standard resolution (FSC 0.143 of the unfiltered halves), where the final map's FSC
against the (binned) truth crosses 0.5 with a soft mask made from the truth and without, the
same for a plain reconstruction (``subtomo reconstruct``) from the final poses, and the median
angular (modulo ``--sym``) and position errors.

``--map proteasome`` simulates the T. acidophilum 20S proteasome (D7, PDB 3J9I;
:mod:`proteasome`), ``--map ribosome`` the 70S ribosome of the demo. ``--c6`` replaces the
particle by a C6 object (:func:`c6_object`) and refines the same particles twice, with C1
and with C6, to show what the symmetry gains.

    python benchmarks/refine3d.py --work /tmp/bench_d7 --map proteasome --pixel-size 5 \
        --box 64 --bin 1 --extra "--healpix_order 3 --sigma_ang 3 --offset_range 2 \
        --offset_step 1"
    python benchmarks/refine3d.py ... --relion-bin "mpirun -n 3 relion_refine_mpi"
    python benchmarks/refine3d.py --work /tmp/bench_c6 --c6 --particles 60 --box 32 --bin 1
"""

from __future__ import annotations

import argparse
import math
import resource
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import torch

from proteasome import proteasome_map
from subtomo.data import ParticleSet
from subtomo.fourier import fsc_maps, lowpass_map
from subtomo.geometry import euler_to_matrix, rotation_angle_deg
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.io import read_mrc, write_mrc
from subtomo.masks import mask_from_map
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


def _truth_mask(ref: torch.Tensor) -> torch.Tensor:
    """Soft mask of the (binned) truth: 2% of its maximum, extended 2 px, 4 px soft edge."""
    return mask_from_map(ref.float(), 0.02 * float(ref.max()), extend=2, soft_edge_width=4)


def _fsc05_angst(a: torch.Tensor, b: torch.Tensor, px: float, mask=None) -> float:
    shell = crossing_shell(fsc_maps(a.double(), b.double(), mask), 0.5)
    return a.shape[-1] * px / max(shell, 1e-9)


def _mean_fsc(a: torch.Tensor, b: torch.Tensor, px: float, mask, from_angst: float = 30.0) -> float:
    """Mean masked FSC between ``a`` and ``b`` over the shells from ``from_angst`` to Nyquist:
    a figure of the whole curve, where the 0.5 crossing alone can move by a third of a shell
    for FSC differences of 0.005 where the curve runs flat near 0.5."""
    n = a.shape[-1]
    f = fsc_maps(a.double(), b.double(), mask)
    return float(f[math.ceil(n * px / from_angst) : n // 2 + 1].mean())


def _pose_errors(truth: ParticleSet, run: ParticleSet, sym: str) -> tuple[float, float, float]:
    """Median angular error (deg, modulo the point group), the same after removing the
    common rotation of the map's frame against the truth's (a refinement may settle in a
    slightly rotated frame; every particle then carries that rotation), and median position
    error (Å, particle centres ``C - A_sub o``) of ``run`` against ``truth``."""
    order = {n: i for i, n in enumerate(truth.particles["rlnTomoParticleName"])}
    idx = [order[n] for n in run.particles["rlnTomoParticleName"]]
    a_true = truth.particle_matrices()[idx].double()
    a_run = run.particle_matrices().double()
    ops = symmetry_matrices(sym).double()  # the map equals itself under A -> A S
    errs = torch.stack([rotation_angle_deg(a_run, a_true @ s) for s in ops])
    err, best = errs.amin(0), errs.argmin(0)
    a_true = a_true @ ops[best]  # the symmetry copy each particle is closest to
    u, _, vt = torch.linalg.svd((a_true.transpose(-1, -2) @ a_run).mean(0))
    frame = u @ vt  # the closest rotation to the mean of A_true^T A_run
    err_frame = rotation_angle_deg(a_run, a_true @ frame)

    def centres(p: ParticleSet, rows) -> torch.Tensor:
        c = p.centered_coordinates_angst()[rows].double()
        o = p.origins_angst()[rows].double()
        return c - (p.subtomogram_matrices()[rows].double() @ o[..., None])[..., 0]

    dist = (centres(run, slice(None)) - centres(truth, idx)).norm(dim=-1)
    return float(err.median()), float(err_frame.median()), float(dist.median())


def _evaluate(root: Path, run_dir: Path, box: int, px: float, sym: str) -> dict[str, float]:
    truth, tpx = read_mrc(root / "truth.mrc")
    ref = _binned_truth(truth, tpx, box, px)
    mask = _truth_mask(ref)
    final, _ = read_mrc(run_dir / "run_class001.mrc")
    h1, _ = read_mrc(run_dir / "run_half1_class001_unfil.mrc")
    h2, _ = read_mrc(run_dir / "run_half2_class001_unfil.mrc")
    gold = crossing_shell(fsc_maps(h1.double(), h2.double()), 0.143)
    t = ParticleSet.read(root / "particles.star")
    out = {"gold_standard_angst": box * px / max(gold, 1e-9)}
    previous = (run_dir / "job.star").stat().st_mtime  # written when the job starts
    for it in sorted(run_dir.glob("run_it*_data.star")):
        tag = it.name[len("run_") : -len("_data.star")]
        ended = it.stat().st_mtime
        ang, ang_frame, pos = _pose_errors(t, ParticleSet.read(it), sym)
        maps = [run_dir / f"run_{tag}_half{h}_class001.mrc" for h in (1, 2)]
        line = f"median angle {ang:.2f} deg ({ang_frame:.2f} in the map's frame), "
        line += f"position {pos:.2f} Å"
        if all(m.is_file() for m in maps):
            avg = 0.5 * (read_mrc(maps[0])[0] + read_mrc(maps[1])[0])
            line += f", FSC 0.5 vs truth (masked) {_fsc05_angst(avg, ref, px, mask):.1f} Å"
        print(f"  {tag}: {line}; {ended - previous:.0f} s wall")
        previous = ended
    print(f"  final iteration: {(run_dir / 'run_data.star').stat().st_mtime - previous:.0f} s wall")
    ang, ang_frame, pos = _pose_errors(t, ParticleSet.read(run_dir / "run_data.star"), sym)
    out.update({
        "fsc_truth_0.5_masked_angst": _fsc05_angst(final, ref, px, mask),
        "fsc_truth_0.5_unmasked_angst": _fsc05_angst(final, ref, px),
        "fsc_truth_mean_30A_to_nyquist_masked": _mean_fsc(final, ref, px, mask),
        "median_angle_error_deg": ang,
        "median_angle_error_in_map_frame_deg": ang_frame,
        "median_position_error_angst": pos,
    })  # fmt: skip
    plain = run_dir.parent / f"{run_dir.name}_reconstruct"
    if not (plain / "merged.mrc").is_file():
        _run([shutil.which("subtomo") or "subtomo", "reconstruct", "--p",
              str(run_dir / "run_data.star"), "--t", "tomograms.star", "--sym", sym,
              "--o", str(plain)], root)  # fmt: skip
    rec, _ = read_mrc(plain / "merged.mrc")
    out["plain_reconstruction_fsc_truth_0.5_masked_angst"] = _fsc05_angst(rec, ref, px, mask)
    out["plain_reconstruction_fsc_truth_mean_30A_to_nyquist_masked"] = _mean_fsc(rec, ref, px, mask)
    return out


def _simulate(root: Path, a: argparse.Namespace) -> None:
    exe = [shutil.which("subtomo") or "subtomo"]
    root.mkdir(parents=True, exist_ok=True)
    maps = []
    if a.c6:
        write_mrc(root / "c6.mrc", c6_object(), 10.0)
        maps = ["--map", str(root / "c6.mrc")]
    elif a.map == "proteasome":
        vol = proteasome_map(a.pixel_size, a.sim_box)
        write_mrc(root / "proteasome.mrc", torch.from_numpy(vol), a.pixel_size)
        maps = ["--map", str(root / "proteasome.mrc")]
    extra = ["--pixel-size", str(a.pixel_size)] if a.pixel_size else []
    _run([*exe, "simulate", "--out", str(root), "--preset", a.preset, *maps, *extra,
          "--particles", str(a.particles), "--tomograms", str(a.tomograms),
          "--tilt-step", str(a.tilt_step), "--noise", "gaussian", "--snr", str(a.snr),
          "--pose-error-deg", str(a.pose_error_deg), "--seed", str(a.seed),
          "--shift-error-px", str(a.shift_error_px)], root.parent)  # fmt: skip
    _run([*exe, "extract", "--p", "particles_picked.star", "--t", "tomograms.star",
          "--box", str(a.box), "--bin", str(a.bin), "--float32", "--o", "ext"],
         root)  # fmt: skip
    _run([*exe, "reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec"], root)
    vol, px = read_mrc(root / "rec" / "merged.mrc")
    write_mrc(root / "rec" / "ref30.mrc", lowpass_map(vol, 30.0, px), px)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--map", choices=("ribosome", "proteasome"), default="ribosome")
    ap.add_argument("--pixel-size", type=float, default=None, help="Å/px (preset's if unset)")
    ap.add_argument("--sim-box", type=int, default=64, help="box of the proteasome map (px)")
    ap.add_argument("--particles", type=int, default=200)
    ap.add_argument("--tomograms", type=int, default=2)
    ap.add_argument("--tilt-step", type=float, default=3.0)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
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
        _simulate(root, a)
    _, px = read_mrc(root / "rec" / "ref30.mrc")
    for sym in ("C1", "C6") if a.c6 else (a.sym,):
        out = root / f"refine_{sym}"
        args = [*exe, "refine3d", "--ios", "ext/optimisation_set.star", "--ref",
                "rec/ref30.mrc", "--ini_high", "30", "--sym", sym, "--device", a.device,
                "--o", str(out), *shlex.split(a.extra)]  # fmt: skip
        wall = _run(args, root)
        iterations = len(list(out.glob("run_it*_optimiser.star")))
        report = {"wall_s": wall, "iterations": iterations, "peak_rss_mb": _children_rss_mb()}
        report.update(_evaluate(root, out, a.box, px, sym))
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
        print({k: round(v, 3) for k, v in _evaluate(root, rdir, a.box, px, a.sym).items()})


if __name__ == "__main__":
    main()
