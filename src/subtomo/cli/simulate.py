"""``subtomo simulate``: ground-truth tilt series, STAR files and maps (subtomo.jobs.simulate)."""

from __future__ import annotations

from pathlib import Path

import typer


def _size(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    values = [int(v) for v in text.replace("x", ",").split(",")]
    if len(values) != 3:
        raise typer.BadParameter("expected W,H,D", param_hint="--tomogram-size")
    return (values[0], values[1], values[2])


def command(
    out: Path = typer.Option(..., "--out", help="Output (project) directory."),
    preset: str = typer.Option("tiny", "--preset", help="tiny | demo | benchmark."),
    maps: list[str] = typer.Option(None, "--map", help="Species map (MRC); repeat for more."),
    species_fraction: list[float] = typer.Option(
        None, "--species-fraction", help="Share of each --map species; repeat."
    ),
    tomograms: int = typer.Option(None, "--tomograms", help="Number of tilt series."),
    particles: int = typer.Option(None, "--particles", help="Particles in all tomograms."),
    pixel_size: float = typer.Option(None, "--pixel-size", help="Tilt-series pixel size (Å)."),
    box: int = typer.Option(None, "--box", help="Simulation box (px, even)."),
    tomogram_size: str = typer.Option(None, "--tomogram-size", help="W,H,D in px (even)."),
    tilt_range: float = typer.Option(None, "--tilt-range", help="Max |tilt| (deg)."),
    tilt_step: float = typer.Option(None, "--tilt-step", help="Tilt increment (deg)."),
    tilt_axis: float = typer.Option(None, "--tilt-axis", help="Tilt-axis angle from x (deg)."),
    dose_per_tilt: float = typer.Option(None, "--dose-per-tilt", help="e/Å² per tilt."),
    dose_symmetric: bool = typer.Option(
        None, "--dose-symmetric/--sequential", help="Hagen dose-symmetric or -max..+max order."
    ),
    voltage: float = typer.Option(None, "--voltage", help="Voltage (kV)."),
    cs: float = typer.Option(None, "--cs", help="Spherical aberration (mm)."),
    amplitude_contrast: float = typer.Option(None, "--q0", help="Amplitude contrast."),
    defocus_um: float = typer.Option(None, "--defocus-um", help="Mean defocus (µm, underfocus)."),
    defocus_spread_um: float = typer.Option(None, "--defocus-spread-um", help="± per tilt (µm)."),
    astigmatism_um: float = typer.Option(None, "--astigmatism-um", help="U - V (µm)."),
    ctf: bool = typer.Option(None, "--ctf/--no-ctf", help="Apply the CTF."),
    noise: str = typer.Option(None, "--noise", help="gaussian | poisson | none."),
    snr: float = typer.Option(None, "--snr", help="Target SNR (see subtomo.simulate.imaging)."),
    mtf: str = typer.Option(None, "--mtf", help="Detector MTF STAR file (RELION format)."),
    layout: str = typer.Option(None, "--layout", help="random | vesicle."),
    tilt_error_deg: float = typer.Option(None, "--tilt-error-deg", help="σ of tilt angles."),
    tilt_shift_error_px: float = typer.Option(None, "--tilt-shift-error-px", help="σ shifts."),
    pose_error_deg: float = typer.Option(None, "--pose-error-deg", help="Picked pose error."),
    shift_error_px: float = typer.Option(None, "--shift-error-px", help="Picked shift error."),
    seed: int = typer.Option(None, "--seed", help="Random seed."),
    batch_size: int = typer.Option(None, "--batch", help="Patches rendered at once."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda[:N]."),
) -> None:
    """Simulate tilt series of known particles, with RELION 5 STAR files (ground truth)."""
    from subtomo.jobs.simulate import SimulateJob, run
    from subtomo.simulate import SimulationParams

    params = SimulationParams.from_preset(
        preset,
        maps=tuple(maps) if maps else None,
        species_fraction=tuple(species_fraction) if species_fraction else (() if maps else None),
        tomograms=tomograms, particles=particles, pixel_size=pixel_size, box=box,
        tomogram_size=_size(tomogram_size), tilt_range=tilt_range, tilt_step=tilt_step,
        tilt_axis_deg=tilt_axis, dose_per_tilt=dose_per_tilt, dose_symmetric=dose_symmetric,
        voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast, defocus_um=defocus_um,
        defocus_spread_um=defocus_spread_um, astigmatism_um=astigmatism_um, ctf=ctf,
        noise=noise, snr=snr, mtf=mtf, layout=layout, tilt_error_deg=tilt_error_deg,
        tilt_shift_error_px=tilt_shift_error_px, pose_error_deg=pose_error_deg,
        shift_error_px=shift_error_px, seed=seed, batch_size=batch_size, device=device,
    )  # fmt: skip
    outputs = run(SimulateJob(out=out, simulation=params))
    for path in outputs:
        typer.echo(path)
