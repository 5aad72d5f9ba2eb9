"""Commands built from the jobs' parameter dataclasses, loaded when they are used.

A job declares its options once, as the fields of its parameter dataclass
(:mod:`subtomo.project.options`); :func:`job_command` turns that dataclass into a typer
command whose options are the fields (flags, help, unit, default), which constructs the
dataclass from what was given and calls the job's ``run``. An option left out is not passed,
so the dataclass default applies (``None``: the job decides, e.g. a ``--continue`` keeps the
stored value). Option names are matched with ``-`` and ``_`` alike (:func:`option_name`).

The job modules import torch, so :class:`LazyGroup` lists each command from its one-line help
in the registry (``subtomo.cli.commands``) and imports a job module only when its command
runs or shows its ``--help``: ``subtomo --help`` and ``subtomo jobs`` never import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from subtomo.cli.options import finite_numbers
from subtomo.distributed import init_from_environment, is_main
from subtomo.project.options import Option, options_of

__all__ = [
    "CommandGroup",
    "FunctionCommand",
    "JobCommand",
    "LazyGroup",
    "echo_outputs",
    "job_command",
    "option_name",
]

Show = Callable[[Any, Any], None]  # (params, what run returned) -> None


def echo_outputs(params: Any, outputs: Any) -> None:
    """Print each output file of a job (the keys of ``{path: node type}``), one a line."""
    for path in outputs:
        typer.echo(path)


def _run(run: Callable[[Any], Any], params: Any) -> Any:
    return run(params)


def _start_ranks(device: str) -> None:
    """Join the process group when launched by torchrun or srun; ranks other than 0 print
    neither progress nor informational logs (their errors still reach stderr)."""
    if not init_from_environment(device) or is_main():
        return
    for handler in logging.getLogger("subtomo").handlers:
        handler.setLevel(logging.WARNING)
    sys.stdout = open(os.devnull, "w")  # progress bars


def option_name(token: str) -> str:
    """How an option's name is matched: ``-`` and ``_`` alike (``--ini-high`` is
    ``--ini_high``; the parser hands this the name without its leading dashes)."""
    return token.replace("_", "-")


#: Context settings of every built command.
CONTEXT = {"token_normalize_func": option_name}
_EPILOG = "Option names take - and _ alike (--ini_high or --ini-high)."


def _flag(meta: Option, name: str) -> str:
    """How a usage error names the option: its first spelling (``--auto-bfac``)."""
    return meta.flags[0].split("/")[0] if meta.flags else name


def _cli_type(hint: Any) -> Any:
    """The command-line type of a field's type: ``X | None`` -> ``X``, ``tuple[X, ...]`` ->
    ``list[X]`` (a repeatable option)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (tuple, list):
        return list[typing.get_args(hint)[0]]
    return hint


def _metavar(cli_type: Any, unit: str | None) -> str | None:
    """``<float Å>``: the value's type with its unit (``None``: typer's own)."""
    if unit is None:
        return None
    item = typing.get_args(cli_type)[0] if typing.get_origin(cli_type) is list else cli_type
    return f"<{getattr(item, '__name__', 'value')} {unit}>"


def _parameter(field: dataclasses.Field, meta: Option, hint: Any) -> inspect.Parameter:
    """The typer parameter of one field."""
    cli_type = str if meta.parse else _cli_type(hint)
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    if required:
        default = ...
    elif meta.parse or typing.get_origin(cli_type) is list:
        default = None  # left out: the field's default
    else:
        default = field.default
    info = {"help": meta.help, "metavar": _metavar(cli_type, meta.unit)}
    spec = (
        typer.Argument(default, **info)
        if meta.is_argument
        else typer.Option(default, *meta.flags, **info)
    )
    return inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, default=spec, annotation=cli_type
    )


def _params_from(params_type: type, values: Mapping[str, Any]) -> Any:
    """``params_type`` from the command-line ``values``: options left out (``None`` or no
    repeat) are not passed, sequences become tuples, ``parse`` turns text into the value."""
    given: dict[str, Any] = {}
    for field, meta in options_of(params_type):
        value = values[field.name]
        if value is None or (isinstance(value, list) and not value):
            continue
        if meta.parse is not None:
            try:
                value = meta.parse(value)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint=_flag(meta, field.name)) from exc
        given[field.name] = tuple(value) if isinstance(value, list) else value
    return params_type(**given)


