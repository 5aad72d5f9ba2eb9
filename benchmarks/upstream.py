"""From the microscope to a map, against the simulator's truth (issue #15's end-to-end bar).

Simulates a tilt series as movies + mdoc (``subtomo simulate --movie-frames``, with a sample
slab so that the sums show Thon rings, and a dark tilt), runs the upstream chain as a user
does - ``subtomo import`` → ``motioncorr`` (gain, even/odd) → ``ctffind`` → ``exclude-tilts``
- and checks the per-tilt table of the result against the truth: the same tilt angles,
pre-exposure (acquisition order), defocus within the CTF bar (≤ 100 Å at 0°, ≤ 300 Å at ±60°),
the dark tilt excluded and nothing else. Then, with the known alignment put on the result
(:func:`subtomo.simulate.truth.with_true_alignment`), Extract + Reconstruct run on it and on
the tilt images simulated directly; both maps' FSC to the true map is printed with the
shells where it crosses 0.5 and 0.143 (the bar: the same within one shell).

    python benchmarks/upstream.py                           # 1024² at 2 Å/px, 21 tilts
    python benchmarks/upstream.py --size 512 --tilts 9      # what tests/test_upstream.py runs

:func:`run_chain` is what ``tests/test_upstream.py`` calls at its small size.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI: no spinning on shared cores

#: Row (tilt order, 0-based) of the simulated dark tilt.
DARK_ROW = 0


@dataclass
class ChainResult:
    """What :func:`run_chain` measured: the merged per-tilt table (chain columns, truth
    columns suffixed ``_true``), the true tilts the chain dropped, the global rows, the FSC
    curves to the true map (``direct``: simulated tilt images, ``upstream``: the chain's
    sums) and seconds per step."""

    tilts: pd.DataFrame
    dropped: list[float]
    hand: tuple[int, int]
    fsc: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)

    def crossing(self, kind: str, threshold: float) -> int:
        """Last shell (from shell 1; shell 0 is the mean) above ``threshold``."""
        curve = self.fsc[kind]
        below = np.flatnonzero(curve[1:] < threshold)
        return int(below[0]) if below.size else len(curve) - 1


def _timed(seconds: dict[str, float], name: str, fn, *args) -> object:
    start = time.perf_counter()
    out = fn(*args)
    seconds[name] = time.perf_counter() - start
    return out


def run_chain(
    out: Path, *, size: int = 512, pixel_size: float = 2.5, tilt_step: float = 15.0,
    particles: int = 6, box: int = 112, frames: int = 8, seed: int = 1,
) -> ChainResult:  # fmt: skip
    """Simulate in ``out`` (a new project directory) and run the chain there."""
    from subtomo.data import TomogramSet
    from subtomo.fourier import fsc_maps
    from subtomo.io import read_mrc, read_star
    from subtomo.jobs import ctffind, exclude_tilts, extract, importtomo, motioncorr, reconstruct
    from subtomo.jobs import simulate as simulate_job
    from subtomo.simulate.truth import with_true_alignment

    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with contextlib.chdir(out):
        sim = simulate_job.SimulateParams(
            output_dir=Path("."), particles=particles, pixel_size=pixel_size, box=box,
            tomogram_size=(size, size, max(160, box + 48)), tilt_step=tilt_step,
            noise="poisson", defocus_um=2.5, astigmatism_um=0.05, detector_thickness=100.0,
            detector_dark_tilts=(DARK_ROW,), movie_frames=frames, movie_contrast=0.3,
            seed=seed,
        )  # fmt: skip
        steps = [
            ("simulate", simulate_job.run, sim),
            ("import", importtomo.run, importtomo.ImportTomoParams(
                movie_files="frames/*.mrc", mdoc_files="*.mdoc", angpix=pixel_size, q0=0.07,
                dose_per_tilt_image=3.0, tilt_axis_angle=85.0)),
            ("motioncorr", motioncorr.run, motioncorr.MotionCorrParams(
                input_star="Import/job001/tilt_series.star", gain_ref="gain.mrc",
                even_odd_split=True, device="cpu")),
            ("ctffind", ctffind.run, ctffind.CtfFindParams(
                i="MotionCorr/job002/corrected_tilt_series.star", box=256, device="cpu")),
            ("exclude-tilts", exclude_tilts.run, exclude_tilts.ExcludeTiltsParams(
                i="CtfFind/job003/tilt_series_ctf.star")),
        ]  # fmt: skip
        for name, run, params in steps:
            _timed(seconds, name, run, params)
        truth = TomogramSet.read("tomograms.star")
        chain = with_true_alignment(
            TomogramSet.read("ExcludeTiltImages/job004/selected_tilt_series.star"), truth
        )
        chain.write("aligned_tilt_series.star", "aligned_tilt_series")
        fsc = {}
        for kind, tomograms in (("direct", "tomograms.star"),
                                ("upstream", "aligned_tilt_series.star")):  # fmt: skip
            _timed(seconds, f"extract {kind}", extract.run, extract.ExtractParams(
                particles="particles.star", tomograms=tomograms, box=box, device="cpu",
                output_dir=f"Extract/{kind}"))  # fmt: skip
            _timed(seconds, f"reconstruct {kind}", reconstruct.run,
                   reconstruct.ReconstructParams(ios=f"Extract/{kind}/optimisation_set.star",
                                                 device="cpu",
                                                 output_dir=f"Reconstruct/{kind}"))  # fmt: skip
            fsc[kind] = fsc_maps(read_mrc(f"Reconstruct/{kind}/merged.mrc")[0],
                                 read_mrc("truth.mrc")[0]).numpy()  # fmt: skip
        name = chain.names[0]
        true_tilts = truth[name].tilts
        detector = read_star("detector_truth.star")["tilts"]
        true_tilts = true_tilts.merge(detector[["rlnTomoNominalStageTiltAngle", "subtomoDark"]],
                                      on="rlnTomoNominalStageTiltAngle")  # fmt: skip
        merged = chain[name].tilts.merge(true_tilts, on="rlnTomoNominalStageTiltAngle",
                                         suffixes=("", "_true"), how="left")  # fmt: skip
        kept = set(merged["rlnTomoNominalStageTiltAngle"])
        dropped = sorted(set(true_tilts["rlnTomoNominalStageTiltAngle"]) - kept)
        hand = (int(chain[name].hand), int(truth[name].hand))
    return ChainResult(tilts=merged, dropped=dropped, hand=hand, fsc=fsc, seconds=seconds)


def defocus_error(tilts: pd.DataFrame) -> pd.Series:
    """Mean defocus (U + V)/2 minus the truth's, Å."""
    return 0.5 * (tilts.rlnDefocusU + tilts.rlnDefocusV
                  - tilts.rlnDefocusU_true - tilts.rlnDefocusV_true)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="tilt image size (px)")
    ap.add_argument("--pixel-size", type=float, default=2.0, help="Å/px")
    ap.add_argument("--tilts", type=int, default=21, help="tilts over ±60°")
    ap.add_argument("--particles", type=int, default=24)
    ap.add_argument("--box", type=int, default=128, help="particle box (px)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temp folder")
    args = ap.parse_args()
    import tempfile

    out = args.workdir or Path(tempfile.mkdtemp(prefix="subtomo_upstream_"))
    r = run_chain(out, size=args.size, pixel_size=args.pixel_size,
                  tilt_step=120.0 / (args.tilts - 1), particles=args.particles,
                  box=args.box)  # fmt: skip
    t = r.tilts
    angle = t["rlnTomoNominalStageTiltAngle"]
    err = defocus_error(t)
    print(f"project: {out}")
    print(f"tilts kept {len(t)}; dropped {r.dropped} (dark: "
          f"{sorted(t.loc[t.subtomoDark == 1, 'rlnTomoNominalStageTiltAngle'])} kept)")  # fmt: skip
    pre = np.abs(t.rlnMicrographPreExposure - t.rlnMicrographPreExposure_true).max()
    print(f"pre-exposure max |error| {pre:.3g} e/Å²; hand {r.hand[0]} (true {r.hand[1]})")
    print(f"defocus |error| at 0°: {abs(float(err[angle == 0].iloc[0])):.0f} Å (bar 100); "
          f"max at |tilt| >= 55°: {err[angle.abs() >= 55].abs().max():.0f} Å (bar 300); "
          f"max over all: {err.abs().max():.0f} Å")  # fmt: skip
    size = args.box * args.pixel_size  # Å: shell k is size / k
    for threshold in (0.5, 0.143):
        direct, chained = r.crossing("direct", threshold), r.crossing("upstream", threshold)
        print(f"FSC to truth crosses {threshold}: direct shell {direct} ({size / direct:.1f} Å), "
              f"upstream shell {chained} ({size / chained:.1f} Å) (bar: within 1)")  # fmt: skip
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r.seconds.items()))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
