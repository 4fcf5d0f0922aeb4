"""Ed25519 owner keys: generation, PEM key files that carry the owner id, and seed derivation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ticketguard.errors import ConfigError, CredentialError, KeyFileError

#: Environment variable read for a passphrase when no passphrase file is given.
PASSPHRASE_ENV = "TICKETGUARD_PASSPHRASE"
#: HKDF `info` of the W2 embedding seed; a new derivation gets a new label, never a changed one.
SEED_INFO = b"ticketguard/W2 embedding seed/1"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
PRIVATE_HEADER = "ticketguard owner key"
PUBLIC_HEADER = "ticketguard owner public key"
OWNER_MAX_CHARS = 200
# Key files are a few hundred bytes; anything much larger is some other file given by mistake.
_MAX_KEY_FILE_BYTES = 64 * 1024
#: Longest passphrase read from a passphrase file (a passphrase, not a document).
MAX_PASSPHRASE_BYTES = 64 * 1024
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_PEM_BLOCK = re.compile(
    r"^-----BEGIN ([A-Z0-9 ]+)-----[ \t]*\r?\n(.*?)^-----END \1-----[ \t\r]*$",
    re.MULTILINE | re.DOTALL,
)


def validate_owner(owner: str) -> str:
    """Return `owner` if it is a usable owner id, else raise ConfigError."""
    if not isinstance(owner, str) or not owner:
        raise ConfigError("the owner id is empty")
    if len(owner) > OWNER_MAX_CHARS:
        raise ConfigError(f"the owner id is longer than {OWNER_MAX_CHARS} characters")
    if not owner.isprintable():
        raise ConfigError(f"the owner id {owner!r} contains a newline or control character")
    if owner != owner.strip():
        raise ConfigError(f"the owner id {owner!r} starts or ends with whitespace")
    return owner


def _check_fingerprint(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not _HEX64.fullmatch(fingerprint):
        raise ConfigError(f"{fingerprint!r} is not a SHA-256 fingerprint (64 hex digits)")
    return fingerprint


@dataclass(frozen=True, eq=False)
class PublicKey:
    """An Ed25519 public key, with the owner id it was published under when known."""

    key: Ed25519PublicKey
    owner: str | None = None

    def raw(self) -> bytes:
        """Return the 32 raw public-key bytes."""
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def b64(self) -> str:
        """Return the raw public key in standard base64."""
        return base64.b64encode(self.raw()).decode("ascii")

    def key_id(self) -> str:
        """Return a short id of the key: the first 16 hex digits of SHA-256 of its raw bytes."""
        return hashlib.sha256(self.raw()).hexdigest()[:16]

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Return whether `signature` is a valid signature of `message` under this key."""
        if not isinstance(signature, bytes | bytearray) or not isinstance(
            message, bytes | bytearray
        ):
            return False
        try:
            self.key.verify(bytes(signature), bytes(message))
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    @classmethod
    def from_b64(cls, text: str, owner: str | None = None) -> PublicKey:
        """Parse a key written by `b64()`; raise CredentialError if it is not one."""
        raw = decode_b64_exact(text, 32, "public key")
        try:
            return cls(Ed25519PublicKey.from_public_bytes(raw), owner)
        except ValueError:
            raise CredentialError("the public key is not a valid Ed25519 key") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return self.raw() == other.raw()

    def __hash__(self) -> int:
        return hash(self.raw())


def decode_b64_exact(text: object, length: int, what: str) -> bytes:
    """Decode canonical base64 of exactly `length` bytes; raise CredentialError otherwise."""
    if not isinstance(text, str):
        raise CredentialError(f"the {what} is not a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise CredentialError(f"the {what} is not valid base64") from None
    # Only the canonical spelling is accepted, so no two texts decode to the same bytes.
    if base64.b64encode(raw).decode("ascii") != text:
        raise CredentialError(f"the {what} is not in canonical base64")
    if len(raw) != length:
        raise CredentialError(f"the {what} has {len(raw)} bytes, expected {length}")
    return raw


@dataclass(frozen=True)
class OwnerKey:
    """An owner's Ed25519 private key and owner id."""

    owner: str
    private_key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        validate_owner(self.owner)
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise ConfigError("an owner key must be an Ed25519 private key")

    @property
    def public_key(self) -> PublicKey:
        """Return the matching public key, labelled with the owner id."""
        return PublicKey(self.private_key.public_key(), self.owner)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of `message`."""
        return self.private_key.sign(message)

    def derive_seed(self, fingerprint: str) -> bytes:
        """Derive the 32-byte W2 embedding seed for a ticket's pre-embedding fingerprint."""
        salt = bytes.fromhex(_check_fingerprint(fingerprint))
        ikm = self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=SEED_INFO).derive(ikm)


