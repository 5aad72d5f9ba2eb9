"""``subtomo reconstruct``: Reconstruct particle (half1/half2/merged averages)."""

from __future__ import annotations

import typer


def command(
    ios: str = typer.Option(None, "--ios", help="Input optimisation set."),
    particles: str = typer.Option(None, "--particles", "--p", help="particles.star."),
    tomograms: str = typer.Option(None, "--tomograms", "--t", help="tomograms.star."),
    trajectories: str = typer.Option(None, "--trajectories", "--mot", help="motion.star."),
    box: int = typer.Option(0, "--box", "--b", help="Box size (binned px); 0: stacks' size."),
    crop: int = typer.Option(-1, "--crop", help="Cropped box size (binned px)."),
    binning: float = typer.Option(0.0, "--bin", help="Binning factor; 0: stacks' (else 1)."),
    sym: str = typer.Option("C1", "--sym", help="Point-group symmetry."),
    snr: float = typer.Option(-1.0, "--SNR", help="Wiener SNR; <= 0: RELION's heuristic."),
    taper: float = typer.Option(10.0, "--taper", help="Taper width (voxels)."),
    no_ctf: bool = typer.Option(False, "--no_ctf", help="Do not apply the CTF."),
    no_circle_crop: bool = typer.Option(False, "--no_circle_crop", help="No pre-crop."),
    cutoff_fract: float = typer.Option(0.01, "--cutoff_fract", help="Dose cut-off fraction."),
    source: str = typer.Option("auto", "--from", help="auto | tilt_series | stacks."),
    batch_size: int = typer.Option(1024, "--batch", help="Tilt images per batch."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    output_dir: str = typer.Option(None, "--o", help="Output directory."),
) -> None:
    """Reconstruct particle: average the particles into half1/half2/merged maps."""
    from subtomo.jobs.reconstruct import ReconstructParams, run

    params = ReconstructParams(
        ios=ios, particles=particles, tomograms=tomograms, trajectories=trajectories, box=box,
        crop=crop, binning=binning, sym=sym, snr=snr, taper=taper, no_ctf=no_ctf,
        no_circle_crop=no_circle_crop, cutoff_fract=cutoff_fract, source=source,
        batch_size=batch_size, device=device, output_dir=output_dir,
    )  # fmt: skip
    outputs = run(params)
    for path in outputs:
        typer.echo(path)
