"""Grinding: retry claims against one stolen model until one "verifies" by chance (method §5).

A claimant who holds the suspect chooses its own key, seed, creation time, QR text and trigger
set, so it can make claim after claim and publish only one that matches the suspect by chance.
`grind` is that claimant, made as fast as this toolkit can make it, for one scheme at a time:

- **W2**: one embedding seed (so the positions, and the suspect's reading at them, are fixed and
  read once); each try changes only the claim's creation time, which costs one Ed25519
  signature. The Reed–Solomon parity is a GF(256)-linear map of the 64 payload bytes, applied to
  a batch of signatures with precomputed tables, and the comparison with the reading is a
  popcount over the decided groups.
- **W3**: each QR text is scored against every window of every layer that can hold it at once
  (one convolution per layer); a try is one (text, window) pair. The 32-byte seed that puts the
  window where the claim needs it is ground afterwards (about one try per window position).
- **B1**: each try is a trigger set generated from a fresh seed, queried in large batches.

Every try is judged by `verify.stats.judge`'s rule (`Rule`), and the report gives, besides what
the grind found, the work a grinder needs to reach the threshold: the expected number of tries
1 / P(one try reaches it), exact under the null the p-value is computed against.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy.special import logsumexp

from ticketguard.attacks.ambiguity import ATTACKER, attacker_key, claimed_time
from ticketguard.attacks.base import (
    AMBIGUITY,
    KEPT_METADATA,
    Attack,
    AttackContext,
    AttackError,
    AttackResult,
    Param,
    register,
)
from ticketguard.attacks.removal import kept_mask
from ticketguard.errors import ConfigError, EmbeddingError
from ticketguard.files import canonical_json
from ticketguard.signatures.payload import EccParams, codeword_bits
from ticketguard.signatures.w2 import PAYLOAD_BYTES
from ticketguard.tickets.ticket import Ticket
from ticketguard.verify.stats import (
    STATISTICAL,
    Evidence,
    Verdict,
    binomial_log10_tail,
    format_p,
    format_work,
    judge,
)
from ticketguard.version import __version__

SCHEMES = ("w2", "w3", "b1")
#: The creation time of W2 try 0 when none is given; try i claims this time plus i seconds.
DEFAULT_CREATED = "2020-01-01T00:00:00Z"
#: W3 text t of a grind with seed s is this prefix followed by "s.t" (seeds never share texts).
DEFAULT_QR_PREFIX = "mallory-"
#: W2 tries signed per chunk (a chunk is what a worker process does at a time).
W2_CHUNK = 2048
#: B1 tries (trigger sets) queried per chunk, in one batch.
B1_CHUNK = 50
#: QR texts scored per batch of convolutions.
W3_BATCH = 32
#: Seeds tried per window position when grinding the seed that places a W3 window.
SEED_TRIES_PER_WINDOW = 64
_LOG10_2 = math.log10(2.0)
_LN10 = math.log(10.0)
_SECONDS_PER_YEAR = 365.25 * 24 * 3600


def _grind_bytes(seed: int, *tags: object) -> bytes:
    """Return 32 bytes for one use inside a grind, derived from the attack seed and tags."""
    return hashlib.sha256(canonical_json(["ticketguard/grind", seed, *tags]).encode()).digest()


# --- the rule and the work figure ----------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """The verdict rule a grind aims at: `judge`'s, for a claim judged on `tests` p-values."""

    alpha: float
    security_bits: int
    tests: int = 1

    def verdict(self, log10_p: float) -> Verdict:
        """Judge one p-value as `judge` judges it among `tests` statistical tests."""
        evidences = [Evidence("try", STATISTICAL, "one try", log10_p, null="the try's null")]
        evidences += [
            Evidence(f"other {i}", STATISTICAL, "no match", 0.0, null="the try's null")
            for i in range(1, self.tests)
        ]
        return judge(evidences, self.alpha, self.security_bits)

    def passes(self, log10_p: float) -> bool:
        """Return whether a try with this p-value verifies."""
        return self.verdict(log10_p).verified

    @property
    def threshold_log10(self) -> float:
        return self.verdict(0.0).threshold_log10

    @property
    def text(self) -> str:
        """Return the rule in words, with its threshold."""
        verdict = self.verdict(0.0)
        threshold = format_p(verdict.threshold_log10)
        if self.security_bits:
            return f"p <= 2^-{self.security_bits}/m = {threshold} (m={self.tests})"
        return f"p < alpha/m = {threshold} (alpha = {self.alpha:g}, m={self.tests})"

    def least_count(self, n: int, p: float) -> int | None:
        """Return the least k whose tail P(Binomial(n, p) >= k) verifies; None if none does."""
        return _least_count(self, n, p)

    def reach_log10(self, n: int, p: float) -> float:
        """Return log10 P(one try verifies) when its count is Binomial(n, p) (-inf: never)."""
        k = self.least_count(n, p)
        return -math.inf if k is None else binomial_log10_tail(n, k, p)