def generate_key(owner: str) -> OwnerKey:
    """Generate a fresh Ed25519 key for `owner`."""
    return OwnerKey(validate_owner(owner), Ed25519PrivateKey.generate())


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file_atomic(
    path: str | os.PathLike[str], data: bytes, *, mode: int, overwrite: bool
) -> None:
    """Write `data` to `path` atomically with exactly `mode`; optionally never replace a file.

    The temporary file is created 0600 (mkstemp) and only then given `mode`, so a secret is never
    readable by others, not even briefly. Raise FileExistsError when `path` exists and
    `overwrite` is false.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp_path, target)
        else:
            try:
                # A hard link fails if the target exists, so a file made meanwhile is not clobbered.
                os.link(tmp_path, target)
            except FileExistsError:
                raise
            except OSError:
                # Some file systems have no hard links; fall back to check-then-rename.
                if target.exists():
                    raise FileExistsError(target) from None
                os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _key_file_text(header: str, owner: str, key_id: str, pem: bytes) -> bytes:
    # RFC 7468 allows explanatory text before the PEM block: the owner id travels with the key.
    return f"{header}\nowner: {owner}\nkey id: {key_id}\n".encode() + pem


def _stem_paths(stem: str | os.PathLike[str]) -> tuple[Path, Path]:
    base = Path(stem)
    if base.suffix in (PRIVATE_SUFFIX, PUBLIC_SUFFIX):
        base = base.with_suffix("")
    if not base.name:
        raise KeyFileError(f"{stem!s} does not name a key file")
    return (
        base.with_name(base.name + PRIVATE_SUFFIX),
        base.with_name(base.name + PUBLIC_SUFFIX),
    )


def write_keypair(
    key: OwnerKey, stem: str | os.PathLike[str], passphrase: bytes | None = None
) -> tuple[Path, Path]:
    """Write STEM.key (PKCS#8 PEM, mode 0600) and STEM.pub; refuse to overwrite either."""
    key_path, pub_path = _stem_paths(stem)
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key file")
    if passphrase is None:
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    elif not passphrase:
        raise KeyFileError("the passphrase is empty")
    else:
        encryption = serialization.BestAvailableEncryption(passphrase)
    public = key.public_key
    private_pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_pem = public.key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_text = _key_file_text(PRIVATE_HEADER, key.owner, public.key_id(), private_pem)
    public_text = _key_file_text(PUBLIC_HEADER, key.owner, public.key_id(), public_pem)
    _write_new(key_path, private_text, 0o600)
    try:
        _write_new(pub_path, public_text, 0o666 & ~_current_umask())
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    return key_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        write_file_atomic(path, data, mode=mode, overwrite=False)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class _KeyFile:
    label: str
    pem: bytes
    owner: str | None


def _read_key_file(path: str | os.PathLike[str], kind: str) -> _KeyFile:
    """Read a PEM key file: its first PEM block and the owner from the text before it."""
    p = Path(path)
    try:
        # Read at most one byte past the cap: a device or a growing file cannot make us read more.
        with p.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
        if len(data) > _MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{p} is not a ticketguard {kind} file (too large)")
    except FileNotFoundError:
        raise KeyFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise KeyFileError(f"{p} is a directory, not a {kind} file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{p} is not a ticketguard or PEM {kind} file") from None
    match = _PEM_BLOCK.search(text)
    if match is None:
        raise KeyFileError(f"{p} is not a ticketguard or PEM {kind} file")
    owner = None
    for line in text[: match.start()].splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "owner":
            try:
                owner = validate_owner(value.strip())
            except ConfigError as exc:
                raise KeyFileError(f"{p}: {exc}") from None
            break
    return _KeyFile(match.group(1), match.group(0).encode("utf-8"), owner)


def read_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> OwnerKey:
    """Read an owner key written by `write_keypair`; raise KeyFileError saying why it fails."""
    p = Path(path)
    file = _read_key_file(p, "private key")
    if file.label == "PUBLIC KEY":
        raise KeyFileError(f"{p} is a public key; the owner's private key (.key file) is needed")
    if not file.label.endswith("PRIVATE KEY"):
        raise KeyFileError(f"{p} is not a ticketguard or PEM private key file")
    encrypted = file.label == "ENCRYPTED PRIVATE KEY"
    if encrypted and passphrase is None:
        raise KeyFileError(f"{p} is encrypted: give --passphrase-file or set {PASSPHRASE_ENV}")
    try:
        private = serialization.load_pem_private_key(
            file.pem, password=passphrase if encrypted else None
        )
    except TypeError:
        # The PEM headers claim no encryption but the key is encrypted (a legacy format).
        raise KeyFileError(
            f"{p} is encrypted: give --passphrase-file or set {PASSPHRASE_ENV}"
        ) from None
    except ValueError:
        if encrypted:
            raise KeyFileError(f"wrong passphrase for {p}") from None
        raise KeyFileError(f"{p} holds a malformed private key") from None
    except UnsupportedAlgorithm:
        raise KeyFileError(f"{p}: an Ed25519 key is required") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{p}: an Ed25519 key is required, not {type(private).__name__}")
    if file.owner is None:
        raise KeyFileError(f"{p} has no 'owner:' line (make keys with `ticketguard keygen`)")
    return OwnerKey(file.owner, private)


def read_public_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> PublicKey:
    """Read a public key file, or derive the public key from a private key file."""
    p = Path(path)
    file = _read_key_file(p, "public key")
    if file.label.endswith("PRIVATE KEY"):
        return read_private_key(p, passphrase).public_key
    if file.label != "PUBLIC KEY":
        raise KeyFileError(f"{p} is not a ticketguard or PEM public key file")
    try:
        public = serialization.load_pem_public_key(file.pem)
    except ValueError:
        raise KeyFileError(f"{p} holds a malformed public key") from None
    except UnsupportedAlgorithm:
        raise KeyFileError(f"{p}: an Ed25519 key is required") from None
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFileError(f"{p}: an Ed25519 key is required, not {type(public).__name__}")
    return PublicKey(public, file.owner)


def passphrase_from(
    file: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> bytes | None:
    """Return the passphrase from `file`, else from $TICKETGUARD_PASSPHRASE, else None."""
    if file is not None:
        p = Path(file)
        try:
            # Bounded, and not only regular files: `--passphrase-file <(pass show key)` is a pipe.
            with p.open("rb") as handle:
                data = handle.read(MAX_PASSPHRASE_BYTES + 1)
        except FileNotFoundError:
            raise KeyFileError(f"passphrase file {p}: no such file") from None
        except IsADirectoryError:
            raise KeyFileError(f"passphrase file {p} is a directory") from None
        except OSError as exc:
            raise KeyFileError(f"cannot read passphrase file {p}: {exc.strerror or exc}") from None
        if len(data) > MAX_PASSPHRASE_BYTES:
            raise KeyFileError(
                f"passphrase file {p} is larger than {MAX_PASSPHRASE_BYTES} bytes; not a passphrase"
            )
        # Only the one newline an editor adds is dropped; other whitespace is part of it.
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
        if not data:
            raise KeyFileError(f"the passphrase in {p} is empty")
        return data
    env = os.environ if environ is None else environ
    value = env.get(PASSPHRASE_ENV)
    if value is None:
        return None
    if not value:
        raise KeyFileError(f"{PASSPHRASE_ENV} is set but empty")
    # surrogateescape gives back the exact bytes of a variable that is not valid UTF-8.
    return value.encode("utf-8", "surrogateescape")
