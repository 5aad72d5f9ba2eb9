"""The one error path of ``subtomo``: one line per failure, tracebacks only when asked."""

from __future__ import annotations

import pytest

from subtomo.cli import main as cli


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_usage_error_is_one_line(capsys) -> None:
    """An unknown option (a ModuleNotFoundError traceback when the handler imported click,
    which typer no longer installs) ends in click's message on one line, status 2."""
    assert cli.run_cli(["mask", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert _errors(err) == [
        "error: No such option: --bogus (Possible options: --o) (see 'subtomo mask --help')"
    ]
    assert "Traceback" not in err


def test_internal_error_is_one_line_with_a_hint(capsys, monkeypatch) -> None:
    """An unexpected exception names itself and how to see the traceback, nothing more."""

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("subtomo.jobs.fsc.run", broken)
    assert cli.run_cli(["fsc", "a.mrc", "b.mrc"]) == 1
    err = capsys.readouterr().err
    hint = "(run with --debug for the traceback)"
    assert _errors(err) == [f"error: internal error: RuntimeError: boom second line {hint}"]
    assert "Traceback" not in err


@pytest.mark.parametrize("how", ["option", "environment"])
def test_debug_shows_the_traceback(capsys, monkeypatch, how: str) -> None:
    """``--debug`` (a root option) or ``SUBTOMO_DEBUG=1`` print the traceback, then the line."""
    argv = ["mask", "--i", "missing.mrc"]
    if how == "option":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("SUBTOMO_DEBUG", "1")
    assert cli.run_cli(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "require_file" in err
    assert _errors(err) == ["error: missing.mrc: file not found"]
    monkeypatch.delenv("SUBTOMO_DEBUG", raising=False)
    assert cli.run_cli(argv[-3:]) == 1  # the next command without --debug: no traceback
    assert "Traceback" not in capsys.readouterr().err


def test_os_error_names_the_file(capsys, monkeypatch) -> None:
    """An OSError from deep inside a job (e.g. a full disk) is one line with its file."""

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "out/map.mrc")

    monkeypatch.setattr("subtomo.jobs.fsc.run", full)
    assert cli.run_cli(["fsc", "a.mrc", "b.mrc"]) == 1
    assert _errors(capsys.readouterr().err) == ["error: out/map.mrc: No space left on device"]


def test_markup_in_messages_is_printed_as_is(capsys) -> None:
    """Messages with brackets (vectors like [1,0,1], rich markup) come out verbatim."""
    assert cli.run_cli(["mask", "--i", "[bold]x[/bold].mrc"]) == 1
    assert _errors(capsys.readouterr().err) == ["error: [bold]x[/bold].mrc: file not found"]
