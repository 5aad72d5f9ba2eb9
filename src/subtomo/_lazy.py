"""Packages whose public names load on first use (PEP 562), so that importing one light
module of a package (``subtomo.project.options``, ``subtomo.io.star``) does not import torch
through the package's ``__init__``.

A package lists what it re-exports as imports under ``if TYPE_CHECKING:`` (what type checkers
and readers see) and ends with ``__getattr__, __dir__ = lazy_exports(__name__, __file__)``,
which reads those imports from the file and performs each on the first use of its name.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["lazy_exports"]


def _type_checking_imports(source: str) -> dict[str, str]:
    """``{name: module}`` of the ``from module import name`` under ``if TYPE_CHECKING:``."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.module:
                    found.update({a.asname or a.name: statement.module for a in statement.names})
    return found


def lazy_exports(
    package: str, init_file: str
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` of ``package``: a name its ``__init__`` (``init_file``)
    imports under ``if TYPE_CHECKING:`` is imported from its module when first looked up, then
    kept in the package."""
    home = _type_checking_imports(Path(init_file).read_text(encoding="utf-8"))

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *home})

    return __getattr__, __dir__
