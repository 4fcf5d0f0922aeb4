"""Recover a suspect's mask: explicit masks, else the zero pattern, else the top magnitudes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ticketguard.tickets.loading import LoadedCheckpoint
from ticketguard.tickets.mask import Mask

EXPLICIT, ZERO_PATTERN, TOP_MAGNITUDE = "explicit", "zero pattern", "top magnitude"


def top_magnitude(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Return the bool mask of the `count` largest-magnitude entries (ties broken by position)."""
    flat = weight.detach().abs().reshape(-1).float()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    count = max(0, min(count, flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices
    keep[order[:count]] = True
    return keep.view(weight.shape)


def recover_mask(
    loaded: LoadedCheckpoint,
    names: Sequence[str],
    counts: Mapping[str, int] | None = None,
) -> tuple[Mask, dict[str, str]]:
    """Return the suspect's mask over the `names` it has, and where each layer's mask came from.

    An explicit mask wins. Otherwise the zero pattern is the mask, unless it keeps more weights
    than `counts` says the layer had (the suspect was densely fine-tuned or regrown): then the
    top-`count` magnitudes are.
    """
    masks: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for name in names:
        if loaded.mask is not None and name in loaded.mask:
            masks[name] = loaded.mask[name].cpu()
            sources[name] = EXPLICIT
            continue
        weight = loaded.state.get(name)
        if weight is None or not weight.is_floating_point() or weight.dim() < 2:
            continue
        observed = weight != 0
        expected = None if counts is None else counts.get(name)
        if expected is not None and int(observed.sum()) > expected:
            masks[name] = top_magnitude(weight, expected)
            sources[name] = TOP_MAGNITUDE
        else:
            masks[name] = observed.cpu()
            sources[name] = ZERO_PATTERN
    return Mask(masks), sources
