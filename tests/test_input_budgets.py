"""Hostile inputs to credentials, secret files, bench configs and targets, and JSON options.

Every input here is generated in the test and given to the CLI, which must answer with one
`Error:` line (or "not verified" from verify), never a traceback or "failed unexpectedly", in
seconds, and write nothing (issue 13).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import error_line, invoke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticketguard.attacks.base import ATTACKS, REMOVAL, Attack, AttackResult, Param
from ticketguard.attacks.bench import MAX_CELLS
from ticketguard.signatures.keys import OwnerKey
from ticketguard.signatures.signing import SignConfig, sign_without_data, write_signed

ALICE = OwnerKey("alice@example.org", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
BOB = OwnerKey("bob@example.org", Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
#: Attack runs in this process: a refused benchmark runs none.
CALLS: list[Any] = []


def _files(stem: Path) -> dict[str, Path]:
    return {
        "ticket": stem.with_suffix(".ticket"),
        "cred": stem.with_suffix(".cred.json"),
        "secret": stem.with_suffix(".secret.json"),
    }


@pytest.fixture(scope="module")
def signed(make_ticket, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Alice's QR-signed digits ticket and Bob's W2-signed one (no training: fast)."""
    root = tmp_path_factory.mktemp("budgets")
    ticket = make_ticket(width=32, keep=0.3)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    qr = SignConfig(scheme="W3", qr_text="alice", qr_layer="fc1.weight")
    write_signed(sign_without_data(ticket, ALICE, qr), root / "alice")
    write_signed(sign_without_data(ticket, BOB, SignConfig()), root / "bob")
    return {"alice": _files(root / "alice"), "bob": _files(root / "bob")}


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _clean(result, exit_code: int) -> str:
    """One `Error:` line, no traceback, nothing 'unexpected'; return the line."""
    line = error_line(result, exit_code)
    assert "unexpectedly" not in result.output
    return line


# --- credentials ---------------------------------------------------------------------------------


def _hostile_credential(source: Path, where: Path, kind: str) -> Path:
    """The credential's bytes with one hostile value spliced in (still one JSON object)."""
    text = source.read_text(encoding="utf-8")
    values = {
        "nan": '"zz":NaN,',
        "infinity": '"zz":-Infinity,',
        "overflow": '"zz":1e400,',
        "surrogate": '"zz":"\\ud800",',
        "duplicate": '"owner":"mallory",',
        "deep": '"zz":' + "[" * 5000 + "]" * 5000 + ",",
        "bigint": '"zz":' + "9" * 5000 + ",",
    }
    path = where / f"{kind}.cred.json"
    path.write_text(text.replace('"created":', values[kind] + '"created":', 1), encoding="utf-8")
    return path


CREDENTIAL_KINDS = ["nan", "infinity", "overflow", "surrogate", "duplicate", "deep", "bigint"]


@pytest.mark.parametrize("kind", CREDENTIAL_KINDS)
def test_render_refuses_a_hostile_credential_in_one_line(signed, tmp_path, kind):
    alice = signed["alice"]
    cred = _hostile_credential(alice["cred"], tmp_path, kind)
    out = tmp_path / "pictures"
    start = time.monotonic()
    line = _clean(invoke(["render", alice["ticket"], "--credential", cred, "--out", out]), 1)
    assert time.monotonic() - start < 30
    assert "invalid credential" in line and "not JSON" in line
    assert not out.exists()


