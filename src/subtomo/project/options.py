"""A job's options, declared once: each field of its parameter dataclass carries its flags,
help text, unit and default.

A job module writes::

    @dataclass
    class MaskParams:
        lowpass: float = option(-1.0, "--lowpass", help="Low-pass; <= 0: none.", unit="Å")
        output_dir: str | None = output_dir_option()

and ``subtomo.cli`` turns the dataclass into a command (:func:`subtomo.cli.build.job_command`):
one option per field declared here, named by its flags, shown with its help, unit and default,
the values passed to the dataclass by field name. Fields declared without :func:`option`
(e.g. ``project_dir``) are Python-only. The Python API is the plain dataclass:
``MaskParams(lowpass=20)``.

Flags: RELION's spelling first (``--ini_threshold``), then other spellings (``--extend`` for
``--extend_inimask``); the command line takes ``-`` and ``_`` in option names alike
(``--ini-threshold``), so hyphenated forms need not be declared. A boolean may name both
forms, ``"--zero_mask/--no_zero_mask"``.

An option left out on the command line is not passed, so the field's default applies; a
default of ``None`` therefore means "not given" and lets the job decide. An option a
``--continue`` may change is declared with :func:`resumable`: left out, it keeps the stored
value on a continue and takes its default on a new run (:func:`resumable_defaults`, used with
``subtomo.project.resolve_options``). This module imports neither typer nor torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ML_OPTIONS",
    "OPTION",
    "RESUMABLE",
    "Option",
    "ParticleInputs",
    "argument",
    "continue_option",
    "device_option",
    "ml_option",
    "option",
    "options_of",
    "output_dir_option",
    "resumable",
    "resumable_defaults",
]

#: Key of a field's metadata that holds its :class:`Option`.
OPTION = "subtomo.option"
#: Key of a field's metadata that holds the default of a :func:`resumable` option.
RESUMABLE = "subtomo.resumable"


@dataclass(frozen=True)
class Option:
    """How one field appears on the command line.

    ``flags``: the spellings (``("--particles", "--p")``; ``"--on/--off"`` for a boolean
    with a negative form), empty for a positional argument. ``unit``: shown with
    the value's type (``<float Å>``). ``parse``: turns the command-line text into the field's
    value (a ``ValueError`` is a usage error naming the option); without it, the field's type
    does.
    """

    flags: tuple[str, ...]
    help: str
    unit: str | None = None
    parse: Callable[[str], Any] | None = None

    @property
    def is_argument(self) -> bool:
        return not self.flags


def _field(default: Any, meta: Option, **metadata: Any) -> Any:
    metadata = {OPTION: meta, **metadata}
    if default is ...:  # required
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option(
    default: Any,
    *flags: str,
    help: str,
    unit: str | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A dataclass field that is a command-line option (``default=...``: required)."""
    if not flags:
        raise ValueError("an option needs at least one flag")
    return _field(default, Option(flags, help, unit, parse))


