"""Signed ownership credentials (canonical JSON, Ed25519) and the owner's secret seed file."""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ticketguard.documents import parse_json, read_bounded
from ticketguard.errors import ConfigError, CredentialError
from ticketguard.files import atomic_path, canonical_json, sha256_hex
from ticketguard.signatures.keys import (
    OwnerKey,
    PublicKey,
    decode_b64_exact,
    validate_owner,
    write_file_atomic,
)
from ticketguard.version import __version__

CREDENTIAL_FORMAT = "ticketguard-credential/1"
SECRET_FORMAT = "ticketguard-secret/1"
PAYLOAD_FORMAT = "ticketguard-payload/1"
#: Domain separation of the seed commitment from every other SHA-256 in the toolkit.
SEED_COMMITMENT_PREFIX = b"ticketguard/seed-commitment/1\x00"
SEED_BYTES = 32
SIGNATURE_BYTES = 64
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def payload_message(*, owner: str, created: str, fingerprint: str, toolkit_version: str) -> bytes:
    """Return the canonical message that the 512-bit embedded payload signs."""
    return canonical_json(
        {
            "format": PAYLOAD_FORMAT,
            "owner": owner,
            "created": created,
            "fingerprint": fingerprint,
            "toolkit_version": toolkit_version,
        }
    ).encode("utf-8")


def seed_commitment(seed: bytes) -> str:
    """Return the SHA-256 commitment to an embedding seed that a credential records."""
    return sha256_hex(SEED_COMMITMENT_PREFIX + bytes(seed))