@functools.lru_cache(maxsize=4096)
def _least_count(rule: Rule, n: int, p: float) -> int | None:
    if n <= 0 or not rule.passes(binomial_log10_tail(n, n, p)):
        return None
    # The tail falls as k grows, and k = 0 (p = 1) never passes: the least passing k lies in
    # (low, high].
    low, high = 0, n
    while high - low > 1:
        middle = (low + high) // 2
        if rule.passes(binomial_log10_tail(n, middle, p)):
            high = middle
        else:
            low = middle
    return high


def expected_work_log2(
    reach_log10: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray | None = None
) -> float:
    """Return log2 of the expected tries to a verified claim, 1 / mean P(a try verifies).

    `reach_log10` holds, per kind of try, log10 of the chance that it verifies; `weights` how
    many tries of each kind a grind makes (default: one each). inf when no try can verify.
    """
    values = np.asarray(reach_log10, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("the work figure needs at least one try")
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != values.shape or np.any(w < 0) or not np.any(w > 0):
        raise ValueError("weights must be one non-negative number per try, not all zero")
    if np.all(np.isneginf(values[w > 0])):
        return math.inf
    mean_ln = float(logsumexp(values * _LN10, b=w) - math.log(float(w.sum())))
    return max(-mean_ln / math.log(2.0), 0.0)


def log10_sum(*log10_p: float) -> float:
    """Return log10 of a sum of probabilities given as log10 (-inf for none).

    A try judged on several tests verifies when any does; the sum of their chances bounds that.
    """
    values = np.asarray(log10_p, dtype=np.float64)
    if values.size == 0 or np.all(np.isneginf(values)):
        return -math.inf
    return float(logsumexp(values * _LN10) / _LN10)


def work_text(work_log2: float) -> str:
    """Format the work to reach the threshold for people ('2^128 tries', or 'unreachable')."""
    if math.isinf(work_log2):
        return "unreachable (no count of this size reaches the threshold)"
    return format_work(work_log2)


def work_seconds(work_log2: float, rate: float) -> float:
    """Return the seconds `2^work_log2` tries take at `rate` tries per second (inf if too long)."""
    if rate <= 0 or math.isinf(work_log2):
        return math.inf
    log10_seconds = work_log2 * _LOG10_2 - math.log10(rate)
    return math.inf if log10_seconds > 300 else 10.0**log10_seconds


def format_duration(seconds: float) -> str:
    """Format a duration for people: '42 s', '3.5 min', '7.1 h', '12 days', '7.2e+26 years'."""
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"a duration must be >= 0, got {seconds!r}")
    if math.isinf(seconds):
        return "more than 1e+292 years"
    for unit, size, limit in (
        ("s", 1.0, 120.0),
        ("min", 60.0, 120.0),
        ("h", 3600.0, 48.0),
        ("days", 86400.0, 730.0),
    ):
        if seconds / size < limit:
            value = seconds / size
            return f"{value:.2g} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{seconds / _SECONDS_PER_YEAR:.2g} years"


# --- Reed–Solomon parity as a GF(256)-linear map --------------------------------------------------

#: The field of `payload._codec`: GF(2^8) with the primitive polynomial 0x11d, generator 2.
_PRIMITIVE = 0x11D


@functools.lru_cache(maxsize=1)
def _gf_tables() -> tuple[np.ndarray, np.ndarray]:
    """Return the antilog table (510 entries, exp[i] = 2^i) and the log table of GF(2^8)."""
    exp = np.zeros(510, dtype=np.int64)
    log = np.zeros(256, dtype=np.int64)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= _PRIMITIVE
    exp[255:] = exp[:255]
    return exp, log


