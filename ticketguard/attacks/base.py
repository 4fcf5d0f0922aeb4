"""What every attack shares: typed parameters, the attack registry, the attacker's data, outputs.

An attack is a pure function `(ticket, params, seed, context) -> AttackResult`: the stolen ticket
is never edited, randomness comes only from `seed` (seed 0 is a seed), and the attacked model is
returned as a new ticket whose mask is the pattern of weights it actually keeps. Attacks register
themselves in `ATTACKS` when their module is imported; `get_attack` imports them all.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ticketguard.errors import ConfigError
from ticketguard.files import canonical_json
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.ticket import Ticket

REMOVAL, AMBIGUITY = "removal", "ambiguity"

#: Metadata an attacked model keeps from the stolen ticket; the rest (the owner's signature
#: record, the finding history, the measured accuracies) is what a thief strips.
KEPT_METADATA = ("architecture", "num_classes", "input_shape", "dataset", "pruned_layers")


class AttackError(ConfigError):
    """An attack is unknown, misconfigured, or cannot run on the given model."""


@dataclass(frozen=True)
class Param:
    """One parameter of an attack: its type, default, allowed values and meaning."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    #: The value names a file the attack reads (never to be overwritten by its output).
    is_path: bool = False

    def parse(self, value: Any) -> Any:
        """Return `value` (a string from the command line or a TOML value) as this type, checked."""
        where = f"attack parameter {self.name!r}"
        if self.kind is bool:
            if isinstance(value, bool):
                result: Any = value
            elif isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                result = True
            elif isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                result = False
            else:
                raise AttackError(f"{where} must be true or false, got {value!r}")
        elif self.kind is int:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise AttackError(f"{where} must be an integer, got {value!r}")
            try:
                result = int(value)
            except (TypeError, ValueError):
                raise AttackError(f"{where} must be an integer, got {value!r}") from None
        elif self.kind is float:
            if isinstance(value, bool):
                raise AttackError(f"{where} must be a number, got {value!r}")
            try:
                result = float(value)
            except (TypeError, ValueError):
                raise AttackError(f"{where} must be a number, got {value!r}") from None
            if not math.isfinite(result):
                raise AttackError(f"{where} must be finite, got {value!r}")
        else:
            if not isinstance(value, str):
                raise AttackError(f"{where} must be a string, got {value!r}")
            result = value
        if self.choices is not None and result not in self.choices:
            raise AttackError(f"{where} must be one of {', '.join(self.choices)}, got {result!r}")
        if self.minimum is not None and result < self.minimum:
            raise AttackError(f"{where} must be >= {self.minimum:g}, got {result!r}")
        if self.maximum is not None and result > self.maximum:
            raise AttackError(f"{where} must be <= {self.maximum:g}, got {result!r}")
        return result


@dataclass(frozen=True)
class AttackContext:
    """Where an attack runs and what the attacker has besides the model."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_dir: str | Path | None = None
    download: bool = False
    #: Dataset spec overriding the one the ticket records.
    dataset: str | None = None
    progress: Callable[[int], None] | None = None


@dataclass
class AttackResult:
    """What an attack produced: the attacked model (None for a pure measurement such as a key
    search), a JSON-safe record of what it did, and, for ambiguity attacks, the attacker's own
    claim (`claim`: a `SignResult` whose ticket, credential and secret can be written)."""

    ticket: Ticket | None
    details: dict[str, Any] = field(default_factory=dict)
    claim: Any = None
    seconds: float = 0.0


AttackFn = Callable[[Ticket, dict[str, Any], int, AttackContext], AttackResult]


@dataclass(frozen=True)
class Attack:
    """A registered attack: name, kind, parameters, the parameter that is its strength."""

    name: str
    kind: str
    summary: str
    params: tuple[Param, ...]
    run: AttackFn
    strength: str | None = None
    needs_data: bool = False
    #: The attack makes a claim of its own (a signed ticket, credential and secret).
    makes_claim: bool = False

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise AttackError(f"attack {self.name!r} has no parameter {name!r} (it has: {known})")

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Return every parameter's value: the given ones parsed and checked, the rest defaults."""
        for name in given:
            self.param(name)
        return {
            p.name: p.parse(given[p.name]) if p.name in given else p.default for p in self.params
        }


