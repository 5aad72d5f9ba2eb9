"""``subtomo star``: particle/tomogram set tools in the spirit of ``relion_star_handler``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from subtomo.cli.options import finite_numbers

app = typer.Typer(help="Edit and inspect particle and tomogram STAR files.", no_args_is_help=True)


@app.command("recentre")
@finite_numbers
def recentre(
    i: Path = typer.Option(..., "--i", help="Input particles.star"),
    o: Path = typer.Option(..., "--o", help="Output particles.star"),
    center_x: float = typer.Option(0.0, "--center-x", help="X in reference-box pixels"),
    center_y: float = typer.Option(0.0, "--center-y", help="Y in reference-box pixels"),
    center_z: float = typer.Option(0.0, "--center-z", help="Z in reference-box pixels"),
) -> None:
    """Recentre on a point of the reference (relion_star_handler --center)."""
    from subtomo.data import ParticleSet
    from subtomo.jobs import star_tools

    out = star_tools.recentre(ParticleSet.read(i), (center_x, center_y, center_z))
    out.write(o)
    typer.echo(f"recentred {len(out)} particles -> {o} (re-extract to apply the offsets)")


@app.command("apply-orientations")
def apply_orientations(
    i: Path = typer.Option(..., "--i", help="Input particles.star"),
    o: Path = typer.Option(..., "--o", help="Output particles.star"),
    tomograms: Path = typer.Option(None, "--tomograms", help="tomograms.star (legacy coords)"),
) -> None:
    """Fold refined angles and offsets into the subtomogram orientation and position."""
    from subtomo.data import ParticleSet, TomogramSet
    from subtomo.jobs import star_tools

    tomos = TomogramSet.read(tomograms) if tomograms else None
    out = star_tools.apply_orientations(ParticleSet.read(i, tomos), tomos)
    out.write(o)
    typer.echo(f"applied orientations of {len(out)} particles -> {o}")


@app.command("convert")
def convert(
    i: Path = typer.Option(..., "--i", help="RELION-4/Warp particles.star (pixel coordinates)"),
    tomograms: Path = typer.Option(..., "--tomograms", help="tomograms.star"),
    o: Path = typer.Option(..., "--o", help="Output RELION 5 particles.star"),
) -> None:
    """Convert rlnCoordinateX/Y/Z pixels to RELION 5 rlnCenteredCoordinate*Angst."""
    from subtomo.data import ParticleSet, TomogramSet
    from subtomo.jobs import star_tools

    tomos = TomogramSet.read(tomograms)
    out = star_tools.convert_to_centred(ParticleSet.read(i, tomos), tomos)
    out.write(o)
    typer.echo(f"converted {len(out)} particles -> {o}")


@app.command("combine")
def combine(
    inputs: list[Path] = typer.Argument(..., help="particles.star or tomograms.star files"),
    o: Path = typer.Option(..., "--o", help="Output file"),
    tomograms: bool = typer.Option(False, "--tomograms", help="Inputs are tomograms.star"),
) -> None:
    """Combine particle sets (optics groups merged by name) or tomogram sets."""
    from subtomo.data import ParticleSet, TomogramSet
    from subtomo.jobs import star_tools

    if tomograms:
        out_t = star_tools.combine_tomograms([TomogramSet.read(p) for p in inputs])
        out_t.write(o)
        typer.echo(f"combined {len(out_t)} tomograms -> {o}")
    else:
        out_p = star_tools.combine_particles([ParticleSet.read(p) for p in inputs])
        out_p.write(o)
        typer.echo(f"combined {len(out_p)} particles -> {o}")


@app.command("print")
def print_table(
    file: Path = typer.Argument(..., help="STAR file"),
    block: str = typer.Argument(..., help="Block name without data_, e.g. particles"),
    columns: list[str] = typer.Argument(None, help="Columns (default: all)"),
) -> None:
    """Print columns of a table (like relion_star_printtable)."""
    from subtomo.errors import InputError
    from subtomo.io import read_star

    blocks = read_star(file)
    if block not in blocks:
        raise InputError(f"no block data_{block} (has: {', '.join(blocks)})", file=file)
    data = blocks[block]
    if isinstance(data, dict):
        for key, value in data.items():
            typer.echo(f"{key}\t{value}")
        return
    wanted = columns or list(data.columns)
    for column in wanted:
        if column not in data.columns:
            raise InputError("no such column", file=file, block=block, column=column)
    table = Table(*wanted)
    for row in data[wanted].itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    Console().print(table)
