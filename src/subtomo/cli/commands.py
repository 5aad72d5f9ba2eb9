"""Every ``subtomo`` command: its name, one-line help and where its options and run live.

A job's command is built from its parameter dataclass (:class:`~subtomo.cli.build.JobCommand`):
add a job by adding one line here. What a command prints after its job ran is the one thing
written here per command (``show``); by default the job's output files, one a line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import typer

from subtomo.cli.build import CommandGroup, FunctionCommand, JobCommand

__all__ = ["COMMANDS"]


def _wrote(params: Any, path: Any) -> None:
    typer.echo(f"wrote {path}")


def _resolution(params: Any, result: Any) -> None:
    typer.echo(f"final resolution: {result.resolution:.3f} Å; B-factor: {result.bfactor:.1f} Å^2")


def _fsc_table(params: Any, result: Any) -> None:
    typer.echo("shell  resolution(A)  FSC")
    for k, (a, f) in enumerate(zip(result.angstrom, result.fsc, strict=True)):
        typer.echo(f"{k:5d}  {a:12.2f}  {f:8.4f}")
    for t, (shell_res, interp) in result.crossings.items():
        typer.echo(
            f"FSC = {t:g}: {shell_res:.2f} A (last shell above), {interp:.2f} A (interpolated)"
        )
    typer.echo(f"written {params.output_prefix}.star and {params.output_prefix}.png")


def _run_demo(run: Callable[..., Any], params: Any) -> Any:
    """The demo prints its steps itself; the jobs' logs only with ``--verbose``."""
    from rich.logging import RichHandler

    console = [h for h in logging.getLogger("subtomo").handlers if isinstance(h, RichHandler)]
    levels = [h.level for h in console]
    if not params.verbose:
        for handler in console:
            handler.setLevel(logging.WARNING)
    try:
        return run(params, echo=typer.echo)
    finally:
        for handler, level in zip(console, levels, strict=True):
            handler.setLevel(level)


def _demo_summary(params: Any, result: Any) -> None:
    px = result.pixel_size
    removed = result.junk_total - result.junk_final
    typer.echo(f"junk particles removed: {removed} of {result.junk_total}")
    typer.echo(
        f"final resolution: {result.final_gold_standard:.1f} Å gold-standard (FSC 0.143), "
        f"{result.final_vs_truth:.1f} Å against the truth (FSC 0.5); "
        f"pixel size {px:g} Å, Nyquist {2 * px:g} Å"
    )
    typer.echo(f"report: {result.report}")


def _done(verb: str, note: str = "") -> Callable[[Any, Any], None]:
    """``"<verb> N particles -> FILE<note>"`` (tomograms for a tomogram set)."""

    def show(params: Any, result: Any) -> None:
        what = "tomograms" if getattr(params, "tomograms", None) is True else "particles"
        typer.echo(f"{verb} {len(result)} {what} -> {params.output_file}{note}")

    return show


