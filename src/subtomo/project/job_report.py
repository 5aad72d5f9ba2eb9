"""``report.html`` of every job and of the whole project (static, self-contained pages).

A job calls :func:`write_job_report` as the last step of its ``run_job`` body; the report is
made from what the job produced: particle counts (per tomogram, class and simulated species)
and the angular distribution of every particles file, the half-map FSC and resolution,
central slices of every output map, resolution and class populations per iteration (from
RELION's ``*_itNNN_model.star``), the job's own PNGs and its parameters (``job.star``).
:func:`write_project_report` writes ``<project>/report.html`` linking every job of
``default_pipeline.star`` with its status and the jobs it read from.
"""

from __future__ import annotations

import datetime
import html
import os
import re
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.distributed import is_main
from subtomo.fourier import crossing_shell, fsc_maps
from subtomo.io import read_mrc, read_star
from subtomo.project.job import Job
from subtomo.project.jobdir import read_job_options
from subtomo.project.pipeline import job_lineage, read_pipeline
from subtomo.report.html import write_html_report
from subtomo.report.plots import (
    plot_angular_distribution,
    plot_central_slices,
    plot_fsc,
    plot_series,
)

__all__ = ["REPORT", "half_map_fsc", "write_job_report", "write_project_report"]

REPORT = "report.html"
_MAP_TYPES = ("DensityMap", "Mask3D", "Image3D")
_MODEL_RE = re.compile(r"_it(\d{3})(_half1)?_model\.star$")


def _cell(value: object, href: str | None = None) -> str:
    text = html.escape("" if value is None else str(value))
    return f"<a href='{html.escape(href)}'>{text}</a>" if href else text


def _html_table(
    rows: Sequence[Mapping[str, object]],
    caption: str,
    links: Mapping[str, str] | None = None,
) -> str:
    """An HTML table of ``rows`` (columns from the first row) under an ``<h2>`` caption (if
    any); a cell whose text is a key of ``links`` links to its value."""
    if not rows:
        return ""
    links = links or {}
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{_cell(r.get(c), links.get(str(r.get(c))))}</td>" for c in cols)
        + "</tr>"
        for r in rows
    )
    title = f"<h2>{html.escape(caption)}</h2>" if caption else ""
    return f"{title}<table><tr>{head}</tr>{body}</table>"


def _counts(table: pd.DataFrame, column: str, caption: str) -> str:
    counts = table[column].value_counts().sort_index()
    rows = [{column: k, "particles": int(v)} for k, v in counts.items()]
    return _html_table(rows, caption)


def _particles_section(path: Path, tmp: Path, summary: dict, fragments: list, images: list):
    """Counts and angular distribution of one particles STAR file."""
    table = read_star(path).get("particles")
    if not isinstance(table, pd.DataFrame):
        return
    summary[f"particles in {path.name}"] = len(table)
    for column, what in (
        ("rlnTomoName", "per tomogram"),
        ("rlnClassNumber", "per class"),
        ("subtomoSpecies", "per simulated species (ground truth)"),
    ):
        if column in table.columns:
            fragments.append(_counts(table, column, f"{path.name}: particles {what}"))
    if {"rlnAngleRot", "rlnAngleTilt"} <= set(table.columns):
        images.append(
            plot_angular_distribution(
                tmp / f"{path.stem}_angles.png",
                table["rlnAngleRot"].to_numpy(dtype=float),
                table["rlnAngleTilt"].to_numpy(dtype=float),
                title=f"angular distribution of {path.name}",
            )
        )


