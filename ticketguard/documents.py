"""One strict reader for every JSON and TOML document ticketguard reads.

Every document (ticket metadata, credentials, secret files, run state, benchmark configs, cell
records, HTTP bodies) is read here under a budget: a size cap before parsing, nesting depth
bounded, duplicate keys refused, non-finite numbers refused (NaN, Infinity and overflowing
literals such as 1e400), integers of more than `MAX_INT_DIGITS` digits refused and strings
that are not valid Unicode (lone surrogates from escapes) refused. A document past any of these
raises the caller's error class with one line, so the CLI prints one `Error:` line. The budgets
are listed in docs/limits.md.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ticketguard.errors import TicketGuardError

#: Deepest nesting of objects and arrays any document may have; ours are at most 6 deep.
MAX_DEPTH = 32
#: Longest integer literal (decimal digits); Python's own limit is 4300.
MAX_INT_DIGITS = 64
#: Default size cap of a document read from a file (callers pass a tighter or looser one).
MAX_DOCUMENT_BYTES = 16 << 20


class Refused(ValueError):
    """A document broke a strict rule (raised while parsing; `parse_json` names the caller's error)."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise Refused(f"duplicate key {_shown(key)}")
        result[key] = value
    return result


def _constant(name: str) -> Any:
    raise Refused(f"non-finite number {name}")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Refused(f"number {text[:20]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise Refused(f"an integer of {len(text)} digits")
    return int(text)


def _shown(text: str, limit: int = 40) -> str:
    """A short, printable rendering of a string from a document (for error messages)."""
    shown = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    shown = "".join(c if c.isprintable() else "?" for c in shown)
    return repr(shown[:limit] + ("..." if len(shown) > limit else ""))


def _check_tree(value: Any, max_depth: int) -> str | None:
    """Return the first problem of a parsed document (depth, numbers, strings), or None."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            children: Iterable[Any] = item.values() if isinstance(item, dict) else item
            if isinstance(item, dict):
                for key in item:
                    if isinstance(key, str) and not is_unicode(key):
                        return "a key that is not valid Unicode"
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str):
            if not is_unicode(item):
                return "a string that is not valid Unicode (a lone surrogate)"
        elif isinstance(item, float) and not math.isfinite(item):
            return "a non-finite number"
        elif isinstance(item, int) and not isinstance(item, bool):
            if item.bit_length() > MAX_INT_DIGITS * 4:
                return "an integer that is too large"
    return None


def is_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def loads_strict(text: str, *, check_floats: bool = True) -> Any:
    """json.loads with the strict rules applied while parsing (no tree walk afterwards).

    Duplicate keys, NaN/Infinity and integers of more than `MAX_INT_DIGITS` digits are refused
    with ValueError (its message says what); with `check_floats` an overflowing literal (1e400)
    is refused too, at the cost of a Python call per float; without it, it becomes infinity
    and the caller must refuse non-finite values itself. RecursionError is left to the caller.
    """
    return json.loads(
        text,
        object_pairs_hook=_pairs,
        parse_constant=_constant,
        parse_float=_float if check_floats else None,
        parse_int=_int,
    )


def parse_json(
    data: bytes | str,
    *,
    what: str,
    error: type[TicketGuardError],
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse a JSON document strictly; raise `error` with one line naming `what` if refused."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{what}: not UTF-8 text") from None
    else:
        text = data
    try:
        value = loads_strict(text)
    except Refused as exc:
        raise error(f"{what}: refused: {exc}") from None
    except RecursionError:
        raise error(f"{what}: refused: nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise error(f"{what}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    problem = _check_tree(value, max_depth)
    if problem is not None:
        raise error(f"{what}: refused: {problem}")
    return value


def parse_toml(
    text: str,
    *,
    what: str,
    error: type[TicketGuardError],
    max_depth: int = MAX_DEPTH,
) -> dict[str, Any]:
    """Parse a TOML document strictly (TOML itself refuses duplicate keys)."""
    try:
        value = tomllib.loads(text, parse_float=_float)
    except Refused as exc:
        raise error(f"{what}: refused: {exc}") from None
    except RecursionError:
        raise error(f"{what}: refused: nested deeper than {max_depth} levels") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what}: not valid TOML ({str(exc).splitlines()[0][:120]})") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise error(f"{what}: not valid TOML ({str(exc).splitlines()[0][:120]})") from None
    problem = _check_tree(value, max_depth)
    if problem is not None:
        raise error(f"{what}: refused: {problem}")
    return value


def read_bounded(
    path: str | os.PathLike[str],
    *,
    what: str,
    error: type[TicketGuardError],
    max_bytes: int = MAX_DOCUMENT_BYTES,
) -> bytes:
    """Read at most `max_bytes` from a regular file, or raise `error` with one line."""
    p = Path(path)
    try:
        if not p.is_file():
            raise error(f"{p}: no such file" if not p.exists() else f"{p}: not a regular file")
        with p.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{p}: cannot read the {what} ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise error(f"{p}: the {what} is larger than {max_bytes} bytes; refused")
    return data


def read_json_file(
    path: str | os.PathLike[str],
    *,
    what: str,
    error: type[TicketGuardError],
    max_bytes: int = MAX_DOCUMENT_BYTES,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Read and strictly parse a JSON file under a size budget."""
    data = read_bounded(path, what=what, error=error, max_bytes=max_bytes)
    return parse_json(data, what=f"{path}", error=error, max_depth=max_depth)


def read_toml_file(
    path: str | os.PathLike[str],
    *,
    what: str,
    error: type[TicketGuardError],
    max_bytes: int = MAX_DOCUMENT_BYTES,
    max_depth: int = MAX_DEPTH,
) -> dict[str, Any]:
    """Read and strictly parse a TOML file under a size budget."""
    data = read_bounded(path, what=what, error=error, max_bytes=max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: the {what} is not UTF-8 text") from None
    return parse_toml(text, what=f"{path}", error=error, max_depth=max_depth)
