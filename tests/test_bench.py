"""The robustness benchmark: config checking, the grid, resuming, workers, outputs, success rule.

The target is a small signed digits ticket (a width-32 DigitsCNN signed with W2 and one epoch of
recovery training), and the attacks are test attacks registered here, so the runner is tested
on its own: a weight scaling (factor 0 erases the model and its mark), a claim signed with
another key (settled by a real dispute), and a count.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import error_line, invoke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from ticketguard.attacks.base import (
    AMBIGUITY,
    ATTACKS,
    REMOVAL,
    Attack,
    AttackResult,
    Param,
    attacked_ticket,
)
from ticketguard.attacks.bench import expand, judge, load_config, run_bench
from ticketguard.errors import ConfigError
from ticketguard.signatures.keys import OwnerKey
from ticketguard.signatures.signing import SignConfig, sign_ticket, write_signed
from ticketguard.tickets.retrain import RetrainConfig
from ticketguard.tickets.training import resolve_device

ALICE = OwnerKey("alice@example.org", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
MALLORY = OwnerKey("mallory@example.org", Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34))))
#: The attack invocations in this process (worker processes count their own).
CALLS: list[float] = []


def _scale(ticket, params: dict[str, Any], seed: int, context) -> AttackResult:
    """Multiply every weight by `factor` (0 erases the model); a negative factor fails."""
    CALLS.append(params["factor"])
    if params["factor"] < 0:
        raise RuntimeError("negative factors are not supported\nsecond line")
    state = {
        k: v * params["factor"] if v.is_floating_point() else v for k, v in ticket.trained.items()
    }
    return AttackResult(
        attacked_ticket(ticket, state, attack="test-scale", params=params, seed=seed),
        {"factor": params["factor"]},
    )


def _claim(ticket, params: dict[str, Any], seed: int, context) -> AttackResult:
    """Sign the stolen ticket with another key (a forge without recovery training)."""
    signed = sign_ticket(
        ticket,
        MALLORY,
        SignConfig(retrain=RetrainConfig(epochs=0)),
        device=context.device,
        created="2026-02-01T00:00:00Z",
    )
    return AttackResult(signed.ticket, {"owner": MALLORY.owner}, claim=signed)


def _count(ticket, params: dict[str, Any], seed: int, context) -> AttackResult:
    """Pretend to try `tries` keys, of which `hits` verify."""
    return AttackResult(None, {"tries": params["tries"], "verified": params["hits"]})


TEST_ATTACKS = (
    Attack(
        "test-scale",
        REMOVAL,
        "Scale every weight (a test attack).",
        (
            Param("factor", float, 1.0, "Scale factor."),
            Param("fraction", float, 1.0, "Unused: not the attacker's data (needs_data is off)."),
        ),
        _scale,
        strength="factor",
    ),
    Attack(
        "test-claim",
        AMBIGUITY,
        "Sign the stolen ticket with another key (a test attack).",
        (Param("fraction", float, 0.5, "The attacker's data share (unused)."),),
        _claim,
        needs_data=True,
        makes_claim=True,
    ),
    Attack(
        "test-count",
        AMBIGUITY,
        "Report a key count (a test attack).",
        (Param("tries", int, 10, "Keys."), Param("hits", int, 0, "Keys that verified.")),
        _count,
        strength="tries",
    ),
)


@pytest.fixture(autouse=True)
def test_attacks():
    """Register the test attacks for one test (in this process; workers get them by value)."""
    CALLS.clear()
    for attack in TEST_ATTACKS:
        ATTACKS[attack.name] = attack
    yield
    for attack in TEST_ATTACKS:
        ATTACKS.pop(attack.name, None)


@pytest.fixture(scope="module")
def target(make_ticket, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Alice's small signed digits ticket: W2, one recovery epoch, no trigger set."""
    ticket = make_ticket(width=32, keep=0.3, seed=0)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    signed = sign_ticket(
        ticket,
        ALICE,
        SignConfig(retrain=RetrainConfig(epochs=1)),
        device=resolve_device("cpu"),
        created="2026-01-01T00:00:00Z",
    )
    out = tmp_path_factory.mktemp("target") / "signed.ticket"
    write_signed(signed, out)
    return {
        "ticket": out,
        "cred": out.with_name("signed.cred.json"),
        "secret": out.with_name("signed.secret.json"),
    }


