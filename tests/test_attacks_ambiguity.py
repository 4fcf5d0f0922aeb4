"""Ambiguity attacks (forge, fake triggers, overwrite, key search), disputes, and the attack and
dispute commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import error_line, invoke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticketguard.attacks.base import run_attack
from ticketguard.attacks.outputs import write_result
from ticketguard.signatures.credential import read_credential, read_secret_document
from ticketguard.signatures.keys import OwnerKey, write_keypair
from ticketguard.signatures.signing import SignConfig, sign_ticket, write_signed
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.tickets.retrain import RetrainConfig
from ticketguard.tickets.ticket import Ticket, load_ticket
from ticketguard.tickets.training import resolve_device
from ticketguard.verify.dispute import Claim, dispute

ALICE = OwnerKey("alice@example.org", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
BOB = OwnerKey("bob@example.org", Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
NO_TRAINING = {"recover_epochs": 0, "trigger": "none"}


def _ticket(make_ticket, seed: int) -> Ticket:
    t = make_ticket(width=32, keep=0.3, seed=seed)
    t.metadata.update({"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]})
    return t


def _sign(ticket: Ticket, key: OwnerKey, out: Path) -> dict[str, Path]:
    result = sign_ticket(
        ticket,
        key,
        SignConfig(retrain=RetrainConfig(epochs=0)),
        device=resolve_device("cpu"),
        created="2026-01-01T00:00:00Z",
    )
    write_signed(result, out)
    stem = out.with_suffix("")
    return {
        "ticket": out,
        "cred": stem.with_suffix(".cred.json"),
        "secret": stem.with_suffix(".secret.json"),
    }


@pytest.fixture(scope="module")
def owner(make_ticket, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Alice's signed ticket (W2, no retraining), its credential and secret, and her key."""
    root = tmp_path_factory.mktemp("owner")
    files = _sign(_ticket(make_ticket, 0), ALICE, root / "alice.ticket")
    write_keypair(ALICE, root / "alice")
    return {**files, "key": root / "alice.key", "root": root}


