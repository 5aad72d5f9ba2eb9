"""RELION-style job directories and the project pipeline.

Every job runs in ``<JobType>/jobNNN/`` under the project directory (or in ``--o``), with
``job.star`` holding all parameters, ``run.out``/``run.err``, a success or failure marker
(RELION's ``RELION_JOB_EXIT_SUCCESS``/``RELION_JOB_EXIT_FAILURE``), ``job.pid`` naming the
process that runs it, and an entry in the project's ``default_pipeline.star`` with its input
and output nodes.

Jobs started at once in one project take turns on an exclusive ``flock`` of
``.default_pipeline.star.lock`` (Linux) to choose their job number, create their folder and
read, modify and write the pipeline, so each gets its own folder and entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import logging
import os
import re
import socket
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import starfile

from subtomo.io import atomic_path, read_star
from subtomo.report.plots import import_in_background

__all__ = [
    "Job",
    "job_lineage",
    "job_status",
    "next_job_dir",
    "pipeline_lock",
    "read_pipeline",
    "run_job",
]

SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
PIPELINE = "default_pipeline.star"
LOCK = ".default_pipeline.star.lock"
PROCESS = "job.pid"  # "<pid> <host> <start time>" of the process running the job
KILLED = "Failed (killed?)"
_JOB_RE = re.compile(r"job(\d{3,})$")

log = logging.getLogger("subtomo")


def next_job_dir(project_dir: Path, job_type: str) -> Path:
    """``<project>/<job_type>/jobNNN`` with NNN one more than any job in the project."""
    numbers = [0]
    for p in project_dir.glob("*/job*"):
        m = _JOB_RE.match(p.name)
        if m and p.is_dir():
            numbers.append(int(m.group(1)))
    numbers.append(_pipeline_counter(project_dir) - 1)
    return project_dir / job_type / f"job{max(numbers) + 1:03d}"


@dataclasses.dataclass
class Job:
    """A job being run: its folder, type and parameters."""

    directory: Path
    job_type: str
    project_dir: Path
    is_continue: bool = False

    def path(self, name: str) -> Path:
        """A file inside the job directory."""
        return self.directory / name

    @property
    def alias(self) -> str:
        """The job's name as the pipeline lists it, e.g. ``Refine3D/job012/``."""
        try:
            return str(self.directory.relative_to(self.project_dir)) + "/"
        except ValueError:
            return str(self.directory) + "/"


def _option_value(value: Any) -> str:
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _write_job_star(job: Job, params: Any) -> None:
    values = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params)
    options = pd.DataFrame(
        {
            "rlnJobOptionVariable": list(values),
            "rlnJobOptionValue": [_option_value(v) for v in values.values()],
        }
    )
    general = {
        "rlnJobTypeLabel": f"subtomo.{job.job_type.lower()}",
        "rlnJobIsContinue": int(job.is_continue),
        "rlnJobIsTomo": 1,
    }
    with atomic_path(job.path("job.star")) as tmp:
        starfile.write({"job": general, "joboptions_values": options}, tmp)


def _pipeline_counter(project_dir: Path, tables: Mapping[str, Any] | None = None) -> int:
    """rlnPipeLineJobCounter of the project (``tables``: its pipeline, if already read)."""
    general = (read_pipeline(project_dir) if tables is None else tables).get("pipeline_general")
    if general is None:
        return 1
    return int(general["rlnPipeLineJobCounter"])


def read_pipeline(project_dir: Path) -> dict[str, Any]:
    """The project's ``default_pipeline.star`` tables (empty dict when there is none)."""
    path = Path(project_dir) / PIPELINE
    if not path.exists():
        return {}
    return read_star(path)


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


