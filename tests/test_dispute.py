"""Disputes: the true owner wins against a forger in any order and any number of claims, forged,
fake-trigger and invalid claims never win, independent models stay undecided; the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import error_line, invoke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticketguard.attacks.base import AttackContext, run_attack
from ticketguard.attacks.outputs import write_result
from ticketguard.errors import ConfigError
from ticketguard.signatures.keys import OwnerKey
from ticketguard.signatures.signing import SignConfig, sign_ticket, write_signed
from ticketguard.tickets.retrain import RetrainConfig
from ticketguard.tickets.ticket import load_ticket
from ticketguard.tickets.training import resolve_device
from ticketguard.verify.dispute import Claim, dispute

ALICE = OwnerKey("alice@example.org", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
BOB = OwnerKey("bob@example.org", Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
CPU = AttackContext(device=resolve_device("cpu"))


def _files(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    return {
        "ticket": out,
        "cred": stem.with_suffix(".cred.json"),
        "secret": stem.with_suffix(".secret.json"),
    }


def _signed(make_ticket, seed: int, key: OwnerKey, out: Path, epochs: int) -> dict[str, Path]:
    """Sign a small digits ticket with W2 (trained `epochs` epochs while recovering)."""
    ticket = make_ticket(width=8, keep=0.3, seed=seed)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    result = sign_ticket(
        ticket,
        key,
        SignConfig(retrain=RetrainConfig(epochs=epochs)),
        device=resolve_device("cpu"),
        created="2026-01-01T00:00:00Z",
    )
    write_signed(result, out)
    return _files(out)


def _claim_of(name: str, model: Path, out: Path, params: dict, seed: int) -> dict[str, Path]:
    """Run a claim-making attack on a model file and write the attacker's claim."""
    result = run_attack(name, load_ticket(model), params, seed=seed, context=CPU)
    write_result(name, result, out)
    return _files(out)


def _claim(files: dict[str, Path]) -> Claim:
    return Claim(files["cred"], files["secret"], files["ticket"])


