"""The W2 payload bits: Reed–Solomon protected, whitened by a keyed stream, ready for the mask."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import reedsolo
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ticketguard.errors import ConfigError, EmbeddingError

__all__ = [
    "CONSTANT_BITS",
    "EccParams",
    "KeyedStream",
    "codeword_bits",
    "decode_bits",
    "decode_soft",
    "embedded_bits",
    "keyed_bytes",
    "keyed_generator",
    "recover_payload",
    "whiten",
    "whitening_bits",
]

#: Symbols per Reed–Solomon codeword over GF(2^8): payload plus parity never exceed this.
RS_BLOCK = 255
#: Codeword bits (most significant first) that are 0 in every Ed25519 signature: its S half is
#: below the group order L < 2^253 and stored little-endian in payload bytes 32..63, so the top
#: three bits of byte 63 are 0, and the fourth is set only when S >= 2^252 (probability about
#: 2^-125). They carry no evidence: a claimant could choose a seed that reads them right.
CONSTANT_BITS = np.arange(8 * 63, 8 * 63 + 4)

_CODE = "reed-solomon"
_FIELD = "GF(2^8)"
_WHITENING = "W2 whitening"


@dataclass(frozen=True)
class EccParams:
    """Reed–Solomon parameters: `nsym` parity bytes correct nsym//2 errors or nsym erasures."""

    nsym: int = 64

    def __post_init__(self) -> None:
        """Check that the code fits in one GF(2^8) block with room for a payload."""
        if isinstance(self.nsym, bool) or not isinstance(self.nsym, int):
            raise ConfigError(f"ECC nsym must be an integer, got {self.nsym!r}")
        if not 2 <= self.nsym <= RS_BLOCK - 1:
            raise ConfigError(f"ECC nsym must lie in [2, {RS_BLOCK - 1}], got {self.nsym}")

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form recorded in a credential."""
        return {"code": _CODE, "field": _FIELD, "nsym": self.nsym}

    @classmethod
    def from_dict(cls, data: Any) -> EccParams:
        """Read ECC parameters from an untrusted credential, refusing anything malformed."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"ECC parameters must be a mapping, got {type(data).__name__}")
        expected = {"code", "field", "nsym"}
        keys = set(data)
        if keys != expected:
            missing = sorted(map(str, expected - keys))
            extra = sorted(map(str, keys - expected))
            raise ConfigError(f"ECC parameters: missing keys {missing}, unknown keys {extra}")
        if data["code"] != _CODE:
            raise ConfigError(f"ECC code must be {_CODE!r}, got {data['code']!r}")
        if data["field"] != _FIELD:
            raise ConfigError(f"ECC field must be {_FIELD!r}, got {data['field']!r}")
        return cls(nsym=data["nsym"])


@functools.lru_cache(maxsize=16)
def _codec(nsym: int) -> reedsolo.RSCodec:
    """Return the codec for `nsym` with every field parameter pinned, not left to defaults."""
    return reedsolo.RSCodec(nsym, nsize=RS_BLOCK, fcr=0, prim=0x11D, generator=2, c_exp=8)


def _check_lengths(payload_len: int, ecc: EccParams) -> None:
    """Raise EmbeddingError unless a payload of this length fits one codeword."""
    if not isinstance(ecc, EccParams):
        raise EmbeddingError(f"ecc must be EccParams, got {type(ecc).__name__}")
    if isinstance(payload_len, bool) or not isinstance(payload_len, int):
        raise EmbeddingError(f"payload_len must be an integer, got {payload_len!r}")
    if payload_len < 1 or payload_len + ecc.nsym > RS_BLOCK:
        raise EmbeddingError(
            f"a {payload_len}-byte payload with {ecc.nsym} parity bytes does not fit one "
            f"Reed–Solomon block of {RS_BLOCK} bytes"
        )


def _as_bits(bits: Any, name: str) -> np.ndarray:
    """Return a 1-D uint8 0/1 array or raise EmbeddingError."""
    arr = np.asarray(bits)
    if arr.ndim != 1:
        raise EmbeddingError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise EmbeddingError(f"{name} must hold integers 0/1, got dtype {arr.dtype}")
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise EmbeddingError(f"{name} must hold only 0 and 1")
    return arr.astype(np.uint8)


def codeword_bits(payload: bytes, ecc: EccParams) -> np.ndarray:
    """Reed–Solomon encode `payload` and return its bits (MSB first) as a uint8 0/1 array."""
    if not isinstance(payload, bytes | bytearray):
        raise EmbeddingError(f"payload must be bytes, got {type(payload).__name__}")
    _check_lengths(len(payload), ecc)
    codeword = bytes(_codec(ecc.nsym).encode(bytes(payload)))
    return np.unpackbits(np.frombuffer(codeword, dtype=np.uint8))


