"""The robustness benchmark: run a grid of attacks on a signed ticket and verify every result.

A TOML config names the target (signed ticket, credential, revealed secret), the attacks with
their parameter grids (a list is an axis; the cells are the product of all axes and the seeds)
and how each attacked model is judged. Each finished cell is a JSON file in `OUT/cells/`, so a
re-run skips it; cells run in worker processes with `workers > 1`. The unattacked target is
verified once as the baseline, so the report can say which evidence each attack removed; a
target that does not verify is refused before any attack runs. A grid is counted from its axis
lengths before it is expanded, and one of more than `MAX_CELLS` cells is refused.
See docs/attacks.md.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ticketguard.attacks.base import Attack, AttackContext, AttackError, get_attack
from ticketguard.documents import read_json_file, read_toml_file
from ticketguard.errors import ConfigError, CredentialError, TicketGuardError
from ticketguard.files import canonical_json, write_json_atomic
from ticketguard.verify.stats import MAX_SECURITY_BITS, SECURITY_BITS

if TYPE_CHECKING:
    from ticketguard.tickets.ticket import Ticket

#: Top-level config keys and their TOML types.
TOP_KEYS: dict[str, type] = {
    "name": str,
    "seeds": list,
    "alpha": float,
    "security_bits": int,
    "max_drop": float,
    "data_fraction": float,
    "blackbox": bool,
    "reference": bool,
    "null_samples": int,
    "device": str,
    "workers": int,
    "target": dict,
    "attack": list,
}
TARGET_KEYS = ("ticket", "credential", "secret")
ATTACK_KEYS = ("name", "params", "label")
OVERRIDE_KEYS = ("ticket", "credential", "secret", "device", "workers")
#: Parameters meaning "the attacker's share of the training data" (in attacks that train).
DATA_PARAMS = ("fraction", "data_fraction")
#: How a cell is judged: verifying the attacked model, a dispute of claims, or a count.
BY_VERIFICATION, BY_DISPUTE, BY_COUNT = "verification", "dispute", "count"
#: The baseline's attack name: the signed target, not attacked.
BASELINE = "(none)"
#: Rounding slack when comparing an accuracy drop with `max_drop`.
_DROP_SLACK = 1e-9
#: Most cells one config may name (attacks x parameter combinations x seeds). Counted from the
#: axis lengths before any cell is built, so a grid of 10^9 cells is refused at once; a real
#: benchmark has tens to hundreds of cells, each taking seconds to hours.
MAX_CELLS = 10_000
#: Largest benchmark config file read (a config is a few kilobytes).
MAX_CONFIG_BYTES = 1 << 20
#: Largest cell record read back from OUT/cells (a record is a few kilobytes).
MAX_CELL_RECORD_BYTES = 4 << 20


class TargetError(TicketGuardError):
    """The benchmark's target cannot be used: unreadable, or its credential does not verify it.

    Raised before any attack runs, and nothing is written (exit code 1)."""


@dataclass(frozen=True)
class AttackSpec:
    """One `[[attack]]` table: the attack, its parameters (lists are axes), a display label."""

    name: str
    params: dict[str, Any]
    label: str | None = None


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark run: target, attacks, seeds, and how attacked models are judged."""

    name: str
    ticket: Path
    credential: Path
    secret: Path
    attacks: tuple[AttackSpec, ...]
    seeds: tuple[int, ...] = (0,)
    alpha: float = 1e-6
    security_bits: int = SECURITY_BITS
    max_drop: float = 0.05
    data_fraction: float = 0.5
    blackbox: bool = True
    reference: bool = True
    null_samples: int = 20
    device: str = "auto"
    workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-safe values (paths as strings)."""
        return {
            "name": self.name,
            "ticket": str(self.ticket),
            "credential": str(self.credential),
            "secret": str(self.secret),
            "attacks": [
                {"name": a.name, "params": a.params, "label": a.label} for a in self.attacks
            ],
            "seeds": list(self.seeds),
            "alpha": self.alpha,
            "security_bits": self.security_bits,
            "max_drop": self.max_drop,
            "data_fraction": self.data_fraction,
            "blackbox": self.blackbox,
            "reference": self.reference,
            "null_samples": self.null_samples,
            "device": self.device,
            "workers": self.workers,
        }


@dataclass(frozen=True)
class Cell:
    """One attack with fixed parameters and seed: the unit the runner executes and records.

    `params` are all the attack's parameters (resolved); `grid` only those the config sets."""

    id: str
    attack: str
    params: dict[str, Any]
    grid: dict[str, Any]
    seed: int
    label: str