def _process_start(pid: int) -> str | None:
    """Start time of a live process (clock ticks after boot, ``/proc/<pid>/stat`` field 22),
    or ``None`` when it has exited (zombies included)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (name)": state is field 3
    return None if fields[0] in ("Z", "X") else fields[19]


def _write_process(job: Job) -> None:
    """Record this process (PID, host and start time) in the job directory."""
    pid = os.getpid()
    with atomic_path(job.path(PROCESS)) as tmp:
        tmp.write_text(f"{pid} {socket.gethostname()} {_process_start(pid)}\n")


def job_status(project_dir: Path, name: str, recorded: str) -> str:
    """The status of job ``name`` (its pipeline alias) to show: ``recorded`` (from the
    pipeline), except ``KILLED`` for a job recorded as Running that has no exit marker and
    whose process, on this host, is gone (or its PID now belongs to another process)."""
    directory = Path(project_dir) / name
    if recorded != "Running" or any((directory / m).exists() for m in (SUCCESS, FAILURE)):
        return recorded
    try:
        pid, host, start = (directory / PROCESS).read_text().split()
    except (OSError, ValueError):
        return recorded  # no record of the process: nothing to judge by
    if host != socket.gethostname() or _process_start(int(pid)) == start:
        return recorded
    return KILLED


def _register(job: Job, status: str, inputs: Mapping[str, str], outputs: Mapping[str, str]) -> None:
    """Add or update the job and its nodes/edges in ``default_pipeline.star`` (the caller
    holds :func:`pipeline_lock`).

    Node names are paths relative to the project directory (as RELION writes them), whether
    a job was given them relative to the working directory or absolute.
    """
    inputs = {_node_name(job.project_dir, p): t for p, t in inputs.items()}
    outputs = {_node_name(job.project_dir, p): t for p, t in outputs.items()}
    tables = read_pipeline(job.project_dir)
    columns = {
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
    frames = {
        k: tables[k] if isinstance(tables.get(k), pd.DataFrame) else pd.DataFrame(columns=c)
        for k, c in columns.items()
    }
    name = job.alias
    procs = frames["pipeline_processes"]
    procs = procs[procs["rlnPipeLineProcessName"] != name]
    row = [name, "None", f"subtomo.{job.job_type.lower()}", status]
    frames["pipeline_processes"] = pd.concat(
        [procs, pd.DataFrame([row], columns=columns["pipeline_processes"])], ignore_index=True
    )
    new_nodes = [(str(p), t) for p, t in {**inputs, **outputs}.items()]
    nodes = pd.concat(
        [frames["pipeline_nodes"], pd.DataFrame(new_nodes, columns=columns["pipeline_nodes"])]
    )
    frames["pipeline_nodes"] = nodes.drop_duplicates("rlnPipeLineNodeName").reset_index(drop=True)
    ins = frames["pipeline_input_edges"]
    ins = ins[ins["rlnPipeLineEdgeProcess"] != name]
    frames["pipeline_input_edges"] = pd.concat(
        [
            ins,
            pd.DataFrame([(str(p), name) for p in inputs], columns=columns["pipeline_input_edges"]),
        ],
        ignore_index=True,
    )
    outs = frames["pipeline_output_edges"]
    outs = outs[outs["rlnPipeLineEdgeProcess"] != name]
    frames["pipeline_output_edges"] = pd.concat(
        [
            outs,
            pd.DataFrame(
                [(name, str(p)) for p in outputs], columns=columns["pipeline_output_edges"]
            ),
        ],
        ignore_index=True,
    )
    counter = max(_pipeline_counter(job.project_dir, tables), _job_number(job) + 1)
    out = {"pipeline_general": {"rlnPipeLineJobCounter": counter}, **frames}
    with atomic_path(Path(job.project_dir) / PIPELINE) as tmp:
        starfile.write(out, tmp)


def _node_name(project_dir: Path, path: str | Path) -> str:
    """``path`` relative to the project directory when it lies inside it, else absolute."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path(project_dir).resolve()))
    except ValueError:
        return str(resolved)


def _job_number(job: Job) -> int:
    m = _JOB_RE.match(job.directory.name)
    return int(m.group(1)) if m else 0


@contextlib.contextmanager
def run_job(
    job_type: str,
    params: Any,
    *,
    output_dir: str | Path | None = None,
    project_dir: str | Path = ".",
    is_continue: bool = False,
    inputs: Mapping[str, str] | None = None,
) -> Iterator[tuple[Job, dict[str, str]]]:
    """Run the body of a job inside its directory.

    Yields ``(job, outputs)``; the body fills ``outputs`` with ``{path: RELION node type}``
    (e.g. ``{"Refine3D/job012/run_data.star": "ParticleGroupMetadata.star.relion"}``).
    Logging goes to ``run.out`` (and the console), a traceback to ``run.err``; on success the
    job is marked ``RELION_JOB_EXIT_SUCCESS``, on an exception ``RELION_JOB_EXIT_FAILURE``.
    """
    project = Path(project_dir).resolve()
    with pipeline_lock(project):
        directory = Path(output_dir).resolve() if output_dir else next_job_dir(project, job_type)
        directory.mkdir(parents=True, exist_ok=True)
        job = Job(
            directory=directory, job_type=job_type, project_dir=project, is_continue=is_continue
        )
        for marker in (SUCCESS, FAILURE):
            job.path(marker).unlink(missing_ok=True)
        _write_process(job)
        _register(job, "Running", inputs or {}, {})
    _write_job_star(job, params)
    handler = logging.FileHandler(job.path("run.out"), mode="a")
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    started = datetime.datetime.now()
    log.info(
        "# subtomo %s started %s in %s", job_type, started.isoformat(timespec="seconds"), job.alias
    )
    log.info("# command: %s", " ".join(sys.argv))
    outputs: dict[str, str] = {}
    import_in_background()  # the report's plotting library, ready when the job ends
    try:
        yield job, outputs
    except BaseException as exc:
        with open(job.path("run.err"), "a") as err:
            err.write(f"{type(exc).__name__}: {exc}\n")
            traceback.print_exc(file=err)
        job.path(FAILURE).touch()
        with pipeline_lock(project):
            _register(job, "Failed", inputs or {}, outputs)
        raise
    else:
        job.path(SUCCESS).touch()
        with pipeline_lock(project):
            _register(job, "Succeeded", inputs or {}, outputs)
        elapsed = (datetime.datetime.now() - started).total_seconds()
        log.info("# finished in %.1f s", elapsed)
    finally:
        log.removeHandler(handler)
        handler.close()


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