def decode_bits(
    bits: np.ndarray,
    ecc: EccParams,
    payload_len: int = 64,
    erasures: np.ndarray | None = None,
) -> bytes | None:
    """Decode codeword bits back to the payload; None when they are beyond correction."""
    _check_lengths(payload_len, ecc)
    n_bits = 8 * (payload_len + ecc.nsym)
    arr = _as_bits(bits, "bits")
    if arr.size != n_bits:
        raise EmbeddingError(f"expected {n_bits} codeword bits, got {arr.size}")
    if erasures is None:
        erased_bytes = np.zeros(payload_len + ecc.nsym, dtype=bool)
    else:
        mask = np.asarray(erasures)
        if mask.dtype != np.bool_ or mask.shape != arr.shape:
            raise EmbeddingError(
                f"erasures must be a bool array of shape {arr.shape}, got {mask.dtype} {mask.shape}"
            )
        # An unreadable bit makes its whole byte an erasure: RS works on bytes, not bits.
        erased_bytes = mask.reshape(-1, 8).any(axis=1)
        arr = np.where(mask, 0, arr).astype(np.uint8)
    erase_pos = np.flatnonzero(erased_bytes).tolist()
    if len(erase_pos) > ecc.nsym:
        return None
    received = np.packbits(arr)
    try:
        decoded, _, _ = _codec(ecc.nsym).decode(bytearray(received.tobytes()), erase_pos=erase_pos)
    except reedsolo.ReedSolomonError:
        return None
    payload = bytes(decoded)
    if len(payload) != payload_len:
        return None
    # Accept only bounded-distance decodes, so a result beyond the code's guarantee is refused.
    recoded = np.frombuffer(bytes(_codec(ecc.nsym).encode(payload)), dtype=np.uint8)
    errors = int(np.count_nonzero((recoded != received) & ~erased_bytes))
    if 2 * errors + len(erase_pos) > ecc.nsym:
        return None
    return payload


def keyed_bytes(seed: bytes, purpose: str, n: int) -> bytes:
    """Return `n` pseudo-random bytes from ChaCha20 keyed by HKDF-SHA256(seed, purpose)."""
    if not isinstance(seed, bytes | bytearray) or len(seed) == 0:
        raise ConfigError("the seed must be non-empty bytes")
    if not isinstance(purpose, str) or not purpose:
        raise ConfigError("the purpose must be a non-empty string")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"the number of bytes must be an integer >= 0, got {n!r}")
    return KeyedStream(seed, purpose).read(n)


class KeyedStream:
    """The ChaCha20 keystream keyed by HKDF-SHA256(seed, purpose), read incrementally.

    Everything drawn from it is specified here (not delegated to a library's sampler whose
    algorithm may change between versions), so any implementation reproduces it exactly.
    """

    def __init__(self, seed: bytes, purpose: str):
        if not isinstance(seed, bytes | bytearray) or len(seed) == 0:
            raise ConfigError("the seed must be non-empty bytes")
        if not isinstance(purpose, str) or not purpose:
            raise ConfigError("the purpose must be a non-empty string")
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=None,
            info=b"ticketguard/" + purpose.encode("utf-8") + b"/1",
        ).derive(bytes(seed))
        # An all-zero nonce is safe here because every key serves exactly one purpose.
        self._encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()

    def read(self, n: int) -> bytes:
        """Return the next `n` bytes of the keystream."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"the number of bytes must be an integer >= 0, got {n!r}")
        return self._encryptor.update(b"\x00" * n)

    def uniform(self, m: int) -> int:
        """Return an integer uniform in [0, m).

        Draws 8 bytes as a big-endian integer u, rejects u >= 2^64 - (2^64 mod m) and returns
        u mod m (so there is no modulo bias).
        """
        if isinstance(m, bool) or not isinstance(m, int) or not 0 < m <= 2**64:
            raise ConfigError(f"the range must be an integer in [1, 2^64], got {m!r}")
        limit = (2**64 // m) * m
        while True:
            u = int.from_bytes(self.read(8), "big")
            if u < limit:
                return u % m

    def sample(self, population: int, k: int) -> np.ndarray:
        """Return `k` distinct integers of range(population), in the order drawn.

        The first `k` steps of a Fisher–Yates shuffle of 0..population-1, position i swapped
        with i + uniform(population - i), kept sparse so a huge population costs nothing.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= population:
            raise ConfigError(f"cannot draw {k!r} distinct values from {population!r}")
        moved: dict[int, int] = {}
        out = np.empty(k, dtype=np.int64)
        for i in range(k):
            j = i + self.uniform(population - i)
            out[i] = moved.get(j, j)
            moved[j] = moved.get(i, i)
        return out


