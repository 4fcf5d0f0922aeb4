"""The grinder (`attack grind`): claims retried against one stolen model, and what they cost.

The positive control grinds W2 against the plain alpha rule until a claim verifies by chance and
checks it through `verify`; the negative results grind against the default 128-bit rule, verify
nothing and report the work that rule demands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import error_line, invoke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy.stats import binom

from ticketguard.attacks.base import AttackContext, AttackError, run_attack
from ticketguard.attacks.grinding import (
    Rule,
    codewords,
    expected_work_log2,
    format_duration,
    gf_multiply,
    log10_sum,
    work_text,
)
from ticketguard.errors import EmbeddingError
from ticketguard.signatures.credential import read_credential
from ticketguard.signatures.payload import CONSTANT_BITS, EccParams, codeword_bits
from ticketguard.tickets.ticket import load_ticket
from ticketguard.tickets.training import resolve_device

CPU = AttackContext(device=resolve_device("cpu"))
#: Report fields that depend on the machine's speed, left out when results are compared.
TIMED = {"seconds", "tries_per_second", "work_seconds", "work_time", "summary"}


@pytest.fixture(scope="module")
def owner(small_signed: dict[str, Path]) -> Path:
    """Alice's signed digits ticket (W2, retrained for two epochs on the digits data)."""
    return small_signed["ticket"]


def _untimed(details: dict) -> dict:
    return {k: v for k, v in details.items() if k not in TIMED}


