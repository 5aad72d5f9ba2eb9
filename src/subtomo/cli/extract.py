"""``subtomo extract``: Extract subtomos (2D stacks or 3D pseudo-subtomograms)."""

from __future__ import annotations

import typer


def command(
    ios: str = typer.Option(None, "--ios", help="Input optimisation set."),
    particles: str = typer.Option(None, "--particles", "--p", help="particles.star."),
    tomograms: str = typer.Option(None, "--tomograms", "--t", help="tomograms.star."),
    trajectories: str = typer.Option(None, "--trajectories", "--mot", help="motion.star."),
    box: int = typer.Option(64, "--box", "--b", help="Box size (binned px)."),
    crop: int = typer.Option(-1, "--crop", help="Cropped box size (binned px)."),
    binning: float = typer.Option(1.0, "--bin", help="Binning factor (real-valued)."),
    stack2d: bool = typer.Option(True, "--stack2d/--3d", help="2D stacks or 3D subtomos."),
    float16: bool = typer.Option(True, "--float16/--float32", help="Half-precision MRC."),
    max_dose: float = typer.Option(-1.0, "--max_dose", help="Drop tilts above this dose."),
    min_frames: int = typer.Option(1, "--min_frames", help="Minimum visible tilts."),
    apply_offsets: bool = typer.Option(
        True, "--apply_offsets/--dont_apply_offsets", help="Fold origins into coordinates."
    ),
    apply_orientations: bool = typer.Option(False, "--apply_orientations"),
    cone_weight: bool = typer.Option(False, "--cone_weight", help="Cone weighting (3D)."),
    cone_angle: float = typer.Option(10.0, "--cone_angle"),
    cone_sig0: float = typer.Option(2.0, "--cone_sig0"),
    no_ctf: bool = typer.Option(False, "--no_ctf"),
    no_ic: bool = typer.Option(False, "--no_ic", help="Do not invert contrast."),
    no_circle_crop: bool = typer.Option(False, "--no_circle_crop"),
    batch_size: int = typer.Option(1024, "--batch", help="Tilt images per batch."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    output_dir: str = typer.Option(None, "--o", help="Output directory."),
) -> None:
    """Extract subtomos: CTF-premultiplied pseudo-subtomograms for every particle."""
    from subtomo.jobs.extract import ExtractParams, run

    params = ExtractParams(
        ios=ios, particles=particles, tomograms=tomograms, trajectories=trajectories, box=box,
        crop=crop, binning=binning, stack2d=stack2d, float16=float16, max_dose=max_dose,
        min_frames=min_frames, apply_offsets=apply_offsets,
        apply_orientations=apply_orientations, cone_weight=cone_weight,
        cone_angle=cone_angle, cone_sig0=cone_sig0, no_ctf=no_ctf, no_ic=no_ic,
        no_circle_crop=no_circle_crop, batch_size=batch_size, device=device,
        output_dir=output_dir,
    )  # fmt: skip
    outputs = run(params)
    for path in outputs:
        typer.echo(path)
