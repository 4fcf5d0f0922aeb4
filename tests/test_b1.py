"""Black-box evidence (B1): signing with a trigger set, its commitment, and querying suspects."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import error_line, invoke
from torch import nn

from ticketguard.errors import ConfigError, CredentialError, TriggerSetError
from ticketguard.signatures.credential import read_credential, read_secret_document
from ticketguard.signatures.keys import read_private_key
from ticketguard.signatures.triggers import TriggerSet, generate_triggers
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.retrain import MixedTraining
from ticketguard.tickets.ticket import load_ticket
from ticketguard.tickets.training import ExtraSamples, TrainConfig, train
from ticketguard.verify.blackbox import CallableSuspect, ModelSuspect
from ticketguard.verify.stats import binomial_log10_tail
from ticketguard.verify.verification import resolve_triggers, trigger_field, verify

TRIGGERS = 20


@pytest.fixture(scope="module")
def owner(make_ticket, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Alice signs a small digits ticket with a generated trigger set (a short training)."""
    root = tmp_path_factory.mktemp("b1-owner")
    ticket = make_ticket(width=32, keep=0.3)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    ticket.save(root / "parent.ticket")
    result = invoke(["keygen", "--owner", "alice@example.org", "--out", root / "alice"])
    assert result.exit_code == 0, result.output
    result = invoke(
        [
            "sign",
            root / "parent.ticket",
            "--key",
            root / "alice.key",
            "--out",
            root / "signed.ticket",
            "--trigger",
            "generate",
            "--trigger-size",
            TRIGGERS,
            "--recover-epochs",
            1,
            "--trigger-epochs",
            2,
            "--device",
            "cpu",
        ]
    )
    assert result.exit_code == 0, result.output
    secret = read_secret_document(root / "signed.secret.json")
    return {
        "root": root,
        "parent": root / "parent.ticket",
        "signed": root / "signed.ticket",
        "cred": root / "signed.cred.json",
        "secret": root / "signed.secret.json",
        "key": root / "alice.key",
        "output": result.output,
        "triggers": TriggerSet.from_dict(secret["trigger_set"]),
        "seed": bytes.fromhex(secret["seed"]),
    }


def _oracle(triggers: TriggerSet, inputs_of: TriggerSet | None = None) -> CallableSuspect:
    """A suspect that knows the trigger labels: it looks each input up among the triggers."""
    norm = inputs_of or triggers
    table = {}

    def predict(x: torch.Tensor) -> np.ndarray:
        out = []
        for row in x:
            key = row.numpy().tobytes()
            out.append(table[key])
        return np.array(out)

    for label, row in zip(triggers.labels, _inputs(norm), strict=True):
        table[row.numpy().tobytes()] = int(label)
    return CallableSuspect(predict, "oracle")


def _inputs(triggers: TriggerSet) -> torch.Tensor:
    from ticketguard.tickets.data import pixel_normalization

    mean, std = pixel_normalization("digits")
    return triggers.inputs(mean, std)


def _key(owner: dict):
    return read_private_key(owner["key"])


# --- signing -------------------------------------------------------------------------------------


def test_sign_commits_to_the_trigger_set_and_keeps_it_secret(owner: dict) -> None:
    credential = read_credential(owner["cred"])
    assert credential.valid, credential.problems
    record = credential.document["trigger_set"]
    triggers = owner["triggers"]
    assert record["scheme"] == "B1"
    assert record["source"] == "generated"
    assert record["size"] == TRIGGERS == triggers.size
    assert record["input_shape"] == [1, 8, 8]
    assert record["num_classes"] == 10
    assert record["commitment"] == triggers.commitment()
    # The set is the one drawn from the embedding seed; the credential holds no image or label.
    assert triggers == generate_triggers(owner["seed"], TRIGGERS, (1, 8, 8), 10)
    assert "labels" not in record and "images" not in record
    mean, std = record["normalization"]["mean"], record["normalization"]["std"]
    assert len(mean) == len(std) == 1 and std[0] > 0
    assert 0 <= record["accuracy"] <= 1
    signed = load_ticket(owner["signed"])
    assert signed.metadata["signature"]["trigger_set"] == record["commitment"]
    assert f"trigger set: {TRIGGERS} images (generated)" in owner["output"]


