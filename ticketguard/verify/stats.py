"""Statistics a judge can trust: exact tail probabilities, p-value formatting, evidence, verdicts."""

from __future__ import annotations

import math
import numbers
import operator
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import gammaln, logsumexp, xlog1py, xlogy
from scipy.stats import norm

from ticketguard.errors import ConfigError

__all__ = [
    "Evidence",
    "Verdict",
    "binomial_log10_tail",
    "check_security_bits",
    "empirical_p",
    "format_p",
    "format_work",
    "judge",
    "security_threshold_log10",
    "normal_log10_tail",
]

_LN10 = math.log(10.0)

#: Below this log10 the value 10**x is no longer a normal double, so it is printed as a power.
_POWER_FORMAT_BELOW = -300.0

#: Rounding can push a log-probability a hair above 0; anything above this is a caller error.
_LOG10_P_SLACK = 1e-9

STATISTICAL = "statistical"
CRYPTOGRAPHIC = "cryptographic"

#: The default security level: grinding a statistical claim to a match costs about 2^128 tries.
SECURITY_BITS = 128
#: The largest security level accepted (2^-4096 is far below any p-value a test can reach).
MAX_SECURITY_BITS = 4096
_LOG10_2 = math.log10(2.0)


def _as_count(value: Any, name: str) -> int:
    """Return `value` as a Python int, refusing floats and bools."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _as_finite(value: Any, name: str) -> float:
    """Return `value` as a finite float or raise ValueError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def binomial_log10_tail(n: int, k: int, p: float) -> float:
    """Return log10 P(Binomial(n, p) >= k), exact in log space however small it is."""
    n = _as_count(n, "n")
    k = _as_count(k, "k")
    p = _as_finite(p, "p")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    if k > n:
        raise ValueError(f"k must be <= n (at most n successes are possible), got k={k} > n={n}")
    if k <= 0 or p == 1.0:
        return 0.0
    if p == 0.0:
        # Under p = 0 no success can happen, so the tail probability is exactly 0.
        return -math.inf
    if k - 1 < n * p:
        # The tail holds at least about half the mass: 1 - P(X <= k-1) keeps the relative error of
        # the small lower tail instead of that of a sum close to 1.
        lower = _log_pmf_sum(n, 0, k - 1, p)
        return min(math.log1p(-math.exp(lower)) / _LN10, 0.0)
    return min(_log_pmf_sum(n, k, n, p) / _LN10, 0.0)


def _log_pmf_sum(n: int, lo: int, hi: int, p: float) -> float:
    """Return ln sum_{j=lo..hi} P(Binomial(n, p) = j), summed in log space so nothing underflows."""
    j = np.arange(lo, hi + 1, dtype=np.float64)
    log_pmf = (
        gammaln(n + 1.0)
        - gammaln(j + 1.0)
        - gammaln(n - j + 1.0)
        + xlogy(j, p)
        + xlog1py(n - j, -p)
    )
    return float(logsumexp(log_pmf))


def normal_log10_tail(score: float, mean: float, std: float) -> float:
    """Return log10 P(Z >= (score - mean) / std) for a standard normal Z.

    A null with `std <= 0` raises ValueError: a normal approximation with no spread defines no
    p-value, and flooring the spread would manufacture arbitrarily small p-values from a
    degenerate null (anti-conservative). Use `empirical_p` on the null scores instead.
    """
    score = _as_finite(score, "score")
    mean = _as_finite(mean, "mean")
    std = _as_finite(std, "std")
    if std <= 0.0:
        raise ValueError(
            f"std must be > 0 for a normal tail, got {std}; use empirical_p for a degenerate null"
        )
    z = (score - mean) / std
    return min(float(norm.logsf(z)) / _LN10, 0.0)


