"""``subtomo demo``: simulate the demo data set and run the tutorial path end to end.

The data are simulated from the ribosome maps shipped in the package (70S particles plus
50S-only "junk", or the ``--map`` files: the first is the target, the others junk), with
picked poses perturbed like a template-matching result. The jobs then run in the project
directory as a user would run them, one RELION job directory each:

    simulate -> Extract -> Reconstruct (at the picked poses)
    -> Class3D (1 class, local searches around the picked poses)
    -> Class3D (2 classes, no alignment) -> Select (the class closest to the consensus)
    -> MaskCreate -> Refine3D (gold-standard, local searches) -> PostProcess

``--no-align`` skips the two alignment steps (a quicker first look): the selected particles
are then reconstructed at their picked poses instead of refined.

Each step reports its particles, the junk among them (from the simulator's ground truth
``subtomoSpecies``), the gold-standard resolution (half-map FSC 0.143 inside a soft sphere of
:data:`PARTICLE_DIAMETER`; masked and phase-randomisation corrected for post-processing) and
the resolution against the truth map (FSC 0.5, same masks). ``report.html`` in the project
links the report of every job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from subtomo.errors import InputError
from subtomo.fourier import crossing_shell, fsc_maps, lowpass_map
from subtomo.io import read_mrc, read_star
from subtomo.jobs.class3d import Class3DParams
from subtomo.jobs.class3d import run as run_class3d
from subtomo.jobs.extract import ExtractParams
from subtomo.jobs.extract import run as run_extract
from subtomo.jobs.mask import MaskParams
from subtomo.jobs.mask import run as run_mask
from subtomo.jobs.postprocess import PostprocessParams
from subtomo.jobs.postprocess import run as run_postprocess
from subtomo.jobs.reconstruct import ReconstructParams
from subtomo.jobs.reconstruct import run as run_reconstruct
from subtomo.jobs.refine3d import Refine3DParams
from subtomo.jobs.refine3d import run as run_refine3d
from subtomo.jobs.select import SelectParams
from subtomo.jobs.select import run as run_select
from subtomo.jobs.simulate import SimulateJob
from subtomo.jobs.simulate import run as run_simulate
from subtomo.masks import soft_sphere, suggest_threshold
from subtomo.project import next_job_dir, write_project_report
from subtomo.project.options import device_option, option
from subtomo.report.plots import plot_fsc, plot_series
from subtomo.simulate import SimulationParams

__all__ = ["DemoParams", "DemoResult", "StepResult", "run"]

log = logging.getLogger("subtomo")

#: Mask diameter for classification and refinement (Å): the 70S ribosome is ~250 Å across.
PARTICLE_DIAMETER = 320.0

#: Refine3D's initial sampling (7.5°), with local searches from the start: the particles
#: come aligned from Class3D, as in the tutorial's refinement after classification.
REFINE_HEALPIX_ORDER = 3

#: The ``--quick`` variant (tests, a first look): one small tomogram, 21 tilts, 60 particles.
QUICK = {"tomograms": 1, "particles": 60, "tomogram_size": (256, 256, 96), "tilt_step": 6.0}


@dataclass
class DemoParams:
    """Where to write the project and what to simulate.

    ``maps``: species maps (MRC; the first is the target, the others junk; empty: the
    embedded 70S and 50S ribosomes). ``pose_error_deg`` / ``shift_error_px``: σ of the picked
    poses' errors (a template-matching result). ``quick``: the small :data:`QUICK` variant.
    ``align``: run the alignment steps (Class3D with local searches, Refine3D); without
    them the selected particles are reconstructed at their picked poses. ``verbose``: the
    command line shows every job's log (the demo itself does not use it).
    """

    output_dir: Path = option(Path("demo_project"), "--o", "--out", help="New project directory.")
    quick: bool = option(False, "--quick", help="A tiny variant (one small tomogram).")
    maps: tuple[str, ...] = option(
        (), "--map", help="Species map (MRC): the first is the target, more are junk."
    )
    pose_error_deg: float = option(
        5.0, "--pose-error-deg", help="σ of the picked poses.", unit="deg"
    )
    shift_error_px: float = option(
        1.0, "--shift-error-px", help="σ of the picked shifts.", unit="px"
    )
    align: bool = option(
        True, "--align/--no-align", help="Class3D local searches and Refine3D (or skip them)."
    )
    seed: int = option(0, "--seed", help="Random seed of the simulation.")
    device: str = device_option()
    verbose: bool = option(False, "--verbose", help="Show every job's log.")


@dataclass
class StepResult:
    """One step: its job (alias), particles and junk in them, resolutions (Å), duration (s)."""

    step: str
    job: str = ""
    particles: int | None = None
    junk: int | None = None
    gold_standard: float | None = None  # half-map FSC 0.143 (Å)
    vs_truth: float | None = None  # FSC 0.5 against the truth map (Å)
    seconds: float = 0.0
    note: str = ""

    def line(self) -> str:
        """The step as one printed line."""
        parts = [f"{self.step:<12}", f"{self.job:<20}"]
        if self.particles is not None:
            junk = f" ({self.junk} junk)" if self.junk is not None else ""
            parts.append(f"{self.particles} particles{junk}")
        if self.gold_standard is not None:
            parts.append(f"gold-standard {self.gold_standard:.1f} Å")
        if self.vs_truth is not None:
            parts.append(f"vs truth {self.vs_truth:.1f} Å")
        parts.append(f"{self.seconds:.0f} s")
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)


@dataclass
class DemoResult:
    """All steps, the final resolutions (Å), the junk removed and the project report."""

    steps: list[StepResult] = field(default_factory=list)
    final_gold_standard: float = math.inf
    final_vs_truth: float = math.inf
    pixel_size: float = 0.0
    junk_total: int = 0
    junk_final: int = 0
    report: Path | None = None


def _alias(path: str | Path) -> str:
    """``Extract/job002/`` for a file of that job (paths absolute or relative to the project)."""
    p = Path(path).resolve().parent
    return f"{p.relative_to(Path.cwd().resolve())}/"


def _output(outputs: dict[str, str], name: str) -> str:
    return next(p for p in outputs if Path(p).name == name)


def _output_ending(outputs: dict[str, str], suffix: str) -> str:
    return next(p for p in outputs if p.endswith(suffix))


def _pick_class(maps: list[str], consensus: str) -> int:
    """The class (1-based) whose map correlates best with the consensus map: the complete
    particle rather than a part of it (as a user picks the good class by eye)."""
    ref, _ = read_mrc(consensus)
    ref = ref - ref.mean()
    scores = []
    for path in maps:
        m, _ = read_mrc(path)
        m = m - m.mean()
        scores.append(float((m * ref).sum() / (m.norm() * ref.norm()).clamp(min=1e-30)))
    return int(np.argmax(scores)) + 1


def _particle_counts(star: str | Path, target: str) -> tuple[int, int | None]:
    """(particles, junk among them from the ground-truth ``subtomoSpecies`` column)."""
    table = read_star(star)["particles"]
    if "subtomoSpecies" not in table.columns:
        return len(table), None
    return len(table), int((table["subtomoSpecies"].astype(str) != target).sum())


def _resolution_vs_truth(
    volume: torch.Tensor, truth: torch.Tensor, pixel_size: float, mask: torch.Tensor | None
) -> tuple[np.ndarray, float]:
    """FSC with the truth map (optionally masked) and its 0.5 crossing (Å)."""
    curve = fsc_maps(volume.to(truth.device), truth, mask)
    shell = crossing_shell(curve, 0.5)
    n = volume.shape[-1]
    return curve.double().cpu().numpy(), (n * pixel_size / shell if shell > 0 else math.inf)


class _Demo:
    """The running demo: the project state that the steps pass on (inside the project dir)."""

    def __init__(self, params: DemoParams, echo: Callable[[str], None]):
        self.params = params
        self.echo = echo
        self.result = DemoResult()
        self.target = ""
        self.particles = ""  # the particles the next step reads (optimisation set or STAR)
        self.halves: tuple[str, str] = ("", "")
        self.merged = ""
        self.mask = ""
        self.classes = 1  # the class kept by the selection
        self.class_data = ""  # the classification's _data.star

    def record(self, step: StepResult, started: float) -> StepResult:
        step.seconds = time.perf_counter() - started
        self.result.steps.append(step)
        self.echo(step.line())
        return step

    def sphere(self, n: int) -> torch.Tensor:
        """A soft sphere of :data:`PARTICLE_DIAMETER` (3 px edge) for the resolutions."""
        return soft_sphere((n,) * 3, 0.5 * PARTICLE_DIAMETER / self.result.pixel_size, 3.0)

    def truth_resolution(self, merged: torch.Tensor) -> float:
        """FSC 0.5 against the truth map within the particle sphere (Å)."""
        truth, _ = read_mrc("truth.mrc")
        sphere = self.sphere(truth.shape[-1])
        return _resolution_vs_truth(merged, truth, self.result.pixel_size, sphere)[1]

    def gold_resolution(self) -> float:
        """Half-map FSC 0.143 within the particle sphere (Å)."""
        h1, px = read_mrc(self.halves[0])
        h2, _ = read_mrc(self.halves[1])
        shell = crossing_shell(fsc_maps(h1, h2, self.sphere(h1.shape[-1])), 0.143)
        return h1.shape[-1] * px / shell if shell > 0 else math.inf

    def simulate(self) -> None:
        t0 = time.perf_counter()
        p = self.params
        overrides = dict(QUICK) if p.quick else {}
        if p.maps:
            overrides["maps"] = tuple(p.maps)
            overrides["species_fraction"] = (
                (2 / 3, *([1 / 3 / (len(p.maps) - 1)] * (len(p.maps) - 1)))
                if len(p.maps) > 1
                else ()
            )
        sim = SimulationParams.from_preset(
            "demo",
            pose_error_deg=p.pose_error_deg,
            shift_error_px=p.shift_error_px,
            seed=p.seed,
            device=p.device,
            **overrides,
        )
        run_simulate(SimulateJob(out=Path("."), simulation=sim))
        names = json.loads(Path("simulation.json").read_text())["species"]
        self.target = names[0]  # truth.mrc is its map
        species = read_star("particles.star")["particles"]["subtomoSpecies"].astype(str)
        self.result.pixel_size = sim.pixel_size
        self.particles = "particles_picked.star"
        n, junk = _particle_counts(self.particles, self.target)
        self.result.junk_total = junk or 0
        counts = ", ".join(f"{int((species == s).sum())} {s}" for s in names)
        self.record(StepResult("simulate", "", n, junk, note=f"{counts}; truth map truth.mrc"), t0)

    def extract(self) -> None:
        t0 = time.perf_counter()
        box = int(read_mrc("truth.mrc")[0].shape[-1])
        outputs = run_extract(
            ExtractParams(
                particles=self.particles,
                tomograms="tomograms.star",
                box=box,
                device=self.params.device,
            )
        )
        self.particles = _output(outputs, "optimisation_set.star")
        n, junk = _particle_counts(_output(outputs, "particles.star"), self.target)
        self.record(StepResult("extract", _alias(self.particles), n, junk), t0)

    def reconstruct(self, tomograms: str | None = None) -> None:
        """Reconstruct particle from the current particles (an optimisation set, or a
        particles file with ``tomograms``) at their current poses."""
        t0 = time.perf_counter()
        source = {"particles": self.particles, "tomograms": tomograms} if tomograms else {}
        outputs = run_reconstruct(
            ReconstructParams(
                ios=None if tomograms else self.particles, device=self.params.device, **source
            )
        )
        self.halves = (_output(outputs, "half1.mrc"), _output(outputs, "half2.mrc"))
        self.merged = _output(outputs, "merged.mrc")
        gold = self.gold_resolution()
        merged, _ = read_mrc(self.merged)
        step = StepResult(
            "reconstruct",
            _alias(self.halves[0]),
            gold_standard=gold,
            vs_truth=self.truth_resolution(merged),
            note="at the picked poses",
        )
        self.record(step, t0)

    def classify(self, skip_align: bool) -> None:
        """Class3D: 1 class with local searches around the picked poses, or K classes without
        alignment; the reference is the current map."""
        t0 = time.perf_counter()
        q = self.params.quick
        outputs = run_class3d(
            Class3DParams(
                ios=self.particles,
                ref=(self.merged,),
                K=2 if skip_align else 1,
                iter=(2 if q else 10) if skip_align else (2 if q else 4),
                particle_diameter=PARTICLE_DIAMETER,
                skip_align=skip_align,
                healpix_order=3,
                sigma_ang=-1.0 if skip_align else self.params.pose_error_deg,
                offset_range=3.0,
                device=self.params.device,
            )
        )
        data = _output_ending(outputs, "_data.star")
        self.particles = _output_ending(outputs, "_optimisation_set.star")
        maps = sorted(p for p, kind in outputs.items() if kind.startswith("DensityMap"))
        table = read_star(data)["particles"]
        n, junk = _particle_counts(data, self.target)
        if skip_align:
            self.classes = _pick_class(maps, self.merged)
            self.class_data = data
            counts = table["rlnClassNumber"].astype(int).value_counts().sort_index()
            note = ", ".join(f"class {c}: {k}" for c, k in counts.items())
            note += f"; class {self.classes} (closest to the consensus map) kept"
        else:
            note = "1 class, local searches around the picked poses"
        self.merged = maps[self.classes - 1] if skip_align else maps[0]
        merged, _ = read_mrc(self.merged)
        step = StepResult(
            "class3d", _alias(data), n, junk, vs_truth=self.truth_resolution(merged), note=note
        )
        self.record(step, t0)

    def select(self) -> None:
        """Subset selection of the kept class (junk removal)."""
        t0 = time.perf_counter()
        out = run_select(SelectParams(input=Path(self.class_data), classes=(self.classes,)))
        self.particles = str(out)
        n, junk = _particle_counts(out, self.target)
        self.record(StepResult("select", _alias(out), n, junk, note=f"class {self.classes}"), t0)

    def make_mask(self) -> None:
        t0 = time.perf_counter()
        merged, px = read_mrc(self.merged)
        lowpass = 3.0 * px  # Å: a smooth envelope, like the tutorial's 15-20 Å at 1-2 Å/px
        threshold = suggest_threshold(lowpass_map(merged, lowpass, px))
        directory = next_job_dir(Path.cwd(), "MaskCreate")
        mask = run_mask(
            MaskParams(
                i=self.merged,
                lowpass=lowpass,
                ini_threshold=threshold,
                extend_inimask=2.0,
                width_soft_edge=5.0,
                output_dir=str(directory),
                device=self.params.device,
            )
        )
        self.mask = str(directory / "mask.mrc")
        inside = 100 * float((mask > 0.5).float().mean())
        note = f"threshold {threshold:.3g} (Otsu), {inside:.0f}% of the box"
        self.record(StepResult("mask", _alias(self.mask), note=note), t0)

    def refine(self) -> None:
        """Refine3D: gold-standard auto-refine of the selected particles with the mask."""
        t0 = time.perf_counter()
        outputs = run_refine3d(
            Refine3DParams(
                particles=self.particles,
                tomograms="tomograms.star",
                ref=self.merged,
                solvent_mask=self.mask,
                particle_diameter=PARTICLE_DIAMETER,
                healpix_order=REFINE_HEALPIX_ORDER,
                auto_local_healpix_order=REFINE_HEALPIX_ORDER,
                offset_range=2.0,
                max_iter=4 if self.params.quick else 10,
                device=self.params.device,
            )
        )
        self.halves = (
            _output_ending(outputs, "run_half1_class001_unfil.mrc"),
            _output_ending(outputs, "run_half2_class001_unfil.mrc"),
        )
        self.merged = _output_ending(outputs, "run_class001.mrc")
        data = _output_ending(outputs, "run_data.star")
        n, junk = _particle_counts(data, self.target)
        gold = self.gold_resolution()
        merged, _ = read_mrc(self.merged)
        step = StepResult("refine3d", _alias(data), n, junk, gold, self.truth_resolution(merged))
        self.record(step, t0)

    def postprocess(self) -> Path:
        t0 = time.perf_counter()
        directory = next_job_dir(Path.cwd(), "PostProcess")
        res = run_postprocess(
            PostprocessParams(
                i=self.halves[0],
                i2=self.halves[1],
                mask=self.mask,
                output_dir=str(directory),
                auto_bfac=False,
                device=self.params.device,
            )
        )
        h1, px = read_mrc(self.halves[0])
        h2, _ = read_mrc(self.halves[1])
        mask, _ = read_mrc(self.mask)
        truth, _ = read_mrc("truth.mrc")
        truth_curve, vs_truth = _resolution_vs_truth(0.5 * (h1 + h2), truth, px, mask)
        job = _alias(directory / "postprocess.star")
        self.result.final_gold_standard = res.resolution
        self.result.final_vs_truth = vs_truth
        self.record(
            StepResult("postprocess", job, gold_standard=res.resolution, vs_truth=vs_truth), t0
        )
        n = h1.shape[-1]
        freq = np.arange(truth_curve.size) / (n * px)
        return plot_fsc(
            "demo_fsc.png",
            freq,
            {"corrected": res.fsc_true, "masked map vs truth": truth_curve},
            resolution=res.resolution,
            title="final map: gold-standard and against the truth",
        )


def run(params: DemoParams, echo: Callable[[str], None] = log.info) -> DemoResult:
    """Simulate and run the tutorial path in ``params.output_dir``; returns every step's
    result."""
    out = Path(params.output_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise InputError("the demo needs a new or empty directory; choose another --o", file=out)
    out.mkdir(parents=True, exist_ok=True)
    demo = _Demo(params, echo)
    with contextlib.chdir(out):
        demo.simulate()
        demo.extract()
        demo.reconstruct()
        if params.align:
            demo.classify(skip_align=False)
        demo.classify(skip_align=True)
        demo.select()
        if params.align:
            demo.make_mask()
            demo.refine()
        else:
            demo.reconstruct("tomograms.star")
            demo.make_mask()
        fsc_png = demo.postprocess()
        result = demo.result
        last = next(s for s in reversed(result.steps) if s.particles is not None)
        result.junk_final = last.junk or 0
        steps = [s for s in result.steps if s.gold_standard is not None]
        images = [
            plot_series(
                "demo_resolution.png",
                [s.step for s in steps],
                {
                    "gold-standard": [s.gold_standard for s in steps],
                    "vs truth": [s.vs_truth for s in steps],
                },
                xlabel="step",
                ylabel="resolution (Å)",
                title="resolution per step",
                invert_y=True,
            ),
            fsc_png,
        ]
        gold, truth = result.final_gold_standard, result.final_vs_truth
        result.report = write_project_report(
            ".",
            title="subtomo demo",
            summary={
                "final resolution (gold-standard, FSC 0.143)": f"{gold:.1f} Å",
                "final resolution against the truth (FSC 0.5)": f"{truth:.1f} Å",
                "pixel size (Nyquist)": f"{result.pixel_size:g} Å ({2 * result.pixel_size:g} Å)",
                "junk particles left": f"{result.junk_final} of {result.junk_total}",
            },
            steps=[_row(s) for s in result.steps],
            images=images,
        ).resolve()
    return result


def _row(step: StepResult) -> dict[str, object]:
    def angst(v: float | None) -> str:
        return f"{v:.1f} Å" if v is not None else ""

    return {
        "step": step.step,
        "job": step.job,
        "particles": "" if step.particles is None else step.particles,
        "junk": "" if step.junk is None else step.junk,
        "gold-standard": angst(step.gold_standard),
        "vs truth": angst(step.vs_truth),
        "time": f"{step.seconds:.0f} s",
        "note": step.note,
    }
