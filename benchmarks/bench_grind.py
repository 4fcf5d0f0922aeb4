"""Grinding rates on a digits CNN ticket, next to the key search, and the work to each threshold.

The ticket is a DigitsCNN (width 32) with a random 20%-dense mask over its default pruned
layers (no training). Measured in one process, one core: tries per second of `grind` for W2
(one Ed25519 signature per try), W3 ((text, window) pairs) and B1 (100-image trigger sets), and
of `key-search` (a fresh key, seed, decoding and trigger set per try). For each grinder, the
expected tries to a claim that verifies under the default rule (p <= 2^-128) and under the plain
rule at alpha = 1e-6, and how long they take at the measured rate.
"""

from __future__ import annotations

import time

import torch

from ticketguard.attacks.base import run_attack
from ticketguard.attacks.grinding import format_duration, work_seconds, work_text
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import build_model, default_pruned_parameters
from ticketguard.tickets.ticket import Ticket

#: Tries per measurement: each takes a few seconds on a laptop core.
TRIES = {"w2": 40_000, "w3": 1_000_000, "b1": 300}


def _ticket() -> Ticket:
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("digits_cnn", 10, {})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = default_pruned_parameters(model)
    masks = {n: torch.rand(state[n].shape, generator=gen) < 0.2 for n in names}
    for n in names:
        state[n] = state[n] * masks[n]
    meta = {
        "architecture": {"name": "digits_cnn", "kwargs": {}},
        "num_classes": 10,
        "input_shape": [1, 8, 8],
        "dataset": {"name": "digits", "split_seed": 0},
    }
    return Ticket(Mask(masks), state, {}, meta)


def _rate(name: str, ticket: Ticket, params: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    result = run_attack(name, ticket, params, seed=0)
    seconds = time.perf_counter() - start
    assert result.details["verified"] == 0, (name, params)
    rate = result.details.get("tries_per_second") or result.details["tries"] / seconds
    return float(rate), result.details


def _work(log2_tries: float, rate: float) -> str:
    return f"{work_text(log2_tries):>10s} = {format_duration(work_seconds(log2_tries, rate))}"


def main() -> None:
    ticket = _ticket()
    search_rate, _ = _rate("key-search", ticket, {"tries": 100, "trigger": False})
    search_b1_rate, _ = _rate("key-search", ticket, {"tries": 100})
    print(
        f"key search (fresh key and seed per try, every try decoded): {search_rate:,.0f} tries/s "
        f"W2 only, {search_b1_rate:,.0f} with a 100-image trigger set"
    )
    print(
        f"{'grind':6s} {'tries/s':>12s} {'x key search':>13s}   "
        f"{'work to 2^-128 (time at this rate)':40s} {'work to 1e-6 (time at this rate)'}"
    )
    w2: dict = {}
    for scheme, tries in TRIES.items():
        params = {"scheme": scheme, "tries": tries}
        rate, secure = _rate("grind", ticket, params)
        # The same grinder against p < 1e-6: one try suffices to read its work figure.
        plain = run_attack("grind", ticket, {**params, "tries": 1, "security_bits": 0}, seed=0)
        baseline = search_b1_rate if scheme == "b1" else search_rate
        print(
            f"{scheme.upper():6s} {rate:12,.0f} {rate / baseline:12,.1f}x   "
            f"{_work(secure['work_log2'], rate):40s} {_work(plain.details['work_log2'], rate)}"
        )
        if scheme == "w2":
            w2 = secure
    print(
        f"W2: {w2['decided']} counted groups at the grinder's seed; reaching 2^-128 needs "
        f"{w2['needed']} of them, 2^{w2['work_log2']:.1f} tries. W3 tries are (text, window) "
        "pairs; B1 is judged beside its claim's W2 bits (m = 2)."
    )


if __name__ == "__main__":
    main()
