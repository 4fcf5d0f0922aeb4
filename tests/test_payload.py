"""Tests for the W2 payload bits: Reed–Solomon coding, keyed streams and whitening."""

from __future__ import annotations

import hashlib
import hmac
import math
import struct

import numpy as np
import pytest

from ticketguard.errors import ConfigError, EmbeddingError
from ticketguard.signatures.payload import (
    EccParams,
    codeword_bits,
    decode_bits,
    decode_soft,
    embedded_bits,
    keyed_bytes,
    keyed_generator,
    recover_payload,
    whiten,
    whitening_bits,
)

ZERO_SEED = b"\x00" * 32
ECC = EccParams()
N_BITS = 8 * (64 + ECC.nsym)


def random_payload(rng: np.random.Generator, size: int = 64) -> bytes:
    """Return `size` random bytes standing in for an Ed25519 signature."""
    return rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()


def corrupt_bytes(bits: np.ndarray, byte_positions: np.ndarray, rng: np.random.Generator) -> None:
    """Change every listed byte of `bits` in place to a different value."""
    view = bits.reshape(-1, 8)
    for pos in byte_positions:
        flip = np.unpackbits(np.array([rng.integers(1, 256)], dtype=np.uint8))
        view[pos] ^= flip


# --- independent reference for keyed_bytes: RFC 5869 HKDF and RFC 8439 ChaCha20 by hand -----------


def _reference_hkdf(ikm: bytes, info: bytes) -> bytes:
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _reference_chacha20(key: bytes, n: int) -> bytes:
    mask = 0xFFFFFFFF

    def rotl(v: int, c: int) -> int:
        return ((v << c) & mask) | (v >> (32 - c))

    def quarter(x: list[int], a: int, b: int, c: int, d: int) -> None:
        x[a] = (x[a] + x[b]) & mask
        x[d] = rotl(x[d] ^ x[a], 16)
        x[c] = (x[c] + x[d]) & mask
        x[b] = rotl(x[b] ^ x[c], 12)
        x[a] = (x[a] + x[b]) & mask
        x[d] = rotl(x[d] ^ x[a], 8)
        x[c] = (x[c] + x[d]) & mask
        x[b] = rotl(x[b] ^ x[c], 7)

    out = b""
    for counter in range((n + 63) // 64):
        state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
        state += list(struct.unpack("<8I", key)) + [counter, 0, 0, 0]
        x = state.copy()
        for _ in range(10):
            quarter(x, 0, 4, 8, 12)
            quarter(x, 1, 5, 9, 13)
            quarter(x, 2, 6, 10, 14)
            quarter(x, 3, 7, 11, 15)
            quarter(x, 0, 5, 10, 15)
            quarter(x, 1, 6, 11, 12)
            quarter(x, 2, 7, 8, 13)
            quarter(x, 3, 4, 9, 14)
        out += struct.pack("<16I", *((a + b) & mask for a, b in zip(x, state, strict=True)))
    return out[:n]


# --- EccParams ----------------------------------------------------------------------------------


def test_ecc_params_round_trip_through_dict() -> None:
    assert ECC.nsym == 64
    assert ECC.to_dict() == {"code": "reed-solomon", "field": "GF(2^8)", "nsym": 64}
    for nsym in [2, 17, 64, 191]:
        params = EccParams(nsym)
        assert EccParams.from_dict(params.to_dict()) == params


@pytest.mark.parametrize("nsym", [0, 1, 255, 1000, -4, 64.0, True, "64"])
def test_ecc_params_reject_bad_nsym(nsym: object) -> None:
    with pytest.raises(ConfigError):
        EccParams(nsym)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        None,
        "reed-solomon",
        [("code", "reed-solomon")],
        {},
        {"code": "reed-solomon", "field": "GF(2^8)"},
        {"code": "reed-solomon", "field": "GF(2^8)", "nsym": 64, "extra": 1},
        {"code": "bch", "field": "GF(2^8)", "nsym": 64},
        {"code": "reed-solomon", "field": "GF(2^16)", "nsym": 64},
        {"code": "reed-solomon", "field": "GF(2^8)", "nsym": "64"},
        {"code": "reed-solomon", "field": "GF(2^8)", "nsym": 64.0},
        {"code": "reed-solomon", "field": "GF(2^8)", "nsym": True},
        {"code": "reed-solomon", "field": "GF(2^8)", "nsym": 10**9},
        {"code": "reed-solomon", "field": "GF(2^8)", "nsym": None},
        {"code": ["reed-solomon"], "field": "GF(2^8)", "nsym": 64},
    ],
)
def test_ecc_params_from_dict_rejects_garbage(data: object) -> None:
    with pytest.raises(ConfigError) as info:
        EccParams.from_dict(data)
    assert "\n" not in str(info.value)


