"""docs/limits.md states every budget; this keeps its table and the code in step."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "limits.md"
ROW = re.compile(r"^\| `(ticketguard(?:\.\w+)+)\.([A-Z_]+)` \| ([^|]+) \|", re.MULTILINE)
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _value(text: str) -> float:
    number, _, unit = text.strip().partition(" ")
    value = float(number.replace(",", ""))
    return value * UNITS.get(unit, 1)


ROWS = ROW.findall(DOC.read_text(encoding="utf-8"))


#: MAX_ constants that are not a reader's budget (method parameters and output sizes).
NOT_BUDGETS = {
    "ticketguard.signatures.w2.MAX_LAYER_FRACTION",  # share of a layer W2 may write
    "ticketguard.signatures.w2.MAX_CONNECTIVITY_ENTRIES",  # layers W2/W3 can address
    "ticketguard.signatures.w3.MAX_VERSION",  # QR versions
    "ticketguard.signatures.w3.MAX_TEXT_BYTES",  # a QR code's capacity
    "ticketguard.signatures.w3.MAX_SCAN_ENTRIES",  # layers whose other windows are scanned
    "ticketguard.verify.stats.MAX_SECURITY_BITS",  # an option's range
    "ticketguard.verify.render.MAX_PIXELS",  # pictures we write
    "ticketguard.tickets.data.MAX_VAL_SIZE",  # a split rule
}


def test_the_table_lists_every_budget_in_the_code() -> None:
    package = DOC.parents[1] / "ticketguard"
    found = set()
    for path in package.rglob("*.py"):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        for name in re.findall(r"^(MAX_[A-Z_]+)(?:: [^=]+)? = ", path.read_text(), re.MULTILINE):
            found.add(f"{module}.{name}")
    documented = {f"{module}.{name}" for module, name, _ in ROWS}
    assert found - NOT_BUDGETS - documented == set()
    assert len(ROWS) >= 45


@pytest.mark.parametrize(("module", "name", "stated"), ROWS, ids=[r[1] for r in ROWS])
def test_each_stated_budget_is_the_codes(module: str, name: str, stated: str) -> None:
    assert getattr(importlib.import_module(module), name) == _value(stated)