# --- the config ----------------------------------------------------------------------------------


def _type_name(kind: type) -> str:
    names = {str: "a string", list: "a list", float: "a number", bool: "true or false"}
    return names.get(kind, "an integer" if kind is int else "a table")


def _check_type(key: str, value: Any, kind: type) -> Any:
    """Return `value` if it has the TOML type `kind` (an integer is a number; a bool is not)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"config key {key!r} must be {_type_name(kind)}, got {value!r}")
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    # The strict reader: size cap, nesting depth bounded, non-finite numbers refused.
    return read_toml_file(path, what="config file", error=ConfigError, max_bytes=MAX_CONFIG_BYTES)


def _attack_specs(path: Path, tables: list[Any], folder: Path) -> tuple[AttackSpec, ...]:
    specs = []
    for i, table in enumerate(tables, start=1):
        where = f"{path}: [[attack]] number {i}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} is not a table")
        for key in table:
            if key not in ATTACK_KEYS:
                raise ConfigError(
                    f"{path}: unknown key {key!r} in [[attack]] number {i} "
                    f"(known: {', '.join(ATTACK_KEYS)})"
                )
        name = table.get("name")
        if not isinstance(name, str):
            raise ConfigError(f'{where} has no name (name = "ATTACK")')
        params = table.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: the params of attack {name!r} must be a table")
        label = table.get("label")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise ConfigError(f"{path}: the label of attack {name!r} must be a non-empty string")
        try:
            attack = get_attack(name)
        except AttackError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        params = dict(params)
        for key, value in params.items():
            try:
                param = attack.param(key)
            except AttackError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            if param.is_path:
                # A file an attack reads is named relative to the config, like the target.
                values = value if isinstance(value, list) else [value]
                fixed = [
                    str(folder / v) if isinstance(v, str) and v and not Path(v).is_absolute() else v
                    for v in values
                ]
                params[key] = fixed if isinstance(value, list) else fixed[0]
        specs.append(AttackSpec(name, params, label))
    return tuple(specs)


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> BenchConfig:
    """Read and check a benchmark config; `overrides` (ticket, credential, secret, device,
    workers; None means "not given") replace its values. The config's paths are relative to its
    folder, the overrides' to the working directory. Every attack and parameter is checked."""
    path = Path(path)
    raw = _read_toml(path)
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: unknown config key {key!r} (known: {', '.join(TOP_KEYS)})")
    values = {k: _check_type(k, v, TOP_KEYS[k]) for k, v in raw.items()}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in overrides:
        if key not in OVERRIDE_KEYS:
            raise ConfigError(f"unknown override {key!r} (known: {', '.join(OVERRIDE_KEYS)})")
    folder = path.resolve().parent
    target = values.pop("target", {})
    for key in target:
        if key not in TARGET_KEYS:
            raise ConfigError(
                f"{path}: unknown key {key!r} in [target] (known: {', '.join(TARGET_KEYS)})"
            )
    files: dict[str, Path] = {}
    for key in TARGET_KEYS:
        if key in overrides:
            files[key] = Path(overrides[key])
        elif key in target:
            files[key] = folder / _check_type(f"target.{key}", target[key], str)
        else:
            raise ConfigError(f"{path}: no target {key}: set [target] {key} or pass --{key}")
        if not files[key].is_file():
            raise ConfigError(f"target {key} {files[key]}: no such file")
    attacks = _attack_specs(path, values.pop("attack", []), folder)
    if not attacks:
        raise ConfigError(f"{path}: the config names no [[attack]]")
    seeds = values.pop("seeds", [0])
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(
            f"config key 'seeds' must be a non-empty list of integers >= 0, got {seeds!r}"
        )
    if "device" in overrides:
        values["device"] = _check_type("device", overrides["device"], str)
    if "workers" in overrides:
        values["workers"] = _check_type("workers", overrides["workers"], int)
    config = BenchConfig(
        name=values.pop("name", path.stem),
        ticket=files["ticket"],
        credential=files["credential"],
        secret=files["secret"],
        attacks=attacks,
        seeds=tuple(seeds),
        **values,
    )
    _check_config(config)
    expand(config)  # every parameter value is checked (and the cells counted) before anything runs
    return config