def _signed_part(document: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in document.items() if k != "signature"}).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def make_credential(
    key: OwnerKey,
    *,
    created: str,
    fingerprint_before: str,
    fingerprint_after: str,
    architecture: dict[str, Any],
    embedding: dict[str, Any],
    seed: bytes,
    trigger_set: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and sign a credential document; raise ConfigError for a malformed field."""
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise ConfigError(f"the embedding seed must be {SEED_BYTES} bytes")
    document: dict[str, Any] = {
        "format": CREDENTIAL_FORMAT,
        "toolkit_version": __version__,
        "owner": key.owner,
        "public_key": key.public_key.b64(),
        "created": created,
        "fingerprint_before": fingerprint_before,
        "fingerprint_after": fingerprint_after,
        "architecture": architecture,
        "embedding": embedding,
        "seed_commitment": seed_commitment(seed),
    }
    if trigger_set is not None:
        document["trigger_set"] = trigger_set
    try:
        # What is signed is what a reader parses back: tuples become lists, keys become strings.
        document = json.loads(canonical_json(document))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the credential cannot be written as JSON: {exc}") from None
    field_problems = _field_problems(document, signed=False)
    if field_problems:
        raise ConfigError(field_problems[0])
    document["payload"] = _b64(key.sign(message_of(document)))
    document["signature"] = _b64(key.sign(_signed_part(document)))
    return document


def payload_of(document: dict[str, Any]) -> bytes:
    """Return the 64 raw payload bytes of a credential; raise CredentialError if malformed."""
    return decode_b64_exact(document.get("payload"), SIGNATURE_BYTES, "payload")


def message_of(document: dict[str, Any]) -> bytes:
    """Return the payload message of a credential; raise CredentialError if a field is missing."""
    fields = {}
    for name, source in (
        ("owner", "owner"),
        ("created", "created"),
        ("fingerprint", "fingerprint_before"),
        ("toolkit_version", "toolkit_version"),
    ):
        value = document.get(source)
        if not isinstance(value, str):
            raise CredentialError(f"the credential has no {source} string")
        fields[name] = value
    return payload_message(**fields)


def credential_bytes(document: dict[str, Any]) -> bytes:
    """Return the exact bytes of a credential file: canonical JSON, no trailing newline."""
    return canonical_json(document).encode("utf-8")


def write_credential(path: str | os.PathLike[str], document: dict[str, Any]) -> None:
    """Write a credential document to `path` atomically."""
    data = credential_bytes(document)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise CredentialError(f"cannot write {path}: {exc.strerror or exc}") from None


@dataclass
class Credential:
    """A credential file as read: its bytes, its document, and everything wrong with it."""

    path: Path
    raw: bytes
    document: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        """Whether the credential is well formed and both of its signatures verify."""
        return not self.problems

    @property
    def sha256(self) -> str:
        """Return the SHA-256 hex digest of the file's bytes."""
        return sha256_hex(self.raw)

    @property
    def public_key(self) -> PublicKey | None:
        """Return the public key the credential names, or None if it has no readable one."""
        if self.document is None:
            return None
        owner = self.document.get("owner")
        try:
            return PublicKey.from_b64(
                self.document.get("public_key"), owner if isinstance(owner, str) else None
            )
        except CredentialError:
            return None

    def check_public_key(self, expected: PublicKey) -> str | None:
        """Return a problem if the credential is not signed with `expected`, else None."""
        actual = self.public_key
        if actual is None:
            return "the credential has no readable public key"
        if actual != expected:
            return (
                f"the credential is signed with key {actual.key_id()}, "
                f"not the owner's key {expected.key_id()}"
            )
        return None

    def check_seed(self, seed: bytes) -> bool:
        """Return whether `seed` matches the credential's seed commitment."""
        if self.document is None:
            return False
        recorded = self.document.get("seed_commitment")
        if not isinstance(recorded, str) or not isinstance(seed, bytes | bytearray):
            return False
        return hmac.compare_digest(recorded, seed_commitment(seed))


def _field_problems(doc: dict[str, Any], *, signed: bool = True) -> list[str]:
    """Return what is missing or mistyped in a credential document (before signing: `signed`)."""
    problems: list[str] = []

    def require_str(name: str) -> None:
        if not isinstance(doc.get(name), str):
            problems.append(f"the {name} field is missing or not a string")

    def require_dict_with(name: str, inner: str) -> None:
        value = doc.get(name)
        if not isinstance(value, dict):
            problems.append(f"the {name} field is missing or not an object")
        elif not isinstance(value.get(inner), str):
            problems.append(f"the {name} field has no {inner!r} string")

    def require_b64(name: str, length: int) -> None:
        try:
            decode_b64_exact(doc.get(name), length, name.replace("_", " "))
        except CredentialError as exc:
            problems.append(str(exc))

    require_str("toolkit_version")
    owner = doc.get("owner")
    if not isinstance(owner, str):
        problems.append("the owner field is missing or not a string")
    else:
        try:
            validate_owner(owner)
        except ConfigError as exc:
            problems.append(str(exc))
    try:
        PublicKey.from_b64(doc.get("public_key"))
    except CredentialError as exc:
        problems.append(str(exc))
    require_str("created")
    for name in ("fingerprint_before", "fingerprint_after", "seed_commitment"):
        if not _is_sha256_hex(doc.get(name)):
            problems.append(f"the {name} field is not 64 lowercase hex digits")
    require_dict_with("architecture", "name")
    require_dict_with("embedding", "scheme")
    if "trigger_set" in doc and not isinstance(doc["trigger_set"], dict):
        problems.append("the trigger_set field is not an object")
    if signed:
        require_b64("payload", SIGNATURE_BYTES)
        require_b64("signature", SIGNATURE_BYTES)
    return problems


def _signature_problems(doc: dict[str, Any]) -> list[str]:
    """Check both signatures of a document whose fields are well formed."""
    problems = []
    public = PublicKey.from_b64(doc["public_key"])
    signature = decode_b64_exact(doc["signature"], SIGNATURE_BYTES, "signature")
    if not public.verify(signature, _signed_part(doc)):
        problems.append("the credential's signature does not verify (altered?)")
    if not public.verify(payload_of(doc), message_of(doc)):
        problems.append("the payload is not the owner's signature of the credential's message")
    return problems


def _document_problems(raw: bytes) -> tuple[dict[str, Any] | None, list[str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, ["the file is not UTF-8 text"]
    if not text.strip():
        return None, ["the file is empty"]
    try:
        # The strict reader: no duplicate keys, NaN, Infinity, 1e400, lone surrogates or deep
        # nesting, so every document it returns can be written back as canonical JSON.
        parsed = parse_json(text, what="the file", error=CredentialError)
    except CredentialError as exc:
        detail = str(exc).removeprefix("the file: ")
        if detail.startswith("not valid JSON "):
            return None, ["the file is not JSON " + detail.removeprefix("not valid JSON ")]
        return None, [f"the file is not JSON ({detail})"]
    if not isinstance(parsed, dict):
        return None, [f"the file holds a JSON {type(parsed).__name__}, not a credential object"]
    problems = []
    try:
        canonical: bytes | None = canonical_json(parsed).encode("utf-8")
    except (ValueError, RecursionError):
        canonical = None
    if canonical != raw:
        # Canonical bytes leave no room for whitespace, key order or escapes to change unnoticed.
        problems.append("the file is not in canonical form (reformatted or edited?)")
    fmt = parsed.get("format")
    if fmt != CREDENTIAL_FORMAT:
        problems.append(
            "the file has no format field"
            if fmt is None
            else f"unknown credential format {_shown(fmt)} (expected {CREDENTIAL_FORMAT!r})"
        )
        return parsed, problems
    field_problems = _field_problems(parsed)
    problems += field_problems
    if not field_problems and canonical is not None:
        problems += _signature_problems(parsed)
    return parsed, problems


def _shown(value: object, limit: int = 40) -> str:
    """A short, printable rendering of a value read from a file (for one-line messages)."""
    text = value if isinstance(value, str) else type(value).__name__
    text = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


#: Credentials are a few kilobytes; anything far larger is not one.
MAX_FILE_BYTES = 1 << 20
#: A secret file may carry an imported trigger set (compressed images), so it may be larger.
MAX_SECRET_BYTES = 64 << 20


def _read_small(p: Path, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """Read a regular file of at most `limit` bytes, or raise CredentialError with one line."""
    if p.is_dir():
        raise CredentialError(f"{p} is a directory, not a {what}")
    return read_bounded(p, what=what, error=CredentialError, max_bytes=limit)


def read_credential(path: str | os.PathLike[str]) -> Credential:
    """Read and check a credential; only a missing or unreadable file raises CredentialError."""
    p = Path(path)
    raw = _read_small(p, "credential")
    document, problems = _document_problems(raw)
    return Credential(p, raw, document, problems)


def write_secret(
    path: str | os.PathLike[str],
    *,
    seed: bytes,
    credential_sha256: str,
    fingerprint: str,
    trigger_set: dict[str, Any] | None = None,
) -> None:
    """Write the owner's secret file (the embedding seed, any trigger set) with mode 0600."""
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise ConfigError(f"the embedding seed must be {SEED_BYTES} bytes")
    for name, value in (("credential_sha256", credential_sha256), ("fingerprint", fingerprint)):
        if not _is_sha256_hex(value):
            raise ConfigError(f"{name} must be 64 lowercase hex digits, not {value!r}")
    document = {
        "format": SECRET_FORMAT,
        "seed": bytes(seed).hex(),
        "credential_sha256": credential_sha256,
        "fingerprint": fingerprint,
    }
    if trigger_set is not None:
        document["trigger_set"] = trigger_set
    data = (json.dumps(document, sort_keys=True, indent=2) + "\n").encode("utf-8")
    try:
        write_file_atomic(path, data, mode=0o600, overwrite=True)
    except OSError as exc:
        raise CredentialError(f"cannot write {path}: {exc.strerror or exc}") from None


#: The fields of a secret file (all but trigger_set are required).
SECRET_KEYS = ("format", "seed", "credential_sha256", "fingerprint", "trigger_set")


def read_secret_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return a secret file's document, every field checked; raise CredentialError if malformed.

    The file is read strictly (size cap, no duplicate keys, no non-finite numbers, bounded
    nesting). Its format, its 32-byte hex seed, its credential_sha256 and fingerprint (64
    lowercase hex digits each) and the outline of any trigger set are checked here; whether the
    seed, the hashes and the trigger set belong to a credential is checked where they are used
    (`seed_for`, verification's `resolve_triggers`).
    """
    from ticketguard.errors import TriggerSetError
    from ticketguard.signatures.triggers import check_trigger_dict

    p = Path(path)
    raw = _read_small(p, "secret file", MAX_SECRET_BYTES)
    try:
        document = parse_json(raw, what=f"{p}", error=CredentialError)
    except CredentialError as exc:
        detail = str(exc).removeprefix(f"{p}: ")
        why = "" if detail.startswith("not valid JSON") else f": {detail}"
        raise CredentialError(f"{p} is not a ticketguard secret file (not JSON){why}") from None
    if not isinstance(document, dict) or document.get("format") != SECRET_FORMAT:
        raise CredentialError(f"{p} is not a ticketguard secret file (format {SECRET_FORMAT})")
    unknown = sorted(k for k in document if k not in SECRET_KEYS)
    if unknown:
        raise CredentialError(f"{p}: unknown field {_shown(unknown[0])} in the secret file")
    seed_hex = document.get("seed")
    if not isinstance(seed_hex, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", seed_hex):
        raise CredentialError(f"{p}: the seed is not {SEED_BYTES} bytes of hex")
    for name in ("credential_sha256", "fingerprint"):
        if not _is_sha256_hex(document.get(name)):
            raise CredentialError(
                f"{p}: the {name} field is missing or not 64 lowercase hex digits"
            )
    if "trigger_set" in document:
        try:
            check_trigger_dict(document["trigger_set"], what=f"{p}: trigger_set")
        except TriggerSetError as exc:
            raise CredentialError(str(exc)) from None
    return document


def secret_mismatch(credential: Credential, secret: dict[str, Any]) -> str | None:
    """Return why a (checked) secret document does not belong to `credential`, or None.

    A secret file records the SHA-256 of its credential's bytes and the signed ticket's
    fingerprint (the credential's fingerprint_after); a secret edited or paired with another
    credential is refused.
    """
    if not hmac.compare_digest(str(secret.get("credential_sha256")), credential.sha256):
        return (
            "the revealed secret file is not for this credential (its credential_sha256 is not "
            "the SHA-256 of the credential file)"
        )
    after = (credential.document or {}).get("fingerprint_after")
    if not isinstance(after, str) or not hmac.compare_digest(str(secret.get("fingerprint")), after):
        return (
            "the revealed secret file is not for this credential (its fingerprint is not the "
            "credential's fingerprint_after)"
        )
    return None


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """Return the 32-byte embedding seed from a secret file; raise CredentialError if malformed."""
    return bytes.fromhex(read_secret_document(path)["seed"])


def seed_for(
    credential: Credential,
    *,
    key: OwnerKey | None = None,
    secret_path: str | os.PathLike[str] | None = None,
) -> tuple[bytes | None, str | None]:
    """Return (seed, None) for the credential's embedding seed, or (None, problem).

    With the owner's private key the seed is derived from it (HKDF over the pre-embedding
    fingerprint); a secret file (the reveal) is used when given and the derived seed does not
    match. A missing or malformed secret file raises CredentialError.
    """
    if key is None and secret_path is None:
        return None, "neither the owner's private key nor a revealed seed was given"
    document = credential.document
    problem: str | None = None
    if key is not None:
        wrong = credential.check_public_key(key.public_key)
        if wrong is not None:
            return None, f"wrong key: {wrong}"
        fingerprint = document.get("fingerprint_before") if document is not None else None
        if not _is_sha256_hex(fingerprint):
            return None, "the credential has no valid fingerprint_before"
        seed = key.derive_seed(fingerprint)
        if credential.check_seed(seed):
            return seed, None
        problem = (
            "the seed derived from the owner's key does not match the credential's commitment "
            "(a random seed? give the secret file)"
        )
    if secret_path is not None:
        secret = read_secret_document(secret_path)
        mismatch = secret_mismatch(credential, secret)
        if mismatch is not None:
            return None, mismatch
        seed = bytes.fromhex(secret["seed"])
        if credential.check_seed(seed):
            return seed, None
        problem = "the revealed seed does not match the credential's commitment"
    return None, problem