def gf_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Multiply arrays of GF(2^8) elements element-wise (broadcast), with log/antilog tables."""
    exp, log = _gf_tables()
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    product = exp[log[a] + log[b]]
    return np.where((a == 0) | (b == 0), 0, product).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def parity_table(nsym: int) -> np.ndarray:
    """Return T[j, a]: the parity of the payload whose byte j is a (others 0), as uint64 words.

    Reed–Solomon parity is linear over GF(2^8), so a payload's parity is the XOR over j of
    T[j, payload[j]]. The parity bytes of each entry are zero-padded to whole 8-byte words.
    """
    ecc = EccParams(nsym)
    basis = np.empty((PAYLOAD_BYTES, nsym), dtype=np.uint8)
    for j in range(PAYLOAD_BYTES):
        unit = bytearray(PAYLOAD_BYTES)
        unit[j] = 1
        basis[j] = np.packbits(codeword_bits(bytes(unit), ecc))[PAYLOAD_BYTES:]
    words = -(-nsym // 8)
    table = np.zeros((PAYLOAD_BYTES, 256, 8 * words), dtype=np.uint8)
    values = np.arange(256)[None, :, None]
    table[:, :, :nsym] = gf_multiply(values, basis[:, None, :])
    return table.view(np.uint64)


def codewords(payloads: np.ndarray, ecc: EccParams) -> np.ndarray:
    """Return the Reed–Solomon codewords (payload, then parity bytes) of a batch of payloads.

    Row i equals `np.packbits(codeword_bits(bytes(payloads[i]), ecc))`.
    """
    batch = np.ascontiguousarray(payloads, dtype=np.uint8)
    if batch.ndim != 2 or batch.shape[1] != PAYLOAD_BYTES:
        raise EmbeddingError(f"payloads must be rows of {PAYLOAD_BYTES} bytes, got {batch.shape}")
    table = parity_table(ecc.nsym)
    rows = np.arange(PAYLOAD_BYTES)
    parity = np.bitwise_xor.reduce(table[rows, batch], axis=1)
    return np.concatenate([batch, parity.view(np.uint8)[:, : ecc.nsym]], axis=1)


# --- running tries in chunks, in order, in this process or in workers ----------------------------


class _Job(Protocol):
    def run(self, start: int, count: int) -> np.ndarray: ...


_WORKER_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _WORKER_JOB
    torch.set_num_threads(1)
    _WORKER_JOB = job


def _run_chunk(start: int, count: int) -> np.ndarray:
    assert _WORKER_JOB is not None
    return _WORKER_JOB.run(start, count)


def _chunks(job: _Job, total: int, size: int, workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first try, per-try results) for consecutive chunks of tries, in try order.

    With several workers the chunks run in spawned processes, a few ahead of the one yielded;
    results are yielded in order whatever finishes first, so they never depend on `workers`.
    """
    starts = range(0, total, size)
    if workers <= 1:
        for start in starts:
            yield start, job.run(start, min(size, total - start))
        return
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(job,),
    )
    ahead: collections.deque[tuple[int, Future[np.ndarray]]] = collections.deque()
    upcoming = iter(starts)
    try:
        for start in itertools.islice(upcoming, 2 * workers):
            ahead.append((start, pool.submit(_run_chunk, start, min(size, total - start))))
        while ahead:
            start, future = ahead.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as exc:
                raise AttackError(f"a grinding worker process died ({exc})") from None
            following = next(upcoming, None)
            if following is not None:
                count = min(size, total - following)
                ahead.append((following, pool.submit(_run_chunk, following, count)))
            yield start, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Progress:
    """What a grind has found so far: tries, verified tries, the best try and why it stopped."""

    tries: int = 0
    verified: int = 0
    best_try: int | None = None
    best_log10_p: float = 0.0
    stopped_by: str = "tries"
    started: float = field(default_factory=time.perf_counter)
    elapsed: float | None = None

    def out_of_time(self, seconds: float) -> bool:
        return seconds > 0 and time.perf_counter() - self.started >= seconds

    def finish(self) -> None:
        """Stop the clock: what follows (making the claim) is not grinding."""
        self.elapsed = time.perf_counter() - self.started

    @property
    def seconds(self) -> float:
        return self.elapsed if self.elapsed is not None else time.perf_counter() - self.started


# --- W2 --------------------------------------------------------------------------------------------


