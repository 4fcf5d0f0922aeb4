"""Names of every file a ticket-finding run writes, in one place."""

from __future__ import annotations

from pathlib import Path

TICKET_SUFFIX = ".ticket"


def config_file(run_dir: Path) -> Path:
    """The run's configuration, written before any training starts."""
    return run_dir / "config.json"


def log_file(run_dir: Path) -> Path:
    """The per-round JSON log."""
    return run_dir / "log.json"


def rounds_dir(run_dir: Path) -> Path:
    """Where the ticket of every pruning round is kept (round 0 is the dense network)."""
    return run_dir / "rounds"


def round_ticket(run_dir: Path, round_index: int) -> Path:
    """The ticket after `round_index` rounds of pruning."""
    return rounds_dir(run_dir) / f"round-{round_index:02d}{TICKET_SUFFIX}"


def final_ticket(run_dir: Path) -> Path:
    """The ticket of the last round: the run's result."""
    return run_dir / f"final{TICKET_SUFFIX}"


def run_key(run_dir: Path) -> Path:
    """The key of a run folder's output set: its lock `.ticketguard.lock` and commit journal
    `.ticketguard.journal` (see ticketguard.files and docs/outputs.md)."""
    from ticketguard.files import directory_key

    return directory_key(run_dir)


def signed_outputs(out: Path) -> tuple[Path, Path, Path]:
    """The files `sign --out OUT` writes: the signed ticket, its credential, the owner's secret.

    `signed.ticket` gives `signed.ticket`, `signed.cred.json` and `signed.secret.json`.
    """
    stem = out.name[: -len(TICKET_SUFFIX)] if out.name.endswith(TICKET_SUFFIX) else out.name
    ticket = out if out.name.endswith(TICKET_SUFFIX) else out.with_name(stem + TICKET_SUFFIX)
    return ticket, out.with_name(f"{stem}.cred.json"), out.with_name(f"{stem}.secret.json")