@pytest.mark.parametrize("kind", CREDENTIAL_KINDS)
def test_verify_says_not_verified_for_a_hostile_credential(signed, tmp_path, kind):
    alice = signed["alice"]
    cred = _hostile_credential(alice["cred"], tmp_path, kind)
    args = ["verify", alice["ticket"], "--credential", cred, "--reveal", alice["secret"]]
    result = invoke([*args, "--json", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "unexpectedly" not in result.output
    report = json.loads(result.output)
    assert not report["verdict"]["verified"]
    assert any("the file is not JSON" in p for p in report["problems"]), report["problems"]


def test_dispute_with_a_hostile_credential_decides_without_it(signed, tmp_path):
    alice, bob = signed["alice"], signed["bob"]
    cred = _hostile_credential(alice["cred"], tmp_path, "nan")
    out = tmp_path / "dispute.json"
    result = invoke(
        [
            "dispute",
            "--claim",
            cred,
            alice["secret"],
            alice["ticket"],
            "--claim",
            bob["cred"],
            bob["secret"],
            bob["ticket"],
            "--no-blackbox",
            "--device",
            "cpu",
            "--json",
            out,
        ]
    )
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output and "unexpectedly" not in result.output
    claims = json.loads(out.read_text(encoding="utf-8"))["claims"]
    assert claims[0]["valid"] is False


# --- secret files --------------------------------------------------------------------------------


def _edited_secret(source: Path, where: Path, name: str, edit: Any) -> Path:
    text = source.read_text(encoding="utf-8")
    path = where / f"{name}.secret.json"
    if callable(edit):
        document = json.loads(text)
        edit(document)
        text = json.dumps(document)
    else:
        old, new = edit
        text = text.replace(old, new, 1)
    path.write_text(text, encoding="utf-8")
    return path


def _set(key: str, value: Any):
    return lambda d: d.__setitem__(key, value)


MALFORMED_SECRETS = [
    ("duplicate", ('"format"', '"seed": "00", "format"'), "duplicate key 'seed'"),
    ("nan", lambda d: d.__setitem__("extra", float("nan")), "not JSON"),
    ("overflow", ('"format"', '"seed": 1e400, "format"'), "out of range"),
    ("unknown", _set("note", "x"), "unknown field 'note'"),
    ("seed", _set("seed", "zz" * 32), "the seed is not 32 bytes of hex"),
    ("short-sha", _set("credential_sha256", "ab" * 16), "credential_sha256 field"),
    ("upper-sha", lambda d: d.__setitem__("fingerprint", d["fingerprint"].upper()), "fingerprint"),
    ("no-fingerprint", lambda d: d.pop("fingerprint"), "fingerprint field is missing"),
    ("triggers-list", _set("trigger_set", [1, 2]), "trigger_set: expected an object"),
    ("triggers-shape", _set("trigger_set", {"format": 1}), "trigger_set: missing keys"),
]


@pytest.mark.parametrize(
    ("name", "edit", "message"), MALFORMED_SECRETS, ids=[m[0] for m in MALFORMED_SECRETS]
)
def test_a_malformed_secret_file_is_one_error_line(signed, tmp_path, name, edit, message):
    bob = signed["bob"]
    secret = _edited_secret(bob["secret"], tmp_path, name, edit)
    before = _listing(tmp_path)
    args = ["verify", bob["ticket"], "--credential", bob["cred"], "--reveal", secret]
    line = _clean(invoke([*args, "--device", "cpu"]), 2)
    assert message in line and str(secret) in line
    assert _listing(tmp_path) == before


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("credential_sha256", "its credential_sha256 is not the SHA-256 of the credential file"),
        ("fingerprint", "its fingerprint is not the credential's fingerprint_after"),
    ],
)
def test_an_edited_secret_does_not_verify(signed, tmp_path, field, reason):
    bob = signed["bob"]
    secret = _edited_secret(bob["secret"], tmp_path, field, _set(field, "0" * 64))
    args = ["verify", bob["ticket"], "--credential", bob["cred"], "--reveal", secret]
    result = invoke([*args, "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "unexpectedly" not in result.output
    assert "not verified" in result.output and reason in " ".join(result.output.split())
    # Untouched, the same secret verifies.
    good = invoke(["verify", bob["ticket"], "--credential", bob["cred"], "--reveal", bob["secret"]])
    assert good.exit_code == 0, good.output


def test_another_credentials_secret_does_not_verify(signed):
    alice, bob = signed["alice"], signed["bob"]
    args = ["verify", bob["ticket"], "--credential", bob["cred"], "--reveal", alice["secret"]]
    result = invoke([*args, "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "is not for this credential" in " ".join(result.output.split())


# --- JSON command-line options -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("width=NaN", "non-finite number NaN"),
        ("width=1e400", "out of range"),
        ('width={"a":1,"a":2}', "duplicate key 'a'"),
        ("width=" + "[" * 100 + "]" * 100, "nested deeper"),
    ],
)
def test_json_options_refuse_what_no_option_can_hold(signed, value, message):
    args = ["inspect", signed["bob"]["ticket"], "--arch", "digits_cnn", "--arch-arg", value]
    assert message in _clean(invoke(args), 2)


def test_json_options_keep_plain_strings_and_refuse_a_key_twice(signed):
    from ticketguard.cli._common import parse_kwargs

    assert parse_kwargs(("a=1", "b=text", "c=[1, 2]"), "--arch-arg") == {
        "a": 1,
        "b": "text",
        "c": [1, 2],
    }
    args = ["inspect", signed["bob"]["ticket"], "--arch", "digits_cnn"]
    assert "given twice" in _clean(invoke([*args, "--arch-arg", "w=1", "--arch-arg", "w=2"]), 2)


# --- the benchmark -------------------------------------------------------------------------------


def _count_calls(ticket, params: dict[str, Any], seed: int, context) -> AttackResult:
    CALLS.append(params)
    return AttackResult(None, {"tries": 1, "verified": 0})


BUDGET_ATTACK = Attack(
    "test-budget",
    REMOVAL,
    "Record that a cell ran (a test attack).",
    (Param("a", int, 0, "An axis."), Param("b", int, 0, "An axis."), Param("c", int, 0, "")),
    _count_calls,
)


@pytest.fixture(autouse=True)
def _budget_attack():
    CALLS.clear()
    ATTACKS[BUDGET_ATTACK.name] = BUDGET_ATTACK
    yield
    ATTACKS.pop(BUDGET_ATTACK.name, None)


def _bench_config(tmp_path: Path, files: dict[str, Path], body: str, head: str = "") -> Path:
    path = tmp_path / "bench.toml"
    path.write_text(
        head
        + 'name = "t"\nnull_samples = 2\ndevice = "cpu"\n'
        + f'[target]\nticket = "{files["ticket"]}"\ncredential = "{files["cred"]}"\n'
        + f'secret = "{files["secret"]}"\n'
        + body,
        encoding="utf-8",
    )
    return path


ONE_CELL = '[[attack]]\nname = "test-budget"\n'


def _axis(n: int) -> str:
    return "[" + ", ".join(str(i) for i in range(n)) + "]"


@pytest.mark.parametrize(
    "body",
    [
        ONE_CELL + f"[attack.params]\na = {_axis(1000)}\nb = {_axis(1000)}\nc = {_axis(1000)}\n",
        ONE_CELL + f"[attack.params]\na = {_axis(1000)}\nb = {_axis(1000)}\n",
        ONE_CELL
        + f"[attack.params]\na = {_axis(MAX_CELLS // 2)}\n"
        + ONE_CELL
        + f"[attack.params]\nb = {_axis(MAX_CELLS // 2 + 1)}\n",
    ],
    ids=["1e9", "1e6", "just-past-the-cap"],
)
def test_a_huge_grid_is_refused_at_once(signed, tmp_path, body):
    path = _bench_config(tmp_path, signed["bob"], body)
    out = tmp_path / "out"
    start = time.monotonic()
    line = _clean(invoke(["bench", path, "--out", out]), 2)
    assert time.monotonic() - start < 5
    assert f"more than {MAX_CELLS} cells" in line
    assert not out.exists() and CALLS == []


def test_seeds_count_towards_the_cap(signed, tmp_path):
    path = _bench_config(
        tmp_path, signed["bob"], ONE_CELL, head=f"seeds = {_axis(MAX_CELLS + 1)}\n"
    )
    assert f"more than {MAX_CELLS} cells" in _clean(invoke(["bench", path]), 2)


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ("deep = " + "[" * 100 + "]" * 100 + "\n", "nested deeper"),
        ("deep = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper"),
        ("alpha = nan\n", "out of range"),
        ("max_drop = inf\n", "out of range"),
        ("name = 1\nname = 2\n", "not valid TOML"),
    ],
    ids=["deep", "very-deep", "nan", "inf", "duplicate"],
)
def test_a_hostile_bench_config_is_one_error_line(signed, tmp_path, head, message):
    path = _bench_config(tmp_path, signed["bob"], ONE_CELL)
    path.write_text(head + path.read_text(encoding="utf-8").replace('name = "t"\n', ""))
    out = tmp_path / "out"
    assert message in _clean(invoke(["bench", path, "--out", out]), 2)
    assert not out.exists()


