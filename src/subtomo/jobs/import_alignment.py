"""Import tilt-series alignments (``subtomo import-alignment``; the reading half of RELION's
"Align tilt series", ``AlignTiltSeries/jobNNN/``): IMOD/etomo, AreTomo or Warp results already
made for the series of a ``tomograms.star``, or its own RELION-4 projection matrices, become
RELION 5 per-tilt columns (relion5-upstream.md §5, conventions §14, §18).

Per series ``NAME``, in ``--imod_dir`` (or its ``NAME/`` subfolder): ``NAME.xf`` and
``NAME.tlt`` (one line per tilt, in ascending nominal tilt as RELION stacks them for IMOD),
optionally ``NAME.xtilt`` (line count checked, not used, as RELION), ``NAME.edf`` or
``align.log`` (tiltalign's AngleOffset, removed from the tilts) and ``tilt.com`` (FULLIMAGE and
THICKNESS: rlnTomoSizeX/Y/Z when the input has none; FULLIMAGE also gives the binning of the
alignment against the tilt images). In ``--aretomo_dir``: ``NAME.aln`` (dark frames dropped
from the table, local patches ignored). In ``--warp_dir``: ``NAME.xml`` (or the name without
its ``.tomostar``; UseTilt False rows dropped from the table). With ``--relion4``: the
rlnTomoProjX/Y/Z/W rows of ``--i`` (RELION-4 and WarpTools tables) become the five columns
that give the same projections with the tilt images' size (``--image_size`` when the images
are not at hand), and the rows are dropped, as RELION 5 drops them. Writes
``aligned_tilt_series.star`` and ``tilt_series/NAME.star`` (rows in ascending nominal tilt,
every input column kept) and ``report.html``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.data import TiltSeries, TomogramSet
from subtomo.errors import InputError
from subtomo.geometry import alignment_from_projection_matrices
from subtomo.io import numeric_column
from subtomo.io.alignment_files import (
    read_aln,
    read_angles,
    read_edf,
    read_imod_com,
    read_warp_xml,
    read_xf,
)
from subtomo.io.files import read_utf8
from subtomo.project import run_job, write_job_report
from subtomo.project.options import option, output_dir_option
from subtomo.tilt.external_alignment import (
    aretomo_to_relion,
    imod_to_relion,
    view_order,
    warp_to_relion,
)

__all__ = ["ImportAlignmentParams", "run"]

log = logging.getLogger("subtomo")

_OFFSET = re.compile(r"AngleOffset\s*=\s*([-+0-9.eE]+)")


@dataclass
class ImportAlignmentParams:
    """Options of "Import tilt-series alignment"."""

    i: str = option(..., "--i", help="Tilt series: tomograms.star or a job's global STAR.")
    imod_dir: str = option(
        "",
        "--imod_dir",
        help="Folder of IMOD results: NAME.xf, NAME.tlt (or NAME/NAME.xf).",
    )
    aretomo_dir: str = option(
        "",
        "--aretomo_dir",
        help="Folder of AreTomo results: NAME.aln (or NAME/NAME.aln).",
    )
    warp_dir: str = option(
        "",
        "--warp_dir",
        help="Folder of Warp/WarpTools tilt-series XML: NAME.xml (or NAME/NAME.xml).",
    )
    relion4: bool = option(
        False,
        "--relion4/--no_relion4",
        help="Convert --i's own RELION-4 rlnTomoProjX/Y/Z/W rows to RELION 5 columns.",
    )
    image_size: str = option(
        "",
        "--image_size",
        help="--relion4: tilt-image size W,H in pixels; empty: from the images.",
    )
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


_PROJ_COLUMNS = ["rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW"]


def _find(folder: Path, name: str, suffix: str) -> Path | None:
    for candidate in (folder / f"{name}{suffix}", folder / name / f"{name}{suffix}"):
        if candidate.is_file():
            return candidate
    return None


def _scale(series: TiltSeries, file_size: tuple[int, int] | None, source: Path) -> float:
    """Binning of the alignment files' pixels against the tilt images (1 when unknown)."""
    image = series.image_size
    if image is None or file_size is None or tuple(file_size) == tuple(image):
        return 1.0
    scale = image[0] / file_size[0]
    if (
        round(scale) < 1
        or abs(scale - round(scale)) > 0.01
        or abs(image[1] / file_size[1] - round(scale)) > 0.01
    ):
        raise InputError(
            f"aligned images of {file_size[0]}x{file_size[1]} pixels do not match "
            f"the tilt images ({image[0]}x{image[1]}) at an integer binning",
            file=source,
        )
    return float(round(scale))