def _config(tmp_path: Path, target: dict[str, Path], body: str, **top: object) -> Path:
    settings = {"name": "t", "seeds": [0], "null_samples": 2, "device": "cpu", **top}
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += [
        "[target]",
        f'ticket = "{target["ticket"]}"',
        f'credential = "{target["cred"]}"',
        f'secret = "{target["secret"]}"',
    ]
    path = tmp_path / "bench.toml"
    path.write_text("\n".join(lines) + "\n" + body, encoding="utf-8")
    return path


SCALE = """
[[attack]]
name = "test-scale"
label = "scale <b>&</b> | co"
[attack.params]
factor = [1.0, 0.0]
"""


def test_grid_is_the_product_of_axes_and_seeds(tmp_path, target):
    body = (
        '[[attack]]\nname = "prune"\n[attack.params]\nrate = [0.2, 0.5]\n'
        'scope = ["global", "layerwise"]\n'
        '[[attack]]\nname = "test-scale"\n[attack.params]\nfactor = [1, 2, 3]\n'
    )
    config = load_config(_config(tmp_path, target, body, seeds=[0, 1, 2]))
    cells = expand(config)
    assert len(cells) == 2 * 2 * 3 + 3 * 3
    assert len({c.id for c in cells}) == len(cells)
    assert {c.params["rate"] for c in cells if c.attack == "prune"} == {0.2, 0.5}
    assert [c.seed for c in cells[:3]] == [0, 1, 2]
    # Every parameter is resolved (defaults included); the grid shows only what was set.
    assert cells[0].params == {"method": "magnitude", "scope": "global", "rate": 0.2}
    assert cells[0].grid == {"rate": 0.2, "scope": "global"}
    # The attacker's data fraction fills in only for attacks that train on the attacker's data.
    body = '[[attack]]\nname = "test-claim"\n[[attack]]\nname = "test-scale"\n'
    claim, scale = expand(load_config(_config(tmp_path, target, body, data_fraction=0.25)))
    assert claim.params["fraction"] == 0.25 and scale.params["fraction"] == 1.0


def test_cell_ids_follow_the_target_and_the_judging(tmp_path, target):
    ids = [c.id for c in expand(load_config(_config(tmp_path, target, SCALE)))]
    assert ids == [c.id for c in expand(load_config(_config(tmp_path, target, SCALE)))]
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    changes = ({"alpha": 1e-3}, {"security_bits": 64}, {"reference": False}, {"blackbox": False})
    for change in changes:
        other = [c.id for c in expand(load_config(_config(tmp_path, target, SCALE, **change)))]
        assert set(other).isdisjoint(ids), change
    copy = tmp_path / "copy.cred.json"
    copy.write_bytes(target["cred"].read_bytes() + b"\n")
    path = _config(tmp_path, target, SCALE)
    changed = [c.id for c in expand(load_config(path, {"credential": copy}))]
    assert set(changed).isdisjoint(ids)


BAD_CONFIGS = [
    (SCALE, {"colour": "red"}, "unknown config key 'colour'"),
    (SCALE, {"alpha": "small"}, "config key 'alpha' must be a number, got 'small'"),
    (SCALE, {"max_drop": True}, "config key 'max_drop' must be a number, got True"),
    (SCALE, {"workers": 1.5}, "config key 'workers' must be an integer, got 1.5"),
    (SCALE, {"max_drop": 2.0}, "config key 'max_drop' must be in [0, 1], got 2.0"),
    (SCALE, {"security_bits": 1.5}, "config key 'security_bits' must be an integer, got 1.5"),
    (SCALE, {"security_bits": True}, "config key 'security_bits' must be an integer, got True"),
    (SCALE, {"security_bits": "128"}, "config key 'security_bits' must be an integer, got '128'"),
    (SCALE, {"security_bits": -1}, "config key 'security_bits' must be in 0..4096, got -1"),
    (SCALE, {"security_bits": 4097}, "config key 'security_bits' must be in 0..4096, got 4097"),
    (SCALE, {"seeds": [0, -1]}, "config key 'seeds' must be a non-empty list of integers"),
    (SCALE, {"device": "tpu"}, "unknown device 'tpu'"),
    ('[[attack]]\nname = "melt"\n', {}, "unknown attack 'melt'; known: finetune"),
    (
        '[[attack]]\nname = "test-scale"\n[attack.params]\nfactor = [1.0, "big"]\n',
        {},
        "attack 'test-scale': attack parameter 'factor' must be a number, got 'big'",
    ),
    (
        '[[attack]]\nname = "test-scale"\n[attack.params]\nspeed = 1\n',
        {},
        "attack 'test-scale' has no parameter 'speed' (it has: factor, fraction)",
    ),
    (
        '[[attack]]\nname = "test-scale"\n[attack.params]\nfactor = []\n',
        {},
        "attack 'test-scale': parameter 'factor' has an empty list",
    ),
    ('[[attack]]\nname = "test-scale"\nspeed = 1\n', {}, "unknown key 'speed' in [[attack]]"),
    ("[[attack]]\nlabel = 'x'\n", {}, "[[attack]] number 1 has no name"),
    ("", {}, "the config names no [[attack]]"),
]


