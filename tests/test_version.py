"""The version lives in ticketguard/version.py alone, and nothing imports it through the root."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import ticketguard
from ticketguard.version import __version__

PACKAGE = Path(__file__).resolve().parents[1] / "ticketguard"


def test_the_package_metadata_reads_the_version_module() -> None:
    assert importlib.metadata.version("ticketguard") == __version__ == ticketguard.__version__


def test_no_module_imports_from_the_package_root() -> None:
    """`from ticketguard import X` inside the package runs ticketguard/__init__.py and what it
    imports: a hidden import loop through the root. Modules import what they need directly."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module == "ticketguard"
            ):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == []
