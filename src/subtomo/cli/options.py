"""Checks on command-line values that click's types let through."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import typer

__all__ = ["finite_numbers"]


def _flag(parameter: inspect.Parameter) -> str:
    """The option's first spelling (``--bin``), or the argument's name in capitals."""
    declarations = getattr(parameter.default, "param_decls", None)
    return declarations[0] if declarations else parameter.name.upper()


def finite_numbers(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` refusing NaN and infinite numbers (click's FLOAT reads "nan" and "inf")
    with a usage error naming the option, before the command runs."""
    signature = inspect.signature(command)

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            values = value if isinstance(value, list | tuple) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise typer.BadParameter(
                    f"expected a finite number, found {value}",
                    param_hint=_flag(signature.parameters[name]),
                )
        return command(*args, **kwargs)

    return checked
