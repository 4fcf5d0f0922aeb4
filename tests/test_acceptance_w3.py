"""Acceptance of the QR scheme (W3) on the real digits ticket, signed and attacked here.

The owner's ticket is signed with `--scheme qr`; its QR window decodes to the text. After a 50%
global magnitude-pruning attack it still decodes or its p-value stays below 1e-6; a
channel-permuted copy decodes only once aligned to the owner's ticket.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file

from ticketguard.signatures.keys import OwnerKey, write_keypair
from ticketguard.signatures.topology import ticket_structure
from ticketguard.tickets.ticket import load_ticket

#: Acceptance tests find and sign real tickets: they run in `make test-all` (CI), not `make test`.
pytestmark = pytest.mark.slow

OWNER = OwnerKey("alice@example.org", Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
TEXT = "alice@example.org 2026"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, owner_ticket: Path) -> dict[str, Path]:
    """Sign the owner's digits ticket with a QR code through the CLI."""
    root = tmp_path_factory.mktemp("w3-owner")
    write_keypair(OWNER, root / "alice")
    result = invoke(
        ["sign", owner_ticket, "--key", root / "alice.key", "--out", root / "qr.ticket"]
        + ["--scheme", "qr", "--qr-text", TEXT, "--device", "cpu"],
        env={"COLUMNS": "300", "SOURCE_DATE_EPOCH": "1795000000"},
    )
    assert result.exit_code == 0, result.output
    print("\n" + result.output)
    return {
        "unsigned": owner_ticket,
        "signed": root / "qr.ticket",
        "cred": root / "qr.cred.json",
        "key": root / "alice.key",
        "root": root,
    }


def _qr(path: Path, signed: dict[str, Path], *extra: object) -> tuple[int, dict]:
    result = invoke(
        ["verify", path, "--credential", signed["cred"], "--key", signed["key"], "--json", *extra]
    )
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.output)
    evidence = next(e for e in report["evidence"] if e["name"] == "W3 QR")
    return result.exit_code, evidence


def test_qr_signed_ticket_decodes_to_its_text(signed: dict[str, Path]) -> None:
    before = load_ticket(signed["unsigned"])
    after = load_ticket(signed["signed"])
    for name in before.mask:
        assert int(after.mask[name].sum()) == int(before.mask[name].sum()), name
    accuracy = (before.metadata["accuracy"]["test"], after.metadata["accuracy"]["test"])
    code, evidence = _qr(signed["signed"], signed)
    print(f"\naccuracy {100 * accuracy[0]:.2f}% -> {100 * accuracy[1]:.2f}%; {evidence['summary']}")
    assert code == 0
    assert evidence["details"]["decoded"] == TEXT
    assert evidence["details"]["mismatches"] == 0
    assert abs(accuracy[1] - accuracy[0]) <= 0.01


def test_qr_survives_half_of_the_weights_pruned_by_magnitude(
    signed: dict[str, Path], tmp_path: Path
) -> None:
    ticket = load_ticket(signed["signed"])
    state = dict(ticket.trained)
    alive = torch.cat([state[n][m].abs() for n, m in ticket.mask.items()])
    threshold = alive.kthvalue(alive.numel() // 2).values
    for name in ticket.mask:
        state[name] = torch.where(state[name].abs() > threshold, state[name], 0.0)
    kept = sum(int((state[n] != 0).sum()) for n in ticket.mask)
    assert kept == pytest.approx(alive.numel() / 2, abs=2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "pruned.safetensors"))
    code, evidence = _qr(tmp_path / "pruned.safetensors", signed)
    print(f"\nafter 50% magnitude pruning: {evidence['summary']}, p = {evidence['p']}")
    assert evidence["details"]["decoded"] == TEXT or evidence["log10_p"] < -6
    assert code == 0


def test_permuted_copy_decodes_only_with_alignment(signed: dict[str, Path], tmp_path: Path) -> None:
    ticket = load_ticket(signed["signed"])
    structure = ticket_structure(
        ticket.architecture,
        ticket.num_classes,
        ticket.metadata["input_shape"],
        ticket.architecture_kwargs,
    )
    stolen = structure.permute_state(
        ticket.trained, structure.random_permutation(np.random.default_rng(3))
    )
    torch.save(stolen, tmp_path / "stolen.pth")
    code, evidence = _qr(tmp_path / "stolen.pth", signed)
    print(f"\npermuted, by position: {evidence['summary']}")
    assert code == 1
    assert evidence["details"]["decoded"] is None
    code, evidence = _qr(tmp_path / "stolen.pth", signed, "--reference", signed["signed"])
    print(f"permuted, aligned: {evidence['summary']}")
    assert code == 0
    assert evidence["details"]["decoded"] == TEXT


def test_rendered_pictures_have_the_expected_sizes(signed: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    document = json.loads(signed["cred"].read_text())
    size = document["embedding"]["window"]["size"]
    out, inp = document["embedding"]["layer"]["shape"]
    result = invoke(
        ["render", signed["signed"], "--credential", signed["cred"], "--out", tmp_path / "pics"]
    )
    assert result.exit_code == 0, result.output
    assert f"decodes to '{TEXT}'" in result.output
    expected = {
        "connectivity.png": (inp * 4, out * 4),
        "qr.png": ((size + 8) * 12, (size + 8) * 12),
        "comparison.png": (3 * size * 12 + 2 * 2 * 12, size * 12),
    }
    for name, dimensions in expected.items():
        with Image.open(tmp_path / "pics" / name) as image:
            assert image.size == dimensions, name
    print(f"\nrendered: {expected}")
