"""Topology-graph statistics at real network sizes: vectorised Brandes vs. networkx, and ResNet-50.

1. A synthetic ResNet-20 channel graph (layers of 3, 16x7, 32x6, 64x6 and 10 channels, ~40%
   random connectivity between consecutive layers, identity skip edges every two layers):
   all-pairs `edge_betweenness` against `networkx.edge_betweenness_centrality` on the same graph
   (results must agree), with the speed ratio.
2. A synthetic 90%-sparse torchvision ResNet-50 channel graph (bottleneck blocks with residual-add
   nodes; 1x1 convs ~10% and 3x3 convs ~60% channel connectivity): `topology_stats` with
   input-to-logit betweenness, against the 5-second target.
"""

from __future__ import annotations

import statistics
import time

import networkx as nx
import numpy as np
import scipy.sparse as sp

from ticketguard.signatures.graphstats import edge_betweenness, topology_stats

RESNET20_WIDTHS = [3] + [16] * 7 + [32] * 6 + [64] * 6 + [10]
#: (blocks, bottleneck width, output width) of torchvision ResNet-50's four stages.
RESNET50_STAGES = [(3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048)]
REPEATS = 3


class _GraphBuilder:
    """Collect channel nodes and edges of a synthetic layered network."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.n = 0
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []

    def nodes(self, count: int) -> np.ndarray:
        """Add `count` channel nodes and return their indices."""
        new = np.arange(self.n, self.n + count)
        self.n += count
        return new

    def connect(self, lower: np.ndarray, upper: np.ndarray, density: float) -> None:
        """Connect every lower channel to every upper channel with probability `density`."""
        u, v = np.nonzero(self.rng.random((lower.size, upper.size)) < density)
        self.rows.append(lower[u])
        self.cols.append(upper[v])

    def identity(self, lower: np.ndarray, upper: np.ndarray) -> None:
        """Link channel i of `lower` to channel i of `upper` (zero-padded when widths differ)."""
        width = min(lower.size, upper.size)
        self.rows.append(lower[:width])
        self.cols.append(upper[:width])

    def adjacency(self) -> sp.csr_array:
        row, col = np.concatenate(self.rows), np.concatenate(self.cols)
        return sp.csr_array((np.ones(row.size), (row, col)), shape=(self.n, self.n))


def resnet20_like(seed: int = 0) -> sp.csr_array:
    """Return a layered DAG the size of a ResNet-20 channel graph."""
    builder = _GraphBuilder(seed)
    layers = [builder.nodes(width) for width in RESNET20_WIDTHS]
    for lower, upper in zip(layers, layers[1:], strict=False):
        builder.connect(lower, upper, 0.4)
    for first in range(1, len(layers) - 2, 2):
        builder.identity(layers[first], layers[first + 2])
    return builder.adjacency()


def resnet50_like(seed: int = 0) -> tuple[sp.csr_array, np.ndarray, np.ndarray]:
    """Return a 90%-sparse ResNet-50-sized channel DAG with its input and logit nodes."""
    builder = _GraphBuilder(seed)
    inputs = builder.nodes(3)
    stream = builder.nodes(64)
    builder.connect(inputs, stream, 0.6)
    for blocks, mid, out in RESNET50_STAGES:
        for block in range(blocks):
            reduce, spatial, expand = builder.nodes(mid), builder.nodes(mid), builder.nodes(out)
            builder.connect(stream, reduce, 0.1)
            builder.connect(reduce, spatial, 0.6)
            builder.connect(spatial, expand, 0.1)
            shortcut = stream
            if block == 0:
                shortcut = builder.nodes(out)
                builder.connect(stream, shortcut, 0.1)
            added = builder.nodes(out)
            builder.identity(expand, added)
            builder.identity(shortcut, added)
            stream = added
    logits = builder.nodes(1000)
    builder.connect(stream, logits, 0.1)
    return builder.adjacency(), inputs, logits


def _networkx_values(graph: nx.DiGraph, adj: sp.csr_array) -> np.ndarray:
    reference = nx.edge_betweenness_centrality(graph, normalized=False)
    coo = adj.tocoo()
    return np.array([reference[int(u), int(v)] for u, v in zip(coo.row, coo.col, strict=True)])


def main() -> dict[str, float]:
    adj = resnet20_like()
    graph = nx.from_scipy_sparse_array(adj, create_using=nx.DiGraph)
    start = time.perf_counter()
    expected = _networkx_values(graph, adj)
    networkx_s = time.perf_counter() - start
    ours = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        values = edge_betweenness(adj)
        ours.append(time.perf_counter() - start)
    ours_s = statistics.median(ours)
    np.testing.assert_allclose(values.tocoo().data, expected, rtol=1e-9)
    print(
        f"all-pairs edge betweenness, ResNet-20-sized channel graph "
        f"({adj.shape[0]} nodes, {adj.nnz} edges)"
    )
    print(f"  networkx:          {networkx_s:8.3f} s")
    print(f"  edge_betweenness:  {ours_s:8.3f} s (median of {REPEATS}; values agree to 1e-9)")
    print(f"  speed-up: {networkx_s / ours_s:.1f}x")

    big, inputs, logits = resnet50_like()
    start = time.perf_counter()
    stats = topology_stats(big, inputs, logits, betweenness="io")
    stats_s = time.perf_counter() - start
    summary = stats.summary()
    print(
        f"topology_stats (io betweenness), 90%-sparse ResNet-50-sized channel graph "
        f"({stats.n_nodes} nodes, {stats.n_edges} edges)"
    )
    print(f"  time: {stats_s:.2f} s  (target <= 5 s)")
    print(
        f"  log10 input->logit paths: {summary['log10_total_paths']:.1f}; "
        f"max edge betweenness {summary['max_edge_betweenness']:.4g}"
    )
    return {
        "resnet20_networkx_s": networkx_s,
        "resnet20_edge_betweenness_s": ours_s,
        "resnet20_speedup": networkx_s / ours_s,
        "resnet50_topology_stats_s": stats_s,
        "resnet50_edges": float(stats.n_edges),
    }


if __name__ == "__main__":
    main()