# --- codeword_bits / decode_bits ----------------------------------------------------------------


def test_codeword_bits_shape_and_msb_first_systematic_layout() -> None:
    payload = bytes([0x80, 0x01]) + bytes(range(62))
    bits = codeword_bits(payload, ECC)
    assert bits.dtype == np.uint8 and bits.shape == (N_BITS,)
    assert set(np.unique(bits).tolist()) <= {0, 1}
    assert bits[:16].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert np.packbits(bits[: 8 * 64]).tobytes() == payload
    # The parity is not trivial: a zero payload has zero parity, this one does not.
    assert bits[8 * 64 :].any()
    assert not codeword_bits(bytes(64), ECC).any()


@pytest.mark.parametrize(("nsym", "size"), [(64, 64), (2, 1), (32, 64), (191, 64), (10, 245)])
def test_round_trip(nsym: int, size: int) -> None:
    rng = np.random.default_rng(nsym * 1000 + size)
    ecc = EccParams(nsym)
    for _ in range(5):
        payload = random_payload(rng, size)
        bits = codeword_bits(payload, ecc)
        assert bits.size == 8 * (size + nsym)
        assert decode_bits(bits, ecc, payload_len=size) == payload


@pytest.mark.parametrize("nsym", [16, 64])
def test_corrects_up_to_half_nsym_byte_errors(nsym: int) -> None:
    rng = np.random.default_rng(nsym)
    ecc = EccParams(nsym)
    n_bytes = 64 + nsym
    for trial in range(20):
        payload = random_payload(rng)
        bits = codeword_bits(payload, ecc)
        t = nsym // 2 if trial % 2 == 0 else int(rng.integers(1, nsym // 2 + 1))
        corrupt_bytes(bits, rng.choice(n_bytes, size=t, replace=False), rng)
        assert decode_bits(bits, ecc) == payload


def test_corrects_up_to_nsym_erasures_with_garbage_bits() -> None:
    rng = np.random.default_rng(1)
    for trial in range(20):
        payload = random_payload(rng)
        bits = codeword_bits(payload, ECC)
        erased_bytes = rng.choice(64 + ECC.nsym, size=ECC.nsym, replace=False)
        erasures = np.zeros(N_BITS, dtype=bool)
        for pos in erased_bytes:
            # One unreadable bit is enough to lose the byte; its readable bits may be wrong too.
            erasures[8 * pos + rng.integers(0, 8)] = True
        bits[erasures] = rng.integers(0, 2, size=int(erasures.sum()))
        corrupt_bytes(bits, erased_bytes[: trial % 4], rng)
        assert decode_bits(bits, ECC, erasures=erasures) == payload


def test_corrects_mixed_errors_and_erasures_within_bound() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        payload = random_payload(rng)
        bits = codeword_bits(payload, ECC)
        e = int(rng.integers(0, ECC.nsym + 1))
        t = (ECC.nsym - e) // 2
        chosen = rng.choice(64 + ECC.nsym, size=e + t, replace=False)
        erasures = np.zeros(N_BITS, dtype=bool)
        erasures.reshape(-1, 8)[chosen[:e]] = True
        corrupt_bytes(bits, chosen, rng)
        assert decode_bits(bits, ECC, erasures=erasures) == payload