def _sign(owner: dict, out: Path, *extra: object):
    """Run `ticketguard sign` on the owner's parent ticket with extra options."""
    return invoke(["sign", owner["parent"], "--key", owner["key"], "--out", out, *extra])


def test_sign_refuses_a_trigger_that_is_neither_generate_nor_a_folder(
    owner: dict, tmp_path: Path
) -> None:
    result = _sign(owner, tmp_path / "x.ticket", "--trigger", tmp_path / "missing")
    assert "is neither 'generate' nor a folder" in error_line(result, 2)
    assert list(tmp_path.iterdir()) == []


def test_sign_refuses_trigger_labels_without_a_trigger_folder(owner: dict, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n")
    result = _sign(owner, tmp_path / "x.ticket", "--trigger-labels", labels)
    assert "--trigger-labels belongs to --trigger generate|DIR" in error_line(result, 2)


@pytest.mark.parametrize("option", [["--trigger-size", "5"], ["--trigger-lr", "0.1"]])
def test_sign_refuses_trigger_options_without_a_trigger(
    owner: dict, tmp_path: Path, option: list
) -> None:
    result = _sign(owner, tmp_path / "x.ticket", *option)
    assert f"{option[0]} belongs to --trigger" in error_line(result, 2)


@pytest.mark.parametrize("option", [["--timeout", "1"], ["--send", "png"], ["--retries", "0"]])
def test_cli_endpoint_options_need_an_endpoint(owner: dict, option: list) -> None:
    result = invoke(
        ["verify", owner["signed"], "--credential", owner["cred"], "--key", owner["key"], *option]
    )
    assert f"{option[0]} belongs to --endpoint" in error_line(result, 2)


def test_sign_with_a_bad_trigger_folder_writes_nothing(owner: dict, tmp_path: Path) -> None:
    folder = tmp_path / "set"
    (folder / "pics").mkdir(parents=True)
    result = _sign(owner, tmp_path / "out" / "x.ticket", "--trigger", folder)
    line = error_line(result, 1)
    assert str(folder) in line
    assert not (tmp_path / "out").exists()


# --- the credential's trigger field --------------------------------------------------------------


def _record(owner: dict) -> dict:
    return json.loads(json.dumps(read_credential(owner["cred"]).document["trigger_set"]))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scheme", "B2"),
        ("source", "camera"),
        ("size", 0),
        ("size", True),
        ("num_classes", 1),
        ("input_shape", [1, 8]),
        ("input_shape", [1, 8, 0]),
        ("normalization", {"mean": [0.5], "std": [0.0]}),
        ("normalization", {"mean": [0.5, 0.5], "std": [1.0]}),
        ("normalization", {"mean": [float("nan")], "std": [1.0]}),
        ("commitment", "ABC"),
    ],
)
def test_trigger_field_rejects_malformed_records(owner: dict, field: str, value: object) -> None:
    record = _record(owner)
    record[field] = value
    with pytest.raises(TriggerSetError, match="trigger_set field"):
        trigger_field({"trigger_set": record})


def test_trigger_field_missing_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="signed without --trigger"):
        trigger_field({})


def test_resolve_triggers_from_the_seed_and_from_the_secret(owner: dict) -> None:
    document = read_credential(owner["cred"]).document
    from_seed = resolve_triggers(document, owner["seed"], None)
    from_secret = resolve_triggers(document, owner["seed"], owner["secret"])
    assert from_seed == from_secret == owner["triggers"]


def _secret_with(owner: dict, triggers: TriggerSet, path: Path) -> Path:
    secret = read_secret_document(owner["secret"])
    secret["trigger_set"] = triggers.to_dict()
    path.write_text(json.dumps(secret))
    return path


def _relabelled(triggers: TriggerSet, source: str = "generated") -> TriggerSet:
    labels = triggers.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    names = tuple(f"{i}.png" for i in range(len(labels))) if source == "folder" else ()
    return TriggerSet(triggers.images, labels, source, names)