def _check_config(config: BenchConfig) -> None:
    from ticketguard.tickets.training import resolve_device

    if not 0 < config.alpha < 1:
        raise ConfigError(f"config key 'alpha' must be in (0, 1), got {config.alpha}")
    if not 0 <= config.security_bits <= MAX_SECURITY_BITS:
        raise ConfigError(
            f"config key 'security_bits' must be in 0..{MAX_SECURITY_BITS}, "
            f"got {config.security_bits}"
        )
    if not 0 <= config.max_drop <= 1:
        raise ConfigError(f"config key 'max_drop' must be in [0, 1], got {config.max_drop}")
    if not 0 < config.data_fraction <= 1:
        raise ConfigError(
            f"config key 'data_fraction' must be in (0, 1], got {config.data_fraction}"
        )
    if config.null_samples < 2:
        raise ConfigError(f"config key 'null_samples' must be >= 2, got {config.null_samples}")
    if config.workers < 1:
        raise ConfigError(f"config key 'workers' must be >= 1, got {config.workers}")
    if not config.name or "/" in config.name or "\\" in config.name or config.name[0] == ".":
        raise ConfigError(f"config key 'name' must be a plain name, got {config.name!r}")
    resolve_device(config.device)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cell_id(config: BenchConfig, targets: dict[str, str], **what: Any) -> str:
    """Name a cell by what decides its result: the attack, the target files, the judging."""
    key = {
        **what,
        "targets": targets,
        "alpha": config.alpha,
        "security_bits": config.security_bits,
        "reference": config.reference,
        "blackbox": config.blackbox,
        "null_samples": config.null_samples,
    }
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]


def _config_defaults(attack: Attack, config: BenchConfig, given: dict[str, Any]) -> dict[str, Any]:
    """Fill the parameters the config sets for every attack: the attacker's data share (in
    attacks that train), the significance and security levels (in attacks that verify
    themselves)."""
    filled = dict(given)
    names = {p.name for p in attack.params}
    if attack.needs_data:
        for name in DATA_PARAMS:
            if name in names and name not in filled:
                filled[name] = config.data_fraction
    if "alpha" in names and "alpha" not in filled:
        filled["alpha"] = config.alpha
    if "security_bits" in names and "security_bits" not in filled:
        filled["security_bits"] = config.security_bits
    return filled


def _axes(attack: Attack, config: BenchConfig, spec: AttackSpec) -> dict[str, list[Any]]:
    given = _config_defaults(attack, config, spec.params)
    axes = {k: v if isinstance(v, list) else [v] for k, v in given.items()}
    for k, v in axes.items():
        if not v:
            raise ConfigError(f"attack {spec.name!r}: parameter {k!r} has an empty list")
    return axes


def count_cells(config: BenchConfig) -> int:
    """Return how many cells the grid has, from the axis lengths alone (nothing is expanded).

    Raise ConfigError past `MAX_CELLS`: the product of the axis lengths times the seeds is
    counted before any cell is built, so a huge grid costs nothing to refuse.
    """
    total = 0
    for spec in config.attacks:
        try:
            attack = get_attack(spec.name)
        except AttackError as exc:
            raise ConfigError(str(exc)) from None
        count = len(config.seeds)
        for values in _axes(attack, config, spec).values():
            count *= len(values)
        total += count
        if total > MAX_CELLS:
            break
    if total > MAX_CELLS:
        raise ConfigError(
            f"the config names more than {MAX_CELLS} cells (attacks x parameter values x seeds); "
            "split it into smaller configs"
        )
    return total


