"""`ticketguard find`: iterative magnitude pruning with rewinding."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

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
from ticketguard.tickets import paths
from ticketguard.tickets.finding import FindConfig, find_ticket, load_run_config
from ticketguard.tickets.pruning import SCOPES
from ticketguard.tickets.training import OPTIMIZERS, SCHEDULES

# Options that make up the run's configuration: option name -> (section, field).
CONFIG_OPTIONS = {
    "arch": (None, "arch"),
    "arch_arg": (None, "arch_kwargs"),
    "dataset": (None, "dataset"),
    "rounds": (None, "rounds"),
    "rewind": (None, "rewind"),
    "layers": (None, "layers"),
    "seed": (None, "seed"),
    "split_seed": (None, "split_seed"),
    "rate": ("prune", "rate"),
    "scope": ("prune", "scope"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "optimizer": ("train", "optimizer"),
    "lr": ("train", "lr"),
    "momentum": ("train", "momentum"),
    "weight_decay": ("train", "weight_decay"),
    "schedule": ("train", "schedule"),
    "milestones": ("train", "milestones"),
    "gamma": ("train", "gamma"),
    "amp": ("train", "amp"),
    "workers": ("train", "workers"),
    "image_size": (None, "image_size"),
}


def _option_value(name: str, value: Any) -> Any:
    if name == "arch_arg":
        return parse_kwargs(value, "--arch-arg")
    if name == "layers":
        return tuple(value) or None
    if name == "milestones":
        try:
            return tuple(float(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is not a comma-separated list of fractions", param_hint="--milestones"
            ) from None
    return value


def build_config(
    options: Mapping[str, Any], base: FindConfig | None = None, only: set[str] | None = None
) -> FindConfig:
    """Build a FindConfig from CLI options, on top of `base` for the options named in `only`."""
    data = (base or FindConfig()).to_dict()
    for name, (section, field) in CONFIG_OPTIONS.items():
        if only is not None and name not in only:
            continue
        value = _option_value(name, options[name])
        (data[section] if section else data)[field] = value
    return FindConfig.from_dict(data)


class RichReporter:
    """Progress bars and a per-round table on the terminal (only rank 0 draws)."""

    def __init__(self, quiet: bool):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.quiet = quiet
        self.console = Console()
        bar_console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=bar_console,
            transient=True,
            disable=quiet or not bar_console.is_terminal,
        )
        self.task = None
        self.records: list[Mapping[str, Any]] = []

    def note(self, line: str) -> None:
        """A line about the run folder (an interrupted write finished, a round redone)."""
        click.echo(f"note: {line}", err=True)

    def round_started(self, round_index: int, iterations: int) -> None:
        if not self.progress.disable:
            self.progress.start()
        label = "dense" if round_index == 0 else f"round {round_index}"
        self.task = self.progress.add_task(f"training {label}", total=iterations)

    def advance(self, steps: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, steps)

    def round_finished(self, record: Mapping[str, Any]) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        if not self.progress.disable:
            self.progress.stop()
        self.records.append(record)
        if not self.quiet:
            self.console.print(
                f"round {record['round']:>2}: sparsity {100 * record['sparsity']:6.2f}%  "
                f"val {percent(record['val_accuracy']):>7}  test {percent(record['test_accuracy']):>7}"
            )

    def table(self, records: list[Mapping[str, Any]]) -> None:
        from rich.table import Table

        table = Table(title="ticket per round")
        for col in ("round", "surviving", "sparsity %", "val acc %", "test acc %"):
            table.add_column(col, justify="right")
        for rec in records:
            table.add_row(
                str(rec["round"]),
                f"{rec['surviving']:,}",
                f"{100 * rec['sparsity']:.2f}",
                percent(rec["val_accuracy"]).rstrip("%"),
                percent(rec["test_accuracy"]).rstrip("%"),
            )
        self.console.print(table)


def _init_distributed(device: str) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    use_nccl = device != "cpu" and torch.cuda.is_available()
    if use_nccl:
        # Each rank must own its GPU before NCCL starts, or every rank lands on GPU 0.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return True


@click.command()
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    required=True,
    help="Run directory: final.ticket, rounds/round-NN.ticket, log.json, config.json.",
)
@click.option(
    "--arch",
    default="digits_cnn",
    show_default=True,
    callback=check_arch,
    help="Registry name, torchvision model name, or package.module:factory.",
)
@arch_arg_option
@click.option(
    "--dataset",
    default="digits",
    show_default=True,
    callback=check_dataset,
    help="digits, cifar10, cifar100, mnist, fashion-mnist or imagefolder:PATH.",
)
@data_dir_option
@download_option
@click.option(
    "--image-size",
    type=int,
    default=None,
    help="Side of the square images for imagefolder: data (default 32).",
)
@click.option(
    "--rounds", type=int, default=10, show_default=True, help="Pruning rounds after dense training."
)
@click.option(
    "--rate",
    type=float,
    default=0.2,
    show_default=True,
    help="Fraction of surviving weights pruned per round.",
)
@click.option(
    "--scope",
    type=click.Choice(SCOPES),
    default="global",
    show_default=True,
    help="One magnitude threshold over all layers, or one per layer.",
)
@click.option(
    "--rewind",
    default="0",
    show_default=True,
    help="Rewind point: 0 (original LTH), Nep (epochs) or Nit (iterations).",
)
@click.option(
    "--layers",
    multiple=True,
    metavar="PATTERN",
    help="Weights to prune (name or glob, repeatable). Default: every conv and linear "
    "weight except the first conv and the classifier.",
)
@click.option(
    "--epochs", type=int, default=30, show_default=True, help="Training epochs per round."
)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd", show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True, help="Peak learning rate.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True)
@click.option(
    "--milestones",
    default="0.5,0.75",
    show_default=True,
    help="Step schedule: fractions of training where the rate is multiplied by --gamma.",
)
@click.option("--gamma", type=float, default=0.1, show_default=True)
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only; ignored on the CPU).")
@click.option(
    "--workers", type=int, default=0, show_default=True, help="Data-loader worker processes."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--split-seed", type=int, default=0, show_default=True, help="Seed of the train/val/test split."
)
@device_option
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out with its recorded configuration (starts one if --out holds none).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or per-round lines.")
@click.pass_context
@library_errors
def find(
    ctx: click.Context,
    out: str,
    data_dir: str | None,
    download: bool,
    device: str,
    resume: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Find a lottery ticket by iterative magnitude pruning with rewinding.

    \b
    Example:
      ticketguard find --out runs/digits --rounds 10 --rewind 1ep
    """
    out_dir = Path(out)
    if resume and paths.config_file(out_dir).exists():
        explicit = {
            n
            for n in CONFIG_OPTIONS
            if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)
        }
        config = build_config(options, load_run_config(out_dir), only=explicit)
    else:
        config = build_config(options)
    distributed = _init_distributed(device)
    try:
        from ticketguard.tickets.training import DistContext

        is_main = DistContext.current().is_main
        reporter = RichReporter(quiet or not is_main)
        result = find_ticket(
            config,
            out_dir,
            data_dir=data_dir,
            download=download,
            device=device,
            resume=resume,
            reporter=reporter,
        )
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if is_main and not quiet:
        reporter.table(result.rounds)
    if is_main:
        acc = result.ticket.metadata["accuracy"]
        click.echo(
            f"dense test accuracy {percent(acc['dense_test'])}, ticket test accuracy "
            f"{percent(acc['test'])} at {100 * result.ticket.mask.sparsity:.2f}% sparsity"
        )
        click.echo(
            f"wrote {paths.final_ticket(out_dir)} (fingerprint {result.ticket.fingerprint[:16]}...)"
        )
