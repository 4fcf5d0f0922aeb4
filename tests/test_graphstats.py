"""Graph statistics of topology graphs, cross-checked against networkx and exact enumeration."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from ticketguard.errors import ConfigError, TopologyError
from ticketguard.signatures.graphstats import (
    PathCounts,
    TopologyStats,
    degree_sequences,
    edge_betweenness,
    path_counts,
    topological_levels,
    topology_stats,
)

RTOL = 1e-9


def _adjacency(graph: nx.DiGraph) -> sp.csr_array:
    """Return the 0/1 CSR adjacency of a graph whose nodes are 0..n-1."""
    return nx.to_scipy_sparse_array(graph, nodelist=range(graph.number_of_nodes()), format="csr")


def _layered_dag(seed: int) -> tuple[nx.DiGraph, list[int], list[int]]:
    """A small residual-style DAG with shuffled labels: (graph, input nodes, output nodes).

    Consecutive layers are randomly connected, every second layer has identity skip edges, and
    there are isolated nodes and a node that feeds the network without being an input.
    """
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(1, 6, size=int(rng.integers(2, 7)))]
    layers, edges, count = [], [], 0
    for width in widths:
        layers.append(list(range(count, count + width)))
        count += width
    for lower, upper in zip(layers, layers[1:], strict=False):
        for u in lower:
            for v in upper:
                if rng.random() < 0.5:
                    edges.append((u, v))
    for lower, upper in zip(layers, layers[2:], strict=False):
        if rng.random() < 0.7:
            edges += [(u, v) for u, v in zip(lower, upper, strict=False)]
    stray = count
    edges += [(stray, int(v)) for v in rng.choice(count, size=2)]
    n = count + 1 + int(rng.integers(0, 3))  # trailing isolated nodes
    relabel = rng.permutation(n)
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((int(relabel[u]), int(relabel[v])) for u, v in edges if u != v)
    return graph, [int(relabel[u]) for u in layers[0]], [int(relabel[v]) for v in layers[-1]]


def _random_digraph(seed: int) -> nx.DiGraph:
    """A small random directed graph with cycles, self-loops and isolated nodes."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 30))
    graph = nx.gnp_random_graph(n, float(rng.uniform(0.03, 0.3)), directed=True, seed=seed)
    graph.add_edges_from((int(v), int(v)) for v in rng.choice(n, size=2))
    return graph


def _as_dict(matrix: sp.csr_array) -> dict[tuple[int, int], float]:
    coo = matrix.tocoo()
    return {(int(u), int(v)): float(x) for u, v, x in zip(coo.row, coo.col, coo.data, strict=True)}


def _assert_edge_values(got: sp.csr_array, expected: dict[tuple[int, int], float]) -> None:
    values = _as_dict(got)
    assert set(values) == set(expected)
    keys = sorted(expected)
    np.testing.assert_allclose(
        [values[k] for k in keys], [expected[k] for k in keys], rtol=RTOL, atol=1e-12
    )


def _exact_path_counts(graph: nx.DiGraph, sources: list[int]) -> dict[int, int]:
    """Count source-to-node paths with Python integers (a source counts its empty path)."""
    count = dict.fromkeys(graph, 0)
    for v in nx.topological_sort(graph):
        count[v] = int(v in sources) + sum(count[u] for u in graph.predecessors(v))
    return count


def _log10(count: int) -> float:
    return math.log10(count) if count else -math.inf


def _shortest_path_betweenness(
    graph: nx.DiGraph, sources: list[int], targets: list[int]
) -> dict[tuple[int, int], float]:
    """Edge betweenness by enumerating every shortest s-t path (exact fractions)."""
    totals = {edge: Fraction(0) for edge in graph.edges}
    for s in set(sources):
        for t in set(targets):
            if s == t or not nx.has_path(graph, s, t):
                continue
            paths = list(nx.all_shortest_paths(graph, s, t))
            for path in paths:
                for edge in zip(path, path[1:], strict=False):
                    totals[edge] += Fraction(1, len(paths))
    return {edge: float(value) for edge, value in totals.items()}


