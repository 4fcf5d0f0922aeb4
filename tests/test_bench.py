"""The robustness benchmark: config checking, the grid, resuming, workers, outputs, success rule."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import error_line, invoke
from PIL import Image

from ticketguard.attacks.base import ATTACKS, REMOVAL, Attack, AttackResult, Param, attacked_ticket
from ticketguard.attacks.bench import expand, load_config, run_bench
from ticketguard.errors import ConfigError

CALLS: list[float] = []


def _scale(ticket, params, seed, context) -> AttackResult:
    """A test attack: multiply every weight by `factor` (0 erases the model), or fail."""
    CALLS.append(params["factor"])
    if params["factor"] < 0:
        raise RuntimeError("negative factors are not supported\nsecond line")
    state = {
        k: v * params["factor"] if v.is_floating_point() else v for k, v in ticket.trained.items()
    }
    return AttackResult(
        attacked_ticket(ticket, state, attack="test-scale", params=params, seed=seed)
    )


@pytest.fixture(autouse=True)
def scale_attack():
    """Register the test attack for one test (in this process only)."""
    CALLS.clear()
    ATTACKS["test-scale"] = Attack(
        "test-scale",
        REMOVAL,
        "Scale every weight (a test attack).",
        (Param("factor", float, 1.0, "Scale factor."),),
        _scale,
        strength="factor",
    )
    yield
    ATTACKS.pop("test-scale", None)


@pytest.fixture(scope="module")
def target(signed_owner: dict[str, Path]) -> dict[str, Path]:
    """The owner's signed digits ticket (W2 and triggers), shared with the acceptance tests."""
    return {
        "ticket": signed_owner["signed"],
        "cred": signed_owner["cred"],
        "secret": signed_owner["secret"],
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
label = "scale <b>&</b>"
[attack.params]
factor = [1.0, 0.0]
"""


def test_grid_is_the_product_of_axes_and_seeds(tmp_path, target):
    body = '[[attack]]\nname = "prune"\n[attack.params]\nrate = [0.2, 0.5]\nscope = ["global", "layerwise"]\n'
    config = load_config(_config(tmp_path, target, body, seeds=[0, 1, 2]))
    cells = expand(config)
    assert len(cells) == 2 * 2 * 3
    assert len({c.id for c in cells}) == 12
    assert {c.params["rate"] for c in cells} == {0.2, 0.5}
    # The attacker's data fraction fills in only where the attack has one.
    body = '[[attack]]\nname = "finetune"\n'
    cells = expand(load_config(_config(tmp_path, target, body, data_fraction=0.25)))
    assert cells[0].params["fraction"] == 0.25


@pytest.mark.parametrize(
    ("body", "top", "message"),
    [
        (SCALE, {"colour": "red"}, "unknown config key 'colour'"),
        (SCALE, {"alpha": "small"}, "config key 'alpha' must be a number, got 'small'"),
        (SCALE, {"max_drop": 2.0}, "config key 'max_drop' must be in [0, 1], got 2.0"),
        ('[[attack]]\nname = "melt"\n', {}, "unknown attack 'melt'; known: finetune"),
        (
            '[[attack]]\nname = "prune"\n[attack.params]\nrate = [0.5, 3.0]\n',
            {},
            "attack parameter 'rate' must be <= 0.99, got 3.0",
        ),
        (
            '[[attack]]\nname = "prune"\nspeed = 1\n',
            {},
            "unknown key 'speed' in [[attack]] number 1",
        ),
        ("", {}, "the config names no [[attack]]"),
    ],
)
def test_bad_configs_are_refused_before_anything_runs(tmp_path, target, body, top, message):
    path = _config(tmp_path, target, body, **top)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    out = tmp_path / "out"
    result = invoke(["bench", path, "--out", out])
    assert message in error_line(result, 2)
    assert not out.exists()
    assert CALLS == []


def test_missing_target_and_bad_toml(tmp_path, target):
    path = tmp_path / "bench.toml"
    path.write_text(SCALE, encoding="utf-8")
    assert "no target ticket: set [target] ticket or pass --ticket" in error_line(
        invoke(["bench", path]), 2
    )
    path.write_text("name = [", encoding="utf-8")
    assert "not valid TOML" in error_line(invoke(["bench", path]), 2)
    assert "no such config file" in error_line(invoke(["bench", tmp_path / "none.toml"]), 2)


def test_run_records_every_cell_resumes_and_reruns_with_fresh(tmp_path, target):
    config = load_config(_config(tmp_path, target, SCALE))
    out = tmp_path / "out"
    first = run_bench(config, out)
    assert CALLS == [1.0, 0.0] and first.ran == 2 and first.skipped == 0
    kept, erased = first.cells
    assert kept["verified"] and not kept["attack_succeeded"]
    assert kept["drop"] == pytest.approx(0.0)
    names = [e["name"] for e in kept["evidence"]]
    assert names == ["W1 topology", "W2 bits", "W2 payload", "B1 triggers"]
    assert not erased["verified"]
    # The evidence is gone, but so is the model: the attack does not succeed.
    assert erased["drop"] > 0.05 and not erased["attack_succeeded"]
    assert len(list((out / "cells").glob("*.json"))) == 2

    again = run_bench(config, out)
    assert CALLS == [1.0, 0.0] and again.ran == 0 and again.skipped == 2
    assert again.cells == first.cells or [c["id"] for c in again.cells] == [
        c["id"] for c in first.cells
    ]
    fresh = run_bench(config, out, fresh=True)
    assert CALLS == [1.0, 0.0, 1.0, 0.0] and fresh.ran == 2


def test_an_attack_that_loses_the_evidence_within_the_drop_succeeds(tmp_path, target):
    config = load_config(_config(tmp_path, target, SCALE, max_drop=1.0))
    cells = run_bench(config, tmp_path / "out").cells
    assert cells[1]["attack_succeeded"] and not cells[0]["attack_succeeded"]


def test_a_failing_cell_is_recorded_and_the_command_exits_1(tmp_path, target):
    body = '[[attack]]\nname = "test-scale"\n[attack.params]\nfactor = [-1.0, 1.0]\n'
    path = _config(tmp_path, target, body)
    out = tmp_path / "out"
    result = invoke(["bench", path, "--out", out])
    assert error_line(result, 1) == "Error: 1 of 2 cells failed"
    assert "failed: RuntimeError: negative factors are not supported" in result.output
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert cells[0]["error"] == "RuntimeError: negative factors are not supported"
    assert cells[1]["error"] is None and cells[1]["verified"]
    # A failed cell is run again next time; the finished one is kept.
    CALLS.clear()
    invoke(["bench", path, "--out", out])
    assert CALLS == [-1.0]


def test_outputs_are_written_and_escape_labels(tmp_path, target):
    path = _config(tmp_path, target, SCALE)
    out = tmp_path / "out"
    result = invoke(["bench", path, "--out", out])
    assert result.exit_code == 0, result.output
    for name in ("results.csv", "results.json", "plots.png", "report.md", "report.html"):
        assert f"wrote {out / name}" in result.output
    with (out / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert (
        len(rows) == 2 and rows[1]["factor" if "factor" in rows[1] else "strength_value"] == "0.0"
    )
    assert float(rows[0]["W2 bits log10_p"]) < -100 and rows[0]["W2 payload valid"] == "True"
    with Image.open(out / "plots.png") as image:
        assert image.size[0] >= 400 and image.size[1] >= 300
    html = (out / "report.html").read_text()
    assert "scale &lt;b&gt;&amp;&lt;/b&gt;" in html and "<b>&</b>" not in html
    assert "data:image/png;base64," in html
    md = (out / "report.md").read_text()
    assert "| scale <b>&</b> | factor=0.0 |" in md and "## Where the evidence was lost" in md
    assert "robustness benchmark" in result.output  # the terminal table


def test_two_workers_give_the_same_cells_as_one(tmp_path, target):
    body = (
        '[[attack]]\nname = "prune"\n[attack.params]\nrate = [0.3, 0.6]\n'
        '[[attack]]\nname = "noise"\n[attack.params]\nsigma = 0.2\n'
    )
    path = _config(tmp_path, target, body)
    one = run_bench(load_config(path), tmp_path / "one").cells
    two = run_bench(load_config(path, {"workers": 2}), tmp_path / "two").cells
    keys = ("id", "accuracy_after", "verified", "evidence", "details")
    assert [{k: c[k] for k in keys} for c in one] == [{k: c[k] for k in keys} for c in two]
    assert torch.tensor([c["accuracy_after"] for c in one]).isfinite().all()