def _iso_time(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass(frozen=True)
class _W2Job:
    """Score W2 tries: sign each creation time, encode, compare with the fixed reading."""

    private: bytes
    prefix: bytes
    suffix: bytes
    base: int
    nsym: int
    target: np.ndarray
    decided: np.ndarray

    def message(self, index: int) -> bytes:
        return self.prefix + _iso_time(self.base + index).encode("ascii") + self.suffix

    def run(self, start: int, count: int) -> np.ndarray:
        """Return the matched decided groups of tries start .. start + count - 1."""
        sign = Ed25519PrivateKey.from_private_bytes(self.private).sign
        signatures = b"".join([sign(self.message(i)) for i in range(start, start + count)])
        payloads = np.frombuffer(signatures, dtype=np.uint8).reshape(count, PAYLOAD_BYTES)
        words = codewords(payloads, EccParams(self.nsym))
        wrong = np.bitwise_count((words ^ self.target) & self.decided).sum(axis=1)
        return int(np.bitwise_count(self.decided).sum()) - wrong.astype(np.int64)


def _message_parts(owner: str, fingerprint: str) -> tuple[bytes, bytes]:
    """Return the payload message before and after its creation time (the only part that varies)."""
    from ticketguard.signatures.credential import payload_message

    marker = "\ue000"
    message = payload_message(
        owner=owner, created=marker, fingerprint=fingerprint, toolkit_version=__version__
    )
    parts = message.split(marker.encode("utf-8"))
    if len(parts) != 2:
        raise AttackError("the payload message does not hold its creation time exactly once")
    return parts[0], parts[1]


@dataclass(frozen=True)
class _Setting:
    """What every scheme's grind shares: the stolen ticket as claimed, the key, the budget."""

    ticket: Ticket
    claimed: Ticket
    p: dict[str, Any]
    seed: int
    context: AttackContext
    rule: Rule


def _claim_ticket(ticket: Ticket) -> Ticket:
    """Return the stolen model as the attacker claims it: kept weights, owner's records gone."""
    meta = {k: ticket.metadata[k] for k in KEPT_METADATA if k in ticket.metadata}
    return Ticket(kept_mask(ticket), ticket.trained, ticket.rewind, meta)


def _w2_plan(ticket: Ticket) -> Any:
    from ticketguard.signatures.signing import excluded_layers
    from ticketguard.signatures.w2 import eligible_layers, plan_embedding

    mask = kept_mask(ticket)
    return plan_embedding(mask, eligible_layers(mask, excluded_layers(ticket), None), EccParams())


def _w2_strengths(ticket: Ticket, params: Any) -> Any:
    """Return the model's layers ready to read, exactly as `verify` reads a model file."""
    from ticketguard.signatures.w2 import layer_strengths, observed_magnitudes

    magnitudes = observed_magnitudes(ticket.trained, ticket.mask, params.layer_names)
    return layer_strengths(magnitudes, params)


@dataclass(frozen=True)
class _W2Seed:
    """A candidate embedding seed and what a try at it can reach."""

    seed: bytes
    reading: Any
    target: np.ndarray
    #: The groups verification counts (decided, not a codeword bit every signature shares).
    counted: np.ndarray
    #: log10 P(a try verifies) at this seed: Binomial(n, 1/2) with n its counted groups.
    reach_log10: float

    @property
    def decided(self) -> int:
        return int(self.counted.sum())


def _w2_candidate(s: _Setting, params: Any, strengths: Any, seed: bytes) -> _W2Seed:
    from ticketguard.signatures.payload import whitening_bits
    from ticketguard.signatures.w2 import keyed_positions, read_groups

    reading = read_groups(strengths, params, keyed_positions(seed, params))
    target = reading.bits ^ whitening_bits(seed, params.num_bits)
    counted = reading.counted
    return _W2Seed(seed, reading, target, counted, s.rule.reach_log10(int(counted.sum()), 0.5))


def _w2_seed(s: _Setting, params: Any) -> _W2Seed:
    """Return the candidate embedding seed at which a try is most likely to verify.

    A try verifies when its count reaches the least passing k of Binomial(n, 1/2), n being the
    groups the seed's positions decide (the codeword bits every Ed25519 signature shares,
    `payload.CONSTANT_BITS`, are not counted: they would match in every try at a well-chosen
    seed). The chance varies a little from seed to seed, because the binomial is discrete; the
    grinder reads the model at `seeds` candidate seeds and keeps the best.
    """
    strengths = _w2_strengths(s.ticket, params)
    best: _W2Seed | None = None
    for index in range(s.p["seeds"]):
        candidate = _w2_candidate(s, params, strengths, _grind_bytes(s.seed, "w2 seed", index))
        if best is None or candidate.reach_log10 > best.reach_log10:
            best = candidate
    assert best is not None
    return best


def _grind_w2(s: _Setting) -> tuple[dict[str, Any], Any, _Progress]:
    p = s.p
    params = _w2_plan(s.ticket)
    chosen = _w2_seed(s, params)
    embed_seed, reading, target, n = chosen.seed, chosen.reading, chosen.target, chosen.decided
    decided = chosen.counted
    key = attacker_key(p["owner"], "", s.seed)
    fingerprint = s.claimed.fingerprint
    prefix, suffix = _message_parts(key.owner, fingerprint)
    base = int(datetime.fromisoformat(p["base"].replace("Z", "+00:00")).timestamp())
    job = _W2Job(
        key.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        ),
        prefix,
        suffix,
        base,
        params.ecc.nsym,
        np.packbits(target),
        np.packbits(decided),
    )
    tails = np.array([binomial_log10_tail(n, k, 0.5) for k in range(n + 1)])
    needed = s.rule.least_count(n, 0.5)
    progress = _Progress()
    best_k = -1
    with contextlib.closing(_chunks(job, p["tries"], W2_CHUNK, p["workers"])) as chunks:
        for start, matched in chunks:
            hits = matched >= needed if needed is not None else np.zeros(len(matched), bool)
            if p["stop"] and hits.any():
                first = int(np.argmax(hits))
                progress.tries, progress.verified = start + first + 1, progress.verified + 1
                best_k, progress.best_try = int(matched[first]), start + first
                progress.stopped_by = "verified"
                break
            progress.tries = start + len(matched)
            progress.verified += int(hits.sum())
            top = int(np.argmax(matched))
            if matched[top] > best_k:
                best_k, progress.best_try = int(matched[top]), start + top
            if progress.out_of_time(p["seconds"]):
                progress.stopped_by = "seconds"
                break
    progress.finish()
    progress.best_log10_p = float(tails[best_k]) if n else 0.0
    best_created = _iso_time(base + (progress.best_try or 0))
    details: dict[str, Any] = {
        "decided": n,
        "bits": params.num_bits,
        "repetition": params.repetition,
        "needed": needed,
        "seeds_read": p["seeds"],
        "best": {
            "try": progress.best_try,
            "created": best_created,
            "matched": best_k,
            "statistic": f"{best_k}/{n} read bits match",
        },
        "work_log2": expected_work_log2([chosen.reach_log10]),
    }
    claim = None
    if needed is not None and best_k >= needed:
        claim = _write_claim_w2(s, key, params, embed_seed, best_created, reading, best_k)
    return details, claim, progress


