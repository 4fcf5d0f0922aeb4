"""Tests of signed credentials, the secret seed file, and reading the seed back."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

import ticketguard
from ticketguard.errors import ConfigError, CredentialError
from ticketguard.files import canonical_json, sha256_hex
from ticketguard.signatures.credential import (
    CREDENTIAL_FORMAT,
    PAYLOAD_FORMAT,
    SECRET_FORMAT,
    Credential,
    _signed_part,
    credential_bytes,
    make_credential,
    message_of,
    payload_message,
    payload_of,
    read_credential,
    read_secret,
    seed_commitment,
    seed_for,
    write_credential,
    write_secret,
)
from ticketguard.signatures.keys import OwnerKey, generate_key

FP_BEFORE = sha256_hex(b"mask before")
FP_AFTER = sha256_hex(b"mask after")
CREATED = "2024-05-01T12:00:00Z"


@pytest.fixture(scope="module")
def alice() -> OwnerKey:
    return generate_key("alice@example.org")


@pytest.fixture(scope="module")
def mallory() -> OwnerKey:
    return generate_key("mallory")


def build(key: OwnerKey, seed: bytes | None = None, **overrides: Any) -> dict[str, Any]:
    """A credential for the fixture fingerprints; the seed is derived from the key by default."""
    arguments: dict[str, Any] = {
        "created": CREATED,
        "fingerprint_before": FP_BEFORE,
        "fingerprint_after": FP_AFTER,
        "architecture": {"name": "digits_cnn", "kwargs": {"width": 4}},
        "embedding": {"scheme": "w2", "bits": 512, "layers": ["conv2.weight", "fc1.weight"]},
        "seed": key.derive_seed(FP_BEFORE) if seed is None else seed,
    }
    arguments.update(overrides)
    return make_credential(key, **arguments)


def written(tmp_path: Path, document: dict[str, Any], name: str = "ticket.cred") -> Path:
    path = tmp_path / name
    write_credential(path, document)
    return path


# --- payload and commitment -----------------------------------------------------------------------


def test_payload_message_is_canonical() -> None:
    message = payload_message(
        owner="alice", created=CREATED, fingerprint=FP_BEFORE, toolkit_version="0.1.0"
    )
    assert json.loads(message) == {
        "format": PAYLOAD_FORMAT,
        "owner": "alice",
        "created": CREATED,
        "fingerprint": FP_BEFORE,
        "toolkit_version": "0.1.0",
    }
    assert message == canonical_json(json.loads(message)).encode("utf-8")


def test_seed_commitment_is_domain_separated() -> None:
    seed = bytes(range(32))
    assert seed_commitment(seed) == sha256_hex(b"ticketguard/seed-commitment/1\x00" + seed)
    assert seed_commitment(seed) != sha256_hex(seed)
    assert seed_commitment(seed) != seed_commitment(bytes(32))


# --- making and reading credentials ---------------------------------------------------------------


def test_make_credential_fields(alice: OwnerKey) -> None:
    seed = alice.derive_seed(FP_BEFORE)
    document = build(alice)
    assert document["format"] == CREDENTIAL_FORMAT
    assert document["toolkit_version"] == ticketguard.__version__
    assert document["owner"] == "alice@example.org"
    assert document["public_key"] == alice.public_key.b64()
    assert document["seed_commitment"] == seed_commitment(seed)
    assert seed.hex() not in json.dumps(document)
    assert "trigger_set" not in document
    payload = payload_of(document)
    assert len(payload) == 64
    assert message_of(document) == payload_message(
        owner=alice.owner,
        created=CREATED,
        fingerprint=FP_BEFORE,
        toolkit_version=ticketguard.__version__,
    )
    assert alice.public_key.verify(payload, message_of(document))


def test_credential_bytes_are_canonical(alice: OwnerKey, tmp_path: Path) -> None:
    document = build(alice, trigger_set={"count": 3, "labels": [1, 2, 3]})
    path = written(tmp_path, document)
    raw = path.read_bytes()
    assert raw == credential_bytes(document) == canonical_json(document).encode("utf-8")
    assert not raw.endswith(b"\n")
    assert json.loads(raw)["trigger_set"] == {"count": 3, "labels": [1, 2, 3]}


def test_untouched_credential_is_valid(alice: OwnerKey, tmp_path: Path) -> None:
    document = build(alice, trigger_set={"count": 3})
    credential = read_credential(written(tmp_path, document))
    assert credential.problems == []
    assert credential.valid
    assert credential.document == document
    assert credential.public_key == alice.public_key
    assert credential.public_key.owner == alice.owner
    assert credential.check_public_key(alice.public_key) is None
    assert credential.sha256 == sha256_hex(credential.raw)


def test_tuples_are_signed_as_written(alice: OwnerKey, tmp_path: Path) -> None:
    document = build(alice, embedding={"scheme": "w2", "layers": ("conv2.weight",)})
    assert document["embedding"]["layers"] == ["conv2.weight"]
    assert read_credential(written(tmp_path, document)).valid


def test_every_single_byte_change_is_detected(alice: OwnerKey, tmp_path: Path) -> None:
    path = written(tmp_path, build(alice, trigger_set={"count": 2}))
    raw = path.read_bytes()
    assert read_credential(path).valid
    altered = tmp_path / "altered.cred"
    for flip in (0x01, 0x20, 0x80):
        for offset in range(len(raw)):
            data = bytearray(raw)
            data[offset] ^= flip
            altered.write_bytes(bytes(data))
            credential = read_credential(altered)
            assert not credential.valid, (flip, offset, chr(raw[offset]))


def test_insertions_and_truncations_are_detected(alice: OwnerKey, tmp_path: Path) -> None:
    raw = written(tmp_path, build(alice)).read_bytes()
    altered = tmp_path / "altered.cred"
    variants = [raw + b"\n", b" " + raw, raw[:-1], raw.replace(b",", b", ", 1)]
    variants.append(canonical_json(json.loads(raw)).replace('","', '", "', 1).encode())
    for data in variants:
        altered.write_bytes(data)
        assert not read_credential(altered).valid


def test_resigned_edit_fails_payload_check(alice: OwnerKey, tmp_path: Path) -> None:
    """An edited field re-signed by someone else still fails: the key names the signer."""
    document = build(alice)
    stolen = dict(document, owner="mallory")
    mallory = generate_key("mallory")
    stolen["public_key"] = mallory.public_key.b64()
    del stolen["signature"]
    stolen["signature"] = base64.b64encode(mallory.sign(_signed_part(stolen))).decode()
    credential = read_credential(written(tmp_path, stolen))
    assert credential.problems == [
        "the payload is not the owner's signature of the credential's message"
    ]


def test_signature_problem_text(alice: OwnerKey, tmp_path: Path) -> None:
    document = dict(build(alice), created="2030-01-01T00:00:00Z")
    credential = read_credential(written(tmp_path, document))
    assert "the credential's signature does not verify (altered?)" in credential.problems
    assert "the payload is not the owner's signature of the credential's message" in (
        credential.problems
    )


def test_other_key_fails_check_public_key(
    alice: OwnerKey, mallory: OwnerKey, tmp_path: Path
) -> None:
    credential = read_credential(written(tmp_path, build(mallory)))
    assert credential.valid
    problem = credential.check_public_key(alice.public_key)
    assert problem == (
        f"the credential is signed with key {mallory.public_key.key_id()}, "
        f"not the owner's key {alice.public_key.key_id()}"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the file is empty"),
        (b"\xff\xfe\x00garbage", "the file is not UTF-8 text"),
        (b"{not json", "the file is not JSON"),
        (b"[1,2,3]", "the file holds a JSON list, not a credential object"),
        (b'"text"', "the file holds a JSON str, not a credential object"),
        (b"NaN", "the file is not JSON (refused: non-finite number NaN)"),
        (b"1.5", "the file holds a JSON float, not a credential object"),
        (b'{"a":1e400}', "the file is not JSON (refused: number 1e400 is out of range)"),
        (b'{"a":"\\udc00"}', "the file is not JSON (refused: a string that is not valid"),
        (b'{"a":1,"a":2}', "the file is not JSON (refused: duplicate key 'a')"),
        (b'{"a":' + b"[" * 40 + b"]" * 40 + b"}", "the file is not JSON (refused: nested"),
        (b"[" * 100_000, "the file is not JSON"),
        (b'{"format":"ticketguard-credential/1"}', "the owner field is missing or not a string"),
        (b'{"format":"something-else/1"}', "unknown credential format 'something-else/1'"),
        (b"{}", "the file has no format field"),
        (b'{ "format":"ticketguard-credential/1"}', "the file is not in canonical form"),
        (b'{"b":1,"a":2}', "the file is not in canonical form"),
        (b'{"a":NaN}', "the file is not JSON (refused: non-finite number NaN)"),
    ],
)
def test_malformed_files_are_reported(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.cred"
    path.write_bytes(content)
    credential = read_credential(path)
    assert not credential.valid
    assert any(p.startswith(problem) for p in credential.problems), credential.problems
    assert credential.raw == content


def test_mistyped_fields_are_reported(alice: OwnerKey, tmp_path: Path) -> None:
    document = build(alice)
    document.update(
        public_key="AAAA",
        fingerprint_after="A" * 64,
        architecture={"kwargs": {}},
        embedding="w2",
        seed_commitment=123,
        trigger_set=[],
        payload="!!",
    )
    del document["created"]
    credential = read_credential(written(tmp_path, document))
    assert credential.problems == [
        "the public key has 3 bytes, expected 32",
        "the created field is missing or not a string",
        "the fingerprint_after field is not 64 lowercase hex digits",
        "the seed_commitment field is not 64 lowercase hex digits",
        "the architecture field has no 'name' string",
        "the embedding field is missing or not an object",
        "the trigger_set field is not an object",
        "the payload is not valid base64",
    ]
    assert credential.public_key is None
    assert credential.check_public_key(alice.public_key) == (
        "the credential has no readable public key"
    )


def test_read_credential_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialError) as info:
        read_credential(tmp_path / "missing.cred")
    assert str(info.value) == f"{tmp_path / 'missing.cred'}: no such file"
    with pytest.raises(CredentialError, match="is a directory"):
        read_credential(tmp_path)


def test_make_credential_rejects_bad_fields(alice: OwnerKey) -> None:
    with pytest.raises(ConfigError, match="embedding"):
        build(alice, embedding={"bits": 512})
    with pytest.raises(ConfigError, match="architecture"):
        build(alice, architecture={})
    with pytest.raises(ConfigError, match="fingerprint_before"):
        build(alice, fingerprint_before="xyz")
    with pytest.raises(ConfigError, match="32 bytes"):
        build(alice, seed=b"short")
    with pytest.raises(ConfigError, match="JSON"):
        build(alice, embedding={"scheme": "w2", "bad": float("nan")})


def test_message_and_payload_of_malformed_document() -> None:
    with pytest.raises(CredentialError):
        payload_of({"payload": "AAAA"})
    with pytest.raises(CredentialError):
        message_of({"owner": "alice"})


# --- secret files and seeds -----------------------------------------------------------------------


def test_secret_round_trip_and_mode(tmp_path: Path) -> None:
    seed = os.urandom(32)
    path = tmp_path / "ticket.secret"
    old = os.umask(0)
    try:
        write_secret(path, seed=seed, credential_sha256="c" * 64, fingerprint=FP_BEFORE)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_secret(path) == seed
    assert json.loads(path.read_text()) == {
        "format": SECRET_FORMAT,
        "seed": seed.hex(),
        "credential_sha256": "c" * 64,
        "fingerprint": FP_BEFORE,
    }
    # Overwriting keeps the mode and leaves no temporary files.
    write_secret(path, seed=bytes(32), credential_sha256="d" * 64, fingerprint=FP_BEFORE)
    assert read_secret(path) == bytes(32)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ticket.secret"]


def test_write_secret_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        write_secret(tmp_path / "s", seed=b"x", credential_sha256="c" * 64, fingerprint=FP_BEFORE)
    with pytest.raises(ConfigError):
        write_secret(tmp_path / "s", seed=bytes(32), credential_sha256="c", fingerprint=FP_BEFORE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "is not a ticketguard secret file (not JSON)"),
        (b"[]", "is not a ticketguard secret file"),
        (b'{"format":"ticketguard-secret/1","seed":"abc"}', "the seed is not 32 bytes of hex"),
        (b'{"format":"other","seed":""}', "is not a ticketguard secret file"),
    ],
)
def test_read_secret_malformed(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.secret"
    path.write_bytes(content)
    with pytest.raises(CredentialError) as info:
        read_secret(path)
    assert str(info.value).startswith(f"{path}")
    assert message in str(info.value)


def test_read_secret_missing(tmp_path: Path) -> None:
    with pytest.raises(CredentialError) as info:
        read_secret(tmp_path / "nope.secret")
    assert str(info.value) == f"{tmp_path / 'nope.secret'}: no such file"


def _credential(tmp_path: Path, document: dict[str, Any]) -> Credential:
    credential = read_credential(written(tmp_path, document))
    assert credential.valid
    return credential


def test_seed_for_with_the_owners_key(alice: OwnerKey, tmp_path: Path) -> None:
    credential = _credential(tmp_path, build(alice))
    seed, problem = seed_for(credential, key=alice)
    assert problem is None
    assert seed == alice.derive_seed(FP_BEFORE)
    assert credential.check_seed(seed)


def test_seed_for_with_a_wrong_key(alice: OwnerKey, mallory: OwnerKey, tmp_path: Path) -> None:
    credential = _credential(tmp_path, build(alice))
    seed, problem = seed_for(credential, key=mallory)
    assert seed is None
    assert problem == (
        f"wrong key: the credential is signed with key {alice.public_key.key_id()}, "
        f"not the owner's key {mallory.public_key.key_id()}"
    )


def test_seed_for_with_the_right_reveal(alice: OwnerKey, tmp_path: Path) -> None:
    seed = os.urandom(32)
    credential = _credential(tmp_path, build(alice, seed=seed))
    secret = tmp_path / "ticket.secret"
    # A secret file records its credential's SHA-256 and the signed ticket's fingerprint.
    write_secret(secret, seed=seed, credential_sha256=credential.sha256, fingerprint=FP_AFTER)
    assert seed_for(credential, secret_path=secret) == (seed, None)
    # A random seed cannot be derived from the key, but the owner's secret file still works.
    derived, problem = seed_for(credential, key=alice)
    assert derived is None and "does not match the credential's commitment" in problem
    assert seed_for(credential, key=alice, secret_path=secret) == (seed, None)


def test_seed_for_with_a_wrong_reveal(alice: OwnerKey, tmp_path: Path) -> None:
    credential = _credential(tmp_path, build(alice, seed=os.urandom(32)))
    secret = tmp_path / "ticket.secret"
    write_secret(
        secret, seed=os.urandom(32), credential_sha256=credential.sha256, fingerprint=FP_AFTER
    )
    seed, problem = seed_for(credential, secret_path=secret)
    assert seed is None
    assert problem == "the revealed seed does not match the credential's commitment"
    assert not credential.check_seed(read_secret(secret))


def test_seed_for_needs_something(alice: OwnerKey, tmp_path: Path) -> None:
    credential = _credential(tmp_path, build(alice))
    assert seed_for(credential) == (
        None,
        "neither the owner's private key nor a revealed seed was given",
    )


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("credential_sha256", "0" * 64, "its credential_sha256 is not the SHA-256"),
        ("fingerprint", FP_BEFORE, "its fingerprint is not the credential's fingerprint_after"),
    ],
)
def test_seed_for_refuses_a_secret_of_another_credential(
    alice: OwnerKey, tmp_path: Path, field: str, value: str, reason: str
) -> None:
    seed = os.urandom(32)
    credential = _credential(tmp_path, build(alice, seed=seed))
    fields = {"credential_sha256": credential.sha256, "fingerprint": FP_AFTER, field: value}
    secret = tmp_path / "ticket.secret"
    write_secret(secret, seed=seed, **fields)
    found, problem = seed_for(credential, secret_path=secret)
    assert found is None and problem is not None
    assert problem.startswith("the revealed secret file is not for this credential") and (
        reason in problem
    )


def _secret_text(**changes: object) -> str:
    document: dict[str, object] = {
        "format": SECRET_FORMAT,
        "seed": "ab" * 32,
        "credential_sha256": "cd" * 32,
        "fingerprint": FP_AFTER,
    }
    document.update(changes)
    return json.dumps({k: v for k, v in document.items() if v is not None})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_secret_text(), None),
        (_secret_text(seed="AB" * 32), None),
        (_secret_text().replace('"format"', '"seed":"00","format"'), "duplicate key 'seed'"),
        (_secret_text(extra=1), "unknown field 'extra'"),
        (_secret_text().replace("}", ',"x":NaN}'), "non-finite number NaN"),
        (_secret_text().replace("}", ',"x":1e400}'), "out of range"),
        (_secret_text().replace("}", ',"x":"\\ud800"}'), "not valid Unicode"),
        (_secret_text(seed=None), "the seed is not 32 bytes of hex"),
        (_secret_text(seed=7), "the seed is not 32 bytes of hex"),
        (_secret_text(credential_sha256=None), "credential_sha256 field is missing or not 64"),
        (_secret_text(credential_sha256="CD" * 32), "credential_sha256 field is missing or not"),
        (_secret_text(fingerprint="ab"), "fingerprint field is missing or not 64 lowercase"),
        (_secret_text(fingerprint=1.5), "fingerprint field is missing or not 64 lowercase"),
        (_secret_text(trigger_set="x"), "trigger_set: expected an object, got str"),
        (_secret_text(trigger_set={"format": "x"}), "trigger_set: missing keys"),
        (
            _secret_text(
                trigger_set={
                    "format": "ticketguard-triggers/1",
                    "source": "generated",
                    "shape": [10**9, 3, 32, 32],
                    "labels": [],
                    "names": [],
                    "images": "",
                }
            ),
            "trigger_set: at most",
        ),
    ],
)
def test_read_secret_document_checks_every_field(
    tmp_path: Path, text: str, message: str | None
) -> None:
    from ticketguard.signatures.credential import read_secret_document

    path = tmp_path / "s.secret.json"
    path.write_text(text, encoding="utf-8")
    if message is None:
        assert read_secret_document(path)["format"] == SECRET_FORMAT
        return
    with pytest.raises(CredentialError) as info:
        read_secret_document(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_secret_file_is_read_under_a_size_cap(tmp_path: Path, monkeypatch) -> None:
    from ticketguard.signatures import credential as credential_module

    monkeypatch.setattr(credential_module, "MAX_SECRET_BYTES", 1000)
    path = tmp_path / "big.secret.json"
    path.write_text(_secret_text(pad="x" * 2000), encoding="utf-8")
    with pytest.raises(CredentialError, match="larger than 1000 bytes"):
        read_secret(path)