def _flip_one_byte(source: Path, target: Path) -> Path:
    data = bytearray(source.read_bytes())
    data[data.index(b'"owner":"') + 10] ^= 1
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("kind", ["one-byte", "nan", "garbage", "missing-secret-match"])
def test_a_target_that_does_not_verify_is_refused_before_any_cell(signed, tmp_path, kind):
    files = dict(signed["bob"])
    if kind == "one-byte":
        files["cred"] = _flip_one_byte(files["cred"], tmp_path / "flipped.cred.json")
        expected = "the credential's signature does not verify"
    elif kind == "nan":
        files["cred"] = _hostile_credential(files["cred"], tmp_path, "nan")
        expected = "non-finite number NaN"
    elif kind == "garbage":
        files["cred"] = tmp_path / "garbage.cred.json"
        files["cred"].write_bytes(bytes(range(256)) * 4)
        expected = "not UTF-8"
    else:
        files["secret"] = signed["alice"]["secret"]
        expected = "is not for this credential"
    path = _bench_config(tmp_path, files, ONE_CELL)
    out = tmp_path / "out"
    line = _clean(invoke(["bench", path, "--out", out]), 1)
    assert expected in line and "nothing was run" in line
    assert not out.exists() and CALLS == []


def test_an_unloadable_target_ticket_is_refused_and_nothing_written(signed, tmp_path):
    files = dict(signed["bob"])
    files["ticket"] = tmp_path / "garbage.ticket"
    files["ticket"].write_bytes(b"not a ticket at all")
    path = _bench_config(tmp_path, files, ONE_CELL)
    out = tmp_path / "out"
    line = _clean(invoke(["bench", path, "--out", out]), 1)
    assert "the unattacked target could not be verified" in line
    assert not out.exists() and CALLS == []


