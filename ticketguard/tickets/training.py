"""Training and evaluation with a fixed mask, applied in place after every optimiser step."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ticketguard.errors import ConfigError, TrainingDivergedError
from ticketguard.tickets.mask import Mask

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and length of one training run (defaults suit the digits task)."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    amp: bool = False
    workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ConfigError("milestones are fractions of training strictly between 0 and 1")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")

    def lr_at(self, iteration: int, total: int) -> float:
        """Return the learning rate at `iteration` of `total`."""
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":
            passed = sum(iteration >= round(m * total) for m in self.milestones)
            return self.lr * self.gamma**passed
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * iteration / max(total, 1)))


def derive_seed(seed: int, *tags: object) -> int:
    """Derive an independent 63-bit seed from a base seed and tags (seed 0 is a seed)."""
    text = ":".join([str(int(seed)), *map(str, tags)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def resolve_device(name: str) -> torch.device:
    """Turn `auto|cpu|cuda|cuda:N` into a device; auto picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r} (use auto, cpu or cuda)")
    return device


@dataclass(frozen=True)
class DistContext:
    """This process's place in a (possibly single-process) data-parallel job."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> DistContext:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


class MaskedParameters:
    """The model parameters a mask covers, with the pruned positions ready for an in-place fill."""

    def __init__(self, model: nn.Module, mask: Mask):
        params = dict(model.named_parameters())
        mask.check_shapes(params)
        self.params = [params[n] for n in mask]
        self.pruned = [~mask[n].to(params[n].device) for n in mask]

    @torch.no_grad()
    def apply(self) -> None:
        """Set every pruned weight to exactly zero in place (a fill, so NaN or inf cannot leak)."""
        for param, pruned in zip(self.params, self.pruned, strict=True):
            param.masked_fill_(pruned, 0.0)


class MagnitudeFloor:
    """Weights that must keep at least a given magnitude, their sign kept (signature carriers)."""

    def __init__(self, model: nn.Module, floors: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = [n for n in floors if n not in params]
        if missing:
            raise ConfigError(f"the model has no parameter {missing[0]!r} to keep strong")
        self.params, self.floors = [], []
        for name, floor in floors.items():
            param = params[name]
            if tuple(floor.shape) != tuple(param.shape):
                raise ConfigError(
                    f"{name}: floor shape {tuple(floor.shape)} is not {tuple(param.shape)}"
                )
            if bool((floor > 0).any()):
                self.params.append(param)
                self.floors.append(floor.to(device=param.device, dtype=param.dtype))

    @torch.no_grad()
    def apply(self) -> None:
        """Raise every weight weaker than its floor to the floor, in place, keeping its sign."""
        for param, floor in zip(self.params, self.floors, strict=True):
            param.copy_(floored(param, floor))


def floored(weight: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Return `weight` with every entry weaker than its floor raised to it, sign kept (+0 is +)."""
    floor = floor.to(device=weight.device, dtype=weight.dtype)
    return torch.where(weight.abs() < floor, torch.copysign(floor, weight), weight)


