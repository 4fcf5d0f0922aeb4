"""Sign and verify, through the library and the command line (keygen -> sign -> verify, thin).

One owner ticket (a width-32 DigitsCNN, density 0.3) is signed once per module through the CLI,
without recovery training, and then attacked: wrong keys and reveals, tampered credentials,
channel permutation, dense fine-tuning, the unsigned parent.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import error_line, invoke
from safetensors.torch import save_file

import ticketguard
from ticketguard import api
from ticketguard.errors import ConfigError, EmbeddingError
from ticketguard.signatures.credential import read_credential, read_secret, seed_commitment
from ticketguard.signatures.keys import read_private_key
from ticketguard.signatures.signing import SignConfig, embed_signature, sign_ticket
from ticketguard.signatures.structure import structure_of
from ticketguard.signatures.thinning import remove_paths
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.tickets.loading import load_checkpoint
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import build_model, default_pruned_parameters
from ticketguard.tickets.retrain import RetrainConfig, starting_state
from ticketguard.tickets.ticket import load_ticket
from ticketguard.tickets.training import resolve_device
from ticketguard.verify.recovery import (
    EXPLICIT,
    TOP_MAGNITUDE,
    ZERO_PATTERN,
    recover_mask,
    top_magnitude,
)
from ticketguard.verify.verification import VerifyConfig, rule_note, verify

WIDE = {"architecture": {"name": "digits_cnn", "kwargs": {"width": 32}}, "num_classes": 10}
NO_TRAINING = ["--recover-epochs", "0", "--device", "cpu"]
FAST_W1 = ["--null-samples", "2"]
LAYERS = ["conv2.weight", "conv3.weight", "fc1.weight"]


def verify_json(args: list) -> tuple[int, dict]:
    result = invoke(["verify", *args, "--json"])
    # The verdict is the exit code: SystemExit(0) leaves no exception behind, 1 does.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, json.loads(result.output)


def _evidence(report: dict, name: str) -> dict:
    found = [e for e in report["evidence"] if e["name"] == name]
    assert len(found) == 1, [e["name"] for e in report["evidence"]]
    return found[0]


def _owner_ticket(make_ticket, seed: int = 0):
    ticket = make_ticket(width=32, keep=0.3, seed=seed)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    return ticket


@pytest.fixture(scope="module")
def owner(make_ticket, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Keys for alice and bob, alice's parent ticket, and its signing through the CLI."""
    root = tmp_path_factory.mktemp("owner")
    _owner_ticket(make_ticket).save(root / "parent.ticket")
    for who in ("alice", "bob"):
        result = invoke(["keygen", "--owner", f"{who}@example.org", "--out", root / who])
        assert result.exit_code == 0, result.output
    result = invoke(
        [
            "sign",
            root / "parent.ticket",
            "--key",
            root / "alice.key",
            "--out",
            root / "signed.ticket",
            *NO_TRAINING,
        ]
    )
    assert result.exit_code == 0, result.output
    # A second signing of the same ticket with a random seed: another secret for the same key.
    other = invoke(
        [
            "sign",
            root / "parent.ticket",
            "--key",
            root / "alice.key",
            "--out",
            root / "other.ticket",
            "--random-seed",
            *NO_TRAINING,
        ]
    )
    assert other.exit_code == 0, other.output
    return {
        "root": root,
        "parent": root / "parent.ticket",
        "signed": root / "signed.ticket",
        "cred": root / "signed.cred.json",
        "secret": root / "signed.secret.json",
        "key": root / "alice.key",
        "pub": root / "alice.pub",
        "bob_key": root / "bob.key",
        "bob_pub": root / "bob.pub",
        "other_secret": root / "other.secret.json",
        "other_cred": root / "other.cred.json",
        "output": result.output,
    }


# --- signing -------------------------------------------------------------------------------------


def test_sign_writes_a_signed_ticket_with_unchanged_counts(owner: dict) -> None:
    out = owner["output"]
    assert (
        "embedded 1024 bits x 8 positions (conv2.weight 54, conv3.weight 108, fc1.weight 862)"
        in out
    )
    assert "weight counts unchanged" in out
    assert "accuracy on digits:" in out and "before signing" in out
    parent, signed = load_ticket(owner["parent"]), load_ticket(owner["signed"])
    for name in parent.mask:
        assert int(signed.mask[name].sum()) == int(parent.mask[name].sum()), name
    assert signed.mask != parent.mask
    changed = sum(int((signed.mask[n] != parent.mask[n]).sum()) for n in parent.mask)
    assert f"{changed} mask entries changed" in out
    signed.validate()  # the trained weights obey the new mask
    cred = json.loads(owner["cred"].read_text())
    assert cred["fingerprint_before"] == parent.fingerprint
    assert cred["fingerprint_after"] == signed.fingerprint
    assert cred["owner"] == "alice@example.org"
    assert cred["embedding"]["scheme"] == "W2" and cred["embedding"]["bits"] == 1024
    assert read_credential(owner["cred"]).valid
    sig = signed.metadata["signature"]
    assert sig["owner"] == "alice@example.org"
    assert sig["fingerprint_before"] == parent.fingerprint
    # The secret holds the seed the credential commits to, and only the owner may read it.
    assert stat.S_IMODE(os.stat(owner["secret"]).st_mode) == 0o600
    seed = read_secret(owner["secret"])
    assert cred["seed_commitment"] == seed_commitment(seed)
    # Without --random-seed, the seed is the one derived from the key.
    key = read_private_key(owner["key"])
    assert seed == key.derive_seed(parent.fingerprint)
    assert read_secret(owner["other_secret"]) != seed