def _claim(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("").name
    return {
        "ticket": out.with_name(f"{stem}.claim.ticket"),
        "cred": out.with_name(f"{stem}.claim.cred.json"),
        "secret": out.with_name(f"{stem}.claim.secret.json"),
    }


def _verify(model: Path, claim: dict[str, Path], *extra: object):
    return invoke(
        ["verify", model, "--credential", claim["cred"], "--reveal", claim["secret"], *extra]
    )


# --- Reed–Solomon parity as a GF(256)-linear map --------------------------------------------------


@pytest.mark.parametrize("nsym", [2, 16, 64])
def test_batched_parity_equals_the_reed_solomon_codec(nsym):
    rng = np.random.default_rng(nsym)
    payloads = rng.integers(0, 256, size=(40, 64), dtype=np.uint8)
    payloads[0], payloads[1] = 0, 255
    ecc = EccParams(nsym)
    want = np.stack([np.packbits(codeword_bits(bytes(row), ecc)) for row in payloads])
    got = codewords(payloads, ecc)
    assert got.shape == (40, 64 + nsym)
    np.testing.assert_array_equal(got, want)


def test_gf_multiply_is_the_codecs_field():
    def slow(a: int, b: int) -> int:
        """Carry-less multiplication reduced by the primitive polynomial 0x11d."""
        product = 0
        while b:
            if b & 1:
                product ^= a
            a <<= 1
            if a & 0x100:
                a ^= 0x11D
            b >>= 1
        return product

    a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    want = np.array([[slow(i, j) for j in range(256)] for i in range(256)], dtype=np.uint8)
    np.testing.assert_array_equal(gf_multiply(a, b), want)


def test_codewords_refuses_rows_that_are_not_payloads():
    with pytest.raises(EmbeddingError, match="rows of 64 bytes"):
        codewords(np.zeros((3, 63), dtype=np.uint8), EccParams())


def test_every_ed25519_signature_leaves_the_constant_bits_zero():
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    signatures = [key.sign(b"message %d" % i) for i in range(2000)]
    bits = np.stack([codeword_bits(s, EccParams()) for s in signatures])
    assert not bits[:, CONSTANT_BITS].any()
    # Every other payload bit varies.
    others = np.setdiff1d(np.arange(512), CONSTANT_BITS)
    assert np.all(np.abs(bits[:, others].mean(axis=0) - 0.5) < 0.1)


# --- the rule and the work figure ---------------------------------------------------------------


def test_least_passing_count_and_work_are_exact_for_a_toy_binomial():
    # Binomial(10, 1/2) tails: P(>= 7) = 176/1024, P(>= 8) = 56/1024, P(>= 9) = 11/1024.
    plain = Rule(0.05, 0)  # p < 0.05
    assert plain.least_count(10, 0.5) == 9
    assert plain.reach_log10(10, 0.5) == pytest.approx(math.log10(11 / 1024))
    assert expected_work_log2([plain.reach_log10(10, 0.5)]) == pytest.approx(math.log2(1024 / 11))
    secure = Rule(0.05, 4)  # p <= 2^-4 = 0.0625, whatever alpha says
    assert secure.least_count(10, 0.5) == 8
    assert expected_work_log2([secure.reach_log10(10, 0.5)]) == pytest.approx(math.log2(1024 / 56))
    # Bonferroni over m tests: p < 0.2 / 1 needs 7 matches, p < 0.2 / 2 needs 8.
    assert Rule(0.2, 0).least_count(10, 0.5) == 7
    assert Rule(0.2, 0, tests=2).least_count(10, 0.5) == 8
    assert Rule(0.2, 0, tests=2).threshold_log10 == pytest.approx(math.log10(0.1))
    # Three bits never reach 1e-6: no try can verify.
    never = Rule(1e-6, 0)
    assert never.least_count(3, 0.5) is None and never.reach_log10(3, 0.5) == -math.inf
    assert expected_work_log2([never.reach_log10(3, 0.5)]) == math.inf
    assert work_text(math.inf).startswith("unreachable")
    # Tries of several kinds: the mean chance, weighted by how many tries each kind has.
    mixed = expected_work_log2([math.log10(0.5), math.log10(0.1)], [1, 3])
    assert mixed == pytest.approx(-math.log2((0.5 + 3 * 0.1) / 4))
    assert log10_sum(math.log10(0.25), math.log10(0.5)) == pytest.approx(math.log10(0.75))
    assert log10_sum(-math.inf, -math.inf) == -math.inf
    with pytest.raises(ValueError):
        expected_work_log2([])


def test_durations_are_formatted_for_people():
    assert format_duration(42.0) == "42 s"
    assert format_duration(150.0) == "2.5 min"
    assert format_duration(200_000.0) == "2.3 days"
    assert format_duration(3e40) == "9.5e+32 years"
    assert format_duration(math.inf).startswith("more than")


# --- negative results: the default 128-bit rule ---------------------------------------------------


def test_w2_grind_at_the_default_rule_verifies_nothing_and_its_work_is_exact(owner):
    result = run_attack("grind", load_ticket(owner), {"tries": 3000}, seed=0, context=CPU)
    d = result.details
    assert result.ticket is None and result.claim is None and d["claim"] is None
    assert d["tries"] == 3000 and d["verified"] == 0 and d["stopped_by"] == "tries"
    assert d["rule"] == "p <= 2^-128/m = 2.9e-39 (m=1)" and d["tests"] == 1
    n, needed = d["decided"], d["needed"]
    assert d["bits"] == 1024 and 300 < n <= 1024
    # The least count whose Binomial(n, 1/2) tail is at or below 2^-128, and the null's work.
    assert binom.sf(needed - 1, n, 0.5) <= 2.0**-128 < binom.sf(needed - 2, n, 0.5)
    # The work is exactly the null's: the codeword bits every signature shares are not
    # counted by verification, so no seed gives the grinder free matches.
    assert d["work_log2"] == pytest.approx(-math.log2(binom.sf(needed - 1, n, 0.5)))
    assert d["work_log2"] >= 128
    assert d["work_time"].endswith("years")
    # The best of 3000 chance matches is weak: a p-value about 1/3000.
    assert -6 < d["best"]["log10_p"] < -2 and not d["best"]["verifies"]
    assert d["best"]["statistic"] == f"{d['best']['matched']}/{n} read bits match"


def test_w3_and_b1_grinds_at_the_default_rule_verify_nothing(owner):
    stolen = load_ticket(owner)
    w3 = run_attack("grind", stolen, {"scheme": "w3", "tries": 50_000}, seed=0, context=CPU)
    d = w3.details
    assert d["tries"] == 50_000 and d["verified"] == 0 and w3.claim is None
    assert d["layers"] == ["conv2.weight", "conv3.weight", "fc1.weight"]
    # "mallory-0" .. is a version-2 code (25 x 25): only fc1 (128 x 64) holds it.
    assert d["windows_per_text"] == {25: (128 - 24) * (64 - 24)}
    assert d["texts"] == math.ceil(50_000 / 4160)
    assert d["work_log2"] >= 128 and -6 < d["best"]["log10_p"] < -1
    b1 = run_attack("grind", stolen, {"scheme": "b1", "tries": 60}, seed=0, context=CPU)
    d = b1.details
    assert d["tries"] == 60 and d["verified"] == 0 and b1.claim is None
    assert d["tests"] == 2  # judged beside the W2 bits of its credential (verify --blackbox)
    assert sum(d["null_hit_rates"].values()) == 60
    assert d["work_log2"] >= 128 and -4 < d["best"]["log10_p"] <= 0


def test_a_time_budget_stops_the_grind_between_chunks(owner):
    params = {"tries": 10**9, "seconds": 0.3}
    d = run_attack("grind", load_ticket(owner), params, seed=0, context=CPU).details
    assert d["stopped_by"] == "seconds" and 0 < d["tries"] < 10**9
    assert d["tries"] % 2048 == 0  # whole chunks: the tries made are a prefix of the sequence


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "tries"), [("w2", 3000), ("w3", 30_000), ("b1", 40)])
def test_grind_is_deterministic_given_the_seed(owner, scheme, tries):
    stolen = load_ticket(owner)
    params = {"scheme": scheme, "tries": tries}
    a = run_attack("grind", stolen, params, seed=0, context=CPU).details
    b = run_attack("grind", stolen, params, seed=0, context=CPU).details
    c = run_attack("grind", stolen, params, seed=1, context=CPU).details
    assert _untimed(a) == _untimed(b)
    assert a["best"] != c["best"]


