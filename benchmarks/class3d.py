"""Benchmark and quality bars of ``subtomo class3d`` (issue #5).

Speed (default): simulate a project (box 64, 41 tilts, ``--particles``, picked poses 8 deg /
2 px off), extract 2D stacks, run K=1 local searches (HEALPix order 3, sigma 3 deg, offsets
2 px) and print seconds per iteration, coarse-pass E-step pose evaluations per second
(particles x rotations x translations x classes / seconds; the oversampled second pass is not
counted) and the peak RSS of the classification (simulation and extraction run in
subprocesses). ``--relion-bin relion_refine`` runs RELION on the same data and cores.

Quality (``--bars [all|align|k2|k4]``): median angular error (full rotation matrices; bar
< 2 deg), median centre error and FSC to the truth per iteration of local refinement from
poses 8 deg / 2 px off, against the reconstruction at the picked poses (5 iterations); K=2
separation of a 50/50 70S/50S mixture with true poses (bar >= 95%; printed with what one
E-step with the two true maps achieves, i.e. what the data allow) and K=4 purity (bar: no
class > 5% of the other species), per iteration (25 iterations).

Hard mixture (``--bars hard``, issue #21): the T. acidophilum 20S proteasome (D7, PDB 3J9I;
``proteasome.py``) and the same complex without one outer alpha ring (74% of the mass),
2 tomograms x 100 particles, 50/50, true poses, 41 tilts, 5 Å/px, box 64; K=2 without
alignment from the reconstruction of all particles (``--ini_high 60``), swept over SNR
(``--snrs``) and random seeds (``--seeds``, each a new simulation and classification seed).
Purity: the fraction of particles in the class of their own species (classes matched to the
species by majority), per SNR and seed, and the mean over seeds.

Usage: ``python benchmarks/class3d.py --workdir /tmp/c3d [--particles 1000] [--iter N]
[--bars [all|align|k2|k4|hard]] [--snrs 0.05 0.003 0.001] [--seeds 0 1 2]
[--relion-bin PATH] [--threads N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from proteasome import proteasome_map
from subtomo.data import ParticleSet, TomogramSet
from subtomo.fourier import fsc_maps, shell_resolution_angst
from subtomo.geometry import rotation_angle_deg
from subtomo.io import read_mrc, write_mrc
from subtomo.jobs.class3d import Class3DParams, _sampling, _search_size, run
from subtomo.ml import EngineParams, MLModel, Sampling, expectation_pass, initial_sigma2
from subtomo.ml.greyscale import fit_reference_scale
from subtomo.ml.loader import ParticleState, StackLoader

DEMO = Path(__file__).resolve().parents[1] / "src" / "subtomo" / "demo_data"


def _sh(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(args, check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def project(root: Path, particles: int, box: int, px: float, maps: list[str], **extra) -> Path:
    """Simulate (if not there) and extract 2D stacks; returns the project directory."""
    if not (root / "ext" / "optimisation_set.star").is_file():
        args = ["subtomo", "simulate", "--out", str(root), "--preset", "benchmark", "--particles",
                str(particles), "--box", str(box), "--pixel-size", str(px)]  # fmt: skip
        for m in maps:
            args += ["--map", str(DEMO / f"{m}_4v4r_5A.mrc.gz")]
        for k, v in extra.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        _sh(*args)
        _sh("subtomo", "extract", "--particles", "particles_picked.star", "--tomograms",
            "tomograms.star", "--b", str(box), "--o", "ext", "--device", "cpu",
            cwd=root)  # fmt: skip
    return root


def _iteration_seconds(run_out: Path) -> list[float]:
    return [float(s) for s in re.findall(r"iteration \d+ \(([\d.]+) s\)", run_out.read_text())]


def speed(args) -> None:
    root = project(args.workdir / "speed", args.particles, 64, 10.0, ["ribosome70S"],
                   pose_error_deg=8, shift_error_px=2)  # fmt: skip
    with contextlib.chdir(root):
        params = Class3DParams(
            ios="ext/optimisation_set.star", ref=("truth.mrc",), ini_high=40.0, iter=args.iter,
            healpix_order=3, sigma_ang=3.0, offset_range=2, offset_step=1,
            particle_diameter=300.0, device=args.device, output_dir="subtomo",
        )  # fmt: skip
        start = time.perf_counter()
        run(params)
        total = time.perf_counter() - start
        per_iter = _iteration_seconds(Path("subtomo/run.out"))
        n_rot, n_trans = _search_size(_sampling(params, 10.0))
        n = len(ParticleSet.read("ext/particles.star"))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"subtomo: {n} particles x 41 tilts, box 64, local search {n_rot} rotations x "
              f"{n_trans} translations")  # fmt: skip
        print(f"  seconds per iteration: {', '.join(f'{s:.1f}' for s in per_iter)} "
              f"(job total {total:.1f} s)")  # fmt: skip
        print(f"  coarse E-step pose evaluations per second: "
              f"{n * n_rot * n_trans / np.mean(per_iter):.3g}")  # fmt: skip
        print(f"  peak RSS: {rss:.2f} GiB")
        if args.relion_bin:
            relion(args, root)


def relion(args, root: Path) -> None:
    """relion_refine (CPU) on the same data: K=1 classification, local searches."""
    Path("relion").mkdir(exist_ok=True)
    cmd = [
        args.relion_bin, "--ios", "ext/optimisation_set.star", "--ref", "truth.mrc",
        "--firstiter_cc", "--ini_high", "40", "--K", "1", "--iter", str(args.iter),
        "--tau2_fudge", "1", "--particle_diameter", "300", "--healpix_order", "3",
        "--sigma_ang", "3", "--offset_range", "2", "--offset_step", "1", "--sym", "C1",
        "--pad", "2", "--flatten_solvent", "--zero_mask", "--norm", "--scale",
        "--dont_combine_weights_via_disc", "--pool", "10", "--j", str(args.threads),
        "--cpu", "--o", "relion/run",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=root, stdout=subprocess.DEVNULL)
    print(f"RELION: {(time.perf_counter() - start) / args.iter:.1f} s per iteration (incl. setup)")


def _fsc_to_truth(path: str | Path, truth: torch.Tensor, px: float) -> str:
    """Resolution (Å) where the FSC of a map against the truth first drops below 0.5 and
    0.143 (within a soft sphere of the box diameter)."""
    volume, _ = read_mrc(path)
    box = truth.shape[-1]
    r = torch.linalg.vector_norm(
        torch.stack(torch.meshgrid(*[torch.arange(box) - box // 2] * 3, indexing="ij")).double(),
        dim=0,
    )
    mask = (0.5 + 0.5 * torch.cos(torch.pi * ((r - 0.4 * box) / (0.1 * box)).clamp(0, 1))).float()
    curve = fsc_maps(volume.float(), truth.float(), mask)
    res = shell_resolution_angst(len(curve), box, px)
    out = []
    for level in (0.5, 0.143):
        below = torch.nonzero(curve[1:] < level)
        shell = int(below[0]) if len(below) else len(curve) - 1
        out.append(f"{float(res[max(shell, 1)]):.1f}")
    return "/".join(out)


def bar_align(args) -> None:
    """K=1 local searches from poses 8 deg / 2 px off: median angular error (bar < 2 deg,
    full rotation matrices) and FSC to the truth before (true reconstruction from the picked
    poses, no alignment) and after."""
    root = project(args.workdir / "align", args.particles, 64, 10.0, ["ribosome70S"],
                   pose_error_deg=8, shift_error_px=2)  # fmt: skip
    with contextlib.chdir(root):
        common = dict(
            ios="ext/optimisation_set.star", ref=("truth.mrc",), ini_high=40.0,
            particle_diameter=300.0, device=args.device,
        )  # fmt: skip
        if not Path("picked/run_it001_class001.mrc").is_file():
            run(Class3DParams(**common, iter=1, skip_align=True, output_dir="picked"))
        run(Class3DParams(
            **common, iter=args.iter, healpix_order=4, sigma_ang=3.0, offset_range=3,
            offset_step=1, output_dir="aligned",
        ))  # fmt: skip
        truth_map, px = read_mrc("truth.mrc")
        truth = ParticleSet.read("particles.star")
        print(f"alignment ({len(truth)} particles, {args.iter} iterations):")
        fsc = _fsc_to_truth("picked/run_it001_class001.mrc", truth_map, px)
        angle, shift = _pose_errors(ParticleSet.read("particles_picked.star"), truth)
        print(f"  picked poses: median errors {angle:.2f} deg, {shift / px:.2f} px; "
              f"FSC to truth 0.5/0.143 {fsc} Å")  # fmt: skip
        for data in sorted(Path("aligned").glob("run_it*_data.star"))[1:]:
            it = data.name[6:9]
            fsc = _fsc_to_truth(f"aligned/run_it{it}_class001.mrc", truth_map, px)
            angle, shift = _pose_errors(ParticleSet.read(data), truth)
            print(f"  iteration {it}: median errors {angle:.2f} deg (bar < 2), "
                  f"{shift / px:.2f} px; FSC to truth 0.5/0.143 {fsc} Å")  # fmt: skip


def _pose_errors(estimate: ParticleSet, truth: ParticleSet) -> tuple[float, float]:
    """Median angle (deg) between the rotation matrices and median distance (Å) between the
    particle centres ``C - A_sub o`` of two sets of the same particles."""
    angle = rotation_angle_deg(estimate.particle_matrices(), truth.particle_matrices())

    def centres(s: ParticleSet) -> torch.Tensor:
        o = (s.subtomogram_matrices().double() @ s.origins_angst().double()[..., None])[..., 0]
        return s.centered_coordinates_angst().double() - o

    shift = torch.linalg.vector_norm(centres(estimate) - centres(truth), dim=1)
    return float(angle.median()), float(shift.median())


def bar_classes(args, k: int) -> None:
    """Classification without alignment of a 50/50 70S/50S mixture with true poses into K
    classes: K=2 separation (bar >= 95%), K>2 purity (bar: no class > 5% of the other
    species)."""
    root = project(args.workdir / "mix", args.particles, 32, 20.0,
                   ["ribosome70S", "ribosome50S"], tomogram_size="512,512,96")  # fmt: skip
    with contextlib.chdir(root):
        if not Path("mix.mrc").is_file():
            a, px = read_mrc("truth_ribosome70S_4v4r_5A.mrc")
            b, _ = read_mrc("truth_ribosome50S_4v4r_5A.mrc")
            write_mrc("mix.mrc", 0.5 * (a + b), px)
        # the stacks are of the true poses: particles.star, not the picked ones
        inputs = dict(particles="ext/particles.star", tomograms="tomograms.star")
        if k == 2:
            print(f"oracle (one E-step with the two true maps): "
                  f"{100 * _oracle_separation(inputs):.1f}% correct")  # fmt: skip
        out = f"K{k}"
        run(Class3DParams(
            **inputs, ref=("mix.mrc",), K=k, iter=args.iter, skip_align=True,
            strict_highres_exp=60.0, particle_diameter=0.8 * 32 * 20.0, device=args.device,
            output_dir=out,
        ))  # fmt: skip
        print(f"K={k}, {args.iter} iterations (populations per non-empty class: 50S/70S):")
        for data in sorted(Path(out).glob("run_it*_data.star"))[1:]:
            d = starfile.read(data)["particles"]
            table = pd.crosstab(d["rlnClassNumber"], d["subtomoSpecies"])
            if k == 2:
                score = f"separation {100 * float(table.max(axis=1).sum() / len(d)):.1f}% (>= 95)"
            else:
                worst = float((table.min(axis=1) / table.sum(axis=1)).max())
                score = f"worst impurity {100 * worst:.1f}% (<= 5)"
            pops = " ".join("/".join(map(str, row)) for row in table.to_numpy())
            print(f"  iteration {data.name[6:9]}: {score}; {pops}")


def _oracle_separation(inputs: dict[str, str]) -> float:
    """Fraction of particles that one E-step with the two *true* maps (grey scale fitted
    at the true classes) assigns to their species: what the data allow at best."""
    parts = ParticleSet.read(inputs["particles"])
    loader = StackLoader(parts, TomogramSet.read(inputs["tomograms"]), batch_size=256)
    names = ["ribosome70S_4v4r_5A", "ribosome50S_4v4r_5A"]
    species = parts.particles["subtomoSpecies"].astype(str).map(names.index).to_numpy()
    state = ParticleState.from_particles(parts, 2)
    state.classes = torch.tensor(species, dtype=torch.long)
    refs = torch.stack([read_mrc(f"truth_{n}.mrc")[0] for n in names])
    sigma2 = initial_sigma2(loader.batches(state), loader.n_optics_groups, loader.box)
    scale = fit_reference_scale(refs, loader.batches(state), sigma2, box=loader.box,
                                pixel_size=loader.pixel_size, resolution_angst=60.0)  # fmt: skip
    model = MLModel.initial(refs * scale, sigma2, loader.pixel_size)
    engine = EngineParams(particle_diameter_angst=0.8 * loader.box * loader.pixel_size,
                          strict_highres_exp_angst=60.0, random_class_init=False)  # fmt: skip
    _, res = expectation_pass(model, loader.batches(state), Sampling(align=False), engine)
    return float((res.classes.numpy() == species[res.index.numpy()]).mean())


def _purity(data: Path) -> float:
    """Fraction of particles in the class of their own species (majority matching)."""
    d = starfile.read(data)["particles"]
    table = pd.crosstab(d["rlnClassNumber"], d["subtomoSpecies"])
    return float(table.max(axis=1).sum() / len(d))


def bar_hard(args) -> None:
    """K=2 without alignment of the proteasome and the proteasome without one outer ring,
    per SNR and seed: purity of the last iteration (and the best possible assignment of one
    E-step with the two true maps, what the data allow)."""
    maps = args.workdir / "maps"
    maps.mkdir(exist_ok=True)
    full, partial = maps / "proteasome.mrc", maps / "proteasome_no_alpha1.mrc"
    if not partial.is_file():
        write_mrc(full, torch.from_numpy(proteasome_map(5.0, 64)), 5.0)
        write_mrc(partial, torch.from_numpy(proteasome_map(5.0, 64, ("alpha1",))), 5.0)
    summary: dict[float, list[float]] = {}
    for snr in args.snrs:
        for seed in args.seeds:
            root = args.workdir / f"hard_snr{snr:g}_seed{seed}"
            if not (root / "ext" / "optimisation_set.star").is_file():
                _sh("subtomo", "simulate", "--out", str(root), "--preset", "benchmark",
                    "--map", str(full), "--map", str(partial), "--species-fraction", "0.5",
                    "--species-fraction", "0.5", "--particles", "200", "--tomograms", "2",
                    "--pixel-size", "5", "--box", "64", "--snr", str(snr), "--seed",
                    str(seed))  # fmt: skip
                _sh("subtomo", "extract", "--particles", "particles.star", "--tomograms",
                    "tomograms.star", "--b", "64", "--o", "ext", "--device", "cpu",
                    cwd=root)  # fmt: skip
                _sh("subtomo", "reconstruct", "--ios", "ext/optimisation_set.star", "--o",
                    "rec", cwd=root)  # fmt: skip
            with contextlib.chdir(root):
                out = "K2"
                if not list(Path(out).glob(f"run_it{args.iter:03d}_data.star")):
                    run(Class3DParams(
                        ios="ext/optimisation_set.star", ref=("rec/merged.mrc",), K=2,
                        iter=args.iter, skip_align=True, ini_high=60.0, random_seed=seed,
                        device=args.device, output_dir=out,
                    ))  # fmt: skip
                start, *curve = [_purity(p) for p in sorted(Path(out).glob("run_it*_data.star"))]
                print(f"SNR {snr:g} seed {seed}: purity {curve[-1]:.2f} (initial classes "
                      f"{start:.2f}; per iteration {' '.join(f'{v:.2f}' for v in curve)})",
                      flush=True)  # fmt: skip
                summary.setdefault(snr, []).append(curve[-1])
    for snr, values in summary.items():
        print(f"SNR {snr:g}: mean purity {np.mean(values):.2f} over {len(values)} seeds "
              f"({', '.join(f'{v:.2f}' for v in values)})")  # fmt: skip


def bars(args) -> None:
    """The parts of ``--bars`` (align, k2, k4 or all)."""
    given = args.iter
    if args.bars in ("align", "all"):
        args.iter = given or 5
        bar_align(args)
    for k in (2, 4):
        if args.bars in (f"k{k}", "all"):
            args.iter = given or 25
            bar_classes(args, k)
    if args.bars in ("hard", "all"):
        args.iter = given or 25
        bar_hard(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/subtomo_class3d_bench"))
    p.add_argument("--particles", type=int, default=1000)
    p.add_argument("--iter", type=int, default=None, help="default 2 (speed), 5 (align), 25 (K)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--relion-bin", default=None)
    p.add_argument("--bars", nargs="?", const="all",
                   choices=("all", "align", "k2", "k4", "hard"),
                   help="measure the quality bars instead (all or one part)")  # fmt: skip
    p.add_argument("--snrs", type=float, nargs="+", default=[0.05, 0.01, 0.003, 0.001])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.bars:
        bars(args)
    else:
        args.iter = args.iter or 2
        speed(args)


if __name__ == "__main__":
    sys.exit(main())
