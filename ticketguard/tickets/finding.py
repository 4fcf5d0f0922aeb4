"""Finding tickets by iterative magnitude pruning with rewinding (method.md section 2)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ticketguard.documents import read_json_file
from ticketguard.errors import ArchitectureError, ConfigError, RunStateError, TicketFormatError
from ticketguard.files import (
    canonical_json,
    hold_outputs,
    is_housekeeping,
    sha256_hex,
    write_json_atomic,
    writing,
)
from ticketguard.tickets import paths
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import build_model, default_input_shape, select_parameters
from ticketguard.tickets.pruning import PruneConfig, prune_magnitude
from ticketguard.tickets.ticket import Ticket, load_ticket
from ticketguard.tickets.training import (
    DistContext,
    TrainConfig,
    derive_seed,
    evaluate,
    iterations_per_epoch,
    resolve_device,
    train,
)

_REWIND = re.compile(r"^\s*(\d+)\s*(ep|epoch|epochs|it|iter|iters|iterations)?\s*$")


def parse_rewind(text: str) -> tuple[int, str]:
    """Parse a rewind point such as `0`, `3ep` or `500it` into (amount, 'ep'|'it')."""
    match = _REWIND.match(str(text))
    if not match:
        raise ConfigError(f"rewind point {text!r} is not like 0, 3ep or 500it")
    unit = (match.group(2) or "it")[:2]
    return int(match.group(1)), ("ep" if unit == "ep" else "it")


@dataclass(frozen=True)
class FindConfig:
    """Everything that determines a ticket-finding run (hashed to name and check the run)."""

    arch: str = "digits_cnn"
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    rounds: int = 10
    prune: PruneConfig = PruneConfig()
    rewind: str = "0"
    layers: tuple[str, ...] | None = None
    train: TrainConfig = TrainConfig()
    seed: int = 0
    split_seed: int = 0
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ConfigError(f"rounds must be >= 0, got {self.rounds}")
        parse_rewind(self.rewind)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["arch_kwargs"] = dict(self.arch_kwargs)
        data["layers"] = list(self.layers) if self.layers is not None else None
        data["train"]["milestones"] = list(self.train.milestones)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FindConfig:
        try:
            d = dict(data)
            d["prune"] = PruneConfig(**d["prune"])
            t = dict(d["train"])
            t["milestones"] = tuple(t["milestones"])
            d["train"] = TrainConfig(**t)
            d["layers"] = tuple(d["layers"]) if d.get("layers") is not None else None
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"not a valid find configuration: {exc}") from None

    @property
    def config_hash(self) -> str:
        """SHA-256 of the canonical JSON of this configuration."""
        return sha256_hex(canonical_json(self.to_dict()))

    @property
    def run_hash(self) -> str:
        """SHA-256 of everything but the number of rounds: a run may be resumed with more rounds."""
        data = self.to_dict()
        del data["rounds"]
        return sha256_hex(canonical_json(data))

    def rewind_iteration(self, per_epoch: int) -> int:
        amount, unit = parse_rewind(self.rewind)
        it = amount * per_epoch if unit == "ep" else amount
        total = per_epoch * self.train.epochs
        if it >= total:
            raise ConfigError(
                f"rewind point {self.rewind} is not before the end of training ({total} it)"
            )
        return it


class Reporter(Protocol):
    """Receives progress from a run (the CLI draws bars and tables; the library is silent)."""

    def round_started(self, round_index: int, iterations: int) -> None: ...
    def advance(self, steps: int) -> None: ...
    def round_finished(self, record: Mapping[str, Any]) -> None: ...


class SilentReporter:
    """A reporter that says nothing."""

    def round_started(self, round_index: int, iterations: int) -> None:
        pass

    def advance(self, steps: int) -> None:
        pass

    def round_finished(self, record: Mapping[str, Any]) -> None:
        pass


@dataclass
class FindResult:
    """The outcome of a run: the final ticket, the per-round log and where things were written."""

    ticket: Ticket
    rounds: list[dict[str, Any]]
    run_dir: Path


def creation_time() -> str:
    """Return the creation timestamp (UTC, ISO 8601); SOURCE_DATE_EPOCH fixes it for reproducibility."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    core = model.module if hasattr(model, "module") else model
    return {k: v.detach().clone().cpu() for k, v in core.state_dict().items()}


