"""`ticketguard dispute`: cross-verify several ownership claims and decide which came first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ticketguard.cli._common import device_option, security_bits_option, warn_pending_writes
from ticketguard.cli.verify import INPUT_ERROR, _input_errors

#: Exit codes: decided, undecided, bad input.
DECIDED, UNDECIDED = 0, 1


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    for c in result["claims"]:
        state = "valid" if c["valid"] else "INVALID"
        triggers = f", trigger set {c['trigger_source']}" if c["trigger_source"] else ""
        console.print(
            f"{c['label']}: {c['owner']} (key {c['key_id']}, credential {state}{triggers}, "
            f"created {c['created']}: self-asserted), model {c['model']}",
            markup=False,
        )
    table = Table(title="each claim's evidence read from each claimed model")
    table.add_column("claim \\ model")
    for c in result["claims"]:
        table.add_column(f"{c['label']}'s model")
    for c, row in zip(result["claims"], result["matrix"], strict=True):
        cells = []
        for cell in row:
            if cell["verified"]:
                shown = [
                    f"{e['name']} p={e['p']}" if e["p"] is not None else f"{e['name']} valid"
                    for e in cell["evidence"]
                    if e["name"] in cell["decisive"]
                ]
                text = "verified: " + ", ".join(shown)
                if not cell["precedence"]:
                    text += " (not counted for precedence)"
            else:
                text = "not verified"
                judged = [e for e in cell["evidence"] if e["judged"] and e["p"] is not None]
                if judged:
                    best = min(judged, key=lambda e: e["log10_p"])
                    text += f" (best {best['name']} p={best['p']}: {best['work']})"
            cells.append(Text(text))
        table.add_row(Text(f"{c['label']} ({c['owner']})"), *cells)
    console.print(table)
    bits = result["security_bits"]
    rule = f"p <= 2^-{bits}/m" if bits else f"p < alpha/m (alpha = {result['alpha']:g})"
    console.print(
        f"statistical evidence counts at {rule}; a valid signature counts on its own", markup=False
    )
    for line in result["reasoning"]:
        console.print(f"- {line}", markup=False)
    for note in result["notes"]:
        console.print(f"note: {note}", markup=False)
    style = "bold red" if result["winner"] is None else "bold green"
    console.print(f"Decision: {result['decision']}", markup=False, style=style)


@click.command()
@click.option(
    "--claim",
    "claims",
    nargs=3,
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    metavar="CRED SECRET MODEL",
    help="One party's credential, revealed secret and released model (give two or more).",
)
@click.option(
    "--no-blackbox", is_flag=True, help="Do not query the models with the claims' trigger sets."
)
@click.option(
    "--alpha",
    type=float,
    default=1e-6,
    show_default=True,
    help="Significance level of each verification (Bonferroni over its evidence); applies "
    "only with --security-bits 0, to claims proven to predate the models.",
)
@security_bits_option
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the matrix and the decision as JSON to this file.",
)
@device_option
@_input_errors
def dispute(
    claims: tuple[tuple[str, str, str], ...],
    no_blackbox: bool,
    alpha: float,
    security_bits: int,
    json_out: str | None,
    device: str,
) -> None:
    """Decide which of several ownership claims came first.

    Every claim (a credential, its revealed secret and the model its party released) is
    verified against every claimed model. A stolen copy carries its original's mark as well as
    the thief's, the original only its owner's: the claim whose mark is in every other claimed
    model, while no other mark is in its own, came first. Only marks that cannot be made after
    the fact decide (W2, W3 and generated trigger sets); an imported trigger set is shown but
    does not count, and credentials' creation times are self-asserted and ignored. A party can
    retry keys and seeds until its mark matches a model by chance, so a p-value counts only at
    p <= 2^-128/m (--security-bits).

    Exit code 0 when one claim is shown to be the original, 1 when the models do not decide,
    2 for bad input.

    \b
    Example:
      ticketguard dispute --claim alice.cred.json alice.secret.json alice.ticket \\
                          --claim mallory.cred.json mallory.secret.json mallory.ticket
    """
    from ticketguard.files import write_json_atomic
    from ticketguard.tickets.training import resolve_device
    from ticketguard.verify.dispute import Claim
    from ticketguard.verify.dispute import dispute as run_dispute
    from ticketguard.verify.verification import VerifyConfig

    if len(claims) < 2:
        error = click.UsageError("give at least two --claim CRED SECRET MODEL")
        error.exit_code = INPUT_ERROR
        raise error
    warn_pending_writes(*(path for claim in claims for path in claim))
    if json_out is not None:
        inputs = {Path(p).resolve() for claim in claims for p in claim}
        if Path(json_out).resolve() in inputs:
            raise click.BadParameter("it is one of the claims' files", param_hint="--json")
    result = run_dispute(
        [Claim(Path(c), Path(s), Path(m)) for c, s, m in claims],
        config=VerifyConfig(alpha=alpha, security_bits=security_bits),
        blackbox=not no_blackbox,
        device=resolve_device(device),
    )
    document = result.to_dict()
    _print(document)
    if json_out is not None:
        from ticketguard.verify.stats import _json_safe

        write_json_atomic(json_out, _json_safe(document))
        click.echo(f"wrote {json_out}")
    raise SystemExit(DECIDED if result.winner is not None else UNDECIDED)
