"""Retrain a ticket whose mask was changed (signed or thinned), with the new mask fixed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ticketguard.errors import ConfigError, DatasetError
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.ticket import Ticket, load_state
from ticketguard.tickets.training import (
    ExtraSamples,
    TrainConfig,
    derive_seed,
    evaluate,
    floored,
    train,
)

STARTS = ("trained", "rewind")


@dataclass(frozen=True)
class RetrainConfig:
    """How a changed ticket is retrained: how long, how fast, from which weights, on what data."""

    epochs: int = 3
    lr: float = 0.01
    start: str = "trained"
    dataset: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"retraining epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"the retraining learning rate must be > 0, got {self.lr}")
        if self.start not in STARTS:
            raise ConfigError(
                f"retraining starts from one of {', '.join(STARTS)}, not {self.start!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "start": self.start,
            "dataset": self.dataset,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class MixedTraining:
    """Retrain with extra samples (a trigger set) in every batch until the model has learnt them.

    Training runs in cosine-annealed cycles of the retraining's own epochs and stops at the end
    of the first cycle where accuracy on the extra samples reaches `target` and validation
    accuracy is at most `tolerance` below the ticket's before retraining, or once `max_epochs`
    (rounded up to whole cycles) have run.
    """

    samples: ExtraSamples
    target: float = 0.95
    tolerance: float = 0.01
    max_epochs: int = 30

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ConfigError(f"the target accuracy must be in (0, 1], got {self.target}")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"the accuracy tolerance must be in [0, 1), got {self.tolerance}")
        if self.max_epochs < 1:
            raise ConfigError(f"the epoch limit must be >= 1, got {self.max_epochs}")


@dataclass
class RetrainResult:
    """The retrained weights and the test accuracy before the change and after retraining.

    With mixed-in samples it also says how well they were learnt (`extra_accuracy`), whether
    the stopping rule was met (`reached`), after which epoch the weights were kept
    (`kept_epoch`) and, per cycle, the accuracy on them and on the validation split (`history`).
    """

    trained: dict[str, torch.Tensor]
    accuracy_before: float | None
    accuracy_after: float | None
    dataset: str
    epochs: int = 0
    extra_accuracy: float | None = None
    reached: bool | None = None
    val_before: float | None = None
    history: list[dict[str, float | None]] | None = None
    kept_epoch: int | None = None


def dataset_of(ticket: Ticket, override: str | None) -> tuple[str, int]:
    """Return the dataset spec and split seed a ticket was found on (or the override)."""
    recorded = ticket.metadata.get("dataset") or {}
    name = override or recorded.get("name")
    if not name:
        raise DatasetError("the ticket records no dataset; name one with --dataset")
    return name, int(recorded.get("split_seed", 0))


def _train_config(ticket: Ticket, config: RetrainConfig) -> TrainConfig:
    recorded = ((ticket.metadata.get("finding") or {}).get("config") or {}).get("train") or {}
    base = TrainConfig()
    try:
        batch = int(recorded.get("batch_size", base.batch_size))
        decay = float(recorded.get("weight_decay", base.weight_decay))
    except (TypeError, ValueError):
        batch, decay = base.batch_size, base.weight_decay
    return replace(
        base,
        epochs=max(config.epochs, 1),
        lr=config.lr,
        batch_size=batch,
        weight_decay=decay,
        schedule="cosine",
        optimizer="sgd",
    )


def starting_state(
    ticket: Ticket,
    mask: Mask,
    start: str,
    floors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Return the weights retraining starts from, with the new mask (and floors) applied.

    From `trained`, entries the new mask switches on take their rewind values (they were zero),
    so they rejoin at initialisation scale; from `rewind`, the ticket restarts like an IMP round.
    """
    if start == "rewind" or not ticket.rewind:
        state = {k: v.clone() for k, v in (ticket.rewind or ticket.trained).items()}
    else:
        state = {k: v.clone() for k, v in ticket.trained.items()}
        for name, m in mask.items():
            revived = m & ~ticket.mask[name] if name in ticket.mask else m
            if ticket.rewind and revived.any():
                state[name][revived] = ticket.rewind[name][revived].to(state[name].dtype)
    mask.apply_(state)
    for name, floor in (floors or {}).items():
        state[name] = floored(state[name], floor)
    return state


