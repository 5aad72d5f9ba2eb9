"""Imports go down the layers only: no module imports a higher layer, no two packages import
each other (directly or round a loop), and no job imports another job; and only
``subtomo.io.star`` imports ``starfile``.

Every module under ``src/subtomo`` is parsed with ``ast`` (imports inside functions and
``TYPE_CHECKING`` blocks count too) and mapped to its layer, highest first:

=====  ==============  ============================================================
layer  name            packages
=====  ==============  ============================================================
7      interface       ``cli``
6      jobs            ``jobs``: one module per job type
5      project         ``project``: job directories, the pipeline, job reports and
                       ``--continue`` options; what every job runs inside
4      algorithms      ``reconstruct``, ``ml``, ``postprocess``, ``simulate``,
                       ``subsets``, (upstream) ``tilt``, ``picking``, and ``report``
                       (plots and HTML pages, used by jobs and by ``project``)
3      data            ``data``: typed views of tomogram, particle, optimisation-set
                       and trajectory files, maps and masks read and checked
2      primitives      ``geometry``, ``ctf``, ``fourier``, ``masks``
1      files           ``io``: STAR, MRC and mdoc readers and writers
0      base            ``errors``, ``device``, ``_lazy`` (names of a package loaded on
                       first use) and the ``subtomo`` package itself
=====  ==============  ============================================================

Two choices differ from DESIGN.md's table, which puts ``data`` and ``io`` in one layer below
the primitives: the typed views in ``data`` compute RELION's rotation and projection matrices
with ``geometry``, so ``data`` sits above the primitives and ``io`` (which needs nothing but
``errors``) below them; and ``project`` is a layer of its own between the jobs and the
algorithms, so that jobs use it and ``report`` cannot import it back.

Packages of one layer may import each other (``ml`` uses ``reconstruct`` and ``postprocess``)
as long as no loop forms. Jobs share code through the layers below, never through another
job: only ``jobs.demo``, which chains the tutorial's jobs, imports other jobs. A new package
must be given a layer here before its first import is allowed.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = {
    "cli": 7,
    "jobs": 6,
    "project": 5,
    **dict.fromkeys(
        ("reconstruct", "ml", "postprocess", "simulate", "subsets", "tilt", "picking", "report"),
        4,
    ),
    "tomorefine": 4,
    "data": 3,
    **dict.fromkeys(("geometry", "ctf", "fourier", "masks"), 2),
    "io": 1,
    **dict.fromkeys(("errors", "device", "distributed", "_lazy", ""), 0),
}

#: Job modules allowed to import other job modules.
CHAINS_JOBS = {"subtomo.jobs.demo"}


def _sources() -> dict[str, str]:
    """``{module name: source}`` of every module under ``src/subtomo``."""
    out = {}
    for path in sorted((SRC / "subtomo").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path.read_text(encoding="utf-8")
    return out


def _package(module: str) -> str:
    """``subtomo.ml.engine`` -> ``ml``; ``subtomo`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(module: str, source: str, modules: Mapping[str, str]) -> set[str]:
    """The ``subtomo`` modules ``module`` imports (``from pkg import mod`` names ``pkg.mod``
    when that is a module)."""
    is_package = f"{module}.__init__" in modules or any(m.startswith(module + ".") for m in modules)
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "subtomo")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "subtomo":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    found.discard(module)
    return found


def _graph(modules: Mapping[str, str]) -> dict[str, set[str]]:
    return {m: _imports(m, src, modules) for m, src in modules.items()}


def upward_imports(modules: Mapping[str, str]) -> list[str]:
    """``"a imports b"`` for every import of a higher layer."""
    bad = []
    for module, targets in _graph(modules).items():
        for target in sorted(targets):
            if LAYERS[_package(target)] > LAYERS[_package(module)]:
                bad.append(f"{module} (layer {LAYERS[_package(module)]}) imports {target} "
                           f"(layer {LAYERS[_package(target)]})")  # fmt: skip
    return bad


def package_loops(modules: Mapping[str, str]) -> list[list[str]]:
    """Groups of two or more packages that import each other round a loop (strongly
    connected components of the package import graph)."""
    edges: dict[str, set[str]] = {}
    for module, targets in _graph(modules).items():
        source = _package(module)
        edges.setdefault(source, set()).update(p for p in map(_package, targets) if p != source)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                loops.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return loops


def jobs_importing_jobs(modules: Mapping[str, str]) -> list[str]:
    """``"jobs.x imports jobs.y"`` for every job module (but the chaining ones) that
    imports another job module."""
    bad = []
    for module, targets in _graph(modules).items():
        if _package(module) != "jobs" or module in CHAINS_JOBS or module == "subtomo.jobs":
            continue
        bad += [f"{module} imports {t}" for t in sorted(targets) if _package(t) == "jobs"]
    return bad


def test_every_package_has_a_layer() -> None:
    """A new package needs its place in LAYERS (and in the table above)."""
    missing = {_package(m) for m in _sources()} - set(LAYERS)
    assert not missing, f"packages without a layer: {sorted(missing)}"


def test_no_module_imports_a_higher_layer() -> None:
    assert upward_imports(_sources()) == []


def test_no_packages_import_each_other() -> None:
    assert package_loops(_sources()) == []


def test_no_job_imports_another_job() -> None:
    """Only the demo chains jobs; what jobs share lives in the layers below."""
    assert jobs_importing_jobs(_sources()) == []


def test_only_io_star_uses_starfile() -> None:
    """Every STAR file goes through :mod:`subtomo.io.star` (atomic writes, one float
    format, errors that name the place)."""
    users = {
        module
        for module, source in _sources().items()
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(
            name.split(".")[0] == "starfile"
            for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""])
        )
    }  # fmt: skip
    assert users == {"subtomo.io.star"}


def test_the_checks_catch_what_they_forbid() -> None:
    """On a made-up tree: an upward import, a loop between two packages of one layer (also
    through a relative import) and one job importing another are all reported; a job
    importing the project and the demo importing jobs are not."""
    tree = {
        "subtomo.io.star": "from subtomo.fourier import fft\n",
        "subtomo.fourier": "",
        "subtomo.fourier.fft": "import torch\n",
        "subtomo.ml": "",
        "subtomo.ml.engine": "from subtomo.postprocess import pipeline\n",
        "subtomo.postprocess": "",
        "subtomo.postprocess.pipeline": "def f():\n    from ..ml import engine\n",
        "subtomo.jobs": "",
        "subtomo.jobs.refine3d": "from subtomo.jobs import reconstruct\nimport subtomo.project\n",
        "subtomo.jobs.reconstruct": "from subtomo.project import run_job\n",
        "subtomo.jobs.demo": "from subtomo.jobs.refine3d import run\n",
        "subtomo.project": "from subtomo.report import plots\n",
        "subtomo.report": "",
        "subtomo.report.plots": "",
    }
    assert upward_imports(tree) == [
        "subtomo.io.star (layer 1) imports subtomo.fourier.fft (layer 2)"
    ]
    assert package_loops(tree) == [["ml", "postprocess"]]
    assert jobs_importing_jobs(tree) == ["subtomo.jobs.refine3d imports subtomo.jobs.reconstruct"]