def prediction_log10_tail(score: float, null_scores: Sequence[float]) -> float:
    """Return log10 of the Student-t prediction p-value of `score` against a small null sample.

    If the N null scores and the score (under H0) are independent draws from one normal
    distribution, T = (score - mean) / (s * sqrt(1 + 1/N)) follows Student's t with N - 1
    degrees of freedom exactly, so P(t_{N-1} >= T) is calibrated however small N is: with few
    null samples its tail is heavy and it takes an extreme score to reach a tiny p-value.
    Needs N >= 2 and a null with spread (ValueError otherwise).
    """
    from scipy.stats import t as student_t

    score = _as_finite(score, "score")
    null = np.asarray(null_scores, dtype=np.float64).reshape(-1)
    if null.size < 2 or not np.all(np.isfinite(null)):
        raise ValueError("a prediction p-value needs at least 2 finite null scores")
    std = float(np.std(null, ddof=1))
    if std <= 0.0:
        raise ValueError("the null scores have no spread; use empirical_p")
    statistic = (score - float(np.mean(null))) / (std * math.sqrt(1.0 + 1.0 / null.size))
    return min(float(student_t.logsf(statistic, null.size - 1)) / _LN10, 0.0)


def empirical_p(score: float, null_scores: Sequence[float]) -> float:
    """Return the add-one empirical p-value (1 + #{null >= score}) / (1 + N), never 0."""
    score = _as_finite(score, "score")
    null = np.asarray(null_scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(null)):
        raise ValueError("null_scores must all be finite")
    exceed = int(np.count_nonzero(null >= score))
    return (1 + exceed) / (1 + null.size)


def format_p(log10_p: float) -> str:
    """Format a p-value given as log10 for people: '0.031', '4.2e-05', '10^-1233.0'; never '0'."""
    x = float(log10_p)
    if math.isnan(x) or x == math.inf:
        raise ValueError(f"log10_p must be a log-probability, got {log10_p!r}")
    if x > _LOG10_P_SLACK:
        raise ValueError(f"log10_p must be <= 0 (a probability is at most 1), got {log10_p!r}")
    if x == -math.inf:
        return "< 1e-308"
    if x < _POWER_FORMAT_BELOW:
        return f"10^{x:.1f}"
    p = 10.0 ** min(x, 0.0)
    if p >= 1e-3:
        return f"{p:.2g}"
    return f"{p:.1e}"


def format_work(work_log2: float) -> str:
    """Format a forger's work, given as log2 of its tries, for people: '2^25 tries'."""
    x = float(work_log2)
    if math.isnan(x) or x < 0:
        raise ValueError(f"work_log2 must be >= 0, got {work_log2!r}")
    if x == math.inf:
        # p = 0, shown by format_p as '< 1e-308' (about 2^-1023).
        return "more than 2^1023 tries"
    return f"2^{x + 0.0:.0f} tries"  # + 0.0 turns -0.0 into 0.0


def check_security_bits(value: Any) -> int:
    """Return `value` as a security level in bits (an int in 0..4096), or raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(
            f"security_bits must be an integer in 0..{MAX_SECURITY_BITS}, got {value!r}"
        )
    bits = int(value)
    if not 0 <= bits <= MAX_SECURITY_BITS:
        raise ConfigError(f"security_bits must be in 0..{MAX_SECURITY_BITS}, got {bits}")
    return bits


def security_threshold_log10(security_bits: int, m: int) -> float:
    """Return log10(2^-security_bits / m), the security level's threshold over m tests (m >= 1)."""
    bits = check_security_bits(security_bits)
    m = max(_as_count(m, "m"), 1)
    value = math.ldexp(1.0, -bits) / m
    if value >= sys.float_info.min:
        # Computed as the number itself, so a p-value of exactly 2^-s / m sits on the threshold.
        return math.log10(value)
    return -bits * _LOG10_2 - math.log10(m)


def _json_safe(value: Any) -> Any:
    """Return `value` as plain JSON types; non-finite floats become strings like '-inf'."""
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_json_safe(v) for v in items]
    raise TypeError(f"cannot put a {type(value).__name__} into a JSON report")