def _sign_result(
    s: _Setting,
    key: Any,
    created: str,
    embedding: dict[str, Any],
    seed: bytes,
    params: Any,
    *,
    triggers: Any = None,
    trigger_record: dict[str, Any] | None = None,
) -> Any:
    """Issue the attacker's credential for the stolen model as it is and package the claim."""
    from ticketguard.files import sha256_hex
    from ticketguard.signatures.credential import credential_bytes, make_credential
    from ticketguard.signatures.signing import SignResult

    claimed = s.claimed
    credential = make_credential(
        key,
        created=created,
        fingerprint_before=claimed.fingerprint,
        fingerprint_after=claimed.fingerprint,
        architecture={"name": claimed.architecture, "kwargs": claimed.architecture_kwargs},
        embedding=embedding,
        seed=seed,
        trigger_set=trigger_record,
    )
    meta = dict(claimed.metadata)
    meta["created"] = created
    meta["signature"] = {
        "scheme": embedding["scheme"],
        "owner": key.owner,
        "key_id": key.public_key.key_id(),
        "fingerprint_before": claimed.fingerprint,
        "credential_sha256": sha256_hex(credential_bytes(credential)),
    }
    if trigger_record is not None:
        meta["signature"]["trigger_set"] = trigger_record["commitment"]
    ticket = Ticket(claimed.mask, claimed.trained, claimed.rewind, meta)
    return SignResult(ticket, credential, seed, params, None, None, 0, triggers=triggers)


def _write_claim_w2(
    s: _Setting, key: Any, params: Any, seed: bytes, created: str, reading: Any, matched: int
) -> Any:
    """Make the W2 claim of one try, checking its count as `verify` will compute it."""
    from ticketguard.signatures.credential import payload_of
    from ticketguard.signatures.payload import embedded_bits

    result = _sign_result(s, key, created, params.to_dict(), seed, params)
    expected = embedded_bits(payload_of(result.credential), seed, params.ecc)
    recount, _ = reading.matches(expected)
    if recount != matched:
        raise AttackError(f"the grinder counted {matched} matches, verification counts {recount}")
    return result


# --- W3 --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """A layer a QR window may go into: its connectivity (float) and its weight counts."""

    name: str
    conn: torch.Tensor
    shape: tuple[int, int]
    surviving: int
    room: int


def _qr_layers(ticket: Ticket) -> list[_Layer]:
    from ticketguard.signatures.signing import excluded_layers
    from ticketguard.signatures.topology import channel_connectivity
    from ticketguard.signatures.w2 import eligible_layers
    from ticketguard.signatures.w3 import capacity

    mask = kept_mask(ticket)
    layers = []
    for name in eligible_layers(mask, excluded_layers(ticket), None):
        conn = channel_connectivity(mask[name])
        shape = (int(conn.shape[0]), int(conn.shape[1]))
        layers.append(
            _Layer(name, conn.float(), shape, int(mask[name].sum()), capacity(mask[name]))
        )
    return layers


def _windows(shape: tuple[int, int], size: int) -> int:
    return (shape[0] - size + 1) * (shape[1] - size + 1)


def _fitting(layers: Sequence[_Layer], size: int) -> list[_Layer]:
    """Return the layers `plan_qr` accepts for a size x size code."""
    return [
        layer
        for layer in layers
        if layer.shape[0] >= size and layer.shape[1] >= size and layer.room >= size * size
    ]


def _score_texts(symbols: Sequence[Any], layers: Sequence[_Layer]) -> np.ndarray:
    """Return, per symbol (all of one size), its data-module agreement with every window.

    Agreement = connected light modules + unconnected dark ones = conv(A, light - dark) + dark
    count, one convolution per layer for the whole batch; windows are flattened layer by layer,
    row by row.
    """
    data = np.stack([~s.function for s in symbols])
    dark = np.stack([s.dark for s in symbols]) & data
    light = data & ~dark
    kernel = torch.from_numpy((light.astype(np.float32) - dark.astype(np.float32))[:, None])
    offset = torch.from_numpy(dark.sum(axis=(1, 2)).astype(np.float32))[:, None]
    scores = []
    for layer in layers:
        out = torch.nn.functional.conv2d(layer.conn[None, None], kernel)[0]
        scores.append((out.reshape(len(symbols), -1) + offset).round().to(torch.int64))
    return torch.cat(scores, dim=1).numpy()


