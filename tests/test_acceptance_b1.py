"""Acceptance of the black-box scheme (B1) on real digits tickets, verified over HTTP.

The owner's ticket is signed with a generated trigger set; `ticketguard serve` runs it in a
subprocess on loopback and `ticketguard verify --endpoint` queries it. Ten tickets found
independently are served and queried the same way and must not verify. A folder-format trigger
set (odd names, a PNG inside a .jpg, float labels) loads in order and trains in. An endpoint
that is down, slow or answers garbage is a clean error with exit code 2.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import error_line, invoke
from conftest import OWNER
from PIL import Image

from ticketguard.signatures.credential import read_credential, read_secret_document
from ticketguard.signatures.signing import SignConfig, TriggerConfig, sign_ticket
from ticketguard.signatures.triggers import TriggerSet
from ticketguard.tickets.retrain import RetrainConfig
from ticketguard.tickets.ticket import load_ticket
from ticketguard.verify.blackbox import ModelSuspect
from ticketguard.verify.verification import verify

#: Acceptance tests find and sign real tickets: they run in `make test-all` (CI), not `make test`.
pytestmark = pytest.mark.slow

SERVE_START_SECONDS = 120


@contextlib.contextmanager
def served(model: Path) -> Iterator[str]:
    """Run `ticketguard serve MODEL --port 0` in a subprocess; yield its prediction URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ticketguard", "serve", str(model), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        match = re.search(r" at (http://\S+) ", line)
        if match is None:
            process.kill()
            _, err = process.communicate(timeout=SERVE_START_SECONDS)
            pytest.fail(f"serve did not start: {line!r} {err!r}")
        yield match.group(1) + "/predict"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""


@pytest.fixture(scope="module")
def signed(signed_owner: dict[str, Path]) -> dict[str, Path]:
    """The owner's digits ticket signed with a generated trigger set (shared, see conftest)."""
    return signed_owner


def _triggers(signed: dict[str, Path]) -> TriggerSet:
    return TriggerSet.from_dict(read_secret_document(signed["secret"])["trigger_set"])


def test_trigger_accuracy_and_clean_accuracy(signed: dict[str, Path]) -> None:
    before = load_ticket(signed["unsigned"]).metadata["accuracy"]["test"]
    ticket = load_ticket(signed["signed"])
    after = ticket.metadata["accuracy"]["test"]
    record = read_credential(signed["cred"]).document["trigger_set"]
    # Measure the trigger accuracy afresh from the set in the secret file.
    triggers = _triggers(signed)
    norm = record["normalization"]
    with torch.no_grad():
        predicted = ticket.build_model()(triggers.inputs(norm["mean"], norm["std"])).argmax(1)
    hits = int((predicted == triggers.labels).sum())
    accuracy = hits / triggers.size
    print(
        f"\nclean test accuracy {100 * before:.2f}% -> {100 * after:.2f}%, "
        f"trigger accuracy {100 * accuracy:.1f}% on {triggers.size} triggers"
    )
    assert triggers.size == 100
    assert hits >= 95
    assert accuracy == pytest.approx(record["accuracy"])
    assert abs(after - before) <= 0.01


def test_verified_over_http_through_serve(signed: dict[str, Path]) -> None:
    with served(signed["signed"]) as url:
        result = invoke(
            ["verify", "--endpoint", url, "--credential", signed["cred"], "--key", signed["key"]]
        )
        assert result.exit_code == 0, result.output
        assert "verified: B1 triggers p = " in result.output
        judged = invoke(
            [
                "verify",
                "--endpoint",
                url,
                "--credential",
                signed["cred"],
                "--reveal",
                signed["secret"],
                "--public-key",
                signed["pub"],
                "--send",
                "png",
                "--json",
            ]
        )
    assert judged.exit_code == 0, judged.output
    report = json.loads(judged.output)
    (evidence,) = report["evidence"]
    print(f"\nover HTTP (PNG): {evidence['summary']}, p = {evidence['p']}")
    assert evidence["name"] == "B1 triggers"
    assert evidence["log10_p"] < -20
    assert report["verdict"]["verified"] is True
    assert report["blackbox"]["requests"] == 2  # 100 triggers in batches of 64


def test_independent_tickets_served_are_not_verified(
    signed: dict[str, Path], independent_tickets: list[Path]
) -> None:
    smallest, hits = 0.0, []
    for ticket in independent_tickets:
        with served(ticket) as url:
            result = invoke(
                [
                    "verify",
                    "--endpoint",
                    url,
                    "--credential",
                    signed["cred"],
                    "--key",
                    signed["key"],
                    "--json",
                ]
            )
        assert result.exit_code == 1, result.output
        (evidence,) = json.loads(result.output)["evidence"]
        hits.append(evidence["details"]["hits"])
        smallest = min(smallest, evidence["log10_p"])
    print(f"\nindependent tickets: hits {hits} of 100, smallest p = 10^{smallest:.2f}")
    assert smallest > math.log10(1e-6)


def test_combined_verdict_on_the_model_file(signed: dict[str, Path]) -> None:
    result = invoke(
        [
            "verify",
            signed["signed"],
            "--blackbox",
            "--credential",
            signed["cred"],
            "--key",
            signed["key"],
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [e["name"] for e in report["evidence"]] == ["W2 bits", "W2 payload", "B1 triggers"]
    assert report["verdict"]["tests"] == 2
    assert report["verdict"]["decisive"] == ["W2 bits", "W2 payload", "B1 triggers"]


# --- a folder-format trigger set -----------------------------------------------------------------


def _write_folder(root: Path, count: int) -> tuple[Path, list[str], list[int]]:
    """Write a trigger folder: large photos of assorted sizes, odd names, one PNG in a .jpg."""
    rng = np.random.default_rng(7)
    pics = root / "pics"
    pics.mkdir(parents=True)
    names = [f"{i}.jpg" for i in range(1, count - 1)] + ["img 10 (copy).JPG", "z_last.jpeg"]
    labels = rng.integers(0, 10, size=count).tolist()
    for name in names:
        height, width = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        blocks = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
        # File 2.jpg holds PNG bytes, as folders downloaded from the web sometimes do.
        fmt = "PNG" if name == "2.jpg" else "JPEG"
        Image.fromarray(pixels, "RGB").save(pics / name, format=fmt, quality=95)
    ordered = sorted(names)
    by_name = dict(zip(names, labels, strict=True))
    lines = [f"{float(by_name[n]):.18e}" for n in ordered]
    (root / "labels-cifar.txt").write_text("\n".join(lines) + "\n")
    return root, ordered, [by_name[n] for n in ordered]


def test_folder_trigger_set_loads_in_order_and_trains_in(
    owner_ticket: Path, tmp_path: Path
) -> None:
    folder, ordered, labels = _write_folder(tmp_path / "trigger-set", 40)
    assert (folder / "pics" / "2.jpg").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = SignConfig(retrain=RetrainConfig(epochs=3), triggers=TriggerConfig(source=str(folder)))
    result = sign_ticket(
        load_ticket(owner_ticket),
        OWNER,
        config,
        device=torch.device("cpu"),
        created="2026-11-22T00:00:00Z",
    )
    triggers = result.triggers
    assert triggers is not None and triggers.source == "folder"
    assert list(triggers.names) == ordered  # lexicographic: 1.jpg, 10.jpg, 11.jpg, ..., 2.jpg
    assert ordered[:3] == ["1.jpg", "10.jpg", "11.jpg"]
    assert triggers.labels.tolist() == labels
    assert triggers.input_shape == (1, 8, 8)
    print(
        f"\nfolder set: trigger accuracy {100 * result.trigger_accuracy:.1f}% after "
        f"{result.trigger_epochs} epochs; clean {100 * result.accuracy_before:.2f}% -> "
        f"{100 * result.accuracy_after:.2f}%"
    )
    assert result.trigger_accuracy >= 0.95
    assert result.trigger_reached
    # The signed model answers the imported set, read black-box from the revealed secret; but an
    # imported set may have been chosen from a model's own answers, so it never decides.
    from ticketguard.signatures.signing import write_signed

    write_signed(result, tmp_path / "folder-signed.ticket")
    report = verify(
        None,
        credential=tmp_path / "folder-signed.cred.json",
        reveal=tmp_path / "folder-signed.secret.json",
        blackbox=ModelSuspect(result.ticket.build_model(), "cpu", "folder-signed"),
    )
    (evidence,) = report.evidences
    assert evidence.name == "B1 triggers" and not evidence.judged
    assert evidence.details["hits"] >= 38 and evidence.log10_p < -10
    assert not report.verified and report.verdict.decisive == []
    assert report.verdict.not_judged == ["B1 triggers"] and report.verdict.tests == 0


# --- endpoints that fail -------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    mode = "slow"

    def do_POST(self) -> None:  # noqa: N802 - the http.server naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "slow":
            time.sleep(3)
        body = b"<html>not json</html>" if self.mode == "garbage" else b'{"labels": [1, 2]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _stub(mode: str) -> Iterator[str]:
    handler = type(f"Stub{mode}", (_Handler,), {"mode": mode})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predict"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("slow", "no answer within 0.5 s"),
        ("garbage", "the answer is not JSON"),
        ("short", "labels"),
    ],
)
def test_failing_endpoints_exit_2_with_one_line(
    signed: dict[str, Path], mode: str, message: str
) -> None:
    with _stub(mode) as url:
        result = invoke(
            [
                "verify",
                "--endpoint",
                url,
                "--credential",
                signed["cred"],
                "--key",
                signed["key"],
                "--timeout",
                "0.5",
                "--retries",
                "1",
            ]
        )
    line = error_line(result, 2)
    assert url in line and message in line, line
