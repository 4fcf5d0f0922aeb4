"""Tests of scheme W2: the plan, keyed groups, writing, carriers, reading, parameters."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from ticketguard.errors import ConfigError, EmbeddingError
from ticketguard.signatures.payload import EccParams
from ticketguard.signatures.signing import excluded_layers
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.signatures.w2 import (
    CARRIER_SHARE,
    ERASE_BELOW,
    MAX_LAYER_FRACTION,
    EmbeddingLayer,
    W2Params,
    bits_from_mask,
    carrier_floors,
    eligible_layers,
    keyed_positions,
    layer_capacity,
    layer_strengths,
    observed_magnitudes,
    plan_embedding,
    position_matrices,
    read_groups,
    replica_states,
    write_bits,
)
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import build_model, prunable_parameters
from ticketguard.tickets.ticket import Ticket

LAYERS = ["conv2.weight", "conv3.weight", "fc1.weight"]
SEED = bytes(range(32))


def _bits(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n).astype(np.uint8)


# --- planning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("nsym", [2, 16, 64, 190])
@pytest.mark.parametrize("layers", [LAYERS, ["conv3.weight", "fc1.weight"], ["fc1.weight"]])
def test_plan_spreads_exactly_the_codeword(make_ticket, nsym: int, layers: list[str]) -> None:
    ticket = make_ticket(width=32, keep=0.3)
    params = plan_embedding(ticket.mask, layers, EccParams(nsym))
    r = params.repetition
    assert params.num_bits == 8 * (64 + nsym)
    assert params.num_positions == r * params.num_bits
    assert params.ecc == EccParams(nsym)
    assert r % 2 == 0 and 2 <= r <= 16
    assert params.layer_names == [n for n in layers if n in params.layer_names]
    capacity = {}
    for layer in params.layers:
        m = ticket.mask[layer.name]
        conn = channel_connectivity(m)
        assert layer.shape == tuple(conn.shape)
        assert layer.surviving == int(m.sum())
        kernel = m.numel() // conn.numel()
        count = int(m.sum())
        written = layer.bits * r
        assert 0 < written <= MAX_LAYER_FRACTION * conn.numel()
        # Worst cases of the count restoration, half of the written entries connected: each
        # connected one adds one weight, each unconnected one prunes a whole kernel.
        assert (written // 2) * (kernel + 1) <= count
        assert (written // 2) * 3 * kernel <= m.numel() - count
        capacity[layer.name] = layer_capacity(m) // r
    # Groups spread in proportion to what each layer can hold (largest-remainder rounding).
    total = sum(capacity.values())
    for layer in params.layers:
        assert abs(layer.bits - capacity[layer.name] * params.num_bits / total) < 1
    # The automatic repetition is the largest even one within the carrier budget.
    surviving = sum(int(ticket.mask[n].sum()) for n in layers)
    room = sum(layer_capacity(ticket.mask[n]) for n in layers)
    budget = min(room, 2 * int(CARRIER_SHARE * surviving))
    assert r == max(2, min(16, budget // params.num_bits // 2 * 2))


def test_plan_of_width32_ticket_is_as_expected(make_ticket) -> None:
    """conv2 64x32, conv3 64x64, fc1 128x256 channels: 512 + 1024 + 8192 positions of room.

    All three are capped at a quarter of their channel matrices (9,728 positions); 8 replicas
    per bit fit (8,192), 10 do not. Groups: 64 + 128 + 1024, spread to 54 + 108 + 862 bits.
    """
    ticket = make_ticket(width=32, keep=0.3)
    params = plan_embedding(ticket.mask, LAYERS, EccParams(64))
    assert [layer.shape for layer in params.layers] == [(64, 32), (64, 64), (128, 256)]
    assert params.repetition == 8
    assert [layer.bits for layer in params.layers] == [54, 108, 862]
    assert params.num_bits == 1024
    two = plan_embedding(ticket.mask, LAYERS, EccParams(64), repetition=2)
    assert two.repetition == 2 and two.num_bits == 1024


def test_larger_tickets_get_more_replicas(make_ticket) -> None:
    """A ResNet-20-sized ticket holds more replicas per bit than the digits CNN at the same density."""
    digits = make_ticket(width=32, keep=0.1)
    resnet = _full_ticket("resnet20", {}, keep=0.1)
    small = plan_embedding(
        digits.mask, eligible_layers(digits.mask, excluded_layers(digits), None), EccParams(64)
    )
    large = plan_embedding(
        resnet.mask, eligible_layers(resnet.mask, excluded_layers(resnet), None), EccParams(64)
    )
    # 8,806 weights hold 4 replicas per bit; ResNet-20's 26,769 hold 6 (its 29,696 channel
    # connections cap it at a quarter, 7,424 positions).
    assert (small.repetition, large.repetition) == (4, 6)


@pytest.mark.parametrize("bad", [0, 1, 3, 18, True, 2.0])
def test_plan_refuses_an_odd_or_out_of_range_repetition(make_ticket, bad) -> None:
    ticket = make_ticket(width=32, keep=0.3)
    with pytest.raises(EmbeddingError, match="even number in 2..16"):
        plan_embedding(ticket.mask, LAYERS, EccParams(64), repetition=bad)


def test_plan_refuses_layers_too_small(make_ticket) -> None:
    ticket = make_ticket(width=4, keep=0.5)  # conv2 8x4, conv3 8x8: 8 + 16 positions of room
    with pytest.raises(EmbeddingError, match="can hold 12 bits at 2 mask positions per bit, "):
        plan_embedding(ticket.mask, ["conv2.weight", "conv3.weight"], EccParams(64))
    # Fewer parity symbols do not help enough: 8 * (64 + 2) = 528 bits.
    with pytest.raises(EmbeddingError, match="needs 528"):
        plan_embedding(ticket.mask, ["conv2.weight", "conv3.weight"], EccParams(2))
    # More replicas than the layers hold.
    big = make_ticket(width=32, keep=0.3)
    with pytest.raises(EmbeddingError, match="at 16 mask positions per bit"):
        plan_embedding(big.mask, LAYERS, EccParams(64), repetition=16)
    # A layer that is entirely pruned (or entirely kept) has no room at all.
    empty = Mask({**dict(ticket.mask), "fc1.weight": torch.zeros(128, 32, dtype=torch.bool)})
    with pytest.raises(EmbeddingError, match="can hold 0 bits"):
        plan_embedding(empty, ["fc1.weight"], EccParams(64))


# --- eligible layers -----------------------------------------------------------------------------


def _full_ticket(arch: str, kwargs: dict, keep: float = 1.0) -> Ticket:
    model = build_model(arch, 10, kwargs)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = prunable_parameters(model)
    gen = torch.Generator().manual_seed(0)
    mask = Mask({n: torch.rand(state[n].shape, generator=gen) < keep for n in names})
    for n in names:
        state[n] = state[n] * mask[n]
    meta = {"architecture": {"name": arch, "kwargs": kwargs}, "num_classes": 10}
    return Ticket(mask, state, {k: v.clone() for k, v in state.items()}, meta)


@pytest.mark.parametrize(
    ("arch", "kwargs", "first", "classifier"),
    [
        ("digits_cnn", {"width": 4}, "conv1.weight", "fc.weight"),
        ("resnet20", {}, "conv1.weight", "fc.weight"),
    ],
)
def test_eligible_layers_never_include_first_conv_or_classifier(
    arch: str, kwargs: dict, first: str, classifier: str
) -> None:
    ticket = _full_ticket(arch, kwargs)
    excluded = excluded_layers(ticket)
    assert excluded == [first, classifier]
    names = eligible_layers(ticket.mask, excluded, None)
    assert first not in names and classifier not in names
    assert names == [n for n in ticket.mask if n not in (first, classifier)]
    for refused in (first, classifier):
        with pytest.raises(EmbeddingError, match="never carry bits"):
            eligible_layers(ticket.mask, excluded, [names[0], refused])
    assert eligible_layers(ticket.mask, excluded, [names[-1]]) == [names[-1]]
    with pytest.raises(EmbeddingError, match="not part of the ticket's mask"):
        eligible_layers(ticket.mask, excluded, ["nope.weight"])


def test_eligible_layers_needs_at_least_one(make_ticket) -> None:
    ticket = make_ticket(width=4, layers=("conv2.weight",))
    with pytest.raises(EmbeddingError, match="no layer that can carry"):
        eligible_layers(ticket.mask, ["conv2.weight"], None)


# --- keyed positions and replica states ----------------------------------------------------------


def _params(make_ticket, nsym: int = 64, keep: float = 0.3, repetition: int | None = None):
    ticket = make_ticket(width=32, keep=keep)
    return ticket, plan_embedding(ticket.mask, LAYERS, EccParams(nsym), repetition)


def test_keyed_positions_are_deterministic_distinct_and_keyed(make_ticket) -> None:
    _, params = _params(make_ticket)
    first = keyed_positions(SEED, params)
    again = keyed_positions(bytes(SEED), params)
    other = keyed_positions(bytes(31) + b"\x01", params)
    assert len(first) == len(params.layers)
    for layer, a, b, c in zip(params.layers, first, again, other, strict=True):
        np.testing.assert_array_equal(a, b)
        n = layer.bits * params.repetition
        assert len(a) == n == len(np.unique(a))
        assert a.min() >= 0 and a.max() < layer.shape[0] * layer.shape[1]
        # Another seed chooses other positions: they share about n^2/size by chance only.
        shared = len(np.intersect1d(a, c))
        expected = n * n / (layer.shape[0] * layer.shape[1])
        assert shared < expected + 6 * np.sqrt(expected) + 3
    matrices = position_matrices(params.layers, first)
    for layer, pos in zip(params.layers, first, strict=True):
        m = matrices[layer.name]
        assert m.dtype == torch.bool and tuple(m.shape) == layer.shape
        assert int(m.sum()) == layer.bits * params.repetition
        assert m.reshape(-1)[torch.as_tensor(pos)].all()


def test_keyed_positions_spread_over_the_whole_matrix(make_ticket) -> None:
    _, params = _params(make_ticket)
    counts = np.zeros(4)
    for s in range(8):
        pos = keyed_positions(bytes([s]) * 32, params)[2]  # fc1: 128 x 256
        counts += np.bincount(pos // 256 // 32, minlength=4)
    # Each quarter of the rows receives about a quarter of the positions.
    assert (np.abs(counts / counts.sum() - 0.25) < 0.03).all()


@pytest.mark.parametrize("r", [2, 4, 8])
def test_replica_states_connect_half_of_every_group(r: int) -> None:
    bits = np.array([0, 1, 1, 0, 1], dtype=np.uint8)
    states = replica_states(bits, r).reshape(len(bits), r)
    assert states.dtype == bool
    np.testing.assert_array_equal(states.sum(axis=1), r // 2)
    np.testing.assert_array_equal(states[:, 0::2], np.repeat(bits[:, None] == 1, r // 2, 1))
    np.testing.assert_array_equal(states[:, 1::2], np.repeat(bits[:, None] == 0, r // 2, 1))


# --- writing -------------------------------------------------------------------------------------


def _check_written(ticket, params, positions, bits, written) -> None:
    """Every promise of write_bits, checked against the definition layer by layer."""
    mask, trained, rewind = ticket.mask, ticket.trained, ticket.rewind
    new = written.mask
    assert set(new) == set(mask)
    for name in mask:
        if name not in params.layer_names:
            assert torch.equal(new[name], mask[name]), name
            assert name not in written.carriers
    bounds = np.cumsum([0, *(layer.bits for layer in params.layers)])
    for i, (layer, pos) in enumerate(zip(params.layers, positions, strict=True)):
        old, m = mask[layer.name], new[layer.name]
        states = replica_states(bits[bounds[i] : bounds[i + 1]], params.repetition)
        out, inp = layer.shape
        assert m.shape == old.shape and m.dtype == torch.bool
        # The weight count is unchanged, to the weight.
        assert int(m.sum()) == int(old.sum()), layer.name
        # Every written entry has its state.
        conn = channel_connectivity(m).reshape(-1)
        np.testing.assert_array_equal(conn[torch.as_tensor(pos)].numpy(), states)
        old_k = old.reshape(out * inp, -1)
        new_k = m.reshape(out * inp, -1)
        size = old_k.shape[1]
        rew = rewind[layer.name].abs().reshape(out * inp, -1)
        tr_k = trained[layer.name].abs().reshape(out * inp, -1)
        carriers = written.carriers[layer.name]
        # One carrier per connected entry, inside the new mask, in the entry's kernel.
        assert len(carriers) == int(states.sum())
        assert new_k.reshape(-1)[carriers].all()
        assert sorted((carriers // size).tolist()) == sorted(pos[states].tolist())
        carrier_of = {int(c) // size: int(c) % size for c in carriers}
        for p, on in zip(pos.tolist(), states.tolist(), strict=True):
            if not on:
                assert not new_k[p].any()
            elif old_k[p].any():
                assert torch.equal(new_k[p], old_k[p])  # an existing connection is kept as is
                alive = torch.where(old_k[p], tr_k[p], torch.tensor(-1.0))
                assert carrier_of[p] == int(alive.argmax())
            else:
                assert int(new_k[p].sum()) == 1
                assert carrier_of[p] == int(rew[p].argmax())
                assert bool(new_k[p, carrier_of[p]])
        # Outside the written kernels only the count-restoring entries change, all one way.
        inside = torch.zeros(out * inp, dtype=torch.bool)
        inside[torch.as_tensor(pos)] = True
        delta = int(new_k[inside].sum()) - int(old_k[inside].sum())
        outside_old, outside_new = old_k[~inside], new_k[~inside]
        removed = outside_old & ~outside_new
        revived = outside_new & ~outside_old
        assert int(removed.sum()) == max(delta, 0)
        assert int(revived.sum()) == max(-delta, 0)
        tr = tr_k[~inside]
        rw = rew[~inside]
        if delta > 0:  # pruned the smallest trained survivors
            assert tr[removed].max() <= tr[outside_new].min()
        if delta < 0:  # revived the largest rewind entries
            assert rw[revived].min() >= rw[~outside_new].max()


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_write_bits_keeps_counts_and_reads_back(make_ticket, keep: float, seed: int) -> None:
    ticket = make_ticket(width=32, keep=keep, seed=seed)
    params = plan_embedding(ticket.mask, LAYERS, EccParams(64))
    key = bytes([seed]) * 32
    positions = keyed_positions(key, params)
    bits = _bits(params.num_bits, seed)
    before = {n: m.clone() for n, m in ticket.mask.items()}
    written = write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits)
    # Pure: the input mask is untouched.
    for n, m in ticket.mask.items():
        assert torch.equal(m, before[n]), n
    assert isinstance(written.mask, Mask) and written.mask is not ticket.mask
    _check_written(ticket, params, positions, bits, written)
    reading = bits_from_mask(written.mask, params, positions)
    assert not reading.erased.any()
    np.testing.assert_array_equal(reading.bits, bits)
    assert written.mask != ticket.mask


@pytest.mark.parametrize("value", [0, 1])
def test_write_bits_all_zeros_and_all_ones(make_ticket, value: int) -> None:
    """The extreme codewords: every even replica connected, or every odd one."""
    ticket, params = _params(make_ticket, keep=0.3)
    positions = keyed_positions(SEED, params)
    bits = np.full(params.num_bits, value, dtype=np.uint8)
    written = write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits)
    _check_written(ticket, params, positions, bits, written)


def test_write_bits_conv_layers_at_their_capacity(make_ticket) -> None:
    """conv2 and conv3 alone hold a 768-bit codeword at 2 replicas: all of their quarters."""
    ticket = make_ticket(width=32, keep=0.3)
    layers = ["conv2.weight", "conv3.weight"]
    params = plan_embedding(ticket.mask, layers, EccParams(32), repetition=2)
    assert [layer.bits for layer in params.layers] == [256, 512]
    positions = keyed_positions(SEED, params)
    bits = _bits(768, 3)
    written = write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits)
    _check_written(ticket, params, positions, bits, written)


@pytest.mark.parametrize("keep", [0.02, 0.9])
def test_an_accepted_plan_can_always_be_written(make_ticket, keep: float) -> None:
    ticket = make_ticket(width=32, keep=keep)
    try:
        params = plan_embedding(ticket.mask, LAYERS, EccParams(64))
    except EmbeddingError:
        return  # refusing the plan is a correct answer
    positions = keyed_positions(SEED, params)
    bits = _bits(params.num_bits, 0)
    written = write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits)
    _check_written(ticket, params, positions, bits, written)


def test_write_bits_refuses_wrong_inputs(make_ticket) -> None:
    ticket, params = _params(make_ticket)
    positions = keyed_positions(SEED, params)
    with pytest.raises(EmbeddingError, match="1023 bits given for 1024 groups"):
        write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, _bits(1023, 0))
    other = make_ticket(width=16, keep=0.3)
    with pytest.raises(EmbeddingError, match="does not fit"):
        write_bits(other.mask, other.trained, other.rewind, params, positions, _bits(1024, 0))


def test_write_bits_without_rewind_uses_trained_magnitudes(make_ticket) -> None:
    ticket, params = _params(make_ticket)
    positions = keyed_positions(SEED, params)
    bits = _bits(params.num_bits, 4)
    written = write_bits(ticket.mask, ticket.trained, {}, params, positions, bits)
    reading = bits_from_mask(written.mask, params, positions)
    np.testing.assert_array_equal(reading.bits, bits)
    for n in LAYERS:
        assert int(written.mask[n].sum()) == int(ticket.mask[n].sum())


# --- carriers ------------------------------------------------------------------------------------


def test_carrier_floors_are_the_layer_quantile_at_the_carriers(make_ticket) -> None:
    ticket, params = _params(make_ticket)
    positions = keyed_positions(SEED, params)
    written = write_bits(
        ticket.mask, ticket.trained, ticket.rewind, params, positions, _bits(1024, 6)
    )
    floors = carrier_floors(ticket.trained, ticket.mask, written.carriers, 0.75)
    assert set(floors) == set(params.layer_names)
    for name, floor in floors.items():
        alive = ticket.trained[name][ticket.mask[name]].abs()
        level = float(torch.quantile(alive.float(), 0.75))
        flat = floor.reshape(-1)
        assert floor.shape == ticket.trained[name].shape
        assert torch.allclose(flat[written.carriers[name]], torch.tensor(level))
        outside = torch.ones(flat.numel(), dtype=torch.bool)
        outside[written.carriers[name]] = False
        assert not flat[outside].any()
    none = carrier_floors(ticket.trained, ticket.mask, written.carriers, 0.0)
    assert all(not f.any() for f in none.values())
    with pytest.raises(EmbeddingError, match="quantile"):
        carrier_floors(ticket.trained, ticket.mask, written.carriers, 1.0)


# --- reading -------------------------------------------------------------------------------------


def _signed_weights(make_ticket, seed: int = 7, repetition: int | None = None):
    """A ticket with a codeword written, its weights (carriers at twice the typical size)."""
    ticket, params = _params(make_ticket, repetition=repetition)
    positions = keyed_positions(bytes([seed]) * 32, params)
    bits = _bits(params.num_bits, seed)
    written = write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits)
    weights = {}
    for name in LAYERS:
        w = torch.where(written.mask[name], ticket.trained[name], 0.0)
        w = torch.where(written.mask[name] & (w == 0), ticket.rewind[name], w)
        flat = w.reshape(-1).clone()
        scale = flat[flat != 0].abs().median()
        carriers = written.carriers.get(name)
        if carriers is not None:
            flat[carriers] = torch.copysign(2 * scale.expand(len(carriers)), flat[carriers])
        weights[name] = flat.view(w.shape)
    return params, positions, bits, weights


@pytest.mark.parametrize("rate", [0.3, 0.6, 0.9])
def test_pruning_only_erases_never_flips(make_ticket, rate: float) -> None:
    """Removing weights (any of them, at random) can erase groups but never turn one wrong."""
    params, positions, bits, weights = _signed_weights(make_ticket)
    gen = torch.Generator().manual_seed(int(rate * 10))
    pruned = {n: w * (torch.rand(w.shape, generator=gen) > rate) for n, w in weights.items()}
    reading = read_groups(pruned, params, positions)
    decided = ~reading.erased
    assert decided.any() and reading.erased.any()
    np.testing.assert_array_equal(reading.bits[decided], bits[decided])
    # A group is erased only when none of its connected replicas survived.
    full = read_groups(weights, params, positions)
    assert not full.erased.any()
    np.testing.assert_array_equal(full.bits, bits)


def test_weak_additions_are_erasures_or_lose_to_carriers(make_ticket) -> None:
    """Regrowth: every pruned weight regrown tiny. Groups with a carrier still read right;
    groups whose carriers were pruned are erased, not flipped."""
    params, positions, bits, weights = _signed_weights(make_ticket)
    gen = torch.Generator().manual_seed(3)
    attacked = {}
    for name, w in weights.items():
        kept = w * (torch.rand(w.shape, generator=gen) > 0.3)
        tiny = 0.01 * w[w != 0].abs().median() * torch.rand(w.shape, generator=gen)
        attacked[name] = torch.where(kept == 0, tiny, kept)
    reading = read_groups(attacked, params, positions)
    decided = ~reading.erased
    assert decided.mean() > 0.6
    np.testing.assert_array_equal(reading.bits[decided], bits[decided])
    # Without the erasure threshold the tiny regrown weights would decide some groups wrongly.
    pruned_only = read_groups(
        {n: attacked[n] * (attacked[n] > 0.05) for n in attacked}, params, positions
    )
    assert pruned_only.erased.sum() >= reading.erased.sum()


def test_reading_an_unrelated_model_matches_by_chance(make_ticket) -> None:
    """The null of the W2 bits: over 300 seeds, decided groups match half the time."""
    ticket, params = _params(make_ticket, repetition=2)
    magnitudes = layer_strengths(
        observed_magnitudes(ticket.trained, ticket.mask, params.layer_names), params
    )
    matches = decided = 0
    small_p = 0
    for s in range(300):
        seed = bytes([s % 256, s // 256]) + bytes(30)
        positions = keyed_positions(seed, params)
        reading = read_groups(magnitudes, params, positions)
        expected = _bits(params.num_bits, 1000 + s)  # an unrelated codeword
        k = int(((reading.bits == expected) & ~reading.erased).sum())
        matches += k
        decided += reading.decided
        small_p += binomtest(k, reading.decided, 0.5, alternative="greater").pvalue < 0.05
    assert decided > 300 * 300  # the sparse ticket leaves many groups undecided, not all
    assert abs(matches / decided - 0.5) < 0.005
    assert 3 <= small_p <= 30  # about 5% of 300 below p = 0.05


def test_erased_when_equal_or_too_weak(make_ticket) -> None:
    params, positions, bits, weights = _signed_weights(make_ticket, repetition=2)
    equal = {n: torch.ones_like(w) for n, w in weights.items()}
    assert read_groups(equal, params, positions).erased.all()
    zero = {n: torch.zeros_like(w) for n, w in weights.items()}
    assert read_groups(zero, params, positions).erased.all()
    # Scaling a whole layer changes nothing: strengths are compared within a layer.
    scaled = {n: w * 1000.0 for n, w in weights.items()}
    np.testing.assert_array_equal(read_groups(scaled, params, positions).bits, bits)
    # A connected side below ERASE_BELOW of the typical magnitude is no evidence.
    fc1 = params.layers[2]
    start = params.layers[0].bits + params.layers[1].bits
    w = weights["fc1.weight"].clone()
    typical = float(w[w != 0].abs().float().topk(fc1.surviving).values.median())
    written = torch.as_tensor(positions[2])
    w.view(-1)[written] = torch.copysign(
        torch.tensor(0.5 * ERASE_BELOW * typical), w.view(-1)[written]
    ) * (w.view(-1)[written] != 0)
    reading = read_groups({**weights, "fc1.weight": w}, params, positions)
    assert reading.erased[start : start + fc1.bits].mean() > 0.99


def test_missing_or_misshapen_layers_are_erased(make_ticket) -> None:
    params, positions, bits, weights = _signed_weights(make_ticket)
    conv2 = params.layers[0]
    partial = {k: v for k, v in weights.items() if k != "conv3.weight"}
    partial["fc1.weight"] = torch.ones(3, 3)
    reading = read_groups(partial, params, positions)
    assert len(reading.bits) == len(reading.erased) == params.num_bits
    assert reading.unreadable_layers == ("conv3.weight", "fc1.weight")
    assert not reading.erased[: conv2.bits].any()
    assert reading.erased[conv2.bits :].all()
    np.testing.assert_array_equal(reading.bits[: conv2.bits], bits[: conv2.bits])


def test_observed_magnitudes_hide_what_an_explicit_mask_hides(make_ticket) -> None:
    ticket = make_ticket(width=8)
    state = {n: torch.full_like(ticket.trained[n], -2.0) for n in LAYERS}
    hidden = {n: torch.zeros_like(ticket.mask[n]) for n in LAYERS}
    shown = observed_magnitudes(state, None, LAYERS)
    assert all(torch.equal(shown[n], torch.full_like(state[n], 2.0)) for n in LAYERS)
    masked = observed_magnitudes(state, hidden, LAYERS)
    assert all(not masked[n].any() for n in LAYERS)
    ints = observed_magnitudes(
        {"fc1.weight": torch.tensor([[-3, 0]], dtype=torch.int8)}, None, ["fc1.weight", "x"]
    )
    assert torch.equal(ints["fc1.weight"], torch.tensor([[3.0, 0.0]]))


# --- W2Params from untrusted dicts ---------------------------------------------------------------


def test_params_round_trip(make_ticket) -> None:
    _, params = _params(make_ticket, nsym=32)
    data = params.to_dict()
    assert data["scheme"] == "W2" and data["bits"] == 8 * (64 + 32) == params.num_bits
    assert data["payload_bits"] == 512 and data["repetition"] == params.repetition
    back = W2Params.from_dict(copy.deepcopy(data))
    assert back == params
    assert W2Params.from_dict(json.loads(json.dumps(data))) == params


def _valid() -> dict:
    layers = (
        EmbeddingLayer("conv2.weight", (64, 32), 54, 5530),
        EmbeddingLayer("conv3.weight", (64, 64), 108, 11059),
        EmbeddingLayer("fc1.weight", (128, 256), 862, 9830),
    )
    return W2Params(layers, EccParams(64), 4).to_dict()


def _mutate(path: tuple, value):
    data = _valid()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()

MALFORMED = {
    "not a dict": [1, 2],
    "none": None,
    "string": "W2",
    "wrong scheme": _mutate(("scheme",), "W3"),
    "no scheme": _mutate(("scheme",), _DELETE),
    "no ecc": _mutate(("ecc",), _DELETE),
    "ecc not a dict": _mutate(("ecc",), [64]),
    "ecc bool nsym": _mutate(("ecc", "nsym"), True),
    "ecc float nsym": _mutate(("ecc", "nsym"), 64.0),
    "ecc huge nsym": _mutate(("ecc", "nsym"), 10**40),
    "ecc other code": _mutate(("ecc", "code"), "bch"),
    "no repetition": _mutate(("repetition",), _DELETE),
    "odd repetition": _mutate(("repetition",), 3),
    "repetition 0": _mutate(("repetition",), 0),
    "repetition too large": _mutate(("repetition",), 18),
    "repetition bool": _mutate(("repetition",), True),
    "repetition float": _mutate(("repetition",), 4.0),
    "no reading": _mutate(("reading",), _DELETE),
    "no layers": _mutate(("layers",), _DELETE),
    "empty layers": _mutate(("layers",), []),
    "layers a dict": _mutate(("layers",), {"a": 1}),
    "layer not a dict": _mutate(("layers", 0), "conv2.weight"),
    "name missing": _mutate(("layers", 0, "name"), _DELETE),
    "name empty": _mutate(("layers", 0, "name"), ""),
    "name a number": _mutate(("layers", 0, "name"), 7),
    "name too long": _mutate(("layers", 0, "name"), "x" * 301),
    "shape 3d": _mutate(("layers", 0, "shape"), [64, 32, 3]),
    "shape tuple-ish string": _mutate(("layers", 0, "shape"), "64x32"),
    "shape floats": _mutate(("layers", 0, "shape"), [64.0, 32.0]),
    "shape bools": _mutate(("layers", 0, "shape"), [True, 32]),
    "shape zero": _mutate(("layers", 0, "shape"), [0, 32]),
    "shape negative": _mutate(("layers", 0, "shape"), [-64, 32]),
    "shape none": _mutate(("layers", 0, "shape"), None),
    "bits bool": _mutate(("layers", 0, "bits"), True),
    "bits float": _mutate(("layers", 0, "bits"), 54.0),
    "bits string": _mutate(("layers", 0, "bits"), "54"),
    "bits zero": _mutate(("layers", 0, "bits"), 0),
    "groups beyond the matrix": _mutate(("layers", 0, "bits"), 64 * 32 // 4 + 1),
    "surviving bool": _mutate(("layers", 0, "surviving"), False),
    "surviving negative": _mutate(("layers", 0, "surviving"), -1),
    "surviving float": _mutate(("layers", 0, "surviving"), 5530.0),
    "surviving missing": _mutate(("layers", 0, "surviving"), _DELETE),
    "bits not the codeword": _mutate(("layers", 0, "bits"), 55),
    "total not the codeword": _mutate(("bits",), 1023),
    "total missing": _mutate(("bits",), _DELETE),
    "total bool": _mutate(("bits",), True),
    "codeword of another nsym": _mutate(("ecc", "nsym"), 32),
}


def _duplicate() -> dict:
    data = _valid()
    data["layers"][1]["name"] = "conv2.weight"
    return data


MALFORMED["duplicate layer"] = _duplicate()


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_params_from_dict_rejects_malformed(data) -> None:
    with pytest.raises((EmbeddingError, ConfigError)):
        W2Params.from_dict(data)


def test_params_from_dict_fuzz_raises_only_library_errors() -> None:
    """Random replacements anywhere in a valid dict: a W2Params or a library error, nothing else."""
    rng = np.random.default_rng(0)
    values = [None, True, False, 0, 1, -1, 2**70, 1.5, float("nan"), "", "x", [], {}, [1], [1, 2]]
    values += [{"name": "a"}, [[1]], "conv2.weight", 1024, 64, 4, 6]
    paths = [("scheme",), ("bits",), ("ecc",), ("ecc", "nsym"), ("ecc", "code"), ("layers",)]
    paths += [("repetition",)]
    for i in range(3):
        paths += [("layers", i)] + [
            ("layers", i, k) for k in ("name", "shape", "bits", "surviving")
        ]
    accepted = 0
    for _ in range(600):
        data = _valid()
        for _ in range(int(rng.integers(1, 3))):
            path = paths[int(rng.integers(len(paths)))]
            value = values[int(rng.integers(len(values)))]
            target = data
            try:
                for key in path[:-1]:
                    target = target[key]
                target[path[-1]] = copy.deepcopy(value)
            except (KeyError, IndexError, TypeError):
                continue
        try:
            params = W2Params.from_dict(data)
        except (EmbeddingError, ConfigError):
            continue
        accepted += 1
        assert params.num_bits == 8 * (64 + params.ecc.nsym)
        assert params.repetition % 2 == 0
    assert 0 < accepted < 100  # some mutations keep a valid dict; most do not


def test_from_dict_refuses_another_position_whitening_or_reading_method(make_ticket) -> None:
    _, params = _params(make_ticket)
    for field, value in (
        ("positions", "keyed PCG64, seed HKDF-SHA256(seed)"),
        ("whitening", "x"),
        ("reading", "presence only"),
    ):
        data = params.to_dict()
        data[field] = value
        with pytest.raises(
            EmbeddingError, match=f"{field} .* is not the method this version reads"
        ):
            W2Params.from_dict(data)


def test_from_dict_refuses_the_layout_of_version_0_1_clearly() -> None:
    data = _valid()
    del data["repetition"], data["reading"]
    data["positions"] = "keyed Fisher-Yates over the ChaCha20 keystream, key HKDF-SHA256(seed)"
    with pytest.raises(EmbeddingError, match=r"issued by ticketguard 0\.1.*sign the ticket again"):
        W2Params.from_dict(data)


def test_the_bits_every_signature_shares_are_not_counted(make_ticket) -> None:
    """Codeword bits 504..507 are 0 in every Ed25519 signature: a claimant could choose a seed
    at which they read right, so the statistic leaves them out."""
    from ticketguard.signatures.payload import CONSTANT_BITS
    from ticketguard.signatures.w2 import GroupReading

    bits = _bits(1024, 9)
    reading = GroupReading(bits, np.zeros(1024, dtype=bool), np.ones(1024))
    assert reading.matches(bits) == (1020, 1020)
    assert not reading.counted[CONSTANT_BITS].any()
    wrong = bits.copy()
    wrong[CONSTANT_BITS] ^= 1
    assert reading.matches(wrong) == (1020, 1020)
    erased = np.zeros(1024, dtype=bool)
    erased[:10] = True
    assert GroupReading(bits, erased, np.ones(1024)).matches(bits) == (1010, 1010)
