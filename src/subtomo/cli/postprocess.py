"""``subtomo postprocess``: Post-processing (relion_postprocess)."""

from __future__ import annotations

import typer


def command(
    i: str = typer.Option(None, "--i", help="Half map 1."),
    i2: str = typer.Option(None, "--i2", help="Half map 2 (default: half1 -> half2)."),
    ios: str = typer.Option(None, "--ios", help="Optimisation set with the half maps."),
    mask: str = typer.Option(None, "--mask", help="Solvent mask (values in [0, 1])."),
    angpix: float = typer.Option(-1.0, "--angpix", help="Pixel size (Å); default: header."),
    auto_bfac: bool = typer.Option(
        True, "--auto-bfac/--no-auto-bfac", "--auto_bfac", help="Fit B by Guinier plot."
    ),
    autob_lowres: float = typer.Option(10.0, "--autob-lowres", "--autob_lowres", help="Å."),
    autob_highres: float = typer.Option(0.0, "--autob-highres", "--autob_highres", help="Å."),
    adhoc_bfac: float = typer.Option(
        0.0, "--adhoc-bfac", "--adhoc_bfac", help="User B-factor (Å²); turns --auto-bfac off."
    ),
    mtf: str = typer.Option(None, "--mtf", help="Detector MTF STAR file."),
    mtf_angpix: float = typer.Option(-1.0, "--mtf-angpix", "--mtf_angpix", help="Detector Å/px."),
    skip_fsc_weighting: bool = typer.Option(
        False, "--skip-fsc-weighting", "--skip_fsc_weighting", help="No FSC weighting."
    ),
    low_pass: float = typer.Option(
        -1.0, "--low-pass", "--low_pass", help="Low-pass (Å); 0: off; negative: final resolution."
    ),
    randomize_at_fsc: float = typer.Option(0.8, "--randomize-at-fsc", "--randomize_at_fsc"),
    randomize_at_a: float = typer.Option(
        -1.0, "--randomize-at-A", "--randomize_at_A", help="Randomise phases from (Å)."
    ),
    force_mask: bool = typer.Option(False, "--force-mask", "--force_mask"),
    filter_edge_width: int = typer.Option(2, "--filter-edge-width", "--filter_edge_width"),
    interpolate: bool = typer.Option(
        False, "--interpolate", help="Report the interpolated 0.143 crossing."
    ),
    half_maps: bool = typer.Option(False, "--half-maps", "--half_maps"),
    random_seed: int = typer.Option(0, "--random-seed", "--random_seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    output_dir: str = typer.Option(None, "--o", help="Output directory."),
) -> None:
    """Post-processing: masked FSC, resolution at 0.143, B-factor sharpening, report."""
    from subtomo.jobs.postprocess import PostprocessParams, run

    res = run(
        PostprocessParams(
            i=i,
            i2=i2,
            ios=ios,
            mask=mask,
            angpix=angpix,
            auto_bfac=auto_bfac and adhoc_bfac == 0,
            autob_lowres=autob_lowres,
            autob_highres=autob_highres,
            adhoc_bfac=adhoc_bfac,
            mtf=mtf,
            mtf_angpix=mtf_angpix,
            skip_fsc_weighting=skip_fsc_weighting,
            low_pass=low_pass,
            randomize_at_fsc=randomize_at_fsc,
            randomize_at_angst=randomize_at_a,
            force_mask=force_mask,
            filter_edge_width=filter_edge_width,
            interpolate=interpolate,
            half_maps=half_maps,
            random_seed=random_seed,
            o=output_dir,
            device=device,
        )
    )
    typer.echo(f"final resolution: {res.resolution:.3f} Å; B-factor: {res.bfactor:.1f} Å^2")
