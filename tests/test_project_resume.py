"""``--continue`` options: one rule for every iterative job (``project.resolve_options``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from subtomo.errors import InputError
from subtomo.ml.starfiles import save_checkpoint
from subtomo.project import resolve_options


@dataclasses.dataclass
class _Params:
    ref: tuple[str, ...] = ()
    iter: int | None = None
    memory_gb: float | None = None
    sym: str = "C1"
    device: str = "auto"
    continue_from: str | None = None
    output_dir: str | None = None


_OVERRIDES = ("iter", "memory_gb", "device", "output_dir", "continue_from")
_DEFAULTS = {"iter": 25, "memory_gb": 2.0}


def _job(directory: Path, stored: dict) -> Path:
    directory.mkdir()
    (directory / "run_it003_optimiser.star").write_text("data_\n")
    save_checkpoint(directory / "run_it003_checkpoint.pt", {"params": stored})
    return directory


def test_new_run_takes_the_defaults_for_options_left_unset() -> None:
    """Nothing to resume: unset options get their defaults, given ones stay."""
    params, checkpoint = resolve_options(_Params(iter=3), _OVERRIDES, _DEFAULTS)
    assert checkpoint is None
    assert (params.iter, params.memory_gb) == (3, 2.0)


def test_continue_keeps_stored_options_unless_given(tmp_path) -> None:
    """An override left as None keeps the stored value (not the default), a given one
    replaces it; options not in the overrides always come from the checkpoint; --o defaults
    to the resumed job's directory; stored lists come back as tuples."""
    stored = dataclasses.asdict(_Params(ref=("a.mrc",), iter=7, memory_gb=4.0, sym="D7"))
    stored["ref"] = ["a.mrc"]
    job = _job(tmp_path / "job", stored)
    params, checkpoint = resolve_options(
        _Params(continue_from=str(job), memory_gb=1.0, sym="C1"), _OVERRIDES, _DEFAULTS
    )
    assert checkpoint is not None
    assert params.iter == 7  # left unset: stored, not the default 25
    assert params.memory_gb == 1.0  # given: replaces
    assert params.sym == "D7"  # not a continue option: stored
    assert params.ref == ("a.mrc",)
    assert Path(params.output_dir) == job
    params, _ = resolve_options(
        _Params(continue_from=str(job), output_dir="elsewhere"), _OVERRIDES, _DEFAULTS
    )
    assert params.output_dir == "elsewhere"


def test_checkpoint_without_options_is_an_input_error(tmp_path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "run_it001_optimiser.star").write_text("data_\n")
    save_checkpoint(job / "run_it001_checkpoint.pt", {"model": {}})
    with pytest.raises(InputError, match="checkpoint without the job's options"):
        resolve_options(_Params(continue_from=str(job)), _OVERRIDES, _DEFAULTS)