def _imod(series: TiltSeries, folder: Path) -> tuple[pd.DataFrame, dict, list[str]]:
    """``(aligned table, global values, notes)`` of one series from IMOD files."""
    xf_path = _find(folder, series.name, ".xf")
    if xf_path is None:
        raise InputError(f"no {series.name}.xf for tilt series {series.name}", file=folder)
    here = xf_path.parent
    tlt_path = here / f"{series.name}.tlt"
    xf, tlt = read_xf(xf_path), read_angles(tlt_path)
    n = series.n_tilts
    for path, count in ((xf_path, len(xf)), (tlt_path, len(tlt))):
        if count != n:
            raise InputError(
                f"{count} lines for tilt series {series.name} of {n} tilts "
                "(IMOD view exclusion is not supported, as in RELION)",
                file=path,
            )
    notes, values = [], {}
    if (here / f"{series.name}.xtilt").is_file():
        xtilt = read_angles(here / f"{series.name}.xtilt")
        if len(xtilt) != n:
            raise InputError(
                f"{len(xtilt)} lines for {n} tilts", file=here / f"{series.name}.xtilt"
            )
        if np.abs(xtilt).max() > 0.05:
            notes.append(f"X-axis tilt up to {np.abs(xtilt).max():.2f}° in .xtilt not used")
    offset = 0.0
    edf, align_log = here / f"{series.name}.edf", here / "align.log"
    if edf.is_file():
        found = [v for k, v in read_edf(edf).items() if k.endswith(".align.AngleOffset")]
        offset = float(found[0]) if found else 0.0
        values["rlnEtomoDirectiveFile"] = str(edf)
    elif align_log.is_file():
        match = _OFFSET.search(read_utf8(align_log))
        offset = float(match.group(1)) if match else 0.0
    file_size, size = None, None
    if (here / "tilt.com").is_file():
        com = read_imod_com(here / "tilt.com")
        try:
            if "FULLIMAGE" in com:
                file_size = (int(com["FULLIMAGE"][0]), int(com["FULLIMAGE"][1]))
            if file_size and "THICKNESS" in com:
                size = (*file_size, int(float(com["THICKNESS"][0])))
        except (ValueError, IndexError):
            raise InputError(
                "FULLIMAGE/THICKNESS are not numbers", file=here / "tilt.com"
            ) from None
    scale = _scale(series, file_size, here / "tilt.com")
    columns = imod_to_relion(xf, tlt, series.pixel_size, angle_offset=offset, scale=scale)
    order = view_order(series.tilts)
    table = series.tilts.iloc[order].reset_index(drop=True)
    for column, value in columns.items():
        table[column] = value
    if size is not None:
        values.update(
            zip(
                ("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"),
                (s * scale for s in size),
                strict=True,
            )
        )
    notes.append(f"AngleOffset {offset:g}° removed, binning {scale:g}")
    return table, values, notes


def _nominal_tilts(series: TiltSeries, what: str) -> np.ndarray:
    """rlnTomoNominalStageTiltAngle of ``series``, which ``what`` is matched to."""
    if "rlnTomoNominalStageTiltAngle" not in series.tilts.columns:
        raise InputError(
            f"rlnTomoNominalStageTiltAngle is needed to match {what}",
            file=series.tilt_file,
            block=series.name,
        )
    return numeric_column(
        series.tilts, "rlnTomoNominalStageTiltAngle", series.tilt_file, series.name
    )


def _aretomo(series: TiltSeries, folder: Path) -> tuple[pd.DataFrame, dict, list[str]]:
    """``(aligned table, global values, notes)`` of one series from an ``.aln``."""
    path = _find(folder, series.name, ".aln")
    if path is None:
        raise InputError(f"no {series.name}.aln for tilt series {series.name}", file=folder)
    aln = read_aln(path)
    nominal = _nominal_tilts(series, "the .aln's rows")
    scale = _scale(series, aln.raw_size[:2] if aln.raw_size else None, path)
    try:
        kept, columns = aretomo_to_relion(aln, nominal, series.pixel_size, scale=scale)
    except ValueError as exc:
        raise InputError(str(exc), file=path) from None
    table = series.tilts.iloc[kept].reset_index(drop=True)
    for column, value in columns.items():
        table[column] = value
    table = table.iloc[view_order(table)].reset_index(drop=True)
    notes = [f"{len(aln.dark_frames)} dark frames dropped, binning {scale:g}"]
    if len(aln.local):
        notes.append(f"{len(aln.local)} local patch rows ignored")
    return table, {}, notes