def test_resolve_triggers_refuses_a_seed_that_draws_another_set(owner: dict) -> None:
    document = read_credential(owner["cred"]).document
    with pytest.raises(TriggerSetError, match="does not match the credential's commitment"):
        resolve_triggers(document, b"\x01" * 32, None)


def test_a_generated_set_is_always_redrawn_from_the_seed(owner: dict, tmp_path: Path) -> None:
    """A claimant cannot pass off a hand-made set as 'generated', even with a matching commitment."""
    forged = _relabelled(owner["triggers"])
    document = json.loads(json.dumps(read_credential(owner["cred"]).document))
    document["trigger_set"]["commitment"] = forged.commitment()
    secret = _secret_with(owner, forged, tmp_path / "forged.secret.json")
    with pytest.raises(TriggerSetError, match="not the one drawn from the seed"):
        resolve_triggers(document, owner["seed"], secret)


def test_an_imported_set_must_match_the_commitment(owner: dict, tmp_path: Path) -> None:
    imported = _relabelled(owner["triggers"], "folder")
    document = json.loads(json.dumps(read_credential(owner["cred"]).document))
    document["trigger_set"]["source"] = "folder"
    document["trigger_set"]["commitment"] = imported.commitment()
    secret = _secret_with(owner, imported, tmp_path / "imported.secret.json")
    assert resolve_triggers(document, owner["seed"], secret) == imported
    other = _secret_with(owner, _relabelled(imported, "folder"), tmp_path / "other.secret.json")
    with pytest.raises(TriggerSetError, match="does not match the credential's commitment"):
        resolve_triggers(document, owner["seed"], other)


def test_resolve_triggers_of_an_imported_set_needs_the_secret(owner: dict) -> None:
    document = json.loads(json.dumps(read_credential(owner["cred"]).document))
    document["trigger_set"]["source"] = "folder"
    with pytest.raises(ConfigError, match="give --reveal"):
        resolve_triggers(document, owner["seed"], None)
    # With the revealed secret file, the set it holds is used (the commitment binds it).
    assert resolve_triggers(document, owner["seed"], owner["secret"]) == owner["triggers"]


def test_secret_with_a_trigger_set_round_trips(owner: dict) -> None:
    secret = read_secret_document(owner["secret"])
    assert secret["format"] == "ticketguard-secret/1"
    assert (
        TriggerSet.from_dict(secret["trigger_set"]).commitment()
        == (read_credential(owner["cred"]).document["trigger_set"]["commitment"])
    )


def test_secret_files_over_the_cap_are_refused(tmp_path: Path, monkeypatch) -> None:
    from ticketguard.signatures import credential

    monkeypatch.setattr(credential, "MAX_SECRET_BYTES", 100)
    big = tmp_path / "big.secret.json"
    big.write_text(" " * 101)
    with pytest.raises(CredentialError, match="larger than 100 bytes"):
        read_secret_document(big)


# --- black-box verification ----------------------------------------------------------------------


def test_a_suspect_that_answers_the_trigger_labels_is_verified(owner: dict) -> None:
    from ticketguard.verify.verification import VerifyConfig

    triggers = owner["triggers"]
    plain = VerifyConfig(security_bits=0)
    report = verify(
        None, credential=owner["cred"], key=_key(owner), blackbox=_oracle(triggers), config=plain
    )
    assert report.verified, report.verdict.reason
    (evidence,) = report.evidences
    assert evidence.name == "B1 triggers" and evidence.judged
    p0 = triggers.max_label_frequency()
    assert evidence.details["hits"] == TRIGGERS
    assert evidence.details["null_hit_rate"] == p0
    assert math.isclose(evidence.log10_p, TRIGGERS * math.log10(p0), rel_tol=1e-9)
    assert report.suspect["format"] == "black box (queried)"
    assert report.blackbox["requests"] == 1
    # A judge with the revealed secret reaches the same verdict without the key.
    judged = verify(
        None,
        credential=owner["cred"],
        reveal=owner["secret"],
        blackbox=_oracle(triggers),
        config=plain,
    )
    assert judged.verified
    assert judged.evidences[0].log10_p == evidence.log10_p
    # At the default 128-bit security level a set of 20 triggers cannot decide even when every
    # label matches: a claimant who retries seeds reaches such a p in far fewer than 2^128 tries.
    secure = verify(None, credential=owner["cred"], key=_key(owner), blackbox=_oracle(triggers))
    assert not secure.verified
    assert evidence.work_log2 is not None and evidence.work_log2 < 128
    assert f"(a forger reaches it in about {evidence.work_text})" in secure.verdict.reason
    assert any("128-bit security level" in note for note in secure.notes)


