"""Removal attacks: the thief keeps the model and tries to lose the owner's evidence.

Every attack here is a pure function of the stolen ticket, its parameters and a seed, and
returns the attacked model as a new ticket (see `base.attacked_ticket`). The weight-space attacks
(prune, regrow, noise, quantize, shift, permute) act on the conv and linear weight tensors and
leave biases and normalisation parameters alone: the evidence lives in the weights' topology and
magnitudes, and moving batch-norm statistics would only cost the thief accuracy. They run on the
CPU with CPU generators, so a seed gives the same model on any machine (each is a few vectorised
passes over the weights); the attacks that train run on `context.device`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

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
from ticketguard.tickets.training import TrainConfig, iterations_per_epoch, logits_of, train

# --- shared pieces -------------------------------------------------------------------------------


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _weight_names(ticket: Ticket) -> list[str]:
    """Return every conv and linear weight of the ticket's architecture."""
    return prunable_parameters(ticket.build_model())


def attacker_splits(ticket: Ticket, context: AttackContext) -> Any:
    """Load the data splits the ticket records, or the dataset the context names instead."""
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
    """The owner's recorded batch size and weight decay, cosine SGD for `epochs`."""
    recorded = ((ticket.metadata.get("finding") or {}).get("config") or {}).get("train") or {}
    base = TrainConfig()
    try:
        batch = int(recorded.get("batch_size", base.batch_size))
        decay = float(recorded.get("weight_decay", base.weight_decay))
    except (TypeError, ValueError):
        batch, decay = base.batch_size, base.weight_decay
    if batch < 1 or not decay >= 0:
        batch, decay = base.batch_size, base.weight_decay
    return replace(
        base,
        epochs=epochs,
        lr=lr,
        batch_size=batch,
        weight_decay=decay,
        optimizer="sgd",
        schedule="cosine",
    )


