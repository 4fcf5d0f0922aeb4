"""Tests of channel connectivity and the topology graph (sparse, networkx, GraphML, `inspect --graph`)."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ticketguard.cli import cli
from ticketguard.errors import ArchitectureError
from ticketguard.signatures.structure import example_input, structure_of, trace_structure
from ticketguard.signatures.topology import (
    channel_connectivity,
    file_topology,
    layer_connectivity,
    topology_graph,
)
from ticketguard.tickets.models import build_model, default_pruned_parameters


def _random_mask(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < density


def _brute_connectivity(mask: torch.Tensor, groups: int) -> np.ndarray:
    """A[o, i] by definition: any kernel entry of (o, i) survives; grouped convs see one block."""
    m = mask.numpy()
    out, per_group = m.shape[0], m.shape[1]
    result = np.zeros((out, per_group * groups), dtype=bool)
    out_per_group = out // groups
    for o in range(out):
        g = o // out_per_group
        for i in range(per_group):
            kernel = m[o, i].reshape(-1) if m.ndim > 2 else [m[o, i]]
            result[o, g * per_group + i] = any(bool(v) for v in kernel)
    return result


@pytest.mark.parametrize(
    ("shape", "groups", "density"),
    [
        ((7, 5, 3, 3), 1, 0.1),  # conv2d, sparse enough to leave empty kernels
        ((7, 5, 3, 3), 1, 0.6),
        ((6, 9), 1, 0.3),  # linear
        ((6, 2, 3, 3), 2, 0.2),  # grouped: in 4, 2 groups
        ((6, 2, 3, 3), 3, 0.2),  # grouped: in 6, 3 groups
        ((8, 1, 3, 3), 8, 0.3),  # depthwise
        ((4, 3, 5), 1, 0.2),  # conv1d
        ((4, 3, 2, 2, 2), 1, 0.15),  # conv3d
    ],
)
def test_channel_connectivity_matches_brute_force(shape, groups, density) -> None:
    for seed in range(3):
        mask = _random_mask(shape, density, seed)
        conn = channel_connectivity(mask, groups)
        assert conn.dtype == torch.bool
        expected = _brute_connectivity(mask, groups)
        assert tuple(conn.shape) == expected.shape
        np.testing.assert_array_equal(conn.numpy(), expected)
    if len(shape) > 2 and density < 0.5:
        # The test exercises both values: some connections exist and some are absent.
        assert 0 < expected.sum() < expected.size


def test_channel_connectivity_of_a_weight_tensor_and_extremes() -> None:
    weight = torch.zeros(3, 2, 3, 3)
    weight[1, 0, 2, 2] = -0.5  # one non-zero entry connects input 0 to output 1
    conn = channel_connectivity(weight != 0)
    assert conn.tolist() == [[False, False], [True, False], [False, False]]
    assert channel_connectivity(torch.ones(4, 3, 3, 3, dtype=torch.bool)).all()
    assert not channel_connectivity(torch.zeros(4, 3, 3, 3, dtype=torch.bool)).any()
    # A float 0/1 linear mask is read as bool.
    assert channel_connectivity(torch.tensor([[1.0, 0.0]])).tolist() == [[True, False]]


def _digits_mask(width: int = 4, density: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    model = build_model("digits_cnn", 10, {"width": width})
    state = model.state_dict()
    return {
        n: _random_mask(tuple(state[n].shape), density, seed + i)
        for i, n in enumerate(default_pruned_parameters(model))
    }


@pytest.mark.parametrize(
    ("arch", "kwargs", "shape"),
    [("digits_cnn", {"width": 4}, (1, 8, 8)), ("resnet20", {}, (3, 32, 32))],
)
def test_edge_count_is_connectivity_plus_links(arch, kwargs, shape) -> None:
    structure = structure_of(arch, 10, shape, kwargs)
    model = build_model(arch, 10, kwargs)
    state = model.state_dict()
    mask = {
        n: _random_mask(tuple(state[n].shape), 0.05, i)
        for i, n in enumerate(default_pruned_parameters(model))
    }
    graph = topology_graph(structure, mask)
    expected = 0
    for layer in structure.layers.values():
        conn = layer_connectivity(layer, mask, None)
        if layer.name in mask:
            np.testing.assert_array_equal(
                conn.numpy(), _brute_connectivity(mask[layer.name], layer.groups)
            )
        else:
            assert conn.all()  # neither mask nor weights: dense
        expected += int(conn[:, layer.in_nodes >= 0].sum())
    expected += len({tuple(link) for link in structure.links.tolist()})
    assert graph.num_edges == expected
    assert graph.num_nodes == structure.num_nodes
    assert graph.adjacency.shape == (structure.num_nodes, structure.num_nodes)
    assert set(np.unique(graph.adjacency.data).tolist()) == {1.0}
    # Every edge is labelled with what made it: a link (1) or layer k (k + 2 in layer order).
    expected_edges = {(int(u), int(v), 1) for u, v in structure.links.tolist()}
    for index, layer in enumerate(structure.layers.values(), start=2):
        o, i = np.nonzero(layer_connectivity(layer, mask, None).numpy())
        keep = layer.in_nodes[i] >= 0
        rows, cols = layer.in_nodes[i][keep], layer.out_start + o[keep]
        expected_edges |= set(zip(rows.tolist(), cols.tolist(), [index] * len(rows), strict=True))
    coo = graph.edge_layer.tocoo()
    got = set(zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist(), strict=True))
    assert got == expected_edges


def test_weights_zero_pattern_is_used_without_a_mask() -> None:
    structure = structure_of("digits_cnn", 10, (1, 8, 8), {"width": 4})
    mask = _digits_mask()
    weights = {n: torch.randn(m.shape) * m for n, m in mask.items()}
    from_mask = topology_graph(structure, mask)
    from_weights = topology_graph(structure, {}, weights)
    assert (from_mask.adjacency != from_weights.adjacency).nnz == 0
    dense = topology_graph(structure, {})
    assert dense.num_edges > from_mask.num_edges
    wrong = {"conv2.weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(ArchitectureError, match="conv2.weight"):
        topology_graph(structure, wrong)


def test_networkx_graph_matches_the_sparse_adjacency_and_is_a_dag() -> None:
    structure = structure_of("resnet20", 10, (3, 32, 32))
    model = build_model("resnet20", 10)
    state = model.state_dict()
    mask = {
        n: _random_mask(tuple(state[n].shape), 0.1, i)
        for i, n in enumerate(default_pruned_parameters(model))
    }
    graph = topology_graph(structure, mask)
    g = graph.to_networkx()
    coo = graph.adjacency.tocoo()
    assert set(zip(coo.row.tolist(), coo.col.tolist(), strict=True)) == set(g.edges())
    assert g.number_of_nodes() == structure.num_nodes
    assert nx.is_directed_acyclic_graph(g)
    # Flow runs from the input channels to the logits.
    assert all(g.in_degree(int(v)) == 0 for v in structure.sources)
    assert all(g.out_degree(int(v)) == 0 for v in structure.targets)
    reachable = set()
    for v in structure.sources:
        reachable |= nx.descendants(g, int(v))
    assert set(structure.targets.tolist()) <= reachable
    # Attributes say what each node and edge is.
    first = int(structure.sources[0])
    assert g.nodes[first] == {"space": "input", "kind": "input", "channel": 0}
    kinds = {d["kind"] for _, _, d in g.edges(data=True)}
    assert kinds == {"link", "layer"}
    fc = structure.layers["fc.weight"]
    for u, _, d in g.in_edges(int(fc.out_start), data=True):
        assert d == {"kind": "layer", "layer": "fc.weight"}
        assert u in set(fc.in_nodes.tolist())


def test_duplicate_edges_keep_their_layer() -> None:
    """A layer reading a channel twice (concatenated with itself) must not corrupt edge labels."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.conv2 = nn.Conv2d(8, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv1(x)
            x = self.conv2(torch.cat([x, x], 1))
            return self.fc(x.mean((2, 3)))

    structure = trace_structure(Twice(), example_input((3, 8, 8)))
    graph = topology_graph(structure, {})
    g = graph.to_networkx()
    # conv2 connects each of conv1's 4 channels to each of its 4 outputs: 16 distinct edges.
    conv2 = structure.layers["conv2.weight"]
    edges = [(u, v) for u, v, d in g.edges(data=True) if d["layer"] == "conv2.weight"]
    assert len(edges) == 16
    assert all(v in set(conv2.out_nodes.tolist()) for _, v in edges)
    assert {d["layer"] for _, _, d in g.edges(data=True)} == {
        "conv1.weight",
        "conv2.weight",
        "fc.weight",
    }
    assert graph.num_edges == g.number_of_edges() == 3 * 4 + 16 + 4 * 2


