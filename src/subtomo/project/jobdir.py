"""RELION-style job directories.

Every job runs in ``<JobType>/jobNNN/`` under the project directory (or in ``--o``), with
``job.star`` holding all parameters, ``run.out``/``run.err``, a success or failure marker
(RELION's ``RELION_JOB_EXIT_SUCCESS``/``RELION_JOB_EXIT_FAILURE``), ``job.pid`` naming the
process that runs it, and an entry in the project's ``default_pipeline.star`` with its input
and output nodes (:mod:`subtomo.project.pipeline`). Under ``torch.distributed`` every rank
runs the job's body and rank 0 alone creates the directory, writes and logs to ``run.out``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import socket
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from subtomo.distributed import barrier, broadcast_object, is_main, world_size
from subtomo.io import atomic_path, read_star, write_star
from subtomo.project.job import Job
from subtomo.project.pipeline import next_job_dir, pipeline_lock, register_job

__all__ = [
    "FAILURE",
    "KILLED",
    "PROCESS",
    "SUCCESS",
    "job_status",
    "read_job_options",
    "run_job",
]

SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
PROCESS = "job.pid"  # "<pid> <host> <start time>" of the process running the job
KILLED = "Failed (killed?)"

log = logging.getLogger("subtomo")


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
        "rlnJobTypeLabel": job.type_label,
        "rlnJobIsContinue": int(job.is_continue),
        "rlnJobIsTomo": 1,
    }
    write_star(job.path("job.star"), {"job": general, "joboptions_values": options})


def read_job_options(path: Path) -> dict[str, str]:
    """``{variable: value}`` of a job.star's ``joboptions_values`` block, as text (booleans
    as ``Yes``/``No``, as :func:`_write_job_star` and RELION write them); empty when the file
    has no such block."""
    table = read_star(path).get("joboptions_values")
    if not isinstance(table, pd.DataFrame):
        return {}
    names, values = table["rlnJobOptionVariable"], table["rlnJobOptionValue"]
    return dict(zip(names.astype(str), values.astype(str), strict=True))


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
    main = is_main()
    directory = None
    if main:
        with pipeline_lock(project):
            directory = _open_directory(project, job_type, output_dir)
            job = Job(directory, job_type, project, is_continue)
            for marker in (SUCCESS, FAILURE):
                job.path(marker).unlink(missing_ok=True)
            _write_process(job)
            register_job(job, "Running", inputs or {}, {})
    directory = broadcast_object(directory)  # the other ranks compute, rank 0 writes
    job = Job(directory=directory, job_type=job_type, project_dir=project, is_continue=is_continue)
    _write_job_star(job, params)
    handler = logging.FileHandler(job.path("run.out"), mode="a") if main else None
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    started = datetime.datetime.now()
    log.info(
        "# subtomo %s started %s in %s", job_type, started.isoformat(timespec="seconds"), job.alias
    )
    log.info("# command: %s", " ".join(sys.argv))
    if world_size() > 1:
        log.info("# %d ranks (torch.distributed)", world_size())
    outputs: dict[str, str] = {}
    if main:  # rank 0 alone writes the report: its plotting library, ready when the job ends
        from subtomo.report.plots import import_in_background  # torch: not for `subtomo jobs`

        import_in_background()
    try:
        yield job, outputs
        barrier()  # every rank done: the outputs are complete when the job is marked so
    except BaseException as exc:
        if main:
            with open(job.path("run.err"), "a") as err:
                err.write(f"{type(exc).__name__}: {exc}\n")
                traceback.print_exc(file=err)
            job.path(FAILURE).touch()
            with pipeline_lock(project):
                register_job(job, "Failed", inputs or {}, outputs)
        raise
    else:
        if main:
            job.path(SUCCESS).touch()
            with pipeline_lock(project):
                register_job(job, "Succeeded", inputs or {}, outputs)
        elapsed = (datetime.datetime.now() - started).total_seconds()
        log.info("# finished in %.1f s", elapsed)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _open_directory(project: Path, job_type: str, output_dir: str | Path | None) -> Path:
    """The job's directory (``--o`` or the next ``<JobType>/jobNNN/``), created."""
    directory = Path(output_dir).resolve() if output_dir else next_job_dir(project, job_type)
    directory.mkdir(parents=True, exist_ok=True)
    return directory
