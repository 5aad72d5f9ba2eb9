"""Post-processing job (``relion_postprocess``): masked, phase-randomisation-corrected FSC,
final resolution at 0.143, MTF correction, FSC weighting, B-factor sharpening, low-pass.

Writes into ``PostProcess/jobNNN/`` (or ``--o``): ``postprocess.mrc``,
``postprocess_masked.mrc``, ``postprocess.star`` (general / fsc / guinier tables with
RELION's labels), ``postprocess_fsc.xml`` (EMDB), ``fsc.png``, ``guinier.png``,
``postprocess.html`` and, with ``--ios``, ``postprocess_optimisation_set.star``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.data import HalfMaps, read_half_maps, read_mtf
from subtomo.device import resolve_device
from subtomo.errors import InputError
from subtomo.io import (
    write_mrc,
    write_star,
)
from subtomo.postprocess import PostprocessOptions, PostprocessResult, postprocess
from subtomo.project import run_job, write_job_report
from subtomo.project.options import device_option, option, output_dir_option
from subtomo.report import plot_central_slices, plot_fsc, plot_guinier, write_html_report

__all__ = ["PostprocessParams", "run"]

log = logging.getLogger("subtomo")


@dataclass
class PostprocessParams:
    """Options of "Post-processing" (relion_postprocess flags)."""

    i: str | None = option(None, "--i", help="Half map 1.")
    i2: str | None = option(None, "--i2", help="Half map 2 (default: --i with half1 -> half2).")
    ios: str | None = option(None, "--ios", help="Optimisation set with the half maps (and mask).")
    mask: str | None = option(None, "--mask", help="Solvent mask (values in [0, 1]).")
    angpix: float = option(-1.0, "--angpix", help="Pixel size; <= 0: the header's.", unit="Å")
    auto_bfac: bool | None = option(
        None, "--auto_bfac/--no_auto_bfac", help="Guinier-fit B (default: unless --adhoc_bfac)."
    )
    autob_lowres: float = option(
        10.0, "--autob_lowres", help="Guinier fit from this resolution.", unit="Å"
    )
    autob_highres: float = option(
        0.0, "--autob_highres", help="Guinier fit up to this resolution; 0: Nyquist.", unit="Å"
    )
    adhoc_bfac: float = option(
        0.0, "--adhoc_bfac", help="User B-factor; turns --auto_bfac off.", unit="Å²"
    )
    mtf: str | None = option(None, "--mtf", help="Detector MTF STAR file.")
    mtf_angpix: float = option(
        -1.0, "--mtf_angpix", help="Detector pixel size of the MTF.", unit="Å"
    )
    skip_fsc_weighting: bool = option(False, "--skip_fsc_weighting", help="No FSC weighting.")
    low_pass: float = option(
        -1.0, "--low_pass", help="Low-pass; 0: off; negative: at the final resolution.", unit="Å"
    )
    randomize_at_fsc: float = option(
        0.8, "--randomize_at_fsc", help="Randomise phases from where the FSC falls below this."
    )
    randomize_at_angst: float = option(
        -1.0, "--randomize_at_A", help="Randomise phases from this resolution (instead).", unit="Å"
    )
    force_mask: bool = option(
        False, "--force_mask", help="Keep the masked FSC where the unmasked one goes further."
    )
    filter_edge_width: int = option(
        2, "--filter_edge_width", help="Low-pass edge width.", unit="shells"
    )
    interpolate: bool = option(
        False, "--interpolate", help="Report the interpolated 0.143 crossing."
    )
    half_maps: bool = option(False, "--half_maps", help="Also filter and write each half map.")
    random_seed: int = option(0, "--random_seed", help="Random seed.")
    output_dir: str | None = output_dir_option()
    project_dir: str = "."
    device: str = device_option()

    def __post_init__(self) -> None:
        if self.auto_bfac is None:  # not given: fit unless a B-factor is
            self.auto_bfac = self.adhoc_bfac == 0


def _star_tables(res: PostprocessResult, maps: HalfMaps, job_files: dict[str, str]) -> dict:
    n = maps.half1.shape[-1]
    px = maps.pixel_size
    general: dict[str, object] = {
        "rlnFinalResolution": res.resolution,
        "rlnBfactorUsedForSharpening": res.bfactor,
        "rlnUnfilteredMapHalf1": str(maps.path1),
        "rlnUnfilteredMapHalf2": str(maps.path2),
        "rlnPostprocessedMap": job_files["map"],
    }
    if res.used_mask:
        general.update(
            {
                "rlnPostprocessedMapMasked": job_files["masked"],
                "rlnParticleBoxFractionSolventMask": res.solvent_fraction,
                "rlnMaskName": str(maps.mask_path),
                "rlnRandomiseFrom": n * px / res.randomize_shell,
            }
        )
    if res.fit is not None:
        general.update(
            {
                "rlnFittedSlopeGuinierPlot": res.fit.slope,
                "rlnFittedInterceptGuinierPlot": res.fit.intercept,
                "rlnCorrelationFitGuinierPlot": res.fit.correlation,
            }
        )
    i = np.arange(res.fsc_true.size)
    ang = np.where(i > 0, n * px / np.maximum(i, 1), 999.0)
    fsc = {"rlnSpectralIndex": i, "rlnResolution": 1.0 / ang, "rlnAngstromResolution": ang}
    if res.used_mask:
        fsc.update(
            {
                "rlnFourierShellCorrelationCorrected": res.fsc_true,
                "rlnFourierShellCorrelationParticleMaskFraction": res.fsc_particle_fraction,
                "rlnFourierShellCorrelationUnmaskedMaps": res.fsc_unmasked,
                "rlnFourierShellCorrelationMaskedMaps": res.fsc_masked,
                "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": res.fsc_random,
            }
        )
    else:
        fsc["rlnFourierShellCorrelationUnmaskedMaps"] = res.fsc_true
    guinier = {"rlnResolutionSquared": res.guinier_x, **res.guinier}
    return {"general": general, "fsc": pd.DataFrame(fsc), "guinier": pd.DataFrame(guinier)}


def _fsc_xml(path: Path, frequency: np.ndarray, curve: np.ndarray) -> None:
    lines = [
        '<fsc title="subtomo masked-corrected FSC" xaxis="Resolution (A-1)" '
        'yaxis="Correlation Coefficient">'
    ]
    for x, y in zip(frequency, curve, strict=True):
        lines.append(f"  <coordinate>\n    <x>{x:.6g}</x>\n    <y>{y:.6g}</y>\n  </coordinate>")
    lines.append("</fsc>")
    path.write_text("\n".join(lines) + "\n")


def _fit_range(res: PostprocessResult, lowres: float) -> tuple[float, float]:
    """1/d^2 from ``lowres`` to the last shell with a weighted amplitude (for the plot)."""
    y = res.guinier.get("rlnLogAmplitudesWeighted", res.guinier["rlnLogAmplitudesOriginal"])
    valid = res.guinier_x[y > -99]
    return 1.0 / lowres**2, float(valid[-1]) if valid.size else float(res.guinier_x[-1])


def run(params: PostprocessParams) -> PostprocessResult:
    """Run the job; returns the result (the files are in the job directory)."""
    device = resolve_device(params.device)
    maps = read_half_maps(params.i, params.i2, params.ios, params.mask, params.angpix, device)
    mtf = read_mtf(params.mtf) if params.mtf else (None, None)
    if params.auto_bfac and params.adhoc_bfac != 0:
        raise InputError("give either --auto-bfac or --adhoc-bfac, not both")
    options = PostprocessOptions(
        auto_bfac=params.auto_bfac,
        autob_lowres=params.autob_lowres,
        autob_highres=params.autob_highres,
        adhoc_bfac=params.adhoc_bfac,
        skip_fsc_weighting=params.skip_fsc_weighting,
        low_pass=params.low_pass,
        randomize_at_fsc=params.randomize_at_fsc,
        randomize_at_angst=params.randomize_at_angst,
        force_mask=params.force_mask,
        filter_edge_width=params.filter_edge_width,
        interpolate=params.interpolate,
        mtf_frequency=mtf[0],
        mtf_value=mtf[1],
        mtf_pixel_size=params.mtf_angpix if params.mtf_angpix > 0 else None,
        half_maps=params.half_maps,
        random_seed=params.random_seed,
    )
    inputs = {str(maps.path1): "DensityMap.mrc.halfmap", str(maps.path2): "DensityMap.mrc.halfmap"}
    if maps.mask_path:
        inputs[str(maps.mask_path)] = "Mask3D.mrc"
    with run_job(
        "PostProcess",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        log.info(" + half maps: %s, %s (%.4g Å/px)", maps.path1, maps.path2, maps.pixel_size)
        try:
            res = postprocess(maps.half1, maps.half2, maps.pixel_size, maps.mask, options)
        except ValueError as exc:
            raise InputError(str(exc), file=maps.path1) from None
        files = {
            "map": job.alias + "postprocess.mrc",
            "masked": job.alias + "postprocess_masked.mrc",
        }
        write_mrc(job.path("postprocess.mrc"), res.sharpened, maps.pixel_size)
        outputs[files["map"]] = "DensityMap.mrc.postprocess"
        if maps.mask is not None:
            write_mrc(
                job.path("postprocess_masked.mrc"), res.sharpened * maps.mask, maps.pixel_size
            )
            outputs[files["masked"]] = "DensityMap.mrc.postprocess.masked"
        if res.half_maps is not None:
            for k, half in enumerate(res.half_maps, 1):
                write_mrc(job.path(f"postprocess_half{k}.mrc"), half, maps.pixel_size)
        tables = _star_tables(res, maps, files)
        write_star(job.path("postprocess.star"), tables)
        outputs[job.alias + "postprocess.star"] = "ProcessData.star.relion.postprocess"
        freq = tables["fsc"]["rlnResolution"].to_numpy()
        _fsc_xml(job.path("postprocess_fsc.xml"), freq, res.fsc_true)
        curves = {"unmasked": res.fsc_unmasked}
        if res.used_mask:
            curves = {
                "corrected": res.fsc_true,
                "unmasked": res.fsc_unmasked,
                "masked": res.fsc_masked,
                "phase-randomised masked": res.fsc_random,
            }
        images = [
            plot_fsc(job.path("fsc.png"), freq, curves, resolution=res.resolution),
            plot_guinier(
                job.path("guinier.png"),
                res.guinier_x,
                {
                    k.removeprefix("rlnLogAmplitudes"): v
                    for k, v in res.guinier.items()
                    if k != "rlnLogAmplitudesIntercept"
                },
                fit=(res.fit.slope, res.fit.intercept) if res.fit else None,
                fit_range=_fit_range(res, params.autob_lowres),
            ),
            plot_central_slices(
                job.path("postprocess_slices.png"), res.sharpened, title="postprocess.mrc"
            ),
        ]
        n = maps.half1.shape[-1]
        summary = {
            "final resolution (FSC 0.143)": f"{res.resolution:.2f} Å",
            "interpolated 0.143 crossing": f"{res.resolution_interpolated:.2f} Å",
            "B-factor used for sharpening": f"{res.bfactor:.1f} Å²",
            "low-pass filter": f"{res.low_pass:.2f} Å" if res.low_pass else "none",
            "half maps": f"{maps.path1}, {maps.path2}",
            "box, pixel size": f"{n}, {maps.pixel_size:.4g} Å",
        }
        if res.used_mask:
            summary["mask"] = str(maps.mask_path)
            summary["phases randomised from"] = f"{n * maps.pixel_size / res.randomize_shell:.2f} Å"
            summary["solvent fraction f"] = f"{res.solvent_fraction:.3f}"
        if res.fit is not None:
            summary["Guinier fit"] = (
                f"slope {res.fit.slope:.2f}, intercept {res.fit.intercept:.3f}, "
                f"r² {res.fit.correlation:.3f} ({res.fit.n_points} shells)"
            )
        write_html_report(
            job.path("postprocess.html"),
            "subtomo post-processing",
            summary,
            images,
            warnings=res.warnings,
        )
        if maps.optimisation_set is not None:
            oset = maps.optimisation_set
            oset.reference_fsc = Path(job.alias + "postprocess.star")
            oset.write(job.path("postprocess_optimisation_set.star"))
            outputs[job.alias + "postprocess_optimisation_set.star"] = (
                "ProcessData.star.relion.tomo.optimisation_set"
            )
        log.info(
            " + FINAL RESOLUTION: %.4g Å (interpolated %.4g Å)",
            res.resolution,
            res.resolution_interpolated,
        )
        log.info(" + B-factor: %.2f Å^2", res.bfactor)
        write_job_report(job, outputs)
    return res
