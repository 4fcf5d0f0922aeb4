"""Weight-space attacks on a ResNet-50-sized ticket, and key-search tries per second on digits.

The ticket is torchvision's `resnet50` with a random 90%-sparse mask over its default pruned
layers (23.5 M weights; no training). Timed, each the median of a few runs: global magnitude and
random pruning, regrowth, noise, int8 and fp16 quantisation, and a function-preserving channel
permutation (tracing included); each is checked for its defining property while it is timed.
Then a key search on a small digits CNN ticket: tries per second with and without trigger sets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ticketguard.attacks.base import run_attack
from ticketguard.attacks.removal import kept_mask
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import build_model, default_pruned_parameters
from ticketguard.tickets.ticket import Ticket

REPEATS = 3


def _median(run: Callable[[], object]) -> tuple[float, object]:
    times, result = [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _ticket(arch: str, kwargs: dict, shape: list[int], density: float) -> Ticket:
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(arch, 10, kwargs)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = default_pruned_parameters(model)
    masks = {n: torch.rand(state[n].shape, generator=gen) < density for n in names}
    for n in names:
        state[n] = state[n] * masks[n]
    meta = {
        "architecture": {"name": arch, "kwargs": kwargs},
        "num_classes": 10,
        "input_shape": shape,
        "dataset": {"name": "digits", "split_seed": 0},
    }
    return Ticket(Mask(masks), state, {}, meta)


def main() -> None:
    big = _ticket("resnet50", {}, [3, 64, 64], 0.10)
    print(f"resnet50 ticket: {big.mask.num_weights:,} pruned-layer weights, 10% kept")
    kept = kept_mask(big)  # what the weights really keep (a weight can be exactly zero)
    alive = kept.num_surviving
    checks = {
        "prune magnitude 50% (global)": (
            "prune",
            {"rate": 0.5},
            lambda t: t.mask.num_surviving == alive - round(0.5 * alive),
        ),
        "prune random 50% (layerwise)": (
            "prune",
            {"rate": 0.5, "method": "random", "scope": "layerwise"},
            lambda t: t.mask.is_subset_of(kept),
        ),
        "regrow 10%": ("regrow", {"fraction": 0.1}, lambda t: kept.is_subset_of(t.mask)),
        "noise sigma 0.1 (surviving)": ("noise", {"sigma": 0.1}, lambda t: t.mask == kept),
        "quantize int8 (per channel)": (
            "quantize",
            {"bits": 8, "granularity": "channel"},
            lambda t: t.mask.is_subset_of(kept),
        ),
        "quantize fp16": ("quantize", {"bits": 16}, lambda t: t.mask.is_subset_of(kept)),
        "permute (trace + shuffle)": (
            "permute",
            {},
            lambda t: t.mask.num_surviving == alive,
        ),
    }
    for label, (name, params, check) in checks.items():
        seconds, result = _median(lambda n=name, p=params: run_attack(n, big, p, seed=0))
        assert check(result.ticket), label  # type: ignore[union-attr]
        print(f"  {label:32s} {seconds:7.2f} s")

    small = _ticket("digits_cnn", {}, [1, 8, 8], 0.2)
    for trigger in (False, True):
        tries = 200
        start = time.perf_counter()
        result = run_attack("key-search", small, {"tries": tries, "trigger": trigger}, seed=0)
        seconds = time.perf_counter() - start
        assert result.details["verified"] == 0
        what = "W2 + B1 (100 triggers each)" if trigger else "W2 only"
        print(
            f"key search on a digits CNN, {what}: {tries / seconds:6.1f} tries/s ({tries} tries, 0 verified)"
        )
