"""The robustness benchmark: run a grid of attacks on a signed ticket and verify every result.

A TOML config names the target (signed ticket, credential, revealed secret), the attacks with
their parameter grids (a list is an axis; the cells are the product of all axes and the seeds)
and how each attacked model is judged. Each finished cell is a JSON file in `OUT/cells/`, so a
re-run skips it; cells run in worker processes with `workers > 1`. See docs/benchmark.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ticketguard.attacks.base import AMBIGUITY, AttackContext, AttackError, get_attack
from ticketguard.errors import ConfigError, TicketGuardError
from ticketguard.files import canonical_json, write_json_atomic

#: Attacks whose result is a claim settled by a dispute, and the pure measurement.
CLAIM_ATTACKS = ("forge", "fake-triggers")
MEASUREMENT_ATTACKS = ("key-search",)

TOP_KEYS = {
    "name": str,
    "seeds": list,
    "alpha": float,
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
#: Parameters that mean "the attacker's share of the training data".
FRACTION_PARAMS = ("fraction", "data_fraction")


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
    max_drop: float = 0.05
    data_fraction: float = 0.5
    blackbox: bool = True
    reference: bool = True
    null_samples: int = 5
    device: str = "auto"
    workers: int = 1

    def to_dict(self) -> dict[str, Any]:
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
    """One attack with fixed parameters and seed: the unit the runner executes and records."""

    id: str
    attack: str
    params: dict[str, Any]
    grid: dict[str, Any]
    seed: int
    label: str


def _type_name(kind: type) -> str:
    return {str: "a string", list: "a list", float: "a number", bool: "true or false"}.get(
        kind, "an integer" if kind is int else "a table"
    )


def _check_type(key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"config key {key!r} must be {_type_name(kind)}, got {value!r}")
    return value


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> BenchConfig:
    """Read and check a benchmark config; `overrides` (ticket, credential, secret, device,
    workers) replace its values. Paths are relative to the config file's folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: unknown config key {key!r} (known: {', '.join(TOP_KEYS)})")
    values = {k: _check_type(k, v, TOP_KEYS[k]) for k, v in raw.items()}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    target = dict(values.pop("target", {}))
    for key in target:
        if key not in TARGET_KEYS:
            raise ConfigError(
                f"{path}: unknown key {key!r} in [target] (known: ticket, credential, secret)"
            )
    folder = path.resolve().parent
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
    attacks = []
    for i, table in enumerate(values.pop("attack", [])):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [[attack]] number {i + 1} is not a table")
        for key in table:
            if key not in ATTACK_KEYS:
                raise ConfigError(f"{path}: unknown key {key!r} in [[attack]] number {i + 1}")
        name = table.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{path}: [[attack]] number {i + 1} has no name")
        params = table.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: the params of attack {name!r} must be a table")
        label = table.get("label")
        if label is not None and not isinstance(label, str):
            raise ConfigError(f"{path}: the label of attack {name!r} must be a string")
        attacks.append(AttackSpec(name, dict(params), label))
    if not attacks:
        raise ConfigError(f"{path}: the config names no [[attack]]")
    seeds = values.pop("seeds", [0])
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError("config key 'seeds' must be a non-empty list of integers >= 0")
    for key in ("device", "workers"):
        if key in overrides:
            values[key] = overrides[key]
    config = BenchConfig(
        name=values.pop("name", path.stem),
        ticket=files["ticket"],
        credential=files["credential"],
        secret=files["secret"],
        attacks=tuple(attacks),
        seeds=tuple(seeds),
        **values,
    )
    _check_config(config)
    expand(config)  # every attack and parameter is checked before anything runs
    return config


