"""``subtomo mask``: Mask creation (relion_mask_create)."""

from __future__ import annotations

import typer


def command(
    i: str = typer.Option(None, "--i", help="Input map to threshold."),
    lowpass: float = typer.Option(-1.0, "--lowpass", help="Low-pass (Å) before thresholding."),
    angpix: float = typer.Option(-1.0, "--angpix", help="Pixel size (Å); default: header."),
    ini_threshold: float = typer.Option(
        0.01, "--ini-threshold", "--ini_threshold", help="Binarisation threshold."
    ),
    extend: float = typer.Option(
        0.0, "--extend", "--extend_inimask", help="Extend (px); negative shrinks."
    ),
    soft_edge: float = typer.Option(
        0.0, "--soft-edge", "--width_soft_edge", help="Raised-cosine edge width (px)."
    ),
    invert: bool = typer.Option(False, "--invert", help="Invert the final mask."),
    and_map: str = typer.Option(None, "--and", help="AND: both maps above the threshold."),
    or_map: str = typer.Option(None, "--or", help="OR: either map above the threshold."),
    and_not: str = typer.Option(None, "--and-not", "--and_not", help="Input above AND this below."),
    or_not: str = typer.Option(None, "--or-not", "--or_not", help="Input above OR this below."),
    denovo: bool = typer.Option(False, "--denovo", help="Make a sphere/shell/cylinder de novo."),
    box_size: int = typer.Option(-1, "--box-size", "--box_size", help="De novo box (px)."),
    inner_radius: float = typer.Option(0.0, "--inner-radius", "--inner_radius", help="px."),
    outer_radius: float = typer.Option(99999.0, "--outer-radius", "--outer_radius", help="px."),
    height: float = typer.Option(0.0, "--height", help="Cylinder height along z (px); 0: sphere."),
    center_x: float = typer.Option(0.0, "--center-x", "--center_x", help="px from N//2."),
    center_y: float = typer.Option(0.0, "--center-y", "--center_y", help="px from N//2."),
    center_z: float = typer.Option(0.0, "--center-z", "--center_z", help="px from N//2."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    output_dir: str = typer.Option(None, "--o", help="Output directory."),
) -> None:
    """Mask creation: low-pass, threshold, extend, soft edge (or de novo shapes)."""
    from subtomo.jobs.mask import MaskParams, run

    run(
        MaskParams(
            i=i,
            lowpass=lowpass,
            angpix=angpix,
            ini_threshold=ini_threshold,
            extend_inimask=extend,
            width_soft_edge=soft_edge,
            invert=invert,
            and_map=and_map,
            or_map=or_map,
            and_not_map=and_not,
            or_not_map=or_not,
            denovo=denovo,
            box_size=box_size,
            inner_radius=inner_radius,
            outer_radius=outer_radius,
            height=height,
            center_x=center_x,
            center_y=center_y,
            center_z=center_z,
            o=output_dir,
            device=device,
        )
    )
