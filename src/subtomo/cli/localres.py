"""``subtomo localres``: Local resolution (relion_postprocess --locres)."""

from __future__ import annotations

import typer


def command(
    i: str = typer.Option(None, "--i", help="Half map 1."),
    i2: str = typer.Option(None, "--i2", help="Half map 2 (default: half1 -> half2)."),
    ios: str = typer.Option(None, "--ios", help="Optimisation set with the half maps."),
    mask: str = typer.Option(None, "--mask", help="Mask: sample only where windows reach it."),
    angpix: float = typer.Option(-1.0, "--angpix", help="Pixel size (Å); default: header."),
    sampling: float = typer.Option(25.0, "--locres-sampling", "--locres_sampling", help="Å."),
    maskrad: float = typer.Option(-1.0, "--locres-maskrad", "--locres_maskrad", help="Å."),
    edgwidth: float = typer.Option(-1.0, "--locres-edgwidth", "--locres_edgwidth", help="Å."),
    randomize_at: float = typer.Option(
        25.0, "--locres-randomize-at", "--locres_randomize_at", help="Å."
    ),
    minres: float = typer.Option(50.0, "--locres-minres", "--locres_minres", help="Å."),
    adhoc_bfac: float = typer.Option(-100.0, "--adhoc-bfac", "--adhoc_bfac", help="Å²."),
    batch_size: int = typer.Option(32, "--batch", help="Windows per batch."),
    random_seed: int = typer.Option(0, "--random-seed", "--random_seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    output_dir: str = typer.Option(None, "--o", help="Output directory."),
) -> None:
    """Local resolution: windowed FSC between the half maps."""
    from subtomo.jobs.localres import LocalResParams, run

    run(
        LocalResParams(
            i=i,
            i2=i2,
            ios=ios,
            mask=mask,
            angpix=angpix,
            locres_sampling=sampling,
            locres_maskrad=maskrad,
            locres_edgwidth=edgwidth,
            locres_randomize_at=randomize_at,
            locres_minres=minres,
            adhoc_bfac=adhoc_bfac,
            batch_size=batch_size,
            random_seed=random_seed,
            o=output_dir,
            device=device,
        )
    )