@pytest.mark.parametrize(
    ("body", "top", "message"), BAD_CONFIGS, ids=[m for _, _, m in BAD_CONFIGS]
)
def test_bad_configs_are_refused_before_anything_runs(tmp_path, target, body, top, message):
    path = _config(tmp_path, target, body, **top)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    out = tmp_path / "out"
    result = invoke(["bench", path, "--out", out])
    assert message in error_line(result, 2)
    assert not out.exists()
    assert CALLS == []


def test_missing_target_and_bad_files_are_one_line_errors(tmp_path, target):
    path = tmp_path / "bench.toml"
    path.write_text(SCALE, encoding="utf-8")
    assert "no target ticket: set [target] ticket or pass --ticket" in error_line(
        invoke(["bench", path]), 2
    )
    missing = tmp_path / "none.ticket"
    line = error_line(
        invoke(
            [
                "bench",
                path,
                "--ticket",
                missing,
                "--credential",
                target["cred"],
                "--secret",
                target["secret"],
            ]
        ),
        2,
    )
    assert line == f"Error: target ticket {missing}: no such file"
    path.write_text("name = [", encoding="utf-8")
    assert "not valid TOML" in error_line(invoke(["bench", path]), 2)
    assert "no such config file" in error_line(invoke(["bench", tmp_path / "none.toml"]), 2)


