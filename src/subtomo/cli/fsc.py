"""``subtomo fsc MAP1 MAP2``: FSC curve and crossings between any two maps."""

from __future__ import annotations

import typer


def command(
    map1: str = typer.Argument(..., help="First map."),
    map2: str = typer.Argument(..., help="Second map."),
    mask: str = typer.Option(None, "--mask", help="Mask applied to both maps."),
    angpix: float = typer.Option(-1.0, "--angpix", help="Pixel size (Å); default: header."),
    output: str = typer.Option("fsc", "--o", help="Output prefix for .star and .png."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
) -> None:
    """Print and plot the FSC between two maps and where it crosses 0.5 and 0.143."""
    from subtomo.jobs.fsc import FscParams, run

    res = run(FscParams(map1=map1, map2=map2, mask=mask, angpix=angpix, o=output, device=device))
    typer.echo("shell  resolution(A)  FSC")
    for k, (a, f) in enumerate(zip(res.angstrom, res.fsc, strict=True)):
        typer.echo(f"{k:5d}  {a:12.2f}  {f:8.4f}")
    for t, (shell_res, interp) in res.crossings.items():
        typer.echo(
            f"FSC = {t:g}: {shell_res:.2f} A (last shell above), {interp:.2f} A (interpolated)"
        )
    typer.echo(f"written {output}.star and {output}.png")