def whitening_bits(seed: bytes, n: int) -> np.ndarray:
    """Return `n` keyed uniform bits (uint8 0/1) used to whiten the W2 codeword."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"the number of bits must be an integer >= 0, got {n!r}")
    stream = keyed_bytes(seed, _WHITENING, (n + 7) // 8)
    return np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:n]


def whiten(bits: np.ndarray, seed: bytes) -> np.ndarray:
    """XOR `bits` with the keyed whitening stream; applying it twice gives the bits back."""
    arr = _as_bits(bits, "bits")
    return arr ^ whitening_bits(seed, arr.size)


def keyed_generator(seed: bytes, purpose: str) -> np.random.Generator:
    """Return a numpy generator seeded from the keyed stream, identical on every platform."""
    state = int.from_bytes(keyed_bytes(seed, purpose, 32), "big")
    return np.random.Generator(np.random.PCG64(state))


def embedded_bits(payload: bytes, seed: bytes, ecc: EccParams) -> np.ndarray:
    """Return the whitened codeword bits of `payload`, the bits W2 writes into the mask."""
    return whiten(codeword_bits(payload, ecc), seed)


def recover_payload(
    read_bits: np.ndarray,
    seed: bytes,
    ecc: EccParams,
    payload_len: int = 64,
    erasures: np.ndarray | None = None,
    reliability: np.ndarray | None = None,
    accept: Callable[[bytes], bool] | None = None,
) -> bytes | None:
    """Un-whiten and decode bits read from a suspect; None when they are beyond correction.

    With `reliability` (one number per bit, larger = surer), decoding is generalised minimum
    distance decoding: when the bits do not decode as read, the least reliable bytes are erased
    two at a time (an erasure costs the code half what an error does) until a decode succeeds
    and passes `accept` (e.g. "is a valid signature of the credential's message"), or all
    `nsym` erasures are spent.
    """
    bits = whiten(read_bits, seed)
    if reliability is None:
        found = decode_bits(bits, ecc, payload_len=payload_len, erasures=erasures)
        return found if found is None or accept is None or accept(found) else None
    if accept is None:
        raise EmbeddingError("soft decoding needs a check of what it decodes (accept)")
    return decode_soft(
        bits, ecc, reliability, erasures=erasures, payload_len=payload_len, accept=accept
    )


def decode_soft(
    bits: np.ndarray,
    ecc: EccParams,
    reliability: np.ndarray,
    *,
    accept: Callable[[bytes], bool],
    erasures: np.ndarray | None = None,
    payload_len: int = 64,
) -> bytes | None:
    """Decode codeword bits with their reliabilities (GMD); None when no attempt is accepted.

    `accept` is required: once about `nsym` bytes are erased, the remaining ones fit *some*
    codeword whatever they hold (a Reed–Solomon code is MDS), so a decode means nothing until
    it is checked (an Ed25519 signature of the expected message).
    """
    _check_lengths(payload_len, ecc)
    arr = _as_bits(bits, "bits")
    n_bytes = payload_len + ecc.nsym
    rel = np.asarray(reliability, dtype=np.float64)
    if rel.shape != arr.shape or arr.size != 8 * n_bytes:
        raise EmbeddingError(f"expected {8 * n_bytes} bits and as many reliabilities")
    erased = np.zeros(arr.shape, dtype=bool) if erasures is None else np.asarray(erasures, bool)
    if erased.shape != arr.shape:
        raise EmbeddingError(f"erasures must have shape {arr.shape}, got {erased.shape}")
    byte_erased = erased.reshape(-1, 8).any(axis=1)
    # A byte is as reliable as its least reliable bit.
    byte_rel = np.where(byte_erased, -np.inf, rel.reshape(-1, 8).min(axis=1))
    order = [int(i) for i in np.argsort(byte_rel, kind="stable") if not byte_erased[i]]
    base = int(byte_erased.sum())
    for extra in range(0, max(ecc.nsym - base, 0) + 1, 2):
        bit_mask = np.repeat(byte_erased, 8)
        if extra:
            more = np.zeros(n_bytes, dtype=bool)
            more[order[:extra]] = True
            bit_mask = bit_mask | np.repeat(more, 8)
        found = decode_bits(arr, ecc, payload_len=payload_len, erasures=bit_mask)
        if found is not None and accept(found):
            return found
    return None
