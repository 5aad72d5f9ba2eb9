"""``subtomo class3d``: 3D classification of 2D-stack particles (subtomo.jobs.class3d)."""

from __future__ import annotations

import typer


def command(
    ios: str = typer.Option(None, "--ios", help="Input optimisation set."),
    particles: str = typer.Option(None, "--particles", "--p", help="particles.star (2D stacks)."),
    tomograms: str = typer.Option(None, "--tomograms", "--t", help="tomograms.star."),
    trajectories: str = typer.Option(None, "--trajectories", "--mot", help="motion.star."),
    ref: list[str] = typer.Option(None, "--ref", help="Reference map; one, or one per class."),
    ref_correct_greyscale: bool = typer.Option(
        False, "--ref_correct_greyscale", help="Reference is on the absolute grey scale."
    ),
    ini_high: float = typer.Option(60.0, "--ini_high", help="Initial low-pass (Å); <= 0: none."),
    solvent_mask: str = typer.Option(None, "--solvent_mask", help="Reference mask (MRC)."),
    classes: int = typer.Option(1, "--K", "--classes", help="Number of classes."),
    iterations: int = typer.Option(25, "--iter", help="Number of iterations."),
    tau2_fudge: float = typer.Option(1.0, "--tau2_fudge", "--tau2-fudge", help="T."),
    particle_diameter: float = typer.Option(
        -1.0, "--particle_diameter", help="Mask diameter (Å); <= 0: the box."
    ),
    zero_mask: bool = typer.Option(False, "--zero_mask", help="Zeros outside the mask."),
    flatten_solvent: bool = typer.Option(
        True, "--flatten_solvent/--no_flatten_solvent", help="Mask the references."
    ),
    sym: str = typer.Option("C1", "--sym", help="Point-group symmetry."),
    skip_align: bool = typer.Option(
        False, "--skip_align", "--no-align", help="Classification without alignment."
    ),
    healpix_order: int = typer.Option(2, "--healpix_order", help="Angular sampling order."),
    offset_range: float = typer.Option(5.0, "--offset_range", help="Offset range (pixels)."),
    offset_step: float = typer.Option(1.0, "--offset_step", help="Offset step (pixels)."),
    sigma_ang: float = typer.Option(
        -1.0, "--sigma_ang", help="Local searches: prior sigma (deg); <= 0: global."
    ),
    oversampling: int = typer.Option(1, "--oversampling", help="0 or 1."),
    strict_highres_exp: float = typer.Option(
        -1.0, "--strict_highres_exp", help="Limit resolution E-step (Å); <= 0: none."
    ),
    adaptive_fraction: float = typer.Option(0.999, "--adaptive_fraction", help="Significance."),
    pad: float = typer.Option(2.0, "--pad", help="Padding factor."),
    random_seed: int = typer.Option(0, "--random_seed", help="Random seed."),
    continue_from: str = typer.Option(
        None, "--continue", help="Continue a job: its directory or a run_itNNN_optimiser.star."
    ),
    memory_gb: float = typer.Option(2.0, "--memory-gb", help="E-step memory per batch (GB)."),
    cache_gb: float = typer.Option(2.0, "--cache-gb", help="Cache stacks up to this (GB)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    output_dir: str = typer.Option(None, "--o", help="Output directory."),
) -> None:
    """3D classification (with or without alignment) on the ML engine, RELION's outputs."""
    from subtomo.jobs.class3d import Class3DParams, run

    params = Class3DParams(
        ios=ios, particles=particles, tomograms=tomograms, trajectories=trajectories,
        ref=tuple(ref or ()), ref_correct_greyscale=ref_correct_greyscale, ini_high=ini_high,
        solvent_mask=solvent_mask, K=classes, iter=iterations, tau2_fudge=tau2_fudge,
        particle_diameter=particle_diameter, zero_mask=zero_mask,
        flatten_solvent=flatten_solvent, sym=sym, skip_align=skip_align,
        healpix_order=healpix_order, offset_range=offset_range, offset_step=offset_step,
        sigma_ang=sigma_ang, oversampling=oversampling, strict_highres_exp=strict_highres_exp,
        adaptive_fraction=adaptive_fraction, pad=pad, random_seed=random_seed,
        continue_from=continue_from, memory_gb=memory_gb, cache_gb=cache_gb, device=device,
        output_dir=output_dir,
    )  # fmt: skip
    outputs = run(params)
    for path in outputs:
        typer.echo(path)
