"""White-box verification at ResNet-50 scale, and graph statistics against networkx.

A ResNet-50-sized ticket: torchvision `resnet50` (untrained) with a random 90%-sparse mask over
its default pruned layers, signed with W2 (no retraining: this measures verification, not
accuracy). Timed on this machine's CPU:
- verification without a reference, end to end through `ticketguard.verify` on a plain
  safetensors state dict (mask recovery, reading the bits, statistics, crypto check), targets
  <= 2 s; the time to read the 100 MB file is printed on its own;
- channel alignment of a channel-permuted copy against the reference (no target);
- topology statistics of the ticket's channel graph (tracing, graph, degrees, path counts,
  input->logit edge betweenness), target <= 5 s;
- all-pairs edge betweenness on a real ResNet-20 ticket graph vs networkx
  `edge_betweenness_centrality` (speed ratio, values must agree).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ticketguard.signatures.credential import write_credential
from ticketguard.signatures.graphstats import edge_betweenness, topology_stats
from ticketguard.signatures.keys import generate_key
from ticketguard.signatures.signing import sign_without_data
from ticketguard.signatures.structure import example_input, trace_structure
from ticketguard.signatures.topology import topology_graph
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import build_model, default_pruned_parameters
from ticketguard.tickets.ticket import Ticket
from ticketguard.verify.alignment import align_masks, mask_overlap
from ticketguard.verify.verification import verify

REPEATS = 3


def _random_ticket(arch: str, shape: tuple[int, int, int], density: float) -> Ticket:
    torch.manual_seed(0)
    model = build_model(arch, 10 if arch == "resnet20" else 1000)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    names = default_pruned_parameters(model)
    mask = Mask({n: torch.rand(state[n].shape, generator=gen) < density for n in names})
    trained = {k: v.clone() for k, v in state.items()}
    mask.apply_(trained)
    meta = {
        "architecture": {"name": arch, "kwargs": {}},
        "num_classes": 10 if arch == "resnet20" else 1000,
        "input_shape": list(shape),
    }
    return Ticket(mask, trained, state, meta)


def _median(fn, repeats: int = REPEATS) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_resnet50(tmp: Path) -> dict[str, float]:
    ticket = _random_ticket("resnet50", (3, 224, 224), 0.10)
    key = generate_key("bench@example.org")
    result = sign_without_data(ticket, key, created="2026-01-01T00:00:00Z")
    signed, credential, params = result.ticket, result.credential, result.params
    cred_path = tmp / "r50.cred.json"
    write_credential(cred_path, credential)
    from safetensors.torch import save_file

    suspect_path = tmp / "r50-suspect.safetensors"
    save_file({k: v.contiguous() for k, v in signed.trained.items()}, str(suspect_path))
    ref_path = tmp / "r50.ticket"
    signed.save(ref_path)

    from ticketguard.tickets.loading import load_checkpoint

    load_s, loaded = _median(lambda: load_checkpoint(suspect_path))
    verify_s, report = _median(lambda: verify(loaded, credential=cred_path, key=key))
    assert report.verified, report.verdict.reason
    total_s, _ = _median(lambda: verify(suspect_path, credential=cred_path, key=key))
    sparsity = 100 * signed.mask.sparsity
    print(
        f"ResNet-50 ticket ({signed.mask.num_weights:,} masked weights, {sparsity:.1f}% sparse, "
        f"{params.num_bits} bits in {len(params.layers)} layers)"
    )
    print(f"  read the suspect file:                 {load_s:6.2f} s")
    print(f"  verify without reference (in memory):  {verify_s:6.2f} s  (target <= 2 s)")
    print(f"  verify without reference (from file):  {total_s:6.2f} s")
    print(f"  verdict: {report.verdict.reason}")

    structure = trace_structure(signed.build_model(), example_input((3, 224, 224), 1))
    perm = structure.random_permutation(np.random.default_rng(0))
    permuted = structure.permute_state(dict(signed.mask), perm)
    start = time.perf_counter()
    alignment = align_masks(structure, signed.mask, permuted)
    align_s = time.perf_counter() - start
    back = alignment.apply(structure, permuted)
    overlap = mask_overlap(signed.mask, back, list(signed.mask))
    print(
        f"  channel alignment of a permuted copy:  {align_s:6.2f} s  ({alignment.sweeps} sweeps, "
        f"overlap after {overlap:.4f})"
    )

    def stats():
        s = trace_structure(signed.build_model(), example_input((3, 224, 224), 1))
        graph = topology_graph(s, signed.mask)
        return graph, topology_stats(graph.adjacency, graph.sources, graph.targets)

    stats_s, (graph, st) = _median(stats)
    print(
        f"  topology statistics:                   {stats_s:6.2f} s  (target <= 5 s; "
        f"{graph.num_nodes:,} nodes, {graph.num_edges:,} edges, "
        f"10^{st.summary()['log10_total_paths']:.1f} input-to-logit paths)"
    )
    return {
        "r50_verify_s": verify_s,
        "r50_verify_file_s": total_s,
        "r50_align_s": align_s,
        "r50_topology_s": stats_s,
    }


def bench_resnet20_networkx() -> dict[str, float]:
    import networkx as nx

    ticket = _random_ticket("resnet20", (3, 32, 32), 0.10)
    structure = trace_structure(ticket.build_model(), example_input((3, 32, 32)))
    graph = topology_graph(structure, ticket.mask)
    digraph = graph.to_networkx()
    start = time.perf_counter()
    expected = nx.edge_betweenness_centrality(digraph, normalized=False)
    nx_s = time.perf_counter() - start
    ours_s, values = _median(lambda: edge_betweenness(graph.adjacency))
    coo = values.tocoo()
    ours = dict(zip(zip(coo.row.tolist(), coo.col.tolist(), strict=True), coo.data, strict=True))
    worst = max(abs(ours[e] - v) / max(1.0, abs(v)) for e, v in expected.items())
    assert worst < 1e-9, worst
    print(
        f"ResNet-20 ticket graph, 90% sparse ({graph.num_nodes} nodes, {graph.num_edges} edges): "
        "all-pairs edge betweenness"
    )
    print(f"  networkx edge_betweenness_centrality:  {nx_s:6.2f} s")
    print(f"  ticketguard edge_betweenness:          {ours_s:6.2f} s  (values agree to 1e-9)")
    print(f"  speed ratio: {nx_s / ours_s:.1f}x")
    return {"r20_networkx_s": nx_s, "r20_ours_s": ours_s, "r20_ratio": nx_s / ours_s}


def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        figures = bench_resnet50(Path(tmp))
    figures.update(bench_resnet20_networkx())
    return figures


if __name__ == "__main__":
    main()
