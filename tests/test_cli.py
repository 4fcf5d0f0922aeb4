"""Tests of the `ticketguard` command line: help, error handling, and a real find/inspect run."""

from __future__ import annotations

import json
import pathlib
import random
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from cli_helpers import error_line, invoke
from safetensors import safe_open
from safetensors.torch import save_file

import ticketguard
from ticketguard.cli import cli
from ticketguard.tickets.models import DigitsCNN, known_architectures
from ticketguard.tickets.ticket import load_ticket

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = sorted(cli.commands)
DEFAULT_PRUNED = ["conv2.weight", "conv3.weight", "fc1.weight"]
# A tiny, fast run: two rounds (dense + one pruning round) of one epoch on a width-4 DigitsCNN.
FAST_FIND = ["--rounds", "1", "--epochs", "1", "--arch-arg", "width=4", "--quiet"]
FIXED_TIME = {"SOURCE_DATE_EPOCH": "1700000000"}
# Runs whose results are compared byte for byte stay on the CPU, where training is deterministic.
CPU = ["--device", "cpu"]


def _weights_state(width: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DigitsCNN state dict whose conv/linear weights are all non-zero."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in DigitsCNN(width=width).state_dict().items()}
    for name in ("conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc.weight"):
        state[name] = torch.rand(state[name].shape, generator=gen) + 0.1
    return state


# --- help and entry points -----------------------------------------------------------------------


def test_commands_are_registered():
    assert {"find", "inspect"} <= set(COMMANDS)
    result = invoke(["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help(name):
    result = invoke([name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:")
    summary = cli.commands[name].help
    assert summary and summary.strip()
    assert summary.strip().splitlines()[0] in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_command_is_documented_in_readme(name):
    assert README.is_file(), f"{README} is missing"
    assert f"ticketguard {name}" in README.read_text(encoding="utf-8")


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"ticketguard, version {ticketguard.__version__}"


def test_python_dash_m_help(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ticketguard", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    for name in COMMANDS:
        assert name in proc.stdout
    assert "Traceback" not in proc.stderr


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["verify", "dispute"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "-1 is not in the range 0<=x<=4096."),
        ("4097", "4097 is not in the range 0<=x<=4096."),
        ("1.5", "'1.5' is not a valid integer range."),
        ("many", "'many' is not a valid integer range."),
    ],
)
def test_bad_security_bits_is_a_one_line_error(tmp_path, command, value, message):
    # verify takes a SUSPECT argument, dispute only options; the option is checked first.
    args = [command, tmp_path / "suspect.pt"] if command == "verify" else [command]
    result = invoke([*args, "--security-bits", value])
    assert error_line(result, 2) == f"Error: Invalid value for '--security-bits': {message}"


@pytest.mark.parametrize("command", ["verify", "dispute"])
def test_security_bits_and_alpha_are_explained_in_help(command):
    text = " ".join(invoke([command, "--help"]).output.split())
    assert "--security-bits INTEGER RANGE" in text and "[default: 128; 0<=x<=4096]" in text
    assert "0 restores the plain alpha rule" in text
    assert "applies only with --security-bits 0" in text


def test_inspect_missing_file(tmp_path):
    path = tmp_path / "absent.ticket"
    line = error_line(invoke(["inspect", path]), 2)
    assert "does not exist" in line and str(path) in line


@pytest.mark.parametrize(
    "kind",
    [
        "random-bytes",
        "empty",
        "truncated-ticket",
        pytest.param(
            "text",
        ),
    ],
)
def test_inspect_corrupt_file(tmp_path, make_ticket, kind):
    path = tmp_path / "corrupt.bin"
    if kind == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(2048))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated-ticket":
        full = tmp_path / "full.ticket"
        make_ticket().save(full)
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_text("just some notes\nnot a model\n")
    result = invoke(["inspect", path])
    line = error_line(result, 1)
    assert str(path) in line
    assert result.output.strip().splitlines() == [line]  # one line, nothing else


def test_find_unknown_architecture(tmp_path):
    out = tmp_path / "run"
    line = error_line(invoke(["find", "--out", out, "--arch", "nosuchnet", *FAST_FIND]), 2)
    assert "nosuchnet" in line
    for name in known_architectures():
        assert name in line
    assert not out.exists()


def test_inspect_unknown_architecture(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(_weights_state(), path)
    line = error_line(invoke(["inspect", "--arch", "nosuchnet", path]), 2)
    assert "nosuchnet" in line
    for name in known_architectures():
        assert name in line


def test_inspect_ticket_with_mask_shape_mismatch(tmp_path, make_ticket):
    path = tmp_path / "bad.ticket"
    make_ticket().save(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    tensors["mask::conv3.weight"] = tensors["mask::conv3.weight"][:4].contiguous()
    save_file(tensors, str(path), metadata=metadata)

    line = error_line(invoke(["inspect", path]), 1)
    assert "conv3.weight" in line and "shape" in line


class _Touch:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def test_inspect_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _weights_state(), "hook": _Touch(marker)}, path)
    line = error_line(invoke(["inspect", path]), 1)
    assert "refused" in line and str(path) in line
    assert not marker.exists()


def test_find_bad_rewind(tmp_path):
    out = tmp_path / "run"
    line = error_line(invoke(["find", "--out", out, "--rewind", "abc", *FAST_FIND]), 2)
    assert "'abc'" in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_find_cuda_without_cuda(tmp_path):
    out = tmp_path / "run"
    line = error_line(invoke(["find", "--out", out, "--device", "cuda", *FAST_FIND]), 2)
    assert "cuda" in line.lower() and "no CUDA device" in line
    assert not out.exists()


def test_find_refuses_a_foreign_directory(tmp_path):
    out = tmp_path / "stuff"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = error_line(invoke(["find", "--out", out, *FAST_FIND]), 1)
    assert "not a ticketguard run" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --- a real run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("find") / "run"
    result = invoke(["find", "--out", out, *FAST_FIND, *CPU], env=FIXED_TIME)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run, for tests that touch it."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _file_state(run: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(run.rglob("*.ticket"))
    }


def test_find_writes_the_run(finished_run):
    for rel in (
        "final.ticket",
        "rounds/round-00.ticket",
        "rounds/round-01.ticket",
        "log.json",
        "config.json",
    ):
        assert (finished_run / rel).is_file(), rel
    assert not (finished_run / "rounds/round-02.ticket").exists()

    config = json.loads((finished_run / "config.json").read_text())
    assert config["pruned_layers"] == DEFAULT_PRUNED
    assert config["config"]["rounds"] == 1 and config["config"]["train"]["epochs"] == 1
    assert config["config"]["arch_kwargs"] == {"width": 4}

    log = json.loads((finished_run / "log.json").read_text())
    assert [r["round"] for r in log["rounds"]] == [0, 1]
    assert log["config_hash"] == config["config_hash"]
    dense = load_ticket(finished_run / "rounds/round-00.ticket")
    first = load_ticket(finished_run / "rounds/round-01.ticket")
    final = load_ticket(finished_run / "final.ticket")
    assert dense.mask.sparsity == 0.0
    assert first.mask.is_subset_of(dense.mask)
    assert final.fingerprint == first.fingerprint
    assert log["rounds"][1]["sparsity"] == pytest.approx(final.mask.sparsity)
    assert final.mask.sparsity == pytest.approx(0.2, abs=1e-3)


def test_inspect_json_of_the_final_ticket(finished_run):
    path = finished_run / "final.ticket"
    result = invoke(["inspect", path, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    ticket = load_ticket(path)
    assert report["format"] == "ticket"
    assert report["architecture"] == "digits_cnn"
    assert report["num_classes"] == 10
    assert report["mask_source"] == "explicit"
    assert report["fingerprint"] == ticket.fingerprint
    assert [layer["name"] for layer in report["sparsity"]["layers"]] == DEFAULT_PRUNED
    assert report["sparsity"]["sparsity"] == pytest.approx(0.2, abs=1e-3)
    # The reported numbers are the ticket's own counts.
    masks = [ticket.mask[n] for n in DEFAULT_PRUNED]
    assert report["sparsity"]["total"] == sum(m.numel() for m in masks)
    assert report["sparsity"]["surviving"] == sum(int(m.sum()) for m in masks)


def test_inspect_eval(finished_run):
    path = finished_run / "final.ticket"
    recorded = load_ticket(path).metadata["accuracy"]["test"]

    result = invoke(["inspect", path, "--eval", "digits", "--json", *CPU])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.output)["evaluation"]
    assert evaluation["dataset"] == "digits" and evaluation["split"] == "test"
    assert evaluation["samples"] > 0
    # Same weights, same split: the accuracy recorded while finding is measured again.
    assert evaluation["accuracy"] == pytest.approx(recorded, abs=1e-9)

    result = invoke(["inspect", path, "--eval", "digits", *CPU])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("test accuracy")]
    assert len(lines) == 1
    assert f"{100 * recorded:.2f}%" in lines[0]


def test_resume_of_a_finished_run_changes_nothing(run_copy):
    before = _file_state(run_copy)
    log_before = json.loads((run_copy / "log.json").read_text())
    result = invoke(["find", "--out", run_copy, "--resume", "--quiet", *CPU], env=FIXED_TIME)
    assert result.exit_code == 0, result.output
    after = _file_state(run_copy)
    assert after["final.ticket"][0] == before["final.ticket"][0]  # byte-identical
    for rel in ("rounds/round-00.ticket", "rounds/round-01.ticket"):
        assert after[rel] == before[rel], f"{rel} was rewritten: the round was trained again"
    log_after = json.loads((run_copy / "log.json").read_text())
    assert log_after["rounds"] == log_before["rounds"]


def test_resume_of_an_interrupted_run_reproduces_it(run_copy):
    final = (run_copy / "final.ticket").read_bytes()
    (run_copy / "final.ticket").unlink()
    (run_copy / "rounds/round-01.ticket").unlink()
    result = invoke(["find", "--out", run_copy, "--resume", "--quiet", *CPU], env=FIXED_TIME)
    assert result.exit_code == 0, result.output
    assert (run_copy / "rounds/round-01.ticket").is_file()
    assert (run_copy / "final.ticket").read_bytes() == final


def test_resume_with_a_changed_configuration_is_refused(run_copy):
    before = _file_state(run_copy)
    result = invoke(["find", "--out", run_copy, "--resume", "--lr", "0.2", "--quiet"])
    line = error_line(result, 1)
    assert "configuration" in line
    assert result.output.strip().splitlines() == [line]
    assert _file_state(run_copy) == before


def test_resume_with_more_rounds_extends_the_run(run_copy):
    round_1 = (run_copy / "rounds/round-01.ticket").read_bytes()
    result = invoke(["find", "--out", run_copy, "--resume", "--rounds", "2", *CPU, "--quiet"])
    assert result.exit_code == 0, result.output
    assert (run_copy / "rounds/round-01.ticket").read_bytes() == round_1
    final = load_ticket(run_copy / "final.ticket")
    assert final.fingerprint == load_ticket(run_copy / "rounds/round-02.ticket").fingerprint
    assert final.mask.is_subset_of(load_ticket(run_copy / "rounds/round-01.ticket").mask)
    assert final.mask.sparsity == pytest.approx(0.36, abs=1e-3)
    log = json.loads((run_copy / "log.json").read_text())
    assert [r["round"] for r in log["rounds"]] == [0, 1, 2]


def test_find_into_an_existing_run_needs_resume(run_copy):
    before = _file_state(run_copy)
    line = error_line(invoke(["find", "--out", run_copy, *FAST_FIND]), 1)
    assert "--resume" in line
    assert _file_state(run_copy) == before


# --- inspecting other files ----------------------------------------------------------------------


def test_inspect_plain_state_dict_reports_zero_pattern(tmp_path):
    state = _weights_state()
    zeros = {"conv2.weight": 77, "fc1.weight": 2000, "fc.weight": 5}
    for name, count in zeros.items():
        state[name].view(-1)[:count] = 0
    path = tmp_path / "plain.pt"
    torch.save(state, path)

    result = invoke(["inspect", path, "--arch", "digits_cnn", "--arch-arg", "width=4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["format"] == "pytorch"
    assert report["mask_source"] == "zero pattern"
    assert report["architecture"] == "digits_cnn"
    assert report["num_classes"] == 10
    names = ["conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc.weight"]
    layers = {layer["name"]: layer for layer in report["sparsity"]["layers"]}
    assert list(layers) == names
    for name in names:
        total = state[name].numel()
        assert layers[name]["total"] == total
        assert layers[name]["surviving"] == total - zeros.get(name, 0)
        assert layers[name]["sparsity"] == pytest.approx(zeros.get(name, 0) / total)
    total = sum(state[n].numel() for n in names)
    assert report["sparsity"]["sparsity"] == pytest.approx(sum(zeros.values()) / total)


def test_inspect_without_architecture_says_so(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(_weights_state(), str(path))
    result = invoke(["inspect", path])
    assert result.exit_code == 0, result.output
    assert "unknown (pass --arch)" in result.output
    assert "architecture unknown" in result.output
    assert click.unstyle(result.output) == result.output  # no colour codes when not a terminal


# --- review follow-ups: misfits, divergence, option checks, output --------------------------------


def test_a_model_that_cannot_take_the_data_fails_before_writing_anything(tmp_path):
    out = tmp_path / "tv"
    # torchvision's ResNet-18 wants 3 input channels; digits has 1.
    line = error_line(invoke(["find", "--out", out, "--arch", "resnet18", *FAST_FIND[:4], *CPU]), 1)
    assert "resnet18" in line and "(1, 8, 8)" in line
    assert not (out / "config.json").exists()
    result = invoke(["find", "--out", out, *FAST_FIND, *CPU])
    assert result.exit_code == 0, result.output


def test_a_diverging_run_says_so(tmp_path):
    line = error_line(
        invoke(["find", "--out", tmp_path / "d", "--lr", "1e12", *FAST_FIND, *CPU]), 1
    )
    assert "diverged" in line


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--momentum", "-1"),
        ("--weight-decay", "-1"),
        ("--gamma", "-1"),
        ("--workers", "-1"),
        ("--lr", "inf"),
        ("--dataset", "nosuchdata"),
    ],
)
def test_bad_option_values_are_usage_errors(tmp_path, option, value):
    out = tmp_path / "bad"
    line = error_line(invoke(["find", "--out", out, option, value, *FAST_FIND, *CPU]), 2)
    assert value.lstrip("-") in line or option.lstrip("-").replace("-", " ") in line
    assert not out.exists()


def test_a_broken_factory_argument_is_one_line(tmp_path):
    line = error_line(
        invoke(["find", "--out", tmp_path / "w", *FAST_FIND[:4], "--arch-arg", "width=0", *CPU]), 1
    )
    assert "'digits_cnn'" in line


def test_find_prints_a_per_round_table_and_prunes_only_the_chosen_layers(tmp_path):
    out = tmp_path / "layers"
    result = invoke(
        [
            "find",
            "--out",
            out,
            "--rounds",
            "1",
            "--epochs",
            "1",
            "--arch-arg",
            "width=4",
            "--layers",
            "conv2",
            "--layers",
            "fc1.*",
            *CPU,
        ]
    )
    assert result.exit_code == 0, result.output
    assert "ticket per round" in result.output
    assert "round  0: sparsity   0.00%" in result.output
    assert "round  1: sparsity  20.00%" in result.output
    ticket = load_ticket(out / "final.ticket")
    assert list(ticket.mask) == ["conv2.weight", "fc1.weight"]
    assert int((ticket.trained["conv3.weight"] == 0).sum()) == 0


def test_outputs_get_the_usual_file_mode(tmp_path, finished_run):
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in (finished_run / "final.ticket", finished_run / "log.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_inspect_does_not_import_an_architecture_named_by_the_file(
    tmp_path, make_ticket, monkeypatch
):
    ticket = make_ticket()
    ticket.metadata["architecture"] = {"name": "evil_module_tg:factory", "kwargs": {}}
    path = tmp_path / "t.ticket"
    ticket.save(path)
    (tmp_path / "evil_module_tg.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\ndef factory(num_classes=10): ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke(["inspect", path, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["fingerprint"] == ticket.fingerprint
    assert any("not imported" in note for note in report["notes"])
    assert not (tmp_path / "imported").exists()


def test_inspect_eval_on_a_plain_state_dict_matches_the_tickets_own_accuracy(
    tmp_path, finished_run
):
    ticket = load_ticket(finished_run / "final.ticket")
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": ticket.trained, "epoch": 1}, path)
    args = ["inspect", path, "--arch", "digits_cnn", "--arch-arg", "width=4", "--eval", "digits"]
    result = invoke([*args, "--json", *CPU])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["evaluation"]["accuracy"] == ticket.metadata["accuracy"]["test"]
    assert report["parameters"]["model"] == sum(
        p.numel() for p in ticket.build_model().parameters()
    )
    assert report["sparsity"]["surviving"] < report["sparsity"]["total"]
