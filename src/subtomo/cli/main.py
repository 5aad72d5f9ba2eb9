"""The ``subtomo`` command: one subcommand per job type.

This layer parses options (named like RELION's GUI fields) and prints; the work happens in
``subtomo.jobs``. The commands are listed in :mod:`subtomo.cli.commands` and built from the
jobs' parameter dataclasses when used (:mod:`subtomo.cli.build`).

Every failure ends with one line on stderr naming the file or option and the cause, and a
non-zero exit status: 1 for bad input, unreadable or unwritable files and internal errors, 2
for usage errors, 130 when interrupted. ``--debug`` (or
``SUBTOMO_DEBUG=1``) prints the traceback before that line.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

# typer >= 0.26 bundles click as typer._click; its exception types are only exposed there
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from subtomo import __version__
from subtomo.cli.build import LazyGroup
from subtomo.cli.commands import COMMANDS
from subtomo.distributed import is_distributed, rank
from subtomo.errors import InputError

# PyTorch's CPU threads (GNU OpenMP) spin while they wait by default: on cores shared with other
# jobs that made iterations up to 6x slower; passive waiting costs ~10% on idle cores. Set before
# torch is imported (the job modules import it lazily); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _Commands(LazyGroup):
    table = COMMANDS


app = typer.Typer(
    cls=_Commands,
    name="subtomo",
    help="Subtomogram averaging for cryo-ET on PyTorch, with RELION 5 files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
_debug = {"requested": False}  # --debug of the command being run


def _version(value: bool) -> None:
    if value:
        typer.echo(f"subtomo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Print the traceback of a failure (or SUBTOMO_DEBUG=1)."
    ),
) -> None:
    """Subtomogram averaging for cryo-ET on PyTorch, with RELION 5 files."""
    _debug["requested"] = debug
    log = logging.getLogger("subtomo")
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=err_console, show_path=False, show_time=False))
        log.setLevel(logging.INFO)


def _fail(exc: BaseException, message: str, code: int) -> int:
    """Print ``error: message`` as one line (the traceback first when debugging)."""
    if _debug["requested"] or os.environ.get("SUBTOMO_DEBUG") == "1":
        traceback.print_exception(exc)
    line = " ".join(message.split())  # one line, whatever the message holds
    if is_distributed():
        line = f"(rank {rank()}) {line}"
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    return code


def _usage_message(exc: ClickException) -> str:
    """click's message, with the command's help hint for usage errors."""
    ctx = exc.ctx if isinstance(exc, UsageError) else None
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return exc.format_message() + hint


def _os_message(exc: OSError) -> str:
    """``file: cause`` of an OSError (``a -> b: cause`` for a rename)."""
    cause = exc.strerror or str(exc)
    if exc.filename is None:
        return cause
    where = str(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    return f"{where}: {cause}"


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Run one command line (default ``sys.argv[1:]``); returns its exit status.

    Failures are reported by :func:`_fail`; nothing raises out of here except
    ``SystemExit`` from code that asks for it.
    """
    _debug["requested"] = False
    try:
        code = app(args=argv, prog_name="subtomo", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()
        return exc.exit_code
    except ClickException as exc:
        return _fail(exc, _usage_message(exc), exc.exit_code)
    except InputError as exc:
        return _fail(exc, str(exc), 1)
    except OSError as exc:
        return _fail(exc, _os_message(exc), 1)
    except (typer.Abort, KeyboardInterrupt) as exc:
        return _fail(exc, "aborted", 130)
    except Exception as exc:
        if is_distributed() and "closed by peer" in str(exc):
            return _fail(exc, "another rank stopped; its error is above", 1)
        message = f"internal error: {type(exc).__name__}: {exc}"
        return _fail(exc, f"{message} (run with --debug for the traceback)", 1)
    return code if isinstance(code, int) else 0


def _exit_now() -> None:
    """End a successful command without the interpreter's teardown (~0.4 s once torch is
    loaded): every output is already written atomically and closed. Left to the normal exit
    under ``torch.distributed``, whose process group shuts down at exit."""
    if is_distributed():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    """Console entry point: run the command line and exit with its status."""
    code = run_cli()
    if code == 0:
        _exit_now()
    sys.exit(code)