def _grind_w3(s: _Setting) -> tuple[dict[str, Any], Any, _Progress]:
    from ticketguard.signatures.w3 import make_symbol

    p = s.p
    layers = _qr_layers(s.ticket)
    progress = _Progress()
    best: dict[str, Any] = {}
    reach, weights = [], []
    texts = 0
    scanned: dict[int, int] = {}
    done = False
    for first in itertools.count(0, W3_BATCH):
        if done or progress.tries >= p["tries"]:
            break
        symbols = [make_symbol(_qr_text(p, s.seed, t)) for t in range(first, first + W3_BATCH)]
        by_size: dict[int, list[int]] = collections.defaultdict(list)
        for i, symbol in enumerate(symbols):
            by_size[symbol.size].append(i)
        scored: dict[int, tuple[np.ndarray, list[_Layer]]] = {}
        for size, members in by_size.items():
            fit = _fitting(layers, size)
            if not fit:
                raise AttackError(
                    f"no layer of the model can hold the {size}x{size} QR code of "
                    f"{symbols[members[0]].text!r}; use a shorter qr_text"
                )
            rows = _score_texts([symbols[i] for i in members], fit)
            for i, row in zip(members, rows, strict=True):
                scored[i] = (row, fit)
        for i, symbol in enumerate(symbols):
            row, fit = scored[i]
            left = p["tries"] - progress.tries
            if left <= 0:
                break
            row = row[:left]
            data = ~symbol.function
            n = int(data.sum())
            light = int((data & ~symbol.dark).sum())
            chance = max(light / n, 1.0 - light / n)
            needed = s.rule.least_count(n, chance)
            reach.append(s.rule.reach_log10(n, chance))
            weights.append(len(row))
            scanned[symbol.size] = sum(_windows(layer.shape, symbol.size) for layer in fit)
            texts += 1
            hits = row >= needed if needed is not None else np.zeros(len(row), bool)
            top = int(np.argmax(hits)) if p["stop"] and hits.any() else int(np.argmax(row))
            log10_p = binomial_log10_tail(n, int(row[top]), chance)
            if log10_p < progress.best_log10_p or not best:
                progress.best_log10_p, progress.best_try = log10_p, progress.tries + top
                best = {
                    "symbol": symbol,
                    "text": symbol.text,
                    "agree": int(row[top]),
                    "modules": n,
                    "chance": chance,
                    "window": _locate(top, fit, symbol.size),
                }
            if p["stop"] and hits.any():
                progress.tries += top + 1
                progress.verified += 1
                progress.stopped_by = "verified"
                done = True
                break
            progress.tries += len(row)
            progress.verified += int(hits.sum())
        if not done and progress.out_of_time(p["seconds"]):
            progress.stopped_by = "seconds"
            break
    progress.finish()
    layer_name, row_at, col_at = best["window"]
    details: dict[str, Any] = {
        "texts": texts,
        "windows_per_text": scanned,
        "layers": [layer.name for layer in layers],
        "best": {
            "try": progress.best_try,
            "text": best["text"],
            "layer": layer_name,
            "window": {"row": row_at, "col": col_at, "size": best["symbol"].size},
            "matched": best["agree"],
            "chance": best["chance"],
            "statistic": f"{best['agree']}/{best['modules']} data modules agree",
        },
        "work_log2": expected_work_log2(reach, weights),
    }
    claim = None
    if s.rule.passes(progress.best_log10_p):
        claim, seed_tries = _write_claim_w3(s, layers, best)
        details["seed_tries"] = seed_tries
    return details, claim, progress


def _locate(index: int, layers: Sequence[_Layer], size: int) -> tuple[str, int, int]:
    """Return (layer, row, col) of a window by its index in `_score_texts`' flat order."""
    for layer in layers:
        count = _windows(layer.shape, size)
        if index < count:
            cols = layer.shape[1] - size + 1
            return layer.name, index // cols, index % cols
        index -= count
    raise AttackError(f"window {index} lies beyond the layers scored (a bug)")


def _window_seed(
    seed: int, shape: tuple[int, int], size: int, at: tuple[int, int]
) -> tuple[bytes, int]:
    """Grind a 32-byte seed whose keyed window is `at` (row, col); return it and the tries."""
    from ticketguard.signatures.w3 import keyed_window

    limit = SEED_TRIES_PER_WINDOW * _windows(shape, size)
    for j in range(limit):
        candidate = _grind_bytes(seed, "w3 seed", list(at), j)
        if keyed_window(candidate, shape, size) == at:
            return candidate, j + 1
    raise AttackError(f"no seed placed the window at {at} in {limit} tries")


def _write_claim_w3(s: _Setting, layers: Sequence[_Layer], best: dict[str, Any]) -> tuple[Any, int]:
    """Make the W3 claim of the best (text, window), checking it as `verify` will read it."""
    from ticketguard.signatures.w2 import EmbeddingLayer
    from ticketguard.signatures.w3 import W3Params, read_qr

    name, row, col = best["window"]
    layer = next(item for item in layers if item.name == name)
    symbol = best["symbol"]
    seed, tries = _window_seed(s.seed, layer.shape, symbol.size, (row, col))
    params = W3Params(
        EmbeddingLayer(name, layer.shape, symbol.size**2, layer.surviving), row, col, symbol
    )
    reading = read_qr(s.claimed.mask, params)
    if reading is None or reading.modules - reading.mismatches != best["agree"]:
        raise AttackError("the grinder's QR agreement differs from verification's (a bug)")
    key = attacker_key(s.p["owner"], "", s.seed)
    return _sign_result(s, key, s.p["base"], params.to_dict(), seed, params), tries


# --- B1 --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _B1Job:
    """Score B1 tries: generate each try's trigger set and query the model in one batch."""

    ticket: Ticket
    seed: int
    size: int
    shape: tuple[int, int, int]
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        device = torch.device(self.device)
        return self.ticket.build_model().to(device, memory_format=torch.channels_last).eval()

    def triggers(self, index: int) -> Any:
        from ticketguard.signatures.triggers import generate_triggers

        seed = _grind_bytes(self.seed, "b1 seed", index)
        return generate_triggers(seed, self.size, self.shape, self.classes), seed

    def run(self, start: int, count: int) -> np.ndarray:
        """Return (hits, count of the most frequent label) per try."""
        from ticketguard.tickets.training import logits_of

        sets = [self.triggers(i)[0] for i in range(start, start + count)]
        inputs = torch.cat([t.inputs(self.mean, self.std) for t in sets])
        if inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            output = logits_of(self.model(inputs.to(torch.device(self.device))))
        answers = output.argmax(dim=1).cpu().split(self.size)
        result = np.empty((count, 2), dtype=np.int64)
        for i, (triggers, answer) in enumerate(zip(sets, answers, strict=True)):
            result[i, 0] = int((answer == triggers.labels).sum())
            result[i, 1] = int(torch.bincount(triggers.labels, minlength=self.classes).max())
        return result


