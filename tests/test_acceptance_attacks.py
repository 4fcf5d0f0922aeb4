"""Acceptance of the attacks, the robustness benchmark and disputes on the owner's digits ticket.

The owner's ticket (W2 signature and a generated trigger set, signed with a fixed key) is run
through `ticketguard bench` at the default strengths; each cell is verified as a judge would
(revealed seed, the owner's ticket as reference for channel alignment, the 128-bit security
level). The owner's evidence must survive masked and dense fine-tuning, pruning up to 50%,
noise, int8, permutation and regrowth (verified, whatever the accuracy drop, which is
reported); the cells that leave the mask unchanged must say so; distillation must show
the white-box signature lost; 1000 random keys must verify nothing; a forged claim must lose
its dispute to the true owner.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from cli_helpers import invoke
from PIL import Image

#: Acceptance tests find and sign real tickets: they run in `make test-all` (CI), not `make test`.
pytestmark = pytest.mark.slow

CONFIG = """
name = "acceptance"
seeds = [0]
alpha = 1e-6
max_drop = 0.05
data_fraction = 0.5
blackbox = true
reference = true
null_samples = 20
device = "cpu"
workers = 1

[[attack]]
name = "finetune"
[attack.params]
mode = ["masked", "dense"]
epochs = 5

[[attack]]
name = "prune"
[attack.params]
method = "magnitude"
rate = [0.2, 0.5]

[[attack]]
name = "noise"
[attack.params]
sigma = 0.1

[[attack]]
name = "quantize"
[attack.params]
bits = 8

[[attack]]
name = "permute"

[[attack]]
name = "regrow"
[attack.params]
fraction = 0.1

[[attack]]
name = "distill"
[attack.params]
epochs = 10

[[attack]]
name = "key-search"
[attack.params]
tries = 1000

[[attack]]
name = "forge"
"""

#: log10 of the p-value the best surviving piece of evidence must beat: the 128-bit level, so
#: that the statistical evidence would verify even without the decoded payload.
SURVIVES_BELOW_LOG10 = -128 * math.log10(2.0)


@pytest.fixture(scope="module")
def bench(signed_owner: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the benchmark once through the command line; return its output folder."""
    root = tmp_path_factory.mktemp("bench")
    config = root / "acceptance.toml"
    config.write_text(CONFIG, encoding="utf-8")
    out = root / "out"
    result = invoke(
        [
            "bench",
            config,
            "--out",
            out,
            "--ticket",
            signed_owner["signed"],
            "--credential",
            signed_owner["cred"],
            "--secret",
            signed_owner["secret"],
        ],
        env={"COLUMNS": "300", "SOURCE_DATE_EPOCH": "1795000000"},
    )
    print("\n" + result.output)
    assert result.exit_code == 0, result.output
    return out


def _cells(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))["cells"]


def _cell(out: Path, attack: str, **params: object) -> dict:
    found = [
        c
        for c in _cells(out)
        if c["attack"] == attack and all(c["params"].get(k) == v for k, v in params.items())
    ]
    assert len(found) == 1, (attack, params, [c["params"] for c in _cells(out)])
    return found[0]


def _best_log10_p(cell: dict) -> float:
    values = [e["log10_p"] for e in cell["evidence"] if e.get("log10_p") is not None]
    return min(values) if values else 0.0


@pytest.mark.parametrize(
    ("attack", "params"),
    [
        ("finetune", {"mode": "masked"}),
        ("finetune", {"mode": "dense"}),
        ("prune", {"rate": 0.2}),
        ("prune", {"rate": 0.5}),
        ("noise", {}),
        ("quantize", {"bits": 8}),
        ("permute", {}),
        ("regrow", {}),
    ],
)
def test_owner_evidence_survives_at_default_strengths(bench: Path, attack: str, params: dict):
    """The W2 code is built for these attacks: the owner verifies after each, with evidence far
    below the threshold, whatever the attack cost the thief (the accuracy drop is measured and
    reported, not asserted: after 50% magnitude pruning it depends on the machine's
    floating-point path, and the strong carriers make the signed ticket lose more)."""
    cell = _cell(bench, attack, **params)
    assert cell.get("error") is None, cell.get("error")
    print(f"{attack} {params}: drop {100 * cell['drop']:.2f} points, {cell['reason']}")
    assert cell["verified"], cell["reason"]
    assert _best_log10_p(cell) < SURVIVES_BELOW_LOG10, cell["evidence"]
    assert not cell["attack_succeeded"]


def test_cells_that_keep_the_mask_are_not_counted_for_w2(bench: Path):
    """Masked fine-tuning and noise on the survivors leave the mask, where W2 lives, as it was."""
    for attack, params in (("finetune", {"mode": "masked"}), ("noise", {})):
        assert _cell(bench, attack, **params)["mask_unchanged"] is True, attack
    for attack, params in (("finetune", {"mode": "dense"}), ("prune", {"rate": 0.2})):
        assert _cell(bench, attack, **params)["mask_unchanged"] is False, attack
    report = (bench / "report.md").read_text(encoding="utf-8")
    assert "mask unchanged: W2 cannot be affected" in report.split("## Mask unchanged")[1]


def test_distillation_loses_the_white_box_signature_and_the_report_says_so(bench: Path):
    cell = _cell(bench, "distill")
    white = [e for e in cell["evidence"] if e["name"].startswith("W2")]
    assert white, cell["evidence"]
    for evidence in white:
        if evidence.get("log10_p") is not None:
            assert evidence["log10_p"] > math.log10(1e-6 / 3), evidence
        else:
            assert evidence.get("valid") is not True, evidence
    report = (bench / "report.md").read_text(encoding="utf-8")
    assert "distill" in report


def test_key_search_with_1000_keys_verifies_nothing(bench: Path):
    cell = _cell(bench, "key-search", tries=1000)
    assert cell["details"]["tries"] == 1000
    assert cell["details"]["verified"] == 0
    assert not cell["attack_succeeded"]


def test_a_forged_claim_loses_the_dispute_to_the_true_owner(bench: Path):
    cell = _cell(bench, "forge")
    assert cell["winner"] == "owner", cell
    assert not cell["attack_succeeded"]


def test_outputs_are_complete(bench: Path):
    cells = _cells(bench)
    with (bench / "results.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cells) == 11
    with Image.open(bench / "plots.png") as image:
        assert image.size[0] >= 600 and image.size[1] >= 300
    html = (bench / "report.html").read_text(encoding="utf-8")
    assert "<img" in html and "data:image/png;base64," in html
    for name in ("finetune", "prune", "permute", "key-search", "forge"):
        assert name in html