def iter_cells(config: BenchConfig) -> Iterator[Cell]:
    """Yield every cell of the grid, in config order (attacks, then axes, then seeds), lazily.

    Only a grid of at most `MAX_CELLS` cells is expanded; a parameter value an attack refuses
    raises ConfigError when its cell is reached."""
    count_cells(config)
    targets = {k: _sha256(getattr(config, k)) for k in TARGET_KEYS}
    for spec in config.attacks:
        attack = get_attack(spec.name)
        axes = _axes(attack, config, spec)
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            grid = dict(zip(keys, combo, strict=True))
            try:
                resolved = attack.resolve(grid)
            except AttackError as exc:
                raise ConfigError(f"attack {spec.name!r}: {exc}") from None
            shown = {k: v for k, v in resolved.items() if k in spec.params}
            for seed in config.seeds:
                cell_id = _cell_id(config, targets, attack=spec.name, params=resolved, seed=seed)
                yield Cell(cell_id, spec.name, resolved, shown, seed, spec.label or spec.name)


def expand(config: BenchConfig) -> list[Cell]:
    """Return every cell of the grid, in config order (attacks, then axes, then seeds).

    The cells are counted first and a grid past `MAX_CELLS` is refused (ConfigError)."""
    cells = []
    ids: set[str] = set()
    for cell in iter_cells(config):
        if cell.id in ids:
            raise ConfigError(
                "the config names the same cell twice (same attack, parameters and seed)"
            )
        ids.add(cell.id)
        cells.append(cell)
    return cells


def baseline_cell(config: BenchConfig) -> Cell:
    """Return the cell that verifies the unattacked target (what each attack starts from)."""
    targets = {k: _sha256(getattr(config, k)) for k in TARGET_KEYS}
    cell_id = _cell_id(config, targets, attack=BASELINE, params={}, seed=0)
    return Cell(cell_id, BASELINE, {}, {}, 0, "no attack (the signed target)")


# --- judging a cell ------------------------------------------------------------------------------


def judge(record: dict[str, Any], max_drop: float) -> dict[str, Any]:
    """Set whether the cell's attack succeeded, by the rule of its kind.

    Verified cells: the owner's evidence is lost (not verified) and the accuracy drop is at
    most `max_drop`. Disputes: the owner is not named the original. Counts: some key verified.
    """
    record = dict(record)
    by = record.get("judged_by")
    if record.get("error") or by is None:
        record["attack_succeeded"] = None
    elif by == BY_DISPUTE:
        record["attack_succeeded"] = record.get("winner") != "owner"
    elif by == BY_COUNT:
        record["attack_succeeded"] = bool((record.get("details") or {}).get("verified", 0) > 0)
    else:
        drop = record.get("drop")
        useful = drop is None or drop <= max_drop + _DROP_SLACK
        record["evidence_survives"] = bool(record.get("verified"))
        record["attack_succeeded"] = (not record.get("verified")) and useful
        if record.get("attack") == BASELINE:
            record["attack_succeeded"] = None
    return record


# --- running one cell (in this process or a worker) -----------------------------------------------

_TARGETS: dict[tuple[str, str], dict[str, Any]] = {}


