"""The project's ``default_pipeline.star``: job numbers, the lock, job and node registration,
and which job fed which.

Jobs started at once in one project take turns on an exclusive ``flock`` of
``.default_pipeline.star.lock`` (Linux) to choose their job number, create their folder and
read, modify and write the pipeline, so each gets its own folder and entry.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from subtomo.io import read_star, write_star
from subtomo.project.job import Job, job_number

__all__ = [
    "LOCK",
    "PIPELINE",
    "job_lineage",
    "next_job_dir",
    "pipeline_lock",
    "read_pipeline",
    "register_job",
]

PIPELINE = "default_pipeline.star"
LOCK = ".default_pipeline.star.lock"

_COLUMNS = {
    "pipeline_processes": [
        "rlnPipeLineProcessName",
        "rlnPipeLineProcessAlias",
        "rlnPipeLineProcessTypeLabel",
        "rlnPipeLineProcessStatusLabel",
    ],
    "pipeline_nodes": ["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel"],
    "pipeline_input_edges": ["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"],
    "pipeline_output_edges": ["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"],
}


def read_pipeline(project_dir: Path) -> dict[str, Any]:
    """The project's ``default_pipeline.star`` tables (empty dict when there is none)."""
    path = Path(project_dir) / PIPELINE
    if not path.exists():
        return {}
    return read_star(path)


def _pipeline_counter(project_dir: Path, tables: Mapping[str, Any] | None = None) -> int:
    """rlnPipeLineJobCounter of the project (``tables``: its pipeline, if already read)."""
    general = (read_pipeline(project_dir) if tables is None else tables).get("pipeline_general")
    if general is None:
        return 1
    return int(general["rlnPipeLineJobCounter"])


def next_job_dir(project_dir: Path, job_type: str) -> Path:
    """``<project>/<job_type>/jobNNN`` with NNN one more than any job in the project."""
    numbers = [0]
    for p in project_dir.glob("*/job*"):
        number = job_number(p)
        if number is not None and p.is_dir():
            numbers.append(number)
    numbers.append(_pipeline_counter(project_dir) - 1)
    return project_dir / job_type / f"job{max(numbers) + 1:03d}"


@contextlib.contextmanager
def pipeline_lock(project_dir: Path) -> Iterator[None]:
    """Hold the project's pipeline lock: an exclusive ``flock`` of ``LOCK`` beside
    ``default_pipeline.star`` (blocks while another process holds it; not re-entrant)."""
    with open(Path(project_dir) / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _node_name(project_dir: Path, path: str | Path) -> str:
    """``path`` relative to the project directory when it lies inside it, else absolute."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path(project_dir).resolve()))
    except ValueError:
        return str(resolved)


def _replace_rows(
    frame: pd.DataFrame, key: str, name: str, rows: list[tuple], columns: list[str]
) -> pd.DataFrame:
    """``frame`` without its rows whose ``key`` is ``name``, then ``rows`` appended."""
    kept = frame[frame[key] != name]
    return pd.concat([kept, pd.DataFrame(rows, columns=columns)], ignore_index=True)


def register_job(
    job: Job, status: str, inputs: Mapping[str, str], outputs: Mapping[str, str]
) -> None:
    """Add or update the job and its nodes/edges in ``default_pipeline.star`` (the caller
    holds :func:`pipeline_lock`).

    Node names are paths relative to the project directory (as RELION writes them), whether
    a job was given them relative to the working directory or absolute.
    """
    inputs = {_node_name(job.project_dir, p): t for p, t in inputs.items()}
    outputs = {_node_name(job.project_dir, p): t for p, t in outputs.items()}
    tables = read_pipeline(job.project_dir)
    frames = {
        k: tables[k] if isinstance(tables.get(k), pd.DataFrame) else pd.DataFrame(columns=c)
        for k, c in _COLUMNS.items()
    }
    name = job.alias
    row = (name, "None", job.type_label, status)
    frames["pipeline_processes"] = _replace_rows(
        frames["pipeline_processes"], "rlnPipeLineProcessName", name, [row],
        _COLUMNS["pipeline_processes"],
    )  # fmt: skip
    new_nodes = [(str(p), t) for p, t in {**inputs, **outputs}.items()]
    nodes = pd.concat(
        [frames["pipeline_nodes"], pd.DataFrame(new_nodes, columns=_COLUMNS["pipeline_nodes"])]
    )
    frames["pipeline_nodes"] = nodes.drop_duplicates("rlnPipeLineNodeName").reset_index(drop=True)
    frames["pipeline_input_edges"] = _replace_rows(
        frames["pipeline_input_edges"], "rlnPipeLineEdgeProcess", name,
        [(str(p), name) for p in inputs], _COLUMNS["pipeline_input_edges"],
    )  # fmt: skip
    frames["pipeline_output_edges"] = _replace_rows(
        frames["pipeline_output_edges"], "rlnPipeLineEdgeProcess", name,
        [(name, str(p)) for p in outputs], _COLUMNS["pipeline_output_edges"],
    )  # fmt: skip
    counter = max(_pipeline_counter(job.project_dir, tables), (job_number(job.directory) or 0) + 1)
    write_star(
        Path(job.project_dir) / PIPELINE,
        {"pipeline_general": {"rlnPipeLineJobCounter": counter}, **frames},
    )


def job_lineage(tables: Mapping[str, Any]) -> dict[str, list[str]]:
    """For each job of a pipeline, the jobs whose outputs it read (from the edge tables)."""
    outs = tables.get("pipeline_output_edges")
    ins = tables.get("pipeline_input_edges")
    if not isinstance(outs, pd.DataFrame) or not isinstance(ins, pd.DataFrame):
        return {}
    producer = dict(zip(outs["rlnPipeLineEdgeToNode"], outs["rlnPipeLineEdgeProcess"], strict=True))
    lineage: dict[str, list[str]] = {}
    for node, process in zip(
        ins["rlnPipeLineEdgeFromNode"], ins["rlnPipeLineEdgeProcess"], strict=True
    ):
        source = producer.get(node)
        if source is not None and source not in lineage.setdefault(process, []):
            lineage[process].append(source)
    return lineage