def _grind_b1(s: _Setting) -> tuple[dict[str, Any], Any, _Progress]:
    from ticketguard.signatures.signing import input_normalization, input_shape_of

    p, ticket = s.p, s.ticket
    if ticket.num_classes is None:
        raise AttackError("the model records no number of classes; B1 cannot be ground")
    mean, std = input_normalization(ticket, s.context.dataset)
    job = _B1Job(
        _claim_ticket(ticket),
        s.seed,
        p["trigger_size"],
        input_shape_of(ticket, s.context.dataset),
        int(ticket.num_classes),
        tuple(mean),
        tuple(std),
        "cpu" if p["workers"] > 1 else str(s.context.device),
    )
    size = p["trigger_size"]
    progress = _Progress()
    reach: dict[int, float] = {}
    kinds: collections.Counter[int] = collections.Counter()
    best = (-1, 0)
    with contextlib.closing(_chunks(job, p["tries"], B1_CHUNK, p["workers"])) as chunks:
        for start, counts in chunks:
            stop_at = None
            for i, (hits, top) in enumerate(counts.tolist()):
                log10_p = binomial_log10_tail(size, hits, top / size)
                if top not in reach:
                    reach[top] = s.rule.reach_log10(size, top / size)
                kinds[top] += 1
                if log10_p < progress.best_log10_p or progress.best_try is None:
                    progress.best_log10_p, progress.best_try, best = log10_p, start + i, (hits, top)
                if s.rule.passes(log10_p):
                    progress.verified += 1
                    if p["stop"]:
                        stop_at = i
                        break
            if stop_at is not None:
                progress.tries, progress.stopped_by = start + stop_at + 1, "verified"
                break
            progress.tries = start + len(counts)
            if progress.out_of_time(p["seconds"]):
                progress.stopped_by = "seconds"
                break
    progress.finish()
    tops = sorted(kinds)
    details: dict[str, Any] = {
        "trigger_size": size,
        "null_hit_rates": {f"{top / size:.2f}": kinds[top] for top in tops},
        "best": {
            "try": progress.best_try,
            "matched": best[0],
            "null_hit_rate": best[1] / size,
            "statistic": f"{best[0]}/{size} trigger labels match",
        },
        "work_log2": expected_work_log2([reach[t] for t in tops], [kinds[t] for t in tops]),
    }
    claim = None
    if s.rule.passes(progress.best_log10_p):
        claim = _write_claim_b1(s, job, progress.best_try or 0, best)
    return details, claim, progress


def _write_claim_b1(s: _Setting, job: _B1Job, index: int, best: tuple[int, int]) -> Any:
    """Make the B1 claim of one try: its seed's W2 layout and its committed trigger set."""
    triggers, seed = job.triggers(index)
    hits = int(job.run(index, 1)[0, 0])
    if hits != best[0]:
        raise AttackError(f"try {index} hits {hits} triggers on a second query, not {best[0]}")
    params = _w2_plan(s.ticket)
    record = {
        "scheme": "B1",
        "source": triggers.source,
        "size": triggers.size,
        "input_shape": list(triggers.input_shape),
        "num_classes": job.classes,
        "normalization": {"mean": list(job.mean), "std": list(job.std)},
        "commitment": triggers.commitment(),
        "accuracy": hits / triggers.size,
    }
    key = attacker_key(s.p["owner"], "", s.seed)
    return _sign_result(
        s,
        key,
        s.p["base"],
        params.to_dict(),
        seed,
        params,
        triggers=triggers,
        trigger_record=record,
    )


# --- the attack -------------------------------------------------------------------------------------


def _qr_text(p: dict[str, Any], seed: int, index: int) -> str:
    return f"{p['qr_text']}{seed}.{index}"


def _check(p: dict[str, Any], seed: int) -> dict[str, Any]:
    """Return the parameters with the claim's texts checked and the base time normalised."""
    from ticketguard.signatures.keys import validate_owner

    checked = dict(p)
    try:
        validate_owner(p["owner"])
    except ConfigError as exc:
        raise AttackError(f"attack parameter 'owner': {exc}") from None
    checked["base"] = claimed_time(p["created"]) or DEFAULT_CREATED
    if p["scheme"] == "w3":
        from ticketguard.signatures.w3 import make_symbol

        if not p["qr_text"]:
            raise AttackError("attack parameter 'qr_text' must not be empty for the w3 scheme")
        try:
            make_symbol(_qr_text(p, seed, 0))
        except EmbeddingError as exc:
            raise AttackError(f"attack parameter 'qr_text': {exc}") from None
    return checked