def _target(shared: Mapping[str, Any]) -> dict[str, Any]:
    """Load the target ticket, its test split and clean accuracy once per process."""
    key = (shared["ticket"], shared["ticket_sha256"])
    if key not in _TARGETS:
        import torch

        from ticketguard.tickets.data import load_data
        from ticketguard.tickets.retrain import dataset_of
        from ticketguard.tickets.ticket import load_ticket
        from ticketguard.tickets.training import evaluate, resolve_device

        device = resolve_device(shared["device"])
        ticket = load_ticket(shared["ticket"])
        name, split_seed = dataset_of(ticket, None)
        shape = ticket.metadata.get("input_shape")
        image_size = int(shape[-1]) if name.startswith("imagefolder:") and shape else None
        splits = load_data(name, split_seed=split_seed, image_size=image_size)
        with torch.inference_mode():
            before = evaluate(ticket.build_model().to(device), splits.test, device)
        _TARGETS.clear()
        _TARGETS[key] = {"ticket": ticket, "test": splits.test, "before": before, "device": device}
    return _TARGETS[key]


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def _accuracy(ticket: Any, target: dict[str, Any]) -> float | None:
    import torch

    from ticketguard.tickets.training import evaluate

    with torch.inference_mode():
        return evaluate(ticket.build_model().to(target["device"]), target["test"], target["device"])


def _evidence(evidences: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": e.name,
            "kind": e.kind,
            "summary": e.summary,
            "log10_p": e.log10_p,
            "work_log2": e.work_log2,
            "valid": e.valid,
            "null": e.null,
            "judged": e.judged,
        }
        for e in evidences
    ]


def mask_unchanged(target: Ticket, attacked: Ticket) -> bool:
    """Return whether an attack kept the target's mask exactly, over the target's masked layers.

    Each side's kept mask is its non-zero weights within its mask (a layer the attacked ticket
    does not mask counts as unmasked). When it is unchanged, W2, which lives in the mask, cannot
    have been affected, so the cell says nothing about W2's robustness.
    """
    for name, mask in target.mask.items():
        weight = attacked.trained.get(name)
        if weight is None or tuple(weight.shape) != tuple(mask.shape):
            return False
        kept = mask.bool() & (target.trained[name] != 0)
        theirs = weight != 0
        if name in attacked.mask:
            theirs = theirs & attacked.mask[name].bool()
        if not bool((kept.cpu() == theirs.cpu()).all()):
            return False
    return True


def _verify(
    shared: Mapping[str, Any], attacked: Any, name: str, target: dict[str, Any]
) -> dict[str, Any]:
    """Verify an attacked model in memory as a judge would (revealed secret, owner's reference)."""
    from ticketguard.tickets.loading import LoadedCheckpoint
    from ticketguard.verify.blackbox import ModelSuspect
    from ticketguard.verify.verification import VerifyConfig, verify

    loaded = LoadedCheckpoint(
        path=Path(name),
        source_format="ticket",
        state=dict(attacked.trained),
        mask=attacked.mask,
        rewind=None,
        metadata=dict(attacked.metadata),
        notes=[],
        ticket=attacked,
    )
    queried = None
    if shared["blackbox"] and shared["has_triggers"]:
        queried = ModelSuspect(attacked.build_model(), target["device"], name)
    report = verify(
        loaded,
        credential=shared["credential"],
        reveal=shared["secret"],
        reference=target["ticket"] if shared["reference"] else None,
        config=VerifyConfig(
            alpha=shared["alpha"],
            null_samples=shared["null_samples"],
            security_bits=shared["security_bits"],
        ),
        blackbox=queried,
    )
    return {
        "judged_by": BY_VERIFICATION,
        "evidence": _evidence(report.evidences),
        "crypto_valid": any(e.valid is True for e in report.evidences if e.kind == "cryptographic"),
        "verified": report.verified,
        "decisive": list(report.verdict.decisive),
        "reason": report.verdict.reason,
        "threshold_log10": report.verdict.threshold_log10,
        "security_bits": report.verdict.security_bits,
        "tests": report.verdict.tests,
        "problems": list(report.problems),
    }