@pytest.mark.slow
def test_a_target_its_credential_does_not_verify_is_refused(signed, tmp_path):
    # Alice's valid credential and secret, Bob's model: the baseline verification fails.
    files = {**signed["alice"], "ticket": signed["bob"]["ticket"]}
    path = _bench_config(tmp_path, files, ONE_CELL)
    out = tmp_path / "out"
    line = _clean(invoke(["bench", path, "--out", out]), 1)
    assert "the unattacked target does not verify" in line and "nothing was run" in line
    assert not out.exists() and CALLS == []


# --- trigger folders -----------------------------------------------------------------------------


def _unsigned(make_ticket, path: Path) -> Path:
    ticket = make_ticket(width=8, keep=0.3)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    ticket.save(path)
    return path


def _trigger_folder(root: Path, labels: str) -> Path:
    from PIL import Image

    folder = root / "triggers"
    (folder / "pics").mkdir(parents=True)
    for i in range(2):
        Image.new("L", (8, 8), 40 * i).save(folder / "pics" / f"{i}.png")
    (folder / "labels.txt").write_text(labels, encoding="utf-8")
    return folder


@pytest.mark.parametrize("hostile", ["image-link", "labels-link", "labels-content"])
def test_sign_refuses_a_hostile_trigger_folder(make_ticket, tmp_path, hostile):
    from ticketguard.signatures.keys import write_keypair

    ticket = _unsigned(make_ticket, tmp_path / "plain.ticket")
    write_keypair(ALICE, tmp_path / "alice")
    private = tmp_path / "private.txt"
    private.write_text("password=hunter2\n", encoding="utf-8")
    folder = _trigger_folder(tmp_path, "0\n1\n")
    if hostile == "image-link":
        (folder / "pics" / "1.png").unlink()
        (folder / "pics" / "1.png").symlink_to(private)
        expected = "is a link to a file outside"
    elif hostile == "labels-link":
        (folder / "labels.txt").unlink()
        (folder / "labels.txt").symlink_to(private)
        expected = "is a link to a file outside"
    else:
        (folder / "labels.txt").write_text("password=hunter2\n1\n", encoding="utf-8")
        expected = "line 1: not a number (expected one integer label in [0, 10) per line)"
    out = tmp_path / "out" / "signed"
    args = ["sign", ticket, "--key", tmp_path / "alice.key", "--out", out, "--trigger", folder]
    line = _clean(invoke([*args, "--device", "cpu"]), 1)
    assert expected in line and "hunter2" not in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- key and passphrase files --------------------------------------------------------------------


def test_key_and_passphrase_files_are_read_under_a_cap(tmp_path):
    from ticketguard.errors import KeyFileError
    from ticketguard.signatures.keys import (
        MAX_PASSPHRASE_BYTES,
        passphrase_from,
        read_private_key,
    )

    endless = Path("/dev/zero")
    if not endless.exists():
        pytest.skip("no /dev/zero")
    start = time.monotonic()
    with pytest.raises(KeyFileError, match=f"larger than {MAX_PASSPHRASE_BYTES} bytes"):
        passphrase_from(endless)
    with pytest.raises(KeyFileError, match="too large"):
        read_private_key(endless)
    assert time.monotonic() - start < 5
    big = tmp_path / "big.key"
    big.write_bytes(b"x" * (1 << 20))
    with pytest.raises(KeyFileError, match="too large"):
        read_private_key(big)
    # A passphrase of the usual size is read as before.
    (tmp_path / "pass").write_bytes(b"correct horse\n")
    assert passphrase_from(tmp_path / "pass") == b"correct horse"