def test_workers_do_not_change_what_is_found(owner):
    stolen = load_ticket(owner)
    # At p < 1e-3 about one try in 700 verifies: the claims are spread over the four chunks,
    # which two workers make out of order and the grinder must take in order.
    loose = {"tries": 4 * 2048, "security_bits": 0, "alpha": 1e-3, "stop": False}
    one = run_attack("grind", stolen, loose, seed=0, context=CPU).details
    two = run_attack("grind", stolen, {**loose, "workers": 2}, seed=0, context=CPU).details
    assert one["verified"] > 1 and one["stopped_by"] == "tries"
    assert _untimed(one) == _untimed(two)


# --- the positive control and claims that verify ---------------------------------------------------


@pytest.mark.slow
def test_w2_positive_control_a_ground_claim_verifies_only_under_the_alpha_rule(owner, tmp_path):
    """Grind W2 against p < 1e-6 until a claim verifies; `verify` agrees, and refuses it at the
    default 128-bit level.

    Expected tries: 1 / P(one try verifies) = 2^work_log2, about 1e6 on this ticket (p < 1e-6
    needs about 325 of the 539 groups its seed decides), some 30 s at 18,000 tries per second
    on each of 2 cores. The number of tries is geometric: with seed 0 here the 3,008,487th try
    verifies (78 s on 2 cores), and a ticket whose bits come out otherwise (other
    float rounding while retraining) needs as many as its own draw. The budget of 2e7 tries is
    20 times the expectation, so a grind that finds nothing has probability about e^-20.
    """
    out = tmp_path / "grind.json"
    budget = 20_000_000
    args = ["attack", "grind", owner, "--out", out, "--security-bits", 0, "--alpha", "1e-6"]
    result = invoke([*args, "--tries", budget, "--workers", 2])
    assert result.exit_code == 0, result.output
    assert "stopped at the first claim that verifies" in result.output
    claim = _claim(out)
    for path in claim.values():
        assert f"wrote {path}" in result.output
    d = json.loads(out.read_text())["details"]
    print(
        f"\npositive control: {d['tries']} tries in {d['seconds']:.1f} s "
        f"({d['tries_per_second']:.0f}/s), {d['best']['statistic']}, p = {d['best']['p']}, "
        f"expected 2^{d['work_log2']:.1f} tries"
    )
    assert d["verified"] == 1 and d["stopped_by"] == "verified" and d["tries"] < budget
    assert d["best"]["verifies"] and -8 < d["best"]["log10_p"] < -6
    assert 18 < d["work_log2"] < 21  # about 2^20 tries for 1e-6
    cred = read_credential(claim["cred"])
    assert cred.valid
    doc = cred.document
    assert doc["owner"] == "mallory@example.org" and doc["created"] == d["best"]["created"]
    assert doc["embedding"]["scheme"] == "W2" and "trigger_set" not in doc
    assert doc["seed_commitment"] == d["claim"]["seed_commitment"]

    plain = _verify(owner, claim, "--security-bits", 0, "--alpha", "1e-6")
    assert plain.exit_code == 0, plain.output
    assert "verified: W2 bits p = " in plain.output
    secure = _verify(owner, claim)
    assert secure.exit_code == 1, secure.output
    assert "not verified: no evidence at or below 2^-128/m" in " ".join(secure.output.split())
    # The claimed ticket is the stolen model as it was: it carries the same chance match.
    assert _verify(claim["ticket"], claim, "--security-bits", 0).exit_code == 0


