"""Tests of scheme W2: the embedding plan, keyed positions, writing and reading bits, parameters."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from ticketguard.errors import ConfigError, EmbeddingError
from ticketguard.signatures.payload import EccParams
from ticketguard.signatures.signing import excluded_layers
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.signatures.w2 import (
    MAX_LAYER_FRACTION,
    EmbeddingLayer,
    W2Params,
    eligible_layers,
    keyed_positions,
    plan_embedding,
    position_matrices,
    read_bits,
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
    assert params.num_bits == 8 * (64 + nsym)
    assert params.ecc == EccParams(nsym)
    assert params.layer_names == [n for n in layers if n in params.layer_names]
    capacity = {}
    for layer in params.layers:
        m = ticket.mask[layer.name]
        conn = channel_connectivity(m)
        assert layer.shape == tuple(conn.shape)
        assert layer.surviving == int(m.sum())
        kernel = m.numel() // conn.numel()
        count = int(m.sum())
        assert 0 < layer.bits <= MAX_LAYER_FRACTION * conn.numel()
        # Worst cases of the count restoration: each bit 1 adds one weight, each bit 0 prunes a
        # whole kernel, and the positions' own kernels cannot be used to make up for either.
        assert layer.bits * (kernel + 1) <= count
        assert layer.bits * 2 * kernel <= m.numel() - count
        capacity[layer.name] = min(
            int(conn.numel() * MAX_LAYER_FRACTION),
            count // (kernel + 1),
            (m.numel() - count) // (2 * kernel),
        )
    # Spread in proportion to what each layer can hold (largest-remainder rounding).
    total = sum(capacity.values())
    for layer in params.layers:
        share = capacity[layer.name] * params.num_bits / total
        assert abs(layer.bits - share) < 1


def test_plan_of_width32_ticket_is_as_expected(make_ticket) -> None:
    """conv2 64x32, conv3 64x64, fc1 128x256 channels: 512 + 1024 + 4915 bits of capacity.

    conv2 and conv3 are capped at a quarter of their channel matrices; fc1 (30% of 32,768 weights
    kept) by its 9,830 survivors, each bit 1 possibly adding one: 9830 // 2 = 4915.
    """
    ticket = make_ticket(width=32, keep=0.3)
    params = plan_embedding(ticket.mask, LAYERS, EccParams(64))
    assert [layer.shape for layer in params.layers] == [(64, 32), (64, 64), (128, 256)]
    assert [layer.bits for layer in params.layers] == [81, 163, 780]
    assert params.num_bits == 1024


def test_plan_refuses_layers_too_small(make_ticket) -> None:
    ticket = make_ticket(width=4, keep=0.5)  # conv2 8x4, conv3 8x8: 8 + 16 bits of room
    with pytest.raises(EmbeddingError, match="can hold 24 bits, the signature needs 1024"):
        plan_embedding(ticket.mask, ["conv2.weight", "conv3.weight"], EccParams(64))
    # Fewer parity symbols do not help enough: 8 * (64 + 2) = 528 bits.
    with pytest.raises(EmbeddingError, match="needs 528"):
        plan_embedding(ticket.mask, ["conv2.weight", "conv3.weight"], EccParams(2))
    # A layer that is entirely pruned (or entirely kept) has no room at all.
    empty = Mask({**dict(ticket.mask), "fc1.weight": torch.zeros(128, 32, dtype=torch.bool)})
    with pytest.raises(EmbeddingError, match="can hold 0 bits"):
        plan_embedding(empty, ["fc1.weight"], EccParams(64))


# --- eligible layers -----------------------------------------------------------------------------


def _full_ticket(arch: str, kwargs: dict) -> Ticket:
    model = build_model(arch, 10, kwargs)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = prunable_parameters(model)
    mask = Mask({n: torch.ones_like(state[n], dtype=torch.bool) for n in names})
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


# --- keyed positions -----------------------------------------------------------------------------


def _params(make_ticket, nsym: int = 64, keep: float = 0.3) -> tuple[Ticket, W2Params]:
    ticket = make_ticket(width=32, keep=keep)
    return ticket, plan_embedding(ticket.mask, LAYERS, EccParams(nsym))


def test_keyed_positions_are_deterministic_distinct_and_keyed(make_ticket) -> None:
    _, params = _params(make_ticket)
    first = keyed_positions(SEED, params)
    again = keyed_positions(bytes(SEED), params)
    other = keyed_positions(bytes(31) + b"\x01", params)
    assert len(first) == len(params.layers)
    for layer, a, b, c in zip(params.layers, first, again, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert len(a) == layer.bits
        assert len(np.unique(a)) == layer.bits
        assert a.min() >= 0 and a.max() < layer.shape[0] * layer.shape[1]
        # Another seed chooses other positions: they share about bits/size by chance only.
        shared = len(np.intersect1d(a, c))
        expected = layer.bits * layer.bits / (layer.shape[0] * layer.shape[1])
        assert shared < expected + 6 * np.sqrt(expected) + 3
        assert not np.array_equal(np.sort(a), np.sort(c))
    matrices = position_matrices(params, first)
    for layer, pos in zip(params.layers, first, strict=True):
        m = matrices[layer.name]
        assert m.dtype == torch.bool and tuple(m.shape) == layer.shape
        assert int(m.sum()) == layer.bits
        assert m.reshape(-1)[torch.as_tensor(pos)].all()


def test_keyed_positions_spread_over_the_whole_matrix(make_ticket) -> None:
    _, params = _params(make_ticket)
    counts = np.zeros(4)
    for s in range(8):
        pos = keyed_positions(bytes([s]) * 32, params)[2]  # fc1: 128 x 256
        rows = pos // 256
        counts += np.bincount(rows // 32, minlength=4)
    # Each quarter of the rows receives about a quarter of the positions.
    assert (np.abs(counts / counts.sum() - 0.25) < 0.04).all()


# --- writing and reading bits --------------------------------------------------------------------


def _check_written(
    ticket: Ticket,
    params: W2Params,
    positions: list[np.ndarray],
    bits: np.ndarray,
    new: Mask,
) -> None:
    """Every promise of write_bits, checked against the definition layer by layer."""
    mask, trained, rewind = ticket.mask, ticket.trained, ticket.rewind
    assert set(new) == set(mask)
    for name in mask:
        if name not in params.layer_names:
            assert torch.equal(new[name], mask[name]), name
    bounds = np.cumsum([0, *(layer.bits for layer in params.layers)])
    for i, (layer, pos) in enumerate(zip(params.layers, positions, strict=True)):
        old, m = mask[layer.name], new[layer.name]
        layer_bits = bits[bounds[i] : bounds[i + 1]]
        out, inp = layer.shape
        assert m.shape == old.shape and m.dtype == torch.bool
        # The weight count is unchanged, to the weight.
        assert int(m.sum()) == int(old.sum()), layer.name
        # The bits read back exactly.
        conn = channel_connectivity(m).reshape(-1)
        np.testing.assert_array_equal(conn[torch.as_tensor(pos)].numpy(), layer_bits)
        old_k = old.reshape(out * inp, -1)
        new_k = m.reshape(out * inp, -1)
        rew = rewind[layer.name].abs().reshape(out * inp, -1)
        for p, bit in zip(pos.tolist(), layer_bits.tolist(), strict=True):
            if bit == 0:
                assert not new_k[p].any()
            elif old_k[p].any():
                assert torch.equal(new_k[p], old_k[p])  # an existing connection is kept as is
            else:
                assert int(new_k[p].sum()) == 1
                assert bool(new_k[p, int(rew[p].argmax())])
        # Outside the embedded kernels only the count-restoring entries change, all one way.
        inside = torch.zeros(out * inp, dtype=torch.bool)
        inside[torch.as_tensor(pos)] = True
        delta = int(new_k[inside].sum()) - int(old_k[inside].sum())
        outside_old, outside_new = old_k[~inside], new_k[~inside]
        removed = outside_old & ~outside_new
        revived = outside_new & ~outside_old
        assert int(removed.sum()) == max(delta, 0)
        assert int(revived.sum()) == max(-delta, 0)
        tr = trained[layer.name].abs().reshape(out * inp, -1)[~inside]
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
    new = write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits)
    # Pure: the input mask is untouched.
    for n, m in ticket.mask.items():
        assert torch.equal(m, before[n]), n
    assert isinstance(new, Mask) and new is not ticket.mask
    _check_written(ticket, params, positions, bits, new)
    read, readable = read_bits(new, params, positions)
    assert readable.all()
    np.testing.assert_array_equal(read, bits)
    # Something really changed (the bits are not all already in place).
    assert new != ticket.mask


@pytest.mark.parametrize("value", [0, 1])
def test_write_bits_all_zeros_and_all_ones(make_ticket, value: int) -> None:
    """The extreme payloads: every position pruned, or every position connected."""
    ticket, params = _params(make_ticket, keep=0.3)
    positions = keyed_positions(SEED, params)
    bits = np.full(params.num_bits, value, dtype=np.uint8)
    new = write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits)
    _check_written(ticket, params, positions, bits, new)


def test_write_bits_single_conv_layer_at_its_capacity(make_ticket) -> None:
    """conv3 alone holds the whole 1024-bit codeword: 25% of its 64x64 connections."""
    ticket = make_ticket(width=32, keep=0.3)
    params = plan_embedding(ticket.mask, ["conv3.weight"], EccParams(64))
    assert [layer.bits for layer in params.layers] == [1024]
    positions = keyed_positions(SEED, params)
    bits = _bits(1024, 3)
    new = write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits)
    _check_written(ticket, params, positions, bits, new)


def test_an_accepted_plan_can_always_be_written(make_ticket) -> None:
    ticket = make_ticket(width=32, keep=0.9)
    try:
        params = plan_embedding(ticket.mask, ["conv3.weight"], EccParams(64))
    except EmbeddingError:
        return  # refusing the plan is a correct answer
    positions = keyed_positions(SEED, params)
    bits = _bits(params.num_bits, 0)
    new = write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits)
    _check_written(ticket, params, positions, bits, new)


def test_write_bits_refuses_wrong_inputs(make_ticket) -> None:
    ticket, params = _params(make_ticket)
    positions = keyed_positions(SEED, params)
    with pytest.raises(EmbeddingError, match="1023 bits given for 1024 positions"):
        write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, _bits(1023, 0))
    other = make_ticket(width=16, keep=0.3)
    with pytest.raises(EmbeddingError, match="does not fit"):
        write_bits(other.mask, other.trained, other.rewind, params, positions, _bits(1024, 0))


def test_write_bits_without_rewind_uses_trained_magnitudes(make_ticket) -> None:
    ticket, params = _params(make_ticket)
    positions = keyed_positions(SEED, params)
    bits = _bits(params.num_bits, 4)
    new = write_bits(ticket.mask, ticket.trained, {}, params, positions, bits)
    read, readable = read_bits(new, params, positions)
    np.testing.assert_array_equal(read, bits)
    for n in LAYERS:
        assert int(new[n].sum()) == int(ticket.mask[n].sum())


def test_read_bits_marks_missing_or_misshapen_layers_unreadable(make_ticket) -> None:
    ticket, params = _params(make_ticket)
    positions = keyed_positions(SEED, params)
    bits = _bits(params.num_bits, 5)
    new = dict(write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits))
    conv2, conv3, fc1 = params.layers
    partial = {k: v for k, v in new.items() if k != "conv3.weight"}
    partial["fc1.weight"] = torch.ones(3, 3, dtype=torch.bool)
    read, readable = read_bits(partial, params, positions)
    assert len(read) == len(readable) == params.num_bits
    np.testing.assert_array_equal(readable[: conv2.bits], True)
    np.testing.assert_array_equal(readable[conv2.bits :], False)
    np.testing.assert_array_equal(read[: conv2.bits], bits[: conv2.bits])
    np.testing.assert_array_equal(read[conv2.bits :], 0)
    # Weights (float, non-zero exactly where the mask is on) read like the mask.
    weights = {n: ticket.rewind[n] * new[n] for n in LAYERS}
    read_w, readable_w = read_bits(weights, params, positions)
    assert readable_w.all()
    np.testing.assert_array_equal(read_w, bits)


# --- W2Params from untrusted dicts ---------------------------------------------------------------


def test_params_round_trip(make_ticket) -> None:
    _, params = _params(make_ticket, nsym=32)
    data = params.to_dict()
    assert data["scheme"] == "W2" and data["bits"] == 8 * (64 + 32) == params.num_bits
    assert data["payload_bits"] == 512
    back = W2Params.from_dict(copy.deepcopy(data))
    assert back == params
    assert W2Params.from_dict(json.loads(json.dumps(data))) == params


def _valid() -> dict:
    layers = (
        EmbeddingLayer("conv2.weight", (64, 32), 54, 5530),
        EmbeddingLayer("conv3.weight", (64, 64), 108, 11059),
        EmbeddingLayer("fc1.weight", (128, 256), 862, 9830),
    )
    return W2Params(layers, EccParams(64)).to_dict()


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
    "bits beyond the matrix": _mutate(("layers", 0, "bits"), 64 * 32 + 1),
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
    values += [{"name": "a"}, [[1]], "conv2.weight", 1024, 64]
    paths = [("scheme",), ("bits",), ("ecc",), ("ecc", "nsym"), ("ecc", "code"), ("layers",)]
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
    assert 0 < accepted < 100  # some mutations keep a valid dict; most do not


def test_from_dict_refuses_another_position_or_whitening_method(make_ticket) -> None:
    _, params = _params(make_ticket)
    for field, value in (("positions", "keyed PCG64, seed HKDF-SHA256(seed)"), ("whitening", "x")):
        data = params.to_dict()
        data[field] = value
        with pytest.raises(
            EmbeddingError, match=f"{field} .* is not the method this version reads"
        ):
            W2Params.from_dict(data)