@dataclass(frozen=True)
class Evidence:
    """One piece of ownership evidence with its statistic and p-value (or cryptographic result)."""

    name: str
    kind: str
    summary: str
    log10_p: float | None = None
    null: str = ""
    valid: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)
    #: False for evidence that is reported but never decides and does not count in m.
    judged: bool = True
    #: Why the evidence is not judged (one line); empty exactly when it is judged.
    not_judged_reason: str = ""

    def __post_init__(self) -> None:
        """Check that the fields fit the kind of evidence."""
        if not self.name:
            raise ValueError("evidence needs a name")
        if "\n" in self.summary:
            raise ValueError(f"evidence {self.name!r}: the summary must be one line")
        if not isinstance(self.judged, bool):
            raise ValueError(f"evidence {self.name!r}: judged must be True or False")
        if self.judged and self.not_judged_reason:
            raise ValueError(f"evidence {self.name!r} is judged, so it has no not_judged_reason")
        if not self.judged and not self.not_judged_reason.strip():
            raise ValueError(f"evidence {self.name!r} is not judged: say why (not_judged_reason)")
        if "\n" in self.not_judged_reason:
            raise ValueError(f"evidence {self.name!r}: the not_judged_reason must be one line")
        if self.kind == STATISTICAL:
            if self.valid is not None:
                raise ValueError(f"statistical evidence {self.name!r} cannot carry 'valid'")
            if self.log10_p is not None:
                x = float(self.log10_p)
                if math.isnan(x) or x > _LOG10_P_SLACK:
                    raise ValueError(
                        f"evidence {self.name!r} has log10_p={self.log10_p!r}; it must be <= 0"
                    )
                object.__setattr__(self, "log10_p", min(x, 0.0))
                if not self.null:
                    raise ValueError(f"evidence {self.name!r} has a p-value but names no null")
        elif self.kind == CRYPTOGRAPHIC:
            if self.log10_p is not None:
                raise ValueError(f"cryptographic evidence {self.name!r} cannot carry a p-value")
            if self.valid is not None and not isinstance(self.valid, bool):
                raise ValueError(f"evidence {self.name!r}: valid must be True, False or None")
        else:
            raise ValueError(
                f"evidence kind must be {STATISTICAL!r} or {CRYPTOGRAPHIC!r}, got {self.kind!r}"
            )

    @property
    def p_text(self) -> str | None:
        """Return the p-value formatted for people, or None when there is none."""
        return None if self.log10_p is None else format_p(self.log10_p)

    @property
    def work_log2(self) -> float | None:
        """Return log2 of the tries a claimant who retries needs to reach this p (about 1/p)."""
        if self.log10_p is None:
            return None
        work = -self.log10_p / _LOG10_2
        return work if work > 0.0 else 0.0  # never -0.0, which would print as 2^-0

    @property
    def work_text(self) -> str | None:
        """Return the forger's work to reach this p-value for people ('2^25 tries'), or None."""
        work = self.work_log2
        return None if work is None else format_work(work)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict of this evidence, with 'p' and 'work' formatted for people."""
        return {
            "name": self.name,
            "kind": self.kind,
            "summary": self.summary,
            "log10_p": _json_safe(self.log10_p),
            "p": self.p_text,
            "work_log2": _json_safe(self.work_log2),
            "work": self.work_text,
            "null": self.null,
            "valid": self.valid,
            "judged": self.judged,
            "not_judged_reason": self.not_judged_reason,
            "details": _json_safe(self.details),
        }


@dataclass(frozen=True)
class Verdict:
    """The decision over all evidence, with the rule and threshold used and what decided it.

    `security_bits > 0`: statistical evidence decides when p <= 2^-security_bits / m, so that a
    claimant who retries needs about 2^security_bits tries to forge it. `security_bits == 0`:
    the plain significance rule p < alpha / m, valid only for a claim committed before the
    suspect existed. `tests` is m, the number of judged statistical evidences.
    """

    verified: bool
    alpha: float
    threshold_log10: float
    tests: int
    decisive: list[str]
    reason: str
    security_bits: int = SECURITY_BITS
    #: Evidence reported but never judged (an imported trigger set), in the order given.
    not_judged: list[str] = field(default_factory=list)

    @property
    def rule(self) -> str:
        """Return the decision rule for statistical evidence, as text."""
        if self.security_bits:
            return f"p <= 2^-{self.security_bits}/m"
        return "p < alpha/m"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict of this verdict."""
        return {
            "verified": self.verified,
            "alpha": self.alpha,
            "security_bits": self.security_bits,
            "rule": self.rule,
            "threshold_log10": _json_safe(self.threshold_log10),
            "threshold": format_p(self.threshold_log10),
            "tests": self.tests,
            "decisive": list(self.decisive),
            "not_judged": list(self.not_judged),
            "reason": self.reason,
        }