def _dispute(
    shared: Mapping[str, Any], result: Any, cell_id: str, out: str, target: dict[str, Any]
) -> dict[str, Any]:
    """Write the attacker's claim beside the cell and let a dispute decide between the claims."""
    from ticketguard.signatures.signing import output_paths, write_signed
    from ticketguard.verify.dispute import Claim, dispute
    from ticketguard.verify.verification import VerifyConfig

    ticket_path, cred_path, secret_path = output_paths(
        Path(out) / "cells" / cell_id / "attacker.ticket"
    )
    ticket_path.parent.mkdir(parents=True, exist_ok=True)
    write_signed(result.claim, ticket_path)
    claims = [
        Claim(Path(shared["credential"]), Path(shared["secret"]), Path(shared["ticket"]), "owner"),
        Claim(cred_path, secret_path, ticket_path, "attacker"),
    ]
    decided = dispute(
        claims,
        config=VerifyConfig(
            alpha=shared["alpha"],
            null_samples=shared["null_samples"],
            security_bits=shared["security_bits"],
        ),
        blackbox=shared["blackbox"],
        device=target["device"],
    )
    owner_on_copy = decided.matrix[0][1]
    return {
        "judged_by": BY_DISPUTE,
        "evidence": [dict(e) for e in owner_on_copy["evidence"]],
        "crypto_valid": any(e.get("valid") is True for e in owner_on_copy["evidence"]),
        "verified": owner_on_copy["verified"],
        "decisive": list(owner_on_copy.get("decisive") or []),
        "reason": owner_on_copy["reason"],
        "threshold_log10": owner_on_copy["threshold_log10"],
        "security_bits": owner_on_copy["security_bits"],
        "winner": {0: "owner", 1: "attacker"}.get(decided.winner, "undecided"),  # type: ignore[arg-type]
        "attacker_mark_on_original": decided.matrix[1][0]["verified"],
        "reasoning": list(decided.reasoning),
        "claim_files": [str(ticket_path), str(cred_path), str(secret_path)],
    }


def run_cell(
    shared: Mapping[str, Any], job: Mapping[str, Any], attack: Attack | None, out: str
) -> dict[str, Any]:
    """Run one cell and return its record; any failure becomes the record's one-line `error`.

    `attack` is the registered attack itself (None for the baseline), so attacks registered at
    run time reach worker processes too."""
    record: dict[str, Any] = {
        **_record_head(job, attack),
        "strength": attack.strength if attack is not None else None,
        "strength_value": (
            job["params"].get(attack.strength) if attack is not None and attack.strength else None
        ),
        "error": None,
    }
    try:
        target = _target(shared)
        record["accuracy_before"] = target["before"]
        if attack is None:
            attacked, record["seconds_attack"], record["details"] = target["ticket"], 0.0, {}
            result = None
        else:
            start = time.perf_counter()
            result = attack.run(
                target["ticket"],
                dict(job["params"]),
                job["seed"],
                AttackContext(device=target["device"]),
            )
            record["seconds_attack"] = time.perf_counter() - start
            record["details"] = dict(result.details)
            attacked = result.ticket
        start = time.perf_counter()
        if attacked is None:  # a pure measurement: the attack reports its own counts
            record.update(
                {"judged_by": BY_COUNT, "accuracy_after": None, "drop": None, "evidence": []}
            )
            record["verified"] = None
        else:
            after = _accuracy(attacked, target)
            record["accuracy_after"] = after
            if attack is not None:
                record["mask_unchanged"] = mask_unchanged(target["ticket"], attacked)
            before = target["before"]
            record["drop"] = None if after is None or before is None else before - after
            name = f"<{job['attack']} {job['id']}>"
            if attack is not None and attack.makes_claim and result.claim is not None:
                record.update(_dispute(shared, result, job["id"], out, target))
            else:
                record.update(_verify(shared, attacked, name, target))
        record["seconds_verify"] = time.perf_counter() - start
    except TicketGuardError as exc:
        record["error"] = _one_line(str(exc))
    except Exception as exc:  # noqa: BLE001 - a cell's crash is recorded, not the run's end
        record["error"] = f"{type(exc).__name__}: {_one_line(str(exc))}"
    return judge(record, shared["max_drop"])


def _error_record(job: Mapping[str, Any], attack: Attack | None, message: str) -> dict[str, Any]:
    """Record a cell whose worker could not return a result (it died, or could not be sent)."""
    return {**_record_head(job, attack), "error": message, "attack_succeeded": None}


