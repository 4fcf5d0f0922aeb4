"""Iterative magnitude pruning with rewinding on the digits task."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ticketguard.errors import ConfigError, RunStateError
from ticketguard.tickets import paths
from ticketguard.tickets.finding import FindConfig, find_ticket, parse_rewind
from ticketguard.tickets.models import build_model
from ticketguard.tickets.pruning import PruneConfig
from ticketguard.tickets.ticket import load_ticket
from ticketguard.tickets.training import TrainConfig, derive_seed

SMALL = FindConfig(rounds=2, train=TrainConfig(epochs=2), arch_kwargs={"width": 8})


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    return find_ticket(SMALL, out, device="cpu")


def test_run_writes_every_round_the_final_ticket_and_the_log(small_run) -> None:
    out = small_run.run_dir
    for r in range(3):
        assert paths.round_ticket(out, r).is_file()
    assert paths.final_ticket(out).read_bytes() == paths.round_ticket(out, 2).read_bytes()
    log = json.loads(paths.log_file(out).read_text())
    assert [rec["round"] for rec in log["rounds"]] == [0, 1, 2]
    assert log["config_hash"] == SMALL.config_hash
    config = json.loads(paths.config_file(out).read_text())
    assert config["pruned_layers"] == ["conv2.weight", "conv3.weight", "fc1.weight"]


def test_each_round_prunes_a_fifth_of_the_survivors_and_masks_only_shrink(small_run) -> None:
    tickets = [load_ticket(paths.round_ticket(small_run.run_dir, r)) for r in range(3)]
    total = tickets[0].mask.num_weights
    assert tickets[0].mask.num_surviving == total
    for prev, cur in zip(tickets, tickets[1:], strict=False):
        assert cur.mask.is_subset_of(prev.mask)
        assert prev.mask.num_surviving - cur.mask.num_surviving == round(
            0.2 * prev.mask.num_surviving
        )
    assert tickets[2].mask.density == pytest.approx(0.64, abs=1e-4)


def test_excluded_layers_stay_dense_and_masked_weights_are_zero(small_run) -> None:
    ticket = small_run.ticket
    assert set(ticket.mask) == {"conv2.weight", "conv3.weight", "fc1.weight"}
    for name in ("conv1.weight", "fc.weight"):
        assert int((ticket.trained[name] == 0).sum()) == 0
    for name, m in ticket.mask.items():
        assert bool((ticket.trained[name][~m] == 0).all())
        assert int((ticket.trained[name][m] == 0).sum()) == 0


def test_rewind_point_zero_is_the_initialisation(small_run) -> None:
    torch.manual_seed(derive_seed(SMALL.seed, "init"))
    init = build_model("digits_cnn", 10, {"width": 8}).state_dict()
    rewind = small_run.ticket.rewind
    assert all(torch.equal(rewind[k], init[k]) for k in init)
    # Every round rewinds to the same point.
    first = load_ticket(paths.round_ticket(small_run.run_dir, 1))
    assert all(torch.equal(first.rewind[k], rewind[k]) for k in rewind)


def test_metadata_records_what_a_user_needs(small_run) -> None:
    meta = small_run.ticket.metadata
    assert meta["architecture"] == {"name": "digits_cnn", "kwargs": {"width": 8}}
    assert meta["num_classes"] == 10 and meta["input_shape"] == [1, 8, 8]
    assert meta["dataset"] == {"name": "digits", "split_seed": 0}
    assert meta["finding"]["config_hash"] == SMALL.config_hash and meta["finding"]["round"] == 2
    assert 0.5 < meta["accuracy"]["test"] <= 1.0 and 0.5 < meta["accuracy"]["dense_test"] <= 1.0
    stored = load_ticket(paths.final_ticket(small_run.run_dir)).metadata
    assert stored["fingerprint"] == small_run.ticket.fingerprint
    assert stored["sparsity"]["sparsity"] == pytest.approx(0.36, abs=1e-4)
    model = small_run.ticket.build_model()
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_same_seed_gives_a_byte_identical_ticket(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    config = FindConfig(rounds=1, train=TrainConfig(epochs=1), arch_kwargs={"width": 8})
    a = find_ticket(config, tmp_path / "a", device="cpu")
    b = find_ticket(config, tmp_path / "b", device="cpu")
    assert paths.final_ticket(a.run_dir).read_bytes() == paths.final_ticket(b.run_dir).read_bytes()
    assert a.ticket.metadata["created"] == "2023-11-14T22:13:20Z"
    other = find_ticket(
        FindConfig(rounds=1, train=TrainConfig(epochs=1), arch_kwargs={"width": 8}, seed=1),
        tmp_path / "c",
        device="cpu",
    )
    assert other.ticket.fingerprint != a.ticket.fingerprint


def test_resume_continues_an_interrupted_run_to_the_same_ticket(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    config = FindConfig(rounds=2, train=TrainConfig(epochs=1), arch_kwargs={"width": 8})
    full = find_ticket(config, tmp_path / "full", device="cpu")
    out = tmp_path / "cut"
    shutil.copytree(full.run_dir, out)
    paths.round_ticket(out, 2).unlink()  # as if the run died during round 2
    paths.final_ticket(out).unlink()
    with pytest.raises(RunStateError, match="--resume"):
        find_ticket(config, out, device="cpu")
    resumed = find_ticket(config, out, device="cpu", resume=True)
    assert paths.final_ticket(out).read_bytes() == paths.final_ticket(full.run_dir).read_bytes()
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2]
    with pytest.raises(RunStateError, match="different configuration"):
        find_ticket(
            FindConfig(rounds=2, train=TrainConfig(epochs=1), arch_kwargs={"width": 8}, seed=1),
            out,
            device="cpu",
            resume=True,
        )


class _Notes:
    """A silent reporter that keeps the notes a run gives about its folder."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, line: str) -> None:
        self.notes.append(line)

    def round_started(self, round_index: int, iterations: int) -> None:
        pass

    def advance(self, steps: int) -> None:
        pass

    def round_finished(self, record) -> None:
        pass


