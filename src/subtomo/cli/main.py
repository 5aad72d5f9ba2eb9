"""The ``subtomo`` command: one subcommand per job type.

This layer parses options (named like RELION's GUI fields) and prints; the work happens in
``subtomo.jobs``. Bad input ends with one line naming file, block, column and row.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler

from subtomo import __version__
from subtomo.errors import InputError

# PyTorch's CPU threads (GNU OpenMP) spin while they wait by default: on cores shared with other
# jobs that made iterations up to 6x slower; passive waiting costs ~10% on idle cores. Set before
# torch is imported (the job modules import it lazily); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    name="subtomo",
    help="Subtomogram averaging for cryo-ET on PyTorch, with RELION 5 files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"subtomo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Subtomogram averaging for cryo-ET on PyTorch, with RELION 5 files."""
    log = logging.getLogger("subtomo")
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=err_console, show_path=False, show_time=False))
        log.setLevel(logging.INFO)


# Subcommands: one module per job type under subtomo.cli, each exposing ``command``.
# (Registered below; keep one line per job type.)
from subtomo.cli import jobs as _jobs  # noqa: E402
from subtomo.cli import select as _select  # noqa: E402
from subtomo.cli import star as _star  # noqa: E402

app.command("jobs")(_jobs.command)
app.command("select")(_select.command)
app.add_typer(_star.app, name="star")
from subtomo.cli import extract as _extract  # noqa: E402
from subtomo.cli import reconstruct as _reconstruct  # noqa: E402

app.command("extract")(_extract.command)
app.command("reconstruct")(_reconstruct.command)
from subtomo.cli import simulate as _simulate  # noqa: E402

app.command("simulate")(_simulate.command)
from subtomo.cli import fsc as _fsc  # noqa: E402
from subtomo.cli import localres as _localres  # noqa: E402
from subtomo.cli import mask as _mask  # noqa: E402
from subtomo.cli import postprocess as _postprocess  # noqa: E402

app.command("mask")(_mask.command)
app.command("postprocess")(_postprocess.command)
app.command("localres")(_localres.command)
app.command("fsc")(_fsc.command)
from subtomo.cli import refine3d as _refine3d  # noqa: E402

app.command("refine3d")(_refine3d.command)
from subtomo.cli import class3d as _class3d  # noqa: E402

app.command("class3d")(_class3d.command)
from subtomo.cli import demo as _demo  # noqa: E402

app.command("demo")(_demo.command)


def _exit_now() -> None:
    """End a successful command without the interpreter's teardown (~0.4 s once torch is
    loaded): every output is already written atomically and closed. Left to the normal exit
    under ``torch.distributed``, whose process group shuts down at exit."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    """Console entry point: run the app, turning bad input into one clear line."""
    try:
        app(standalone_mode=False)
        _exit_now()
    except InputError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