def _check_config(config: BenchConfig) -> None:
    if not 0 < config.alpha < 1:
        raise ConfigError(f"config key 'alpha' must be in (0, 1), got {config.alpha}")
    if not 0 <= config.max_drop <= 1:
        raise ConfigError(f"config key 'max_drop' must be in [0, 1], got {config.max_drop}")
    if not 0 < config.data_fraction <= 1:
        raise ConfigError(
            f"config key 'data_fraction' must be in (0, 1], got {config.data_fraction}"
        )
    if config.null_samples < 2:
        raise ConfigError(f"config key 'null_samples' must be >= 2, got {config.null_samples}")
    if config.workers < 1:
        raise ConfigError(f"the number of workers must be >= 1, got {config.workers}")
    if not config.name or "/" in config.name or config.name.startswith("."):
        raise ConfigError(f"config key 'name' must be a plain name, got {config.name!r}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expand(config: BenchConfig) -> list[Cell]:
    """Return every cell of the grid, in config order (attacks, then axes, then seeds)."""
    targets = {k: _sha256(getattr(config, k)) for k in TARGET_KEYS}
    cells = []
    for spec in config.attacks:
        try:
            attack = get_attack(spec.name)
        except AttackError as exc:
            raise ConfigError(str(exc)) from None
        given = dict(spec.params)
        for name in FRACTION_PARAMS:
            if name not in given and any(p.name == name for p in attack.params):
                given[name] = config.data_fraction
        axes = {k: v if isinstance(v, list) else [v] for k, v in given.items()}
        for k, v in axes.items():
            if not v:
                raise ConfigError(f"attack {spec.name!r}: parameter {k!r} has an empty list")
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            grid = dict(zip(keys, combo, strict=True))
            resolved = attack.resolve(grid)
            for seed in config.seeds:
                key = {
                    "attack": spec.name,
                    "params": resolved,
                    "seed": seed,
                    "targets": targets,
                    "alpha": config.alpha,
                    "reference": config.reference,
                    "blackbox": config.blackbox,
                    "null_samples": config.null_samples,
                }
                cell_id = hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]
                shown = {
                    k: v for k, v in grid.items() if k not in FRACTION_PARAMS or k in spec.params
                }
                label = spec.label or spec.name
                cells.append(Cell(cell_id, spec.name, resolved, shown, seed, label))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise ConfigError("the config names the same cell twice (same attack, parameters and seed)")
    return cells


# --- running one cell ----------------------------------------------------------------------------

_CACHE: dict[str, Any] = {}


def _target(config: dict[str, Any]) -> dict[str, Any]:
    """Load the target ticket, its test split and clean accuracy once per process."""
    key = config["ticket"]
    if key not in _CACHE:
        import torch

        from ticketguard.tickets.data import load_data
        from ticketguard.tickets.retrain import dataset_of
        from ticketguard.tickets.ticket import load_ticket
        from ticketguard.tickets.training import evaluate, resolve_device

        device = resolve_device(config["device"])
        ticket = load_ticket(key)
        name, split_seed = dataset_of(ticket, None)
        shape = ticket.metadata.get("input_shape")
        image_size = int(shape[-1]) if name.startswith("imagefolder:") and shape else None
        splits = load_data(name, split_seed=split_seed, image_size=image_size)
        with torch.no_grad():
            before = evaluate(ticket.build_model().to(device), splits.test, device)
        _CACHE.clear()
        _CACHE[key] = {"ticket": ticket, "test": splits.test, "before": before, "device": device}
    return _CACHE[key]


def _evidence(report: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": e.name,
            "kind": e.kind,
            "summary": e.summary,
            "log10_p": e.log10_p,
            "valid": e.valid,
            "null": e.null,
        }
        for e in report.evidences
    ]