def _record_head(job: Mapping[str, Any], attack: Attack | None) -> dict[str, Any]:
    """Return what every cell record starts with: which cell it is."""
    return {
        "id": job["id"],
        "attack": job["attack"],
        "label": job["label"],
        "kind": attack.kind if attack is not None else None,
        "params": dict(job["params"]),
        "grid": dict(job["grid"]),
        "seed": job["seed"],
    }


# --- the runner ----------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """What a run produced: the baseline and every cell's record (grid order), how many cells
    ran and how many finished ones were kept, the run's time and the files written."""

    config: BenchConfig
    baseline: dict[str, Any]
    cells: list[dict[str, Any]]
    ran: int
    skipped: int
    seconds: float
    outputs: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Return the records that ended in an error (the baseline included)."""
        return [c for c in [self.baseline, *self.cells] if c.get("error")]


def cell_path(out: Path, cell_id: str) -> Path:
    """Return where a finished cell's record lives."""
    return Path(out) / "cells" / f"{cell_id}.json"


def _finished(out: Path, cell: Cell) -> dict[str, Any] | None:
    path = cell_path(out, cell.id)
    if not path.is_file():
        return None
    try:
        record = read_json_file(
            path, what="cell record", error=ConfigError, max_bytes=MAX_CELL_RECORD_BYTES
        )
    except ConfigError:
        return None  # unreadable: the cell runs again
    if not isinstance(record, dict) or record.get("id") != cell.id or record.get("error"):
        return None
    return record


def check_target(config: BenchConfig) -> None:
    """Refuse a target whose credential or secret is unreadable, invalid or not its own.

    The cheap checks, before the target is loaded: the credential is well formed and both of
    its signatures verify, the secret file is well formed, was written for this credential, and
    its seed matches the credential's commitment. Raise TargetError with one line.
    """
    from ticketguard.signatures.credential import read_credential, seed_for

    try:
        credential = read_credential(config.credential)
        if not credential.valid:
            raise TargetError(
                f"target credential {config.credential}: invalid: {credential.problems[0]}; "
                "nothing was run"
            )
        _, problem = seed_for(credential, secret_path=config.secret)
    except CredentialError as exc:
        raise TargetError(f"target: {exc}; nothing was run") from None
    if problem is not None:
        raise TargetError(f"target secret {config.secret}: {problem}; nothing was run")


def _check_baseline(record: Mapping[str, Any]) -> None:
    """Refuse a run whose unattacked target does not verify: no attack could be judged."""
    if record.get("error"):
        raise TargetError(
            f"the unattacked target could not be verified ({record['error']}); nothing was run"
        )
    if not record.get("verified"):
        reason = _one_line(record.get("reason") or "not verified")
        raise TargetError(
            "the unattacked target does not verify with its credential and secret "
            f"({reason}); no attack can be judged against it, nothing was run"
        )


def _shared(config: BenchConfig) -> dict[str, Any]:
    """Return what every cell needs to know, as plain values a worker process can receive."""
    from ticketguard.signatures.credential import read_credential

    doc = read_credential(config.credential).document or {}
    return {
        "ticket": str(config.ticket),
        "ticket_sha256": _sha256(config.ticket),
        "credential": str(config.credential),
        "secret": str(config.secret),
        "alpha": config.alpha,
        "security_bits": config.security_bits,
        "max_drop": config.max_drop,
        "blackbox": config.blackbox,
        "reference": config.reference,
        "null_samples": config.null_samples,
        "device": config.device,
        "has_triggers": isinstance(doc.get("trigger_set"), dict),
    }