def half_map_fsc(half1: Path, half2: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Unmasked FSC of two half maps: (frequency per shell 1/Å, FSC, resolution Å at the
    interpolated 0.143 crossing)."""
    m1, px = read_mrc(half1)
    m2, _ = read_mrc(half2)
    curve = fsc_maps(m1, m2)
    n = m1.shape[-1]
    shell = crossing_shell(curve, 0.143)
    resolution = n * px / shell if shell > 0 else float("inf")
    return np.arange(curve.numel()) / (n * px), curve.double().numpy(), resolution


def _iteration_section(directory: Path, tmp: Path, summary: dict, images: list) -> None:
    """Resolution and class populations per iteration from ``*_itNNN[_half1]_model.star``."""
    models = sorted(
        (int(m.group(1)), p)
        for p in directory.glob("*_model.star")
        if (m := _MODEL_RE.search(p.name)) and "_half2_" not in p.name
    )
    if not models:
        return
    labels, resolution, populations = [], [], []
    for it, path in models:
        blocks = read_star(path)
        general = blocks.get("model_general", {})
        inv = float(general.get("rlnCurrentResolution", 0.0)) if isinstance(general, dict) else 0
        classes = blocks.get("model_classes")
        labels.append(str(it))
        resolution.append(1.0 / inv if inv > 0 else np.nan)
        if isinstance(classes, pd.DataFrame) and "rlnClassDistribution" in classes.columns:
            populations.append(classes["rlnClassDistribution"].to_numpy(dtype=float))
    summary["iterations"] = len(models)
    if np.isfinite(resolution[-1]):
        summary["current resolution (last iteration)"] = f"{resolution[-1]:.1f} Å"
    images.append(
        plot_series(
            tmp / "resolution_per_iteration.png",
            labels,
            {"current resolution": resolution},
            xlabel="iteration",
            ylabel="resolution (Å)",
            title="resolution per iteration",
            invert_y=True,
        )
    )
    if len(populations) == len(models):
        pops = np.stack(populations) * 100.0  # (iterations, classes)
        images.append(
            plot_series(
                tmp / "class_populations.png",
                labels,
                {f"class {k + 1}": pops[:, k] for k in range(pops.shape[1])},
                xlabel="iteration",
                ylabel="particles (%)",
                title="class populations",
            )
        )
        summary["class populations (last iteration)"] = ", ".join(
            f"{k + 1}: {p:.1f}%" for k, p in enumerate(pops[-1])
        )


def _parameters(directory: Path) -> str:
    path = directory / "job.star"
    if not path.exists():
        return ""
    options = read_job_options(path)
    if not options:
        return ""
    rows = [{"parameter": k, "value": v} for k, v in options.items()]
    table = _html_table(rows, "")
    return f"<details><summary>parameters (job.star)</summary>{table}</details>"


def _resolve(project_dir: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else project_dir / p


def write_job_report(
    job: Job,
    outputs: Mapping[str, str],
    *,
    summary: Mapping[str, object] | None = None,
    tables: Mapping[str, Sequence[Mapping[str, object]]] | None = None,
) -> Path:
    """Write ``<job dir>/report.html`` from the job's ``outputs`` ({path: RELION node type})
    and the files in its directory, plus the job's own ``summary`` lines and ``tables``
    ({caption: rows}); returns the path. Rank 0 alone writes it (torch.distributed)."""
    if not is_main():
        return job.path("report.html")
    directory = job.directory
    files = {_resolve(job.project_dir, p): kind for p, kind in outputs.items()}
    lines: dict[str, object] = {
        "job": job.alias,
        "type": job.job_type,
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "outputs": ", ".join(p.name for p in files) or "none",
        **(summary or {}),
    }
    fragments = [_html_table(rows, caption) for caption, rows in (tables or {}).items()]
    own = sorted(directory.glob("*.png"))
    images: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        halves = sorted(p for p, kind in files.items() if kind.endswith(".halfmap"))
        if len(halves) == 2:
            freq, curve, res = half_map_fsc(*halves)
            lines["gold-standard resolution (unmasked FSC 0.143)"] = f"{res:.1f} Å"
            images.append(
                plot_fsc(
                    tmp / "half_map_fsc.png",
                    freq,
                    {f"{halves[0].name} vs {halves[1].name}": curve},
                    resolution=res,
                    title="half-map FSC (unmasked)",
                )
            )
        for path, kind in files.items():
            if kind.startswith("ParticleGroupMetadata"):
                _particles_section(path, tmp, lines, fragments, images)
            elif kind.startswith(_MAP_TYPES) and not kind.endswith(".halfmap"):
                if not (directory / f"{path.stem}_slices.png").exists():
                    volume, _ = read_mrc(path)
                    images.append(
                        plot_central_slices(
                            tmp / f"{path.stem}_slices.png", volume, title=path.name
                        )
                    )
        _iteration_section(directory, tmp, lines, images)
        fragments.append(_parameters(directory))
        return write_html_report(
            directory / REPORT,
            f"subtomo {job.job_type}: {job.alias}",
            lines,
            [*images, *own],
            fragments=fragments,
        )


def write_project_report(
    project_dir: str | os.PathLike = ".",
    *,
    title: str = "subtomo project",
    summary: Mapping[str, object] | None = None,
    steps: Sequence[Mapping[str, object]] = (),
    images: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``<project>/report.html``: ``summary``, a ``steps`` table (a cell naming a job,
    e.g. ``Extract/job002/``, links to that job's report), the ``images`` and every job of
    ``default_pipeline.star`` with its type, status, the jobs it read from and a link to its
    ``report.html``. Returns the path."""
    project = Path(project_dir)
    tables = read_pipeline(project)
    procs = tables.get("pipeline_processes")
    lineage = job_lineage(tables)
    links: dict[str, str] = {}
    rows = []
    if isinstance(procs, pd.DataFrame):
        for name, label, status in zip(
            procs["rlnPipeLineProcessName"],
            procs["rlnPipeLineProcessTypeLabel"],
            procs["rlnPipeLineProcessStatusLabel"],
            strict=True,
        ):
            if (project / name / REPORT).exists():
                links[name] = urllib.parse.quote(f"{name}{REPORT}")
            rows.append(
                {
                    "job": name,
                    "type": label,
                    "status": status,
                    "input from": ", ".join(lineage.get(name, [])),
                }
            )
    head = dict(summary or {})
    head["jobs"] = f"{len(rows)} ({sum(r['status'] == 'Succeeded' for r in rows)} succeeded)"
    fragments = [
        _html_table(list(steps), "steps", links),
        _html_table(rows, "jobs (default_pipeline.star)", links),
    ]
    return write_html_report(project / REPORT, title, head, images, fragments=fragments)