def _check_run_dir(run_dir: Path, config: FindConfig, resume: bool) -> None:
    cfg_path = paths.config_file(run_dir)
    if not cfg_path.exists():
        if run_dir.exists() and not run_dir.is_dir():
            raise RunStateError(f"{run_dir} exists and is not a folder; choose another --out")
        # A run killed before it wrote its configuration leaves only a lock or temporary files.
        if run_dir.exists() and any(not is_housekeeping(p.name) for p in run_dir.iterdir()):
            raise RunStateError(
                f"{run_dir} exists and is not a ticketguard run; choose another --out"
            )
        return
    if not resume:
        raise RunStateError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    stored = _read_config(cfg_path).get("run_hash")
    if not isinstance(stored, str):
        raise RunStateError(f"{cfg_path} records no run_hash; cannot resume")
    if stored != config.run_hash:
        raise RunStateError(
            f"{run_dir} was started with a different configuration; cannot resume with this one "
            "(only --rounds may change)"
        )


def _read_config(cfg_path: Path) -> dict[str, Any]:
    """Read a run's config.json with the strict reader; one-line RunStateError if refused."""
    if not cfg_path.exists():
        raise RunStateError(f"{cfg_path.parent} holds no ticketguard run (no config.json)")
    data = read_json_file(cfg_path, what="run configuration", error=RunStateError)
    if not isinstance(data, dict):
        raise RunStateError(f"{cfg_path} does not hold a find configuration")
    return data


def load_run_config(run_dir: str | Path) -> FindConfig:
    """Read the configuration a run directory was started with."""
    cfg_path = paths.config_file(Path(run_dir))
    data = _read_config(cfg_path)
    if not isinstance(data.get("config"), dict):
        raise RunStateError(f"{cfg_path} does not hold a find configuration")
    return FindConfig.from_dict(data["config"])


def find_ticket(
    config: FindConfig,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    device: str = "auto",
    resume: bool = False,
    reporter: Reporter | None = None,
) -> FindResult:
    """Run iterative magnitude pruning with rewinding and write every round's ticket.

    Round 0 trains the dense network and records the rewind point; each later round prunes
    `config.prune.rate` of the surviving weights by magnitude, rewinds the survivors and retrains
    with the mask fixed. Finished rounds are kept on disk and skipped on resume. Under
    `torchrun`, every rank trains its shard of each batch and only rank 0 writes files, holding
    the run folder's lock: another run on the folder refuses. Each round's ticket and the log
    are committed together (docs/outputs.md); a round file found damaged on resume is redone,
    and every round after it, with a note to the reporter saying which and why.
    """
    reporter = reporter or SilentReporter()
    run_dir = Path(out_dir)
    dist = DistContext.current()
    dev = resolve_device(device)
    if dist.world_size > 1 and dev.type == "cuda":
        dev = torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", dist.rank)) % torch.cuda.device_count()
        )
    _check_run_dir(run_dir, config, resume)
    with contextlib.ExitStack() as held:
        if dist.is_main:
            # The run folder's lock is held for the whole run; an interrupted write of a round is
            # finished or undone and leftover temporary files are removed before anything is read.
            notes: list[str] = []
            held.enter_context(
                hold_outputs(
                    paths.run_key(run_dir),
                    folders=[run_dir, paths.rounds_dir(run_dir)],
                    label=str(run_dir),
                    notes=notes,
                )
            )
            for line in notes:
                _note(reporter, line)
            _check_run_dir(run_dir, config, resume)  # again, under the lock
        _barrier(dist)  # every rank has looked at the folder before rank 0 writes into it
        return _find(config, run_dir, dist, dev, data_dir, download, reporter)


