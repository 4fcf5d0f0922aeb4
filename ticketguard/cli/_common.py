"""Shared pieces of the click commands: error translation and common options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ticketguard.errors import ArchitectureError, ConfigError, TicketGuardError

F = TypeVar("F", bound=Callable[..., Any])


def library_errors(func: F) -> F:
    """Turn the library's own exceptions into one-line click errors (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            # Bad option values: exit code 2, like click's own usage errors.
            error = click.ClickException(str(exc))
            error.exit_code = 2
            raise error from None
        except TicketGuardError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def percent(value: float | None) -> str:
    """Format a fraction as a percentage with two decimals; '-' when there is none."""
    return "-" if value is None else f"{100 * value:.2f}%"


#: Most KEY=VALUE pairs one repeated option may carry.
MAX_KWARGS = 256


def parse_kwargs(pairs: tuple[str, ...], option: str) -> dict[str, Any]:
    """Parse repeated KEY=VALUE options; values are JSON when they parse as JSON, else strings.

    Values go through the strict reader (ticketguard/documents.py): a value that is JSON but
    that no option may hold (NaN, Infinity, 1e400, a lone surrogate, duplicate keys, deep
    nesting) is refused with one line rather than passed on; a key given twice is refused too.
    """
    from ticketguard.documents import is_unicode, parse_json

    if len(pairs) > MAX_KWARGS:
        raise click.BadParameter(f"at most {MAX_KWARGS} KEY=VALUE pairs", param_hint=option)
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{_shown(pair)} is not KEY=VALUE", param_hint=option)
        if key in result:
            raise click.BadParameter(f"{_shown(key)} is given twice", param_hint=option)
        try:
            result[key] = parse_json(raw, what=f"the value of {_shown(key)}", error=_NotJson)
        except _NotJson as exc:
            if ": not valid JSON (" not in str(exc):
                raise click.BadParameter(str(exc), param_hint=option) from None
            if not is_unicode(raw):
                raise click.BadParameter(
                    f"the value of {_shown(key)} is not valid Unicode", param_hint=option
                ) from None
            result[key] = raw
    return result


class _NotJson(ConfigError):
    """A KEY=VALUE value the strict JSON reader did not take (not JSON, or refused)."""


def _shown(text: str, limit: int = 60) -> str:
    """A short, printable repr of a command-line value (for one-line messages)."""
    shown = repr(text).encode("ascii", "backslashreplace").decode("ascii")
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where torchvision datasets live (cifar10, cifar100, mnist, fashion-mnist).",
)
arch_arg_option = click.option(
    "--arch-arg", multiple=True, metavar="KEY=VALUE", help="Extra keyword for the model factory."
)
#: The security level of `verify` and `dispute` (verify/stats.py: SECURITY_BITS, MAX_SECURITY_BITS).
security_bits_option = click.option(
    "--security-bits",
    default=128,
    show_default=True,
    type=click.IntRange(0, 4096),
    help="Statistical evidence decides only at p <= 2^-BITS/m, so forging it by retrying "
    "costs about 2^BITS tries; 0 restores the plain alpha rule.",
)
passphrase_option = click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File holding the key's passphrase (else $TICKETGUARD_PASSPHRASE).",
)
download_option = click.option(
    "--download", is_flag=True, help="Download the dataset into --data-dir if it is missing."
)


def check_arch(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: refuse an architecture name nothing can build (exit code 2)."""
    from ticketguard.tickets.models import check_architecture

    if value is not None:
        try:
            check_architecture(value)
        except ArchitectureError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def check_dataset(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: refuse an unknown dataset name (exit code 2)."""
    from ticketguard.tickets.data import DATASETS, IMAGEFOLDER_PREFIX

    if value is not None and value not in DATASETS and not value.startswith(IMAGEFOLDER_PREFIX):
        raise click.BadParameter(
            f"unknown dataset {value!r} (known: {', '.join(DATASETS)}, or imagefolder:PATH)",
            ctx=ctx,
            param=param,
        )
    return value


def given_options(ctx: click.Context, *names: str) -> list[str]:
    """Return the options among `names` (parameter names) given on the command line, as flags."""
    from click.core import ParameterSource

    given = []
    for param in ctx.command.params:
        if param.name in names and ctx.get_parameter_source(param.name) in (
            ParameterSource.COMMANDLINE,
            ParameterSource.ENVIRONMENT,
        ):
            given.append(param.opts[0])
    return given


def warn_pending_writes(*paths: str | None) -> None:
    """Print one warning line per input file whose output set has an interrupted write pending.

    Until the write is finished (docs/outputs.md) the set's files may mix old and new ones.
    """
    from pathlib import Path

    from ticketguard.files import pending_note

    for path in dict.fromkeys(p for p in paths if p):
        note = pending_note(Path(path))
        if note is not None:
            click.echo(f"warning: {note}", err=True)