def iterations_per_epoch(dataset_size: int, batch_size: int) -> int:
    """Return the number of optimiser steps in one epoch (partial last batches dropped)."""
    return max(1, dataset_size // batch_size)


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    if n < batch_size:
        return [perm]
    return list(torch.split(perm[: (n // batch_size) * batch_size], batch_size))


def _batches(
    dataset: Dataset, indices: list[torch.Tensor], workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(dataset, TensorDataset):
        x_all, y_all = dataset.tensors[0], dataset.tensors[1]
        for idx in indices:
            yield x_all[idx], y_all[idx]
        return
    loader = DataLoader(dataset, batch_sampler=[i.tolist() for i in indices], num_workers=workers)
    for x, y in loader:
        yield x, torch.as_tensor(y)


def logits_of(output: Any) -> torch.Tensor:
    """Return the logits of a model's output (torchvision's GoogLeNet and Inception return tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned a {type(output).__name__}, not logits")


def _forked_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@dataclass
class TrainResult:
    """What one training run did."""

    iterations: int
    last_loss: float
    captured: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False


@dataclass(frozen=True)
class ExtraSamples:
    """Samples mixed into every training batch (a trigger set), `per_batch` at a time.

    They are taken in a seeded order that cycles through all of them, a fresh permutation per
    pass, so each is seen equally often; they are never augmented.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    per_batch: int

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels) or len(self.inputs) == 0:
            raise ConfigError("extra samples need as many labels as inputs, and at least one")
        if self.per_batch < 1:
            raise ConfigError(f"extra samples per batch must be >= 1, got {self.per_batch}")

    def stream(self, seed: int) -> Iterator[torch.Tensor]:
        """Yield index batches of `per_batch` forever, cycling through seeded permutations."""
        gen = torch.Generator().manual_seed(derive_seed(seed, "extra"))
        pending = torch.empty(0, dtype=torch.int64)
        while True:
            while len(pending) < self.per_batch:
                pending = torch.cat([pending, torch.randperm(len(self.labels), generator=gen)])
            yield pending[: self.per_batch]
            pending = pending[self.per_batch :]


def train(
    model: nn.Module,
    mask: Mask,
    dataset: Dataset,
    config: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    start_iteration: int = 0,
    capture_at: int | None = None,
    progress: Callable[[int], None] | None = None,
    dist: DistContext | None = None,
    extra: ExtraSamples | None = None,
    epoch_end: Callable[[int], bool] | None = None,
    floors: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train `model` (already on `device`) from `start_iteration` to the end of the schedule.

    The mask is applied in place after every optimiser step, so the stored weights are always
    exactly sparse. When `capture_at` is given, a copy of the state dict at that iteration is
    returned (the rewind point). Batches are a deterministic function of `seed` and the epoch.
    Under an initialised process group, each rank takes its share of every global batch and the
    model should already be wrapped in DistributedDataParallel.

    `extra` samples (a trigger set) are appended to every batch. `epoch_end(epoch)` is called
    after each epoch (0-based) and may return True to stop training there. `floors` (per
    parameter, a least magnitude, 0 where free) are enforced after the mask at every step.
    """
    dist = dist or DistContext.current()
    n = len(dataset)  # type: ignore[arg-type]
    per_epoch = iterations_per_epoch(n, config.batch_size)
    total = per_epoch * config.epochs
    if not 0 <= start_iteration <= total:
        raise ConfigError(f"start iteration {start_iteration} is outside 0..{total}")
    core = model.module if hasattr(model, "module") else model
    masked = MaskedParameters(core, mask)
    masked.apply()
    floor = MagnitudeFloor(core, floors) if floors else None
    if floor is not None:
        floor.apply()

    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    else:
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    captured = None
    iteration = start_iteration
    loss: torch.Tensor | None = None
    stopped = False
    extra_batches = extra.stream(derive_seed(seed, "extra", start_iteration)) if extra else None
    # Augmentation draws from torch's global RNG: seed it, and give the caller's state back after.
    with _forked_rng(device):
        torch.manual_seed(derive_seed(seed, "augment", start_iteration))
        model.train()
        for epoch in range(start_iteration // per_epoch, config.epochs):
            gen = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
            indices = _epoch_batches(n, config.batch_size, gen)
            skip = iteration - epoch * per_epoch
            indices = [idx[dist.rank :: dist.world_size] for idx in indices[skip:]]
            for x, y in _batches(dataset, indices, config.workers):
                if capture_at is not None and iteration == capture_at:
                    captured = {k: v.detach().clone().cpu() for k, v in core.state_dict().items()}
                for group in optimizer.param_groups:
                    group["lr"] = config.lr_at(iteration, total)
                if extra is not None and extra_batches is not None:
                    pick = next(extra_batches)
                    x = torch.cat([x, extra.inputs[pick].to(x.dtype)])
                    y = torch.cat([y, extra.labels[pick].to(y.dtype)])
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    loss = F.cross_entropy(logits_of(model(x)), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                masked.apply()
                if floor is not None:
                    floor.apply()
                iteration += 1
                if progress is not None:
                    progress(1)
            if loss is not None and not bool(torch.isfinite(loss)):
                raise TrainingDivergedError(
                    f"training diverged in epoch {epoch + 1} (loss {float(loss)}); lower the learning rate"
                )
            if epoch_end is not None and epoch_end(epoch):
                stopped = epoch + 1 < config.epochs
                break
        if capture_at is not None and capture_at == total:
            captured = {k: v.detach().clone().cpu() for k, v in core.state_dict().items()}
    last_loss = float(loss.detach()) if loss is not None else float("nan")
    return TrainResult(iteration, last_loss, captured, stopped)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512
) -> float | None:
    """Return top-1 accuracy of `model` on `dataset` (in [0, 1]); None for an empty dataset."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        return None
    was_training = model.training
    model.eval()
    correct = 0
    indices = list(torch.arange(n).split(batch_size))
    for x, y in _batches(dataset, indices, 0):
        pred = logits_of(model(x.to(device))).argmax(dim=1).cpu()
        correct += int((pred == y).sum())
    model.train(was_training)
    return correct / n
