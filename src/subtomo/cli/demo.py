"""``subtomo demo``: simulate the demo data set and run the tutorial path (subtomo.jobs.demo)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.logging import RichHandler


def command(
    out: Path = typer.Option(Path("demo_project"), "--out", help="New project directory."),
    quick: bool = typer.Option(False, "--quick", help="A tiny variant (one small tomogram)."),
    maps: list[str] = typer.Option(
        None, "--map", help="Species map (MRC): the first is the target, more are junk."
    ),
    pose_error_deg: float = typer.Option(5.0, "--pose-error-deg", help="σ of picked poses."),
    shift_error_px: float = typer.Option(1.0, "--shift-error-px", help="σ of picked shifts."),
    align: bool = typer.Option(
        True, "--align/--no-align", help="Class3D local searches and Refine3D (or skip them)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed of the simulation."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    verbose: bool = typer.Option(False, "--verbose", help="Show every job's log."),
) -> None:
    """Simulate a ribosome data set with known truth and run the tutorial path on it."""
    from subtomo.jobs.demo import DemoParams, run

    if not verbose:
        for handler in logging.getLogger("subtomo").handlers:
            if isinstance(handler, RichHandler):
                handler.setLevel(logging.WARNING)
    result = run(
        DemoParams(
            out=out,
            quick=quick,
            maps=tuple(maps or ()),
            pose_error_deg=pose_error_deg,
            shift_error_px=shift_error_px,
            align=align,
            seed=seed,
            device=device,
        ),
        echo=typer.echo,
    )
    px = result.pixel_size
    typer.echo(
        f"junk particles removed: {result.junk_total - result.junk_final} of {result.junk_total}"
    )
    typer.echo(
        f"final resolution: {result.final_gold_standard:.1f} Å gold-standard (FSC 0.143), "
        f"{result.final_vs_truth:.1f} Å against the truth (FSC 0.5); "
        f"pixel size {px:g} Å, Nyquist {2 * px:g} Å"
    )
    typer.echo(f"report: {result.report}")