def job_command(
    name: str,
    help: str,
    params_type: type,
    run: Callable[[], Callable[..., Any]],
    show: Show | None = echo_outputs,
    call: Callable[[Callable[..., Any], Any], Any] = _run,
) -> TyperCommand:
    """The command ``name`` of a job: one option per :func:`~subtomo.project.options.option`
    field of ``params_type``; it builds the dataclass, calls ``call(run(), params)`` (the job's
    run function, looked up when the command runs) and ``show(params, result)``."""
    hints = typing.get_type_hints(params_type)
    fields = list(options_of(params_type))
    spellings = [option_name(s) for _, meta in fields for f in meta.flags for s in f.split("/")]
    if len(set(spellings)) != len(spellings):
        raise ValueError(f"{params_type.__name__}: two options share a flag (- and _ alike)")
    parameters = [_parameter(f, meta, hints[f.name]) for f, meta in fields]

    def command(**values: Any) -> None:
        params = _params_from(params_type, values)
        _start_ranks(getattr(params, "device", "auto"))
        result = call(run(), params)
        if show is not None and is_main():
            show(params, result)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return _typer_command(name, help, finite_numbers(command), _EPILOG)


def _typer_command(
    name: str, help: str, function: Callable[..., Any], epilog: str | None = None
) -> TyperCommand:
    app = typer.Typer(add_completion=False)
    app.command(name, help=help, epilog=epilog, context_settings=CONTEXT)(function)
    command = typer.main.get_command(app)
    assert isinstance(command, TyperCommand)
    return command


@dataclass(frozen=True)
class JobCommand:
    """A job's command: ``module`` defines the parameter dataclass ``params`` and ``run``.

    ``show(params, result)`` prints what ``run`` returned (default: its output files);
    ``call(run, params)`` replaces ``run(params)`` where the command line adds to the call.
    """

    module: str
    params: str
    help: str
    run: str = "run"
    show: Show | None = echo_outputs
    call: Callable[[Callable[..., Any], Any], Any] = _run

    def load(self, name: str) -> TyperCommand:
        module = importlib.import_module(self.module)
        return job_command(
            name, self.help, getattr(module, self.params),
            lambda: getattr(importlib.import_module(self.module), self.run),
            self.show, self.call,
        )  # fmt: skip


@dataclass(frozen=True)
class FunctionCommand:
    """A command written as a typer function (``module.function``), not a job."""

    module: str
    function: str
    help: str

    def load(self, name: str) -> TyperCommand:
        function = getattr(importlib.import_module(self.module), self.function)
        return _typer_command(name, self.help, finite_numbers(function))


@dataclass(frozen=True)
class CommandGroup:
    """A group of commands (``subtomo star ...``), each loaded when used."""

    help: str
    commands: Mapping[str, JobCommand | FunctionCommand | CommandGroup]

    def load(self, name: str) -> LazyGroup:
        return LazyGroup(name=name, help=self.help, table=self.commands, no_args_is_help=True)


Entry = JobCommand | FunctionCommand | CommandGroup


class _Placeholder(TyperCommand):
    """Stands for a command in listings (its name and help) until it is used."""

    def __init__(self, name: str, entry: Entry) -> None:
        super().__init__(name, help=entry.help)
        self.entry = entry


class LazyGroup(TyperGroup):
    """A group whose commands come from ``table`` (name -> entry) and are built, importing
    their modules, only when resolved to run (or to show their own ``--help``)."""

    table: Mapping[str, Entry] = {}

    def __init__(self, *, table: Mapping[str, Entry] | None = None, **attrs: Any) -> None:
        super().__init__(**attrs)
        if table is not None:
            self.table = table
        for name, entry in self.table.items():
            self.commands.setdefault(name, _Placeholder(name, entry))

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if isinstance(command, _Placeholder) and name is not None:
            command = self.commands[name] = command.entry.load(name)
        return name, command, rest