def argument(default: Any = ..., *, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field that is a positional command-line argument (``...``: required)."""
    return _field(default, Option((), help, None, parse))


def resumable(default: Any, *flags: str, help: str, unit: str | None = None) -> Any:
    """An option a ``--continue`` may change: ``None`` until resolved, then the given value,
    else the stored one on a continue, else ``default``."""
    text = f"{help} (default {default}; on --continue the stored value)."
    return _field(None, Option(flags, text, unit), **{RESUMABLE: default})


def resumable_defaults(params_type: type) -> dict[str, Any]:
    """``{field: default}`` of the :func:`resumable` options of a parameter dataclass."""
    return {
        f.name: f.metadata[RESUMABLE]
        for f in dataclasses.fields(params_type)
        if RESUMABLE in f.metadata
    }


def output_dir_option(
    help: str = "Output directory (default: the next <JobType>/jobNNN/ of the project).",
    *aliases: str,
) -> Any:
    """``output_dir`` of every job: ``--o`` (and ``aliases``), ``None`` = the job decides."""
    return option(None, "--o", *aliases, help=help)


def device_option() -> Any:
    """``device`` of every job that computes: ``--device``."""
    return option("auto", "--device", help="auto | cpu | cuda[:N].")


def continue_option() -> Any:
    """``continue_from`` of an iterative job: ``--continue``."""
    return option(
        None, "--continue",
        help="Resume a job: its directory or a run_itNNN_optimiser.star; options left out "
        "keep the values it ran with.",
    )  # fmt: skip


@dataclass
class ParticleInputs:
    """The particles a job reads: an optimisation set (``--ios``) or the files it names.

    A job's parameter dataclass inherits these as its first options (``class
    ExtractParams(ParticleInputs)``)."""

    ios: str | None = option(None, "--ios", help="Input optimisation set.")
    particles: str | None = option(None, "--particles", "--p", help="particles.star.")
    tomograms: str | None = option(None, "--tomograms", "--t", help="tomograms.star.")
    trajectories: str | None = option(None, "--trajectories", "--mot", help="motion.star.")


#: The options of the jobs on the ML engine (3D classification, 3D auto-refine, 3D initial
#: model), declared once: flags, help and unit. Each job takes a field with its own default
#: (RELION's defaults differ between them) from :func:`ml_option`, in its own field order
#: (``job.star`` lists the fields in declaration order, as before the declarations were
#: shared; a base dataclass would impose one order on all three).
ML_OPTIONS: dict[str, Option] = {
    "ref_correct_greyscale": Option(
        ("--ref_correct_greyscale",), "Reference map is on the absolute grey scale."
    ),
    "ini_high": Option(
        ("--ini_high",),
        "Initial low-pass filter (3D initial model: the resolution of its first iterations); "
        "<= 0: none.",
        "Å",
    ),
    "solvent_mask": Option(("--solvent_mask",), "Reference mask (MRC)."),
    "K": Option(("--K", "--classes"), "Number of classes."),
    "iter": Option(
        ("--iter",), "Number of iterations (3D auto-refine: at most, before the final one)"
    ),
    "tau2_fudge": Option(("--tau2_fudge",), "Regularisation parameter T."),
    "particle_diameter": Option(
        ("--particle_diameter",), "Mask diameter; <= 0: the box (3D auto-refine: 0.9 of it).", "Å"
    ),
    "zero_mask": Option(("--zero_mask/--no_zero_mask",), "Zeros outside the mask (else noise)."),
    "sym": Option(("--sym",), "Point-group symmetry (C, D, T, O, I)."),
    "healpix_order": Option(
        ("--healpix_order",), "Angular sampling (HEALPix order; 3D auto-refine: the first)."
    ),
    "offset_range": Option(("--offset_range",), "Offset range (3D auto-refine: the first).", "px"),
    "offset_step": Option(("--offset_step",), "Offset step (3D auto-refine: the first).", "px"),
    "sigma_ang": Option(
        ("--sigma_ang",), "Local searches from the start, prior sigma; <= 0: global.", "deg"
    ),
    "oversampling": Option(("--oversampling",), "Adaptive oversampling order (0 or 1)."),
    "sigma_tilt": Option(
        ("--sigma_tilt",),
        "Tilt prior width (rlnAngleTiltPrior, surface normals); <= 0: off.",
        "deg",
    ),
    "sigma_psi": Option(("--sigma_psi",), "Psi prior width (rlnAnglePsiPrior); <= 0: off.", "deg"),
    "strict_highres_exp": Option(
        ("--strict_highres_exp",), "Limit the E-step resolution; <= 0: none.", "Å"
    ),
    "pad": Option(("--pad",), "Padding factor."),
    "random_seed": Option(("--random_seed",), "Random seed."),
    "memory_gb": Option(("--memory-gb",), "Memory budget of the E-step", "GB"),
    "cache_gb": Option(("--cache-gb",), "Keep the stacks in memory up to this", "GB"),
    "device": Option(("--device",), "auto | cpu | cuda[:N]"),
}

#: :data:`ML_OPTIONS` a ``--continue`` may change (:func:`resumable`).
_ML_RESUMABLE = frozenset({"iter", "memory_gb", "cache_gb", "device"})


def ml_option(name: str, default: Any) -> Any:
    """The field of the shared ML option ``name`` (:data:`ML_OPTIONS`) with this job's
    ``default``; ``iter``, ``memory_gb``, ``cache_gb`` and ``device`` are :func:`resumable`."""
    meta = ML_OPTIONS[name]
    if name in _ML_RESUMABLE:
        return resumable(default, *meta.flags, help=meta.help, unit=meta.unit)
    return option(default, *meta.flags, help=meta.help, unit=meta.unit)


def options_of(params_type: type) -> Iterator[tuple[dataclasses.Field, Option]]:
    """The command-line fields of a parameter dataclass, in declaration order."""
    for f in dataclasses.fields(params_type):
        if OPTION in f.metadata:
            yield f, f.metadata[OPTION]
