"""Helpers shared by the CLI tests: run a command, and check a clean one-line failure."""

from __future__ import annotations

from click.testing import CliRunner, Result

from ticketguard.cli import cli


def invoke(args: list, **kwargs) -> Result:
    """Run `ticketguard ARGS` in-process (wide terminal, so one-line messages stay one line)."""
    kwargs.setdefault("env", {"COLUMNS": "300"})
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def error_line(result: Result, exit_code: int) -> str:
    """Check that the command failed cleanly (no traceback) and return its one `Error:` line."""
    assert result.exit_code == exit_code, result.output
    # A handled error ends in SystemExit; anything else escaped the command as a crash.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]