def test_w3_claim_is_placed_by_a_ground_seed_and_verifies_at_a_loose_alpha(owner, tmp_path):
    """W3 against p < 1e-3: about 2^10 (text, window) tries expected, a fraction of a second."""
    out = tmp_path / "w3.json"
    args = ["attack", "grind", owner, "--scheme", "w3", "--out", out, "--tries", 5_000_000]
    result = invoke([*args, "--security-bits", 0, "--alpha", "1e-3"])
    assert result.exit_code == 0, result.output
    d = json.loads(out.read_text())["details"]
    assert d["verified"] == 1 and d["seed_tries"] >= 1
    claim = _claim(out)
    embedding = read_credential(claim["cred"]).document["embedding"]
    assert embedding["scheme"] == "W3" and embedding["qr"]["text"] == d["best"]["text"]
    assert embedding["window"] == d["best"]["window"]
    plain = _verify(owner, claim, "--security-bits", 0, "--alpha", "1e-3")
    assert plain.exit_code == 0, plain.output
    assert _verify(owner, claim).exit_code == 1


def test_b1_claim_commits_its_trigger_set_and_verifies_with_blackbox_at_a_loose_alpha(
    owner, tmp_path
):
    """B1 against p < 0.5 / 2 (beside the claim's W2 bits). The null hit rate is the set's
    largest label frequency, more than a model that never saw the set scores, so even this
    takes tries: about 1 in 80 verifies on this ticket (6 of 500), and the budget of 2000 tries
    misses with probability about e^-24."""
    out = tmp_path / "b1.json"
    args = ["attack", "grind", owner, "--scheme", "b1", "--out", out, "--tries", 2000]
    result = invoke([*args, "--security-bits", 0, "--alpha", "0.5", "--trigger-size", 50])
    assert result.exit_code == 0, result.output
    d = json.loads(out.read_text())["details"]
    assert d["verified"] == 1 and d["tests"] == 2
    claim = _claim(out)
    record = read_credential(claim["cred"]).document["trigger_set"]
    assert record["source"] == "generated" and record["size"] == 50
    plain = _verify(owner, claim, "--blackbox", "--security-bits", 0, "--alpha", "0.5")
    assert plain.exit_code == 0, plain.output
    assert "B1 triggers" in plain.output
    assert _verify(owner, claim, "--blackbox").exit_code == 1


# --- parameters and outputs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheme", "w4"], "attack parameter 'scheme' must be one of w2, w3, b1, got 'w4'"),
        (["--tries", "0"], "attack parameter 'tries' must be >= 1, got 0"),
        (["--seconds", "-1"], "attack parameter 'seconds' must be >= 0, got -1.0"),
        (["--workers", "0"], "attack parameter 'workers' must be >= 1, got 0"),
        (
            ["--created", "yesterday"],
            "attack parameter 'created' must be an ISO 8601 time such as "
            "2020-01-01T00:00:00Z, got 'yesterday'",
        ),
        (
            ["--owner", " mallory"],
            "attack parameter 'owner': the owner id ' mallory' starts or ends with whitespace",
        ),
        (
            ["--scheme", "w3", "--qr-text", ""],
            "attack parameter 'qr_text' must not be empty for the w3 scheme",
        ),
    ],
)
def test_grind_parameters_are_checked_with_one_line_errors(owner, tmp_path, args, message):
    out = tmp_path / "g.json"
    result = invoke(["attack", "grind", owner, "--out", out, *args])
    assert error_line(result, 2) == f"Error: {message}"
    assert not out.exists()


def test_grind_checks_its_claim_files_before_it_runs(owner, tmp_path):
    out = tmp_path / "g.json"
    _claim(out)["cred"].write_text("keep me")
    result = invoke(["attack", "grind", owner, "--out", out, "--tries", 10])
    assert error_line(result, 1).endswith(
        "g.claim.cred.json already exists; pass --force to replace it"
    )
    assert not out.exists() and _claim(out)["cred"].read_text() == "keep me"
    with pytest.raises(AttackError, match="'scheme' must be one of"):
        run_attack("grind", load_ticket(owner), {"scheme": "W2"}, seed=0)


def test_key_search_reports_the_work_to_reach_the_threshold(owner):
    stolen = load_ticket(owner)
    secure = run_attack("key-search", stolen, {"tries": 10, "trigger": False}, seed=0, context=CPU)
    assert secure.details["work_log2"] >= 128  # one test, each try at most 2^-128 by the rule
    assert secure.details["work"].startswith("2^12")
    plain = {"tries": 10, "trigger": False, "security_bits": 0}
    work = run_attack("key-search", stolen, plain, seed=0, context=CPU).details["work_log2"]
    assert 19.9 < work < 21  # p < 1e-6: about a million keys
    both = run_attack("key-search", stolen, {"tries": 10}, seed=0, context=CPU).details
    assert both["work_log2"] >= 128  # W2 or B1, each at most 2^-128/2 per try
