"""Removal attacks: each one's defining property, determinism, purity and parameter checks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from ticketguard.attacks import removal
from ticketguard.attacks.base import ATTACKS, REMOVAL, AttackError, get_attack, run_attack
from ticketguard.attacks.removal import quantize_tensor
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import build_model, default_pruned_parameters, prunable_parameters
from ticketguard.tickets.ticket import Ticket

#: One epoch on a fifth of the digits training split (252 samples): a fraction of a second.
QUICK = {"epochs": 1, "fraction": 0.2}
DIGITS_TRAIN = 1258
#: Every removal attack with parameters that keep it fast.
FAST = {
    "finetune": QUICK,
    "prune": {},
    "prune-finetune": QUICK,
    "regrow": {},
    "noise": {},
    "quantize": {},
    "shift": QUICK,
    "permute": {},
    "distill": QUICK,
}


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


def _outputs(ticket: Ticket, x: torch.Tensor, weights: str = "trained") -> torch.Tensor:
    with torch.no_grad():
        return ticket.build_model(weights=weights)(x)


def _same(a: Ticket, b: Ticket) -> bool:
    return a.trained.keys() == b.trained.keys() and all(
        torch.equal(a.trained[k], b.trained[k]) for k in a.trained
    )


def _alive(ticket: Ticket) -> list[torch.Tensor]:
    return [ticket.trained[n][ticket.mask[n]].abs() for n in ticket.mask]


def test_every_removal_attack_is_registered_with_its_interface():
    names = [a.name for a in ATTACKS.values() if a.kind == REMOVAL]
    assert names == list(FAST)
    assert removal.finetune is ATTACKS["finetune"].run
    strengths = {n: ATTACKS[n].strength for n in names}
    assert strengths == {
        "finetune": "epochs",
        "prune": "rate",
        "prune-finetune": "rate",
        "regrow": "fraction",
        "noise": "sigma",
        "quantize": "bits",
        "shift": "shift",
        "permute": None,
        "distill": "epochs",
    }
    needs = {n for n in names if ATTACKS[n].needs_data}
    assert needs == {"finetune", "prune-finetune", "shift", "distill"}


# --- pruning -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_pruning_only_removes_the_requested_count(ticket, method, scope):
    before = _copy(ticket)
    result = run_attack("prune", ticket, {"method": method, "scope": scope, "rate": 0.3}, seed=0)
    out = result.ticket
    assert _unchanged(ticket, before)
    assert out.mask.is_subset_of(ticket.mask)
    surviving = ticket.mask.num_surviving
    removed = surviving - out.mask.num_surviving
    assert result.details["removed"] == removed
    if scope == "global":
        assert removed == round(0.3 * surviving)
    else:
        for name in ticket.mask:
            alive = int(ticket.mask[name].sum())
            assert alive - int(out.mask[name].sum()) == round(0.3 * alive)
            assert result.details["removed_per_layer"][name] == round(0.3 * alive)
    # Survivors keep their exact values; nothing outside the old mask appears.
    for name in ticket.mask:
        keep = out.mask[name]
        assert torch.equal(out.trained[name][keep], ticket.trained[name][keep])
        assert torch.equal(out.trained[name][~keep], torch.zeros(int((~keep).sum())))
    # Layers outside the mask are untouched.
    assert torch.equal(out.trained["conv1.weight"], ticket.trained["conv1.weight"])


def test_global_pruning_spares_a_layer_of_large_weights_and_layerwise_does_not(ticket):
    ticket.trained["fc1.weight"] = ticket.trained["fc1.weight"] * 1000
    others = sum(int(ticket.mask[n].sum()) for n in ticket.mask if n != "fc1.weight")
    rate = 0.5 * others / ticket.mask.num_surviving  # less than all the small weights
    glob = run_attack("prune", ticket, {"rate": rate, "scope": "global"}, seed=0).ticket
    assert torch.equal(glob.mask["fc1.weight"], ticket.mask["fc1.weight"])
    layer = run_attack("prune", ticket, {"rate": rate, "scope": "layerwise"}, seed=0).ticket
    alive = int(ticket.mask["fc1.weight"].sum())
    assert alive - int(layer.mask["fc1.weight"].sum()) == round(rate * alive) > 0


def test_magnitude_pruning_removes_the_smallest_and_random_does_not(ticket):
    out = run_attack("prune", ticket, {"rate": 0.5}, seed=0).ticket
    removed = torch.cat(
        [ticket.trained[n][ticket.mask[n] & ~out.mask[n]].abs() for n in ticket.mask]
    )
    kept = torch.cat(_alive(out))
    assert removed.max() <= kept.min()
    rand = run_attack("prune", ticket, {"rate": 0.5, "method": "random"}, seed=0).ticket
    removed_r = torch.cat(
        [ticket.trained[n][ticket.mask[n] & ~rand.mask[n]].abs() for n in ticket.mask]
    )
    assert removed_r.max() > kept.min()
    assert rand.mask.num_surviving == out.mask.num_surviving


def test_prune_finetune_keeps_its_pruned_mask(ticket):
    result = run_attack("prune-finetune", ticket, {"rate": 0.5, **QUICK}, seed=0)
    pruned = run_attack("prune", ticket, {"rate": 0.5}, seed=0).ticket
    assert result.ticket.mask.is_subset_of(pruned.mask)
    assert not _same(result.ticket, pruned)
    assert result.details["removed"] == round(0.5 * ticket.mask.num_surviving)
    assert result.details["samples"] == round(0.2 * DIGITS_TRAIN)


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
    for name in ticket.trained:
        if name not in ticket.mask:
            assert torch.equal(out.trained[name], ticket.trained[name])


def test_regrow_scale_sets_the_new_weights_std(ticket):
    out = run_attack("regrow", ticket, {"fraction": 1.0, "scale": 0.5}, seed=0).ticket
    name = "fc1.weight"
    m = ticket.mask[name]
    assert bool(out.mask[name].all())
    ratio = float(out.trained[name][~m].std() / ticket.trained[name][m].std())
    assert ratio == pytest.approx(0.5, rel=0.1)


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
        assert out.mask == ticket.mask
    else:
        assert bool((delta[~alive] != 0).all())
        assert out.mask.density == 1.0
    # Layers outside the mask are noised too; biases and batch-norm are left alone.
    assert not torch.equal(out.trained["conv1.weight"], ticket.trained["conv1.weight"])
    assert torch.equal(out.trained["fc1.bias"], ticket.trained["fc1.bias"])
    assert torch.equal(out.trained["bn1.weight"], ticket.trained["bn1.weight"])
    assert torch.equal(out.trained["bn1.running_var"], ticket.trained["bn1.running_var"])


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantisation_bounds_the_error_and_keeps_zeros(ticket, bits, granularity):
    for name in prunable_parameters(ticket.build_model()):
        w = ticket.trained[name]
        q, step = quantize_tensor(w, bits, granularity)
        assert q.shape == w.shape and q.dtype == w.dtype
        assert torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))
        assert bool(((q - w).abs() <= step / 2 + 1e-7).all())
        if bits == 16:
            assert torch.equal(q, w.half().float())
            continue
        levels = 2 ** (bits - 1) - 1
        # Every value is an integer multiple of its step, at most `levels` steps from zero.
        units = q / step
        assert torch.allclose(units, units.round(), atol=1e-4)
        assert float(units.abs().max()) <= levels + 1e-4
        if granularity == "channel":
            assert step.shape == (w.shape[0],) + (1,) * (w.dim() - 1)
            assert torch.allclose(step.flatten(), w.abs().flatten(1).amax(1) / levels)
        else:
            assert float(step) == pytest.approx(float(w.abs().max()) / levels)
    result = run_attack("quantize", ticket, {"bits": bits, "granularity": granularity}, seed=0)
    out = result.ticket
    assert out.mask.is_subset_of(ticket.mask)
    assert set(result.details["max_error"]) == set(prunable_parameters(ticket.build_model()))
    for name, error in result.details["max_error"].items():
        assert error == pytest.approx(float((out.trained[name] - ticket.trained[name]).abs().max()))
        if bits < 16:
            assert error <= result.details["max_step"][name] / 2 + 1e-7
    assert torch.equal(out.trained["fc.bias"], ticket.trained["fc.bias"])


def test_fp16_step_is_the_format_spacing():
    w = torch.tensor([1.0, 1.5, -3.0, 1e-6, 0.0, 65504.0])
    q, step = quantize_tensor(w, 16, "tensor")
    assert step.tolist()[:3] == [2.0**-10, 2.0**-10, 2.0**-9]
    assert step[3] == 2.0**-24  # a subnormal in fp16
    assert q[5] == 65504.0
    with pytest.raises(AttackError, match="too large for fp16"):
        quantize_tensor(torch.tensor([1e6]), 16, "tensor")


def test_shift_moves_each_filter_by_the_relative_norm(ticket):
    result = run_attack("shift", ticket, {"shift": 0.3, "epochs": 0}, seed=2)
    out = result.ticket
    for name in prunable_parameters(ticket.build_model()):
        w, s = ticket.trained[name], out.trained[name]
        norms = w.flatten(1).norm(dim=1)
        ratios = (s - w).flatten(1).norm(dim=1) / norms
        assert torch.allclose(ratios[norms > 0], torch.full_like(ratios[norms > 0], 0.3))
        assert torch.equal(s[w == 0], torch.zeros_like(s[w == 0]))
    assert out.mask == ticket.mask
    assert result.details["samples"] == 0
    tuned = run_attack("shift", ticket, {"shift": 0.3, **QUICK}, seed=2).ticket
    assert tuned.mask == ticket.mask
    assert not _same(tuned, out)


# --- fine-tuning ---------------------------------------------------------------------------------


def test_fine_tuning_with_the_mask_fixed_keeps_the_mask(ticket):
    before = _copy(ticket)
    result = run_attack("finetune", ticket, {"mode": "masked", **QUICK}, seed=0)
    out = result.ticket
    assert _unchanged(ticket, before)
    assert out.mask == ticket.mask
    for name, m in ticket.mask.items():
        assert torch.equal(out.trained[name] != 0, m)
    assert not _same(out, ticket)
    assert result.details["samples"] == round(0.2 * DIGITS_TRAIN)
    assert result.details["steps"] == round(0.2 * DIGITS_TRAIN) // 64
    assert math.isfinite(result.details["last_loss"])


def test_dense_fine_tuning_lets_pruned_weights_grow(ticket):
    result = run_attack("finetune", ticket, {"mode": "dense", **QUICK}, seed=0)
    assert result.ticket.mask.num_surviving > ticket.mask.num_surviving
    assert result.details["surviving_after"] == result.ticket.mask.num_surviving


def test_last_layer_fine_tuning_changes_only_the_classifier(ticket):
    for mode in ("masked", "dense"):
        out = run_attack("finetune", ticket, {"layers": "last", "mode": mode, **QUICK}, seed=0)
        changed = {
            k for k in ticket.trained if not torch.equal(ticket.trained[k], out.ticket.trained[k])
        }
        assert changed == {"fc.weight", "fc.bias"}


def test_reinitialising_the_last_layer_replaces_it(ticket):
    params = {"layers": "last", "reinit_last": True, "epochs": 0}
    out = run_attack("finetune", ticket, params, seed=0).ticket
    again = run_attack("finetune", ticket, params, seed=0).ticket
    other = run_attack("finetune", ticket, params, seed=1).ticket
    assert not torch.equal(out.trained["fc.weight"], ticket.trained["fc.weight"])
    assert not torch.equal(out.trained["fc.bias"], ticket.trained["fc.bias"])
    assert torch.equal(out.trained["fc.weight"], again.trained["fc.weight"])
    assert not torch.equal(out.trained["fc.weight"], other.trained["fc.weight"])
    # A fresh nn.Linear(128, 10): uniform within 1/sqrt(fan_in).
    assert float(out.trained["fc.weight"].abs().max()) <= 1 / math.sqrt(128)
    assert torch.equal(out.trained["fc1.weight"], ticket.trained["fc1.weight"])


def test_retraining_all_layers_after_reinit_keeps_the_hidden_mask(ticket):
    params = {"layers": "all", "reinit_last": True, **QUICK}
    result = run_attack("finetune", ticket, params, seed=0)
    out = result.ticket
    assert result.details["reinitialised"] == "fc.weight"
    assert out.mask == ticket.mask
    assert not torch.equal(out.trained["fc1.weight"], ticket.trained["fc1.weight"])


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
        # The same weights, in another order.
        assert torch.equal(
            out.trained[name].flatten().sort().values, ticket.trained[name].flatten().sort().values
        )
    assert torch.allclose(_outputs(out, x, "rewind"), _outputs(ticket, x, "rewind"), atol=1e-5)


def test_permutation_of_a_residual_network_keeps_outputs():
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet20", 10, {})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in state.items():
        # Distinct batch-norm statistics and scales, so a misrouted channel would show.
        if v.is_floating_point() and k.split(".")[-1] in ("running_mean", "running_var", "weight"):
            if v.dim() == 1:
                state[k] = v + torch.rand(v.shape, generator=gen)
    names = default_pruned_parameters(model)
    masks = {n: torch.rand(state[n].shape, generator=gen) < 0.3 for n in names}
    for n in names:
        state[n] = state[n] * masks[n]
    rewind = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    meta = {
        "architecture": {"name": "resnet20", "kwargs": {}},
        "num_classes": 10,
        "input_shape": [3, 32, 32],
    }
    ticket = Ticket(Mask(masks), state, rewind, meta)
    result = run_attack("permute", ticket, {}, seed=5)
    out = result.ticket
    x = torch.randn(4, 3, 32, 32, generator=gen)
    assert torch.allclose(_outputs(out, x), _outputs(ticket, x), atol=1e-5)
    assert torch.allclose(_outputs(out, x, "rewind"), _outputs(ticket, x, "rewind"), atol=1e-5)
    assert result.details["moved_channels"] > 0
    moved = [n for n in names if not torch.equal(out.trained[n], ticket.trained[n])]
    assert len(moved) == len(names)
    for n in names:
        assert int(out.mask[n].sum()) == int(masks[n].sum())


# --- distillation --------------------------------------------------------------------------------


def test_distillation_gives_a_fresh_dense_student(ticket):
    result = run_attack("distill", ticket, QUICK, seed=0)
    out = result.ticket
    assert out.architecture == ticket.architecture
    assert {k: v.shape for k, v in out.trained.items()} == {
        k: v.shape for k, v in ticket.trained.items()
    }
    assert out.mask.keys() == ticket.mask.keys()
    assert out.mask.density > 0.99
    assert not out.rewind
    assert math.isfinite(result.details["last_loss"])
    assert result.details["samples"] == round(0.2 * DIGITS_TRAIN)
    attack = out.metadata["attack"]
    assert attack["name"] == "distill" and attack["seed"] == 0
    assert attack["params"]["temperature"] == 4.0
    assert "signature" not in out.metadata


# --- determinism, purity, parameters -------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAST))
def test_attacks_leave_the_stolen_ticket_alone_and_say_what_they_did(ticket, name):
    trained, rewind = _copy(ticket), {k: v.clone() for k, v in ticket.rewind.items()}
    mask, metadata = ticket.mask.to("cpu"), copy.deepcopy(ticket.metadata)
    result = run_attack(name, ticket, FAST[name], seed=0)
    assert _unchanged(ticket, trained)
    assert all(torch.equal(ticket.rewind[k], v) for k, v in rewind.items())
    assert ticket.mask == mask and ticket.metadata == metadata
    out = result.ticket
    assert out is not None and out.trained.keys() == ticket.trained.keys()
    assert all(v.device.type == "cpu" for v in out.trained.values())
    assert all(not out.trained[k].data_ptr() == ticket.trained[k].data_ptr() for k in out.trained)
    assert out.metadata["attack"]["name"] == name
    assert result.details
    json.dumps(result.details, allow_nan=False)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("prune", {"method": "random"}),
        ("regrow", {}),
        ("noise", {}),
        ("shift", {"epochs": 0}),
        ("permute", {}),
        ("finetune", QUICK),
        ("distill", QUICK),
    ],
)
def test_same_seed_same_model_other_seed_other_model(ticket, name, params):
    a = run_attack(name, ticket, params, seed=0).ticket
    b = run_attack(name, ticket, params, seed=0).ticket
    c = run_attack(name, ticket, params, seed=1).ticket
    assert _same(a, b)
    assert not _same(a, c)


def test_deterministic_attacks_ignore_the_seed(ticket):
    for name, params in (("prune", {}), ("quantize", {"bits": 4})):
        assert _same(
            run_attack(name, ticket, params, seed=0).ticket,
            run_attack(name, ticket, params, seed=7).ticket,
        )


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("prune", {"rate": 1.5}, "attack parameter 'rate' must be <= 0.99, got 1.5"),
        ("quantize", {"bits": 1}, "attack parameter 'bits' must be >= 2, got 1"),
        ("quantize", {"bits": 17}, "attack parameter 'bits' must be <= 16, got 17"),
        ("prune", {"method": "best"}, "attack parameter 'method' must be one of magnitude, random"),
        ("prune", {"scope": "row"}, "attack parameter 'scope' must be one of global, layerwise"),
        ("noise", {"sigma": "loud"}, "attack parameter 'sigma' must be a number, got 'loud'"),
        ("noise", {"sigma": -0.1}, "attack parameter 'sigma' must be >= 0, got -0.1"),
        ("regrow", {"rate": 0.1}, "attack 'regrow' has no parameter 'rate'"),
        ("regrow", {"fraction": 2}, "attack parameter 'fraction' must be <= 1, got 2.0"),
        ("finetune", {"epochs": 1.5}, "attack parameter 'epochs' must be an integer, got 1.5"),
        ("finetune", {"mode": "sparse"}, "attack parameter 'mode' must be one of masked, dense"),
        ("finetune", {"reinit_last": "maybe"}, "attack parameter 'reinit_last' must be true"),
        ("finetune", {"fraction": 0}, "attack parameter 'fraction' must be >= 0.001, got 0.0"),
        ("distill", {"epochs": 0}, "attack parameter 'epochs' must be >= 1, got 0"),
        ("permute", {"rate": 0.5}, "attack 'permute' has no parameter 'rate' (it has: none)"),
    ],
)
def test_bad_parameters_are_refused_in_one_line(ticket, name, params, message):
    with pytest.raises(AttackError) as info:
        run_attack(name, ticket, params, seed=0)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_a_ticket_without_an_architecture_is_refused(ticket):
    bare = Ticket(ticket.mask, ticket.trained, {}, {})
    with pytest.raises(AttackError, match="records no architecture"):
        run_attack("permute", bare, {}, seed=0)


def test_unknown_attack_names_the_known_ones():
    with pytest.raises(AttackError, match="unknown attack 'melt'; known: finetune, prune"):
        get_attack("melt")


def test_every_attack_has_help_and_a_valid_strength():
    from ticketguard.attacks.base import attack_names

    for name in attack_names():
        attack = ATTACKS[name]
        assert attack.summary and all(p.help for p in attack.params)
        defaults = attack.resolve({})
        assert set(defaults) == {p.name for p in attack.params}
        if attack.strength is not None:
            assert isinstance(defaults[attack.strength], int | float)