def test_sign_refuses_to_overwrite_its_input(owner: dict, tmp_path: Path) -> None:
    ticket = tmp_path / "mine.ticket"
    ticket.write_bytes(owner["parent"].read_bytes())
    before = ticket.read_bytes()
    result = invoke(["sign", ticket, "--key", owner["key"], "--out", ticket, *NO_TRAINING])
    line = error_line(result, 1)
    assert "--out would overwrite the input ticket" in line
    assert ticket.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.ticket"]


def test_sign_refuses_existing_outputs_without_force(owner: dict, tmp_path: Path) -> None:
    out = tmp_path / "s.ticket"
    (tmp_path / "s.cred.json").write_text("mine")
    result = invoke(["sign", owner["parent"], "--key", owner["key"], "--out", out, *NO_TRAINING])
    line = error_line(result, 1)
    assert "s.cred.json already exists; pass --force" in line
    assert (tmp_path / "s.cred.json").read_text() == "mine"
    assert not out.exists()
    result = invoke(
        ["sign", owner["parent"], "--key", owner["key"], "--out", out, "--force", *NO_TRAINING]
    )
    assert result.exit_code == 0, result.output
    assert read_credential(tmp_path / "s.cred.json").valid
    # Same key and parent: the same derived seed (the payload differs by its creation time).
    assert read_secret(tmp_path / "s.secret.json") == read_secret(owner["secret"])
    for name in LAYERS:
        assert int(load_ticket(out).mask[name].sum()) == int(
            load_ticket(owner["parent"]).mask[name].sum()
        )


def test_sign_writes_nothing_when_layers_are_too_small(owner: dict, tmp_path: Path) -> None:
    out = tmp_path / "s.ticket"
    result = invoke(
        [
            "sign",
            owner["parent"],
            "--key",
            owner["key"],
            "--out",
            out,
            "--layers",
            "conv2",
            *NO_TRAINING,
        ]
    )
    line = error_line(result, 1)
    assert "can hold 256 bits at 2 mask positions per bit, the signature needs 1024" in line
    assert list(tmp_path.iterdir()) == []


