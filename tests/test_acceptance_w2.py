"""Acceptance of the white-box scheme on real digits tickets (found here, on the CPU).

A ticket is found, signed and verified; the same credential is tried against tickets found
independently with other seeds; tampered credentials, wrong keys and wrong reveals are refused;
a channel-permuted copy verifies only with alignment.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ticketguard.cli import cli
from ticketguard.signatures.keys import generate_key, write_keypair
from ticketguard.signatures.topology import ticket_structure
from ticketguard.tickets.ticket import load_ticket
from ticketguard.verify.verification import verify

#: Acceptance tests find and sign real tickets: they run in `make test-all` (CI), not `make test`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, owner_ticket: Path) -> dict[str, Path]:
    """Make a key pair and sign the owner's ticket through the CLI."""
    root = tmp_path_factory.mktemp("owner")
    ticket = owner_ticket
    write_keypair(generate_key("alice@example.org"), root / "alice")
    result = CliRunner().invoke(
        cli,
        [
            "sign",
            str(ticket),
            "--key",
            str(root / "alice.key"),
            "--out",
            str(root / "signed.ticket"),
        ],
    )
    assert result.exit_code == 0, result.output
    return {
        "unsigned": ticket,
        "signed": root / "signed.ticket",
        "credential": root / "signed.cred.json",
        "secret": root / "signed.secret.json",
        "key": root / "alice.key",
        "root": root,
        "sign_output": result.output,  # type: ignore[dict-item]
    }


def test_signed_ticket_keeps_counts_and_accuracy(signed: dict[str, Path]) -> None:
    before = load_ticket(signed["unsigned"])
    after = load_ticket(signed["signed"])
    for name in before.mask:
        assert int(after.mask[name].sum()) == int(before.mask[name].sum()), name
    assert after.mask != before.mask
    unsigned_acc = before.metadata["accuracy"]["test"]
    signed_acc = after.metadata["accuracy"]["test"]
    print(f"\nunsigned {100 * unsigned_acc:.2f}%, signed {100 * signed_acc:.2f}%")
    assert abs(signed_acc - unsigned_acc) <= 0.01
    assert "weight counts unchanged" in str(signed["sign_output"])


def test_signed_ticket_verifies_with_key_and_with_reveal(signed: dict[str, Path]) -> None:
    runner = CliRunner()
    for secret in (["--key", str(signed["key"])], ["--reveal", str(signed["secret"])]):
        result = runner.invoke(
            cli,
            [
                "verify",
                str(signed["signed"]),
                "--credential",
                str(signed["credential"]),
                *secret,
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["verdict"]["verified"] is True
        bits = next(e for e in report["evidence"] if e["name"] == "W2 bits")
        payload = next(e for e in report["evidence"] if e["name"] == "W2 payload")
        assert bits["log10_p"] < -30
        # The 4 codeword bits every Ed25519 signature shares are not counted.
        assert bits["details"]["matched"] == bits["details"]["bits"] == 1020
        assert payload["valid"] is True


def test_independent_tickets_are_not_verified(
    signed: dict[str, Path], independent_tickets: list[Path]
) -> None:
    key = signed["key"]
    smallest = 0.0
    for ticket in independent_tickets:
        report = verify(ticket, credential=signed["credential"], key=_owner_key(key))
        assert not report.verified, report.verdict.reason
        bits = next(e for e in report.evidences if e.name == "W2 bits")
        payload = next(e for e in report.evidences if e.name == "W2 payload")
        assert payload.valid is False
        assert bits.log10_p is not None
        smallest = min(smallest, bits.log10_p)
    print(
        f"\nsmallest W2 p-value over {len(independent_tickets)} independent tickets: 10^{smallest:.2f}"
    )
    assert smallest > np.log10(1e-6 / 2)


def _owner_key(path: Path):
    from ticketguard.signatures.keys import read_private_key

    return read_private_key(path)


def test_tampered_credential_wrong_key_and_wrong_reveal_never_verify(
    signed: dict[str, Path], tmp_path: Path
) -> None:
    runner = CliRunner()
    raw = signed["credential"].read_bytes()
    tampered = tmp_path / "tampered.cred.json"
    offset = raw.index(b'"owner"') + len('"owner":"')
    tampered.write_bytes(raw[:offset] + bytes([raw[offset] ^ 0x01]) + raw[offset + 1 :])
    result = runner.invoke(
        cli,
        [
            "verify",
            str(signed["signed"]),
            "--credential",
            str(tampered),
            "--key",
            str(signed["key"]),
        ],
    )
    assert result.exit_code == 1
    assert "credential invalid" in result.output

    write_keypair(generate_key("mallory"), tmp_path / "mallory")
    result = runner.invoke(
        cli,
        [
            "verify",
            str(signed["signed"]),
            "--credential",
            str(signed["credential"]),
            "--key",
            str(tmp_path / "mallory.key"),
        ],
    )
    assert result.exit_code == 1
    assert "wrong key" in result.output

    wrong_secret = tmp_path / "wrong.secret.json"
    secret = json.loads(signed["secret"].read_text())
    secret["seed"] = "00" * 32
    wrong_secret.write_text(json.dumps(secret))
    result = runner.invoke(
        cli,
        [
            "verify",
            str(signed["signed"]),
            "--credential",
            str(signed["credential"]),
            "--reveal",
            str(wrong_secret),
        ],
    )
    assert result.exit_code == 1
    assert "does not match the credential's commitment" in result.output


def test_channel_permuted_copy_verifies_only_with_alignment(
    signed: dict[str, Path], tmp_path: Path
) -> None:
    ticket = load_ticket(signed["signed"])
    structure = ticket_structure(
        ticket.architecture,
        ticket.num_classes,
        ticket.metadata["input_shape"],
        ticket.architecture_kwargs,
    )
    perm = structure.random_permutation(np.random.default_rng(7))
    stolen_state = structure.permute_state(ticket.trained, perm)
    model = ticket.build_model()
    stolen = ticket.build_model()
    stolen.load_state_dict(stolen_state)
    x = torch.randn(16, *ticket.metadata["input_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(stolen(x), model(x), rtol=1e-4, atol=1e-5)
    path = tmp_path / "stolen.pth"
    torch.save(stolen_state, path)

    key = _owner_key(signed["key"])
    by_position = verify(path, credential=signed["credential"], key=key)
    assert not by_position.verified
    aligned = verify(path, credential=signed["credential"], key=key, reference=signed["signed"])
    assert aligned.verified, aligned.verdict.reason
    bits = next(e for e in aligned.evidences if e.name == "W2 bits")
    assert bits.log10_p is not None and bits.log10_p < -30
    assert next(e for e in aligned.evidences if e.name == "W2 payload").valid
