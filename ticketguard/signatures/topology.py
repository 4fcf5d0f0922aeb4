"""Channel connectivity and the layered topology graph of a ticket.

For a conv weight `[out, in, kh, kw]` the channel-connectivity matrix is `A[o, i] = any(m[o, i])`;
for a linear weight `A = m`. Chaining every layer's bipartite graph through the traced channel
structure (residual additions and flattening as identity edges) gives the topology graph: a DAG
from the input channels to the logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse

from ticketguard.errors import ArchitectureError
from ticketguard.signatures.structure import ChannelStructure, Layer, structure_of
from ticketguard.tickets.mask import Mask


def channel_connectivity(mask: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Return the bool matrix `A[o, i]`: is input channel `i` connected to output channel `o`."""
    conn = mask.flatten(2).any(dim=2) if mask.dim() > 2 else mask.bool()
    if groups == 1:
        return conn
    out, per_group = conn.shape
    full = torch.zeros(out, per_group * groups, dtype=torch.bool, device=conn.device)
    rows = torch.arange(out, device=conn.device)
    block = rows // (out // groups)
    cols = block[:, None] * per_group + torch.arange(per_group, device=conn.device)[None, :]
    full[rows[:, None], cols] = conn
    return full


def layer_connectivity(
    layer: Layer, mask: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor] | None
) -> torch.Tensor:
    """Return a layer's connectivity: from the mask, else the weights' zero pattern, else dense."""
    if layer.name in mask:
        source = mask[layer.name]
    elif weights is not None and layer.name in weights:
        source = weights[layer.name] != 0
    else:
        source = torch.ones(layer.weight_shape, dtype=torch.bool)
    if tuple(source.shape) != layer.weight_shape:
        raise ArchitectureError(
            f"{layer.name!r} has shape {tuple(source.shape)}, the architecture expects "
            f"{layer.weight_shape}"
        )
    return channel_connectivity(source.cpu(), layer.groups)


@dataclass
class TopologyGraph:
    """The layered channel graph of a ticket: a sparse DAG adjacency plus what its nodes are."""

    structure: ChannelStructure
    adjacency: sparse.csr_array
    edge_layer: sparse.csr_array

    @property
    def num_nodes(self) -> int:
        return self.structure.num_nodes

    @property
    def num_edges(self) -> int:
        return int(self.adjacency.nnz)

    @property
    def sources(self) -> np.ndarray:
        return self.structure.sources

    @property
    def targets(self) -> np.ndarray:
        return self.structure.targets

    def layer_names(self) -> list[str]:
        return list(self.structure.layers)

    def to_networkx(self) -> Any:
        """Return the graph as a networkx DiGraph with node and edge attributes."""
        import networkx as nx

        s = self.structure
        graph = nx.DiGraph()
        names = [name for name, _ in s.spaces]
        kinds = [kind for _, kind in s.spaces]
        graph.add_nodes_from(
            (
                int(v),
                {
                    "space": names[int(s.node_space[v])],
                    "kind": kinds[int(s.node_space[v])],
                    "channel": int(s.node_position[v]),
                },
            )
            for v in range(s.num_nodes)
        )
        coo = self.edge_layer.tocoo()
        layer_names = ["link", *s.layers]
        graph.add_edges_from(
            (
                int(u),
                int(v),
                {
                    "kind": "link" if k == 0 else "layer",
                    "layer": layer_names[int(k)] if k else "",
                },
            )
            for u, v, k in zip(coo.row, coo.col, coo.data - 1, strict=True)
        )
        return graph

    def write_graphml(self, path: str | Path) -> None:
        """Write the graph as GraphML, atomically."""
        import networkx as nx

        from ticketguard.files import atomic_path

        with atomic_path(path) as tmp:
            nx.write_graphml(self.to_networkx(), str(tmp))


