"""Tests of owner keys: key files, passphrases, seed derivation and `ticketguard keygen`."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cli_helpers import error_line, invoke
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ticketguard.errors import ConfigError, CredentialError, KeyFileError
from ticketguard.signatures.keys import (
    PASSPHRASE_ENV,
    OwnerKey,
    PublicKey,
    generate_key,
    passphrase_from,
    read_private_key,
    read_public_key,
    validate_owner,
    write_keypair,
)

FP_A = "a" * 64
FP_B = "0123456789abcdef" * 4


@pytest.fixture(autouse=True)
def _no_passphrase_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a passphrase in the developer's environment out of these tests."""
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- owner ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("owner", ["alice", "Alice Smith <alice@example.org>", "ünï", "a" * 200])
def test_validate_owner_accepts(owner: str) -> None:
    assert validate_owner(owner) == owner


@pytest.mark.parametrize(
    "owner", ["", " alice", "alice ", "al\nice", "al\x00ice", "a\tb", "a" * 201]
)
def test_validate_owner_rejects(owner: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_owner(owner)
    assert "\n" not in str(info.value)


# --- keys in memory -------------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    key = generate_key("alice")
    signature = key.sign(b"message")
    assert len(signature) == 64
    assert key.public_key.verify(signature, b"message")
    assert not key.public_key.verify(signature, b"messagf")
    assert not generate_key("alice").public_key.verify(signature, b"message")
    # Bad input is a failed verification, never an exception.
    assert not key.public_key.verify(b"short", b"message")
    assert not key.public_key.verify("text", b"message")  # type: ignore[arg-type]


def test_public_key_encodings() -> None:
    public = generate_key("alice").public_key
    assert len(public.raw()) == 32
    assert base64.b64decode(public.b64()) == public.raw()
    assert len(public.key_id()) == 16 and int(public.key_id(), 16) >= 0
    again = PublicKey.from_b64(public.b64())
    assert again == public and hash(again) == hash(public)
    assert again.owner is None and public.owner == "alice"
    assert public != generate_key("alice").public_key


@pytest.mark.parametrize("text", ["", "not base64!", "AAAA", base64.b64encode(b"x" * 31).decode()])
def test_public_key_from_b64_rejects(text: str) -> None:
    with pytest.raises(CredentialError):
        PublicKey.from_b64(text)


def test_public_key_from_b64_rejects_non_canonical_spelling() -> None:
    text = generate_key("alice").public_key.b64()
    # The last character before '=' carries two padding bits; setting one gives the same bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(text[-2])
    other = text[:-2] + alphabet[last ^ 1] + "="
    assert base64.b64decode(other) == base64.b64decode(text)
    with pytest.raises(CredentialError):
        PublicKey.from_b64(other)


def test_derive_seed_is_deterministic_and_keyed() -> None:
    key = generate_key("alice")
    seed = key.derive_seed(FP_A)
    assert len(seed) == 32
    assert key.derive_seed(FP_A) == seed
    assert key.derive_seed(FP_B) != seed
    assert generate_key("alice").derive_seed(FP_A) != seed


@pytest.mark.parametrize("fingerprint", ["", "a" * 63, "g" * 64, "a" * 65])
def test_derive_seed_rejects_bad_fingerprint(fingerprint: str) -> None:
    with pytest.raises(ConfigError):
        generate_key("alice").derive_seed(fingerprint)


def test_owner_key_validates_owner() -> None:
    with pytest.raises(ConfigError):
        OwnerKey("bad\nowner", generate_key("alice").private_key)


# --- key files ------------------------------------------------------------------------------------


def test_plain_round_trip(tmp_path: Path) -> None:
    key = generate_key("Alice Smith <alice@example.org>")
    key_path, pub_path = write_keypair(key, tmp_path / "alice")
    assert (key_path, pub_path) == (tmp_path / "alice.key", tmp_path / "alice.pub")
    assert mode_of(key_path) == 0o600
    text = key_path.read_text()
    assert text.startswith("ticketguard owner key\nowner: Alice Smith <alice@example.org>\n")
    assert "-----BEGIN PRIVATE KEY-----" in text
    assert pub_path.read_text().startswith("ticketguard owner public key\nowner: Alice Smith")
    again = read_private_key(key_path)
    assert again.owner == key.owner
    assert again.public_key == key.public_key
    assert again.derive_seed(FP_A) == key.derive_seed(FP_A)
    public = read_public_key(pub_path)
    assert public == key.public_key and public.owner == key.owner
    # No temporary files are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.key", "alice.pub"]


def test_encrypted_round_trip(tmp_path: Path) -> None:
    key = generate_key("alice")
    key_path, pub_path = write_keypair(key, tmp_path / "alice.key", passphrase=b"s3cret pass")
    assert key_path == tmp_path / "alice.key"
    assert "-----BEGIN ENCRYPTED PRIVATE KEY-----" in key_path.read_text()
    assert mode_of(key_path) == 0o600
    assert read_private_key(key_path, b"s3cret pass").public_key == key.public_key
    assert read_public_key(pub_path) == key.public_key
    assert read_public_key(key_path, b"s3cret pass") == key.public_key


def test_missing_passphrase(tmp_path: Path) -> None:
    key_path, _ = write_keypair(generate_key("alice"), tmp_path / "alice", passphrase=b"pw")
    with pytest.raises(KeyFileError) as info:
        read_private_key(key_path)
    assert str(info.value) == (
        f"{key_path} is encrypted: give --passphrase-file or set TICKETGUARD_PASSPHRASE"
    )


def test_wrong_passphrase(tmp_path: Path) -> None:
    key_path, _ = write_keypair(generate_key("alice"), tmp_path / "alice", passphrase=b"pw")
    with pytest.raises(KeyFileError) as info:
        read_private_key(key_path, b"PW")
    assert str(info.value) == f"wrong passphrase for {key_path}"


def test_passphrase_for_plain_key_is_ignored(tmp_path: Path) -> None:
    key = generate_key("alice")
    key_path, _ = write_keypair(key, tmp_path / "alice")
    assert read_private_key(key_path, b"unused").public_key == key.public_key


def test_empty_passphrase_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        write_keypair(generate_key("alice"), tmp_path / "alice", passphrase=b"")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", ["alice.key", "alice.pub"])
def test_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("keep me")
    with pytest.raises(KeyFileError) as info:
        write_keypair(generate_key("alice"), tmp_path / "alice")
    assert str(info.value) == (
        f"{tmp_path / existing} already exists; refusing to overwrite a key file"
    )
    assert (tmp_path / existing).read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_private_key_never_wider_than_0600(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key_path, pub_path = write_keypair(generate_key("alice"), tmp_path / "alice")
    finally:
        os.umask(old)
    assert mode_of(key_path) == 0o600
    assert mode_of(pub_path) == 0o666


def test_second_file_failure_removes_the_first(tmp_path: Path, monkeypatch) -> None:
    import ticketguard.signatures.keys as keys

    real = keys.write_file_atomic

    def fail_on_pub(path, data, **kwargs):
        if str(path).endswith(".pub"):
            raise OSError(28, "No space left on device")
        return real(path, data, **kwargs)

    monkeypatch.setattr(keys, "write_file_atomic", fail_on_pub)
    with pytest.raises(KeyFileError) as info:
        write_keypair(generate_key("alice"), tmp_path / "alice")
    assert "No space left on device" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such file"):
        read_private_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="no such file"):
        read_public_key(tmp_path / "missing.pub")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"\x00\xff not a key")
    with pytest.raises(KeyFileError, match="is not a ticketguard or PEM private key file"):
        read_private_key(garbage)
    text = tmp_path / "text.key"
    text.write_text("just some text\n")
    with pytest.raises(KeyFileError, match="is not a ticketguard or PEM private key file"):
        read_private_key(text)
    with pytest.raises(KeyFileError, match="is a directory"):
        read_private_key(tmp_path)


