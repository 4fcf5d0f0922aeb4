"""`ticketguard bench CONFIG.toml`: run a grid of attacks on a signed ticket and report."""

from __future__ import annotations

from pathlib import Path

import click

from ticketguard.cli._common import library_errors


@click.command()
@click.argument("config_path", metavar="CONFIG.toml", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder [default: bench-out/NAME, NAME from the config].",
)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Worker processes.")
@click.option("--ticket", type=click.Path(dir_okay=False), default=None, help="The signed ticket.")
@click.option("--credential", type=click.Path(dir_okay=False), default=None, help="Its credential.")
@click.option(
    "--secret",
    type=click.Path(dir_okay=False),
    default=None,
    help="Its revealed secret (each attacked model is verified as a judge would).",
)
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [default: the config's].")
@click.option("--fresh", is_flag=True, help="Run every cell again, even finished ones.")
@library_errors
def bench(
    config_path: str,
    out: str | None,
    workers: int | None,
    ticket: str | None,
    credential: str | None,
    secret: str | None,
    device: str | None,
    fresh: bool,
) -> None:
    """Run the robustness benchmark: a grid of attacks against a signed ticket.

    Every cell (an attack, its parameters, a seed) attacks the target, measures the attacked
    model's clean test accuracy and verifies it with the credential and the revealed secret.
    An attack succeeds when the owner's evidence is lost and the accuracy drop stays within
    the config's max_drop. Forge and fake-trigger claims are settled by a dispute; a key
    search counts how many random keys verify. Finished cells are kept in OUT/cells and
    skipped when the command is run again (--fresh runs them again).

    Writes OUT/results.csv, results.json, plots.png, report.md and report.html, and prints
    the table. Exit code 1 if any cell failed.

    \b
    Example:
      ticketguard bench configs/digits-bench.toml --ticket signed.ticket \\
          --credential signed.cred.json --secret signed.secret.json --out bench
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ticketguard.attacks.bench import load_config, run_bench
    from ticketguard.attacks.report import terminal_table

    config = load_config(
        config_path,
        {
            "ticket": ticket,
            "credential": credential,
            "secret": secret,
            "device": device,
            "workers": workers,
        },
    )
    folder = Path(out) if out is not None else Path("bench-out") / config.name
    console = Console(highlight=False)
    if not console.is_terminal:
        # Logs and CI keep the whole table on one line per cell.
        console = Console(highlight=False, width=220)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = None

    def started(pending: int, skipped: int) -> None:
        nonlocal task
        if skipped:
            console.print(
                f"{skipped} finished cells kept from an earlier run (--fresh reruns them)"
            )
        task = progress.add_task(f"{config.name}: attacking", total=pending)

    def finished(record: dict) -> None:
        if task is not None:
            progress.update(task, advance=1, description=f"{config.name}: {record['attack']} done")
        if record.get("error"):
            console.print(f"cell {record['id']} ({record['attack']}) failed: {record['error']}")

    try:
        with progress:
            result = run_bench(config, folder, fresh=fresh, on_cell=finished, on_start=started)
    except KeyboardInterrupt:
        click.echo(f"Interrupted; finished cells are kept in {folder / 'cells'}.", err=True)
        raise SystemExit(130) from None
    console.print(terminal_table(result.cells))
    console.print(
        f"{result.ran} cells run, {result.skipped} kept, in {result.seconds:.0f} s", markup=False
    )
    for path in result.outputs:
        console.print(f"wrote {path}", markup=False)
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} of {len(result.cells)} cells failed")
