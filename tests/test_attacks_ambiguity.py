"""Ambiguity attacks (forge, fake triggers, overwrite, key search) and the attack command.

Disputes between the claims these attacks make are tested in test_dispute.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import error_line, invoke
from conftest import OWNER

from ticketguard.attacks.base import AttackContext, AttackError, run_attack
from ticketguard.signatures.credential import read_credential
from ticketguard.signatures.signing import excluded_layers
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.tickets.ticket import load_ticket
from ticketguard.tickets.training import resolve_device
from ticketguard.verify.verification import verify

NO_TRAINING = {"recover_epochs": 0, "trigger": "none"}
CPU = AttackContext(device=resolve_device("cpu"))


@pytest.fixture(scope="module")
def owner(small_signed: dict[str, Path]) -> dict[str, Path]:
    """Alice's small signed digits ticket (W2, two recovery epochs), credential, secret, key."""
    return small_signed


@pytest.fixture(scope="module")
def forged(owner: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The thief's forged claim on Alice's ticket, written by `ticketguard attack forge`."""
    out = tmp_path_factory.mktemp("thief") / "forged.ticket"
    args = ["attack", "forge", owner["ticket"], "--out", out, "--recover-epochs", 0]
    result = invoke(args + ["--trigger", "none", "--created", "2020-01-01T00:00:00Z"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    return {
        "ticket": out,
        "cred": out.with_name("forged.cred.json"),
        "secret": out.with_name("forged.secret.json"),
    }


# --- forge ---------------------------------------------------------------------------------------


def test_forge_signs_the_stolen_ticket_under_the_attackers_key(owner, forged):
    cred = read_credential(forged["cred"])
    assert cred.valid
    assert cred.document["owner"] == "mallory@example.org"
    assert cred.document["created"] == "2020-01-01T00:00:00Z"  # backdated at will
    assert cred.public_key.key_id() != OWNER.public_key.key_id()
    stolen, copy = load_ticket(owner["ticket"]), load_ticket(forged["ticket"])
    for name in stolen.mask:
        assert int(copy.mask[name].sum()) == int(stolen.mask[name].sum())
    assert copy.metadata["signature"]["owner"] == "mallory@example.org"
    assert "finding" not in copy.metadata  # the owner's records are stripped
    # Both marks are in the forged copy: the thief's and, still readable, Alice's.
    mine = verify(forged["ticket"], credential=forged["cred"], reveal=forged["secret"])
    hers = verify(forged["ticket"], credential=owner["cred"], reveal=owner["secret"])
    assert mine.verified and hers.verified
    assert "W2 bits" in hers.verdict.decisive


def test_forge_is_deterministic_given_the_seed(owner, monkeypatch):
    # The claim's creation time is the clock's unless SOURCE_DATE_EPOCH fixes it.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1795000000")
    stolen = load_ticket(owner["ticket"])
    a = run_attack("forge", stolen, NO_TRAINING, seed=4, context=CPU)
    b = run_attack("forge", stolen, NO_TRAINING, seed=4, context=CPU)
    c = run_attack("forge", stolen, NO_TRAINING, seed=5, context=CPU)
    assert a.ticket.mask == b.ticket.mask != c.ticket.mask
    assert a.claim.credential == b.claim.credential
    assert a.details["key_id"] == b.details["key_id"] != c.details["key_id"]
    assert a.details["created"] == "2026-11-18T11:06:40Z"
    with pytest.raises(AttackError, match="'created' must be an ISO 8601 time"):
        run_attack("forge", stolen, {**NO_TRAINING, "created": "yesterday"}, context=CPU)


# --- fake trigger sets ---------------------------------------------------------------------------


def test_fake_triggers_are_labelled_by_the_model_and_claimed_as_imported(owner):
    stolen = load_ticket(owner["ticket"])
    params = {"size": 30, "candidates": 300, "recover_epochs": 0}
    result = run_attack("fake-triggers", stolen, params, seed=0, context=CPU)
    triggers = result.claim.triggers
    assert triggers.source == "folder" and triggers.size == 30
    assert result.claim.credential["trigger_set"]["source"] == "folder"
    from ticketguard.signatures.signing import input_normalization

    mean, std = input_normalization(stolen)
    with torch.no_grad():
        predicted = stolen.build_model().eval()(triggers.inputs(mean, std)).argmax(dim=1)
    assert torch.equal(predicted, triggers.labels)  # labels chosen after the fact
    details = result.details
    assert details["candidates"] == 300 and details["kept"] == 30
    assert details["label_counts"] == np.bincount(triggers.labels.numpy(), minlength=10).tolist()
    # Labels are taken in turn, so the set is far from a constant predictor's.
    assert triggers.max_label_frequency() < 0.5
    with pytest.raises(AttackError, match="raise --candidates or lower --size"):
        run_attack("fake-triggers", stolen, {"size": 50, "candidates": 10}, context=CPU)


def test_a_fake_trigger_claim_is_not_verified_by_verify(owner, tmp_path):
    """The stolen model answers the fake set perfectly (a tiny p-value), but an imported set may
    have been chosen from the suspect's own answers: reported, never judged, not verified."""
    out = tmp_path / "fake.ticket"
    args = ["attack", "fake-triggers", owner["ticket"], "--out", out, "--size", 60]
    result = invoke([*args, "--candidates", 600, "--recover-epochs", 0])
    assert result.exit_code == 0, result.output
    claim = ["--credential", out.with_name("fake.cred.json")]
    claim += ["--reveal", out.with_name("fake.secret.json")]
    for rule in ([], ["--security-bits", 0]):
        verdict = invoke(["verify", owner["ticket"], "--blackbox", *claim, *rule, "--json"])
        assert verdict.exit_code == 1, verdict.output
        report = json.loads(verdict.output)
        b1 = next(e for e in report["evidence"] if e["name"] == "B1 triggers")
        assert b1["log10_p"] < -20 and b1["judged"] is False
        assert "chosen from the suspect's own behaviour" in b1["not_judged_reason"]
        assert report["verdict"]["verified"] is False
        assert report["verdict"]["not_judged"] == ["B1 triggers"]


# --- overwrite -----------------------------------------------------------------------------------


def test_overwrite_flips_the_requested_connectivity_and_keeps_every_count(owner):
    stolen = load_ticket(owner["ticket"])
    result = run_attack("overwrite", stolen, {"fraction": 0.05, "epochs": 0}, seed=0, context=CPU)
    out, details = result.ticket, result.details
    signed_layers = [n for n in stolen.mask if n not in excluded_layers(stolen)]
    assert sorted(details["flipped_per_layer"]) == sorted(signed_layers)
    requested = 0
    for name in signed_layers:
        before = channel_connectivity(stolen.mask[name])
        after = channel_connectivity(out.mask[name])
        requested += round(0.05 * before.numel())
        assert int(out.mask[name].sum()) == int(stolen.mask[name].sum())
        # Every chosen entry flips; restoring the count may flip a few kernels elsewhere.
        assert int((before != after).sum()) >= details["flipped_per_layer"][name]
    assert details["flipped"] + details["not_flipped"] == requested
    assert details["flipped"] > 0


def test_random_overwrite_swaps_entries_keeps_counts_and_fine_tunes_with_the_mask_fixed(owner):
    stolen = load_ticket(owner["ticket"])
    params = {"fraction": 0.1, "target": "random", "epochs": 1, "data_fraction": 0.25}
    result = run_attack("overwrite", stolen, params, seed=0, context=CPU)
    out = result.ticket
    flipped = run_attack("overwrite", stolen, {**params, "epochs": 0}, seed=0, context=CPU)
    assert out.mask == flipped.ticket.mask  # the fine-tune kept the flipped mask
    changed = 0
    for name, m in stolen.mask.items():
        assert int(out.mask[name].sum()) == int(m.sum())
        swapped = int((out.mask[name] != m).sum())
        assert swapped == result.details["flipped_per_layer"][name]
        assert swapped == 2 * round(0.1 * int(m.sum()))
        changed += swapped
    assert changed == result.details["flipped"] > 0
    assert not torch.equal(out.trained["fc.weight"], stolen.trained["fc.weight"])  # it trained


# --- key search ----------------------------------------------------------------------------------


def test_key_search_counts_no_verified_keys_and_is_deterministic(owner):
    stolen = load_ticket(owner["ticket"])
    a = run_attack("key-search", stolen, {"tries": 30}, seed=0, context=CPU)
    b = run_attack("key-search", stolen, {"tries": 30}, seed=0, context=CPU)
    c = run_attack("key-search", stolen, {"tries": 30}, seed=1, context=CPU)
    assert a.ticket is None
    assert a.details["tries"] == 30 and a.details["verified"] == 0
    same = {k: v for k, v in a.details.items() if k != "seconds"}
    assert same == {k: v for k, v in b.details.items() if k != "seconds"}
    assert a.details["smallest_log10_p"] != c.details["smallest_log10_p"]
    assert a.details["bound"] == pytest.approx(30 * 2.0**-128)  # tries x the 128-bit level
    assert -6 < a.details["smallest_log10_p"]["W2 bits"] < 0
    assert -6 < a.details["smallest_log10_p"]["B1 triggers"] <= 0
    assert a.details["bits"] == 1024 and a.details["most_bits_matched"] < 600
    assert a.details["decode_attempts"] == 30 and a.details["payloads_decoded"] == 0


def test_key_search_decodes_only_within_reach_on_request(owner):
    stolen = load_ticket(owner["ticket"])
    params = {"tries": 5, "trigger": False, "decode": "reach"}
    result = run_attack("key-search", stolen, params, seed=0, context=CPU)
    assert result.details["decode_attempts"] == 0 and result.details["verified"] == 0
    assert set(result.details["smallest_log10_p"]) == {"W2 bits"}


def test_key_search_counts_chance_matches_at_a_loose_alpha(owner):
    """A sanity check of the counter: under the plain alpha rule, alpha close to 1 makes chance
    matches "verify"; at the default security level the same tries verify nothing."""
    stolen = load_ticket(owner["ticket"])
    loose = {"tries": 20, "alpha": 0.5, "security_bits": 0}
    result = run_attack("key-search", stolen, loose, seed=0, context=CPU)
    assert result.details["verified"] > 0
    strict = run_attack("key-search", stolen, {**loose, "security_bits": 128}, seed=0, context=CPU)
    assert strict.details["verified"] == 0


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
        ["attack", "noise", plain, "--arch", "digits_cnn", "--arch-arg", "width=8", "--out", out]
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
