"""Removal attacks: the thief keeps the model and tries to lose the owner's evidence.

Every attack here is a pure function of the stolen ticket, its parameters and a seed, and
returns the attacked model as a new ticket (see `base.attacked_ticket`). Weight-space attacks act
on every conv and linear weight tensor; biases and normalisation parameters are left alone,
since the evidence lives in the weights' topology and their magnitudes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ticketguard.attacks.base import (
    REMOVAL,
    Attack,
    AttackContext,
    AttackError,
    AttackResult,
    Param,
    attack_seed,
    attacked_ticket,
    attacker_subset,
    generator,
    register,
)
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import build_model, classifier_name, prunable_parameters
from ticketguard.tickets.pruning import PruneConfig, prune_magnitude
from ticketguard.tickets.ticket import Ticket, load_state
from ticketguard.tickets.training import TrainConfig, logits_of, train

# --- shared pieces -------------------------------------------------------------------------------


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _weight_names(ticket: Ticket) -> list[str]:
    """Return every conv and linear weight of the ticket's architecture."""
    return prunable_parameters(ticket.build_model())


def attacker_splits(ticket: Ticket, context: AttackContext) -> Any:
    from ticketguard.tickets.data import load_data
    from ticketguard.tickets.retrain import dataset_of

    name, split_seed = dataset_of(ticket, context.dataset)
    shape = ticket.metadata.get("input_shape")
    image_size = int(shape[-1]) if name.startswith("imagefolder:") and shape else None
    return load_data(
        name,
        data_dir=context.data_dir,
        download=context.download,
        split_seed=split_seed,
        image_size=image_size,
    )


def _train_config(ticket: Ticket, epochs: int, lr: float) -> TrainConfig:
    """The owner's recorded batch size and weight decay, a cosine schedule of `epochs`."""
    recorded = ((ticket.metadata.get("finding") or {}).get("config") or {}).get("train") or {}
    base = TrainConfig()
    try:
        batch = int(recorded.get("batch_size", base.batch_size))
        decay = float(recorded.get("weight_decay", base.weight_decay))
    except (TypeError, ValueError):
        batch, decay = base.batch_size, base.weight_decay
    return replace(base, epochs=epochs, lr=lr, batch_size=batch, weight_decay=decay)


@contextlib.contextmanager
def _seeded(seed: int, *tags: object) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, and give the caller's state back after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(attack_seed(seed, *tags))
        yield


