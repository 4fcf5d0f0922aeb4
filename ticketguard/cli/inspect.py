"""`ticketguard inspect`: what a ticket or checkpoint holds."""

from __future__ import annotations

import json
from typing import Any

import click

from ticketguard.cli._common import (
    arch_arg_option,
    check_arch,
    check_dataset,
    data_dir_option,
    device_option,
    download_option,
    library_errors,
    parse_kwargs,
    percent,
)
from ticketguard.tickets.inspection import inspect_file


def _print_human(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)

    def line(label: str, text: str) -> None:
        # Text from the file is printed verbatim, never interpreted as rich markup.
        console.print(f"{label:<16}{text}", markup=False)

    sp = report["sparsity"]
    params = report["parameters"]
    classes = f", {report['num_classes']} classes" if report.get("num_classes") else ""
    console.print(f"{report['path']}  ({report['format']})", markup=False, style="bold")
    line("architecture", f"{report.get('architecture') or 'unknown (pass --arch)'}{classes}")
    counted = (
        f"{params['model']:,} model parameters"
        if params.get("model") is not None
        else f"{params['values']:,} floating-point values"
    )
    line("parameters", f"{counted}, {sp['total']:,} masked, {sp['surviving']:,} surviving")
    line(
        "sparsity",
        f"{100 * sp['sparsity']:.2f}% global (density {100 * sp['density']:.2f}%), "
        f"mask from {report['mask_source']}",
    )
    line("fingerprint", report["fingerprint"])
    meta = report.get("metadata") or {}
    if isinstance(meta.get("dataset"), dict):
        line("dataset", meta["dataset"]["name"])
    for key in ("created", "toolkit_version"):
        if key in meta:
            line(key, str(meta[key]))
    acc = meta.get("accuracy") or {}
    if acc:
        line("recorded acc", ", ".join(f"{k} {percent(v)}" for k, v in sorted(acc.items())))
    if "evaluation" in report:
        ev = report["evaluation"]
        console.print(
            f"{'test accuracy':<16}{percent(ev['accuracy'])} on {ev['dataset']} "
            f"({ev['samples']} samples)",
            markup=False,
            style="bold",
        )
    table = Table(title="per layer")
    for col in ("tensor", "shape", "weights", "surviving", "sparsity %"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for layer in sp["layers"]:
        table.add_row(
            Text(layer["name"]),
            "x".join(map(str, layer["shape"])),
            f"{layer['total']:,}",
            f"{layer['surviving']:,}",
            f"{100 * layer['sparsity']:.2f}",
        )
    console.print(table)
    for note in report["notes"]:
        console.print(f"note: {note}", markup=False)
    topology = report.get("topology")
    if topology:
        summary = topology["summary"]
        line(
            "topology",
            f"{summary['n_nodes']:,} channel nodes, {summary['n_edges']:,} edges, "
            f"10^{summary['log10_total_paths']:.1f} input-to-logit paths"
            if summary.get("log10_total_paths") is not None
            else f"{summary['n_nodes']:,} channel nodes, {summary['n_edges']:,} edges, no path",
        )
        line("graph", f"written to {topology['graphml']}")


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--arch",
    default=None,
    callback=check_arch,
    help="Architecture when the file records none (registry, torchvision or package.module:factory).",
)
@arch_arg_option
@click.option(
    "--eval",
    "eval_dataset",
    default=None,
    callback=check_dataset,
    metavar="DATASET",
    help="Also measure test accuracy on DATASET.",
)
@data_dir_option
@download_option
@device_option
@click.option(
    "--graph",
    "graph_path",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="OUT.graphml",
    help="Also trace the topology graph: write it as GraphML and report its statistics.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@library_errors
def inspect(
    file: str,
    arch: str | None,
    arch_arg: tuple[str, ...],
    eval_dataset: str | None,
    data_dir: str | None,
    download: bool,
    device: str,
    graph_path: str | None,
    as_json: bool,
) -> None:
    """Show what FILE holds: architecture, sparsity per layer, fingerprint, metadata.

    FILE may be a ticket, a safetensors file, a PyTorch state dict, a torch.nn.utils.prune
    checkpoint or a checkpoint dict; nothing in it is executed.

    \b
    Example:
      ticketguard inspect runs/digits/final.ticket --eval digits
      ticketguard inspect runs/digits/final.ticket --graph ticket.graphml
    """
    kwargs = parse_kwargs(arch_arg, "--arch-arg") if arch_arg else None
    report = inspect_file(
        file,
        arch=arch,
        arch_kwargs=kwargs,
        eval_dataset=eval_dataset,
        data_dir=data_dir,
        download=download,
        device=device,
    )
    if graph_path is not None:
        from pathlib import Path

        from ticketguard.signatures.topology import file_topology

        if Path(graph_path).resolve() == Path(file).resolve():
            raise click.BadParameter("would overwrite FILE", param_hint="--graph")
        report["topology"] = file_topology(file, arch=arch, arch_kwargs=kwargs, graphml=graph_path)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_human(report)