def _job(cell: Cell) -> dict[str, Any]:
    return {
        "id": cell.id,
        "attack": cell.attack,
        "params": cell.params,
        "grid": cell.grid,
        "seed": cell.seed,
        "label": cell.label,
    }


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _json_ready(value: Any) -> Any:
    """Return `value` with non-finite floats as strings ('-inf'), so the JSON stays standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    return str(value)


def run_bench(
    config: BenchConfig,
    out: str | Path,
    *,
    fresh: bool = False,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Run the baseline and every unfinished cell (all with `fresh`), record each as it
    finishes, and write the reports. `on_start(pending, kept)` is called once before the first
    cell runs, `on_cell(record)` after each. Ctrl-C stops the run; finished cells stay.

    The target is checked first (`check_target`) and the unattacked target verified (the
    baseline, in this process); a target that is unreadable or does not verify raises
    TargetError before any attack runs, and nothing is written. The run holds the folder's
    lock throughout: a second run on `out` refuses with one line (docs/outputs.md)."""
    from ticketguard.attacks.report import bench_lock

    out = Path(out)
    with bench_lock(out):
        return _run_bench_locked(config, out, fresh=fresh, on_cell=on_cell, on_start=on_start)


def _run_bench_locked(
    config: BenchConfig,
    out: Path,
    *,
    fresh: bool,
    on_cell: Callable[[dict[str, Any]], None] | None,
    on_start: Callable[[int, int], None] | None,
) -> BenchResult:
    from ticketguard.attacks.report import write_reports

    cells = expand(config)
    base = baseline_cell(config)
    attacks = {c.attack: get_attack(c.attack) for c in cells}
    # The target must verify before any attack is judged against it; a run refused here writes
    # nothing (no cell record, no report).
    check_target(config)
    shared = _shared(config)
    baseline_record = None if fresh else _finished(out, base)
    if baseline_record is not None and not baseline_record.get("verified"):
        baseline_record = None  # kept by an older version: judge the target again
    new_baseline = baseline_record is None
    if baseline_record is None:
        baseline_record = _json_ready(run_cell(shared, _job(base), None, str(out)))
    _check_baseline(baseline_record)
    records: dict[str, dict[str, Any]] = {base.id: baseline_record}
    pending: list[Cell] = []
    for cell in cells:
        done = None if fresh else _finished(out, cell)
        if done is not None:
            records[cell.id] = done
        else:
            pending.append(cell)
    ran = len(pending)
    skipped = len(cells) - ran
    if on_start is not None:
        on_start(ran, skipped)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    if new_baseline:
        write_json_atomic(cell_path(out, base.id), baseline_record)
    start = time.perf_counter()

    def finish(record: dict[str, Any]) -> None:
        ready = _json_ready(record)
        write_json_atomic(cell_path(out, record["id"]), ready)
        records[record["id"]] = ready
        if on_cell is not None:
            on_cell(ready)

    work = [(c, attacks.get(c.attack)) for c in pending]
    if config.workers == 1 or len(work) <= 1:
        for cell, attack in work:
            finish(run_cell(shared, _job(cell), attack, str(out)))
    else:
        _run_in_workers(config.workers, shared, work, str(out), finish)
    baseline = judge(records[base.id], config.max_drop)
    ordered = [judge(records[c.id], config.max_drop) for c in cells]
    result = BenchResult(config, baseline, ordered, ran, skipped, time.perf_counter() - start)
    result.outputs = write_reports(ordered, config, out, baseline=baseline)
    return result


def _run_in_workers(
    workers: int,
    shared: dict[str, Any],
    work: list[tuple[Cell, Attack | None]],
    out: str,
    finish: Callable[[dict[str, Any]], None],
) -> None:
    """Run cells in `workers` spawned processes, each with its share of the CPU threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(threads,),
    )
    try:
        futures = {
            pool.submit(run_cell, shared, _job(cell), attack, out): (cell, attack)
            for cell, attack in work
        }
        for future in as_completed(futures):
            cell, attack = futures[future]
            try:
                record = future.result()
            except Exception as exc:  # noqa: BLE001 - a dead worker fails its cell, not the run
                record = _error_record(
                    _job(cell), attack, f"worker failed: {type(exc).__name__}: {_one_line(exc)}"
                )
            finish(record)
    except BaseException:
        # Ctrl-C: the finished cells are on disk; stop the running ones instead of waiting for
        # them (ProcessPoolExecutor has no public way to before Python 3.14).
        running = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in running:
            process.terminate()
        raise
    pool.shutdown(wait=True)
