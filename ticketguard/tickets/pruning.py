"""Magnitude pruning as a pure function: (weights, mask, config) -> new mask."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ticketguard.errors import ConfigError
from ticketguard.tickets.mask import Mask

SCOPES = ("global", "layerwise")


@dataclass(frozen=True)
class PruneConfig:
    """How much to prune per round and whether one threshold covers all layers."""

    rate: float = 0.2
    scope: str = "global"

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ConfigError(f"pruning rate must be in [0, 1), got {self.rate}")
        if self.scope not in SCOPES:
            raise ConfigError(
                f"pruning scope must be one of {', '.join(SCOPES)}, got {self.scope!r}"
            )


def _keep_largest(values: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Return a bool vector that drops the `n_prune` smallest values (ties: lower index first)."""
    keep = torch.ones_like(values, dtype=torch.bool)
    if n_prune > 0:
        order = torch.sort(values, stable=True).indices
        keep[order[:n_prune]] = False
    return keep


def prune_magnitude(
    weights: Mapping[str, torch.Tensor], mask: Mask, config: PruneConfig = PruneConfig()
) -> Mask:
    """Prune `config.rate` of the surviving weights with the smallest magnitude.

    Global scope ranks all masked tensors together; layerwise prunes the rate from each tensor.
    Already-pruned entries stay pruned, so masks only shrink. Inputs are not modified.
    """
    mask.check_shapes(weights)
    survivors = {
        name: weights[name].detach().abs().float().to(m.device)[m] for name, m in mask.items()
    }
    if config.scope == "global":
        flat = torch.cat([v.cpu() for v in survivors.values()]) if survivors else torch.empty(0)
        keep_flat = _keep_largest(flat, round(config.rate * flat.numel()))
        keeps = dict(
            zip(
                survivors,
                torch.split(keep_flat, [v.numel() for v in survivors.values()]),
                strict=True,
            )
        )
    else:
        keeps = {
            n: _keep_largest(v.cpu(), round(config.rate * v.numel())) for n, v in survivors.items()
        }
    new: dict[str, torch.Tensor] = {}
    for name, m in mask.items():
        updated = m.clone()
        updated[m] = keeps[name].to(m.device)
        new[name] = updated
    return Mask(new)
