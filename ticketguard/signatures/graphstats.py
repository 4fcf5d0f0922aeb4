"""Graph statistics of a ticket's topology graph: degrees, levels, path counts, edge betweenness.

The topology graph is a square adjacency matrix (`adj[u, v] != 0` is a directed edge `u -> v`).
Everything here is sparse or dense-block linear algebra over whole BFS levels, so a channel graph
with tens of thousands of nodes and millions of edges (a pruned ResNet-50) takes seconds; Python
loops run over levels and blocks of sources only, never over single nodes or edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from ticketguard.errors import ConfigError, TopologyError

#: What every function here accepts as an adjacency matrix (square; nonzero entries are edges).
Adjacency = sp.sparray | sp.spmatrix | np.ndarray

#: Betweenness variants `topology_stats` accepts: sources->targets, all ordered pairs, or none.
BETWEENNESS_MODES = ("io", "all", "none")

#: Most sources processed together: per-level Python overhead is amortised well before this, and
#: larger blocks mix sources whose BFS levels lie far apart, which multiplies the level work.
_MAX_SOURCE_BLOCK = 128

#: Exponent given to a zero path count so it never dominates a maximum of exponents.
_ZERO_EXPONENT = -(1 << 40)


@dataclass(frozen=True)
class _Graph:
    """A canonical 0/1 CSR adjacency with its transpose, validated once per public call."""

    n: int
    indptr: np.ndarray
    indices: np.ndarray
    t_indptr: np.ndarray
    t_indices: np.ndarray

    @property
    def n_edges(self) -> int:
        return int(self.indices.size)

    @property
    def in_degree(self) -> np.ndarray:
        return np.diff(self.t_indptr).astype(np.int64)

    @property
    def out_degree(self) -> np.ndarray:
        return np.diff(self.indptr).astype(np.int64)


def _graph(adj: Adjacency) -> _Graph:
    """Validate an adjacency matrix and return its canonical edge pattern and transpose."""
    if sp.issparse(adj):
        matrix = sp.csr_array(adj, copy=True)
    else:
        dense = np.asarray(adj)
        if dense.ndim != 2:
            raise TopologyError(f"an adjacency matrix must be 2-D, got {dense.ndim} dimension(s)")
        matrix = sp.csr_array(dense)
    if matrix.shape[0] != matrix.shape[1]:
        raise TopologyError(f"an adjacency matrix must be square, got shape {matrix.shape}")
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    transpose = matrix.T.tocsr()
    transpose.sum_duplicates()
    return _Graph(
        n=int(matrix.shape[0]),
        indptr=matrix.indptr.astype(np.int64),
        indices=matrix.indices.astype(np.int64),
        t_indptr=transpose.indptr.astype(np.int64),
        t_indices=transpose.indices.astype(np.int64),
    )


def _node_indices(nodes: npt.ArrayLike, n: int, name: str) -> np.ndarray:
    """Validate a 1-D array of node indices of a graph with `n` nodes and return it as int64."""
    array = np.asarray(nodes)
    if array.ndim != 1:
        raise TopologyError(f"{name} must be a 1-D array of node indices, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TopologyError(f"{name} must be integer node indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= n:
        bad = low if low < 0 else high
        raise TopologyError(f"{name} holds node {bad}, outside a graph of {n} nodes")
    return array


def _gather(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the CSR positions of every entry in `rows` (row by row) and each row's length."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    total = int(lengths.sum())
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets, lengths


@dataclass(frozen=True)
class _Submatrix:
    """The 0/1 submatrix adj[rows][:, columns], with each entry's edge position in adj."""

    matrix: sp.csr_array
    edge: np.ndarray
    row: np.ndarray
    column: np.ndarray


def _submatrix(
    graph: _Graph, rows: np.ndarray, columns: np.ndarray, column_slot: np.ndarray
) -> _Submatrix:
    """Cut adj[rows][:, columns] out of the graph (`columns` sorted; `column_slot` is scratch)."""
    positions, lengths = _gather(graph.indptr, rows)
    column_slot[columns] = np.arange(columns.size)
    slots = column_slot[graph.indices[positions]]
    column_slot[columns] = -1
    kept = slots >= 0
    row = np.repeat(np.arange(rows.size), lengths)[kept]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=rows.size))])
    matrix = sp.csr_array((np.ones(row.size), slots[kept], indptr), shape=(rows.size, columns.size))
    return _Submatrix(matrix=matrix, edge=positions[kept], row=row, column=slots[kept])


def degree_sequences(adj: Adjacency) -> tuple[np.ndarray, np.ndarray]:
    """Return the in-degree and out-degree (int64) of every node."""
    graph = _graph(adj)
    return graph.in_degree, graph.out_degree