ATTACKS: dict[str, Attack] = {}


def register(attack: Attack) -> Attack:
    """Add an attack to the registry (its name must be new)."""
    if attack.name in ATTACKS:
        raise ValueError(f"attack {attack.name!r} is registered twice")
    if attack.kind not in (REMOVAL, AMBIGUITY):
        raise ValueError(f"attack kind must be {REMOVAL!r} or {AMBIGUITY!r}")
    if attack.strength is not None:
        attack.param(attack.strength)
    ATTACKS[attack.name] = attack
    return attack


def _load_all() -> None:
    from ticketguard.attacks import ambiguity, grinding, removal  # noqa: F401  (they register themselves)


def attack_names() -> list[str]:
    """Return the registered attack names, removal attacks first, in registration order."""
    _load_all()
    return [a.name for a in ATTACKS.values() if a.kind == REMOVAL] + [
        a.name for a in ATTACKS.values() if a.kind == AMBIGUITY
    ]


def get_attack(name: str) -> Attack:
    """Return the registered attack called `name`."""
    _load_all()
    if name not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}; known: {', '.join(attack_names())}")
    return ATTACKS[name]


def run_attack(
    name: str,
    ticket: Ticket,
    params: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    context: AttackContext | None = None,
) -> AttackResult:
    """Run one attack with checked parameters and time it."""
    attack = get_attack(name)
    resolved = attack.resolve(params or {})
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AttackError(f"the attack seed must be a non-negative integer, got {seed!r}")
    start = time.perf_counter()
    result = attack.run(ticket, resolved, seed, context or AttackContext())
    result.seconds = time.perf_counter() - start
    return result


def attack_seed(seed: int, *tags: object) -> int:
    """Derive a 63-bit seed for one use inside an attack from its seed and some tags."""
    digest = hashlib.sha256(canonical_json(["ticketguard/attack", seed, *tags]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, *tags: object) -> torch.Generator:
    """Return a CPU torch generator seeded for one use inside an attack."""
    return torch.Generator().manual_seed(attack_seed(seed, *tags))


def attacked_ticket(
    source: Ticket,
    trained: Mapping[str, torch.Tensor],
    *,
    attack: str,
    params: Mapping[str, Any],
    seed: int,
    rewind: Mapping[str, torch.Tensor] | None = None,
    dataset: str | None = None,
) -> Ticket:
    """Package attacked weights as a ticket: the mask is the non-zero pattern of the weights in
    the stolen ticket's masked layers, the owner's records are stripped, the attack is recorded."""
    state = {k: v.detach().cpu().clone() for k, v in trained.items()}
    names = [n for n in source.mask if n in state]
    mask = Mask({n: state[n] != 0 for n in names})
    meta = {k: source.metadata[k] for k in KEPT_METADATA if k in source.metadata}
    if dataset is not None:
        meta["dataset"] = dict(meta.get("dataset") or {}, name=dataset)
    meta["attack"] = {"name": attack, "params": dict(params), "seed": seed}
    kept_rewind = {k: v.detach().cpu().clone() for k, v in (rewind or {}).items()}
    return Ticket(mask, state, kept_rewind, meta)


def attacker_subset(train: Dataset, fraction: float, seed: int) -> Dataset:
    """Return the attacker's share of a training split: `fraction` of it, drawn with `seed`."""
    if not 0 < fraction <= 1:
        raise AttackError(f"the attacker's data fraction must be in (0, 1], got {fraction}")
    n = len(train)  # type: ignore[arg-type]
    keep = max(1, round(fraction * n))
    if keep >= n:
        return train
    order = torch.randperm(n, generator=generator(seed, "attacker data"))
    chosen = torch.from_numpy(np.sort(order[:keep].numpy()))
    if isinstance(train, TensorDataset):
        # Stay a TensorDataset: the trainer then slices tensors instead of running a DataLoader.
        return TensorDataset(*(t[chosen] for t in train.tensors))
    return Subset(train, chosen.tolist())
