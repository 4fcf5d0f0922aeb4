"""Tests of the traced channel structure: function-preserving permutations, a hand-checked trace.

The central property: a random permutation drawn from `ChannelStructure.random_permutation` and
applied with `permute_state` leaves a network's outputs unchanged (batch-norm statistics are
randomised so a forgotten running mean would show), while it really moves most channel tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ticketguard.errors import TopologyError
from ticketguard.signatures.structure import (
    ChannelStructure,
    example_input,
    structure_of,
    trace_structure,
)
from ticketguard.tickets.models import build_model

# --- models defined here -------------------------------------------------------------------------


class TinyDense(nn.Module):
    """A DenseNet-like model: every layer reads the concatenation of all earlier features."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 4, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(14)
        self.transition = nn.Conv2d(14, 8, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = F.relu(self.bn0(self.stem(x)))
        x1 = torch.cat([x0, self.conv1(F.relu(self.bn1(x0)))], 1)
        x2 = torch.cat([x1, self.conv2(F.relu(self.bn2(x1)))], dim=1)
        x3 = F.avg_pool2d(self.transition(F.relu(self.bn3(x2))), 2)
        x3 = F.relu(self.bn4(x3))
        return self.fc(F.adaptive_avg_pool2d(x3, 1).flatten(1))


class Tiny(nn.Module):
    """Small enough to trace by hand: conv, BN, a 1x1 conv added back, 2x2 pooling, flatten, fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1, bias=False)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + self.conv2(x)
        x = F.adaptive_avg_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


class Unusual(nn.Module):
    """conv1 -> conv2 -> (an operation the tracer does not understand) -> conv3 -> fc."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, 8) if kind == "groupnorm" else nn.BatchNorm2d(8)
        width = 16 if kind == "cat twice" else 8
        self.conv3 = nn.Conv2d(width, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.norm(self.conv2(x))
        if self.kind == "roll":
            x = torch.roll(x, 1, dims=1)
        elif self.kind == "cat twice":
            x = torch.cat([x, x], 1)
        x = F.relu(self.bn3(self.conv3(F.relu(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _registry(arch: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: build_model(arch, 10, kwargs)


#: (id, model factory, input shape without the batch dimension)
MODELS = [
    ("digits_cnn", _registry("digits_cnn", width=4), (1, 8, 8)),
    ("resnet20", _registry("resnet20"), (3, 32, 32)),
    ("vgg16_cifar", _registry("vgg16_cifar"), (3, 32, 32)),
    ("resnet18_cifar", _registry("resnet18_cifar"), (3, 32, 32)),
    ("torchvision resnet18", _registry("resnet18"), (3, 32, 32)),
    ("densenet-like cat", TinyDense, (3, 8, 8)),
]


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Give every norm layer non-trivial statistics and affine parameters, so they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def _check_function_preserved(
    factory: Callable[[], nn.Module],
    shape: tuple[int, ...],
    seed: int = 0,
    traced: tuple[nn.Module, ChannelStructure] | None = None,
) -> tuple[ChannelStructure, np.ndarray, dict, dict]:
    """Permute a randomised model with a random structure permutation; outputs must not change."""
    x = example_input(shape, batch=2)
    if traced is None:
        model = _randomise(factory(), seed)
        structure = trace_structure(model, x)
    else:
        model, structure = traced
    perm = structure.random_permutation(np.random.default_rng(seed))
    state = model.state_dict()
    permuted = structure.permute_state(state, perm)
    other = factory().eval()
    other.load_state_dict(permuted)
    with torch.no_grad():
        expected, got = model(x), other(x)
    scale = float(expected.abs().max())
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * max(scale, 1.0)), float(
        (got - expected).abs().max()
    )
    return structure, perm, state, permuted


@pytest.fixture(scope="module", params=MODELS, ids=[m[0] for m in MODELS])
def traced(request: pytest.FixtureRequest):
    """(factory, input shape, randomised model, its traced structure), once per model."""
    _, factory, shape = request.param
    model = _randomise(factory(), 0)
    return factory, shape, model, trace_structure(model, example_input(shape, batch=2))


@functools.cache
def _resnet20() -> ChannelStructure:
    return structure_of("resnet20", 10, (3, 32, 32))


def _is_permutation(perm: np.ndarray, n: int) -> bool:
    return np.array_equal(np.sort(perm), np.arange(n))


# --- function-preserving permutations ------------------------------------------------------------


def test_random_permutation_preserves_the_function(traced) -> None:
    factory, shape, model, structure = traced
    structure, perm, state, permuted = _check_function_preserved(
        factory, shape, traced=(model, structure)
    )
    assert _is_permutation(perm, structure.num_nodes)
    # Most of the permutation really moves nodes...
    assert (perm != structure.identity()).mean() > 0.5
    # ...and most tensors indexed by channels really change (the logits' bias is one that cannot).
    names = sorted({p.name for p in structure.parameters})
    assert names, "no channel-indexed tensor was found"
    changed = [n for n in names if not torch.equal(state[n], permuted[n])]
    assert len(changed) >= 0.8 * len(names), sorted(set(names) - set(changed))
    # Tensors that are no channel parameter (e.g. num_batches_tracked) are passed through.
    for key in set(state) - set(names):
        assert torch.equal(state[key], permuted[key]), key
    # A permuted tensor holds the same values, reordered.
    for n in changed:
        assert state[n].shape == permuted[n].shape
        torch.testing.assert_close(state[n].double().sum(), permuted[n].double().sum())


def test_fixed_nodes_never_move(traced) -> None:
    factory, shape, _, structure = traced
    fixed = structure.fixed
    assert set(structure.sources.tolist()) <= set(fixed.tolist())
    assert set(structure.targets.tolist()) <= set(fixed.tolist())
    assert len(structure.sources) == shape[0]
    assert len(structure.targets) == (5 if factory is TinyDense else 10)
    moved = np.zeros(structure.num_nodes, dtype=bool)
    for seed in range(5):
        perm = structure.random_permutation(np.random.default_rng(seed))
        np.testing.assert_array_equal(perm[fixed], fixed)
        moved |= perm != structure.identity()
    # Everything not fixed moves under some permutation, unless its class has no twin.
    assert moved[fixed].sum() == 0
    assert moved.sum() > 0.5 * structure.num_nodes
    # No permutation type holds a fixed node.
    for members in structure.permutation_types():
        assert not np.isin(members, fixed).any()


def test_permutation_types_are_whole_tie_classes() -> None:
    structure = _resnet20()
    classes = structure.tie_class
    for members in structure.permutation_types():
        assert members.ndim == 2 and members.shape[0] >= 2
        # Each row is one whole class, and the rows of a type have the same spaces in order.
        for row in members:
            assert len(np.unique(classes[row])) == 1
            assert set(row.tolist()) == set(np.flatnonzero(classes == classes[row[0]]).tolist())
        spaces = structure.node_space[members]
        assert (spaces == spaces[0]).all()


def test_resnet20_zero_padded_shortcut_channels() -> None:
    """Option A pads 16 stage-1 channels with 8 zero channels on each side into stage 2."""
    structure = _resnet20()
    space_names = [name for name, _ in structure.spaces]
    stem = space_names.index("conv1")
    stem_classes = set(structure.tie_class[structure.node_space == stem].tolist())
    out = structure.layers["layers.1.0.conv2.weight"].out_nodes
    assert len(out) == 32
    joined = [int(structure.tie_class[v]) in stem_classes for v in out]
    # The stem's residual stream occupies the middle 16 channels of stage 2, the rest are new.
    assert joined == [False] * 8 + [True] * 16 + [False] * 8
    # Stage 3 pads stage 2's 32 channels with 16 on each side.
    out3 = structure.layers["layers.2.0.conv2.weight"].out_nodes
    stage2_classes = set(structure.tie_class[out].tolist())
    joined3 = [int(structure.tie_class[v]) in stage2_classes for v in out3]
    assert joined3 == [False] * 16 + [True] * 32 + [False] * 16
    # A stage-1 block's two convs are not tied to the stream inside the block.
    inner = structure.layers["layers.0.0.conv1.weight"].out_nodes
    assert not (set(structure.tie_class[inner].tolist()) & stem_classes)


def test_option_b_shortcut_ties_the_projection_to_the_stream() -> None:
    """With 1x1-conv shortcuts, the projection's outputs join the block's residual stream."""
    structure = structure_of("resnet18", 10, (3, 32, 32))
    conv = structure.layers["layer2.0.conv2.weight"].out_nodes
    projection = structure.layers["layer2.0.downsample.0.weight"].out_nodes
    np.testing.assert_array_equal(structure.tie_class[conv], structure.tie_class[projection])
    # The projection reads stage 1's stream, which is not tied to stage 2's.
    src = structure.layers["layer2.0.downsample.0.weight"].in_nodes
    assert not (set(structure.tie_class[src].tolist()) & set(structure.tie_class[conv].tolist()))


def test_densenet_concatenation_maps_channels_in_order() -> None:
    structure = trace_structure(TinyDense(), example_input((3, 8, 8)))
    stem = structure.layers["stem.weight"].out_nodes
    conv1 = structure.layers["conv1.weight"].out_nodes
    conv2 = structure.layers["conv2.weight"].out_nodes
    np.testing.assert_array_equal(structure.layers["conv1.weight"].in_nodes, stem)
    np.testing.assert_array_equal(
        structure.layers["conv2.weight"].in_nodes, np.concatenate([stem, conv1])
    )
    np.testing.assert_array_equal(
        structure.layers["transition.weight"].in_nodes, np.concatenate([stem, conv1, conv2])
    )
    bn3 = [p for p in structure.parameters if p.name == "bn3.running_mean"]
    assert len(bn3) == 1
    np.testing.assert_array_equal(bn3[0].nodes, np.concatenate([stem, conv1, conv2]))
    assert len(structure.links) == 0  # concatenation makes no new nodes and no links


# --- a model traced by hand ----------------------------------------------------------------------


def test_hand_checked_tiny_model() -> None:
    structure = trace_structure(Tiny(), torch.randn(2, 2, 4, 4))
    # Nodes: input 0-1, conv1 2-4, conv2 5-7, the addition 8-10, flatten 11-22, fc 23-27.
    assert structure.num_nodes == 28
    assert [kind for _, kind in structure.spaces] == [
        "input",
        "conv",
        "conv",
        "add",
        "flatten",
        "linear",
    ]
    assert [name for name, _ in structure.spaces][:3] == ["input", "conv1", "conv2"]
    np.testing.assert_array_equal(
        structure.node_space, np.repeat(np.arange(6), [2, 3, 3, 3, 12, 5])
    )
    np.testing.assert_array_equal(structure.node_position[11:23], np.arange(12))

    assert list(structure.layers) == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert structure.layer_order() == ["conv1.weight", "conv2.weight", "fc.weight"]
    conv1, conv2, fc = structure.layers.values()
    assert (conv1.kind, conv1.weight_shape, conv1.groups) == ("conv", (3, 2, 3, 3), 1)
    np.testing.assert_array_equal(conv1.in_nodes, [0, 1])
    np.testing.assert_array_equal(conv1.out_nodes, [2, 3, 4])
    assert (conv2.kind, conv2.weight_shape) == ("conv", (3, 3, 1, 1))
    np.testing.assert_array_equal(conv2.in_nodes, [2, 3, 4])
    np.testing.assert_array_equal(conv2.out_nodes, [5, 6, 7])
    assert (fc.kind, fc.weight_shape, fc.in_channels) == ("linear", (5, 12), 12)
    np.testing.assert_array_equal(fc.in_nodes, np.arange(11, 23))
    np.testing.assert_array_equal(fc.out_nodes, np.arange(23, 28))

    # Links: both addends to the sum, then each channel to its 4 flattened features.
    expected_links = {(2, 8), (3, 9), (4, 10), (5, 8), (6, 9), (7, 10)}
    expected_links |= {(8 + c, 11 + 4 * c + s) for c in range(3) for s in range(4)}
    assert {tuple(link) for link in structure.links.tolist()} == expected_links

    # Tie classes: conv1 channel c, conv2 channel c, the sum's channel c and its 4 features.
    classes = structure.tie_class
    groups = {}
    for v in range(structure.num_nodes):
        groups.setdefault(int(classes[v]), set()).add(v)
    expected_groups = [{2 + c, 5 + c, 8 + c, *range(11 + 4 * c, 15 + 4 * c)} for c in range(3)]
    expected_groups += [{v} for v in (0, 1, *range(23, 28))]
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, expected_groups))

    np.testing.assert_array_equal(structure.sources, [0, 1])
    np.testing.assert_array_equal(structure.targets, np.arange(23, 28))
    np.testing.assert_array_equal(structure.fixed, [0, 1, *range(23, 28)])
    types = structure.permutation_types()
    assert len(types) == 1
    np.testing.assert_array_equal(
        types[0], [[2 + c, 5 + c, 8 + c, *range(11 + 4 * c, 15 + 4 * c)] for c in range(3)]
    )

    params = {(p.name, p.dim): p.nodes.tolist() for p in structure.parameters}
    assert params == {
        ("conv1.weight", 0): [2, 3, 4],
        ("conv1.weight", 1): [0, 1],
        ("conv1.bias", 0): [2, 3, 4],
        ("bn1.weight", 0): [2, 3, 4],
        ("bn1.bias", 0): [2, 3, 4],
        ("bn1.running_mean", 0): [2, 3, 4],
        ("bn1.running_var", 0): [2, 3, 4],
        ("conv2.weight", 0): [5, 6, 7],
        ("conv2.weight", 1): [2, 3, 4],
        ("fc.weight", 0): list(range(23, 28)),
        ("fc.weight", 1): list(range(11, 23)),
        ("fc.bias", 0): list(range(23, 28)),
    }
    assert structure.notes == []


def test_hand_checked_permutation_of_tiny_model() -> None:
    """Swap classes 0 and 2: every tensor moves exactly as worked out by hand."""
    model = _randomise(Tiny(), 3)
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    structure = trace_structure(model, x)
    perm = structure.identity()
    members = structure.permutation_types()[0]
    perm[members.ravel()] = members[[2, 1, 0]].ravel()
    state = model.state_dict()
    new = structure.permute_state(state, perm)
    np.testing.assert_array_equal(structure.gather_index(np.array([2, 3, 4]), perm), [2, 1, 0])
    assert torch.equal(new["conv1.weight"], state["conv1.weight"][[2, 1, 0]])
    assert torch.equal(new["bn1.running_var"], state["bn1.running_var"][[2, 1, 0]])
    assert torch.equal(new["conv2.weight"], state["conv2.weight"][[2, 1, 0]][:, [2, 1, 0]])
    features = [8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3]
    assert torch.equal(new["fc.weight"], state["fc.weight"][:, features])
    assert torch.equal(new["fc.bias"], state["fc.bias"])
    other = Tiny().eval()
    other.load_state_dict(new)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))


def test_gather_index_keeps_constant_channels_and_refuses_escapes() -> None:
    structure = trace_structure(Tiny(), torch.randn(2, 2, 4, 4))
    perm = structure.identity()
    perm[[2, 3]] = [3, 2]
    # A padded map: constant channels stay, the two real ones swap.
    np.testing.assert_array_equal(
        structure.gather_index(np.array([-1, 2, 3, -1]), perm), [0, 2, 1, 3]
    )
    # A permutation that sends a channel's content outside the tensor is refused.
    with pytest.raises(TopologyError, match="outside its tensor"):
        structure.gather_index(np.array([2, 4]), perm)


# --- operations the tracer does not understand ---------------------------------------------------


@pytest.mark.parametrize("kind", ["roll", "groupnorm", "cat twice"])
def test_unknown_operation_fixes_its_channels(kind: str) -> None:
    structure, perm, state, permuted = _check_function_preserved(
        lambda: Unusual(kind), (3, 6, 6), seed=1
    )
    conv2 = structure.layers["conv2.weight"].out_nodes
    assert np.isin(conv2, structure.fixed).all()
    assert structure.notes, "the trace should say which channels it could not follow"
    expected_note = {"roll": "roll", "groupnorm": "GroupNorm", "cat twice": "twice"}[kind]
    assert any(expected_note in note for note in structure.notes), structure.notes
    # conv2's outputs stay put; conv1's and conv3's (known operations only) still move.
    np.testing.assert_array_equal(perm[conv2], conv2)
    for name in ("conv1.weight", "conv3.weight"):
        out = structure.layers[name].out_nodes
        assert not np.isin(out, structure.fixed).any()
        assert (perm[out] != out).any(), name
    if kind == "roll":
        # After the roll the channel identity is lost: conv3 reads constants, not channels.
        assert (structure.layers["conv3.weight"].in_nodes == -1).all()
    if kind == "cat twice":
        np.testing.assert_array_equal(
            structure.layers["conv3.weight"].in_nodes, np.concatenate([conv2, conv2])
        )


# --- untraceable models --------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class NoLayers(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(5, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(
    ("model", "example", "message"),
    [
        (DataDependent(), torch.randn(2, 3, 6, 6), "cannot trace"),
        (Broken(), torch.randn(2, 3, 6, 6), "cannot trace"),
        (NoLayers(), torch.randn(2, 3, 6, 6), "no conv or linear layer"),
        (DictOutput(), torch.randn(2, 3, 6, 6), "cannot follow the channels"),
        (nn.Linear(4, 2), torch.randn(4), "not a batch of channel tensors"),
    ],
    ids=["control flow", "shape error", "no layers", "dict output", "1-d input"],
)
def test_untraceable_models_raise_one_line(model: nn.Module, example, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        trace_structure(model, example)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert len(text) < 400


def test_example_input_is_deterministic() -> None:
    a = example_input((3, 5, 5))
    b = example_input([3, 5, 5])
    assert a.shape == (2, 3, 5, 5)
    assert torch.equal(a, b)
    assert example_input((3, 5, 5), batch=4).shape == (4, 3, 5, 5)
    assert a.std() > 0.5


def test_structure_of_registry_architecture() -> None:
    structure = structure_of("digits_cnn", 7, (1, 8, 8), {"width": 4})
    assert list(structure.layers) == [
        "conv1.weight",
        "conv2.weight",
        "conv3.weight",
        "fc1.weight",
        "fc.weight",
    ]
    assert structure.layers["conv2.weight"].weight_shape == (8, 4, 3, 3)
    assert structure.layers["fc1.weight"].weight_shape == (128, 32)
    assert len(structure.targets) == 7
    # fc1 reads the 8 conv3 channels flattened over 2x2 positions, each tied to its channel.
    conv3 = structure.layers["conv3.weight"].out_nodes
    fc1_in = structure.layers["fc1.weight"].in_nodes
    np.testing.assert_array_equal(
        structure.tie_class[fc1_in], np.repeat(structure.tie_class[conv3], 4)
    )