def _levels(graph: _Graph) -> np.ndarray:
    """Return longest-path levels by peeling in-degree-0 frontiers; raise if a cycle remains."""
    remaining = graph.in_degree
    level = np.full(graph.n, -1, dtype=np.int64)
    frontier = np.flatnonzero(remaining == 0)
    depth = 0
    placed = 0
    while frontier.size:
        level[frontier] = depth
        placed += frontier.size
        positions, _ = _gather(graph.indptr, frontier)
        heads, counts = np.unique(graph.indices[positions], return_counts=True)
        remaining[heads] -= counts
        frontier = heads[remaining[heads] == 0]
        depth += 1
    if placed < graph.n:
        raise TopologyError(
            f"the topology graph has a cycle: {graph.n - placed} of {graph.n} nodes lie on or "
            "downstream of one"
        )
    return level


def topological_levels(adj: Adjacency) -> np.ndarray:
    """Return each node's longest-path distance from a node of in-degree 0 (a DAG is required)."""
    return _levels(_graph(adj))


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _log10(mantissa: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """Return log10(mantissa * 2**exponent), -inf where the mantissa is zero."""
    out = np.full(mantissa.shape, -np.inf)
    positive = mantissa > 0
    out[positive] = np.log10(mantissa[positive]) + exponent[positive] * math.log10(2.0)
    return out


@dataclass(frozen=True)
class PathCounts:
    """Numbers of distinct directed source-to-node paths, as log10 so they never overflow.

    `log10_per_target` follows the targets as given; repeated sources and targets count once in
    the total. A source counts the empty path to itself, so a node that is both source and target
    adds 1. `-inf` marks a node no source reaches.
    """

    log10_per_node: np.ndarray
    log10_per_target: np.ndarray
    log10_total: float


def path_counts(adj: Adjacency, sources: npt.ArrayLike, targets: npt.ArrayLike) -> PathCounts:
    """Count the directed paths from any source to every node and target of a DAG."""
    graph = _graph(adj)
    return _path_counts(
        graph,
        _node_indices(sources, graph.n, "sources"),
        _node_indices(targets, graph.n, "targets"),
        _levels(graph),
    )


def _path_counts(
    graph: _Graph, source_nodes: np.ndarray, target_nodes: np.ndarray, level: np.ndarray
) -> PathCounts:
    """Propagate path counts level by level along a DAG whose levels are known."""
    is_source = np.zeros(graph.n, dtype=bool)
    is_source[source_nodes] = True
    # A count is mantissa * 2**exponent (mantissa in [0.5, 1)): exact power-of-two rescaling
    # keeps full float64 precision at any magnitude, far beyond 1e308.
    mantissa = np.where(is_source, 0.5, 0.0)
    exponent = np.where(is_source, 1, _ZERO_EXPONENT).astype(np.int64)
    order = np.argsort(level, kind="stable")
    bounds = np.searchsorted(level[order], np.arange(int(level.max(initial=0)) + 2))
    for depth in range(1, bounds.size - 1):
        nodes = order[bounds[depth] : bounds[depth + 1]]
        positions, lengths = _gather(graph.t_indptr, nodes)
        predecessors = graph.t_indices[positions]
        starts = np.cumsum(lengths) - lengths
        pred_exponent = exponent[predecessors]
        top = np.maximum.reduceat(pred_exponent, starts)
        top = np.where(is_source[nodes], np.maximum(top, 1), top)
        terms = np.ldexp(mantissa[predecessors], pred_exponent - np.repeat(top, lengths))
        total = np.add.reduceat(terms, starts)
        # Only sources take the +1 (and for them top >= 1); the clamp keeps others finite.
        total += np.where(is_source[nodes], np.ldexp(0.5, np.minimum(1 - top, 0)), 0.0)
        new_mantissa, shift = np.frexp(total)
        mantissa[nodes] = new_mantissa
        exponent[nodes] = np.where(new_mantissa > 0, top + shift, _ZERO_EXPONENT)
    per_node = _log10(mantissa, exponent)
    unique_targets = np.unique(target_nodes)
    target_exponent = exponent[unique_targets]
    top = int(target_exponent.max(initial=_ZERO_EXPONENT))
    total_sum = float(np.ldexp(mantissa[unique_targets], target_exponent - top).sum())
    log10_total = math.log10(total_sum) + top * math.log10(2.0) if total_sum > 0 else -math.inf
    return PathCounts(
        log10_per_node=_readonly(per_node),
        log10_per_target=_readonly(per_node[target_nodes]),
        log10_total=log10_total,
    )


def edge_betweenness(
    adj: Adjacency,
    sources: npt.ArrayLike | None = None,
    targets: npt.ArrayLike | None = None,
    *,
    max_dense_elements: int = 200_000_000,
) -> sp.csr_array:
    """Return unnormalised shortest-path edge betweenness, on the pattern of adj's nonzeros.

    Each edge gets the sum over ordered pairs (s, t), s in `sources` and t in `targets` (every
    node where None), s != t, of the fraction of shortest s-t paths that use it: with both None
    this is `networkx.edge_betweenness_centrality(G, normalized=False)`. Repeated sources and
    targets count once. Unlike `networkx.edge_betweenness_centrality_subset` (networkx 3.6),
    which splits the dependency of a non-target node evenly over its predecessors instead of in
    proportion to their path counts, this follows Brandes' formula exactly, so it equals the
    subset function only where every target set is all nodes. The graph may have cycles.

    Brandes' algorithm runs for a block of sources at once on dense (node x source) arrays of at
    most `max_dense_elements` elements each: distances, path counts and dependencies, plus slices
    of them per BFS level. Path counts are float64 rescaled by exact powers of two per BFS level
    and source, so they never overflow; the result has a relative precision of about 1e-12.
    """
    graph = _graph(adj)
    return _edge_betweenness(
        graph,
        None if sources is None else _node_indices(sources, graph.n, "sources"),
        None if targets is None else _node_indices(targets, graph.n, "targets"),
        max_dense_elements,
    )


def _edge_betweenness(
    graph: _Graph,
    sources: np.ndarray | None,
    targets: np.ndarray | None,
    max_dense_elements: int,
) -> sp.csr_array:
    """Run block-vectorised Brandes over validated sources and targets (None: every node)."""
    if max_dense_elements < 1:
        raise ConfigError(f"max_dense_elements must be positive, got {max_dense_elements}")
    n = graph.n
    source_nodes = np.arange(n, dtype=np.int64) if sources is None else np.unique(sources)
    target_weight = np.ones(n)
    if targets is not None:
        target_weight = np.zeros(n)
        target_weight[targets] = 1.0
    values = np.zeros(graph.n_edges)
    if graph.n_edges and source_nodes.size and target_weight.any():
        if max_dense_elements < n:
            raise TopologyError(
                f"one source's BFS row needs {n} elements but max_dense_elements is "
                f"{max_dense_elements}"
            )
        block = min(source_nodes.size, max_dense_elements // n, _MAX_SOURCE_BLOCK)
        for start in range(0, source_nodes.size, block):
            _accumulate_block(graph, source_nodes[start : start + block], target_weight, values)
    return sp.csr_array((values, graph.indices.copy(), graph.indptr.copy()), shape=(n, n))


def _accumulate_block(
    graph: _Graph, block_sources: np.ndarray, target_weight: np.ndarray, values: np.ndarray
) -> None:
    """Add the edge dependencies of one block of sources to `values` (Brandes, level by level)."""
    n, width = graph.n, block_sources.size
    column_slot = np.full(n, -1, dtype=np.int64)
    dist = np.full((n, width), -1, dtype=np.int32)
    sigma = np.zeros((n, width))
    dist[block_sources, np.arange(width)] = 0
    sigma[block_sources, np.arange(width)] = 1.0
    # levels[d]: nodes at BFS distance d from at least one source of the block.
    levels = [np.unique(block_sources)]
    # shifts[d][s]: sigma at distance d + 1 is stored divided by 2**shifts[d][s] relative to
    # distance d, so stored values stay within [0.5, 1] per level and ratios stay exact.
    shifts: list[np.ndarray] = []
    while True:
        depth = len(levels) - 1
        tails = levels[-1]
        positions, _ = _gather(graph.indptr, tails)
        heads = np.unique(graph.indices[positions])
        if heads.size == 0:
            break
        frontier_sigma = np.where(dist[tails] == depth, sigma[tails], 0.0)
        reach = _submatrix(graph, tails, heads, column_slot).matrix.T @ frontier_sigma
        fresh = (reach > 0) & (dist[heads] < 0)
        touched = fresh.any(axis=1)
        if not touched.any():
            break
        heads, reach, fresh = heads[touched], reach[touched], fresh[touched]
        reach = np.where(fresh, reach, 0.0)
        _, shift = np.frexp(reach.max(axis=0))
        head_dist = dist[heads]
        head_dist[fresh] = depth + 1
        dist[heads] = head_dist
        sigma[heads] += np.ldexp(reach, -shift)
        shifts.append(shift.astype(np.int64))
        levels.append(heads)
    # Backwards over distances: an edge (v, w) with dist w = dist v + 1 = d carries
    # sigma_v / sigma_w * (t_w + delta_w); delta_v sums that over v's out-edges.
    delta = np.zeros((n, width))
    for depth in range(len(levels) - 1, 0, -1):
        heads, tails = levels[depth], levels[depth - 1]
        at = dist[heads] == depth
        ratio = (target_weight[heads, None] + delta[heads]) / np.where(at, sigma[heads], 1.0)
        coefficient = np.where(at, np.ldexp(ratio, -shifts[depth - 1]), 0.0)
        tail_sigma = np.where(dist[tails] == depth - 1, sigma[tails], 0.0)
        step = _submatrix(graph, tails, heads, column_slot)
        delta[tails] += tail_sigma * (step.matrix @ coefficient)
        values[step.edge] += np.einsum("ij,ij->i", tail_sigma[step.row], coefficient[step.column])


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class TopologyStats:
    """Degree sequences, path counts and edge betweenness of one topology graph."""

    n_nodes: int
    n_edges: int
    n_sources: int
    n_targets: int
    in_degree: np.ndarray
    out_degree: np.ndarray
    levels: np.ndarray
    paths: PathCounts
    betweenness: str
    edge_betweenness: sp.csr_array | None

    @property
    def depth(self) -> int:
        return int(self.levels.max(initial=0))

    @property
    def mean_degree(self) -> float:
        """Return the mean total (in + out) degree, twice the mean in- or out-degree."""
        return 2.0 * self.n_edges / self.n_nodes if self.n_nodes else 0.0

    @property
    def max_degree(self) -> int:
        """Return the largest total (in + out) degree."""
        return int((self.in_degree + self.out_degree).max(initial=0))

    @property
    def max_edge_betweenness(self) -> float | None:
        if self.edge_betweenness is None or self.n_edges == 0:
            return None
        return float(self.edge_betweenness.data.max())

    @property
    def mean_edge_betweenness(self) -> float | None:
        if self.edge_betweenness is None or self.n_edges == 0:
            return None
        return float(self.edge_betweenness.data.mean())

    def summary(self) -> dict[str, float | int | str | None]:
        """Return the headline numbers as a JSON-safe dict (None where a number is undefined)."""
        return {
            "n_nodes": self.n_nodes,
            "n_edges": self.n_edges,
            "n_sources": self.n_sources,
            "n_targets": self.n_targets,
            "depth": self.depth,
            "mean_degree": self.mean_degree,
            "max_degree": self.max_degree,
            "max_in_degree": int(self.in_degree.max(initial=0)),
            "max_out_degree": int(self.out_degree.max(initial=0)),
            "log10_total_paths": _json_float(self.paths.log10_total),
            "betweenness": self.betweenness,
            "max_edge_betweenness": self.max_edge_betweenness,
            "mean_edge_betweenness": self.mean_edge_betweenness,
        }


def topology_stats(
    adj: Adjacency,
    sources: npt.ArrayLike,
    targets: npt.ArrayLike,
    *,
    betweenness: str = "io",
    max_dense_elements: int = 200_000_000,
) -> TopologyStats:
    """Compute the degree, level, path-count and edge-betweenness statistics of a topology DAG.

    `betweenness` is "io" (pairs from `sources` to `targets`), "all" (all ordered pairs) or
    "none"; `max_dense_elements` bounds its working arrays as in `edge_betweenness`.
    """
    if betweenness not in BETWEENNESS_MODES:
        raise ConfigError(
            f"betweenness must be one of {', '.join(BETWEENNESS_MODES)}, got {betweenness!r}"
        )
    graph = _graph(adj)
    source_nodes = _node_indices(sources, graph.n, "sources")
    target_nodes = _node_indices(targets, graph.n, "targets")
    levels = _levels(graph)
    paths = _path_counts(graph, source_nodes, target_nodes, levels)
    if betweenness == "io":
        edge_values = _edge_betweenness(graph, source_nodes, target_nodes, max_dense_elements)
    elif betweenness == "all":
        edge_values = _edge_betweenness(graph, None, None, max_dense_elements)
    else:
        edge_values = None
    return TopologyStats(
        n_nodes=graph.n,
        n_edges=graph.n_edges,
        n_sources=int(np.unique(source_nodes).size),
        n_targets=int(np.unique(target_nodes).size),
        in_degree=_readonly(graph.in_degree),
        out_degree=_readonly(graph.out_degree),
        levels=_readonly(levels),
        paths=paths,
        betweenness=betweenness,
        edge_betweenness=edge_values,
    )