def test_a_constant_predictor_is_not_verified(owner: dict) -> None:
    triggers = owner["triggers"]
    values, counts = torch.unique(triggers.labels, return_counts=True)
    common = int(values[counts.argmax()])
    constant = CallableSuspect(lambda x: np.full(len(x), common), "constant")
    report = verify(None, credential=owner["cred"], key=_key(owner), blackbox=constant)
    assert not report.verified
    (evidence,) = report.evidences
    hits = int(counts.max())
    assert evidence.details["hits"] == hits
    # The conservative null makes the best constant predictor look exactly like chance.
    expected = binomial_log10_tail(TRIGGERS, hits, hits / TRIGGERS)
    assert evidence.log10_p == pytest.approx(expected)
    assert evidence.log10_p > math.log10(0.05)


def test_batches_follow_the_batch_size(owner: dict) -> None:
    from ticketguard.verify.verification import VerifyConfig

    seen: list[int] = []
    oracle = _oracle(owner["triggers"])

    def counting(x: torch.Tensor) -> np.ndarray:
        seen.append(len(x))
        return oracle.predict(x, x)

    report = verify(
        None,
        credential=owner["cred"],
        key=_key(owner),
        blackbox=CallableSuspect(counting, "counting"),
        config=VerifyConfig(batch_size=6, security_bits=0),
    )
    assert seen == [6, 6, 6, 2]
    assert report.blackbox["requests"] == 4
    assert report.verified


def test_white_box_and_black_box_evidence_are_judged_together(owner: dict) -> None:
    ticket = load_ticket(owner["signed"])
    suspect = ModelSuspect(ticket.build_model(), "cpu", "signed model")
    report = verify(owner["signed"], credential=owner["cred"], key=_key(owner), blackbox=suspect)
    names = [e.name for e in report.evidences]
    assert names == ["W2 bits", "W2 payload", "B1 triggers"]
    assert report.verdict.tests == 2
    assert report.verdict.threshold_log10 == pytest.approx(math.log10(2.0**-128 / 2))
    assert report.verified
    assert "W2 payload signature valid" in report.verdict.reason


