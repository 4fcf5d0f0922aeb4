"""Retrain a ticket whose mask was changed (signed or thinned), with the new mask fixed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ticketguard.errors import ConfigError, DatasetError
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.ticket import Ticket, load_state
from ticketguard.tickets.training import TrainConfig, derive_seed, evaluate, train

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


@dataclass
class RetrainResult:
    """The retrained weights and the test accuracy before the change and after retraining."""

    trained: dict[str, torch.Tensor]
    accuracy_before: float | None
    accuracy_after: float | None
    dataset: str


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


def starting_state(ticket: Ticket, mask: Mask, start: str) -> dict[str, torch.Tensor]:
    """Return the weights retraining starts from, with the new mask applied.

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
) -> RetrainResult:
    """Retrain `ticket` under `mask` (fixed) and measure test accuracy before and after."""
    from ticketguard.tickets.data import load_data

    name, split_seed = dataset_of(ticket, config.dataset)
    shape = ticket.metadata.get("input_shape")
    image_size = int(shape[-1]) if name.startswith("imagefolder:") and shape else None
    splits = load_data(
        name, data_dir=data_dir, download=download, split_seed=split_seed, image_size=image_size
    )
    model = ticket.build_model().to(device)
    before = evaluate(model, splits.test, device)
    load_state(model, starting_state(ticket, mask, config.start))
    if config.epochs > 0:
        train(
            model,
            mask.to(device),
            splits.train,
            _train_config(ticket, config),
            device=device,
            seed=derive_seed(config.seed, "retrain"),
            progress=progress,
        )
    after = evaluate(model, splits.test, device)
    trained = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    mask.apply_(trained)
    return RetrainResult(trained, before, after, name)