def topology_graph(
    structure: ChannelStructure,
    mask: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor] | None = None,
) -> TopologyGraph:
    """Chain every layer's connectivity through the channel structure into one sparse DAG."""
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    kinds: list[np.ndarray] = []
    links = structure.links
    if len(links):
        rows.append(links[:, 0])
        cols.append(links[:, 1])
        kinds.append(np.ones(len(links), dtype=np.int32))
    for index, layer in enumerate(structure.layers.values(), start=2):
        conn = layer_connectivity(layer, mask, weights).numpy()
        o, i = np.nonzero(conn)
        src = layer.in_nodes[i]
        keep = src >= 0
        rows.append(src[keep])
        cols.append(layer.out_start + o[keep])
        kinds.append(np.full(int(keep.sum()), index, dtype=np.int32))
    n = structure.num_nodes
    row = np.concatenate(rows)
    col = np.concatenate(cols)
    kind = np.concatenate(kinds)
    # An edge can be made twice (a channel added to itself, or read twice by one layer); keep
    # its first kind rather than letting the sparse constructor sum the kinds into another one.
    _, first = np.unique(row.astype(np.int64) * n + col, return_index=True)
    row, col, kind = row[first], col[first], kind[first]
    edge_layer = sparse.csr_array((kind, (row, col)), shape=(n, n))
    edge_layer.sum_duplicates()
    adjacency = sparse.csr_array(
        (np.ones(edge_layer.nnz, dtype=np.float64), edge_layer.indices, edge_layer.indptr),
        shape=(n, n),
    )
    return TopologyGraph(structure, adjacency, edge_layer)


def ticket_structure(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, ...] | list[int] | None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    allow_import: bool = False,
) -> ChannelStructure:
    """Trace the structure of a ticket's architecture, with its recorded or default input shape."""
    from ticketguard.tickets.models import default_input_shape

    shape = input_shape or default_input_shape(arch)
    if shape is None:
        raise ArchitectureError(f"the input shape of {arch!r} is unknown; the ticket records none")
    return structure_of(arch, num_classes, shape, kwargs, allow_import=allow_import)


def graph_of_mask(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, ...] | list[int] | None,
    mask: Mask,
    kwargs: Mapping[str, Any] | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> TopologyGraph:
    """Build the topology graph of a mask on an architecture."""
    structure = ticket_structure(arch, num_classes, input_shape, kwargs)
    return topology_graph(structure, mask, weights)


def file_topology(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    graphml: str | Path | None = None,
    betweenness: str = "io",
) -> dict[str, Any]:
    """Trace the topology graph of any loadable model file; optionally write it as GraphML.

    Returns per-layer connectivity densities and the graph statistics (degrees, input-to-logit
    path counts, edge betweenness restricted to input->logit pairs).
    """
    from ticketguard.signatures.graphstats import topology_stats
    from ticketguard.tickets.loading import load_checkpoint, load_model, observed_mask
    from ticketguard.tickets.models import is_import_path, prunable_parameters

    loaded = load_checkpoint(path)
    recorded = loaded.architecture
    if arch is None and (recorded is None or is_import_path(recorded)):
        raise ArchitectureError(f"{path}: the topology graph needs the architecture; pass --arch")
    model = load_model(loaded, arch, arch_kwargs=arch_kwargs, allow_import=arch is not None)
    names = prunable_parameters(model)
    if loaded.mask is not None:
        mask, _ = observed_mask(loaded)
    else:
        mask, _ = observed_mask(loaded, names)
    from ticketguard.signatures.structure import example_input, trace_structure
    from ticketguard.tickets.models import default_input_shape

    shape = loaded.metadata.get("input_shape") or default_input_shape(arch or recorded or "")
    if shape is None:
        raise ArchitectureError(f"{path}: the input shape is unknown for this architecture")
    structure = trace_structure(model, example_input(shape))
    graph = topology_graph(structure, mask, loaded.state)
    stats = topology_stats(graph.adjacency, graph.sources, graph.targets, betweenness=betweenness)
    layers = []
    for layer in structure.layers.values():
        conn = layer_connectivity(layer, mask, loaded.state)
        layers.append(
            {
                "name": layer.name,
                "connectivity": list(conn.shape),
                "connections": int(conn.sum()),
                "density": float(conn.float().mean()),
            }
        )
    if graphml is not None:
        graph.write_graphml(graphml)
    return {
        "summary": stats.summary(),
        "layers": layers,
        "notes": structure.notes,
        "graphml": str(graphml) if graphml is not None else None,
    }