def retrain(
    ticket: Ticket,
    mask: Mask,
    config: RetrainConfig,
    *,
    device: torch.device,
    data_dir: str | Path | None = None,
    download: bool = False,
    progress: Callable[[int], None] | None = None,
    mixed: MixedTraining | None = None,
    floors: Mapping[str, torch.Tensor] | None = None,
) -> RetrainResult:
    """Retrain `ticket` under `mask` (fixed) and measure test accuracy before and after.

    With `mixed`, its samples join every batch and training runs until they are learnt (see
    MixedTraining); otherwise it is `config.epochs` of cosine-annealed SGD. `floors` (per
    weight, a least magnitude) are held through the whole retraining (signature carriers).
    """
    from ticketguard.tickets.data import load_data

    name, split_seed = dataset_of(ticket, config.dataset)
    shape = ticket.metadata.get("input_shape")
    image_size = int(shape[-1]) if name.startswith("imagefolder:") and shape else None
    splits = load_data(
        name, data_dir=data_dir, download=download, split_seed=split_seed, image_size=image_size
    )
    model = ticket.build_model().to(device)
    before = evaluate(model, splits.test, device)
    load_state(model, starting_state(ticket, mask, config.start, floors))
    if mixed is not None:
        return _retrain_mixed(
            ticket, mask, config, mixed, model, splits, device, before, progress, floors
        )
    if config.epochs > 0:
        train(
            model,
            mask.to(device),
            splits.train,
            _train_config(ticket, config),
            device=device,
            seed=derive_seed(config.seed, "retrain"),
            progress=progress,
            floors=floors,
        )
    after = evaluate(model, splits.test, device)
    trained = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    mask.apply_(trained)
    return RetrainResult(trained, before, after, name, epochs=config.epochs)


def _retrain_mixed(
    ticket: Ticket,
    mask: Mask,
    config: RetrainConfig,
    mixed: MixedTraining,
    model: torch.nn.Module,
    splits: Any,
    device: torch.device,
    before: float | None,
    progress: Callable[[int], None] | None,
    floors: Mapping[str, torch.Tensor] | None = None,
) -> RetrainResult:
    """Train in cosine cycles of `config.epochs` (warm restarts) until the rule is met.

    The rule is checked at the end of each cycle, where the learning rate has annealed to
    zero and clean accuracy has recovered from the noisier middle of the cycle. If no cycle
    meets it, the weights of the best cycle are kept: clean accuracy within the tolerance
    first, then the highest accuracy on the extra samples, then the earliest.
    """
    extra = TensorDataset(mixed.samples.inputs, mixed.samples.labels)
    val_before = evaluate(ticket.build_model().to(device), splits.val, device)
    cycle = max(config.epochs, 1)
    cycles = max(1, -(-mixed.max_epochs // cycle))
    history: list[dict[str, float | None]] = []
    train_config = replace(_train_config(ticket, config), epochs=cycle, schedule="cosine")
    device_mask = mask.to(device)
    best: tuple[tuple[bool, float], int, dict[str, torch.Tensor]] | None = None
    for k in range(cycles):
        train(
            model,
            device_mask,
            splits.train,
            train_config,
            device=device,
            seed=derive_seed(config.seed, "retrain", "cycle", k),
            progress=progress,
            extra=mixed.samples,
            floors=floors,
        )
        entry = {
            "epoch": (k + 1) * cycle,
            "extra": evaluate(model, extra, device),
            "val": evaluate(model, splits.val, device),
        }
        history.append(entry)
        if _meets(entry, mixed, val_before):
            best = None
            break
        rank = (_clean_ok(entry, mixed, val_before), entry["extra"] or 0.0)
        if best is None or rank > best[0]:
            state = {n: v.detach().cpu().clone() for n, v in model.state_dict().items()}
            best = (rank, k, state)
    kept = len(history) - 1
    if best is not None and best[1] != kept:
        kept = best[1]
        model.load_state_dict(best[2])
    after = evaluate(model, splits.test, device)
    trained = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    mask.apply_(trained)
    return RetrainResult(
        trained,
        before,
        after,
        splits.name,
        epochs=len(history) * cycle,
        extra_accuracy=history[kept]["extra"],
        reached=_meets(history[kept], mixed, val_before),
        val_before=val_before,
        history=history,
        kept_epoch=(kept + 1) * cycle,
    )


def _clean_ok(
    entry: dict[str, float | None], mixed: MixedTraining, val_before: float | None
) -> bool:
    val = entry["val"]
    return val is None or val_before is None or val >= val_before - mixed.tolerance


def _meets(last: dict[str, float | None], mixed: MixedTraining, val_before: float | None) -> bool:
    """Return whether an epoch's accuracies meet the stopping rule of `mixed`."""
    extra = last["extra"]
    return extra is not None and extra >= mixed.target and _clean_ok(last, mixed, val_before)
