"""Tests for the statistics behind verdicts: exact tails, p-value formatting, evidence, judging."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import binom, norm

from ticketguard.errors import ConfigError
from ticketguard.verify.stats import (
    Evidence,
    Verdict,
    binomial_log10_tail,
    empirical_p,
    format_p,
    format_work,
    judge,
    normal_log10_tail,
)


def exact_log10_tail(n: int, k: int, p: Fraction) -> float:
    """Return log10 P(Binomial(n, p) >= k) from an exact rational sum."""
    total = sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))
    if total > Fraction(1, 2):
        # Near 1, go through the exact complement so no digits cancel.
        return math.log1p(-float(1 - total)) / math.log(10)
    # log10 of a huge numerator and denominator separately stays exact far below 1e-308.
    return math.log10(total.numerator) - math.log10(total.denominator)


# --- binomial_log10_tail --------------------------------------------------------------------------


def test_binomial_all_successes_is_n_log10_p() -> None:
    assert binomial_log10_tail(1024, 1024, 0.5) == pytest.approx(1024 * math.log10(0.5), abs=1e-9)
    assert binomial_log10_tail(5000, 5000, 0.3) == pytest.approx(5000 * math.log10(0.3), rel=1e-12)


def test_binomial_astronomically_small_is_finite() -> None:
    value = binomial_log10_tail(4096, 4096, 0.5)
    assert math.isfinite(value)
    assert value == pytest.approx(-1233.0188622, abs=1e-6)
    assert binomial_log10_tail(4096, 4000, 0.5) < -1000


def test_binomial_small_case_by_hand() -> None:
    # P(X >= 7) for X ~ Bin(10, 1/2): (C(10,7) + C(10,8) + C(10,9) + C(10,10)) / 2^10 = 176/1024.
    assert binomial_log10_tail(10, 7, 0.5) == pytest.approx(math.log10(176 / 1024), abs=1e-12)


@pytest.mark.parametrize("p", [Fraction(1, 2), Fraction(1, 3), Fraction(1, 10), Fraction(9, 10)])
@pytest.mark.parametrize("n", [1, 2, 7, 20, 63])
def test_binomial_matches_exact_fractions(n: int, p: Fraction) -> None:
    for k in range(1, n + 1):
        expected = exact_log10_tail(n, k, p)
        got = binomial_log10_tail(n, k, float(p))
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-12), (n, k, p)


@pytest.mark.parametrize(("n", "k"), [(2000, 1900), (1024, 1020), (4096, 2500)])
def test_binomial_matches_exact_fractions_far_below_double_range(n: int, k: int) -> None:
    expected = exact_log10_tail(n, k, Fraction(1, 2))
    assert binomial_log10_tail(n, k, 0.5) == pytest.approx(expected, rel=1e-11)


@pytest.mark.parametrize(("n", "p"), [(50, 0.5), (300, 0.3), (1000, 0.02), (4096, 0.5)])
def test_binomial_matches_scipy_where_it_does_not_underflow(n: int, p: float) -> None:
    for k in range(0, n + 1, max(1, n // 60)):
        sf = binom.sf(k - 1, n, p)
        if sf < 1e-290:
            continue
        assert binomial_log10_tail(n, k, p) == pytest.approx(math.log10(sf), rel=1e-9, abs=1e-12)


def test_binomial_keeps_precision_when_the_tail_is_nearly_one() -> None:
    # P(X >= 1) = 1 - 2^-100, so log10 is -2^-100 / ln 10 to first order; a sum near 1 loses it.
    assert binomial_log10_tail(100, 1, 0.5) == pytest.approx(-(2.0**-100) / math.log(10), rel=1e-9)
    expected = exact_log10_tail(300, 60, Fraction(1, 3))
    got = binomial_log10_tail(300, 60, 1 / 3)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got < 0.0


def test_binomial_is_monotone_in_k_and_at_most_zero() -> None:
    values = [binomial_log10_tail(777, k, 0.37) for k in range(0, 778)]
    assert all(v <= 0.0 for v in values)
    assert all(b < a for a, b in zip(values, values[1:], strict=False) if a > -300)
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))


def test_binomial_edge_cases() -> None:
    assert binomial_log10_tail(10, 0, 0.5) == 0.0
    assert binomial_log10_tail(10, -3, 0.5) == 0.0
    assert binomial_log10_tail(0, 0, 0.5) == 0.0
    assert binomial_log10_tail(10, 10, 1.0) == 0.0
    assert binomial_log10_tail(10, 0, 0.0) == 0.0
    assert binomial_log10_tail(10, 1, 0.0) == -math.inf
    assert binomial_log10_tail(np.int64(10), np.int64(7), np.float64(0.5)) == pytest.approx(
        math.log10(176 / 1024)
    )


@pytest.mark.parametrize(
    ("n", "k", "p", "message"),
    [
        (10, 11, 0.5, "k must be <= n"),
        (10, 5, 1.5, "p must lie in"),
        (10, 5, -0.1, "p must lie in"),
        (10, 5, float("nan"), "p must be finite"),
        (-1, 0, 0.5, "n must be >= 0"),
        (10.0, 5, 0.5, "n must be an integer"),
        (10, 5.5, 0.5, "k must be an integer"),
    ],
)
def test_binomial_rejects_bad_input(n: object, k: object, p: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        binomial_log10_tail(n, k, p)  # type: ignore[arg-type]


# --- normal_log10_tail and empirical_p ----------------------------------------------------------


def test_normal_tail_matches_scipy() -> None:
    for score in [-3.0, 0.0, 0.7, 2.5, 6.0]:
        expected = math.log10(norm.sf((score - 1.0) / 0.5))
        assert normal_log10_tail(score, 1.0, 0.5) == pytest.approx(expected, rel=1e-12)
    assert normal_log10_tail(3.0, 3.0, 2.0) == pytest.approx(math.log10(0.5))


def test_normal_tail_far_out_is_finite_and_asymptotically_right() -> None:
    z = 60.0
    value = normal_log10_tail(z, 0.0, 1.0)
    # Mills ratio: log P(Z >= z) ≈ -z²/2 - log(z √(2π)) for large z.
    approx = (-(z**2) / 2 - math.log(z * math.sqrt(2 * math.pi))) / math.log(10)
    assert math.isfinite(value)
    assert value == pytest.approx(approx, abs=1e-3)


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan")])
def test_normal_tail_refuses_degenerate_null(std: float) -> None:
    with pytest.raises(ValueError, match="std"):
        normal_log10_tail(5.0, 0.0, std)


def test_empirical_p_counts_ties_and_is_never_zero() -> None:
    null = [0.1, 0.2, 0.3, 0.3, 0.9]
    assert empirical_p(0.3, null) == pytest.approx(4 / 6)
    assert empirical_p(1.0, null) == pytest.approx(1 / 6)
    assert empirical_p(-5.0, null) == pytest.approx(1.0)
    assert empirical_p(1.0, []) == 1.0
    assert empirical_p(1e9, np.zeros(999)) == pytest.approx(1e-3)


def test_empirical_p_is_valid_under_the_null() -> None:
    # A score drawn from the null itself must give P(p <= a) <= a (add-one makes it conservative).
    rng = np.random.default_rng(0)
    ps = np.array([empirical_p(rng.normal(), rng.normal(size=19)) for _ in range(4000)])
    for a in [0.05, 0.1, 0.25, 0.5]:
        assert np.mean(ps <= a) <= a + 4 * math.sqrt(a * (1 - a) / ps.size)


def test_empirical_p_rejects_non_finite() -> None:
    with pytest.raises(ValueError):
        empirical_p(float("nan"), [1.0])
    with pytest.raises(ValueError):
        empirical_p(0.5, [1.0, float("nan")])


# --- format_p -----------------------------------------------------------------------------------


def test_format_p_examples() -> None:
    assert format_p(math.log10(0.031)) == "0.031"
    assert format_p(math.log10(4.2e-5)) == "4.2e-05"
    assert format_p(1024 * math.log10(0.5)) == "10^-308.3"
    assert format_p(binomial_log10_tail(4096, 4096, 0.5)) == "10^-1233.0"
    assert format_p(0.0) == "1"
    assert format_p(1e-12) == "1"
    assert format_p(-math.inf) == "< 1e-308"


def test_format_p_never_prints_zero() -> None:
    for x in np.linspace(-5000.0, 0.0, 20001):
        text = format_p(float(x))
        if text.startswith("10^"):
            assert float(text[3:]) == pytest.approx(x, abs=0.051)
        else:
            assert float(text) > 0.0
            assert math.log10(float(text)) == pytest.approx(x, abs=0.03)


@pytest.mark.parametrize("bad", [float("nan"), math.inf, 0.5, 3.0])
def test_format_p_rejects_non_probabilities(bad: float) -> None:
    with pytest.raises(ValueError):
        format_p(bad)


# --- Evidence and Verdict -----------------------------------------------------------------------


def _stat(name: str, log10_p: float | None) -> Evidence:
    return Evidence(
        name=name, kind="statistical", summary="test", log10_p=log10_p, null="Binomial(n, 1/2)"
    )


def _crypto(name: str, valid: bool | None) -> Evidence:
    return Evidence(name=name, kind="cryptographic", summary="signature", valid=valid)


def test_evidence_to_dict_is_strict_json() -> None:
    ev = Evidence(
        name="W2 bits",
        kind="statistical",
        summary="1024/1024 bits match",
        log10_p=binomial_log10_tail(1024, 1024, 0.5),
        null="Binomial(1024, 1/2)",
        details={"n": np.int64(1024), "k": 1020, "per_layer": np.array([3, 4]), "x": -math.inf},
    )
    data = ev.to_dict()
    text = json.dumps(data, allow_nan=False)
    back = json.loads(text)
    assert back["p"] == format_p(ev.log10_p)
    assert back["p"].startswith("10^-")
    assert back["details"] == {"n": 1024, "k": 1020, "per_layer": [3, 4], "x": "-inf"}
    assert back["valid"] is None
    crypto = json.loads(json.dumps(_crypto("W2 payload", True).to_dict(), allow_nan=False))
    assert crypto["valid"] is True and crypto["p"] is None and crypto["log10_p"] is None


def test_evidence_minus_inf_serialises() -> None:
    ev = _stat("degenerate", binomial_log10_tail(10, 1, 0.0))
    data = json.loads(json.dumps(ev.to_dict(), allow_nan=False))
    assert data["log10_p"] == "-inf" and data["p"] == "< 1e-308"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "magic"},
        {"kind": "statistical", "valid": True},
        {"kind": "statistical", "log10_p": 0.5},
        {"kind": "statistical", "log10_p": float("nan")},
        {"kind": "statistical", "log10_p": -3.0, "null": ""},
        {"kind": "cryptographic", "log10_p": -3.0},
        {"kind": "cryptographic", "valid": "yes"},
        {"kind": "statistical", "summary": "two\nlines"},
    ],
)
def test_evidence_rejects_inconsistent_fields(kwargs: dict) -> None:
    base = {"name": "e", "summary": "s", "null": "Binomial(n, 1/2)"}
    with pytest.raises(ValueError):
        Evidence(**{**base, **kwargs})


# --- judge: the plain alpha rule (security_bits=0) ------------------------------------------------


def test_judge_bonferroni_threshold_with_two_tests() -> None:
    verdict = judge(
        [_stat("W1 overlap", -2.0), _stat("W2 bits", -300.9)], alpha=1e-6, security_bits=0
    )
    assert verdict.tests == 2
    assert verdict.threshold_log10 == pytest.approx(math.log10(5e-7), abs=1e-12)
    assert verdict.verified
    assert verdict.decisive == ["W2 bits"]
    assert verdict.reason == "verified: W2 bits p = 10^-300.9 < alpha/m = 5e-07 (m=2)"
    assert verdict.security_bits == 0 and verdict.rule == "p < alpha/m"


def test_judge_correction_depends_on_m() -> None:
    ev = _stat("B1 triggers", -6.5)
    assert judge([ev], security_bits=0).verified
    others = [_stat(f"null {i}", -0.1) for i in range(9)]
    verdict = judge([ev, *others], security_bits=0)
    assert verdict.tests == 10
    assert verdict.threshold_log10 == pytest.approx(-7.0)
    assert not verdict.verified
    assert "smallest B1 triggers p = 3.2e-07" in verdict.reason


def test_judge_threshold_is_strict() -> None:
    at = judge([_stat("a", math.log10(1e-6))], security_bits=0)
    assert at.threshold_log10 == math.log10(1e-6)
    assert not at.verified
    below = judge([_stat("a", math.nextafter(math.log10(1e-6), -math.inf))], security_bits=0)
    assert below.verified


def test_security_bits_zero_falls_back_to_alpha() -> None:
    """A p of 1e-8 is significant at alpha = 1e-6 but some 2^27 tries away from a forgery."""
    weak = [_stat("W2 bits", -8.0)]
    old = judge(weak, alpha=1e-6, security_bits=0)
    assert old.verified and old.threshold_log10 == -6.0
    assert old.reason == "verified: W2 bits p = 1.0e-08 < alpha/m = 1e-06 (m=1)"
    new = judge(weak, alpha=1e-6)
    assert not new.verified and new.decisive == []
    assert new.threshold_log10 == pytest.approx(-128 * math.log10(2), abs=1e-12)
    assert new.reason == (
        "not verified: no evidence at or below 2^-128/m = 2.9e-39 (m=1), smallest W2 bits "
        "p = 1.0e-08 (a forger reaches it in about 2^27 tries); no cryptographic evidence"
    )
    # alpha still sets the plain rule's threshold, and only that.
    assert judge(weak, alpha=1e-9, security_bits=0).threshold_log10 == pytest.approx(-9.0)
    assert judge(weak, alpha=1e-9).threshold_log10 == new.threshold_log10


# --- judge: the security level (the default) ----------------------------------------------------


@pytest.mark.parametrize("m", [1, 2])
def test_judge_at_exactly_the_security_level_verifies(m: int) -> None:
    exact = math.log10(2.0**-128 / m)
    others = [_stat("W1 topology", -1.0)] * (m - 1)
    at = judge([_stat("W2 bits", exact), *others])
    assert at.threshold_log10 == exact
    assert at.tests == m and at.security_bits == 128 and at.rule == "p <= 2^-128/m"
    assert at.verified and at.decisive == ["W2 bits"]
    assert at.reason == f"verified: W2 bits p = {format_p(exact)} <= 2^-128/m (m={m})"
    hair = judge([_stat("W2 bits", math.nextafter(exact, 0.0)), *others])
    assert not hair.verified and hair.decisive == []
    # 1e-38 is a p-value a sound test rarely gives by chance, but not at 2^-128 = 2.9e-39.
    assert not judge([_stat("W2 bits", -38.0), *others]).verified


def test_judge_security_reason_names_the_rule_and_the_work() -> None:
    verdict = judge([_stat("W2 bits", math.log10(3.2e-8)), _stat("W1 topology", -1.0)])
    assert verdict.reason == (
        "not verified: no evidence at or below 2^-128/m = 1.5e-39 (m=2), smallest W2 bits "
        "p = 3.2e-08 (a forger reaches it in about 2^25 tries); no cryptographic evidence"
    )
    strong = judge([_stat("W2 bits", -290.3), _stat("W1 topology", -1.0)])
    assert strong.reason == "verified: W2 bits p = 5.0e-291 <= 2^-128/m (m=2)"


def test_judge_other_security_levels() -> None:
    # 64 bits: 2^-64 = 5.4e-20.
    assert judge([_stat("a", -20.0)], security_bits=64).verified
    assert not judge([_stat("a", -19.0)], security_bits=64).verified
    # 2000 bits lies below the smallest double: the threshold is computed in log space.
    deep = judge([_stat("a", -603.0)], security_bits=2000)
    assert deep.threshold_log10 == pytest.approx(-2000 * math.log10(2), abs=1e-9)
    assert deep.verified
    assert not judge([_stat("a", -602.0)], security_bits=2000).verified
    assert "2^-2000/m = 10^-602.1 (m=1)" in judge([_stat("a", -1.0)], security_bits=2000).reason


@pytest.mark.parametrize("bits", [-1, 4097, True, 1.5, "128", None])
def test_judge_rejects_bad_security_bits(bits: object) -> None:
    with pytest.raises(ConfigError, match="security_bits"):
        judge([_stat("a", -10.0)], security_bits=bits)  # type: ignore[arg-type]


def test_judge_cryptographic_evidence_alone_verifies() -> None:
    verdict = judge([_stat("W2 bits", -1.0), _crypto("W2 payload", True)])
    assert verdict.verified
    assert verdict.decisive == ["W2 payload"]
    assert verdict.tests == 1
    assert "W2 payload signature valid" in verdict.reason


def test_judge_both_decisive_named_in_order() -> None:
    verdict = judge([_stat("W2 bits", -300.9), _stat("W1", -1.0), _crypto("W2 payload", True)])
    assert verdict.decisive == ["W2 bits", "W2 payload"]
    assert verdict.reason == (
        "verified: W2 bits p = 10^-300.9 <= 2^-128/m (m=2); W2 payload signature valid"
    )


def test_judge_not_verified_names_the_evidence() -> None:
    verdict = judge([_stat("W2 bits", -3.0), _crypto("W2 payload", False)])
    assert not verdict.verified
    assert verdict.decisive == []
    assert verdict.reason.startswith(
        "not verified: no evidence at or below 2^-128/m = 2.9e-39 (m=1)"
    )
    assert "W2 bits p = 0.001 (a forger reaches it in about 2^10 tries)" in verdict.reason
    assert "W2 payload signature invalid" in verdict.reason


def test_judge_counts_only_evidence_with_a_p_value() -> None:
    verdict = judge(
        [_stat("unreadable", None), _stat("W2 bits", -6.5), _crypto("sig", None)], security_bits=0
    )
    assert verdict.tests == 1
    assert verdict.verified
    nothing = judge([_stat("unreadable", None), _crypto("sig", None)])
    assert not nothing.verified and nothing.tests == 0
    assert "no statistical evidence with a p-value" in nothing.reason
    assert "sig signature not checked" in nothing.reason


def _imported(log10_p: float) -> Evidence:
    return Evidence(
        name="B1 triggers",
        kind="statistical",
        summary="100/100 trigger labels match",
        log10_p=log10_p,
        null="Binomial(100, 0.10)",
        judged=False,
        not_judged_reason="an imported trigger set",
    )


def test_unjudged_evidence_never_decides_and_is_not_counted() -> None:
    alone = judge([_imported(-100.0)])
    assert not alone.verified and alone.decisive == [] and alone.tests == 0
    assert alone.not_judged == ["B1 triggers"]
    assert alone.reason == (
        "not verified: no statistical evidence with a p-value; no cryptographic evidence; "
        "B1 triggers p = 1.0e-100 is not judged (an imported trigger set)"
    )
    # Not even the plain alpha rule lets it decide.
    assert not judge([_imported(-100.0)], security_bits=0).verified
    # It does not count in m: one judged test keeps the threshold at 2^-128 / 1.
    mixed = judge([_stat("W2 bits", -50.0), _imported(-100.0)])
    assert mixed.tests == 1
    assert mixed.threshold_log10 == pytest.approx(-128 * math.log10(2), abs=1e-12)
    assert mixed.decisive == ["W2 bits"]
    assert mixed.reason == (
        "verified: W2 bits p = 1.0e-50 <= 2^-128/m (m=1); "
        "B1 triggers p = 1.0e-100 is not judged (an imported trigger set)"
    )
    exact = math.log10(2.0**-128)
    assert judge([_stat("W2 bits", exact), _imported(-100.0)]).verified
    # An unjudged signature does not decide either.
    unjudged_sig = Evidence(
        "sig", "cryptographic", "s", valid=True, judged=False, not_judged_reason="test"
    )
    assert not judge([unjudged_sig]).verified


def test_judge_without_evidence() -> None:
    verdict = judge([])
    assert not verdict.verified
    assert verdict.tests == 0 and verdict.decisive == []
    assert "no evidence" in verdict.reason


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 2.0, float("nan"), "0.01", True])
def test_judge_rejects_bad_alpha(alpha: object) -> None:
    with pytest.raises(ConfigError):
        judge([_stat("a", -10.0)], alpha=alpha)  # type: ignore[arg-type]


def test_verdict_to_dict_is_strict_json() -> None:
    verdict = judge([_stat("W2 bits", -300.9), _crypto("W2 payload", False), _imported(-3.0)])
    assert isinstance(verdict, Verdict)
    data = json.loads(json.dumps(verdict.to_dict(), allow_nan=False))
    assert data == {
        "verified": True,
        "alpha": 1e-6,
        "security_bits": 128,
        "rule": "p <= 2^-128/m",
        "threshold_log10": pytest.approx(-128 * math.log10(2), abs=1e-12),
        "threshold": "2.9e-39",
        "tests": 1,
        "decisive": ["W2 bits"],
        "not_judged": ["B1 triggers"],
        "reason": verdict.reason,
    }


# --- the forger's work -----------------------------------------------------------------------------


def test_evidence_reports_the_work_to_forge_it() -> None:
    ev = _stat("W2 bits", math.log10(3.2e-8))
    assert ev.work_log2 == pytest.approx(-math.log2(3.2e-8), abs=1e-9)
    assert ev.work_log2 == pytest.approx(24.897, abs=1e-3)
    assert ev.work_text == "2^25 tries"
    data = json.loads(json.dumps(ev.to_dict(), allow_nan=False))
    assert data["work_log2"] == pytest.approx(24.897, abs=1e-3) and data["work"] == "2^25 tries"
    assert data["judged"] is True and data["not_judged_reason"] == ""
    assert _stat("W2 bits", 0.0).work_log2 == 0.0 and _stat("a", 0.0).work_text == "2^0 tries"
    assert _stat("W2 bits", -300.9).work_text == "2^1000 tries"
    assert _stat("W2 bits", None).work_log2 is None and _stat("a", None).work_text is None
    assert _crypto("W2 payload", True).to_dict()["work_log2"] is None
    assert format_work(-0.0) == "2^0 tries" and format_work(0.49) == "2^0 tries"
    # p = 0: never printed as 0 tries or 2^inf; JSON stays standard.
    dead = _stat("degenerate", -math.inf)
    assert dead.work_text == "more than 2^1023 tries"
    assert json.loads(json.dumps(dead.to_dict(), allow_nan=False))["work_log2"] == "inf"
    imported = json.loads(json.dumps(_imported(-3.0).to_dict(), allow_nan=False))
    assert (
        imported["judged"] is False and imported["not_judged_reason"] == "an imported trigger set"
    )


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_format_work_rejects_negative_work(bad: float) -> None:
    with pytest.raises(ValueError):
        format_work(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"judged": False},
        {"judged": False, "not_judged_reason": "  "},
        {"judged": True, "not_judged_reason": "why"},
        {"judged": 0, "not_judged_reason": "why"},
        {"judged": False, "not_judged_reason": "two\nlines"},
    ],
)
def test_evidence_rejects_inconsistent_judging(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        _stat("e", -3.0).__class__(
            name="e", kind="statistical", summary="s", log10_p=-3.0, null="B", **kwargs
        )


def test_prediction_p_is_calibrated_even_with_two_null_samples() -> None:
    from ticketguard.verify.stats import prediction_log10_tail

    rng = np.random.default_rng(0)
    trials = 4000
    for n in (2, 5, 20):
        hits = 0
        for _ in range(trials):
            null = rng.normal(3.0, 2.0, n)
            if prediction_log10_tail(rng.normal(3.0, 2.0), null) < np.log10(0.05):
                hits += 1
        # 0.05 expected; 4 binomial standard deviations (0.0034 each) either way.
        assert abs(hits / trials - 0.05) < 0.014, (n, hits)
    # Few samples make a far-out score much less significant than a normal fit would.
    few = prediction_log10_tail(100.0, [0.0, 1.0])
    many = prediction_log10_tail(100.0, list(rng.normal(0.5, 0.7071, 50)))
    assert -4 < few < -1
    assert many < -40
    with pytest.raises(ValueError):
        prediction_log10_tail(1.0, [0.5])
    with pytest.raises(ValueError):
        prediction_log10_tail(1.0, [0.5, 0.5])
