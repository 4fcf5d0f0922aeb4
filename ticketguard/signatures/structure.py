"""The channel structure of a network, traced with torch.fx: which channels feed which layer.

Every tensor that carries channels gets a *channel map*: for each index of its channel dimension
(dim 1), the id of the channel node it holds, or -1 for a constant (zero padding). Nodes are made
by the network input, by every conv/linear layer (its output channels), by residual additions
(their outputs, linked to both inputs by identity edges) and by flattening (each feature linked to
its channel). Per-channel operations (batch norm, activations, pooling, spatial slicing) pass maps
through unchanged.

Channels joined by an identity link must be permuted together: they form a *tie class*. Classes
with members in the same spaces are interchangeable, so a function-preserving permutation of the
network is a permutation of classes within each such *type*. Nodes reaching an operation the
tracer does not understand, the network input and the logits are *fixed*: never permuted.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from ticketguard.errors import TopologyError

_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout1d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool2d,
    nn.Identity,
)
_PASS_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.sigmoid,
}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "relu_"}
_TIE_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul}
_TIE_METHODS = {"add", "add_", "mul", "mul_"}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_REDUCE_METHODS = {"mean", "sum", "amax"}


@dataclass(frozen=True)
class Layer:
    """One conv or linear layer: its weight, where its inputs come from, where its outputs go."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    groups: int
    in_nodes: np.ndarray
    out_start: int
    out_channels: int

    @property
    def out_nodes(self) -> np.ndarray:
        return np.arange(self.out_start, self.out_start + self.out_channels)

    @property
    def in_channels(self) -> int:
        return len(self.in_nodes)


@dataclass(frozen=True)
class ChannelParameter:
    """A state-dict tensor indexed by channels along one dimension (weights, biases, BN stats)."""

    name: str
    dim: int
    nodes: np.ndarray