@pytest.fixture(scope="module")
def alice(make_ticket, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Alice's signed ticket, trained enough (two epochs) to label abstract images diversely."""
    root = tmp_path_factory.mktemp("alice")
    return _signed(make_ticket, 0, ALICE, root / "alice.ticket", epochs=2)


@pytest.fixture(scope="module")
def mallory(alice: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mallory's forged claim on Alice's model (her W2 written in, no retraining, backdated)."""
    out = tmp_path_factory.mktemp("mallory") / "mallory.ticket"
    params = {"recover_epochs": 0, "trigger": "none", "created": "2020-01-01T00:00:00Z"}
    return _claim_of("forge", alice["ticket"], out, params, 1)


# --- deciding ------------------------------------------------------------------------------------


def test_the_true_owner_wins_against_a_forger_in_either_order(alice, mallory):
    result = dispute([_claim(alice), _claim(mallory)], blackbox=False)
    assert result.winner == 0
    assert result.decision == "claim 1 (alice@example.org) came first"
    # Alice's W2 mark is in both models, Mallory's only in her own.
    assert [[c["precedence"] for c in row] for row in result.matrix] == [
        [True, True],
        [False, True],
    ]
    assert "W2 bits" in result.matrix[0][1]["precedence_evidence"]
    assert any("it is the original" in line for line in result.reasoning)
    assert any("W2 bits p = " in line for line in result.reasoning)
    assert any("self-asserted" in note for note in result.notes)
    assert [c["owner"] for c in result.claims] == ["alice@example.org", "mallory@example.org"]
    # Mallory's credential says it is six years older than Alice's; that decides nothing.
    assert [c["created"] for c in result.claims] == ["2026-01-01T00:00:00Z", "2020-01-01T00:00:00Z"]
    swapped = dispute([_claim(mallory), _claim(alice)], blackbox=False)
    assert swapped.winner == 1
    assert swapped.decision == "claim 2 (alice@example.org) came first"
    document = swapped.to_dict()
    assert document["winner_owner"] == "alice@example.org"
    json.dumps(document)  # JSON-safe as it is


def test_a_chain_of_thefts_is_traced_to_its_origin(alice, mallory, tmp_path):
    """Alice -> Mallory -> Eve: only Alice's model carries no other mark (3 x 3 matrix)."""
    eve = _claim_of(
        "forge",
        mallory["ticket"],
        tmp_path / "eve.ticket",
        {"owner": "eve@example.org", "recover_epochs": 0, "trigger": "none"},
        2,
    )
    result = dispute([_claim(eve), _claim(mallory), _claim(alice)], blackbox=False)
    marks = [[c["precedence"] for c in row] for row in result.matrix]
    assert marks == [[True, False, False], [True, True, False], [True, True, True]]
    assert result.winner == 2
    assert result.claims[2]["owner"] == "alice@example.org"


def test_independent_owners_are_undecided(make_ticket, alice, tmp_path):
    bob = _signed(make_ticket, 7, BOB, tmp_path / "bob.ticket", epochs=0)
    result = dispute([_claim(alice), _claim(bob)], blackbox=False)
    assert result.winner is None
    assert result.decision == "undecided — the models are independent"
    assert result.matrix[0][0]["verified"] and result.matrix[1][1]["verified"]
    assert not result.matrix[0][1]["verified"] and not result.matrix[1][0]["verified"]
    assert "independent" in result.reasoning[-1]


def test_an_invalid_credential_cannot_win_and_the_thief_does_not_either(alice, mallory, tmp_path):
    doc = json.loads(alice["cred"].read_text())
    doc["owner"] = "alice@evil.example"  # the credential's own signature no longer verifies
    tampered = tmp_path / "alice.cred.json"
    tampered.write_text(json.dumps(doc))
    claims = [Claim(tampered, alice["secret"], alice["ticket"]), _claim(mallory)]
    result = dispute(claims, blackbox=False)
    assert result.winner is None
    assert not result.claims[0]["valid"]
    assert not any(result.matrix[0][j]["precedence"] for j in range(2))
    assert any("the credential is invalid" in line for line in result.reasoning)
    assert result.decision == (
        "undecided — no claim that can win has its mark in another claimed model"
    )


def test_a_fake_trigger_claim_is_labelled_by_the_model_and_loses(alice, tmp_path):
    """The fake set answers on Alice's own model too, but imported triggers never count."""
    params = {"size": 40, "candidates": 400, "recover_epochs": 0}
    result = run_attack("fake-triggers", load_ticket(alice["ticket"]), params, seed=0, context=CPU)
    write_result("fake-triggers", result, tmp_path / "fake.ticket")
    fake = _files(tmp_path / "fake.ticket")
    assert json.loads(fake["cred"].read_text())["trigger_set"]["source"] == "folder"
    decided = dispute([_claim(alice), _claim(fake)])
    assert decided.claims[1]["trigger_source"] == "folder"
    assert decided.winner == 0
    in_alice = decided.matrix[1][0]
    # The fake set answers on Alice's model, yet an imported set is reported, never judged.
    (b1,) = [e for e in in_alice["evidence"] if e["name"] == "B1 triggers"]
    assert b1["judged"] is False and b1["log10_p"] < -10
    assert not in_alice["verified"] and not in_alice["precedence"]
    assert in_alice["decisive"] == []
    assert any("imported" in line and "does not count" in line for line in decided.reasoning)
    assert any(
        "B1 triggers p = " in line
        and "in claim 1 (alice@example.org)'s model does not count: an imported trigger set" in line
        for line in decided.reasoning
    )
    # Alice's mark is in the fake claim's model; Mallory's W2 is only in her own.
    assert decided.matrix[0][1]["precedence"] and decided.matrix[1][1]["precedence"]


def test_the_same_credential_twice_is_refused(alice, tmp_path):
    with pytest.raises(ConfigError, match="same credential is given in claims 1 and 2"):
        dispute([_claim(alice), _claim(alice)])
    copy = tmp_path / "copy.cred.json"
    copy.write_bytes(alice["cred"].read_bytes())
    with pytest.raises(ConfigError, match="same credential is given in claims 1 and 2"):
        dispute([_claim(alice), Claim(copy, alice["secret"], alice["ticket"])])
    with pytest.raises(ConfigError, match="at least two claims"):
        dispute([_claim(alice)])


def test_claims_on_one_model_file(alice, mallory):
    # Both claim Mallory's model, which carries both marks: nothing orders them.
    both = dispute(
        [Claim(alice["cred"], alice["secret"], mallory["ticket"]), _claim(mallory)],
        blackbox=False,
    )
    assert both.winner is None
    assert any("name the same model file" in note for note in both.notes)
    assert both.decision == "undecided — the marks do not single out an original"
    # Mallory claims Alice's model, which does not carry Mallory's mark: Alice still wins.
    wrong = dispute(
        [_claim(alice), Claim(mallory["cred"], mallory["secret"], alice["ticket"])],
        blackbox=False,
    )
    assert wrong.winner == 0
    assert not wrong.matrix[1][1]["verified"]


# --- a claim ground to a chance match ------------------------------------------------------------


def _info(index: int, owner: str) -> dict:
    return {
        "index": index,
        "label": f"claim {index + 1}",
        "owner": owner,
        "valid": True,
        "problems": [],
        "trigger_source": None,
    }


def _marks(w2_log10_p: float, signed: bool, security_bits: int) -> dict:
    """A dispute cell from synthetic W2 evidence judged as `verify` judges it."""
    from ticketguard.verify.dispute import _cell
    from ticketguard.verify.stats import Evidence, judge
    from ticketguard.verify.verification import VerificationReport

    evidences = [
        Evidence("W2 bits", "statistical", "bits", w2_log10_p, null="Binomial(n, 1/2)"),
        Evidence("W2 payload", "cryptographic", "payload", valid=signed),
    ]
    verdict = judge(evidences, 1e-6, security_bits)
    return _cell(VerificationReport({}, evidences, verdict), _info(0, "x"))


@pytest.mark.parametrize("security_bits", [128, 0])
def test_a_claim_ground_to_a_chance_match_does_not_undo_a_decision(security_bits: int) -> None:
    """Mallory retried seeds until her W2 bits matched Alice's model at p = 3.2e-8.

    About 2^25 tries get there. The old alpha rule counts it (3.2e-8 < 1e-6 / 1), and the marks
    then run both ways: undecided. At the security level it does not count: Alice came first.
    """
    from ticketguard.verify.dispute import _decide

    infos = [_info(0, "alice@example.org"), _info(1, "mallory@example.org")]
    strong = -290.0
    matrix = [
        [_marks(strong, True, security_bits), _marks(strong, True, security_bits)],
        [_marks(-7.49485, False, security_bits), _marks(strong, True, security_bits)],
    ]
    ground = matrix[1][0]
    assert ground["evidence"][0]["p"] == "3.2e-08" and ground["evidence"][0]["work"] == "2^25 tries"
    winner, reasoning, decision = _decide(infos, matrix)
    if security_bits == 0:
        assert ground["precedence"] and ground["decisive"] == ["W2 bits"]
        assert winner is None
        assert decision == "undecided — the marks do not single out an original"
        return
    assert not ground["verified"] and not ground["precedence"] and ground["decisive"] == []
    assert winner == 0 and decision == "claim 1 (alice@example.org) came first"
    assert (
        "claim 2 (mallory@example.org)'s mark is not in claim 1 (alice@example.org)'s model: "
        "claim 2 (mallory@example.org)'s W2 bits p = 3.2e-08 in claim 1 (alice@example.org)'s "
        "model does not count: above the 128-bit security level 2^-128/m = 2.9e-39 (m=1); a "
        "claimant who can retry reaches it in about 2^25 tries; claim 2 (mallory@example.org)'s "
        "W2 payload in claim 1 (alice@example.org)'s model: invalid"
    ) in reasoning
    # What counted is named with its rule: W2 bits within the level, the signature on its own.
    assert (
        "claim 1 (alice@example.org)'s own model carries its mark (W2 bits p = 1.0e-290, within "
        "the 128-bit security level 2^-128/m = 2.9e-39 (m=1), W2 payload valid (a signature: it "
        "cannot be ground))"
    ) in reasoning


# --- the command ---------------------------------------------------------------------------------


def _args(*claims: dict[str, Path]) -> list:
    args: list = ["dispute", "--no-blackbox"]
    for files in claims:
        args += ["--claim", files["cred"], files["secret"], files["ticket"]]
    return args


def test_dispute_command_decides_and_writes_json(alice, mallory, tmp_path):
    report = tmp_path / "dispute.json"
    result = invoke(_args(alice, mallory) + ["--json", report])
    assert result.exit_code == 0, result.output
    assert "Decision: claim 1 (alice@example.org) came first" in result.output
    assert "self-asserted" in result.output and "not verified" in result.output
    assert "statistical evidence counts at p <= 2^-128/m" in result.output
    data = json.loads(report.read_text())
    assert data["winner"] == 0 and data["winner_owner"] == "alice@example.org"
    assert len(data["matrix"]) == 2 and len(data["matrix"][0]) == 2
    assert data["security_bits"] == 128 and data["matrix"][0][1]["security_bits"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dispute.json"]
    plain = invoke(_args(alice, mallory) + ["--security-bits", 0, "--json", report])
    assert plain.exit_code == 0, plain.output
    assert "statistical evidence counts at p < alpha/m (alpha = 1e-06)" in plain.output
    data = json.loads(report.read_text())
    assert data["security_bits"] == 0 and data["matrix"][0][1]["security_bits"] == 0


def test_dispute_command_exits_1_when_undecided(make_ticket, alice, tmp_path):
    bob = _signed(make_ticket, 7, BOB, tmp_path / "bob.ticket", epochs=0)
    result = invoke(_args(alice, bob))
    assert result.exit_code == 1, result.output
    assert "Decision: undecided — the models are independent" in result.output


def test_dispute_command_errors(alice, mallory, tmp_path):
    assert "at least two --claim" in error_line(invoke(_args(alice)), 2)
    missing = _args(alice) + ["--claim", tmp_path / "nope.json", alice["secret"], alice["ticket"]]
    assert "does not exist" in error_line(invoke(missing), 2)
    twice = error_line(invoke(_args(alice, alice)), 2)
    assert twice.endswith("the same credential is given in claims 1 and 2")
    over = error_line(invoke(_args(alice, mallory) + ["--json", alice["cred"]]), 2)
    assert "one of the claims' files" in over
    alpha = error_line(invoke(_args(alice, mallory) + ["--alpha", "2"]), 2)
    assert alpha == "Error: alpha must be in (0, 1), got 2.0"
    garbage = tmp_path / "garbage.ticket"
    garbage.write_bytes(b"not a model")
    bad_model = {**mallory, "ticket": garbage}
    assert error_line(invoke(_args(alice, bad_model)), 2).startswith("Error: ")