def _table(params: Any, data: Any) -> None:
    """A key-value block as ``key<TAB>value`` lines, a table as a rich table."""
    if isinstance(data, dict):
        for key, value in data.items():
            typer.echo(f"{key}\t{value}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*data.columns)
    for row in data.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    Console().print(table)


_STAR = "subtomo.jobs.star_tools"

COMMANDS: dict[str, JobCommand | FunctionCommand | CommandGroup] = {
    "jobs": FunctionCommand(
        "subtomo.cli.jobs", "command",
        "List jobs of the project (default_pipeline.star) with status and input jobs; a job "
        'whose process is gone without an exit marker shows as "Failed (killed?)".',
    ),
    "import": JobCommand(
        "subtomo.jobs.importtomo", "ImportTomoParams",
        "Import tilt series: movies or tilt images + mdoc -> RELION 5 tilt-series tables.",
    ),
    "motioncorr": JobCommand(
        "subtomo.jobs.motioncorr", "MotionCorrParams",
        "Motion correction: align and sum each tilt movie (gain, binning, even/odd sums).",
    ),
    "select": JobCommand(
        "subtomo.jobs.select", "SelectParams",
        "Subset selection: keep classes, threshold Pmax/log-likelihood, remove duplicates.",
        show=_wrote,
    ),
    "extract": JobCommand(
        "subtomo.jobs.extract", "ExtractParams",
        "Extract subtomos: CTF-premultiplied pseudo-subtomograms for every particle.",
    ),
    "reconstruct": JobCommand(
        "subtomo.jobs.reconstruct", "ReconstructParams",
        "Reconstruct particle: average the particles into half1/half2/merged maps.",
    ),
    "simulate": JobCommand(
        "subtomo.jobs.simulate", "SimulateParams",
        "Simulate tilt series of known particles, with RELION 5 STAR files (ground truth).",
    ),
    "ctffind": JobCommand(
        "subtomo.jobs.ctffind", "CtfFindParams",
        "CTF estimation per tilt: defocus, astigmatism, fit resolution, thickness and hand.",
    ),
    "erase-xrays": JobCommand(
        "subtomo.jobs.erase_xrays", "EraseXraysParams",
        "Erase hot pixels and X-ray hits in tilt images with local-statistics noise.",
    ),
    "exclude-tilts": JobCommand(
        "subtomo.jobs.exclude_tilts", "ExcludeTiltsParams",
        "Exclude tilt images by rule (dark, CTF fit resolution, drift, a list).",
    ),
    "import-alignment": JobCommand(
        "subtomo.jobs.import_alignment", "ImportAlignmentParams",
        "Import IMOD, AreTomo, Warp XML or RELION-4 matrix alignments as RELION 5 columns.",
    ),
    "frame-align": JobCommand(
        "subtomo.jobs.frame_align", "FrameAlignParams",
        "Tomo frame alignment: per-tilt shifts/angles, particle offsets and motion.",
    ),
    "align-tilts": JobCommand(
        "subtomo.jobs.align_tilts", "AlignTiltsParams",
        "Align tilt series without fiducials: stretched xcorr, tilt axis, projection matching.",
    ),
    "pick-surface": JobCommand(
        "subtomo.jobs.pick_surface", "PickSurfaceParams",
        "Surface picking: particles on spheres/ellipsoids fitted to vesicle points or on a "
        "segmentation, normal on z, with tilt/psi priors.",
    ),
    "import-coords": JobCommand(
        "subtomo.jobs.import_coords", "ImportCoordsParams",
        "Import coordinates from Dynamo, IMOD, crYOLO, pytom-match-pick, copick or CSV.",
    ),
    "export-alignment": JobCommand(
        "subtomo.jobs.export_alignment", "ExportAlignmentParams",
        "Export a tomograms.star's alignment as IMOD .xf/.tlt or AreTomo .aln files.",
    ),
    "reconstruct-tomograms": JobCommand(
        "subtomo.jobs.reconstruct_tomograms", "ReconstructTomogramsParams",
        "Reconstruct tomograms: WBP or SIRT at a binning, CTF phase-flipped in depth strips.",
    ),
    "template-match": JobCommand(
        "subtomo.jobs.template_match", "TemplateMatchParams",
        "Find particles in tomograms by template matching.",
    ),
    "mask": JobCommand(
        "subtomo.jobs.mask", "MaskParams",
        "Mask creation: low-pass, threshold, extend, soft edge (or de novo shapes).",
        show=None,
    ),
    "postprocess": JobCommand(
        "subtomo.jobs.postprocess", "PostprocessParams",
        "Post-processing: masked FSC, resolution at 0.143, B-factor sharpening, report.",
        show=_resolution,
    ),
    "localres": JobCommand(
        "subtomo.jobs.localres", "LocalResParams",
        "Local resolution: windowed FSC between the half maps.",
        show=None,
    ),
    "fsc": JobCommand(
        "subtomo.jobs.fsc", "FscParams",
        "Print and plot the FSC between two maps and where it crosses 0.5 and 0.143.",
        show=_fsc_table,
    ),
    "ctf-refine": JobCommand(
        "subtomo.jobs.ctf_refine", "CtfRefineParams",
        "Tomo CTF refinement: per-tilt defocus, astigmatism and ice scale (+ per particle).",
    ),
    "refine3d": JobCommand(
        "subtomo.jobs.refine3d", "Refine3DParams",
        "3D auto-refine: gold-standard refinement until convergence, then a joined iteration.",
    ),
    "class3d": JobCommand(
        "subtomo.jobs.class3d", "Class3DParams",
        "3D classification (with or without alignment) on the ML engine, RELION's outputs.",
    ),
    "initial-model": JobCommand(
        "subtomo.jobs.initial_model", "InitialModelParams",
        "De novo 3D initial model: stochastic gradient steps over mini-batches, global search.",
    ),
    "flip-hand": JobCommand(
        "subtomo.jobs.flip_hand", "FlipHandParams", "Write the mirror image (z -> -z) of a map."
    ),
    "demo": JobCommand(
        "subtomo.jobs.demo", "DemoParams",
        "Simulate a ribosome data set with known truth and run the tutorial path on it.",
        show=_demo_summary, call=_run_demo,
    ),
    "star": CommandGroup(
        "Edit and inspect particle and tomogram STAR files.",
        {
            "recentre": JobCommand(
                _STAR, "RecentreParams",
                "Recentre on a point of the reference (relion_star_handler --center).",
                run="recentre_files", show=_done("recentred", " (re-extract to apply the offsets)"),
            ),
            "apply-orientations": JobCommand(
                _STAR, "ApplyOrientationsParams",
                "Fold refined angles and offsets into the subtomogram orientation and position.",
                run="apply_orientations_files", show=_done("applied orientations of"),
            ),
            "convert": JobCommand(
                _STAR, "ConvertParams",
                "Convert rlnCoordinateX/Y/Z pixels to RELION 5 rlnCenteredCoordinate*Angst.",
                run="convert_files", show=_done("converted"),
            ),
            "combine": JobCommand(
                _STAR, "CombineParams",
                "Combine particle sets (optics groups merged by name) or tomogram sets.",
                run="combine_files", show=_done("combined"),
            ),
            "print": JobCommand(
                _STAR, "PrintParams",
                "Print columns of a table (like relion_star_printtable).",
                run="print_table", show=_table,
            ),
        },
    ),
}  # fmt: skip
