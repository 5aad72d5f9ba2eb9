"""``--continue``: the options of a job resumed from its checkpoint, and defaults for options
left unset.

One rule for every iterative job: an option a continue may change (``overrides``) replaces the
stored value when it is given, i.e. not ``None``; left as ``None`` it keeps the stored value;
every other option comes from the checkpoint of the iteration resumed after, and ``--o``
(``output_dir``) defaults to that job's directory. Options still ``None`` after that (a new
run that did not give them) take ``defaults``, before ``job.star`` records them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from subtomo.errors import InputError
from subtomo.ml.starfiles import IterationFiles, load_checkpoint

__all__ = ["resolve_options"]

P = TypeVar("P")

log = logging.getLogger("subtomo")


def resolve_options(
    params: P, overrides: Iterable[str], defaults: Mapping[str, Any]
) -> tuple[P, dict[str, Any] | None]:
    """``(options to run with, checkpoint or None)`` of a job's ``params`` (a dataclass with
    ``continue_from`` and ``output_dir``), resumed when ``continue_from`` is set."""
    checkpoint = None
    if params.continue_from:
        files = IterationFiles.resume_point(params.continue_from)
        checkpoint = load_checkpoint(files.checkpoint)
        if "params" not in checkpoint:
            raise InputError("checkpoint without the job's options", file=files.checkpoint)
        # sequences are tuples in the options; a checkpoint may hold them as lists
        stored = {
            k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["params"].items()
        }
        stored["output_dir"] = str(files.directory)
        for name in overrides:
            value = getattr(params, name)
            if value is not None:
                stored[name] = value
        params = type(params)(**stored)
        log.info("Continuing after iteration %d of %s", files.iteration, files.directory)
    unset = {name: value for name, value in defaults.items() if getattr(params, name) is None}
    return dataclasses.replace(params, **unset), checkpoint
