"""Statistics a judge can trust: exact tail probabilities, p-value formatting, evidence, verdicts."""

from __future__ import annotations

import math
import numbers
import operator
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
    "empirical_p",
    "format_p",
    "judge",
    "normal_log10_tail",
]

_LN10 = math.log(10.0)

#: Below this log10 the value 10**x is no longer a normal double, so it is printed as a power.
_POWER_FORMAT_BELOW = -300.0

#: Rounding can push a log-probability a hair above 0; anything above this is a caller error.
_LOG10_P_SLACK = 1e-9

STATISTICAL = "statistical"
CRYPTOGRAPHIC = "cryptographic"


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

    def __post_init__(self) -> None:
        """Check that the fields fit the kind of evidence."""
        if not self.name:
            raise ValueError("evidence needs a name")
        if "\n" in self.summary:
            raise ValueError(f"evidence {self.name!r}: the summary must be one line")
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

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict of this evidence, with 'p' formatted for people."""
        return {
            "name": self.name,
            "kind": self.kind,
            "summary": self.summary,
            "log10_p": _json_safe(self.log10_p),
            "p": self.p_text,
            "null": self.null,
            "valid": self.valid,
            "details": _json_safe(self.details),
        }


@dataclass(frozen=True)
class Verdict:
    """The decision over all evidence, with the threshold used and the evidence that decided it."""

    verified: bool
    alpha: float
    threshold_log10: float
    tests: int
    decisive: list[str]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict of this verdict."""
        return {
            "verified": self.verified,
            "alpha": self.alpha,
            "threshold_log10": _json_safe(self.threshold_log10),
            "tests": self.tests,
            "decisive": list(self.decisive),
            "reason": self.reason,
        }


def judge(evidences: Sequence[Evidence], alpha: float = 1e-6) -> Verdict:
    """Decide ownership: Bonferroni over the statistical evidences, or any valid signature."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ConfigError(f"alpha must be a number in (0, 1), got {alpha!r}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 < alpha < 1.0):
        raise ConfigError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    evidences = list(evidences)
    for ev in evidences:
        if not isinstance(ev, Evidence):
            raise TypeError(f"judge takes Evidence objects, got {type(ev).__name__}")

    tested = [ev for ev in evidences if ev.kind == STATISTICAL and ev.log10_p is not None]
    m = len(tested)
    threshold_log10 = math.log10(alpha / max(m, 1))
    bound = f"alpha/m = {alpha / max(m, 1):.3g} (m={m})"
    crypto = [ev for ev in evidences if ev.kind == CRYPTOGRAPHIC]

    if not evidences:
        return Verdict(
            verified=False,
            alpha=alpha,
            threshold_log10=threshold_log10,
            tests=0,
            decisive=[],
            reason="not verified: no evidence was given",
        )

    # Strict '<' is the test; the order of `decisive` follows the order evidence was given in.
    decisive_ev = [
        ev
        for ev in evidences
        if (ev.kind == STATISTICAL and ev.log10_p is not None and ev.log10_p < threshold_log10)
        or (ev.kind == CRYPTOGRAPHIC and ev.valid is True)
    ]
    if decisive_ev:
        parts = [
            f"{ev.name} p = {ev.p_text} < {bound}"
            if ev.kind == STATISTICAL
            else f"{ev.name} signature valid"
            for ev in decisive_ev
        ]
        reason = "verified: " + "; ".join(parts)
    else:
        parts = []
        if tested:
            best = min(tested, key=lambda ev: ev.log10_p)
            parts.append(f"no evidence below {bound}, smallest {best.name} p = {best.p_text}")
        else:
            parts.append("no statistical evidence with a p-value")
        for ev in crypto:
            state = "invalid" if ev.valid is False else "not checked"
            parts.append(f"{ev.name} signature {state}")
        if not crypto:
            parts.append("no cryptographic evidence")
        reason = "not verified: " + "; ".join(parts)
    return Verdict(
        verified=bool(decisive_ev),
        alpha=alpha,
        threshold_log10=threshold_log10,
        tests=m,
        decisive=[ev.name for ev in decisive_ev],
        reason=reason,
    )