def test_resume_redoes_a_truncated_last_round_and_removes_temporary_files(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    config = FindConfig(rounds=2, train=TrainConfig(epochs=1), arch_kwargs={"width": 8})
    full = find_ticket(config, tmp_path / "full", device="cpu")
    out = tmp_path / "cut"
    shutil.copytree(full.run_dir, out)
    last = paths.round_ticket(out, 2)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a truncated round file
    paths.final_ticket(out).unlink()
    stray = [out / ".final.ticket.k2j4x9q1.tmp", out / "rounds" / ".round-02.ticket.ab_cd123.tmp"]
    for path in stray:
        path.write_bytes(b"half")
    reporter = _Notes()
    resumed = find_ticket(config, out, device="cpu", resume=True, reporter=reporter)
    redone = [n for n in reporter.notes if n.startswith("redoing round")]
    assert len(redone) == 1 and redone[0].startswith("redoing round 2: ")
    assert "round-02.ticket is damaged" in redone[0]
    assert any("removed 2 staging/temporary file(s)" in n for n in reporter.notes)
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2]
    assert "redone" in resumed.rounds[2] and "redone" not in resumed.rounds[1]
    log = json.loads(paths.log_file(out).read_text())
    assert "damaged" in log["rounds"][2]["redone"]
    assert paths.final_ticket(out).read_bytes() == paths.final_ticket(full.run_dir).read_bytes()
    assert not any(p.exists() for p in stray)
    assert not [p.name for p in out.rglob(".*")]  # no lock, journal or temporary file left


def test_a_damaged_round_is_redone_with_every_round_after_it(tmp_path, small_run) -> None:
    out = tmp_path / "mid"
    shutil.copytree(small_run.run_dir, out)
    paths.round_ticket(out, 1).write_bytes(b"not a ticket")
    reporter = _Notes()
    resumed = find_ticket(SMALL, out, device="cpu", resume=True, reporter=reporter)
    assert [n.split(":")[0] for n in reporter.notes] == ["redoing round 1", "redoing round 2"]
    assert [bool(r.get("redone")) for r in resumed.rounds] == [False, True, True]
    assert resumed.ticket.mask.is_subset_of(load_ticket(paths.round_ticket(out, 1)).mask)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[" * 5000 + b"]" * 5000, "nested deeper than"),
        (b'{"run_hash": "\xff\xfe"}', "not UTF-8"),
        (b'{"run_hash": 1, "run_hash": 2}', "duplicate key"),
    ],
)
def test_resume_reads_config_json_strictly(tmp_path, content, message) -> None:
    from cli_helpers import error_line, invoke

    out = tmp_path / "run"
    out.mkdir()
    paths.config_file(out).write_bytes(content)
    line = error_line(invoke(["find", "--out", out, "--resume", "--rounds", "0"]), 1)
    assert message in line and str(paths.config_file(out)) in line
    with pytest.raises(RunStateError, match=message):
        find_ticket(SMALL, out, device="cpu", resume=True)