def _summary(
    scheme: str, rule: Rule, details: dict[str, Any], progress: _Progress, claim: Any
) -> list[str]:
    best = details["best"]
    rate = details["tries_per_second"]
    unit = "(text, window) tries" if scheme == "w3" else "tries"
    stopped = {
        "verified": "stopped at the first claim that verifies",
        "tries": "all tries made",
        "seconds": "time budget spent",
    }[progress.stopped_by]
    lines = [
        f"grind {scheme.upper()} against {rule.text}",
        f"{progress.tries:,} {unit} in {details['seconds']:.1f} s ({rate:,.0f} tries/s); {stopped}",
        f"best claim: {best['statistic']}, p = {format_p(progress.best_log10_p)} "
        f"(a forger reaches it in about {format_work(-progress.best_log10_p / _LOG10_2)})",
        f"verified: {progress.verified:,} of {progress.tries:,} tries",
        f"work to reach the threshold: {details['work']}, about {details['work_time']} at this rate",
    ]
    if claim is not None:
        doc = claim.credential
        lines.append(
            f"claim: {doc['owner']}, key {claim.ticket.metadata['signature']['key_id']}, "
            f"created {doc['created']}; it verifies under the rule"
        )
    return lines


def grind(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Retry claims against the model until one verifies by chance, and measure what it costs."""
    p = _check(p, seed)
    rule = Rule(p["alpha"], p["security_bits"], 2 if p["scheme"] == "b1" else 1)
    setting = _Setting(ticket, _claim_ticket(ticket), p, seed, context, rule)
    grinder = {"w2": _grind_w2, "w3": _grind_w3, "b1": _grind_b1}[p["scheme"]]
    try:
        details, claim, progress = grinder(setting)
    except AttackError:
        raise
    except (EmbeddingError, ConfigError) as exc:
        raise AttackError(f"cannot grind {p['scheme'].upper()} on this model: {exc}") from None
    seconds = progress.seconds
    rate = progress.tries / seconds if seconds > 0 else math.inf
    work = details["work_log2"]
    best = details["best"]
    best.update(
        {
            "log10_p": progress.best_log10_p,
            "p": format_p(progress.best_log10_p),
            "work_log2": -progress.best_log10_p / _LOG10_2 + 0.0,
            "work": format_work(-progress.best_log10_p / _LOG10_2),
            "verifies": rule.passes(progress.best_log10_p),
        }
    )
    details.update(
        {
            "scheme": p["scheme"],
            "rule": rule.text,
            "alpha": p["alpha"],
            "security_bits": p["security_bits"],
            "tests": rule.tests,
            "threshold_log10": rule.threshold_log10,
            "tries": progress.tries,
            "verified": progress.verified,
            "stopped_by": progress.stopped_by,
            "seconds": seconds,
            "tries_per_second": rate,
            "work": work_text(work),
            "work_seconds": work_seconds(work, rate),
            "work_time": format_duration(work_seconds(work, rate)),
            "claim": None
            if claim is None
            else {
                "owner": claim.credential["owner"],
                "key_id": claim.ticket.metadata["signature"]["key_id"],
                "created": claim.credential["created"],
                "seed_commitment": claim.credential["seed_commitment"],
            },
        }
    )
    details["summary"] = _summary(p["scheme"], rule, details, progress, claim)
    return AttackResult(None, details, claim=claim)


register(
    Attack(
        "grind",
        AMBIGUITY,
        "Retry claims (creation times, QR texts, trigger sets) until one verifies by chance.",
        (
            Param("scheme", str, "w2", "The evidence ground.", SCHEMES),
            Param(
                "tries",
                int,
                100_000,
                "Tries at most (W3: text-window pairs).",
                minimum=1,
                maximum=10**10,
            ),
            Param(
                "seconds",
                float,
                0.0,
                "Wall-clock budget in seconds (0: none); the tries made then depend on the "
                "machine, each try does not.",
                minimum=0.0,
            ),
            Param(
                "alpha",
                float,
                1e-6,
                "Significance level of the rule ground against (only with security_bits 0).",
                minimum=1e-300,
                maximum=0.5,
            ),
            Param(
                "security_bits",
                int,
                128,
                "The rule ground against: p <= 2^-bits/m (0: p < alpha/m).",
                minimum=0,
                maximum=4096,
            ),
            Param("stop", bool, True, "Stop at the first claim that verifies."),
            Param(
                "owner", str, ATTACKER, "The attacker's owner id (its key derives from the seed)."
            ),
            Param(
                "created",
                str,
                DEFAULT_CREATED,
                "The claims' creation time, ISO 8601 (W2: try i claims it plus i seconds).",
            ),
            Param(
                "qr_text",
                str,
                DEFAULT_QR_PREFIX,
                "W3: prefix of the QR texts; text t of seed s is PREFIX + 's.t'.",
            ),
            Param(
                "seeds",
                int,
                64,
                "W2: embedding seeds read, to grind at the one where tries verify most often.",
                minimum=1,
                maximum=1_000_000,
            ),
            Param(
                "trigger_size",
                int,
                100,
                "B1: size of each generated trigger set.",
                minimum=1,
                maximum=10_000,
            ),
            Param(
                "workers",
                int,
                1,
                "Processes grinding W2 or B1 (the results do not depend on it).",
                minimum=1,
                maximum=256,
            ),
        ),
        grind,
        strength="tries",
    )
)
