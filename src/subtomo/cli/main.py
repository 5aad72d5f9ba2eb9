"""The ``subtomo`` command: one subcommand per job type.

This layer parses options (named like RELION's GUI fields) and prints; the work happens in
``subtomo.jobs``. Bad input ends with one line naming file, block, column and row.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from subtomo import __version__
from subtomo.errors import InputError

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


# Subcommands: one module per job type under subtomo.cli, each exposing ``command``.
# (Registered below; keep one line per job type.)
from subtomo.cli import jobs as _jobs  # noqa: E402

app.command("jobs")(_jobs.command)


def main() -> None:
    """Console entry point: run the app, turning bad input into one clear line."""
    try:
        app(standalone_mode=False)
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