def _note(reporter: Reporter, line: str) -> None:
    """Tell the reporter something about the run folder (reporters without `note` ignore it)."""
    note = getattr(reporter, "note", None)
    if callable(note):
        note(line)


def _find(
    config: FindConfig,
    run_dir: Path,
    dist: DistContext,
    dev: torch.device,
    data_dir: str | Path | None,
    download: bool,
    reporter: Reporter,
) -> FindResult:
    from ticketguard.tickets.data import load_data

    splits = load_data(
        config.dataset,
        data_dir,
        download=download,
        split_seed=config.split_seed,
        image_size=config.image_size,
    )
    model_kwargs = dict(config.arch_kwargs)
    expected = default_input_shape(config.arch)
    if expected is not None and expected[0] != splits.input_shape[0]:
        # Registry models adapt their stem to the data's channel count (e.g. ResNet-20 on MNIST).
        model_kwargs.setdefault("in_channels", splits.input_shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        model = build_model(config.arch, splits.num_classes, model_kwargs, allow_import=True)
    names = select_parameters(model, config.layers)
    model.to(dev)
    _check_fits(model, config, splits, dev)
    train_model: nn.Module = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )

    per_epoch = iterations_per_epoch(len(splits.train), config.train.batch_size)  # type: ignore[arg-type]
    total_iters = per_epoch * config.train.epochs
    rewind_it = config.rewind_iteration(per_epoch)
    if dist.is_main:
        write_json_atomic(
            paths.config_file(run_dir),
            {
                "config": config.to_dict(),
                "config_hash": config.config_hash,
                "run_hash": config.run_hash,
                "pruned_layers": names,
            },
        )
    base_meta = {
        "architecture": {"name": config.arch, "kwargs": model_kwargs},
        "num_classes": splits.num_classes,
        "input_shape": list(splits.input_shape),
        "dataset": {"name": config.dataset, "split_seed": config.split_seed},
        "pruned_layers": names,
    }

    records: list[dict[str, Any]] = []
    ticket: Ticket | None = None
    dense_acc: dict[str, float | None] = {}
    redo_reason: str | None = None  # once a round is redone, every later one is too
    for r in range(config.rounds + 1):
        round_path = paths.round_ticket(run_dir, r)
        if redo_reason is None and round_path.exists():
            try:
                kept = load_ticket(round_path)
            except TicketFormatError as exc:
                # A damaged round file (the writes commit whole rounds, so it was damaged later).
                redo_reason = f"{round_path} is damaged ({str(exc).splitlines()[0][:160]})"
                _note(reporter, f"redoing round {r}: {redo_reason}")
            else:
                ticket = kept
                record = _load_record(run_dir, r) or _record(r, ticket, None, 0.0)
                records.append(record)
                if r == 0:
                    dense_acc = {"val": record["val_accuracy"], "test": record["test_accuracy"]}
                continue
        elif redo_reason is not None and round_path.exists():
            _note(reporter, f"redoing round {r}: it was built on a round that was redone")
        started = time.perf_counter()
        if r == 0:
            mask = Mask.ones_like(dict(model.named_parameters()), names)
            start = 0
        else:
            if ticket is None:
                raise RunStateError(f"{run_dir}: round {r} has no previous round to prune")
            mask = prune_magnitude(ticket.trained, ticket.mask, config.prune)
            model.load_state_dict(ticket.rewind)
            start = rewind_it
        reporter.round_started(r, total_iters - start)
        result = train(
            train_model,
            mask,
            splits.train,
            config.train,
            device=dev,
            seed=derive_seed(config.seed, "round", r),
            start_iteration=start,
            capture_at=rewind_it if r == 0 else None,
            progress=reporter.advance,
            dist=dist,
        )
        rewind_state = result.captured if r == 0 else ticket.rewind  # type: ignore[union-attr]
        val_acc = evaluate(model, splits.val, dev)
        test_acc = evaluate(model, splits.test, dev)
        if r == 0:
            dense_acc = {"val": val_acc, "test": test_acc}
        meta = {
            **base_meta,
            "finding": {"config": config.to_dict(), "config_hash": config.config_hash, "round": r},
            "accuracy": {
                "val": val_acc,
                "test": test_acc,
                "dense_val": dense_acc["val"],
                "dense_test": dense_acc["test"],
            },
            "created": creation_time(),
        }
        ticket = Ticket(mask.to("cpu"), _state(model), rewind_state or {}, meta)
        record = _record(r, ticket, result.last_loss, time.perf_counter() - started)
        if redo_reason is not None:
            record["redone"] = redo_reason
        records.append(record)
        if dist.is_main:
            # The round's ticket and the log that records it are committed together.
            with writing(paths.run_key(run_dir), label=str(run_dir)) as files:
                ticket.save(files.stage(round_path))
                write_json_atomic(files.stage(paths.log_file(run_dir)), _log(config, records, dist))
        _barrier(dist)
        reporter.round_finished(record)

    if ticket is None:  # rounds >= 0, so round 0 always yields a ticket
        raise RunStateError(f"{run_dir}: the run produced no ticket")
    if dist.is_main:
        with writing(paths.run_key(run_dir), label=str(run_dir)) as files:
            ticket.save(files.stage(paths.final_ticket(run_dir)))
            write_json_atomic(files.stage(paths.log_file(run_dir)), _log(config, records, dist))
    _barrier(dist)
    return FindResult(ticket, records, run_dir)


