"""``subtomo select``: subset selection by class, thresholds, duplicates and half sets."""

from __future__ import annotations

from pathlib import Path

import typer


def _class_numbers(text: str) -> tuple[int, ...]:
    """``"1,3"`` -> ``(1, 3)``; ``BadParameter`` unless every entry is a class number >= 1."""
    entries = [c for c in text.replace(" ", "").split(",") if c]
    if not all(c.isdigit() and int(c) >= 1 for c in entries):
        raise typer.BadParameter(
            f"expected class numbers >= 1 like 1,3, found {text!r}", param_hint="--classes"
        )
    return tuple(int(c) for c in entries)


def command(
    i: Path = typer.Option(..., "--i", help="particles/_data.star or _optimiser.star"),
    classes: str = typer.Option("", "--classes", help="Class numbers to keep, e.g. 1,3"),
    min_pmax: float = typer.Option(None, "--min-pmax", help="Minimum rlnMaxValueProbDistribution"),
    min_loglike: float = typer.Option(
        None, "--min-loglike", help="Minimum rlnLogLikeliContribution"
    ),
    remove_duplicates: float = typer.Option(
        None, "--remove-duplicates", help="Remove particles closer than this distance (Å)"
    ),
    tomograms: Path = typer.Option(None, "--tomograms", help="tomograms.star (legacy coords)"),
    random_halves: bool = typer.Option(False, "--random-halves", help="Reassign rlnRandomSubset"),
    seed: int = typer.Option(0, "--seed"),
    o: Path = typer.Option(None, "--o", help="Output directory (default Select/jobNNN)"),
) -> None:
    """Subset selection: keep classes, threshold Pmax/log-likelihood, remove duplicates."""
    from subtomo.jobs.select import SelectParams, run

    out = run(
        SelectParams(
            input=i,
            classes=_class_numbers(classes),
            min_pmax=min_pmax,
            min_loglike=min_loglike,
            remove_duplicates_angst=remove_duplicates,
            tomograms=tomograms,
            random_halves=random_halves,
            seed=seed,
            output_dir=o,
        )
    )
    typer.echo(f"wrote {out}")