def _verify(
    config: dict[str, Any], attacked: Any, cell_id: str, target: dict[str, Any]
) -> dict[str, Any]:
    from ticketguard.tickets.loading import LoadedCheckpoint
    from ticketguard.verify.blackbox import ModelSuspect
    from ticketguard.verify.verification import VerifyConfig, verify

    loaded = LoadedCheckpoint(
        Path(f"<{cell_id}>"),
        "ticket",
        dict(attacked.trained),
        attacked.mask,
        None,
        dict(attacked.metadata),
        [],
        attacked,
    )
    queried = None
    if config["blackbox"] and config["has_triggers"]:
        queried = ModelSuspect(attacked.build_model(), target["device"], f"<{cell_id}>")
    report = verify(
        loaded,
        credential=config["credential"],
        reveal=config["secret"],
        reference=target["ticket"] if config["reference"] else None,
        config=VerifyConfig(alpha=config["alpha"], null_samples=config["null_samples"]),
        blackbox=queried,
    )
    return {
        "evidence": _evidence(report),
        "crypto_valid": any(e.valid is True for e in report.evidences if e.kind == "cryptographic"),
        "verified": report.verified,
        "reason": report.verdict.reason,
        "threshold_log10": report.verdict.threshold_log10,
        "problems": list(report.problems),
    }


def run_cell(config: dict[str, Any], cell: dict[str, Any], out: str) -> dict[str, Any]:
    """Run one cell and return its record; an error becomes the record's `error`."""
    from ticketguard.attacks.base import run_attack
    from ticketguard.tickets.training import evaluate

    record: dict[str, Any] = {
        "id": cell["id"],
        "attack": cell["attack"],
        "label": cell["label"],
        "params": cell["params"],
        "grid": cell["grid"],
        "seed": cell["seed"],
        "error": None,
    }
    attack = get_attack(cell["attack"])
    record["kind"] = attack.kind
    record["strength"] = attack.strength
    record["strength_value"] = cell["params"].get(attack.strength) if attack.strength else None
    try:
        target = _target(config)
        context = AttackContext(device=target["device"])
        record["accuracy_before"] = target["before"]
        result = run_attack(
            cell["attack"], target["ticket"], cell["params"], seed=cell["seed"], context=context
        )
        record["seconds_attack"] = result.seconds
        record["details"] = result.details
        start = time.perf_counter()
        if cell["attack"] in MEASUREMENT_ATTACKS:
            record.update(
                {
                    "accuracy_after": None,
                    "drop": None,
                    "evidence": [],
                    "verified": None,
                    "attack_succeeded": bool(result.details.get("verified", 0) > 0),
                }
            )
        else:
            model = result.ticket.build_model().to(target["device"])
            after = evaluate(model, target["test"], target["device"])
            record["accuracy_after"] = after
            record["drop"] = (
                None if after is None or target["before"] is None else target["before"] - after
            )
            if cell["attack"] in CLAIM_ATTACKS:
                record.update(_dispute(config, result, cell, out, target))
            else:
                record.update(_verify(config, result.ticket, cell["id"], target))
                ok = record["drop"] is None or record["drop"] <= config["max_drop"]
                record["evidence_survives"] = record["verified"]
                record["attack_succeeded"] = (not record["verified"]) and ok
        record["seconds_verify"] = time.perf_counter() - start
    except TicketGuardError as exc:
        record["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - a cell's crash is recorded, not the run's end
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        record["error"] = f"{type(exc).__name__}: {first}"
    return record


def _dispute(
    config: dict[str, Any], result: Any, cell: dict[str, Any], out: str, target: dict[str, Any]
) -> dict[str, Any]:
    from ticketguard.signatures.signing import write_signed
    from ticketguard.verify.dispute import Claim, dispute
    from ticketguard.verify.verification import VerifyConfig

    folder = Path(out) / "claims" / cell["id"]
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / "attacker.ticket"
    write_signed(result.claim, stem)
    claims = [
        Claim(Path(config["credential"]), Path(config["secret"]), Path(config["ticket"]), "owner"),
        Claim(folder / "attacker.cred.json", folder / "attacker.secret.json", stem, "attacker"),
    ]
    decided = dispute(
        claims,
        config=VerifyConfig(alpha=config["alpha"]),
        blackbox=config["blackbox"],
        device=target["device"],
    )
    winner = {0: "owner", 1: "attacker"}.get(decided.winner, "undecided")  # type: ignore[arg-type]
    owner_on_copy = decided.matrix[0][1]
    return {
        "evidence": owner_on_copy["evidence"],
        "crypto_valid": any(e["valid"] is True for e in owner_on_copy["evidence"]),
        "verified": owner_on_copy["verified"],
        "reason": owner_on_copy["reason"],
        "winner": winner,
        "reasoning": decided.reasoning,
        "attack_succeeded": winner != "owner",
    }


# --- the runner ----------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """What a run produced: every cell's record (in grid order), how many ran and were skipped."""

    config: BenchConfig
    cells: list[dict[str, Any]]
    ran: int
    skipped: int
    seconds: float
    outputs: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.cells if c.get("error")]