def _warp(series: TiltSeries, folder: Path) -> tuple[pd.DataFrame, dict, list[str]]:
    """``(aligned table, global values, notes)`` of one series from a Warp ``.xml``."""
    path = _find(folder, series.name, ".xml") or _find(
        folder, series.name.removesuffix(".tomostar"), ".xml"
    )
    if path is None:
        raise InputError(f"no {series.name}.xml for tilt series {series.name}", file=folder)
    xml = read_warp_xml(path)
    nominal = _nominal_tilts(series, "the .xml's tilts")
    try:
        kept, columns = warp_to_relion(xml, nominal)
    except ValueError as exc:
        raise InputError(str(exc), file=path) from None
    table = series.tilts.iloc[kept].reset_index(drop=True)
    for column, value in columns.items():
        table[column] = value
    table = table.iloc[view_order(table)].reset_index(drop=True)
    return table, {}, [f"{series.n_tilts - len(kept)} tilts with UseTilt False dropped"]


def _parse_size(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"--image_size: expected W,H in pixels, found {text!r}") from None
    if w < 1 or h < 1:
        raise InputError(f"--image_size: expected positive W,H, found {text!r}")
    return w, h


def _relion4(series: TiltSeries, image_size: tuple[int, int] | None):
    """``(table, global values, notes)``: rlnTomoProj rows as the five RELION 5 columns."""
    if not series.has_projection_rows:
        raise InputError(
            "no rlnTomoProjX/Y/Z/W rows to convert", file=series.tilt_file, block=series.name
        )
    size = image_size
    if size is None:
        try:
            size = series.image_size
        except InputError:
            size = None
    if size is None:
        raise InputError(
            "tilt images not found: give their size with --image_size W,H",
            file=series.tilt_file,
            block=series.name,
        )
    matrices = series.projection_matrices()
    columns = alignment_from_projection_matrices(
        matrices, series.pixel_size, series.tomogram_size, size
    )
    table = series.tilts.drop(columns=_PROJ_COLUMNS)
    for column, value in columns.items():
        table[column] = value.numpy()
    table = table.iloc[view_order(table)].reset_index(drop=True)
    return table, {}, [f"projection matrices of {size[0]}x{size[1]} images"]


def run(params: ImportAlignmentParams) -> dict[str, str]:
    """Read every series' alignment files; returns ``{output path: RELION node type}``."""
    sources = {
        "IMOD": params.imod_dir,
        "AreTomo": params.aretomo_dir,
        "Warp": params.warp_dir,
        "RELION-4 matrices": params.relion4,
    }
    given = [name for name, value in sources.items() if value]
    if len(given) != 1:
        raise InputError("give exactly one of --imod_dir, --aretomo_dir, --warp_dir, --relion4")
    source = given[0]
    image_size = _parse_size(params.image_size)
    tomograms = TomogramSet.read(params.i, require_series=True)
    folder = Path(params.imod_dir or params.aretomo_dir or params.warp_dir or params.i)
    if not params.relion4 and not folder.is_dir():
        raise InputError("folder not found", file=folder)
    readers = {"IMOD": _imod, "AreTomo": _aretomo, "Warp": _warp}
    if params.relion4:
        results = {s.name: _relion4(s, image_size) for s in tomograms}
    else:
        results = {s.name: readers[source](s, folder) for s in tomograms}  # checked before the job
    inputs = {params.i: "TomogramGroupMetadata.star.relion.tomo"}
    with run_job(
        "AlignTiltSeries",
        params,
        output_dir=params.output_dir,
        project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):
        table = tomograms.global_table.copy()
        rows = []
        for k, name in enumerate(tomograms.names):
            tilts, values, notes = results[name]
            for column, value in values.items():
                if column not in table.columns or column == "rlnEtomoDirectiveFile":
                    table.loc[k, column] = value
            shift = np.hypot(tilts["rlnTomoXShiftAngst"], tilts["rlnTomoYShiftAngst"])
            rows.append(
                {
                    "tilt series": name,
                    "tilts": len(tilts),
                    "ZRot (deg)": f"{tilts['rlnTomoZRot'].mean():.2f}",
                    "tilt range (deg)": f"{tilts['rlnTomoYTilt'].min():.1f} to "
                    f"{tilts['rlnTomoYTilt'].max():.1f}",
                    "max shift (Å)": f"{shift.max():.1f}",
                    "notes": "; ".join(notes),
                }
            )
            log.info("%s: %d tilts aligned; %s", name, len(tilts), "; ".join(notes))
        out = job.path("aligned_tilt_series.star")
        tables = {name: result[0] for name, result in results.items()}
        TomogramSet.from_tables(table, tables).write(out, job.path("tilt_series"))
        outputs[job.alias + "aligned_tilt_series.star"] = (
            "TomogramGroupMetadata.star.relion.tomo.aligntiltseries"
        )
        write_job_report(
            job,
            outputs,
            summary={"alignments from": f"{source} ({folder})"},
            tables={"tilt series": rows},
        )
    return outputs