def _complete_bipartite_chain(width: int, depth: int) -> sp.csr_array:
    """Return `depth` complete bipartite layers of `width` channels (layer k is nodes k*width...)."""
    lower = np.arange(depth * width)
    row = np.repeat(lower, width)
    col = (lower // width + 1)[:, None] * width + np.arange(width)[None, :]
    n = (depth + 1) * width
    return sp.csr_array((np.ones(row.size), (row, col.ravel())), shape=(n, n))


SEEDS = range(25)


@pytest.mark.parametrize("seed", SEEDS)
def test_degree_sequences_match_networkx(seed: int) -> None:
    for graph in (_layered_dag(seed)[0], _random_digraph(seed)):
        in_degree, out_degree = degree_sequences(_adjacency(graph))
        assert in_degree.dtype == np.int64 and out_degree.dtype == np.int64
        assert in_degree.tolist() == [graph.in_degree(v) for v in range(len(graph))]
        assert out_degree.tolist() == [graph.out_degree(v) for v in range(len(graph))]


def test_explicit_zeros_and_duplicate_entries_are_one_edge_or_none() -> None:
    rows, cols = np.array([0, 0, 1, 2]), np.array([1, 1, 2, 0])
    adj = sp.coo_array((np.array([1.0, 1.0, 1.0, 0.0]), (rows, cols)), shape=(3, 3))
    in_degree, out_degree = degree_sequences(adj)
    assert in_degree.tolist() == [0, 1, 1]
    assert out_degree.tolist() == [1, 1, 0]
    assert topological_levels(adj).tolist() == [0, 1, 2]
    assert _as_dict(edge_betweenness(adj)) == {(0, 1): 2.0, (1, 2): 2.0}


def test_dense_input_is_accepted() -> None:
    dense = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]])
    assert topological_levels(dense).tolist() == [0, 1, 2]
    assert degree_sequences(dense)[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_topological_levels_are_longest_path_generations(seed: int) -> None:
    graph, _, _ = _layered_dag(seed)
    levels = topological_levels(_adjacency(graph))
    for depth, generation in enumerate(nx.topological_generations(graph)):
        assert levels[sorted(generation)].tolist() == [depth] * len(generation)
    for u, v in graph.edges:
        assert levels[v] >= levels[u] + 1


@pytest.mark.parametrize(
    "edges", [[(0, 1), (1, 2), (2, 0)], [(0, 1), (1, 1)], [(0, 1), (1, 2), (2, 3), (3, 2)]]
)
def test_cycles_are_rejected_where_a_dag_is_required(edges: list[tuple[int, int]]) -> None:
    adj = _adjacency(nx.DiGraph(edges))
    with pytest.raises(TopologyError, match="has a cycle"):
        topological_levels(adj)
    with pytest.raises(TopologyError, match="has a cycle"):
        path_counts(adj, [0], [1])
    with pytest.raises(TopologyError, match="has a cycle"):
        topology_stats(adj, [0], [1])


@pytest.mark.parametrize("seed", SEEDS)
def test_path_counts_match_exact_integer_counts(seed: int) -> None:
    graph, sources, targets = _layered_dag(seed)
    counts = path_counts(_adjacency(graph), sources, targets)
    exact = _exact_path_counts(graph, sources)
    np.testing.assert_allclose(
        counts.log10_per_node, [_log10(exact[v]) for v in range(len(graph))], rtol=RTOL, atol=1e-12
    )
    np.testing.assert_allclose(
        counts.log10_per_target, [_log10(exact[t]) for t in targets], rtol=RTOL, atol=1e-12
    )
    assert counts.log10_total == pytest.approx(_log10(sum(exact[t] for t in targets)), rel=RTOL)


@pytest.mark.parametrize("seed", range(8))
def test_path_counts_match_simple_path_enumeration(seed: int) -> None:
    graph, sources, targets = _layered_dag(seed)
    counts = path_counts(_adjacency(graph), sources, targets)
    for t, log10_count in zip(targets, counts.log10_per_target, strict=True):
        enumerated = sum(len(list(nx.all_simple_paths(graph, s, t))) for s in sources if s != t)
        enumerated += int(t in sources)
        assert log10_count == pytest.approx(_log10(enumerated), rel=RTOL, abs=1e-12)


def test_path_counts_beyond_float_range_are_exact() -> None:
    width, depth = 10, 400
    adj = _complete_bipartite_chain(width, depth)
    n = adj.shape[0]
    sources, targets = np.arange(width), np.arange(n - width, n)
    counts = path_counts(adj, sources, targets)
    np.testing.assert_allclose(counts.log10_per_target, np.full(width, 400.0), rtol=1e-12)
    assert counts.log10_total == pytest.approx(401.0, rel=1e-12)
    assert counts.log10_per_node[sources].tolist() == [0.0] * width
    coo = adj.tocoo()
    graph = nx.DiGraph(zip(coo.row.tolist(), coo.col.tolist(), strict=True))
    exact = _exact_path_counts(graph, [0])
    assert counts.log10_per_node[n - 1] - math.log10(width) == pytest.approx(
        math.log10(exact[n - 1]), rel=1e-12
    )


def test_path_counts_mark_unreachable_nodes() -> None:
    adj = _adjacency(nx.DiGraph([(0, 1), (2, 3)]))
    counts = path_counts(adj, [0], [1, 3])
    assert isinstance(counts, PathCounts)
    assert counts.log10_per_target.tolist() == [0.0, -math.inf]
    assert counts.log10_per_node.tolist() == [0.0, 0.0, -math.inf, -math.inf]
    assert path_counts(adj, [0], [3]).log10_total == -math.inf
    with pytest.raises(ValueError):
        counts.log10_per_node[0] = 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_all_pairs_edge_betweenness_matches_networkx(seed: int) -> None:
    for graph in (_layered_dag(seed)[0], _random_digraph(seed)):
        expected = nx.edge_betweenness_centrality(graph, normalized=False)
        _assert_edge_values(edge_betweenness(_adjacency(graph)), expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_subset_edge_betweenness_matches_shortest_path_enumeration(seed: int) -> None:
    graph, sources, targets = _layered_dag(seed)
    expected = _shortest_path_betweenness(graph, sources, targets)
    _assert_edge_values(edge_betweenness(_adjacency(graph), sources, targets), expected)
    rng = np.random.default_rng(seed)
    cyclic = _random_digraph(seed)
    n = len(cyclic)
    some_sources = [int(v) for v in rng.choice(n, size=max(1, n // 3), replace=False)]
    some_targets = [int(v) for v in rng.choice(n, size=max(1, n // 2), replace=False)]
    expected = _shortest_path_betweenness(cyclic, some_sources, some_targets)
    got = edge_betweenness(_adjacency(cyclic), some_sources, some_targets)
    _assert_edge_values(got, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_subset_edge_betweenness_matches_networkx_subset_with_all_targets(seed: int) -> None:
    # networkx's edge subset function is exact when every node is a target (see the docstring).
    for graph in (_layered_dag(seed)[0], _random_digraph(seed)):
        sources = sorted(graph)[::2]
        expected = nx.edge_betweenness_centrality_subset(
            graph, sources, list(graph), normalized=False
        )
        _assert_edge_values(edge_betweenness(_adjacency(graph), sources, None), expected)
        _assert_edge_values(edge_betweenness(_adjacency(graph), sources, list(graph)), expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_subset_edge_betweenness_sums_to_networkx_node_betweenness(seed: int) -> None:
    graph, sources, targets = _layered_dag(seed)
    values = edge_betweenness(_adjacency(graph), sources, targets)
    into_node = np.asarray(values.sum(axis=0)).ravel()
    # The in-edges of v carry every (s, t) pair through v plus the pairs that end at v.
    ending = np.array(
        [
            sum(1 for s in set(sources) if s != v and nx.has_path(graph, s, v))
            if v in targets
            else 0
            for v in range(len(graph))
        ]
    )
    node = nx.betweenness_centrality_subset(graph, sources, targets, normalized=False)
    expected = [node[v] for v in range(len(graph))]
    np.testing.assert_allclose(into_node - ending, expected, rtol=RTOL, atol=1e-12)


def test_subset_edge_betweenness_weighs_predecessors_by_path_counts() -> None:
    # Three shortest s-t paths: two through m, one through y; both reach t via w.
    names = ["s", "a", "b", "m", "x", "y", "w", "t"]
    index = {name: i for i, name in enumerate(names)}
    edges = ["sa", "sb", "am", "bm", "sx", "xy", "mw", "yw", "wt"]
    graph = nx.DiGraph([(index[e[0]], index[e[1]]) for e in edges])
    values = _as_dict(edge_betweenness(_adjacency(graph), [index["s"]], [index["t"]]))
    assert values[index["m"], index["w"]] == pytest.approx(2 / 3, rel=RTOL)
    assert values[index["y"], index["w"]] == pytest.approx(1 / 3, rel=RTOL)
    assert values[index["s"], index["a"]] == pytest.approx(1 / 3, rel=RTOL)
    assert values[index["w"], index["t"]] == pytest.approx(1.0, rel=RTOL)


def test_edge_betweenness_keeps_unused_edges_as_explicit_zeros() -> None:
    graph = nx.DiGraph([(0, 1), (1, 2), (2, 2), (3, 0)])
    values = edge_betweenness(_adjacency(graph), [0], [2])
    assert values.nnz == 4
    assert _as_dict(values) == {(0, 1): 1.0, (1, 2): 1.0, (2, 2): 0.0, (3, 0): 0.0}


@pytest.mark.parametrize("seed", range(5))
def test_edge_betweenness_is_independent_of_the_source_block_size(seed: int) -> None:
    graph = _random_digraph(seed)
    adj = _adjacency(graph)
    n = len(graph)
    reference = edge_betweenness(adj)
    for budget in (n, 3 * n, 7 * n + 1):
        smaller = edge_betweenness(adj, max_dense_elements=budget)
        np.testing.assert_allclose(smaller.data, reference.data, rtol=RTOL, atol=1e-12)
    with pytest.raises(TopologyError, match="max_dense_elements"):
        edge_betweenness(adj, max_dense_elements=n - 1)
    with pytest.raises(ConfigError):
        edge_betweenness(adj, max_dense_elements=0)


def test_edge_betweenness_survives_path_counts_beyond_float_range() -> None:
    # 10**399 shortest paths per input-output pair; each pair's paths spread evenly, so every
    # edge carries exactly one path's worth per (source layer, target layer) pair it separates.
    width, depth = 10, 400
    adj = _complete_bipartite_chain(width, depth)
    n = adj.shape[0]
    values = edge_betweenness(adj, np.arange(width), np.arange(n - width, n))
    np.testing.assert_allclose(values.data, np.ones(values.nnz), rtol=1e-12)
    width, depth, source_layers = 10, 320, 3
    adj = _complete_bipartite_chain(width, depth)
    values = edge_betweenness(adj, np.arange(source_layers * width), None).tocoo()
    layer = values.row // width
    expected = (np.minimum(layer, source_layers - 1) + 1) * (depth - layer)
    np.testing.assert_allclose(values.data, expected, rtol=1e-12)


def test_node_indices_are_validated() -> None:
    adj = _adjacency(nx.DiGraph([(0, 1), (1, 2)]))
    with pytest.raises(TopologyError, match="outside a graph of 3 nodes"):
        path_counts(adj, [0], [3])
    with pytest.raises(TopologyError, match="outside"):
        edge_betweenness(adj, [-1], [2])
    with pytest.raises(TopologyError, match="integer"):
        edge_betweenness(adj, [0.0], [2])
    with pytest.raises(TopologyError, match="1-D"):
        topology_stats(adj, [[0]], [2])
    with pytest.raises(TopologyError, match="square"):
        degree_sequences(sp.csr_array(np.ones((2, 3))))


def test_graph_without_edges() -> None:
    adj = sp.csr_array((4, 4))
    assert topological_levels(adj).tolist() == [0, 0, 0, 0]
    assert edge_betweenness(adj).nnz == 0
    stats = topology_stats(adj, [0, 1], [0, 3], betweenness="all")
    assert stats.paths.log10_per_target.tolist() == [0.0, -math.inf]
    assert stats.summary()["max_edge_betweenness"] is None


@pytest.mark.parametrize("seed", range(6))
def test_topology_stats_bundles_the_statistics(seed: int) -> None:
    graph, sources, targets = _layered_dag(seed)
    adj = _adjacency(graph)
    stats = topology_stats(adj, sources, targets)
    assert isinstance(stats, TopologyStats)
    assert stats.n_nodes == len(graph) and stats.n_edges == graph.number_of_edges()
    assert stats.in_degree.tolist() == degree_sequences(adj)[0].tolist()
    assert stats.levels.tolist() == topological_levels(adj).tolist()
    assert stats.paths.log10_total == path_counts(adj, sources, targets).log10_total
    io = edge_betweenness(adj, sources, targets)
    np.testing.assert_allclose(stats.edge_betweenness.data, io.data, rtol=RTOL)
    summary = stats.summary()
    json.dumps(summary, allow_nan=False)
    assert summary["n_edges"] == graph.number_of_edges()
    assert summary["depth"] == int(stats.levels.max())
    assert summary["mean_degree"] == pytest.approx(2 * graph.number_of_edges() / len(graph))
    assert summary["max_degree"] == max(d for _, d in graph.degree)
    assert summary["max_edge_betweenness"] == pytest.approx(float(io.data.max()))
    assert summary["mean_edge_betweenness"] == pytest.approx(float(io.data.mean()))
    all_pairs = topology_stats(adj, sources, targets, betweenness="all")
    expected = nx.edge_betweenness_centrality(graph, normalized=False)
    _assert_edge_values(all_pairs.edge_betweenness, expected)
    none = topology_stats(adj, sources, targets, betweenness="none")
    assert none.edge_betweenness is None
    assert none.summary()["mean_edge_betweenness"] is None


def test_topology_stats_rejects_an_unknown_betweenness_mode() -> None:
    adj = _adjacency(nx.DiGraph([(0, 1)]))
    with pytest.raises(ConfigError, match="betweenness must be one of"):
        topology_stats(adj, [0], [1], betweenness="some")


def test_summary_reports_missing_paths_as_none() -> None:
    adj = _adjacency(nx.DiGraph([(0, 1), (2, 3)]))
    summary = topology_stats(adj, [0], [3]).summary()
    assert summary["log10_total_paths"] is None
    assert summary["max_edge_betweenness"] == 0.0
    json.dumps(summary, allow_nan=False)
