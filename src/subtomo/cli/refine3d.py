"""``subtomo refine3d``: 3D auto-refine with gold-standard half sets."""

from __future__ import annotations

import typer


def command(
    ios: str = typer.Option(None, "--ios", help="Input optimisation set."),
    particles: str = typer.Option(None, "--particles", "--i", help="particles.star (2D stacks)."),
    tomograms: str = typer.Option(None, "--tomograms", "--t", help="tomograms.star."),
    ref: str = typer.Option(None, "--ref", help="Reference map (*half1*: one per half)."),
    ref_correct_greyscale: bool = typer.Option(
        False, "--ref_correct_greyscale", help="Reference map is on absolute greyscale."
    ),
    ini_high: float = typer.Option(60.0, "--ini_high", help="Initial low-pass filter (Å)."),
    solvent_mask: str = typer.Option(None, "--solvent_mask", help="Reference mask (MRC)."),
    solvent_correct_fsc: bool = typer.Option(
        False, "--solvent_correct_fsc", help="Use solvent-flattened FSCs."
    ),
    sym: str = typer.Option("C1", "--sym", help="Symmetry (C, D, T, O, I)."),
    particle_diameter: float = typer.Option(
        0.0, "--particle_diameter", help="Mask diameter (Å); 0: 0.9 of the box."
    ),
    zero_mask: bool = typer.Option(True, "--zero_mask/--no_zero_mask", help="Mask with zeros."),
    tau2_fudge: float = typer.Option(1.0, "--tau2_fudge", help="Regularisation T."),
    healpix_order: int = typer.Option(2, "--healpix_order", help="Initial HEALPix order."),
    offset_range: float = typer.Option(5.0, "--offset_range", help="Initial offset range (px)."),
    offset_step: float = typer.Option(1.0, "--offset_step", help="Initial offset step (px)."),
    auto_local_healpix_order: int = typer.Option(
        4, "--auto_local_healpix_order", help="Local searches from this HEALPix order."
    ),
    oversampling: int = typer.Option(1, "--oversampling", help="Adaptive oversampling order."),
    sigma_ang: float = typer.Option(
        -1.0, "--sigma_ang", help="Local searches from the start with this prior width (deg)."
    ),
    sigma_tilt: float = typer.Option(-1.0, "--sigma_tilt", help="Tilt prior width (deg)."),
    sigma_psi: float = typer.Option(-1.0, "--sigma_psi", help="Psi prior width (deg)."),
    auto_ignore_angles: bool = typer.Option(False, "--auto_ignore_angles"),
    auto_resol_angles: bool = typer.Option(False, "--auto_resol_angles"),
    low_resol_join_halves: float = typer.Option(
        40.0, "--low_resol_join_halves", help="Join halves below this resolution (Å)."
    ),
    strict_highres_exp: float = typer.Option(
        -1.0, "--strict_highres_exp", help="Limit resolution E-step (Å)."
    ),
    max_iter: int = typer.Option(
        None, "--iter", help="Iterations at most before the final one (default 50)."
    ),
    pad: float = typer.Option(2.0, "--pad", help="Padding factor."),
    random_seed: int = typer.Option(0, "--random_seed", help="Random seed."),
    memory_gb: float = typer.Option(None, "--memory-gb", help="Memory budget (GB; default 2)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    continue_from: str = typer.Option(
        None, "--continue", help="Resume a job: its directory or a run_itNNN_optimiser.star."
    ),
    output_dir: str = typer.Option(None, "--o", help="Output directory."),
) -> None:
    """3D auto-refine: gold-standard refinement until convergence, then a joined iteration."""
    options = dict(locals())  # every parameter above is a Refine3DParams field
    from subtomo.jobs.refine3d import Refine3DParams, run

    params = Refine3DParams(**options)
    outputs = run(params)
    for path in outputs:
        typer.echo(path)