def test_sign_removes_partial_outputs_when_a_write_fails(owner: dict, tmp_path: Path) -> None:
    out = tmp_path / "s.ticket"
    (tmp_path / "s.secret.json").mkdir()  # the last of the three files cannot be written
    result = invoke(
        ["sign", owner["parent"], "--key", owner["key"], "--out", out, "--force", *NO_TRAINING]
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.secret.json"]


def test_sign_without_a_dataset_fails_cleanly(make_ticket, owner: dict, tmp_path: Path) -> None:
    ticket = make_ticket(width=32, keep=0.3)
    ticket.save(tmp_path / "bare.ticket")
    out = tmp_path / "s.ticket"
    result = invoke(["sign", tmp_path / "bare.ticket", "--key", owner["key"], "--out", out])
    assert "records no dataset" in error_line(result, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.ticket"]


def test_sign_ticket_library(make_ticket) -> None:
    """Library signing: pure embedding, counts kept, bits in place, credential consistent."""
    from ticketguard.signatures.keys import generate_key

    ticket = _owner_ticket(make_ticket, seed=3)
    key = generate_key("carol@example.org")
    before = {n: m.clone() for n, m in ticket.mask.items()}
    result = sign_ticket(
        ticket,
        key,
        SignConfig(ecc_symbols=16, retrain=RetrainConfig(epochs=0)),
        device=resolve_device("cpu"),
        created="2024-01-01T00:00:00Z",
    )
    assert all(torch.equal(ticket.mask[n], before[n]) for n in before)
    assert result.params.num_bits == 8 * (64 + 16)
    signed = result.ticket
    for name in LAYERS:
        assert int(signed.mask[name].sum()) == int(ticket.mask[name].sum())
    changed = sum(int((signed.mask[n] != ticket.mask[n]).sum()) for n in LAYERS)
    assert result.changed_connections == changed > 0
    assert result.credential["created"] == "2024-01-01T00:00:00Z"
    assert result.credential["fingerprint_after"] == signed.fingerprint
    assert result.dataset == "digits"
    assert 0 <= result.accuracy_after <= 1 and 0 <= result.accuracy_before <= 1
    # The mask embedded is the signed ticket's mask; its bits read back in full.
    from ticketguard.signatures.credential import payload_of

    written = embed_signature(ticket, payload_of(result.credential), result.seed, result.params)
    assert written.mask == signed.mask
    from ticketguard.signatures.payload import embedded_bits
    from ticketguard.signatures.w2 import keyed_positions, observed_magnitudes, read_groups

    positions = keyed_positions(result.seed, result.params)
    reading = read_groups(
        observed_magnitudes(signed.trained, signed.mask, LAYERS), result.params, positions
    )
    assert not reading.erased.any()
    expected = embedded_bits(payload_of(result.credential), result.seed, result.params.ecc)
    np.testing.assert_array_equal(reading.bits, expected)
    # Entries the new mask switched on restart from the rewind weights, not from zero; the
    # carriers among them are raised (sign kept) to the 0.9 quantile of their layer's
    # magnitudes before signing, and every carrier keeps at least that.
    for n in LAYERS:
        carriers = written.carriers[n]
        level = torch.quantile(ticket.trained[n][ticket.mask[n]].abs().float(), 0.9)
        floor = torch.zeros(ticket.trained[n].numel())
        floor[carriers] = level
        assert (signed.trained[n].reshape(-1)[carriers].abs() >= level * (1 - 1e-6)).all()
        revived = (signed.mask[n] & ~ticket.mask[n]).reshape(-1)
        assert revived.any()
        rewind = ticket.rewind[n].reshape(-1)
        torch.testing.assert_close(
            signed.trained[n].reshape(-1)[revived],
            torch.where(rewind.abs() < floor, torch.copysign(floor, rewind), rewind)[revived],
        )
        assert not signed.trained[n][~signed.mask[n]].any()


def test_sign_ticket_refuses_chosen_excluded_layer(make_ticket) -> None:
    from ticketguard.signatures.keys import generate_key

    ticket = _owner_ticket(make_ticket)
    with pytest.raises(ConfigError, match="matches no conv or linear weight"):
        sign_ticket(
            ticket,
            generate_key("carol@example.org"),
            SignConfig(layers=("nothing*",), retrain=RetrainConfig(epochs=0)),
            device=resolve_device("cpu"),
        )
    with pytest.raises(EmbeddingError, match="not part of the ticket's mask"):
        sign_ticket(
            ticket,
            generate_key("carol@example.org"),
            SignConfig(layers=("conv1",), retrain=RetrainConfig(epochs=0)),
            device=resolve_device("cpu"),
        )


# --- verifying: the owner, a judge, and everyone else --------------------------------------------


def test_verify_with_the_key(owner: dict) -> None:
    code, report = verify_json(
        [owner["signed"], "--credential", owner["cred"], "--key", owner["key"]]
    )
    assert code == 0
    bits = _evidence(report, "W2 bits")
    assert bits["log10_p"] < -30
    # 4 of the 1024 codeword bits are the same in every Ed25519 signature: not counted.
    assert bits["details"] == {
        "matched": 1020,
        "bits": 1020,
        "erased": 0,
        "repetition": 8,
        "missing_layers": [],
    }
    assert bits["null"].startswith("Binomial(n, 1/2)")
    payload = _evidence(report, "W2 payload")
    assert payload["valid"] is True
    assert report["verdict"]["verified"] is True
    assert report["verdict"]["reason"].startswith("verified: ")
    assert "W2 payload" in report["verdict"]["decisive"]
    assert report["credential"]["valid"] is True
    assert report["credential"]["owner"] == "alice@example.org"
    assert report["problems"] == []
    assert set(report["mask_sources"].values()) == {EXPLICIT}
    # The human report names the evidence and the verdict.
    result = invoke(
        ["verify", owner["signed"], "--credential", owner["cred"], "--key", owner["key"]]
    )
    assert result.exit_code == 0, result.output
    assert "1020/1020 read bits match (0 of 1024 erased; 8 replicas per bit)" in result.output
    assert "alice@example.org's valid Ed25519 signature" in result.output
    assert "verified: W2 bits p = " in result.output


def test_verify_with_the_reveal_and_the_public_key(owner: dict) -> None:
    args = [owner["signed"], "--credential", owner["cred"], "--reveal", owner["secret"]]
    code, report = verify_json([*args, "--public-key", owner["pub"]])
    assert code == 0
    assert _evidence(report, "W2 payload")["valid"] is True
    assert _evidence(report, "W2 bits")["log10_p"] < -30


def test_verify_with_another_key_is_refused(owner: dict) -> None:
    result = invoke(
        ["verify", owner["signed"], "--credential", owner["cred"], "--key", owner["bob_key"]]
    )
    assert result.exit_code == 1, result.output
    assert "problem       wrong key: the credential is signed with key" in result.output
    assert "not verified" in result.output


def test_verify_with_the_secret_of_another_signing_is_refused(owner: dict) -> None:
    code, report = verify_json(
        [owner["signed"], "--credential", owner["cred"], "--reveal", owner["other_secret"]]
    )
    assert code == 1
    # The secret file names the credential it belongs to, so it is refused before its seed is used.
    assert report["problems"] == [
        "the revealed secret file is not for this credential (its credential_sha256 is not "
        "the SHA-256 of the credential file)"
    ]
    assert report["evidence"] == []
    assert report["verdict"]["verified"] is False
    assert "not for this credential" in report["verdict"]["reason"]


def test_verify_with_a_tampered_credential_is_refused(owner: dict, tmp_path: Path) -> None:
    raw = owner["cred"].read_bytes()
    anchor = raw.index(b'"fingerprint_after":"') + len(b'"fingerprint_after":"')
    tampered = bytearray(raw)
    tampered[anchor] = ord("0") if raw[anchor] != ord("0") else ord("1")
    path = tmp_path / "tampered.cred.json"
    path.write_bytes(bytes(tampered))
    assert sum(a != b for a, b in zip(raw, tampered, strict=True)) == 1
    result = invoke(["verify", owner["signed"], "--credential", path, "--key", owner["key"]])
    assert result.exit_code == 1, result.output
    assert "credential invalid" in result.output
    assert "INVALID" in result.output


def test_a_tampered_credential_discredits_even_strong_topology_evidence(
    owner: dict, tmp_path: Path
) -> None:
    doc = json.loads(owner["cred"].read_text())
    doc["owner"] = "mallory@example.org"
    path = tmp_path / "claimed.cred.json"
    path.write_text(json.dumps(doc))
    code, report = verify_json(
        [
            owner["signed"],
            "--credential",
            path,
            "--key",
            owner["key"],
            "--reference",
            owner["signed"],
            # Two null masks can tie (their spread is a few dozen shared entries), leaving z
            # undefined; six cannot all tie.
            "--null-samples",
            "6",
        ]
    )
    assert code == 1
    # The topology evidence is still shown, far out in its null's tail...
    assert _evidence(report, "W1 topology")["details"]["z"] > 30
    # ...but a credential that fails its own checks means not verified.
    assert report["credential"]["valid"] is False
    assert report["verdict"]["verified"] is False
    assert report["verdict"]["reason"].startswith("not verified: credential invalid")


def test_a_reference_other_than_the_credentials_ticket_is_a_note(owner: dict) -> None:
    code, report = verify_json(
        [
            owner["signed"],
            "--credential",
            owner["cred"],
            "--key",
            owner["key"],
            "--reference",
            owner["parent"],
            *FAST_W1,
        ]
    )
    assert code == 0
    assert report["problems"] == []
    assert report["notes"] == [
        "the reference ticket is not the ticket this credential was issued for",
        rule_note(VerifyConfig()),
    ]
    assert _evidence(report, "W2 bits")["details"]["matched"] == 1020
    assert _evidence(report, "W2 payload")["valid"] is True


def test_verify_pinned_to_someone_elses_public_key_is_refused(owner: dict) -> None:
    args = [owner["signed"], "--credential", owner["cred"], "--reveal", owner["secret"]]
    code, report = verify_json([*args, "--public-key", owner["bob_pub"]])
    assert code == 1
    assert any("not the owner's key" in p for p in report["problems"]), report["problems"]
    assert report["verdict"]["verified"] is False


def test_the_unsigned_parent_is_not_verified(owner: dict) -> None:
    code, report = verify_json(
        [owner["parent"], "--credential", owner["cred"], "--key", owner["key"]]
    )
    assert code == 1
    bits = _evidence(report, "W2 bits")
    assert bits["details"]["matched"] < 1024 * 0.6
    assert bits["log10_p"] > -6
    assert _evidence(report, "W2 payload")["valid"] is False
    assert report["verdict"]["verified"] is False


def _signed_state(owner: dict) -> dict[str, torch.Tensor]:
    return dict(load_ticket(owner["signed"]).trained)


def _permuted_state(owner: dict, seed: int = 3) -> dict[str, torch.Tensor]:
    structure = structure_of("digits_cnn", 10, (1, 8, 8), {"width": 32})
    perm = structure.random_permutation(np.random.default_rng(seed))
    return structure.permute_state(_signed_state(owner), perm)


@pytest.mark.parametrize("fmt", ["torch.save", "safetensors"])
def test_a_channel_permuted_copy_verifies_only_with_the_reference(
    owner: dict, tmp_path: Path, fmt: str
) -> None:
    state = _permuted_state(owner)
    if fmt == "torch.save":
        suspect = tmp_path / "stolen.pt"
        torch.save(state, suspect)
    else:
        suspect = tmp_path / "stolen.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(suspect))
    cred = ["--credential", owner["cred"], "--key", owner["key"]]
    code, report = verify_json([suspect, *cred, "--reference", owner["signed"], *FAST_W1])
    assert code == 0
    assert report["alignment"]["moved_channels"] > 0
    assert _evidence(report, "W2 bits")["details"]["matched"] == 1020
    assert _evidence(report, "W2 payload")["valid"] is True
    w1 = _evidence(report, "W1 topology")
    assert w1["details"]["score"] == pytest.approx(1.0)
    assert set(report["mask_sources"].values()) == {ZERO_PATTERN}
    # By position alone, the permuted bits are noise.
    code, report = verify_json([suspect, *cred])
    assert code == 1
    bits = _evidence(report, "W2 bits")
    assert bits["details"]["matched"] < 1024 * 0.6
    assert _evidence(report, "W2 payload")["valid"] is False
    # --no-align with the reference reads by position too.
    code, report = verify_json(
        [suspect, *cred, "--reference", owner["signed"], "--no-align", *FAST_W1]
    )
    assert code == 1
    assert report["alignment"] is None


def test_a_densely_fine_tuned_copy_verifies_by_top_magnitude(owner: dict, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {
        k: v + 1e-4 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in _signed_state(owner).items()
    }
    assert all((state[n] != 0).all() for n in LAYERS)  # no zero left to read the mask from
    suspect = tmp_path / "finetuned.pt"
    torch.save(state, suspect)
    code, report = verify_json([suspect, "--credential", owner["cred"], "--key", owner["key"]])
    assert code == 0
    assert report["mask_sources"] == {n: TOP_MAGNITUDE for n in LAYERS}
    bits = _evidence(report, "W2 bits")
    assert bits["details"]["matched"] >= 1000
    assert bits["log10_p"] < -30
    assert _evidence(report, "W2 payload")["valid"] is True


def test_a_permuted_and_fine_tuned_copy_verifies_with_the_reference(
    owner: dict, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(1)
    state = {
        k: v + 1e-4 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in _permuted_state(owner, seed=4).items()
    }
    suspect = tmp_path / "both.pt"
    torch.save(state, suspect)
    report = api.verify(
        suspect,
        credential=owner["cred"],
        reveal=owner["secret"],
        reference=owner["signed"],
        # Ten null masks: the spread of two is too noisy to put z anywhere in particular.
        config=VerifyConfig(null_samples=10),
    )
    assert report.verified
    names = [e.name for e in report.evidences]
    assert names == ["W1 topology", "W2 bits", "W2 payload"]
    assert report.evidences[1].details["matched"] >= 1000
    # W1 is far out in the random-mask null's tail, but that null is reported, never judged.
    assert report.evidences[0].details["z"] > 30
    assert report.evidences[0].log10_p is None
    assert report.evidences[0].details["nulls"][0]["p_empirical"] == pytest.approx(1 / 11)


def test_w1_decides_only_against_independent_tickets(
    owner: dict, make_ticket, tmp_path: Path
) -> None:
    """W1 alone: random masks never decide; four independently found tickets can."""
    nulls = []
    for seed in range(11, 15):
        path = tmp_path / f"independent{seed}.ticket"
        _owner_ticket(make_ticket, seed=seed).save(path)
        nulls.append(path)
    stolen = tmp_path / "stolen.pt"
    torch.save(_permuted_state(owner, seed=2), stolen)
    alone = api.verify(stolen, reference=owner["signed"], config=VerifyConfig(null_samples=20))
    assert not alone.verified
    assert alone.evidences[0].log10_p is None
    assert alone.verdict.tests == 0
    assert "cannot tell tickets found from the same initialisation apart" in alone.evidences[0].null
    # Four null tickets decide at alpha (a claim proven to predate the suspect)...
    config = VerifyConfig(null_samples=3, security_bits=0)
    decided = api.verify(stolen, reference=owner["signed"], null_tickets=nulls, config=config)
    assert decided.verified, decided.verdict.reason
    assert "4 independently found tickets" in decided.evidences[0].null
    assert "Student-t" in decided.evidences[0].null
    # ...but a Student-t bound with 3 degrees of freedom cannot reach 2^-128: the reference is
    # the claimant's own file, so W1 alone does not stand against a claimant who can retry.
    secure = api.verify(
        stolen, reference=owner["signed"], null_tickets=nulls, config=VerifyConfig(null_samples=3)
    )
    assert not secure.verified
    assert secure.evidences[0].log10_p == decided.evidences[0].log10_p
    assert secure.evidences[0].log10_p > secure.verdict.threshold_log10
    assert "a forger reaches it in about 2^" in secure.verdict.reason
    other = tmp_path / "other.ticket"
    _owner_ticket(make_ticket, seed=30).save(other)
    unrelated = api.verify(other, reference=owner["signed"], null_tickets=nulls, config=config)
    assert not unrelated.verified
    assert unrelated.evidences[0].log10_p > -3
    with pytest.raises(ConfigError, match="at least 2"):
        api.verify(stolen, reference=owner["signed"], null_tickets=nulls[:1])
    code = invoke(
        ["verify", str(stolen), "--reference", str(owner["signed"]), "--null-ticket", str(nulls[0])]
    ).exit_code
    assert code == 2


def test_verify_json_report_shape(owner: dict) -> None:
    code, report = verify_json(
        [
            owner["signed"],
            "--credential",
            owner["cred"],
            "--key",
            owner["key"],
            "--reference",
            owner["signed"],
            *FAST_W1,
        ]
    )
    assert code == 0
    assert set(report) >= {"suspect", "credential", "evidence", "verdict", "problems", "w1"}
    assert report["suspect"]["format"] == "ticket"
    assert [e["name"] for e in report["evidence"]] == ["W1 topology", "W2 bits", "W2 payload"]
    for e in report["evidence"]:
        assert set(e) >= {"name", "kind", "summary", "log10_p", "p", "null", "valid"}
    assert report["verdict"]["tests"] == 1  # the W2 bits; W1 against random masks is not judged
    assert report["verdict"]["threshold_log10"] == pytest.approx(-128 * np.log10(2))
    assert report["verdict"]["security_bits"] == 128
    w1 = report["w1"]
    assert w1["score"] == pytest.approx(1.0)
    assert w1["nulls"][0]["samples"] == 2
    assert w1["layers"] == LAYERS


# --- verify: usage and input errors (exit code 2) ------------------------------------------------


def test_verify_usage_errors(owner: dict, tmp_path: Path) -> None:
    line = error_line(invoke(["verify", owner["signed"], "--credential", owner["cred"]]), 2)
    assert line == "Error: --credential needs --key (the owner) or --reveal (a judge)"
    line = error_line(invoke(["verify", owner["signed"]]), 2)
    assert line == "Error: give --credential (with --key or --reveal), --reference, or both"
    line = error_line(
        invoke(["verify", owner["signed"], "--key", owner["key"], "--reference", owner["signed"]]),
        2,
    )
    assert line == "Error: --key and --reveal verify a credential: give --credential too"
    cred = ["--credential", owner["cred"], "--key", owner["key"]]
    line = error_line(
        invoke(["verify", owner["signed"], *cred, "--null-ticket", owner["parent"]]), 2
    )
    assert line == "Error: --null-ticket needs --reference"
    line = error_line(invoke(["verify", owner["signed"], *cred, "--alpha", "2"]), 2)
    assert "alpha" in line
    missing = tmp_path / "missing.pt"
    line = error_line(invoke(["verify", missing, *cred]), 2)
    assert "missing.pt" in line and "does not exist" in line
    # A file that exists but is no model is an input error too.
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    line = error_line(invoke(["verify", junk, *cred]), 2)
    assert str(junk) in line


def test_verify_suspect_of_another_architecture_is_an_input_error(
    owner: dict, tmp_path: Path
) -> None:
    from ticketguard.tickets.models import DigitsCNN

    suspect = tmp_path / "small.pt"
    torch.save(DigitsCNN(width=4).state_dict(), suspect)
    result = invoke(["verify", suspect, "--reference", owner["signed"], *FAST_W1])
    line = error_line(result, 2)
    assert line == (
        f"Error: {suspect}: 'conv2.weight' has shape (8, 4, 3, 3), the reference (64, 32, 3, 3)"
    )
    resnet = tmp_path / "resnet.pt"
    from ticketguard.tickets.models import build_model

    torch.save(build_model("resnet20", 10).state_dict(), resnet)
    line = error_line(invoke(["verify", resnet, "--reference", owner["signed"]]), 2)
    assert "has no weight 'conv2.weight' of the reference ticket" in line


def test_verify_library_refuses_incomplete_requests(owner: dict) -> None:
    with pytest.raises(ConfigError, match="give a credential"):
        verify(owner["signed"])
    with pytest.raises(ConfigError, match="needs the owner's key"):
        verify(owner["signed"], credential=owner["cred"])
    with pytest.raises(ConfigError, match="needs the owner's key"):
        api.verify(owner["signed"], credential=owner["cred"])
    with pytest.raises(ConfigError, match="alpha"):
        VerifyConfig(alpha=0)
    with pytest.raises(ConfigError, match="at least 2"):
        VerifyConfig(null_samples=1)
    for bits in (-1, 4097, True, 1.5, "128"):
        with pytest.raises(ConfigError, match="security_bits"):
            VerifyConfig(security_bits=bits)  # type: ignore[arg-type]
    assert VerifyConfig().security_bits == 128
    assert VerifyConfig(security_bits=0).security_bits == 0
    assert VerifyConfig(security_bits=4096).security_bits == 4096


def test_verify_survives_a_credential_with_absurd_layer_shapes(owner: dict, tmp_path: Path) -> None:
    from ticketguard.signatures.credential import make_credential, write_credential

    key = read_private_key(owner["key"])
    doc = json.loads(owner["cred"].read_text())
    embedding = doc["embedding"]
    embedding["layers"][0]["shape"] = [2**32, 2**32]
    forged = make_credential(
        key,
        created=doc["created"],
        fingerprint_before=doc["fingerprint_before"],
        fingerprint_after=doc["fingerprint_after"],
        architecture=doc["architecture"],
        embedding=embedding,
        seed=read_secret(owner["secret"]),
    )
    path = tmp_path / "forged.cred.json"
    write_credential(path, forged)
    result = invoke(["verify", owner["signed"], "--credential", path, "--key", owner["key"]])
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output


# --- thinning ------------------------------------------------------------------------------------


def test_thin_cli_writes_a_sparser_subset(owner: dict, tmp_path: Path) -> None:
    out = tmp_path / "thin.ticket"
    result = invoke(
        ["thin", owner["parent"], "--paths", "20", "--out", out, "--epochs", "0", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "removed 20 paths:" in result.output
    assert "accuracy: " in result.output and "after retraining" in result.output
    parent, thin = load_ticket(owner["parent"]), load_ticket(out)
    assert thin.mask.num_surviving < parent.mask.num_surviving
    assert thin.mask.is_subset_of(parent.mask)
    info = thin.metadata["thinning"]
    assert info["paths"] == 20 and info["walks"] == 20
    assert info["removed_weights"] == parent.mask.num_surviving - thin.mask.num_surviving
    assert info["parent_fingerprint"] == parent.fingerprint
    removed_kernels = sum(
        int((channel_connectivity(parent.mask[n]) & ~channel_connectivity(thin.mask[n])).sum())
        for n in LAYERS
    )
    assert info["removed_kernels"] == removed_kernels
    assert f"{removed_kernels} connections" in result.output
    # Thinning refuses to overwrite its input or an existing output.
    line = error_line(
        invoke(["thin", out, "--paths", "1", "--out", out, "--epochs", "0", "--device", "cpu"]), 1
    )
    assert "would overwrite the input ticket" in line
    line = error_line(
        invoke(
            ["thin", owner["parent"], "--paths", "1", "--out", out, "--epochs", "0"]
            + ["--device", "cpu"]
        ),
        1,
    )
    assert "already exists; pass --force" in line


def test_remove_paths_prunes_whole_walks(make_ticket) -> None:
    ticket = make_ticket(width=8, keep=0.5)
    structure = structure_of("digits_cnn", 10, (1, 8, 8), {"width": 8})
    before = {n: m.clone() for n, m in ticket.mask.items()}
    mask, walks = remove_paths(structure, ticket.mask, ticket.trained, 10, np.random.default_rng(0))
    assert all(torch.equal(ticket.mask[n], before[n]) for n in before)  # pure
    assert walks == 10
    assert mask.is_subset_of(ticket.mask)
    removed = {
        n: channel_connectivity(ticket.mask[n]) & ~channel_connectivity(mask[n]) for n in LAYERS
    }
    # A walk goes conv2 -> conv3 -> fc1: each layer loses at most one connection per walk, and
    # removed kernels are removed whole.
    for n in LAYERS:
        assert 1 <= int(removed[n].sum()) <= walks, n
        kernels = mask[n].reshape(*mask[n].shape[:2], -1)
        assert not kernels[removed[n]].any()
        kept = ~removed[n]
        old = ticket.mask[n].reshape(*ticket.mask[n].shape[:2], -1)
        assert torch.equal(kernels[kept], old[kept])
    again, _ = remove_paths(structure, ticket.mask, ticket.trained, 10, np.random.default_rng(0))
    assert again == mask
    none, zero = remove_paths(structure, ticket.mask, ticket.trained, 0, np.random.default_rng(0))
    assert none == ticket.mask and zero == 0
    with pytest.raises(ConfigError):
        remove_paths(structure, ticket.mask, ticket.trained, -1, np.random.default_rng(0))


# --- mask recovery and retraining ----------------------------------------------------------------


def test_top_magnitude_and_recover_mask(tmp_path: Path) -> None:
    w = torch.tensor([[0.5, -2.0, 0.1], [-0.5, 3.0, 0.0]])
    assert top_magnitude(w, 3).tolist() == [[True, True, False], [False, True, False]]
    assert top_magnitude(w, 0).sum() == 0
    assert top_magnitude(w, 99).all()
    state = {
        "a.weight": torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
        "b.weight": torch.tensor([[1.0, 0.2], [0.1, 2.0]]),
        "b.bias": torch.tensor([1.0, 0.0]),
    }
    path = tmp_path / "s.pt"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    mask, sources = recover_mask(loaded, ["a.weight", "b.weight", "b.bias", "c.weight"], None)
    assert sources == {"a.weight": ZERO_PATTERN, "b.weight": ZERO_PATTERN}
    mask, sources = recover_mask(loaded, ["a.weight", "b.weight"], {"a.weight": 2, "b.weight": 2})
    assert sources == {"a.weight": ZERO_PATTERN, "b.weight": TOP_MAGNITUDE}
    assert mask["b.weight"].tolist() == [[True, False], [False, True]]
    loaded.mask = Mask({"b.weight": torch.tensor([[False, True], [True, False]])})
    mask, sources = recover_mask(loaded, ["a.weight", "b.weight"], {"b.weight": 2})
    assert sources["b.weight"] == EXPLICIT
    assert mask["b.weight"].tolist() == [[False, True], [True, False]]


def test_starting_state_revives_from_rewind(make_ticket) -> None:
    ticket = make_ticket(width=4, keep=0.5)
    flipped = Mask({n: ~m for n, m in ticket.mask.items()})
    state = starting_state(ticket, flipped, "trained")
    for n, m in flipped.items():
        torch.testing.assert_close(state[n][m], ticket.rewind[n][m])
        assert not state[n][~m].any()
    kept = Mask(dict(ticket.mask))
    state = starting_state(ticket, kept, "trained")
    for n in kept:
        torch.testing.assert_close(state[n], ticket.trained[n])
    state = starting_state(ticket, kept, "rewind")
    for n, m in kept.items():
        torch.testing.assert_close(state[n], ticket.rewind[n] * m)
    with pytest.raises(ConfigError):
        RetrainConfig(epochs=-1)
    with pytest.raises(ConfigError):
        RetrainConfig(lr=0)
    with pytest.raises(ConfigError):
        RetrainConfig(start="scratch")


# --- the top-level package -----------------------------------------------------------------------


def test_top_level_api_entry_points() -> None:
    for name in ("keygen", "sign", "thin"):
        assert getattr(ticketguard, name) is getattr(api, name)
    for name in ("keygen", "sign", "thin", "verify"):
        assert name in ticketguard.__all__
    with pytest.raises(AttributeError):
        ticketguard.no_such_thing  # noqa: B018


def test_top_level_verify_calls_the_api_whatever_was_imported(owner: dict) -> None:
    import ticketguard.verify.verification  # noqa: F401 (what any verification imports)
    from ticketguard.verify import stats  # the sub-package still works as a package

    assert callable(ticketguard.verify)
    assert stats.binomial_log10_tail(10, 10, 0.5) == pytest.approx(-3.0103, abs=1e-4)
    with pytest.raises(ConfigError, match="give a credential"):
        ticketguard.verify(owner["signed"])
    report = ticketguard.verify(owner["signed"], credential=owner["cred"], key=owner["key"])
    assert report.verified


def test_library_keygen_sign_verify_round_trip(make_ticket, tmp_path: Path) -> None:
    key_path, pub_path = ticketguard.keygen("dave@example.org", tmp_path / "dave")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    ticket_path = tmp_path / "t.ticket"
    _owner_ticket(make_ticket, seed=5).save(ticket_path)
    result = ticketguard.sign(
        ticket_path,
        key_path,
        tmp_path / "signed.ticket",
        config=SignConfig(retrain=RetrainConfig(epochs=0)),
        device="cpu",
    )
    assert result.params.num_bits == 1024
    report = api.verify(
        tmp_path / "signed.ticket",
        credential=tmp_path / "signed.cred.json",
        key=key_path,
        public_key=pub_path,
    )
    assert report.verified
    assert report.to_dict()["verdict"]["verified"] is True
    report = api.verify(ticket_path, credential=tmp_path / "signed.cred.json", key=key_path)
    assert not report.verified


def test_a_walk_through_a_residual_network_moves_forward_one_path() -> None:
    """On ResNet-20 a walk is one chain of kernels, each read by a later layer than the last.

    A residual stream is read by the block that wrote it too; a walk that could go back to it
    would loop until the stream's kernels ran out.
    """
    structure = structure_of("resnet20", 10, (3, 32, 32))
    model = build_model("resnet20", 10)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(0)
    names = default_pruned_parameters(model)
    mask = Mask({n: torch.rand(state[n].shape, generator=gen) < 0.3 for n in names})
    classes = structure.tie_class
    order = list(structure.layers)
    for seed in range(5):
        new, walks = remove_paths(structure, mask, state, 1, np.random.default_rng(seed))
        assert walks == 1
        steps = []
        for n in names:
            removed = channel_connectivity(mask[n]) & ~channel_connectivity(new[n])
            assert int(removed.sum()) <= 1, n
            if removed.any():
                o, i = (int(v) for v in torch.nonzero(removed)[0])
                steps.append((order.index(n), n, o, i))
        steps.sort()
        assert len(steps) >= 2
        for (_, a, o, _), (_, b, _, i) in zip(steps, steps[1:], strict=False):
            out_class = classes[structure.layers[a].out_start + o]
            assert classes[structure.layers[b].in_nodes[i]] == out_class, (a, b)


def test_resnet20_permuted_signed_copy_verifies_only_with_alignment(tmp_path: Path) -> None:
    """Residual streams (option-A shortcuts) move together under alignment, and W2 survives it."""
    from ticketguard.signatures.credential import write_credential
    from ticketguard.signatures.keys import generate_key
    from ticketguard.signatures.signing import sign_without_data
    from ticketguard.tickets.ticket import Ticket

    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    rewind = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    mask = Mask(
        {
            n: torch.rand(rewind[n].shape, generator=gen) < 0.2
            for n in default_pruned_parameters(model)
        }
    )
    trained = {k: v.clone() for k, v in rewind.items()}
    mask.apply_(trained)
    meta = {
        "architecture": {"name": "resnet20", "kwargs": {}},
        "num_classes": 10,
        "input_shape": [3, 32, 32],
    }
    ticket = Ticket(mask, trained, rewind, meta)
    key = generate_key("erin@example.org")
    result = sign_without_data(ticket, key, created="2026-01-01T00:00:00Z")
    signed = result.ticket
    assert all(int(signed.mask[n].sum()) == int(mask[n].sum()) for n in mask)
    signed.save(tmp_path / "signed.ticket")
    write_credential(tmp_path / "signed.cred.json", result.credential)
    structure = structure_of("resnet20", 10, (3, 32, 32))
    perm = structure.random_permutation(np.random.default_rng(4))
    stolen = structure.permute_state(signed.trained, perm)
    torch.save(stolen, tmp_path / "stolen.pth")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    copy = build_model("resnet20", 10)
    copy.load_state_dict(stolen)
    with torch.no_grad():
        torch.testing.assert_close(copy.eval()(x), signed.build_model()(x), rtol=1e-4, atol=1e-4)

    config = VerifyConfig(null_samples=5)
    cred = tmp_path / "signed.cred.json"
    plain = verify(tmp_path / "stolen.pth", credential=cred, key=key, config=config)
    assert not plain.verified
    aligned = verify(
        tmp_path / "stolen.pth",
        credential=cred,
        key=key,
        reference=tmp_path / "signed.ticket",
        config=config,
    )
    assert aligned.verified, aligned.verdict.reason
    bits = next(e for e in aligned.evidences if e.name == "W2 bits")
    assert bits.details["matched"] == bits.details["bits"]
    assert next(e for e in aligned.evidences if e.name == "W2 payload").valid


def test_an_all_ones_explicit_mask_does_not_hide_the_signature(owner: dict, tmp_path: Path) -> None:
    """The signed weights shipped as a prune checkpoint whose masks keep everything still verify."""
    signed = load_ticket(owner["signed"])
    state = {}
    for name, tensor in signed.trained.items():
        if name in signed.mask:
            base = name[: -len(".weight")]
            state[f"{base}.weight_orig"] = tensor.clone()
            state[f"{base}.weight_mask"] = torch.ones_like(tensor)
        else:
            state[name] = tensor.clone()
    path = tmp_path / "evade.pth"
    torch.save({"state_dict": state}, path)
    report = verify(path, credential=owner["cred"], key=read_private_key(owner["key"]))
    assert report.verified, report.verdict.reason
    bits = next(e for e in report.evidences if e.name == "W2 bits")
    assert bits.details["matched"] == bits.details["bits"]
    # The same weights quantised to int8 keep their zero pattern, hence the signature.
    quantised = {
        k: (v / v.abs().max().clamp_min(1e-12) * 127).round().to(torch.int8)
        if k in signed.mask
        else v
        for k, v in signed.trained.items()
    }
    torch.save(quantised, tmp_path / "int8.pth")
    report = verify(
        tmp_path / "int8.pth", credential=owner["cred"], key=read_private_key(owner["key"])
    )
    assert next(e for e in report.evidences if e.name == "W2 bits").details["erased"] == 0
    assert report.verified, report.verdict.reason


def test_null_tickets_from_other_initial_weights_are_refused(
    owner: dict, make_ticket, tmp_path: Path
) -> None:
    reference = load_ticket(owner["signed"])
    reference.metadata["finding"] = {"config": {"seed": 0}}
    reference.save(tmp_path / "ref.ticket")
    nulls = []
    for seed in (1, 2):
        ticket = _owner_ticket(make_ticket, seed=20 + seed)
        ticket.metadata["finding"] = {"config": {"seed": seed}}
        ticket.save(tmp_path / f"null{seed}.ticket")
        nulls.append(tmp_path / f"null{seed}.ticket")
    with pytest.raises(ConfigError, match="other initial weights"):
        api.verify(owner["signed"], reference=tmp_path / "ref.ticket", null_tickets=nulls)


def test_signing_leaves_no_kept_weight_at_exactly_zero(make_ticket, tmp_path: Path) -> None:
    """Without rewind weights, switched-on entries would be zero and vanish from a plain copy."""
    from ticketguard.signatures.keys import generate_key
    from ticketguard.signatures.signing import sign_without_data
    from ticketguard.tickets.ticket import Ticket

    base = _owner_ticket(make_ticket, seed=8)
    ticket = Ticket(base.mask, base.trained, {}, base.metadata)
    key = generate_key("frank@example.org")
    result = sign_without_data(ticket, key)
    for name, m in result.ticket.mask.items():
        assert bool((result.ticket.trained[name][m] != 0).all()), name
    assert result.ticket.metadata["accuracy"]["test"] is None  # not measured
    plain = tmp_path / "plain.pt"
    torch.save(result.ticket.trained, plain)
    cred = tmp_path / "c.cred.json"
    from ticketguard.signatures.credential import write_credential

    write_credential(cred, result.credential)
    report = verify(plain, credential=cred, key=key)
    assert report.verified
    assert next(e for e in report.evidences if e.name == "W2 bits").details["matched"] == 1020


def test_top_magnitude_recovery_stays_inside_the_explicit_mask(owner: dict) -> None:
    from ticketguard.tickets.loading import LoadedCheckpoint

    signed = load_ticket(owner["signed"])
    name = "fc1.weight"
    weight = signed.trained[name].clone()
    hidden = torch.zeros_like(signed.mask[name])
    hidden.view(-1)[::3] = True
    explicit = signed.mask[name] & ~hidden
    weight[hidden & ~signed.mask[name]] = float("inf")
    weight[hidden & ~signed.mask[name]][::2] = float("nan")
    loaded = LoadedCheckpoint(
        Path("x.pt"), "pytorch", {name: weight}, Mask({name: explicit}), None, {}, []
    )
    count = int(explicit.sum()) // 2
    mask, sources = recover_mask(loaded, [name], {name: count})
    assert sources[name] == TOP_MAGNITUDE
    assert int(mask[name].sum()) == count
    assert not bool((mask[name] & ~explicit).any())


def test_w1_alone_is_reported_not_judged_in_the_table(owner: dict) -> None:
    result = invoke(["verify", owner["signed"], "--reference", owner["signed"], *FAST_W1])
    assert result.exit_code == 1, result.output
    assert "not judged" in result.output
    assert "Traceback" not in result.output and "Error" not in result.output
