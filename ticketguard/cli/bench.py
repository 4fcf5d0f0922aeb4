"""`ticketguard bench CONFIG.toml`: run a grid of attacks on a signed ticket and report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ticketguard.cli._common import library_errors


@click.command()
@click.argument("config_path", metavar="CONFIG.toml", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder [default: bench-out/NAME in the working directory, NAME from the config].",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes [config's]."
)
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
    search counts how many random keys verify. Paths in the config are relative to its
    folder; --ticket, --credential and --secret replace its [target].

    Finished cells are kept in OUT/cells and skipped when the command is run again with the
    same target and settings (--fresh runs them again; Ctrl-C keeps them). Writes
    OUT/results.csv, results.json, plots.png, report.md and report.html, and prints the table.
    A config of more than 10,000 cells is refused. The unattacked target is verified first: a
    target that is unreadable or does not verify with its credential and secret is refused
    before any attack runs, and nothing is written. Exit code 1 if any cell failed or the
    target was refused, 2 for a bad config.

    \b
    Example:
      ticketguard bench configs/digits-bench.toml --ticket signed.ticket \\
          --credential signed.cred.json --secret signed.secret.json --out bench
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ticketguard.attacks.bench import load_config, run_bench
    from ticketguard.attacks.report import terminal_table, verdict_text

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
    live = console.is_terminal
    if not live:
        # Logs and CI get one line per cell instead of a redrawn bar, and the whole table.
        console = Console(highlight=False, width=220)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not live,
    )
    task = None
    done = 0
    total = 0

    def started(pending: int, kept: int) -> None:
        nonlocal task, total
        total = pending
        if kept:
            console.print(
                f"{kept} finished cells skipped (kept from an earlier run; --fresh reruns them)",
                markup=False,
            )
        console.print(f"{pending} cells to run, results in {folder}", markup=False)
        task = progress.add_task(f"{config.name}: attacking", total=pending)

    def finished(record: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        grid = ", ".join(f"{k}={v}" for k, v in (record.get("grid") or {}).items())
        what = f"{record['attack']}" + (f" ({grid})" if grid else "") + f" seed {record['seed']}"
        if task is not None:
            progress.update(task, advance=1, description=f"{config.name}: {what} done")
        if record.get("error"):
            console.print(f"cell {record['id']} {what} failed: {record['error']}", markup=False)
        elif not live:
            seconds = (record.get("seconds_attack") or 0) + (record.get("seconds_verify") or 0)
            console.print(
                f"[{done}/{total}] {what}: {verdict_text(record)} ({seconds:.1f} s)", markup=False
            )

    try:
        with progress:
            result = run_bench(config, folder, fresh=fresh, on_cell=finished, on_start=started)
    except KeyboardInterrupt:
        click.echo(f"Interrupted; finished cells are kept in {folder / 'cells'}.", err=True)
        raise SystemExit(130) from None
    console.print(terminal_table(result.cells))
    console.print(
        f"{result.ran} cells run, {result.skipped} skipped (finished earlier), "
        f"in {result.seconds:.0f} s",
        markup=False,
    )
    for path in result.outputs:
        console.print(f"wrote {path}", markup=False)
    if result.failed:
        total_cells = len(result.cells) + 1
        raise click.ClickException(
            f"{len(result.failed)} of {total_cells} cells failed (the baseline included)"
            if result.baseline.get("error")
            else f"{len(result.failed)} of {len(result.cells)} cells failed"
        )