def _passes(evidence: Evidence, threshold_log10: float, security_bits: int) -> bool:
    """Return whether judged statistical evidence reaches the threshold under the rule in use."""
    if not evidence.judged or evidence.kind != STATISTICAL or evidence.log10_p is None:
        return False
    if security_bits:
        return evidence.log10_p <= threshold_log10
    return evidence.log10_p < threshold_log10


def judge(
    evidences: Sequence[Evidence], alpha: float = 1e-6, security_bits: int = SECURITY_BITS
) -> Verdict:
    """Decide ownership: statistical evidence at the security level (Bonferroni), or a signature.

    A claimant may retry (new key, seed, creation text, trigger set) until some claim matches by
    chance, so with `security_bits > 0` a p-value decides only at p <= 2^-security_bits / m;
    `security_bits=0` applies p < alpha / m, which holds only for a claim proven to predate the
    suspect. A valid signature decides on its own. Evidence with `judged=False` is named in the
    reason but never decides and does not count in m.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ConfigError(f"alpha must be a number in (0, 1), got {alpha!r}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 < alpha < 1.0):
        raise ConfigError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    security_bits = check_security_bits(security_bits)
    evidences = list(evidences)
    for ev in evidences:
        if not isinstance(ev, Evidence):
            raise TypeError(f"judge takes Evidence objects, got {type(ev).__name__}")

    tested = [
        ev for ev in evidences if ev.judged and ev.kind == STATISTICAL and ev.log10_p is not None
    ]
    m = len(tested)
    if security_bits:
        threshold_log10 = security_threshold_log10(security_bits, m)
        passed, missed = f"<= 2^-{security_bits}/m (m={m})", "at or below"
        bound_value = f"2^-{security_bits}/m = {format_p(threshold_log10)} (m={m})"
    else:
        threshold_log10 = math.log10(alpha / max(m, 1))
        bound_value = f"alpha/m = {alpha / max(m, 1):.3g} (m={m})"
        passed, missed = f"< {bound_value}", "below"
    crypto = [ev for ev in evidences if ev.judged and ev.kind == CRYPTOGRAPHIC]
    unjudged = [ev for ev in evidences if not ev.judged]
    unjudged_text = [
        f"{ev.name}"
        + (f" p = {ev.p_text}" if ev.log10_p is not None else "")
        + f" is not judged ({ev.not_judged_reason})"
        for ev in unjudged
    ]

    def verdict(verified: bool, decisive: list[str], reason: str) -> Verdict:
        return Verdict(
            verified=verified,
            alpha=alpha,
            threshold_log10=threshold_log10,
            tests=m,
            decisive=decisive,
            reason=reason,
            security_bits=security_bits,
            not_judged=[ev.name for ev in unjudged],
        )

    if not evidences:
        return verdict(False, [], "not verified: no evidence was given")

    # The order of `decisive` follows the order evidence was given in.
    decisive_ev = [
        ev
        for ev in evidences
        if _passes(ev, threshold_log10, security_bits)
        or (ev.judged and ev.kind == CRYPTOGRAPHIC and ev.valid is True)
    ]
    if decisive_ev:
        parts = [
            f"{ev.name} p = {ev.p_text} {passed}"
            if ev.kind == STATISTICAL
            else f"{ev.name} signature valid"
            for ev in decisive_ev
        ]
        reason = "verified: " + "; ".join(parts + unjudged_text)
    else:
        parts = []
        if tested:
            best = min(tested, key=lambda ev: ev.log10_p)  # type: ignore[arg-type, return-value]
            parts.append(
                f"no evidence {missed} {bound_value}, smallest {best.name} p = {best.p_text}"
                + (f" (a forger reaches it in about {best.work_text})" if security_bits else "")
            )
        else:
            parts.append("no statistical evidence with a p-value")
        for ev in crypto:
            state = "invalid" if ev.valid is False else "not checked"
            parts.append(f"{ev.name} signature {state}")
        if not crypto:
            parts.append("no cryptographic evidence")
        reason = "not verified: " + "; ".join(parts + unjudged_text)
    return verdict(bool(decisive_ev), [ev.name for ev in decisive_ev], reason)
