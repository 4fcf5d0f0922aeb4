"""Shared pieces of the click commands: error translation and common options."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ticketguard.errors import ArchitectureError, ConfigError, DatasetError, TicketGuardError

F = TypeVar("F", bound=Callable[..., Any])


def library_errors(func: F) -> F:
    """Turn the library's own exceptions into one-line click errors (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, DatasetError, ArchitectureError) as exc:
            # Bad option values: exit code 2, like click's own usage errors.
            error = click.ClickException(str(exc))
            error.exit_code = 2
            raise error from None
        except TicketGuardError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def parse_kwargs(pairs: tuple[str, ...], option: str) -> dict[str, Any]:
    """Parse repeated KEY=VALUE options; values are JSON when they parse as JSON, else strings."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=option)
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
    return result


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
download_option = click.option(
    "--download", is_flag=True, help="Download the dataset into --data-dir if it is missing."
)