def test_more_rounds_extend_a_finished_run(tmp_path, small_run) -> None:
    out = tmp_path / "more"
    shutil.copytree(small_run.run_dir, out)
    longer = FindConfig(rounds=3, train=SMALL.train, arch_kwargs={"width": 8})
    result = find_ticket(longer, out, device="cpu", resume=True)
    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3]
    assert result.ticket.mask.is_subset_of(load_ticket(paths.round_ticket(out, 2)).mask)
    assert result.ticket.mask.density == pytest.approx(0.8**3, abs=1e-4)
    assert json.loads(paths.config_file(out).read_text())["config"]["rounds"] == 3


def test_a_rewind_point_in_epochs_is_not_the_initialisation(tmp_path) -> None:
    config = FindConfig(
        rounds=1,
        rewind="1ep",
        train=TrainConfig(epochs=2),
        arch_kwargs={"width": 8},
        prune=PruneConfig(0.5, "layerwise"),
    )
    result = find_ticket(config, tmp_path / "r", device="cpu")
    torch.manual_seed(derive_seed(config.seed, "init"))
    init = build_model("digits_cnn", 10, {"width": 8}).state_dict()
    assert not torch.equal(result.ticket.rewind["conv2.weight"], init["conv2.weight"])
    for stat in result.ticket.mask.layer_stats():
        assert abs(stat.surviving - stat.total / 2) <= 1


def test_rewind_parsing_and_bad_values() -> None:
    assert parse_rewind("0") == (0, "it")
    assert parse_rewind("3ep") == (3, "ep")
    assert parse_rewind("500it") == (500, "it")
    with pytest.raises(ConfigError):
        parse_rewind("abc")
    with pytest.raises(ConfigError, match="not before the end"):
        FindConfig(rewind="50ep", train=TrainConfig(epochs=2)).rewind_iteration(10)


def test_config_round_trips_through_its_dict() -> None:
    config = FindConfig(
        rounds=3,
        layers=("conv2",),
        prune=PruneConfig(0.3, "layerwise"),
        train=TrainConfig(milestones=(0.3,)),
    )
    assert FindConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.config_hash != FindConfig().config_hash


@pytest.mark.slow
def test_acceptance_digits_ticket_at_89_percent_sparsity_keeps_accuracy(tmp_path) -> None:
    result = find_ticket(FindConfig(rounds=10), tmp_path / "accept", device="cpu")
    acc = result.ticket.metadata["accuracy"]
    print(
        f"dense {acc['dense_test']:.4f} ticket {acc['test']:.4f} sparsity {result.ticket.mask.sparsity:.4f}"
    )
    assert acc["dense_test"] >= 0.95
    assert result.ticket.mask.sparsity >= 0.89
    assert acc["test"] >= acc["dense_test"] - 0.02


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for i in range(20):
            pixels = (torch.rand(40, 36, 3, generator=g) * 255).to(torch.uint8).numpy()
            if cls == "dog":
                pixels[:, :18] = 255  # a learnable difference between the classes
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def test_find_on_an_image_folder_with_resnet20(tmp_path, image_folder) -> None:
    config = FindConfig(
        arch="resnet20",
        dataset=f"imagefolder:{image_folder}",
        rounds=1,
        train=TrainConfig(epochs=1, batch_size=8),
    )
    result = find_ticket(config, tmp_path / "run", device="cpu")
    assert result.ticket.metadata["input_shape"] == [3, 32, 32]
    assert result.ticket.num_classes == 2
    assert result.ticket.mask.num_weights == 267_264
    assert result.ticket.mask.num_surviving == 267_264 - round(0.2 * 267_264)


def test_find_with_a_torchvision_model_adam_and_a_step_schedule(tmp_path, image_folder) -> None:
    config = FindConfig(
        arch="torchvision:resnet18",
        dataset=f"imagefolder:{image_folder}",
        image_size=24,
        rounds=1,
        prune=PruneConfig(0.5, "layerwise"),
        train=TrainConfig(epochs=2, batch_size=8, optimizer="adam", lr=1e-3, schedule="step"),
    )
    result = find_ticket(config, tmp_path / "tv", device="cpu")
    ticket = result.ticket
    assert ticket.metadata["input_shape"] == [3, 24, 24]
    assert "conv1.weight" not in ticket.mask and "fc.weight" not in ticket.mask
    assert "layer4.1.conv2.weight" in ticket.mask
    for stat in ticket.mask.layer_stats():
        assert abs(stat.surviving - stat.total / 2) <= 1
    rebuilt = ticket.build_model()
    assert rebuilt(torch.zeros(1, 3, 24, 24)).shape == (1, 2)