@contextlib.contextmanager
def _seeded(seed: int, *tags: object, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with torch's global RNGs (CPU, and `device` if CUDA) seeded, restored after."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(attack_seed(seed, *tags))
        yield


def kept_mask(ticket: Ticket) -> Mask:
    """The stolen ticket's mask restricted to what its weights really keep."""
    return Mask({n: m & (ticket.trained[n] != 0) for n, m in ticket.mask.items()})


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

    With `trainable`, only those parameters learn (the others get no gradient, so neither weight
    decay nor momentum moves them) and every other tensor, batch-norm statistics included, is
    returned as it was.
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
    config = _train_config(ticket, epochs, lr)
    result = train(
        model,
        mask.to(context.device),
        data,
        config,
        device=context.device,
        seed=attack_seed(seed, "train"),
        progress=context.progress,
    )
    trained = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if trainable is not None:
        trained = {k: trained[k] if k in trainable else state[k] for k in state}
    return trained, {
        "samples": len(data),  # type: ignore[arg-type]
        "epochs": epochs,
        "steps": result.iterations,
        "batch_size": config.batch_size,
        "last_loss": result.last_loss,
    }


FRACTION = Param(
    "fraction",
    float,
    0.5,
    "Share of the training split the attacker has.",
    minimum=0.001,
    maximum=1.0,
)
LR = Param("lr", float, 0.01, "Learning rate (cosine schedule).", minimum=1e-8, maximum=10.0)


# --- fine-tuning ---------------------------------------------------------------------------------


def _classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """Return the state-dict prefix and the module of the model's final linear classifier."""
    last = classifier_name(model)
    if last is None:
        raise AttackError("the model has no linear classifier to fine-tune or re-initialise")
    path = last.rsplit(".", 1)[0] if "." in last else ""
    return (path + "." if path else ""), (model.get_submodule(path) if path else model)


def finetune(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Fine-tune with the mask fixed or densely, all layers or the last, the last re-initialised."""
    state = _clone(ticket.trained)
    before = kept_mask(ticket)
    mask = before if p["mode"] == "masked" else Mask({})
    details: dict[str, Any] = {}
    trainable = None
    if p["layers"] == "last" or p["reinit_last"]:
        model = ticket.build_model()
        prefix, module = _classifier(model)
        own = {prefix + k for k, _ in module.named_parameters(recurse=False)}
        if p["layers"] == "last":
            trainable = own
        if p["reinit_last"]:
            with _seeded(seed, "reinit"):
                module.reset_parameters()  # type: ignore[operator]
            state.update({prefix + k: v.detach().clone() for k, v in module.state_dict().items()})
            # A re-initialised classifier starts dense; its old pattern means nothing any more.
            mask = Mask({n: m for n, m in mask.items() if n not in own})
            details["reinitialised"] = prefix + "weight"
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
    details["surviving_before"] = before.num_surviving
    details["surviving_after"] = out.mask.num_surviving
    return AttackResult(out, details)


register(
    Attack(
        "finetune",
        REMOVAL,
        "Fine-tune on the attacker's data (mask fixed or dense; FTLL/FTAL/RTLL/RTAL).",
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
            LR,
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
    """Return the kept mask less `rate` of its entries (the smallest, or random ones)."""
    mask = kept_mask(ticket)
    if p["method"] == "magnitude":
        scores = {n: ticket.trained[n] for n in mask}
    else:
        # Random scores ranked by the same pruner: a uniformly random subset of the survivors.
        gen = generator(seed, "prune")
        scores = {n: torch.rand(m.shape, generator=gen) for n, m in mask.items()}
    return prune_magnitude(scores, mask, PruneConfig(rate=p["rate"], scope=p["scope"]))


def _pruned_state(ticket: Ticket, mask: Mask) -> dict[str, torch.Tensor]:
    state = _clone(ticket.trained)
    for name, m in mask.items():
        state[name] = state[name].masked_fill(~m, 0.0)
    return state


def _removed(before: Mask, after: Mask) -> dict[str, Any]:
    per_layer = {n: int(before[n].sum()) - int(after[n].sum()) for n in before}
    return {
        "removed": sum(per_layer.values()),
        "surviving_before": before.num_surviving,
        "surviving_after": after.num_surviving,
        "removed_per_layer": per_layer,
    }


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
    return AttackResult(out, _removed(kept_mask(ticket), mask))


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
    return AttackResult(out, {**_removed(kept_mask(ticket), mask), **info})


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
            LR,
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
    """Return the std of a tensor's non-zero entries (0.0 with fewer than two)."""
    alive = weight[weight != 0].float()
    return float(alive.std()) if alive.numel() > 1 else 0.0


def regrow(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Revive a fraction of each layer's pruned weights with small random values (only adds).

    New weights are Gaussian with std `scale` times the std of the layer's surviving weights (of
    all masked layers' survivors where a layer has too few); survivors keep their exact values.
    """
    state = _clone(ticket.trained)
    gen = generator(seed, "regrow")
    names = list(ticket.mask)
    survivors = torch.cat([state[n][state[n] != 0].float() for n in names] or [torch.zeros(0)])
    fallback = float(survivors.std()) if survivors.numel() > 1 else 1.0
    added: dict[str, int] = {}
    for name in names:
        weight = state[name]
        pruned = (weight == 0).flatten().nonzero().squeeze(1)
        count = round(p["fraction"] * len(pruned))
        added[name] = count
        if count == 0:
            continue
        chosen = pruned[torch.randperm(len(pruned), generator=gen)[:count]]
        std = p["scale"] * (_surviving_std(weight) or fallback)
        values = torch.randn(count, generator=gen) * std
        # A value of exactly zero would not be a regrown connection (and scale 0 means "tiny").
        values = torch.where(values == 0, torch.full_like(values, max(std, 1e-12)), values)
        weight.view(-1)[chosen] = values.to(weight.dtype)
    out = attacked_ticket(ticket, state, attack="regrow", params=p, seed=seed)
    return AttackResult(
        out,
        {
            "added": sum(added.values()),
            "added_per_layer": added,
            "surviving_after": out.mask.num_surviving,
        },
    )


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
    """Add Gaussian noise to every conv and linear weight, std relative to the layer's survivors.

    Biases and batch-norm parameters and statistics are left alone: they carry no evidence, and
    noising the statistics would only cost the thief accuracy. Scope `all` noises the pruned
    zeros too (the model turns dense); `surviving` noises the non-zero weights only.
    """
    state = _clone(ticket.trained)
    gen = generator(seed, "noise")
    stds: dict[str, float] = {}
    changed = 0
    for name in _weight_names(ticket):
        weight = state[name]
        std = _surviving_std(weight)
        delta = torch.randn(weight.shape, generator=gen).to(weight.dtype) * (p["sigma"] * std)
        if p["scope"] == "surviving":
            delta = delta * (weight != 0)
        state[name] = weight + delta
        stds[name] = std
        changed += int((delta != 0).sum())
    out = attacked_ticket(ticket, state, attack="noise", params=p, seed=seed)
    return AttackResult(
        out,
        {
            "layers": len(stds),
            "noised": changed,
            "surviving_std": stds,
            "surviving_after": out.mask.num_surviving,
        },
    )


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


#: fp16's smallest spacing (its subnormals) and the mantissa bits of its normal numbers.
_FP16_MIN_EXPONENT, _FP16_MANTISSA = -24, 10


def quantize_tensor(
    weight: torch.Tensor, bits: int, granularity: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `weight` quantised to `bits` (16: IEEE fp16) and dequantised, and the step used.

    k-bit is symmetric uniform: 2^(k-1)-1 levels each side of zero at a step of max|w| / levels,
    one step per tensor or per output channel (`granularity`). For fp16 the step is the format's
    spacing at each weight. The step broadcasts against `weight`, and every weight moves by at
    most half its step; zeros stay zeros.
    """
    if bits == 16:
        q = weight.to(torch.float16).to(weight.dtype)
        if not bool(torch.isfinite(q).all()):
            raise AttackError("a weight is too large for fp16 (|w| > 65504); use fewer bits")
        # |w| = m * 2^e with m in [0.5, 1): fp16 spaces that binade 2^(e - 1 - 10) apart.
        exponent = torch.frexp(weight.abs().float()).exponent - 1 - _FP16_MANTISSA
        return q, torch.ldexp(torch.ones_like(q), exponent.clamp_min(_FP16_MIN_EXPONENT))
    levels = 2 ** (bits - 1) - 1
    rows = weight.shape[0] if granularity == "channel" else 1
    shape = (rows,) + (1,) * (weight.dim() - 1) if granularity == "channel" else (1,) * weight.dim()
    step = weight.detach().abs().reshape(rows, -1).amax(dim=1).reshape(shape) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    # |w / step| <= levels by construction, so the clamp only guards rounding at the top level.
    q = torch.round(weight / safe).clamp(-levels, levels) * safe
    return torch.where(step > 0, q, weight), step


def quantize(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Quantise every conv and linear weight to fp16 or symmetric k-bit integers (dequantised)."""
    state = _clone(ticket.trained)
    errors: dict[str, float] = {}
    steps: dict[str, float] = {}
    for name in _weight_names(ticket):
        q, step = quantize_tensor(state[name], p["bits"], p["granularity"])
        errors[name] = float((q - state[name]).abs().max()) if q.numel() else 0.0
        steps[name] = float(step.max()) if step.numel() else 0.0
        state[name] = q
    out = attacked_ticket(ticket, state, attack="quantize", params=p, seed=seed)
    lost = kept_mask(ticket).num_surviving - out.mask.num_surviving
    return AttackResult(
        out,
        {
            "format": "fp16" if p["bits"] == 16 else f"{p['bits']}-bit symmetric",
            "max_error": errors,
            "max_step": steps,
            "rounded_to_zero": lost,
        },
    )


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
                "One scale per tensor or per output channel (k-bit only).",
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
    `shift` times the filter's norm, so every filter moves by the same relative amount and the
    pruned weights stay zero.
    """
    state = _clone(ticket.trained)
    gen = generator(seed, "shift")
    filters = 0
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
        filters += int((norm_d > 0).sum())
    trained, info = fine_tune_state(
        ticket,
        state,
        kept_mask(ticket),
        epochs=p["epochs"],
        lr=p["lr"],
        fraction=p["fraction"],
        seed=seed,
        context=context,
    )
    out = attacked_ticket(ticket, trained, attack="shift", params=p, seed=seed)
    return AttackResult(out, {"shifted_filters": filters, **info})


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
            LR,
            FRACTION,
        ),
        shift,
        strength="shift",
        needs_data=True,
    )
)


# --- channel permutation -------------------------------------------------------------------------


def permute(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Shuffle hidden channels by a random function-preserving permutation (residual-consistent).

    The traced channel structure ties together every channel that must move as one (a residual
    stream, a concatenation), so the trained and the rewind weights, and with them the mask, are
    permuted consistently and the model computes the same function.
    """
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
    """Yield one epoch of shuffled batches (the partial last batch dropped, as in training)."""
    n = len(data)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=gen)
    chunks = [order] if n < batch_size else list(order[: n - n % batch_size].split(batch_size))
    if isinstance(data, TensorDataset):
        for idx in chunks:
            yield data.tensors[0][idx], data.tensors[1][idx]
        return
    for x, y in DataLoader(data, batch_sampler=[c.tolist() for c in chunks]):
        yield x, torch.as_tensor(y)


def distill(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Train a fresh dense student of the same architecture on the stolen model's soft labels.

    The loss is the KL divergence between the teacher's and the student's softened outputs at
    `temperature` T, times T^2 (so its gradients keep their scale), mixed with the true labels'
    cross-entropy at weight `alpha_hard`. SGD with momentum 0.9 and a cosine schedule.
    """
    if ticket.architecture is None or ticket.num_classes is None:
        raise AttackError("the ticket records no architecture to build a student of")
    device = context.device
    splits = attacker_splits(ticket, context)
    data = attacker_subset(splits.train, p["fraction"], attack_seed(seed, "data"))
    teacher = ticket.build_model().to(device).eval()
    with _seeded(seed, "student"):
        student: nn.Module = build_model(
            ticket.architecture, ticket.num_classes, ticket.architecture_kwargs
        )
    student = student.to(device)
    config = _train_config(ticket, p["epochs"], p["lr"])
    optimizer = torch.optim.SGD(
        student.parameters(), lr=p["lr"], momentum=0.9, weight_decay=config.weight_decay
    )
    samples = len(data)  # type: ignore[arg-type]
    total = iterations_per_epoch(samples, config.batch_size) * p["epochs"]
    temperature, hard = p["temperature"], p["alpha_hard"]
    step, loss = 0, torch.tensor(float("nan"))
    # Augmentation and dropout draw from torch's global RNGs: seed them, give them back after.
    with _seeded(seed, "augment", device=device):
        student.train()
        for epoch in range(p["epochs"]):
            for x, y in _batches(data, config.batch_size, generator(seed, "epoch", epoch)):
                x, y = x.to(device), y.to(device)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr_at(step, total)
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
    out = attacked_ticket(ticket, state, attack="distill", params=p, seed=seed)
    return AttackResult(
        out,
        {
            "samples": samples,
            "epochs": p["epochs"],
            "steps": step,
            "batch_size": config.batch_size,
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