@dataclass
class ChannelStructure:
    """The traced channel structure of an architecture (independent of any mask or weights)."""

    num_nodes: int
    node_space: np.ndarray
    node_position: np.ndarray
    spaces: list[tuple[str, str]]
    layers: dict[str, Layer]
    parameters: list[ChannelParameter]
    links: np.ndarray
    sources: np.ndarray
    targets: np.ndarray
    fixed: np.ndarray
    notes: list[str] = field(default_factory=list)
    _classes: np.ndarray | None = None

    def layer_order(self) -> list[str]:
        """Return the layer names in the order the forward pass runs them."""
        return list(self.layers)

    @property
    def tie_class(self) -> np.ndarray:
        """Return, per node, the id of its tie class (channels that must be permuted together)."""
        if self._classes is None:
            self._classes = _union_find(self.num_nodes, self.links)
        return self._classes

    def permutation_types(self) -> list[np.ndarray]:
        """Return the interchangeable classes: one (classes x members) node array per type.

        Row `a` lists the nodes of class `a` sorted by (space, position); permuting rows within
        one array (a function-preserving permutation) maps member j of a class to member j of
        another. Fixed classes and classes that hold two channels of one space are left out.
        """
        classes = self.tie_class
        order = np.lexsort((self.node_position, self.node_space, classes))
        sorted_classes = classes[order]
        starts = np.flatnonzero(np.r_[True, sorted_classes[1:] != sorted_classes[:-1]])
        ends = np.r_[starts[1:], len(order)]
        fixed_class = np.zeros(self.num_nodes, dtype=bool)
        fixed_class[classes[self.fixed]] = True
        by_type: dict[tuple[int, ...], list[np.ndarray]] = {}
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            members = order[s:e]
            if fixed_class[classes[members[0]]]:
                continue
            spaces = tuple(self.node_space[members].tolist())
            by_type.setdefault(spaces, []).append(members)
        result = []
        for members in by_type.values():
            if len(members) > 1:
                result.append(np.stack(members))
        result.sort(key=lambda m: int(m.min()))
        return result

    def identity(self) -> np.ndarray:
        """Return the identity node permutation."""
        return np.arange(self.num_nodes)

    def random_permutation(self, generator: np.random.Generator) -> np.ndarray:
        """Return a random function-preserving node permutation (new node -> old node)."""
        perm = self.identity()
        for members in self.permutation_types():
            shuffled = members[generator.permutation(len(members))]
            perm[members.ravel()] = shuffled.ravel()
        return perm

    def gather_index(self, nodes: np.ndarray, perm: np.ndarray) -> np.ndarray:
        """Return the index that reorders a dimension with channel map `nodes` by `perm`.

        `perm[v]` is the node whose content should appear at node `v`; the result `g` satisfies
        `new[j] = old[g[j]]`. Constant (-1) entries stay where they are.
        """
        nodes = np.asarray(nodes)
        valid = np.flatnonzero(nodes >= 0)
        position = np.full(self.num_nodes, -1)
        position[nodes[valid]] = valid
        gather = np.arange(len(nodes))
        if len(valid):
            source = perm[nodes[valid]]
            found = position[source]
            # A channel mapped onto itself stays where it is, even where it appears twice (a
            # channel concatenated twice); `position` only knows its last occurrence.
            stays = source == nodes[valid]
            found[stays] = valid[stays]
            if (found < 0).any():
                raise TopologyError(
                    "a permutation moves a channel outside its tensor (inconsistent structure)"
                )
            gather[valid] = found
        return gather

    def permute_state(
        self, state: Mapping[str, torch.Tensor], perm: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """Apply a node permutation to every channel-indexed tensor of a state dict."""
        result = dict(state)
        for param in self.parameters:
            if param.name not in result:
                continue
            gather = torch.as_tensor(self.gather_index(param.nodes, perm))
            tensor = result[param.name]
            result[param.name] = tensor.index_select(param.dim, gather.to(tensor.device))
        return result


def _union_find(n: int, links: np.ndarray) -> np.ndarray:
    """Return the connected-component label of every node under the undirected `links`."""
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    if len(links) == 0:
        return np.arange(n)
    graph = coo_array(
        (np.ones(len(links), dtype=np.int8), (links[:, 0], links[:, 1])), shape=(n, n)
    )
    _, labels = connected_components(graph, directed=False)
    return labels


class _Tracer(torch.fx.Tracer):
    """Keep torch.nn modules (conv, linear, norms, activations, pooling) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *_PASS_MODULES)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _Builder:
    """Walk an fx graph once, creating channel nodes, layers, links and channel parameters."""

    def __init__(self) -> None:
        self.space_of: list[np.ndarray] = []
        self.spaces: list[tuple[str, str]] = []
        self.count = 0
        self.layers: dict[str, Layer] = {}
        self.parameters: list[ChannelParameter] = []
        self.links: list[np.ndarray] = []
        self.fixed: list[np.ndarray] = []
        self.notes: list[str] = []
        self.sources = np.zeros(0, dtype=np.int64)
        self.targets = np.zeros(0, dtype=np.int64)

    def new_space(self, name: str, kind: str, size: int) -> np.ndarray:
        nodes = np.arange(self.count, self.count + size)
        self.count += size
        self.spaces.append((name, kind))
        self.space_of.append(np.full(size, len(self.spaces) - 1))
        return nodes

    def link(self, src: np.ndarray, dst: np.ndarray) -> None:
        keep = src >= 0
        if keep.any():
            self.links.append(np.stack([src[keep], dst[keep]], axis=1))

    def fix(self, nodes: np.ndarray | None, why: str | None = None) -> None:
        if nodes is not None and len(nodes):
            self.fixed.append(nodes[nodes >= 0])
            if why and why not in self.notes:
                self.notes.append(why)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def trace_structure(model: nn.Module, example: torch.Tensor) -> ChannelStructure:
    """Trace `model` on `example` (a batch of inputs) and return its channel structure."""
    from torch.fx.passes.shape_prop import ShapeProp

    model = model.eval()
    try:
        graph = _Tracer().trace(model)
        gm = torch.fx.GraphModule(model, graph)
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # noqa: BLE001 (fx raises anything a model's Python can raise)
        raise TopologyError(
            f"cannot trace the model's channel structure ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'})"
        ) from None
    modules = dict(gm.named_modules())
    b = _Builder()
    maps: dict[torch.fx.Node, np.ndarray | None] = {}

    def arg_map(value: Any) -> np.ndarray | None:
        return maps.get(value) if isinstance(value, torch.fx.Node) else None

    def fix_args(node: torch.fx.Node, what: str) -> None:
        for arg in node.all_input_nodes:
            b.fix(maps.get(arg), f"channels reaching {what} are not permuted")

    for node in gm.graph.nodes:
        shape = _shape(node)
        out: np.ndarray | None = None
        if node.op == "placeholder":
            if shape is None or len(shape) < 2:
                raise TopologyError("the model input is not a batch of channel tensors")
            out = b.new_space("input", "input", shape[1])
            b.sources = out
            b.fix(out)
        elif node.op == "call_module":
            module = modules[str(node.target)]
            src = arg_map(node.args[0]) if node.args else None
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                out = _layer(b, str(node.target), module, src, node)
            elif isinstance(module, _PASS_MODULES):
                out = src
                if src is not None:
                    for pname, _ in module.named_parameters(recurse=False):
                        b.parameters.append(ChannelParameter(f"{node.target}.{pname}", 0, src))
                    for bname, buf in module.named_buffers(recurse=False):
                        if buf.dim() >= 1:
                            b.parameters.append(ChannelParameter(f"{node.target}.{bname}", 0, src))
            elif isinstance(module, nn.Flatten):
                out = _flatten(b, src, node)
            else:
                fix_args(node, f"module {type(module).__name__}")
        elif node.op in ("call_function", "call_method"):
            out = _function(b, node, maps, shape)
            if out is None and shape is not None and len(shape) >= 2:
                fix_args(node, f"{node.target!s}")
        elif node.op == "output":
            result = node.args[0]
            if isinstance(result, tuple | list):
                result = result[0]
            targets = arg_map(result)
            if targets is None:
                raise TopologyError("cannot follow the channels to the model output")
            b.targets = targets[targets >= 0]
            b.fix(targets)
        if out is not None and shape is not None and (len(shape) < 2 or len(out) != shape[1]):
            out = None
        maps[node] = out

    if not b.layers:
        raise TopologyError("the model has no conv or linear layer")
    links = np.concatenate(b.links) if b.links else np.zeros((0, 2), dtype=np.int64)
    fixed = np.unique(np.concatenate(b.fixed)) if b.fixed else np.zeros(0, dtype=np.int64)
    return ChannelStructure(
        num_nodes=b.count,
        node_space=np.concatenate(b.space_of),
        node_position=np.concatenate([np.arange(len(s)) for s in b.space_of]),
        spaces=b.spaces,
        layers=b.layers,
        parameters=b.parameters,
        links=links,
        sources=b.sources,
        targets=b.targets,
        fixed=fixed,
        notes=b.notes,
    )


def _layer(
    b: _Builder, target: str, module: nn.Module, src: np.ndarray | None, node: torch.fx.Node
) -> np.ndarray:
    weight = module.weight
    out_channels = int(weight.shape[0])
    groups = int(getattr(module, "groups", 1))
    in_shape = _shape(node.args[0]) if node.args else None
    in_channels = int(weight.shape[1]) * groups
    if src is None or len(src) != in_channels or (in_shape is not None and len(in_shape) == 3):
        # Linear layers over token sequences (N, L, D) act on the last dim, not on channels.
        if src is not None:
            b.fix(src, f"{target}: inputs not traced per channel")
        src = np.full(in_channels, -1)
    out = b.new_space(target, "conv" if weight.dim() > 2 else "linear", out_channels)
    name = f"{target}.weight"
    b.layers[name] = Layer(
        name, b.spaces[-1][1], tuple(weight.shape), groups, src, int(out[0]), out_channels
    )
    if groups > 1:
        b.fix(src, f"{target}: grouped convolution channels are not permuted")
        b.fix(out)
    b.parameters.append(ChannelParameter(name, 0, out))
    if groups == 1:
        b.parameters.append(ChannelParameter(name, 1, src))
    if getattr(module, "bias", None) is not None:
        b.parameters.append(ChannelParameter(f"{target}.bias", 0, out))
    return out


def _flatten(b: _Builder, src: np.ndarray | None, node: torch.fx.Node) -> np.ndarray | None:
    in_shape = _shape(node.args[0]) if node.args else None
    out_shape = _shape(node)
    if src is None or in_shape is None or out_shape is None or len(in_shape) < 3:
        return src if in_shape is not None and len(in_shape) == 2 else None
    if len(out_shape) != 2 or out_shape[0] != in_shape[0]:
        return None
    spatial = math.prod(in_shape[2:])
    if out_shape[1] != in_shape[1] * spatial:
        return None
    if spatial == 1:
        return src
    features = b.new_space(f"flatten:{node.name}", "flatten", out_shape[1])
    b.link(np.repeat(src, spatial), features)
    return features


def _function(
    b: _Builder,
    node: torch.fx.Node,
    maps: Mapping[torch.fx.Node, np.ndarray | None],
    shape: tuple[int, ...] | None,
) -> np.ndarray | None:
    target = node.target
    args = node.args
    first = maps.get(args[0]) if args and isinstance(args[0], torch.fx.Node) else None
    is_method = node.op == "call_method"
    if (not is_method and target in _PASS_FUNCTIONS) or (is_method and target in _PASS_METHODS):
        return first
    if (not is_method and target in _FLATTEN_FUNCTIONS) or (
        is_method and target in _FLATTEN_METHODS
    ):
        return _flatten(b, first, node)
    if (not is_method and target in _TIE_FUNCTIONS) or (is_method and target in _TIE_METHODS):
        tensors = [a for a in args[:2] if isinstance(a, torch.fx.Node)]
        mapped = [maps.get(a) for a in tensors]
        mapped = [m for m in mapped if m is not None]
        if len(tensors) == 2 and len(mapped) == 2:
            left, right = mapped
            if len(left) != len(right):
                return None
            out = b.new_space(f"add:{node.name}", "add", len(left))
            b.link(left, out)
            b.link(right, out)
            return out
        if len(tensors) == 2 and len(mapped) == 1:
            other = tensors[1] if maps.get(tensors[0]) is not None else tensors[0]
            other_shape = _shape(other)
            if other_shape is not None and len(other_shape) >= 2 and other_shape[1] > 1:
                return None
            return mapped[0]
        return mapped[0] if len(tensors) == 1 and mapped else None
    if not is_method and target is torch.cat:
        parts = args[0]
        dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if dim == 1 and isinstance(parts, list | tuple):
            pieces = [maps.get(p) if isinstance(p, torch.fx.Node) else None for p in parts]
            if all(p is not None for p in pieces):
                joined = np.concatenate(pieces)  # type: ignore[arg-type]
                valid = joined[joined >= 0]
                if len(np.unique(valid)) != len(valid):
                    b.fix(joined, "a channel concatenated twice is not permuted")
                return joined
        return None
    if not is_method and target is operator.getitem:
        index = args[1] if len(args) > 1 else None
        if first is None:
            return None
        if isinstance(index, tuple) and len(index) >= 2 and index[1] == slice(None):
            return first
        return None
    if not is_method and target is F.pad:
        pad = args[1] if len(args) > 1 else node.kwargs.get("pad")
        if first is None or shape is None or not isinstance(pad, list | tuple):
            return None
        channel_pair = 2 * (len(shape) - 2)
        if len(pad) <= channel_pair:
            return first
        left, right = int(pad[channel_pair]), int(pad[channel_pair + 1])
        if left < 0 or right < 0:
            return None
        return np.concatenate([np.full(left, -1), first, np.full(right, -1)])
    if is_method and target in _REDUCE_METHODS:
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if isinstance(dims, tuple | list) and 1 not in dims and 0 not in dims:
            return first
        return None
    return None


def example_input(input_shape: tuple[int, ...] | list[int], batch: int = 2) -> torch.Tensor:
    """Return a deterministic example batch for tracing."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, *input_shape), generator=gen)


def structure_of(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, ...] | list[int],
    kwargs: Mapping[str, Any] | None = None,
    *,
    allow_import: bool = False,
) -> ChannelStructure:
    """Build an architecture and trace its channel structure."""
    from ticketguard.tickets.models import build_model

    model = build_model(arch, num_classes, dict(kwargs or {}), allow_import=allow_import)
    return trace_structure(model, example_input(input_shape))