def _cell_path(out: Path, cell_id: str) -> Path:
    return out / "cells" / f"{cell_id}.json"


def _finished(out: Path, cell: Cell) -> dict[str, Any] | None:
    path = _cell_path(out, cell.id)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("id") == cell.id and not record.get("error") else None


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    from ticketguard.signatures.credential import read_credential

    doc = read_credential(config.credential).document or {}
    return {
        "ticket": str(config.ticket),
        "credential": str(config.credential),
        "secret": str(config.secret),
        "alpha": config.alpha,
        "max_drop": config.max_drop,
        "blackbox": config.blackbox,
        "reference": config.reference,
        "null_samples": config.null_samples,
        "device": config.device,
        "has_triggers": isinstance(doc.get("trigger_set"), dict),
    }


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_bench(
    config: BenchConfig,
    out: str | Path,
    *,
    fresh: bool = False,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Run every unfinished cell (all with `fresh`), record each, and write the reports."""
    from ticketguard.attacks.report import write_reports

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells").mkdir(exist_ok=True)
    cells = expand(config)
    records: dict[str, dict[str, Any]] = {}
    pending = []
    for cell in cells:
        done = None if fresh else _finished(out, cell)
        if done is not None:
            records[cell.id] = done
        else:
            pending.append(cell)
    if on_start is not None:
        on_start(len(pending), len(cells) - len(pending))
    shared = _config_dict(config)
    start = time.perf_counter()

    def finish(record: dict[str, Any]) -> None:
        write_json_atomic(_cell_path(out, record["id"]), _json_ready(record))
        records[record["id"]] = json.loads(_cell_path(out, record["id"]).read_text("utf-8"))
        if on_cell is not None:
            on_cell(record)

    jobs = [
        {
            "id": c.id,
            "attack": c.attack,
            "params": c.params,
            "grid": c.grid,
            "seed": c.seed,
            "label": c.label,
        }
        for c in pending
    ]
    if config.workers == 1 or len(jobs) <= 1:
        for job in jobs:
            finish(run_cell(shared, job, str(out)))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // config.workers)
        with ProcessPoolExecutor(
            max_workers=config.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(threads,),
        ) as pool:
            futures = [pool.submit(run_cell, shared, job, str(out)) for job in jobs]
            try:
                for future in as_completed(futures):
                    finish(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    ordered = [records[c.id] for c in cells]
    result = BenchResult(
        config, ordered, len(pending), len(cells) - len(pending), time.perf_counter() - start
    )
    result.outputs = write_reports(ordered, config, out)
    return result


def _json_ready(value: Any) -> Any:
    """Return `value` with non-finite floats as strings, so the JSON stays standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    return str(value)


def grid_size(configs: Iterable[Cell]) -> int:
    """Return how many cells a grid has."""
    return sum(1 for _ in configs)


def is_ambiguity(attack: str) -> bool:
    """Return whether an attack is an ambiguity attack (judged by disputes or counts)."""
    return get_attack(attack).kind == AMBIGUITY