def _check_fits(model: nn.Module, config: FindConfig, splits: Any, device: torch.device) -> None:
    """Run two samples through the model before anything is written, so a misfit fails early."""
    from ticketguard.tickets.training import logits_of

    x = torch.stack([splits.test[i][0] for i in range(min(2, len(splits.test)))])
    model.eval()
    try:
        with torch.no_grad():
            out = logits_of(model(x.to(device)))
    except (RuntimeError, TypeError, ValueError, AssertionError, IndexError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArchitectureError(
            f"{config.arch!r} cannot take {config.dataset!r} inputs of shape "
            f"{tuple(splits.input_shape)}: {detail}"
        ) from None
    finally:
        model.train()
    if out.shape[-1] != splits.num_classes:
        raise ArchitectureError(
            f"{config.arch!r} gives {out.shape[-1]} outputs but {config.dataset!r} has "
            f"{splits.num_classes} classes"
        )


def _record(r: int, ticket: Ticket, loss: float | None, seconds: float) -> dict[str, Any]:
    acc = ticket.metadata.get("accuracy", {})
    return {
        "round": r,
        "density": ticket.mask.density,
        "sparsity": ticket.mask.sparsity,
        "surviving": ticket.mask.num_surviving,
        "total": ticket.mask.num_weights,
        "val_accuracy": acc.get("val"),
        "test_accuracy": acc.get("test"),
        "train_loss": loss if loss is not None and math.isfinite(loss) else None,
        "seconds": round(seconds, 3),
        "layer_density": {s.name: s.density for s in ticket.mask.layer_stats()},
    }


def _load_record(run_dir: Path, r: int) -> dict[str, Any] | None:
    """The log's record of round `r`, or None (no log, an unreadable one, no such record)."""
    try:
        log = read_json_file(paths.log_file(run_dir), what="run log", error=RunStateError)
    except RunStateError:
        return None
    rounds = log.get("rounds") if isinstance(log, dict) else None
    if not isinstance(rounds, list):
        return None
    return next((rec for rec in rounds if isinstance(rec, dict) and rec.get("round") == r), None)


def _log(config: FindConfig, records: list[dict[str, Any]], dist: DistContext) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "config_hash": config.config_hash,
        "world_size": dist.world_size,
        "rounds": records,
    }


def _barrier(dist: DistContext) -> None:
    if dist.world_size > 1:
        import torch.distributed

        torch.distributed.barrier()
