"""Magnitude pruning: the right fraction, only shrinking, smallest first, inputs untouched."""

from __future__ import annotations

import pytest
import torch

from ticketguard.errors import ConfigError
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.pruning import PruneConfig, prune_magnitude


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(16, 8, 3, 3, generator=g),
        "b.weight": torch.randn(32, 16, generator=g)
        * 3.0,  # larger scale: global pruning spares it
        "c.weight": torch.randn(7, 5, generator=g),
    }


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("rate", [0.2, 0.5, 0.37])
def test_each_round_prunes_the_requested_fraction_and_masks_only_shrink(
    scope: str, rate: float
) -> None:
    weights = _weights()
    mask = Mask.ones_like(weights, weights)
    for _ in range(6):
        before = {s.name: s.surviving for s in mask.layer_stats()}
        total_before = mask.num_surviving
        new = prune_magnitude(weights, mask, PruneConfig(rate, scope))
        assert new.is_subset_of(mask)
        if scope == "global":
            assert total_before - new.num_surviving == round(rate * total_before)
        else:
            for s in new.layer_stats():
                assert abs((before[s.name] - s.surviving) - rate * before[s.name]) <= 1
        mask = new
        weights = {n: w * mask[n] for n, w in weights.items()}


def test_global_prunes_the_smallest_magnitudes_across_layers() -> None:
    weights = _weights()
    mask = Mask.ones_like(weights, weights)
    new = prune_magnitude(weights, mask, PruneConfig(0.3, "global"))
    kept = torch.cat([weights[n].abs()[new[n]] for n in weights])
    dropped = torch.cat([weights[n].abs()[~new[n]] for n in weights])
    assert dropped.max() <= kept.min()
    # The large-scale layer loses a smaller fraction than the others.
    density = {s.name: s.density for s in new.layer_stats()}
    assert density["b.weight"] > density["a.weight"]


def test_layerwise_prunes_each_layer_by_its_own_threshold() -> None:
    weights = _weights()
    new = prune_magnitude(weights, Mask.ones_like(weights, weights), PruneConfig(0.5, "layerwise"))
    for n, w in weights.items():
        assert w.abs()[~new[n]].max() <= w.abs()[new[n]].min()


def test_inputs_are_not_modified_and_layers_outside_the_mask_are_ignored() -> None:
    weights = _weights()
    copies = {n: w.clone() for n, w in weights.items()}
    mask = Mask.ones_like(weights, ["a.weight", "c.weight"])
    mask_copy = Mask({n: m.clone() for n, m in mask.items()})
    new = prune_magnitude(weights, mask, PruneConfig(0.5))
    assert set(new) == {"a.weight", "c.weight"}
    assert mask == mask_copy
    assert all(torch.equal(weights[n], copies[n]) for n in weights)


def test_already_pruned_entries_stay_pruned_even_if_weights_regrew() -> None:
    weights = _weights()
    mask = prune_magnitude(weights, Mask.ones_like(weights, weights), PruneConfig(0.5))
    regrown = {n: w + 100.0 for n, w in weights.items()}  # pruned entries now look large
    new = prune_magnitude(regrown, mask, PruneConfig(0.2))
    assert new.is_subset_of(mask)


def test_zero_rate_keeps_everything_and_bad_configs_are_rejected() -> None:
    weights = _weights()
    mask = Mask.ones_like(weights, weights)
    assert prune_magnitude(weights, mask, PruneConfig(0.0)) == mask
    with pytest.raises(ConfigError):
        PruneConfig(1.0)
    with pytest.raises(ConfigError):
        PruneConfig(0.2, "per-neuron")
