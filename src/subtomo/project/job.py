"""A job of a RELION project: its folder, type and where the project is."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

__all__ = ["Job", "job_number"]

_JOB_RE = re.compile(r"job(\d{3,})$")


def job_number(directory: Path) -> int | None:
    """NNN of a ``.../jobNNN`` folder, or ``None`` for any other name."""
    m = _JOB_RE.match(Path(directory).name)
    return int(m.group(1)) if m else None


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
