"""Extreme tickets: thin a ticket by removing magnitude-weighted input-to-output paths.

A walk starts at a random input channel of the first pruned layer and moves layer by layer along
surviving connections, choosing each next channel with probability proportional to the kernel
magnitude `sum |w|` of the connection; every kernel walked through is pruned. Channels tied by a
residual stream count as one, so a walk may continue through any layer reading that stream. The
thinned, retrained ticket has a topology that is hard to reproduce by chance (scheme W1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ticketguard.errors import ConfigError, EmbeddingError
from ticketguard.signatures.structure import ChannelStructure
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.retrain import RetrainConfig, retrain
from ticketguard.tickets.ticket import Ticket


@dataclass
class ThinResult:
    """A thinned ticket and what thinning removed and cost."""

    ticket: Ticket
    walks: int
    removed_kernels: int
    removed_weights: int
    accuracy_before: float | None
    accuracy_after: float | None


def remove_paths(
    structure: ChannelStructure,
    mask: Mask,
    weights: dict[str, torch.Tensor],
    paths: int,
    generator: np.random.Generator,
) -> tuple[Mask, int]:
    """Return the mask with `paths` magnitude-weighted walks pruned, and the walks completed (pure)."""
    if paths < 0:
        raise ConfigError(f"--paths must be >= 0, got {paths}")
    names = [n for n in structure.layers if n in mask and structure.layers[n].groups == 1]
    order = {n: i for i, n in enumerate(structure.layers)}
    if not names:
        raise EmbeddingError("the ticket has no pruned layer to thin")
    classes = structure.tie_class
    kernels = {n: mask[n].reshape(mask[n].shape[0], mask[n].shape[1], -1).clone() for n in names}
    magnitude = {
        n: (weights[n].abs() * mask[n]).reshape(kernels[n].shape).sum(dim=2).double().numpy()
        for n in names
    }
    # For each tie class: the (layer, input columns) that read it.
    readers: dict[int, list[tuple[str, np.ndarray]]] = {}
    for n in names:
        layer = structure.layers[n]
        valid = np.flatnonzero(layer.in_nodes >= 0)
        cls = classes[layer.in_nodes[valid]]
        for c in np.unique(cls):
            readers.setdefault(int(c), []).append((n, valid[cls == c]))
    first = structure.layers[names[0]]
    starts = np.unique(classes[first.in_nodes[first.in_nodes >= 0]])
    completed = 0
    for _ in range(paths):
        current = int(starts[generator.integers(len(starts))])
        steps = 0
        last = -1
        while True:
            # Only layers after the last one walked: a residual stream is read by the block that
            # wrote it too, and a walk must move towards the output.
            options = [(n, cols) for n, cols in readers.get(current, []) if order[n] > last]
            choices: list[tuple[str, int, int]] = []
            weights_list: list[np.ndarray] = []
            for n, cols in options:
                alive = channel_connectivity(kernels[n][:, cols]).numpy()
                w = magnitude[n][:, cols] * alive
                o, j = np.nonzero(w > 0)
                choices += [(n, int(a), int(cols[b])) for a, b in zip(o, j, strict=True)]
                weights_list.append(w[o, j])
            if not choices:
                break
            p = np.concatenate(weights_list)
            pick = choices[int(generator.choice(len(choices), p=p / p.sum()))]
            n, o, i = pick
            kernels[n][o, i] = False
            steps += 1
            layer = structure.layers[n]
            current = int(classes[layer.out_start + o])
            last = order[n]
        completed += int(steps > 0)
    new = dict(mask)
    for n in names:
        new[n] = kernels[n].reshape(mask[n].shape)
    return Mask(new), completed


def thin_ticket(
    ticket: Ticket,
    paths: int,
    config: RetrainConfig,
    *,
    device: torch.device,
    seed: int = 0,
    data_dir: str | Path | None = None,
    download: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ThinResult:
    """Remove `paths` magnitude-weighted paths from the ticket and retrain it with the mask fixed."""
    from ticketguard.signatures.topology import ticket_structure
    from ticketguard.tickets.training import derive_seed

    if ticket.architecture is None or ticket.num_classes is None:
        raise EmbeddingError("the ticket records no architecture; it cannot be thinned")
    structure = ticket_structure(
        ticket.architecture,
        ticket.num_classes,
        ticket.metadata.get("input_shape"),
        ticket.architecture_kwargs,
    )
    generator = np.random.default_rng(derive_seed(seed, "thin"))
    mask, walks = remove_paths(structure, ticket.mask, ticket.trained, paths, generator)
    removed_weights = ticket.mask.num_surviving - mask.num_surviving
    removed_kernels = sum(
        int((channel_connectivity(ticket.mask[n]) & ~channel_connectivity(mask[n])).sum())
        for n in mask
    )
    result = retrain(
        ticket, mask, config, device=device, data_dir=data_dir, download=download, progress=progress
    )
    metadata = dict(ticket.metadata)
    accuracy = dict(metadata.get("accuracy") or {})
    accuracy.update({"test": result.accuracy_after, "unthinned_test": result.accuracy_before})
    accuracy.pop("val", None)
    metadata["accuracy"] = accuracy
    metadata["thinning"] = {
        "paths": paths,
        "walks": walks,
        "seed": seed,
        "removed_kernels": removed_kernels,
        "removed_weights": removed_weights,
        "parent_fingerprint": ticket.fingerprint,
        "retrain": config.to_dict(),
    }
    thinned = Ticket(mask, result.trained, dict(ticket.rewind), metadata)
    return ThinResult(
        thinned,
        walks,
        removed_kernels,
        removed_weights,
        result.accuracy_before,
        result.accuracy_after,
    )