def test_an_imported_set_is_reported_but_never_decides(
    owner: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A folder set may have been picked from the suspect's own answers: reported, not judged."""
    from PIL import Image

    from ticketguard.verify.verification import IMPORTED_NOT_JUDGED, VerifyConfig

    rng = np.random.default_rng(3)
    (tmp_path / "set" / "pics").mkdir(parents=True)
    for i in range(30):
        pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
        Image.fromarray(pixels, "L").save(tmp_path / "set" / "pics" / f"{i:02d}.png")
    (tmp_path / "set" / "labels.txt").write_text("\n".join(str(i % 10) for i in range(30)) + "\n")
    out = tmp_path / "imported.ticket"
    signed = _sign(
        owner,
        out,
        "--trigger",
        tmp_path / "set",
        "--recover-epochs",
        0,
        "--trigger-epochs",
        1,
        "--device",
        "cpu",
    )
    assert signed.exit_code == 0, signed.output
    cred, secret = tmp_path / "imported.cred.json", tmp_path / "imported.secret.json"
    triggers = TriggerSet.from_dict(read_secret_document(secret)["trigger_set"])
    assert triggers.source == "folder"
    for bits in (128, 0):  # not even the plain alpha rule lets it decide
        report = verify(
            None,
            credential=cred,
            reveal=secret,
            blackbox=_oracle(triggers),
            config=VerifyConfig(security_bits=bits),
        )
        (evidence,) = report.evidences
        # Every label matches: p = 0.1^30, far below any threshold, and still not decisive.
        assert evidence.log10_p == pytest.approx(-30.0)
        assert not evidence.judged and evidence.not_judged_reason == IMPORTED_NOT_JUDGED
        assert not report.verified, report.verdict.reason
        assert report.verdict.tests == 0 and report.verdict.decisive == []
        assert report.verdict.not_judged == ["B1 triggers"]
        assert "B1 triggers p = 1.0e-30 is not judged (an imported trigger set" in (
            report.verdict.reason
        )
    data = report.to_dict()["evidence"][0]
    assert data["judged"] is False and data["p"] == "1.0e-30" and data["work"] == "2^100 tries"
    # The human report shows it with its p-value, the forger's work and why it is not judged.
    from ticketguard.cli.verify import _print_human

    monkeypatch.setenv("COLUMNS", "400")
    document = report.to_dict()
    _print_human(document)
    printed = capsys.readouterr().out
    assert "1.0e-30 (not judged)" in printed and "2^100 tries" in printed
    assert "not judged: an imported trigger set may have been chosen" in printed
    assert document["notes"][-1].startswith("statistical evidence is judged at alpha/m")


def test_a_tampered_revealed_set_is_a_problem_not_a_verdict(owner: dict, tmp_path: Path) -> None:
    tampered = _secret_with(owner, _relabelled(owner["triggers"]), tmp_path / "t.secret.json")
    report = verify(
        None, credential=owner["cred"], reveal=tampered, blackbox=_oracle(owner["triggers"])
    )
    assert not report.verified
    assert any("not the one drawn from the seed" in p for p in report.problems)
    assert report.evidences == []


# --- the command line ----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_endpoint_down_exits_2_with_one_line(owner: dict) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/predict"
    result = invoke(
        [
            "verify",
            "--endpoint",
            url,
            "--credential",
            owner["cred"],
            "--key",
            owner["key"],
            "--retries",
            1,
        ]
    )
    line = error_line(result, 2)
    assert url in line and "cannot connect" in line and "2 attempts" in line


def test_cli_callable_suspect(owner: dict, tmp_path: Path, monkeypatch) -> None:
    triggers = owner["triggers"]
    rows = _inputs(triggers).reshape(len(triggers.labels), -1).tolist()
    module = tmp_path / "suspect_module_b1.py"
    module.write_text(
        "import torch\n"
        f"ROWS = {rows!r}\n"
        f"LABELS = {triggers.labels.tolist()!r}\n"
        "TABLE = {tuple(torch.tensor(r).tolist()): l for r, l in zip(ROWS, LABELS)}\n"
        "def predict(x):\n"
        "    return [TABLE[tuple(row.reshape(-1).tolist())] for row in x]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    command = ["verify", "suspect_module_b1:predict", "--credential", owner["cred"]]
    command += ["--key", owner["key"], "--json"]
    result = invoke([*command, "--security-bits", 0])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["blackbox"]["suspect"] == "suspect_module_b1:predict"
    assert report["evidence"][0]["details"]["hits"] == TRIGGERS
    assert report["verdict"]["security_bits"] == 0 and report["verdict"]["rule"] == "p < alpha/m"
    # The default security level: 20 matching triggers are within a grinder's reach (exit 1).
    default = invoke(command)
    assert default.exit_code == 1, default.output
    verdict = json.loads(default.output)["verdict"]
    assert verdict["security_bits"] == 128 and not verdict["verified"]


def test_cli_blackbox_on_a_model_file_reports_both(owner: dict) -> None:
    result = invoke(
        [
            "verify",
            owner["signed"],
            "--blackbox",
            "--credential",
            owner["cred"],
            "--key",
            owner["key"],
        ]
    )
    assert result.exit_code == 0, result.output
    assert "B1 triggers" in result.output and "W2 bits" in result.output
    assert "queried       " in result.output


def test_cli_blackbox_without_a_trigger_set_is_a_usage_error(make_ticket, tmp_path: Path) -> None:
    ticket = make_ticket(width=32, keep=0.3)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    ticket.save(tmp_path / "t.ticket")
    assert invoke(["keygen", "--owner", "bob", "--out", tmp_path / "bob"]).exit_code == 0
    signed = invoke(
        [
            "sign",
            tmp_path / "t.ticket",
            "--key",
            tmp_path / "bob.key",
            "--out",
            tmp_path / "s.ticket",
            "--recover-epochs",
            0,
        ]
    )
    assert signed.exit_code == 0, signed.output
    result = invoke(
        [
            "verify",
            tmp_path / "s.ticket",
            "--blackbox",
            "--credential",
            tmp_path / "s.cred.json",
            "--key",
            tmp_path / "bob.key",
        ]
    )
    assert "signed without --trigger" in error_line(result, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x.ticket", "--endpoint", "http://127.0.0.1:1/"], "either SUSPECT or --endpoint"),
        ([], "give SUSPECT"),
        (["--endpoint", "http://127.0.0.1:1/"], "needs --credential"),
        (["pkg.mod:fn"], "needs --credential"),
        (["missing.ticket"], "File 'missing.ticket' does not exist."),
    ],
)
def test_cli_blackbox_usage_errors(args: list, message: str, tmp_path: Path) -> None:
    result = invoke(["verify", *args])
    assert message in error_line(result, 2)


def test_cli_reference_needs_weights(owner: dict) -> None:
    result = invoke(
        [
            "verify",
            "--endpoint",
            "http://127.0.0.1:1/",
            "--credential",
            owner["cred"],
            "--key",
            owner["key"],
            "--reference",
            owner["signed"],
        ]
    )
    assert "has none to read" in error_line(result, 2)


def test_a_column_of_labels_is_read_as_labels(owner: dict) -> None:
    oracle = _oracle(owner["triggers"])
    column = CallableSuspect(lambda x: oracle.predict(x, x)[:, None], "column")
    report = verify(None, credential=owner["cred"], key=_key(owner), blackbox=column)
    assert report.evidences[0].details["hits"] == TRIGGERS


def test_an_endpoint_that_drips_its_answer_times_out(owner: dict) -> None:
    """The timeout bounds the whole answer, not each byte: a dripping server cannot stall us."""
    import http.server
    import threading
    import time

    from ticketguard.errors import EndpointError
    from ticketguard.verify.blackbox import HttpSuspect

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({"labels": [0] * TRIGGERS}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.3)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/predict"
    try:
        suspect = HttpSuspect(url, timeout=0.5, retries=0)
        start = time.monotonic()
        with pytest.raises(EndpointError, match=r"no answer within 0.5 s \(1 attempt\)"):
            suspect.predict(torch.zeros(TRIGGERS, 1, 8, 8), torch.zeros(TRIGGERS, 1, 8, 8))
        # The whole answer would take over 20 s to drip out; the per-read socket timeout alone
        # (0.5 s between bytes that come every 0.3 s) would never fire.
        assert time.monotonic() - start < 5
    finally:
        server.shutdown()
        server.server_close()


# --- training with mixed-in samples --------------------------------------------------------------


def test_extra_samples_cycle_evenly_and_deterministically() -> None:
    extra = ExtraSamples(torch.zeros(10, 1), torch.arange(10), per_batch=4)
    stream = extra.stream(0)
    drawn = torch.cat([next(stream) for _ in range(25)])  # 100 draws = 10 full passes
    assert torch.equal(torch.bincount(drawn, minlength=10), torch.full((10,), 10))
    again = extra.stream(0)
    assert torch.equal(torch.cat([next(again) for _ in range(25)]), drawn)
    other = extra.stream(1)
    assert not torch.equal(torch.cat([next(other) for _ in range(25)]), drawn)


@pytest.mark.parametrize(
    ("inputs", "labels", "per_batch"),
    [
        (torch.zeros(3, 1), torch.zeros(2), 1),
        (torch.zeros(0, 1), torch.zeros(0), 1),
        (torch.zeros(3, 1), torch.zeros(3), 0),
    ],
)
def test_extra_samples_refuse_bad_arguments(inputs, labels, per_batch) -> None:
    with pytest.raises(ConfigError):
        ExtraSamples(inputs, labels, per_batch)


def test_train_mixes_the_extra_samples_into_every_batch() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    mask = Mask({"1.weight": torch.ones(3, 4, dtype=torch.bool)})
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    marker = 1000.0
    extra = ExtraSamples(torch.full((5, 4), marker), torch.zeros(5, dtype=torch.int64), 2)
    batches: list[tuple[int, int]] = []
    model.register_forward_pre_hook(
        lambda _m, args: batches.append((len(args[0]), int((args[0] == marker).all(1).sum())))
    )
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-4)
    result = train(model, mask, data, config, device=torch.device("cpu"), seed=0, extra=extra)
    assert result.iterations == 10
    assert batches == [(10, 2)] * 10