def fine_tune_state(
    ticket: Ticket,
    state: dict[str, torch.Tensor],
    mask: Mask,
    *,
    epochs: int,
    lr: float,
    fraction: float,
    seed: int,
    context: AttackContext,
    trainable: set[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train `state` on the attacker's share of the data under `mask` (empty: dense).

    With `trainable`, only those parameters learn and every other tensor is kept as it was.
    """
    if epochs == 0:
        return state, {"samples": 0, "epochs": 0}
    splits = attacker_splits(ticket, context)
    data = attacker_subset(splits.train, fraction, attack_seed(seed, "data"))
    model = ticket.build_model()
    load_state(model, state)
    if trainable is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
    model = model.to(context.device)
    result = train(
        model,
        mask.to(context.device),
        data,
        _train_config(ticket, epochs, lr),
        device=context.device,
        seed=attack_seed(seed, "train"),
        progress=context.progress,
    )
    trained = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if trainable is not None:
        # Only the trainable tensors may change: batch-norm statistics of frozen layers stay too.
        trained = {k: trained[k] if k in trainable else state[k] for k in state}
    return trained, {
        "samples": len(data),  # type: ignore[arg-type]
        "epochs": epochs,
        "last_loss": result.last_loss,
    }


def kept_mask(ticket: Ticket) -> Mask:
    """The stolen ticket's mask restricted to what its weights really keep."""
    return Mask({n: m & (ticket.trained[n] != 0) for n, m in ticket.mask.items()})


# --- fine-tuning ---------------------------------------------------------------------------------

FRACTION = Param(
    "fraction",
    float,
    0.5,
    "Share of the training split the attacker has.",
    minimum=0.001,
    maximum=1.0,
)


def finetune(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Fine-tune with the mask fixed or densely, all layers or the last, the last re-initialised."""
    state = _clone(ticket.trained)
    model = ticket.build_model()
    last = classifier_name(model)
    if last is None and (p["layers"] == "last" or p["reinit_last"]):
        raise AttackError("the model has no linear classifier to fine-tune or re-initialise")
    details: dict[str, Any] = {}
    if p["reinit_last"] and last is not None:
        module = model.get_submodule(last.rsplit(".", 1)[0]) if "." in last else model
        with _seeded(seed, "reinit"):
            module.reset_parameters()  # type: ignore[operator]
        fresh = module.state_dict()
        prefix = last.rsplit(".", 1)[0] + "." if "." in last else ""
        for key, value in fresh.items():
            state[prefix + key] = value.detach().clone()
        details["reinitialised"] = last
    mask = kept_mask(ticket) if p["mode"] == "masked" else Mask({})
    if p["reinit_last"] and last in mask:
        # A re-initialised classifier starts dense; its old pattern means nothing any more.
        mask = Mask({n: m for n, m in mask.items() if n != last})
    trainable = None
    if p["layers"] == "last" and last is not None:
        prefix = last.rsplit(".", 1)[0] + "." if "." in last else ""
        trainable = {k for k in state if k in (prefix + "weight", prefix + "bias")}
    trained, info = fine_tune_state(
        ticket,
        state,
        mask,
        epochs=p["epochs"],
        lr=p["lr"],
        fraction=p["fraction"],
        seed=seed,
        context=context,
        trainable=trainable,
    )
    details.update(info)
    out = attacked_ticket(ticket, trained, attack="finetune", params=p, seed=seed)
    details["surviving_before"] = ticket.mask.num_surviving
    details["surviving_after"] = out.mask.num_surviving
    return AttackResult(out, details)


register(
    Attack(
        "finetune",
        REMOVAL,
        "Fine-tune the stolen model on the attacker's data (mask fixed or dense; FTLL/FTAL/RTLL/RTAL).",
        (
            Param(
                "mode",
                str,
                "masked",
                "masked: pruned weights stay zero; dense: they may regrow.",
                ("masked", "dense"),
            ),
            Param(
                "layers", str, "all", "Train all layers, or only the classifier.", ("all", "last")
            ),
            Param("reinit_last", bool, False, "Re-initialise the classifier first (RTLL/RTAL)."),
            Param(
                "lr", float, 0.01, "Learning rate (cosine schedule).", minimum=1e-8, maximum=10.0
            ),
            Param("epochs", int, 5, "Epochs over the attacker's data.", minimum=0, maximum=10_000),
            FRACTION,
        ),
        finetune,
        strength="epochs",
        needs_data=True,
    )
)


# --- pruning -------------------------------------------------------------------------------------


def _prune_mask(ticket: Ticket, p: dict[str, Any], seed: int) -> Mask:
    mask = kept_mask(ticket)
    if p["method"] == "magnitude":
        scores = {n: ticket.trained[n] for n in mask}
    else:
        gen = generator(seed, "prune")
        scores = {n: torch.rand(m.shape, generator=gen) for n, m in mask.items()}
    return prune_magnitude(scores, mask, PruneConfig(rate=p["rate"], scope=p["scope"]))


def _pruned_state(ticket: Ticket, mask: Mask) -> dict[str, torch.Tensor]:
    state = _clone(ticket.trained)
    mask.apply_(state)
    return state


PRUNE_PARAMS = (
    Param(
        "method",
        str,
        "magnitude",
        "Remove the smallest weights, or random ones.",
        ("magnitude", "random"),
    ),
    Param(
        "scope",
        str,
        "global",
        "One threshold over all layers, or the rate from each layer.",
        ("global", "layerwise"),
    ),
    Param(
        "rate",
        float,
        0.5,
        "Fraction of the surviving weights to remove.",
        minimum=0.0,
        maximum=0.99,
    ),
)


def prune(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Prune a further fraction of the surviving weights (it can only remove)."""
    mask = _prune_mask(ticket, p, seed)
    out = attacked_ticket(ticket, _pruned_state(ticket, mask), attack="prune", params=p, seed=seed)
    before = kept_mask(ticket)
    return AttackResult(
        out,
        {
            "removed": before.num_surviving - mask.num_surviving,
            "surviving_after": mask.num_surviving,
            "removed_per_layer": {n: int(before[n].sum()) - int(mask[n].sum()) for n in mask},
        },
    )


def prune_finetune(
    ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext
) -> AttackResult:
    """Prune, then fine-tune under the new mask to win the accuracy back."""
    mask = _prune_mask(ticket, p, seed)
    trained, info = fine_tune_state(
        ticket,
        _pruned_state(ticket, mask),
        mask,
        epochs=p["epochs"],
        lr=p["lr"],
        fraction=p["fraction"],
        seed=seed,
        context=context,
    )
    out = attacked_ticket(ticket, trained, attack="prune-finetune", params=p, seed=seed)
    info["removed"] = kept_mask(ticket).num_surviving - mask.num_surviving
    return AttackResult(out, info)


register(
    Attack(
        "prune",
        REMOVAL,
        "Prune a further fraction of the surviving weights.",
        PRUNE_PARAMS,
        prune,
        strength="rate",
    )
)
register(
    Attack(
        "prune-finetune",
        REMOVAL,
        "Prune further, then fine-tune under the new mask.",
        PRUNE_PARAMS
        + (
            Param("lr", float, 0.01, "Learning rate of the fine-tune.", minimum=1e-8, maximum=10.0),
            Param("epochs", int, 3, "Fine-tuning epochs.", minimum=0, maximum=10_000),
            FRACTION,
        ),
        prune_finetune,
        strength="rate",
        needs_data=True,
    )
)


# --- regrowth, noise, quantisation, shifting -----------------------------------------------------


def _surviving_std(weight: torch.Tensor) -> float:
    alive = weight[weight != 0].float()
    return float(alive.std()) if alive.numel() > 1 else 0.0


def regrow(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Revive a fraction of each layer's pruned weights with small random values (only adds)."""
    state = _clone(ticket.trained)
    gen = generator(seed, "regrow")
    added: dict[str, int] = {}
    for name in ticket.mask:
        weight = state[name]
        pruned = (weight == 0).flatten().nonzero().squeeze(1)
        count = round(p["fraction"] * len(pruned))
        if count == 0:
            added[name] = 0
            continue
        chosen = pruned[torch.randperm(len(pruned), generator=gen)[:count]]
        std = _surviving_std(weight) or 1.0
        values = torch.randn(count, generator=gen) * (p["scale"] * std)
        # A value of exactly zero would not be a regrown connection.
        values = torch.where(values == 0, torch.full_like(values, p["scale"] * std), values)
        weight.view(-1)[chosen] = values.to(weight.dtype)
        added[name] = count
    out = attacked_ticket(ticket, state, attack="regrow", params=p, seed=seed)
    return AttackResult(out, {"added": sum(added.values()), "added_per_layer": added})


register(
    Attack(
        "regrow",
        REMOVAL,
        "Revive a fraction of the pruned weights with small random values.",
        (
            Param(
                "fraction",
                float,
                0.1,
                "Fraction of each layer's pruned weights revived.",
                minimum=0.0,
                maximum=1.0,
            ),
            Param(
                "scale",
                float,
                0.01,
                "Std of the new weights relative to the layer's surviving weights.",
                minimum=0.0,
                maximum=100.0,
            ),
        ),
        regrow,
        strength="fraction",
    )
)


def noise(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Add Gaussian noise with a std relative to each layer's surviving weights."""
    state = _clone(ticket.trained)
    gen = generator(seed, "noise")
    ratios: dict[str, float] = {}
    for name in _weight_names(ticket):
        weight = state[name]
        std = _surviving_std(weight)
        delta = torch.randn(weight.shape, generator=gen) * (p["sigma"] * std)
        if p["scope"] == "surviving":
            delta = delta * (weight != 0)
        state[name] = weight + delta.to(weight.dtype)
        ratios[name] = std
    out = attacked_ticket(ticket, state, attack="noise", params=p, seed=seed)
    return AttackResult(out, {"layers": len(ratios), "surviving_std": ratios})


register(
    Attack(
        "noise",
        REMOVAL,
        "Add Gaussian noise to every conv and linear weight (std relative to the layer's weights).",
        (
            Param(
                "sigma",
                float,
                0.1,
                "Noise std relative to the std of the layer's surviving weights.",
                minimum=0.0,
                maximum=100.0,
            ),
            Param(
                "scope",
                str,
                "surviving",
                "surviving: non-zero weights only; all: pruned zeros too (the model turns dense).",
                ("surviving", "all"),
            ),
        ),
        noise,
        strength="sigma",
    )
)


def quantize_tensor(
    weight: torch.Tensor, bits: int, granularity: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `weight` quantised to `bits` (16: fp16) and dequantised, and the step (scale) used."""
    if bits == 16:
        q = weight.to(torch.float16).to(weight.dtype)
        return q, (weight - q).abs().max().reshape(1) * 2
    levels = 2 ** (bits - 1) - 1
    flat = (
        weight.detach().abs().reshape(weight.shape[0], -1)
        if granularity == "channel"
        else weight.detach().abs().reshape(1, -1)
    )
    scale = flat.max(dim=1).values / levels
    shape = (-1,) + (1,) * (weight.dim() - 1) if granularity == "channel" else (1,) * weight.dim()
    s = scale.reshape(shape)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(weight / safe).clamp(-levels, levels) * safe
    return torch.where(s > 0, q, weight), scale


def quantize(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Quantise every conv and linear weight to fp16 or symmetric k-bit integers (dequantised)."""
    state = _clone(ticket.trained)
    errors: dict[str, float] = {}
    for name in _weight_names(ticket):
        q, _scale = quantize_tensor(state[name], p["bits"], p["granularity"])
        errors[name] = float((q - state[name]).abs().max())
        state[name] = q
    out = attacked_ticket(ticket, state, attack="quantize", params=p, seed=seed)
    lost = kept_mask(ticket).num_surviving - out.mask.num_surviving
    return AttackResult(out, {"max_error": errors, "rounded_to_zero": lost})


register(
    Attack(
        "quantize",
        REMOVAL,
        "Quantise the weights: fp16 (bits 16) or symmetric k-bit integers, stored dequantised.",
        (
            Param(
                "bits", int, 8, "16 for fp16, else 2..15 bits per weight.", minimum=2, maximum=16
            ),
            Param(
                "granularity",
                str,
                "tensor",
                "One scale per tensor or per output channel.",
                ("tensor", "channel"),
            ),
        ),
        quantize,
        strength="bits",
    )
)


def shift(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Shift each output filter's surviving weights by a random vector, then fine-tune (masked).

    After the weight-shifting attack of Lukas et al. (SoK, 2022): the offset of each filter has
    `shift` times the filter's norm, so every filter moves by the same relative amount.
    """
    state = _clone(ticket.trained)
    gen = generator(seed, "shift")
    for name in _weight_names(ticket):
        weight = state[name]
        alive = (weight != 0).to(weight.dtype)
        direction = torch.randn(weight.shape, generator=gen).to(weight.dtype) * alive
        shape = (-1,) + (1,) * (weight.dim() - 1)
        norm_w = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(shape)
        norm_d = direction.reshape(weight.shape[0], -1).norm(dim=1).reshape(shape)
        scale = torch.where(
            norm_d > 0, p["shift"] * norm_w / norm_d.clamp_min(1e-30), torch.zeros_like(norm_d)
        )
        state[name] = weight + direction * scale
    mask = kept_mask(ticket)
    trained, info = fine_tune_state(
        ticket,
        state,
        mask,
        epochs=p["epochs"],
        lr=p["lr"],
        fraction=p["fraction"],
        seed=seed,
        context=context,
    )
    out = attacked_ticket(ticket, trained, attack="shift", params=p, seed=seed)
    return AttackResult(out, info)


register(
    Attack(
        "shift",
        REMOVAL,
        "Shift every filter by a random offset of a relative norm, then fine-tune (mask fixed).",
        (
            Param(
                "shift",
                float,
                0.1,
                "Norm of each filter's offset relative to the filter's norm.",
                minimum=0.0,
                maximum=100.0,
            ),
            Param(
                "epochs", int, 1, "Fine-tuning epochs after the shift.", minimum=0, maximum=10_000
            ),
            Param("lr", float, 0.01, "Learning rate of the fine-tune.", minimum=1e-8, maximum=10.0),
            FRACTION,
        ),
        shift,
        strength="shift",
        needs_data=True,
    )
)


# --- channel permutation -------------------------------------------------------------------------


def permute(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Shuffle hidden channels by a random function-preserving permutation (residual-consistent)."""
    from ticketguard.signatures.topology import ticket_structure

    if ticket.architecture is None or ticket.num_classes is None:
        raise AttackError("the ticket records no architecture to trace its channels")
    structure = ticket_structure(
        ticket.architecture,
        ticket.num_classes,
        ticket.metadata.get("input_shape"),
        ticket.architecture_kwargs,
    )
    perm = structure.random_permutation(np.random.default_rng(attack_seed(seed, "permute")))
    trained = structure.permute_state(ticket.trained, perm)
    rewind = structure.permute_state(ticket.rewind, perm) if ticket.rewind else None
    out = attacked_ticket(ticket, trained, attack="permute", params=p, seed=seed, rewind=rewind)
    moved = int((perm != np.arange(len(perm))).sum())
    return AttackResult(out, {"moved_channels": moved, "channels": int(len(perm))})


register(
    Attack(
        "permute", REMOVAL, "Shuffle hidden channels without changing the function.", (), permute
    )
)


# --- distillation --------------------------------------------------------------------------------


def _batches(
    data: Dataset, batch_size: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from torch.utils.data import DataLoader, TensorDataset

    n = len(data)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=gen)
    chunks = list(order.split(batch_size)) if n >= batch_size else [order]
    if n >= batch_size and len(chunks[-1]) < batch_size and len(chunks) > 1:
        chunks = chunks[:-1]
    if isinstance(data, TensorDataset):
        for idx in chunks:
            yield data.tensors[0][idx], data.tensors[1][idx]
        return
    for x, y in DataLoader(data, batch_sampler=[c.tolist() for c in chunks]):
        yield x, torch.as_tensor(y)


def distill(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Train a fresh dense student of the same architecture on the stolen model's soft labels."""
    device = context.device
    splits = attacker_splits(ticket, context)
    data = attacker_subset(splits.train, p["fraction"], attack_seed(seed, "data"))
    teacher = ticket.build_model().to(device).eval()
    with _seeded(seed, "student"):
        student: nn.Module = build_model(
            ticket.architecture or "", ticket.num_classes or 10, ticket.architecture_kwargs
        )
    student = student.to(device)
    config = _train_config(ticket, p["epochs"], p["lr"])
    optimizer = torch.optim.SGD(
        student.parameters(), lr=p["lr"], momentum=0.9, weight_decay=config.weight_decay
    )
    per_epoch = max(1, len(data) // config.batch_size)  # type: ignore[arg-type]
    total = per_epoch * p["epochs"]
    temperature, hard = p["temperature"], p["alpha_hard"]
    step, loss = 0, torch.tensor(float("nan"))
    with _seeded(seed, "augment"):
        student.train()
        for epoch in range(p["epochs"]):
            gen = generator(seed, "epoch", epoch)
            for x, y in _batches(data, config.batch_size, gen):
                x, y = x.to(device), y.to(device)
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * p["lr"] * (1 + math.cos(math.pi * step / max(total, 1)))
                with torch.no_grad():
                    soft = F.softmax(logits_of(teacher(x)) / temperature, dim=1)
                logits = logits_of(student(x))
                loss = F.kl_div(
                    F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean"
                ) * (temperature**2)
                if hard > 0:
                    loss = (1 - hard) * loss + hard * F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if context.progress is not None:
                    context.progress(1)
            if not bool(torch.isfinite(loss)):
                raise AttackError(f"distillation diverged in epoch {epoch + 1}; lower --lr")
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    out = attacked_ticket(ticket, state, attack="distill", params=p, seed=seed, rewind=None)
    return AttackResult(
        out,
        {
            "samples": len(data),  # type: ignore[arg-type]
            "epochs": p["epochs"],
            "steps": step,
            "last_loss": float(loss.detach()),
        },
    )


register(
    Attack(
        "distill",
        REMOVAL,
        "Train a fresh dense student on the stolen model's soft labels with the attacker's data.",
        (
            Param("epochs", int, 20, "Training epochs of the student.", minimum=1, maximum=10_000),
            Param(
                "lr",
                float,
                0.05,
                "Learning rate (SGD, cosine schedule).",
                minimum=1e-8,
                maximum=10.0,
            ),
            Param(
                "temperature",
                float,
                4.0,
                "Softmax temperature of the soft labels.",
                minimum=0.01,
                maximum=1000.0,
            ),
            Param(
                "alpha_hard",
                float,
                0.0,
                "Weight of the true labels' cross-entropy in the loss.",
                minimum=0.0,
                maximum=1.0,
            ),
            FRACTION,
        ),
        distill,
        strength="epochs",
        needs_data=True,
    )
)
