"""Removal attacks: each one's defining property, determinism, purity and parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

from ticketguard.attacks.base import AttackError, get_attack, run_attack
from ticketguard.attacks.removal import quantize_tensor
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import prunable_parameters
from ticketguard.tickets.ticket import Ticket

QUICK = {"epochs": 1, "fraction": 0.2}


@pytest.fixture
def ticket(make_ticket) -> Ticket:
    """A small DigitsCNN ticket that records the digits dataset (so attacks can train)."""
    t = make_ticket(width=4, keep=0.4)
    t.metadata.update({"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]})
    return t


def _copy(ticket: Ticket) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ticket.trained.items()}


def _unchanged(ticket: Ticket, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(ticket.trained[k], v) for k, v in before.items())


def _outputs(ticket: Ticket, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ticket.build_model()(x)


def _same(a: Ticket, b: Ticket) -> bool:
    return a.trained.keys() == b.trained.keys() and all(
        torch.equal(a.trained[k], b.trained[k]) for k in a.trained
    )


# --- pruning -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_pruning_only_removes_the_requested_count(ticket, method, scope):
    before = _copy(ticket)
    result = run_attack("prune", ticket, {"method": method, "scope": scope, "rate": 0.3}, seed=0)
    out = result.ticket
    assert _unchanged(ticket, before)
    assert out.mask.is_subset_of(Mask({n: ticket.mask[n] for n in out.mask}))
    surviving = ticket.mask.num_surviving
    assert surviving - out.mask.num_surviving == round(0.3 * surviving) or scope == "layerwise"
    assert result.details["removed"] == surviving - out.mask.num_surviving
    if scope == "layerwise":
        for name in ticket.mask:
            alive = int(ticket.mask[name].sum())
            assert alive - int(out.mask[name].sum()) == round(0.3 * alive)
    # Survivors keep their exact values; nothing outside the old mask appears.
    for name in ticket.mask:
        keep = out.mask[name]
        assert torch.equal(out.trained[name][keep], ticket.trained[name][keep])


def test_magnitude_pruning_removes_the_smallest_and_random_does_not(ticket):
    out = run_attack("prune", ticket, {"rate": 0.5}, seed=0).ticket
    removed = torch.cat(
        [ticket.trained[n][ticket.mask[n] & ~out.mask[n]].abs() for n in ticket.mask]
    )
    kept = torch.cat([out.trained[n][out.mask[n]].abs() for n in ticket.mask])
    assert removed.max() <= kept.min()
    rand = run_attack("prune", ticket, {"rate": 0.5, "method": "random"}, seed=0).ticket
    removed_r = torch.cat(
        [ticket.trained[n][ticket.mask[n] & ~rand.mask[n]].abs() for n in ticket.mask]
    )
    assert removed_r.max() > kept.min()


def test_prune_finetune_keeps_its_pruned_mask(ticket):
    out = run_attack("prune-finetune", ticket, {"rate": 0.5, **QUICK}, seed=0).ticket
    pruned = run_attack("prune", ticket, {"rate": 0.5}, seed=0).ticket
    assert out.mask.is_subset_of(pruned.mask)
    assert not _same(out, pruned)


# --- regrowth ------------------------------------------------------------------------------------


def test_regrow_only_adds_and_keeps_survivors_exactly(ticket):
    result = run_attack("regrow", ticket, {"fraction": 0.25, "scale": 0.01}, seed=3)
    out = result.ticket
    added = 0
    for name, m in ticket.mask.items():
        assert bool((out.mask[name] | ~m).all()), "a surviving weight was removed"
        assert torch.equal(out.trained[name][m], ticket.trained[name][m])
        new = out.mask[name] & ~m
        assert int(new.sum()) == round(0.25 * int((~m).sum()))
        added += int(new.sum())
        # Small: 0.01 of the survivors' std, so well below the survivors' typical magnitude.
        std = float(ticket.trained[name][m].std())
        assert float(out.trained[name][new].abs().max()) < 0.1 * std
    assert result.details["added"] == added


# --- noise, quantisation, shifting ---------------------------------------------------------------


@pytest.mark.parametrize("scope", ["surviving", "all"])
def test_noise_has_the_requested_relative_std(ticket, scope):
    name = "fc1.weight"
    out = run_attack("noise", ticket, {"sigma": 0.2, "scope": scope}, seed=1).ticket
    w = ticket.trained[name]
    delta = out.trained[name] - w
    alive = w != 0
    ratio = float(delta[alive].std() / w[alive].std())
    assert ratio == pytest.approx(0.2, rel=0.1)
    if scope == "surviving":
        assert torch.equal(delta[~alive], torch.zeros_like(delta[~alive]))
        assert out.mask[name].sum() == alive.sum()
    else:
        assert bool((delta[~alive] != 0).all())
    # Biases and batch-norm parameters are left alone.
    assert torch.equal(out.trained["fc1.bias"], ticket.trained["fc1.bias"])
    assert torch.equal(out.trained["bn1.weight"], ticket.trained["bn1.weight"])


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantisation_bounds_the_error_and_keeps_zeros(ticket, bits, granularity):
    for name in prunable_parameters(ticket.build_model()):
        w = ticket.trained[name]
        q, scale = quantize_tensor(w, bits, granularity)
        assert torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))
        if bits == 16:
            assert torch.equal(q, w.half().float())
            continue
        levels = 2 ** (bits - 1) - 1
        step = scale.reshape(-1, *([1] * (w.dim() - 1))) if granularity == "channel" else scale
        assert bool(((q - w).abs() <= step / 2 + 1e-7).all())
        # At most 2^bits - 1 distinct values per scale.
        values = torch.unique(q[0] if granularity == "channel" else q)
        assert len(values) <= 2 * levels + 1
    out = run_attack("quantize", ticket, {"bits": bits, "granularity": granularity}, seed=0).ticket
    assert out.mask.is_subset_of(ticket.mask)


def test_shift_moves_each_filter_by_the_relative_norm(ticket):
    out = run_attack("shift", ticket, {"shift": 0.3, "epochs": 0}, seed=2).ticket
    name = "conv2.weight"
    w, s = ticket.trained[name], out.trained[name]
    for f in range(w.shape[0]):
        if w[f].norm() > 0:
            assert float((s[f] - w[f]).norm() / w[f].norm()) == pytest.approx(0.3, rel=1e-4)
    assert out.mask == Mask({n: ticket.mask[n] for n in out.mask})


# --- fine-tuning ---------------------------------------------------------------------------------


def test_fine_tuning_with_the_mask_fixed_keeps_the_mask(ticket):
    before = _copy(ticket)
    result = run_attack("finetune", ticket, {"mode": "masked", **QUICK}, seed=0)
    out = result.ticket
    assert _unchanged(ticket, before)
    for name, m in ticket.mask.items():
        assert torch.equal(out.trained[name] != 0, m & (ticket.trained[name] != 0))
    assert not _same(out, ticket)
    assert result.details["samples"] == round(0.2 * 1258)


def test_dense_fine_tuning_lets_pruned_weights_grow(ticket):
    out = run_attack("finetune", ticket, {"mode": "dense", **QUICK}, seed=0).ticket
    assert out.mask.num_surviving > ticket.mask.num_surviving


def test_last_layer_fine_tuning_changes_only_the_classifier(ticket):
    out = run_attack("finetune", ticket, {"layers": "last", **QUICK}, seed=0).ticket
    changed = {k for k in ticket.trained if not torch.equal(ticket.trained[k], out.trained[k])}
    assert changed == {"fc.weight", "fc.bias"}


def test_reinitialising_the_last_layer_replaces_it(ticket):
    out = run_attack(
        "finetune", ticket, {"layers": "last", "reinit_last": True, "epochs": 0}, seed=0
    ).ticket
    again = run_attack(
        "finetune", ticket, {"layers": "last", "reinit_last": True, "epochs": 0}, seed=0
    ).ticket
    other = run_attack(
        "finetune", ticket, {"layers": "last", "reinit_last": True, "epochs": 0}, seed=1
    ).ticket
    assert not torch.equal(out.trained["fc.weight"], ticket.trained["fc.weight"])
    assert torch.equal(out.trained["fc.weight"], again.trained["fc.weight"])
    assert not torch.equal(out.trained["fc.weight"], other.trained["fc.weight"])
    assert torch.equal(out.trained["fc1.weight"], ticket.trained["fc1.weight"])


# --- permutation ---------------------------------------------------------------------------------


def test_permutation_keeps_outputs_and_counts_and_moves_channels(ticket):
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = run_attack("permute", ticket, {}, seed=0)
    out = result.ticket
    assert result.details["moved_channels"] > 0
    assert torch.allclose(_outputs(out, x), _outputs(ticket, x), atol=1e-5)
    assert not torch.equal(out.trained["conv2.weight"], ticket.trained["conv2.weight"])
    for name in ticket.mask:
        assert int(out.mask[name].sum()) == int(ticket.mask[name].sum())
    rewound = out.build_model(weights="rewind")
    with torch.no_grad():
        assert torch.allclose(rewound(x), ticket.build_model(weights="rewind")(x), atol=1e-5)


def test_permutation_of_a_residual_network_keeps_outputs():
    from ticketguard.tickets.models import build_model, default_pruned_parameters

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet20", 10, {})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if k.endswith("running_mean") or k.endswith("running_var") or k.endswith("bn1.weight"):
            state[k] = v + torch.rand(v.shape, generator=gen)
    names = default_pruned_parameters(model)
    masks = {n: torch.rand(state[n].shape, generator=gen) < 0.3 for n in names}
    for n in names:
        state[n] = state[n] * masks[n]
    meta = {
        "architecture": {"name": "resnet20", "kwargs": {}},
        "num_classes": 10,
        "input_shape": [3, 32, 32],
    }
    ticket = Ticket(Mask(masks), state, {}, meta)
    out = run_attack("permute", ticket, {}, seed=5).ticket
    x = torch.randn(4, 3, 32, 32, generator=gen)
    assert torch.allclose(_outputs(out, x), _outputs(ticket, x), atol=1e-5)
    assert not _same(out, ticket)


# --- distillation --------------------------------------------------------------------------------


def test_distillation_gives_a_fresh_dense_student(ticket):
    result = run_attack("distill", ticket, {"epochs": 1, "fraction": 0.2}, seed=0)
    out = result.ticket
    assert out.architecture == ticket.architecture
    assert out.mask.density > 0.99
    assert not out.rewind
    assert math.isfinite(result.details["last_loss"])
    assert out.metadata["attack"] == {"name": "distill", "params": result_params(result), "seed": 0}
    assert "signature" not in out.metadata


def result_params(result) -> dict:
    return result.ticket.metadata["attack"]["params"]


# --- determinism, purity, parameters -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("prune", {"method": "random"}),
        ("regrow", {}),
        ("noise", {}),
        ("shift", {"epochs": 0}),
        ("permute", {}),
        ("finetune", QUICK),
    ],
)
def test_same_seed_same_model_other_seed_other_model(ticket, name, params):
    a = run_attack(name, ticket, params, seed=0).ticket
    b = run_attack(name, ticket, params, seed=0).ticket
    c = run_attack(name, ticket, params, seed=1).ticket
    assert _same(a, b)
    assert not _same(a, c)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("prune", {"rate": 1.5}, "attack parameter 'rate' must be <= 0.99, got 1.5"),
        ("quantize", {"bits": 1}, "attack parameter 'bits' must be >= 2, got 1"),
        ("prune", {"method": "best"}, "attack parameter 'method' must be one of magnitude, random"),
        ("noise", {"sigma": "loud"}, "attack parameter 'sigma' must be a number, got 'loud'"),
        ("regrow", {"rate": 0.1}, "attack 'regrow' has no parameter 'rate'"),
        ("finetune", {"epochs": 1.5}, "attack parameter 'epochs' must be an integer, got 1.5"),
    ],
)
def test_bad_parameters_are_refused_in_one_line(ticket, name, params, message):
    with pytest.raises(AttackError) as info:
        run_attack(name, ticket, params, seed=0)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_unknown_attack_names_the_known_ones():
    with pytest.raises(AttackError, match="unknown attack 'melt'; known: finetune, prune"):
        get_attack("melt")


def test_every_attack_has_help_and_a_valid_strength():
    from ticketguard.attacks.base import ATTACKS, attack_names

    for name in attack_names():
        attack = ATTACKS[name]
        assert attack.summary and all(p.help for p in attack.params)
        defaults = attack.resolve({})
        assert set(defaults) == {p.name for p in attack.params}
        if attack.strength is not None:
            assert isinstance(defaults[attack.strength], int | float)