def test_fails_gracefully_beyond_capacity() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        payload = random_payload(rng)
        too_many_errors = codeword_bits(payload, ECC)
        corrupt_bytes(too_many_errors, rng.choice(128, size=ECC.nsym // 2 + 1, replace=False), rng)
        assert decode_bits(too_many_errors, ECC) is None

        erasures = np.zeros(N_BITS, dtype=bool)
        erasures.reshape(-1, 8)[rng.choice(128, size=ECC.nsym + 1, replace=False), 0] = True
        assert decode_bits(codeword_bits(payload, ECC), ECC, erasures=erasures) is None


def test_random_bits_never_raise_and_never_decode() -> None:
    rng = np.random.default_rng(4)
    for trial in range(100):
        bits = rng.integers(0, 2, size=N_BITS, dtype=np.uint8)
        erasures = rng.random(N_BITS) < (trial % 5) * 0.01
        assert decode_bits(bits, ECC, erasures=erasures) is None


def test_decode_accepts_bool_bits() -> None:
    payload = bytes(range(64))
    assert decode_bits(codeword_bits(payload, ECC).astype(bool), ECC) == payload


@pytest.mark.parametrize(
    ("bits", "erasures"),
    [
        (np.zeros(N_BITS - 8, dtype=np.uint8), None),
        (np.zeros((2, N_BITS // 2), dtype=np.uint8), None),
        (np.full(N_BITS, 2, dtype=np.uint8), None),
        (np.full(N_BITS, 0.5), None),
        (np.zeros(N_BITS, dtype=np.uint8), np.zeros(N_BITS, dtype=np.uint8)),
        (np.zeros(N_BITS, dtype=np.uint8), np.zeros(N_BITS - 1, dtype=bool)),
    ],
)
def test_decode_rejects_malformed_arguments(bits: np.ndarray, erasures: np.ndarray | None) -> None:
    with pytest.raises(EmbeddingError):
        decode_bits(bits, ECC, erasures=erasures)


def test_payload_must_fit_one_block() -> None:
    with pytest.raises(EmbeddingError, match="does not fit"):
        codeword_bits(bytes(192), ECC)
    with pytest.raises(EmbeddingError):
        codeword_bits(b"", ECC)
    with pytest.raises(EmbeddingError):
        codeword_bits("not bytes", ECC)  # type: ignore[arg-type]
    with pytest.raises(EmbeddingError):
        decode_bits(np.zeros(8 * 300, dtype=np.uint8), ECC, payload_len=236)
    assert codeword_bits(bytes(191), ECC).size == 8 * 255


# --- keyed streams ------------------------------------------------------------------------------


@pytest.mark.parametrize("purpose", ["W2 whitening", "W2 positions", "B1 triggers"])
@pytest.mark.parametrize("seed", [ZERO_SEED, bytes(range(32)), b"short seed"])
def test_keyed_bytes_matches_hkdf_and_chacha20_by_hand(seed: bytes, purpose: str) -> None:
    key = _reference_hkdf(seed, b"ticketguard/" + purpose.encode() + b"/1")
    assert keyed_bytes(seed, purpose, 200) == _reference_chacha20(key, 200)


def test_keyed_bytes_is_deterministic_prefix_consistent_and_separated() -> None:
    stream = keyed_bytes(ZERO_SEED, "W2 whitening", 1000)
    assert len(stream) == 1000
    assert keyed_bytes(ZERO_SEED, "W2 whitening", 1000) == stream
    assert keyed_bytes(ZERO_SEED, "W2 whitening", 37) == stream[:37]
    assert keyed_bytes(ZERO_SEED, "W2 whitening", 0) == b""
    assert keyed_bytes(ZERO_SEED, "W2 positions", 1000) != stream
    assert keyed_bytes(b"\x00" * 31 + b"\x01", "W2 whitening", 1000) != stream
    assert stream != bytes(1000)


@pytest.mark.parametrize(
    ("seed", "purpose", "n"),
    [
        (b"", "x", 4),
        ("seed", "x", 4),
        (ZERO_SEED, "", 4),
        (ZERO_SEED, b"x", 4),
        (ZERO_SEED, "x", -1),
    ],
)
def test_keyed_bytes_rejects_bad_arguments(seed: object, purpose: object, n: int) -> None:
    with pytest.raises(ConfigError):
        keyed_bytes(seed, purpose, n)  # type: ignore[arg-type]


def test_keyed_generator_is_deterministic_and_keyed() -> None:
    a = keyed_generator(ZERO_SEED, "W2 positions").integers(0, 2**62, size=8)
    b = keyed_generator(ZERO_SEED, "W2 positions").integers(0, 2**62, size=8)
    c = keyed_generator(ZERO_SEED, "W2 layers").integers(0, 2**62, size=8)
    d = keyed_generator(b"\x01" * 32, "W2 positions").integers(0, 2**62, size=8)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist() and a.tolist() != d.tolist()
    key = _reference_hkdf(ZERO_SEED, b"ticketguard/W2 positions/1")
    state = int.from_bytes(_reference_chacha20(key, 32), "big")
    expected = np.random.Generator(np.random.PCG64(state)).integers(0, 2**62, size=8)
    assert a.tolist() == expected.tolist()


# --- whitening ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [ZERO_SEED, b"\xff" * 32, b"owner seed 7"])
def test_whitening_is_balanced(seed: bytes) -> None:
    bits = embedded_bits(bytes(64), seed, ECC)
    assert bits.shape == (N_BITS,)
    # The code is linear, so a zero payload gives a zero codeword and the bits are the stream.
    assert np.array_equal(bits, whitening_bits(seed, N_BITS))
    assert abs(int(bits.sum()) - N_BITS / 2) <= 4 * math.sqrt(N_BITS) / 2


def test_whitening_differs_between_seeds() -> None:
    a = whitening_bits(ZERO_SEED, 4096)
    b = whitening_bits(b"\x00" * 31 + b"\x01", 4096)
    agree = int(np.count_nonzero(a == b))
    assert abs(agree - 2048) <= 4 * math.sqrt(4096) / 2


def test_whitening_bits_lengths() -> None:
    full = whitening_bits(ZERO_SEED, 1024)
    for n in [0, 1, 7, 9, 1023]:
        assert np.array_equal(whitening_bits(ZERO_SEED, n), full[:n])
    assert np.array_equal(
        full, np.unpackbits(np.frombuffer(keyed_bytes(ZERO_SEED, "W2 whitening", 128), np.uint8))
    )


def test_whiten_is_its_own_inverse() -> None:
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2, size=777, dtype=np.uint8)
    once = whiten(bits, ZERO_SEED)
    assert not np.array_equal(once, bits)
    assert np.array_equal(whiten(once, ZERO_SEED), bits)


def test_recover_payload_round_trip_and_wrong_seed() -> None:
    rng = np.random.default_rng(6)
    payload = random_payload(rng)
    bits = embedded_bits(payload, ZERO_SEED, ECC)
    assert recover_payload(bits, ZERO_SEED, ECC) == payload
    assert recover_payload(bits, b"\x01" * 32, ECC) is None

    noisy = bits.copy()
    flip = rng.choice(N_BITS, size=20, replace=False)
    noisy[flip] ^= 1
    assert recover_payload(noisy, ZERO_SEED, ECC) == payload

    erasures = np.zeros(N_BITS, dtype=bool)
    erasures[rng.choice(N_BITS, size=40, replace=False)] = True
    unread = np.where(erasures, 0, bits).astype(np.uint8)
    assert recover_payload(unread, ZERO_SEED, ECC, erasures=erasures) == payload


def test_decoder_output_beyond_the_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import ticketguard.signatures.payload as payload_module

    real = payload_module._codec(ECC.nsym)
    other = bytes(range(64))

    class MiscorrectingCodec:
        """A decoder that 'corrects' any word to the codeword of `other`."""

        def encode(self, data: bytes) -> bytearray:
            return real.encode(data)

        def decode(self, data: bytearray, erase_pos: list[int]) -> tuple:
            return bytearray(other), real.encode(other), []

    monkeypatch.setattr(payload_module, "_codec", lambda nsym: MiscorrectingCodec())
    near_other = codeword_bits(other, ECC)
    corrupt_bytes(near_other, np.arange(ECC.nsym // 2), np.random.default_rng(7))
    assert decode_bits(near_other, ECC) == other
    corrupt_bytes(near_other, np.arange(ECC.nsym // 2, ECC.nsym // 2 + 1), np.random.default_rng(8))
    assert decode_bits(near_other, ECC) is None


# --- keyed sampling (W2 positions) ---------------------------------------------------------------


def _reference_sample(seed: bytes, purpose: str, draws: list[tuple[int, int]]) -> list[list[int]]:
    """The sampler as docs/credential-format.md specifies it, written out plainly."""
    stream = keyed_bytes(seed, purpose, 1 << 16)
    offset = 0
    result = []
    for population, k in draws:
        values = list(range(population))
        for i in range(k):
            m = population - i
            limit = (2**64 // m) * m
            while True:
                u = int.from_bytes(stream[offset : offset + 8], "big")
                offset += 8
                if u < limit:
                    break
            j = i + u % m
            values[i], values[j] = values[j], values[i]
        result.append(values[:k])
    return result


def test_keyed_sample_follows_the_documented_algorithm() -> None:
    from ticketguard.signatures.payload import KeyedStream

    draws = [(2048, 54), (4096, 108), (10, 10), (3, 1), (1, 1)]
    for seed in (ZERO_SEED, b"\x07" * 32):
        stream = KeyedStream(seed, "W2 positions")
        got = [stream.sample(p, k).tolist() for p, k in draws]
        assert got == _reference_sample(seed, "W2 positions", draws)
        for (population, k), values in zip(draws, got, strict=True):
            assert len(set(values)) == k and all(0 <= v < population for v in values)


def test_keyed_sample_known_answer() -> None:
    """Pinned output: a change here changes where every signature already issued was written."""
    from ticketguard.signatures.payload import KeyedStream

    stream = KeyedStream(ZERO_SEED, "W2 positions")
    assert stream.sample(2048, 12).tolist() == [
        858, 18, 705, 703, 1559, 1063, 245, 1426, 1885, 1407, 1222, 1029,
    ]  # fmt: skip
    assert stream.sample(10, 10).tolist() == [8, 0, 6, 1, 5, 4, 7, 3, 2, 9]


def test_keyed_sample_is_uniform_enough_and_handles_huge_populations() -> None:
    from ticketguard.signatures.payload import KeyedStream

    counts = np.zeros(8, dtype=int)
    stream = KeyedStream(ZERO_SEED, "uniformity")
    for _ in range(4000):
        counts[stream.sample(8, 1)[0]] += 1
    # 500 expected per bin, sd ~21: 5 sigma either way.
    assert counts.min() > 395 and counts.max() < 605
    big = KeyedStream(ZERO_SEED, "big").sample(2**60, 1000)
    assert len(np.unique(big)) == 1000
    with pytest.raises(ConfigError):
        KeyedStream(ZERO_SEED, "x").sample(5, 6)
    with pytest.raises(ConfigError):
        KeyedStream(ZERO_SEED, "x").uniform(0)


# --- soft decoding (generalised minimum distance) ------------------------------------------------


def _wrong_bytes_with_reliabilities(wrong: int, seed: int = 0):
    """A codeword with `wrong` bytes changed; those bytes are the least reliable ones."""
    rng = np.random.default_rng(seed)
    payload = random_payload(rng)
    bits = codeword_bits(payload, ECC)
    positions = rng.choice(64 + ECC.nsym, size=wrong, replace=False)
    corrupt_bytes(bits, positions, rng)
    reliability = rng.uniform(1.0, 2.0, size=bits.size)
    reliability.reshape(-1, 8)[positions] = rng.uniform(0.0, 0.5, size=(wrong, 8))
    return payload, bits, reliability


def test_soft_decoding_corrects_errors_beyond_hard_decoding() -> None:
    """40 wrong bytes are past the 32 a hard decode corrects; erasing the 40 least reliable
    bytes (40 <= nsym erasures) recovers the payload."""
    payload, bits, reliability = _wrong_bytes_with_reliabilities(40)
    assert decode_bits(bits, ECC) is None

    def right(found: bytes) -> bool:
        return found == payload

    assert decode_soft(bits, ECC, reliability, accept=right) == payload
    seed = b"\x05" * 32
    read = whiten(bits, seed)
    assert recover_payload(read, seed, ECC, reliability=reliability, accept=right) == payload
    with pytest.raises(EmbeddingError, match="needs a check"):
        recover_payload(read, seed, ECC, reliability=reliability)


def test_soft_decoding_keeps_trying_until_accepted_and_gives_up_cleanly() -> None:
    payload, bits, reliability = _wrong_bytes_with_reliabilities(10)
    seen: list[bytes] = []

    def never(found: bytes) -> bool:
        seen.append(found)
        return False

    assert decode_soft(bits, ECC, reliability, accept=never) is None
    assert seen and all(found == payload for found in seen)
    assert decode_soft(bits, ECC, reliability, accept=lambda found: found == payload) == payload
    # 70 wrong bytes are beyond even nsym = 64 erasures. Erasing 64 of them, the other 64
    # bytes fit *some* codeword: an unchecked decode would return garbage, hence `accept`.
    truth, far, rel = _wrong_bytes_with_reliabilities(70)
    garbage: list[bytes] = []
    assert decode_soft(far, ECC, rel, accept=lambda f: garbage.append(f) or False) is None
    assert garbage and truth not in garbage


def test_soft_decoding_counts_given_erasures_first() -> None:
    payload, bits, reliability = _wrong_bytes_with_reliabilities(20, seed=3)
    erased = np.zeros(bits.size, dtype=bool)
    clean = np.flatnonzero(reliability.reshape(-1, 8).min(axis=1) >= 1.0)
    erased.reshape(-1, 8)[clean[:40], 0] = True  # 40 more erased bytes: 60 in all, still <= 64
    right = payload.__eq__
    assert decode_soft(bits, ECC, reliability, erasures=erased, accept=right) == payload
    erased.reshape(-1, 8)[clean[40:50], 0] = True  # 70 erasures: beyond the code
    assert decode_soft(bits, ECC, reliability, erasures=erased, accept=right) is None


def test_soft_decoding_refuses_mismatched_shapes() -> None:
    bits = codeword_bits(b"\x01" * 64, ECC)
    with pytest.raises(EmbeddingError, match="reliabilities"):
        decode_soft(bits, ECC, np.ones(bits.size - 1), accept=bool)
    with pytest.raises(EmbeddingError, match="erasures must have shape"):
        decode_soft(bits, ECC, np.ones(bits.size), erasures=np.zeros(3, dtype=bool), accept=bool)