def test_graphml_is_written_atomically_and_reads_back(tmp_path: Path, monkeypatch) -> None:
    structure = structure_of("digits_cnn", 10, (1, 8, 8), {"width": 4})
    graph = topology_graph(structure, _digits_mask())
    path = tmp_path / "out" / "ticket.graphml"
    graph.write_graphml(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ticket.graphml"]
    back = nx.read_graphml(path)
    assert back.is_directed()
    assert back.number_of_nodes() == graph.num_nodes
    assert back.number_of_edges() == graph.num_edges
    original = graph.to_networkx()
    assert {(int(u), int(v)) for u, v in back.edges()} == set(original.edges())
    node = back.nodes[str(int(structure.layers["conv2.weight"].out_start))]
    assert node == {"space": "conv2", "kind": "conv", "channel": 0}

    # A failed write leaves the previous file as it was and no temporary file behind.
    before = path.read_bytes()

    def broken(graph, target, *args, **kwargs):
        Path(target).write_text("<partial")
        raise OSError("disk full")

    monkeypatch.setattr(nx, "write_graphml", broken)
    with pytest.raises(OSError, match="disk full"):
        topology_graph(structure, {}).write_graphml(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ticket.graphml"]


# --- file_topology and `inspect --graph` ---------------------------------------------------------


@pytest.fixture
def ticket_file(make_ticket, tmp_path: Path) -> Path:
    path = tmp_path / "small.ticket"
    make_ticket(width=4, keep=0.3).save(path)
    return path


def test_file_topology_reports_per_layer_connectivity(ticket_file: Path, make_ticket) -> None:
    ticket = make_ticket(width=4, keep=0.3)
    report = file_topology(ticket_file)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert list(layers) == [
        "conv1.weight",
        "conv2.weight",
        "conv3.weight",
        "fc1.weight",
        "fc.weight",
    ]
    for name, m in ticket.mask.items():
        conn = _brute_connectivity(m, 1)
        assert layers[name]["connectivity"] == list(conn.shape)
        assert layers[name]["connections"] == int(conn.sum())
        assert layers[name]["density"] == pytest.approx(conn.mean())
    # Unpruned layers are read from their (non-zero) weights: fully connected.
    assert layers["conv1.weight"]["density"] == 1.0
    structure = structure_of("digits_cnn", 10, (1, 8, 8), {"width": 4})
    graph = topology_graph(structure, ticket.mask, ticket.trained)
    assert report["summary"]["n_edges"] == graph.num_edges
    assert report["summary"]["n_nodes"] == structure.num_nodes
    assert report["graphml"] is None


def test_inspect_graph_writes_graphml(ticket_file: Path, tmp_path: Path, make_ticket) -> None:
    out = tmp_path / "graphs" / "ticket.graphml"
    result = CliRunner().invoke(
        cli, ["inspect", str(ticket_file), "--graph", str(out)], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 0, result.output
    back = nx.read_graphml(out)
    ticket = make_ticket(width=4, keep=0.3)
    structure = structure_of("digits_cnn", 10, (1, 8, 8), {"width": 4})
    graph = topology_graph(structure, ticket.mask, ticket.trained)
    assert back.number_of_edges() == graph.num_edges
    lines = [line for line in result.output.splitlines() if line.startswith("topology")]
    assert len(lines) == 1, result.output
    assert f"{structure.num_nodes:,} channel nodes, {graph.num_edges:,} edges" in lines[0]
    assert "input-to-logit paths" in lines[0]
    assert f"written to {out}" in result.output

    # JSON output carries the same topology.
    again = tmp_path / "again.graphml"
    result = CliRunner().invoke(cli, ["inspect", str(ticket_file), "--graph", str(again), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["topology"]["summary"]["n_edges"] == graph.num_edges
    assert report["topology"]["graphml"] == str(again)
    assert again.exists()


def test_inspect_graph_refuses_to_overwrite_the_input(ticket_file: Path) -> None:
    before = ticket_file.read_bytes()
    result = CliRunner().invoke(cli, ["inspect", str(ticket_file), "--graph", str(ticket_file)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "--graph" in errors[0] and "overwrite" in errors[0]
    assert ticket_file.read_bytes() == before


def test_inspect_graph_of_a_plain_state_dict_needs_the_architecture(tmp_path: Path) -> None:
    model = build_model("digits_cnn", 10, {"width": 4})
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "w.graphml"
    result = CliRunner().invoke(cli, ["inspect", str(path), "--graph", str(out)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {path}: the topology graph needs the architecture; pass --arch"]
    assert not out.exists()
    result = CliRunner().invoke(
        cli,
        ["inspect", str(path), "--graph", str(out), "--arch", "digits_cnn"]
        + ["--arch-arg", "width=4"],
    )
    assert result.exit_code == 0, result.output
    g = nx.read_graphml(out)
    # Dense weights: every layer fully connected.
    structure = structure_of("digits_cnn", 10, (1, 8, 8), {"width": 4})
    dense = sum(
        layer.out_channels * layer.in_channels for layer in structure.layers.values()
    ) + len(structure.links)
    assert g.number_of_edges() == dense


def test_brute_force_helper_on_hand_examples() -> None:
    m = torch.zeros(2, 2, 1, 1, dtype=torch.bool)
    m[0, 1, 0, 0] = True
    assert _brute_connectivity(m, 1).tolist() == [[False, True], [False, False]]
    grouped = torch.ones(4, 1, 1, 1, dtype=torch.bool)
    expected = [[r == c for c in range(4)] for r in range(4)]
    assert _brute_connectivity(grouped, 4).tolist() == expected