def test_target_paths_are_relative_to_the_config(tmp_path, target):
    folder = tmp_path / "configs"
    folder.mkdir()
    for key in ("ticket", "cred", "secret"):
        (tmp_path / target[key].name).write_bytes(target[key].read_bytes())
    path = folder / "b.toml"
    path.write_text(
        '[target]\nticket = "../signed.ticket"\ncredential = "../signed.cred.json"\n'
        'secret = "../signed.secret.json"\n' + SCALE,
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.ticket.resolve() == (tmp_path / "signed.ticket").resolve()
    assert config.name == "b" and config.null_samples == 20 and config.workers == 1
    assert config.security_bits == 128 and config.to_dict()["security_bits"] == 128


def test_run_records_every_cell_resumes_and_reruns_with_fresh(tmp_path, target):
    config = load_config(_config(tmp_path, target, SCALE))
    out = tmp_path / "out"
    first = run_bench(config, out)
    assert CALLS == [1.0, 0.0] and first.ran == 2 and first.skipped == 0
    assert first.baseline["verified"] and first.baseline["attack_succeeded"] is None
    kept, erased = first.cells
    assert kept["verified"] and kept["evidence_survives"] and not kept["attack_succeeded"]
    assert kept["drop"] == pytest.approx(0.0)
    assert kept["accuracy_before"] == first.baseline["accuracy_after"] > 0.2
    assert [e["name"] for e in kept["evidence"]] == ["W1 topology", "W2 bits", "W2 payload"]
    assert kept["crypto_valid"] and "W2 bits" in kept["decisive"]
    assert kept["strength"] == "factor" and erased["strength_value"] == 0.0
    assert kept["details"] == {"factor": 1.0} and kept["seconds_attack"] >= 0
    assert not erased["verified"] and not erased["crypto_valid"]
    # The evidence is gone, but so is the model: the attack does not succeed.
    assert erased["drop"] > 0.1 and not erased["attack_succeeded"]
    assert len(list((out / "cells").glob("*.json"))) == 3  # the baseline and two cells
    on_disk = json.loads((out / "cells" / f"{erased['id']}.json").read_text(encoding="utf-8"))
    assert on_disk == erased

    again = run_bench(config, out)
    assert CALLS == [1.0, 0.0] and again.ran == 0 and again.skipped == 2
    assert again.cells == first.cells
    fresh = run_bench(config, out, fresh=True)
    assert CALLS == [1.0, 0.0, 1.0, 0.0] and fresh.ran == 2 and fresh.skipped == 0

    # One more grid value runs only the new cell; the CLI says how many it skipped.
    body = SCALE.replace("[1.0, 0.0]", "[1.0, 0.0, 0.5]")
    result = invoke(["bench", _config(tmp_path, target, body), "--out", out])
    assert result.exit_code == 0, result.output
    assert "2 finished cells skipped" in result.output and "1 cells run, 2 skipped" in result.output
    assert CALLS[4:] == [0.5]


def test_success_needs_lost_evidence_and_a_small_drop(tmp_path, target):
    config = load_config(_config(tmp_path, target, SCALE, max_drop=1.0))
    out = tmp_path / "out"
    cells = run_bench(config, out).cells
    assert cells[1]["attack_succeeded"] and not cells[0]["attack_succeeded"]
    # A changed max_drop judges the kept cells again (it does not change what they measured).
    strict = load_config(_config(tmp_path, target, SCALE, max_drop=0.05))
    again = run_bench(strict, out)
    assert again.ran == 0 and not again.cells[1]["attack_succeeded"]
    rule = {"judged_by": "verification", "verified": False, "drop": 0.06}
    assert not judge(rule, 0.05)["attack_succeeded"]
    assert judge({**rule, "drop": 0.05}, 0.05)["attack_succeeded"]
    assert not judge({**rule, "verified": True, "drop": 0.0}, 0.05)["attack_succeeded"]
    assert judge({"judged_by": "dispute", "winner": "undecided"}, 0.05)["attack_succeeded"]
    assert not judge({"judged_by": "dispute", "winner": "owner"}, 0.05)["attack_succeeded"]
    assert judge({"judged_by": "count", "details": {"verified": 1}}, 0.05)["attack_succeeded"]
    assert judge({"error": "x", "judged_by": None}, 0.05)["attack_succeeded"] is None


def test_a_failing_cell_is_recorded_and_the_command_exits_1(tmp_path, target):
    body = '[[attack]]\nname = "test-scale"\n[attack.params]\nfactor = [-1.0, 1.0]\n'
    path = _config(tmp_path, target, body)
    out = tmp_path / "out"
    result = invoke(["bench", path, "--out", out])
    assert error_line(result, 1) == "Error: 1 of 2 cells failed"
    assert "failed: RuntimeError: negative factors are not supported" in result.output
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert cells[0]["error"] == "RuntimeError: negative factors are not supported"
    assert cells[0]["attack_succeeded"] is None
    assert cells[1]["error"] is None and cells[1]["verified"]
    # A failed cell is run again next time; the finished one is kept.
    CALLS.clear()
    assert invoke(["bench", path, "--out", out]).exit_code == 1
    assert CALLS == [-1.0]


def test_claims_go_to_a_dispute_and_counts_are_counted(tmp_path, target):
    body = (
        '[[attack]]\nname = "test-claim"\n'
        '[[attack]]\nname = "test-count"\n[attack.params]\nhits = [0, 2]\n'
    )
    out = tmp_path / "out"
    result = run_bench(load_config(_config(tmp_path, target, body)), out)
    claim, none, some = result.cells
    assert claim["judged_by"] == "dispute" and claim["winner"] == "owner", claim["reasoning"]
    assert not claim["attack_succeeded"] and claim["verified"]
    assert claim["drop"] == pytest.approx(claim["accuracy_before"] - claim["accuracy_after"])
    for path in claim["claim_files"]:
        assert Path(path).is_file() and Path(path).parent == out / "cells" / claim["id"]
    assert none["judged_by"] == some["judged_by"] == "count"
    assert not none["attack_succeeded"] and some["attack_succeeded"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Ambiguity attacks" in md and "the dispute names the owner" in md
    assert "2 of 10 random keys verified" in md
    assert not (out / "plots.png").exists()  # nothing judged by verification to plot


def test_outputs_are_written_and_escape_labels(tmp_path, target):
    path = _config(tmp_path, target, SCALE, seeds=[0, 1])
    out = tmp_path / "out"
    result = invoke(["bench", path, "--out", out])
    assert result.exit_code == 0, result.output
    for name in ("results.csv", "results.json", "plots.png", "report.md", "report.html"):
        assert f"wrote {out / name}" in result.output
    assert "robustness benchmark" in result.output  # the terminal table
    assert "[4/4] test-scale" in result.output  # one line per cell when not on a terminal
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert len(data["cells"]) == 4 and data["baseline"]["verified"]
    assert data["config"]["seeds"] == [0, 1]
    with (out / "results.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [c["id"] for c in data["cells"]]
    assert [r["param factor"] for r in rows] == ["1.0", "1.0", "0.0", "0.0"]
    assert float(rows[0]["W2 bits log10_p"]) < -20 and rows[0]["W2 payload valid"] == "True"
    assert rows[2]["W2 payload valid"] == "False" and rows[2]["attack_succeeded"] == "False"
    with Image.open(out / "plots.png") as image:
        image.load()
        assert image.size[0] >= 400 and image.size[1] >= 300
        assert len(image.getcolors(1 << 16) or range(1000)) > 10  # more than a blank canvas
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "scale &lt;b&gt;&amp;&lt;/b&gt; | co" in html and "<b>&</b>" not in html
    assert "data:image/png;base64," in html and "<th>W2 bits</th>" in html
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| scale <b>&</b> \\| co | factor=0.0 | 0 |" in md
    assert "## Where the evidence was lost" in md and "![" in md and "(plots.png)" in md
    lost = md.split("## Where the evidence was lost")[1].split("\n## ")[0]
    assert "factor=0.0, seed 0): NOT verified, lost W2 bits" in lost
    assert "the attack fails" in lost and "factor=1.0" not in lost
    assert "the unattacked target: accuracy" in md


def test_two_workers_give_the_same_cells_as_one(tmp_path, target):
    body = SCALE.replace("[1.0, 0.0]", "[1.0, 0.5, 0.0]")
    path = _config(tmp_path, target, body)
    one = run_bench(load_config(path), tmp_path / "one").cells
    two = run_bench(load_config(path, {"workers": 2}), tmp_path / "two").cells
    assert CALLS == [1.0, 0.5, 0.0]  # the workers ran theirs in their own processes
    keys = ("id", "accuracy_after", "drop", "verified", "evidence", "details", "attack_succeeded")
    assert [{k: c[k] for k in keys} for c in one] == [{k: c[k] for k in keys} for c in two]
    assert all(c["error"] is None for c in two)
    assert torch.tensor([c["accuracy_after"] for c in one]).isfinite().all()


# --- the security level and cells that leave the mask unchanged ----------------------------------


def test_security_bits_reach_every_verification_and_the_report(tmp_path, target):
    from ticketguard.verify.stats import security_threshold_log10

    body = SCALE + '[[attack]]\nname = "test-claim"\n'
    secure = run_bench(load_config(_config(tmp_path, target, body)), tmp_path / "secure")
    kept, erased, claim = secure.cells
    for record in (secure.baseline, kept, erased):
        assert record["security_bits"] == 128
        assert record["threshold_log10"] == pytest.approx(
            security_threshold_log10(128, record["tests"])
        )
    assert claim["security_bits"] == 128 and claim["winner"] == "owner"
    assert all("work_log2" in e and "judged" in e for e in kept["evidence"])
    md = (tmp_path / "secure" / "report.md").read_text(encoding="utf-8")
    assert "statistical evidence decides at p <= 2^-128/m (the 128-bit security level" in md
    assert "alpha = 1e-06 applies only to a claim proven to predate the suspect" in md
    plain = run_bench(
        load_config(_config(tmp_path, target, SCALE, security_bits=0)), tmp_path / "p"
    )
    assert plain.baseline["security_bits"] == 0
    assert plain.baseline["threshold_log10"] == pytest.approx(
        math.log10(1e-6 / plain.baseline["tests"])
    )
    assert {c["id"] for c in plain.cells}.isdisjoint(c["id"] for c in secure.cells)
    md = (tmp_path / "p" / "report.md").read_text(encoding="utf-8")
    assert "alpha = 1e-06 (Bonferroni" in md and "security level off" in md
    # An attack that judges claims itself (key-search) gets the config's levels too.
    body = '[[attack]]\nname = "key-search"\n'
    (search,) = expand(load_config(_config(tmp_path, target, body, security_bits=64)))
    assert search.params["security_bits"] == 64 and search.params["alpha"] == 1e-6


def test_mask_unchanged_is_recorded_and_reported(tmp_path, target):
    out = tmp_path / "out"
    result = run_bench(load_config(_config(tmp_path, target, SCALE)), out)
    kept, erased = result.cells
    # Scaling by 1 keeps every weight; scaling by 0 removes them all.
    assert kept["mask_unchanged"] is True and erased["mask_unchanged"] is False
    assert "mask_unchanged" not in result.baseline
    md = (out / "report.md").read_text(encoding="utf-8")
    rows = [line for line in md.splitlines() if line.startswith("| scale")]
    assert rows[0].endswith("| mask unchanged: W2 cannot be affected |")
    assert not rows[1].endswith("mask unchanged: W2 cannot be affected |")
    section = md.split("## Mask unchanged")[1].split("\n## ")[0]
    assert "(factor=1.0, seed 0): mask unchanged: W2 cannot be affected" in section
    assert "factor=0.0" not in section
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Mask unchanged</h2>" in html and "<th>notes</th>" in html
    with (out / "results.csv").open(newline="", encoding="utf-8") as f:
        assert [r["mask_unchanged"] for r in csv.DictReader(f)] == ["True", "False"]


def _digits(ticket):
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    return ticket


@pytest.mark.parametrize(
    ("name", "params", "unchanged"),
    [
        ("noise", {"sigma": 0.3, "scope": "surviving"}, True),
        ("noise", {"sigma": 0.3, "scope": "all"}, False),
        ("quantize", {"bits": 16}, True),
        ("prune", {"rate": 0.2}, False),
        ("regrow", {"fraction": 0.05}, False),
        ("finetune", {"mode": "masked", "epochs": 1}, True),
        ("finetune", {"mode": "dense", "epochs": 1}, False),
        ("permute", {}, False),
    ],
)
def test_mask_unchanged_follows_the_kept_mask(make_ticket, name, params, unchanged):
    from ticketguard.attacks.base import AttackContext, run_attack
    from ticketguard.attacks.bench import mask_unchanged

    ticket = _digits(make_ticket(width=8, keep=0.3, seed=0))
    context = AttackContext(device=resolve_device("cpu"))
    attacked = run_attack(name, ticket, params, seed=0, context=context).ticket
    assert mask_unchanged(ticket, attacked) is unchanged
    assert mask_unchanged(ticket, ticket)


def test_mask_unchanged_compares_kept_entries_only(make_ticket):
    from ticketguard.attacks.bench import mask_unchanged
    from ticketguard.tickets.mask import Mask
    from ticketguard.tickets.ticket import Ticket

    ticket = make_ticket(width=4, keep=0.5, seed=0)
    name = next(iter(ticket.mask))
    # A weight the target's mask keeps but that is exactly zero is not kept: zeroing one more
    # entry changes the kept mask, and an explicit mask that hides an entry changes it too.
    state = dict(ticket.trained)
    flat = state[name].reshape(-1).clone()
    flat[int(ticket.mask[name].reshape(-1).nonzero()[0])] = 0.0
    state[name] = flat.view(state[name].shape)
    assert not mask_unchanged(ticket, Ticket(Mask(dict(ticket.mask)), state, {}, ticket.metadata))
    hidden = {n: m.clone() for n, m in ticket.mask.items()}
    hidden[name].reshape(-1)[int(hidden[name].reshape(-1).nonzero()[0])] = False
    trained = {k: v.clone() for k, v in ticket.trained.items()}
    trained[name] = trained[name] * hidden[name]
    assert not mask_unchanged(ticket, Ticket(Mask(hidden), trained, {}, ticket.metadata))
    # Weights outside the masked layers do not matter.
    moved = {
        k: v + 1.0 if k not in ticket.mask and v.is_floating_point() else v
        for k, v in ticket.trained.items()
    }
    assert mask_unchanged(ticket, Ticket(Mask(dict(ticket.mask)), moved, {}, ticket.metadata))
