"""The project: job directories, the pipeline (``default_pipeline.star``), job reports,
``--continue`` options and how a job declares its options (:mod:`subtomo.project.options`).

Below the jobs (every job runs inside :func:`run_job` and ends with
:func:`write_job_report`), above the algorithms and :mod:`subtomo.report`, whose plots and
HTML pages it uses and which never import it back. Names load on first use
(:mod:`subtomo._lazy`): ``subtomo jobs`` and the option declarations do not import torch.
"""

from typing import TYPE_CHECKING

from subtomo._lazy import lazy_exports

if TYPE_CHECKING:
    from subtomo.project.job import Job
    from subtomo.project.job_report import (
        REPORT,
        half_map_fsc,
        write_job_report,
        write_project_report,
    )
    from subtomo.project.jobdir import (
        FAILURE,
        KILLED,
        PROCESS,
        SUCCESS,
        job_status,
        read_job_options,
        run_job,
    )
    from subtomo.project.pipeline import (
        PIPELINE,
        job_lineage,
        next_job_dir,
        pipeline_lock,
        read_pipeline,
    )
    from subtomo.project.resume import resolve_options

__all__ = [
    "FAILURE",
    "KILLED",
    "PIPELINE",
    "PROCESS",
    "REPORT",
    "SUCCESS",
    "Job",
    "half_map_fsc",
    "job_lineage",
    "job_status",
    "next_job_dir",
    "pipeline_lock",
    "read_job_options",
    "read_pipeline",
    "resolve_options",
    "run_job",
    "write_job_report",
    "write_project_report",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