def test_public_key_given_for_private(tmp_path: Path) -> None:
    _, pub_path = write_keypair(generate_key("alice"), tmp_path / "alice")
    with pytest.raises(KeyFileError) as info:
        read_private_key(pub_path)
    assert str(info.value) == (
        f"{pub_path} is a public key; the owner's private key (.key file) is needed"
    )


def test_non_ed25519_key_refused(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.key"
    path.write_bytes(
        b"owner: alice\n"
        + private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="an Ed25519 key is required"):
        read_private_key(path)
    pub = tmp_path / "ec.pub"
    pub.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="an Ed25519 key is required"):
        read_public_key(pub)


def test_missing_owner_line(tmp_path: Path) -> None:
    key = generate_key("alice")
    path = tmp_path / "bare.key"
    path.write_bytes(
        key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="has no 'owner:' line"):
        read_private_key(path)
    # A bare PEM public key is fine: its owner is simply unknown.
    pub = tmp_path / "bare.pub"
    pub.write_bytes(
        key.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    public = read_public_key(pub)
    assert public == key.public_key and public.owner is None


def test_crlf_line_endings_are_read(tmp_path: Path) -> None:
    key = generate_key("alice")
    key_path, pub_path = write_keypair(key, tmp_path / "alice", passphrase=b"pw")
    for path in (key_path, pub_path):
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert read_private_key(key_path, b"pw").owner == "alice"
    assert read_public_key(pub_path) == key.public_key


def test_tampered_pem_body(tmp_path: Path) -> None:
    key_path, _ = write_keypair(generate_key("alice"), tmp_path / "alice")
    lines = key_path.read_text().splitlines()
    body = next(i for i, line in enumerate(lines) if line.startswith("-----BEGIN")) + 1
    lines[body] = lines[body][:-4]
    key_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(KeyFileError, match="malformed private key"):
        read_private_key(key_path)


# --- passphrases ----------------------------------------------------------------------------------


def test_passphrase_from_file(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_bytes(b" two words \n")
    assert passphrase_from(path, environ={}) == b" two words "
    path.write_bytes(b"pw\n\n")
    assert passphrase_from(path, environ={}) == b"pw\n"
    path.write_bytes(b"pw\r\n")
    assert passphrase_from(path, environ={}) == b"pw"
    # The file wins over the environment.
    assert passphrase_from(path, environ={PASSPHRASE_ENV: "env"}) == b"pw"


def test_passphrase_from_env() -> None:
    assert passphrase_from(None, environ={PASSPHRASE_ENV: "from env"}) == b"from env"
    assert passphrase_from(None, environ={}) is None


def test_passphrase_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such file"):
        passphrase_from(tmp_path / "missing", environ={})
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    with pytest.raises(KeyFileError, match="is empty"):
        passphrase_from(empty, environ={})
    with pytest.raises(KeyFileError, match="set but empty"):
        passphrase_from(None, environ={PASSPHRASE_ENV: ""})


# --- ticketguard keygen ---------------------------------------------------------------------------


def test_keygen_cli(tmp_path: Path) -> None:
    stem = tmp_path / "keys" / "alice"
    result = invoke(["keygen", "--owner", "alice@example.org", "--out", stem])
    assert result.exit_code == 0, result.output
    key = read_private_key(f"{stem}.key")
    assert key.owner == "alice@example.org"
    assert mode_of(Path(f"{stem}.key")) == 0o600
    assert read_public_key(f"{stem}.pub") == key.public_key
    assert f"wrote {stem}.key (private, unencrypted; keep it secret)" in result.output
    assert f"wrote {stem}.pub" in result.output
    assert f"key id {key.public_key.key_id()}" in result.output


def test_keygen_cli_passphrase_file(tmp_path: Path) -> None:
    secret = "correct horse battery staple"
    pw = tmp_path / "pw.txt"
    pw.write_text(secret + "\n")
    stem = tmp_path / "alice"
    result = invoke(["keygen", "--owner", "alice", "--out", stem, "--passphrase-file", pw])
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    assert "encrypted" in result.output
    with pytest.raises(KeyFileError, match="is encrypted"):
        read_private_key(f"{stem}.key")
    assert read_private_key(f"{stem}.key", secret.encode()).owner == "alice"


def test_keygen_cli_passphrase_env(tmp_path: Path) -> None:
    stem = tmp_path / "alice"
    result = invoke(
        ["keygen", "--owner", "alice", "--out", stem], env={PASSPHRASE_ENV: "env secret"}
    )
    assert result.exit_code == 0, result.output
    assert "env secret" not in result.output
    assert read_private_key(f"{stem}.key", b"env secret").owner == "alice"


def test_keygen_cli_bad_owner(tmp_path: Path) -> None:
    result = invoke(["keygen", "--owner", " alice", "--out", tmp_path / "alice"])
    assert error_line(result, 2) == (
        "Error: Invalid value for '--owner': the owner id ' alice' starts or ends with whitespace"
    )
    assert list(tmp_path.iterdir()) == []


def test_keygen_cli_refuses_to_overwrite(tmp_path: Path) -> None:
    stem = tmp_path / "alice"
    assert invoke(["keygen", "--owner", "alice", "--out", stem]).exit_code == 0
    before = Path(f"{stem}.key").read_bytes()
    result = invoke(["keygen", "--owner", "bob", "--out", stem])
    assert error_line(result, 1) == (
        f"Error: {stem}.key already exists; refusing to overwrite a key file"
    )
    assert Path(f"{stem}.key").read_bytes() == before


def test_keygen_cli_missing_passphrase_file(tmp_path: Path) -> None:
    result = invoke(
        [
            "keygen",
            "--owner",
            "alice",
            "--out",
            tmp_path / "alice",
            "--passphrase-file",
            tmp_path / "nope",
        ]
    )
    assert error_line(result, 1) == f"Error: passphrase file {tmp_path / 'nope'}: no such file"
    assert list(tmp_path.iterdir()) == []