@pytest.fixture(scope="module")
def forged(owner: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The thief's forged claim on Alice's ticket, written by `ticketguard attack forge`."""
    out = tmp_path_factory.mktemp("thief") / "forged.ticket"
    result = invoke(
        [
            "attack",
            "forge",
            owner["ticket"],
            "--out",
            out,
            "--recover-epochs",
            0,
            "--trigger",
            "none",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    return {
        "ticket": out,
        "cred": out.with_name("forged.cred.json"),
        "secret": out.with_name("forged.secret.json"),
    }


def _claim(files: dict[str, Path], label: str | None = None) -> Claim:
    return Claim(files["cred"], files["secret"], files["ticket"], label)


# --- forge ---------------------------------------------------------------------------------------


def test_forge_signs_the_stolen_ticket_under_the_attackers_key(owner, forged):
    cred = read_credential(forged["cred"])
    assert cred.valid
    assert cred.document["owner"] == "mallory@example.org"
    assert cred.public_key.key_id() != ALICE.public_key.key_id()
    stolen, copy = load_ticket(owner["ticket"]), load_ticket(forged["ticket"])
    for name in stolen.mask:
        assert int(copy.mask[name].sum()) == int(stolen.mask[name].sum())
    assert copy.metadata["signature"]["owner"] == "mallory@example.org"


def test_forge_is_deterministic_given_the_seed(owner, monkeypatch):
    # The claim's creation time is the clock's unless SOURCE_DATE_EPOCH fixes it.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1795000000")
    stolen = load_ticket(owner["ticket"])
    a = run_attack("forge", stolen, NO_TRAINING, seed=4)
    b = run_attack("forge", stolen, NO_TRAINING, seed=4)
    c = run_attack("forge", stolen, NO_TRAINING, seed=5)
    assert a.ticket.mask == b.ticket.mask
    assert a.details["key_id"] == b.details["key_id"] != c.details["key_id"]


# --- disputes ------------------------------------------------------------------------------------


def test_the_dispute_names_the_true_owner_in_either_order(owner, forged):
    first = dispute([_claim(owner), _claim(forged)])
    assert first.winner == 0
    assert first.matrix[0][1]["precedence"]  # Alice's mark is in the forged copy
    assert not first.matrix[1][0]["verified"]  # the thief's mark is not in Alice's model
    assert first.matrix[1][1]["verified"]
    assert any("it is the original" in line for line in first.reasoning)
    swapped = dispute([_claim(forged), _claim(owner)])
    assert swapped.winner == 1


def test_independent_owners_are_undecided(make_ticket, owner, tmp_path):
    bob = _sign(_ticket(make_ticket, 7), BOB, tmp_path / "bob.ticket")
    result = dispute([_claim(owner), _claim(bob)])
    assert result.winner is None
    assert result.matrix[0][0]["verified"] and result.matrix[1][1]["verified"]
    assert not result.matrix[0][1]["verified"] and not result.matrix[1][0]["verified"]
    assert "independent" in result.reasoning[-1]


def test_the_same_credential_twice_is_refused(owner):
    from ticketguard.errors import ConfigError

    with pytest.raises(ConfigError, match="same credential is given in claims 1 and 2"):
        dispute([_claim(owner), _claim(owner)])


def test_dispute_command_prints_the_matrix_and_exits_0_when_decided(owner, forged, tmp_path):
    report = tmp_path / "dispute.json"
    args = ["dispute", "--claim", owner["cred"], owner["secret"], owner["ticket"]]
    args += ["--claim", forged["cred"], forged["secret"], forged["ticket"], "--json", report]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "Decision: claim 1 (alice@example.org) came first" in result.output
    data = json.loads(report.read_text())
    assert data["winner"] == 0 and data["winner_owner"] == "alice@example.org"
    assert len(data["matrix"]) == 2 and len(data["matrix"][0]) == 2


def test_dispute_command_errors(owner, tmp_path):
    one = ["dispute", "--claim", owner["cred"], owner["secret"], owner["ticket"]]
    assert "at least two --claim" in error_line(invoke(one), 2)
    missing = one + ["--claim", tmp_path / "nope.json", owner["secret"], owner["ticket"]]
    assert "does not exist" in error_line(invoke(missing), 2)
    twice = one + ["--claim", owner["cred"], owner["secret"], owner["ticket"]]
    assert "same credential" in error_line(invoke(twice), 2)
    over = one + [
        "--claim",
        owner["cred"],
        owner["secret"],
        owner["ticket"],
        "--json",
        owner["cred"],
    ]
    assert "one of the claims' files" in error_line(invoke(over), 2)


# --- fake trigger sets ---------------------------------------------------------------------------


def test_a_fake_trigger_claim_is_imported_labelled_by_the_model_and_loses(signed_owner, tmp_path):
    """On the real digits ticket (shared with the acceptance tests): the fake set answers on the
    owner's own model too, but imported triggers never count for precedence."""
    owner = {
        "ticket": signed_owner["signed"],
        "cred": signed_owner["cred"],
        "secret": signed_owner["secret"],
    }
    stolen = load_ticket(owner["ticket"])
    params = {"size": 50, "candidates": 1000, "recover_epochs": 1}
    result = run_attack("fake-triggers", stolen, params, seed=0)
    triggers = result.claim.triggers
    assert triggers.source == "folder" and triggers.size == 50
    assert triggers.max_label_frequency() <= 0.2  # balanced as far as the model allows
    from ticketguard.signatures.signing import input_normalization

    mean, std = input_normalization(stolen)
    with torch.no_grad():
        predicted = stolen.build_model()(triggers.inputs(mean, std)).argmax(dim=1)
    assert torch.equal(predicted, triggers.labels)  # labels chosen after the fact
    write_result("fake-triggers", result, tmp_path / "fake.ticket")
    fake = {
        "ticket": tmp_path / "fake.ticket",
        "cred": tmp_path / "fake.cred.json",
        "secret": tmp_path / "fake.secret.json",
    }
    assert read_secret_document(fake["secret"])["trigger_set"]["source"] == "folder"
    decided = dispute([_claim(owner), _claim(fake)])
    assert decided.winner == 0
    assert decided.matrix[1][0]["verified"] and not decided.matrix[1][0]["precedence"]
    assert decided.matrix[1][0]["decisive"] == ["B1 triggers"]
    assert any("imported" in line for line in decided.reasoning)


# --- overwrite -----------------------------------------------------------------------------------


def test_overwrite_flips_connectivity_and_keeps_every_count(owner):
    stolen = load_ticket(owner["ticket"])
    result = run_attack("overwrite", stolen, {"fraction": 0.05, "epochs": 0}, seed=0)
    out = result.ticket
    flipped = 0
    for name in result.details["flipped_per_layer"]:
        before = channel_connectivity(stolen.mask[name])
        after = channel_connectivity(out.mask[name])
        assert int(out.mask[name].sum()) == int(stolen.mask[name].sum())
        flipped += int((before != after).sum())
    # Every chosen entry flips; the count restoration may flip a few more kernels elsewhere.
    assert flipped >= result.details["flipped"] > 0


def test_random_overwrite_swaps_entries_and_keeps_counts(owner):
    stolen = load_ticket(owner["ticket"])
    result = run_attack(
        "overwrite", stolen, {"fraction": 0.1, "target": "random", "epochs": 0}, seed=0
    )
    out = result.ticket
    changed = 0
    for name, m in stolen.mask.items():
        assert int(out.mask[name].sum()) == int(m.sum())
        changed += int((out.mask[name] != m).sum())
    assert changed == result.details["flipped"] > 0


# --- key search ----------------------------------------------------------------------------------


def test_key_search_counts_no_verified_keys_and_is_deterministic(owner):
    stolen = load_ticket(owner["ticket"])
    a = run_attack("key-search", stolen, {"tries": 30}, seed=0)
    b = run_attack("key-search", stolen, {"tries": 30}, seed=0)
    assert a.ticket is None
    assert a.details["tries"] == 30 and a.details["verified"] == 0
    assert a.details["smallest_log10_p"] == b.details["smallest_log10_p"]
    assert a.details["bound"] == pytest.approx(30e-6)
    assert -6 < a.details["smallest_log10_p"]["W2 bits"] < 0


def test_key_search_counts_chance_matches_at_a_loose_alpha(owner):
    """A sanity check of the counter: alpha close to 1 makes chance matches "verify"."""
    stolen = load_ticket(owner["ticket"])
    result = run_attack("key-search", stolen, {"tries": 20, "alpha": 0.5}, seed=0)
    assert result.details["verified"] > 0


# --- the attack command --------------------------------------------------------------------------


def test_attack_command_writes_the_attacked_model(owner, tmp_path):
    out = tmp_path / "pruned.ticket"
    result = invoke(["attack", "prune", owner["ticket"], "--rate", "0.5", "--out", out])
    assert result.exit_code == 0, result.output
    assert "attack: prune" in result.output and f"wrote {out}" in result.output
    pruned, stolen = load_ticket(out), load_ticket(owner["ticket"])
    assert pruned.mask.is_subset_of(stolen.mask)
    assert pruned.metadata["attack"]["params"]["rate"] == 0.5
    assert "signature" not in pruned.metadata


def test_attack_key_search_writes_a_json_report(owner, tmp_path):
    out = tmp_path / "search.json"
    result = invoke(["attack", "key-search", owner["ticket"], "--tries", "5", "--out", out])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["attack"] == "key-search" and data["details"]["tries"] == 5


def test_attack_command_errors_lose_nothing(owner, tmp_path):
    out = tmp_path / "x.ticket"
    bad = invoke(["attack", "prune", owner["ticket"], "--rate", "2", "--out", out])
    assert error_line(bad, 2) == "Error: attack parameter 'rate' must be <= 0.99, got 2.0"
    same = invoke(["attack", "noise", owner["ticket"], "--out", owner["ticket"]])
    assert "is an input; refusing to overwrite it" in error_line(same, 1)
    out.write_text("keep me")
    exists = invoke(["attack", "noise", owner["ticket"], "--out", out])
    assert "already exists; pass --force" in error_line(exists, 1)
    assert out.read_text() == "keep me"
    missing = invoke(["attack", "noise", tmp_path / "nope.ticket", "--out", tmp_path / "y.ticket"])
    assert "no such file" in error_line(missing, 1)
    unknown = invoke(["attack", "melt", owner["ticket"], "--out", out])
    assert unknown.exit_code == 2 and "No such command 'melt'" in unknown.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ticket"]


def test_attack_command_takes_a_plain_state_dict_with_arch(owner, tmp_path):
    stolen = load_ticket(owner["ticket"])
    plain = tmp_path / "stolen.pt"
    torch.save(stolen.trained, plain)
    out = tmp_path / "noisy.ticket"
    result = invoke(
        ["attack", "noise", plain, "--arch", "digits_cnn", "--arch-arg", "width=32", "--out", out]
    )
    assert result.exit_code == 0, result.output
    assert load_ticket(out).architecture == "digits_cnn"
    no_arch = invoke(["attack", "noise", plain, "--out", tmp_path / "z.ticket"])
    assert "records no architecture; pass --arch" in error_line(no_arch, 1)


def test_attack_help_lists_every_attack_and_its_parameters():
    from ticketguard.attacks.base import attack_names

    result = invoke(["attack", "--help"])
    assert result.exit_code == 0
    for name in attack_names():
        assert name in result.output
    prune = invoke(["attack", "prune", "--help"])
    for option in ("--method", "--scope", "--rate", "--seed", "--out"):
        assert option in prune.output
    assert invoke(["attack", "finetune", "--help"]).output.count("--reinit-last") == 1