def test_mixed_training_refuses_bad_settings() -> None:
    extra = ExtraSamples(torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64), 1)
    for kwargs in ({"target": 0.0}, {"target": 1.5}, {"tolerance": -0.1}, {"max_epochs": 0}):
        with pytest.raises(ConfigError):
            MixedTraining(extra, **kwargs)


@pytest.mark.parametrize("shifted", [False, True])
def test_png_queries_warn_when_the_server_normalises_otherwise(owner: dict, shifted: bool) -> None:
    import threading

    from ticketguard.tickets.data import pixel_normalization
    from ticketguard.verify.blackbox import HttpSuspect
    from ticketguard.verify.server import PredictionService, make_server

    mean, std = pixel_normalization("digits")
    if shifted:
        mean = (mean[0] + 0.1,)
    service = PredictionService(
        load_ticket(owner["signed"]).build_model(),
        input_shape=(1, 8, 8),
        normalization=(mean, std),
        device=torch.device("cpu"),
        description="signed",
    )
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        suspect = HttpSuspect(server.url + "/predict", send="png")
        report = verify(None, credential=owner["cred"], key=_key(owner), blackbox=suspect)
    finally:
        server.shutdown()
        server.server_close()
    warned = [n for n in report.notes if "normalises PNG inputs" in n]
    assert len(warned) == (1 if shifted else 0), report.notes
    assert report.blackbox["warning"] == (warned[0] if shifted else None)


