"""Recover a suspect's mask: explicit masks and the zero pattern, else the top magnitudes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ticketguard.tickets.loading import LoadedCheckpoint
from ticketguard.tickets.mask import Mask

EXPLICIT, ZERO_PATTERN, TOP_MAGNITUDE = "explicit", "zero pattern", "top magnitude"


def top_magnitude(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Return the bool mask of the `count` largest-magnitude entries (ties broken by position)."""
    return top_magnitude_scores(weight.detach().abs().float().nan_to_num(nan=0.0), count)


def top_magnitude_scores(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Return the bool mask of the `count` highest scores (-inf never chosen before a finite)."""
    flat = scores.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    count = max(0, min(count, int(torch.isfinite(flat).sum() + (flat == float("inf")).sum())))
    order = torch.sort(flat, descending=True, stable=True).indices
    keep[order[:count]] = True
    return keep.view(scores.shape)


def recover_mask(
    loaded: LoadedCheckpoint,
    names: Sequence[str],
    counts: Mapping[str, int] | None = None,
) -> tuple[Mask, dict[str, str]]:
    """Return the suspect's mask over the `names` it has, and where each layer's mask came from.

    A weight counts as present where it is non-zero and, if the file has an explicit mask, the
    mask keeps it: an explicit mask can hide entries but cannot revive zeros (an all-ones mask
    over the signed weights computes the same function and must not erase the signature). If
    that keeps more weights than `counts` says the layer had (the suspect was densely fine-tuned
    or regrown), the top-`count` magnitudes are the mask. Integer (quantised) weights count too.
    """
    masks: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for name in names:
        weight = loaded.state.get(name)
        if weight is None or weight.dim() < 2 or weight.dtype == torch.bool:
            continue
        observed = (weight != 0).cpu()
        source = ZERO_PATTERN
        if loaded.mask is not None and name in loaded.mask:
            explicit = loaded.mask[name].cpu()
            if explicit.shape == observed.shape:
                observed = observed & explicit
                source = EXPLICIT
        expected = None if counts is None else counts.get(name)
        if expected is not None and int(observed.sum()) > expected:
            scores = torch.where(
                observed, weight.float().abs().nan_to_num(nan=0.0), torch.tensor(float("-inf"))
            )
            masks[name] = top_magnitude_scores(scores, expected)
            sources[name] = TOP_MAGNITUDE
        else:
            masks[name] = observed
            sources[name] = source
    return Mask(masks), sources
