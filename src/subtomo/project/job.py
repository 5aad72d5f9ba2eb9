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


RELION_TYPE_LABELS = {
    "Import": "relion.importtomo",
    "MotionCorr": "relion.motioncorr.own",
    "CtfFind": "relion.ctffind.ctffind4",
    "ExcludeTiltImages": "relion.excludetilts",
    "AlignTiltSeries": "relion.aligntiltseries",
    "Tomograms": "relion.reconstructtomograms",
    "Extract": "relion.pseudosubtomo",
    "Reconstruct": "relion.reconstructparticletomo",
    "Class3D": "relion.class3d.tomo",
    "Refine3D": "relion.refine3d.tomo",
    "CtfRefine": "relion.ctfrefinetomo",
    "InitialModel": "relion.initialmodel.tomo",
    "MaskCreate": "relion.maskcreate",
    "PostProcess": "relion.postprocess",
    "LocalRes": "relion.localres.own",
    "Picks": "relion.picktomo",
    "Polish": "relion.framealigntomo",
}
"""RELION 5's process type label of each job directory type that RELION also has."""


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
    def type_label(self) -> str:
        """``rlnJobTypeLabel`` / ``rlnPipeLineProcessTypeLabel``: RELION 5's label where the
        job is RELION's (§15; ``Refine3D`` -> ``relion.refine3d.tomo``), so a
        RELION GUI lists it as its own; ``subtomo.<type>`` for jobs RELION does not have."""
        return RELION_TYPE_LABELS.get(self.job_type, f"subtomo.{self.job_type.lower()}")

    @property
    def alias(self) -> str:
        """The job's name as the pipeline lists it, e.g. ``Refine3D/job012/``."""
        try:
            return str(self.directory.relative_to(self.project_dir)) + "/"
        except ValueError:
            return str(self.directory) + "/"