def test_mixed_training_keeps_the_best_cycle_when_the_rule_is_not_met(
    make_ticket, monkeypatch
) -> None:
    from ticketguard.tickets import retrain as retrain_module
    from ticketguard.tickets.retrain import RetrainConfig, retrain

    ticket = make_ticket(width=32, keep=0.3)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (40,), generator=gen)
    # Scripted accuracies on the extra samples: the second of three cycles is the best.
    scripted = iter([0.5, 0.8, 0.6])
    states: list[dict[str, torch.Tensor]] = []
    real_train, real_evaluate = retrain_module.train, retrain_module.evaluate

    def recording_train(model, *args, **kwargs):
        result = real_train(model, *args, **kwargs)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return result

    def scripted_evaluate(model, dataset, device):
        if len(dataset) == len(labels) and torch.equal(dataset.tensors[1], labels):
            return next(scripted)
        return real_evaluate(model, dataset, device)

    monkeypatch.setattr(retrain_module, "train", recording_train)
    monkeypatch.setattr(retrain_module, "evaluate", scripted_evaluate)
    mixed = MixedTraining(
        ExtraSamples(inputs, labels, 4), target=0.95, tolerance=0.99, max_epochs=3
    )
    result = retrain(
        ticket,
        ticket.mask,
        RetrainConfig(epochs=1, lr=0.05),
        device=torch.device("cpu"),
        mixed=mixed,
    )
    assert result.reached is False
    assert [h["extra"] for h in result.history] == [0.5, 0.8, 0.6]
    assert result.kept_epoch == 2 and result.extra_accuracy == 0.8
    assert len(states) == 3
    kept = {k: v.clone() for k, v in states[1].items()}
    ticket.mask.apply_(kept)
    assert all(torch.equal(result.trained[k], kept[k]) for k in kept)
    assert not all(torch.equal(result.trained[k], states[2][k]) for k in ticket.mask)
