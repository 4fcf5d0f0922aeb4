"""`ticketguard verify`: read the owner's evidence back from a suspect model and judge it."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ticketguard.cli._common import (
    arch_arg_option,
    check_arch,
    device_option,
    given_options,
    parse_kwargs,
    passphrase_option,
    security_bits_option,
    warn_pending_writes,
)
from ticketguard.errors import TicketGuardError

#: Exit codes: the verdict is part of the interface, so scripts can branch on it.
VERIFIED, NOT_VERIFIED, INPUT_ERROR = 0, 1, 2


def _input_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Every library error in `verify` is a usage or input problem: one line, exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TicketGuardError as exc:
            error = click.ClickException(str(exc))
            error.exit_code = INPUT_ERROR
            raise error from None
        except KeyboardInterrupt:
            # Interrupted is not "not verified" (exit 1): use the shell's code for SIGINT.
            click.echo("Aborted.", err=True)
            raise SystemExit(130) from None
        except (click.ClickException, click.exceptions.Exit, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001
            # An unforeseen failure must never exit 1, which scripts read as "not verified".
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
            error = click.ClickException(
                f"verification failed unexpectedly ({type(exc).__name__}: {first})"
            )
            error.exit_code = INPUT_ERROR
            raise error from None

    return wrapper


def _print_human(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    suspect = report["suspect"]
    console.print(f"suspect       {suspect['path']}  ({suspect['format']})", markup=False)
    cred = report.get("credential")
    if cred:
        state = "valid" if cred["valid"] else "INVALID"
        console.print(
            f"credential    {cred['path']}: {state}, owner {cred.get('owner')}, "
            f"key {cred.get('key_id')}",
            markup=False,
        )
    sources = sorted(set(report["mask_sources"].values()))
    if sources:
        console.print(f"mask          recovered from {', '.join(sources)}", markup=False)
    if report.get("alignment"):
        al = report["alignment"]
        console.print(
            f"alignment     {al['moved_channels']} channels moved onto the reference "
            f"({al['sweeps']} sweeps)",
            markup=False,
        )
    if report.get("blackbox"):
        bb = report["blackbox"]
        console.print(
            f"queried       {bb['suspect']}: {bb['size']} trigger inputs in {bb['requests']} "
            f"request(s) of up to {bb['batch_size']}, {bb['seconds']:.2f} s",
            markup=False,
        )
    for problem in report["problems"]:
        console.print(f"problem       {problem}", markup=False, style="red")
    for note in report["notes"]:
        console.print(f"note          {note}", markup=False)
    table = Table(title="evidence")
    for col in ("evidence", "result", "p-value", "forger's work", "null / check"):
        table.add_column(col)
    for ev in report["evidence"]:
        if ev["kind"] == "cryptographic":
            p = "valid" if ev["valid"] else "invalid"
            work = "cannot be ground"
            null = "Ed25519 signature under the credential's public key"
        else:
            p, work, null = ev["p"] or "not judged", ev["work"] or "-", ev["null"]
        if not ev.get("judged", True):
            p += " (not judged)"
            null += f"; not judged: {ev['not_judged_reason']}"
        table.add_row(Text(ev["name"]), Text(ev["summary"]), Text(p), Text(work), Text(null))
    if report["evidence"]:
        console.print(table)
    verdict = report["verdict"]
    console.print(
        verdict["reason"], markup=False, style="bold green" if verdict["verified"] else "bold red"
    )


@click.command()
@click.argument("suspect", required=False)
@click.option(
    "--credential",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The owner's credential (OUT.cred.json from `sign`).",
)
@click.option(
    "--key",
    "key_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The owner's private key: derives the embedding seed (owner verification).",
)
@passphrase_option
@click.option(
    "--reveal",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The revealed secret file (OUT.secret.json): verification by a third party.",
)
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Require the credential to be signed by this public key (OWNER.pub).",
)
@click.option(
    "--reference",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The owner's ticket: align channels to it and score topology (W1).",
)
@click.option(
    "--null-ticket",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="An independently found ticket for the W1 null (repeatable; 2 or more).",
)
@click.option(
    "--null-samples",
    default=50,
    show_default=True,
    type=click.IntRange(2),
    help="Random masks in the W1 null distribution.",
)
@click.option("--no-align", is_flag=True, help="Read by position only, without channel alignment.")
@click.option(
    "--alpha",
    default=1e-6,
    show_default=True,
    type=float,
    help="Significance level before the Bonferroni correction; applies only with "
    "--security-bits 0, to a claim proven to predate the suspect.",
)
@security_bits_option
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the W1 null.")
@click.option(
    "--blackbox",
    is_flag=True,
    help="Also query the suspect model file with the credential's trigger set (B1).",
)
@click.option(
    "--endpoint",
    default=None,
    metavar="URL",
    help="Query a prediction server instead of a file (black-box only; see `ticketguard serve`).",
)
@click.option(
    "--send",
    type=click.Choice(["tensor", "png"]),
    default="tensor",
    show_default=True,
    help="What --endpoint is sent: model-ready numbers, or PNG images it normalises itself.",
)
@click.option(
    "--batch-size",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="Trigger inputs per query.",
)
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds to wait for each answer of --endpoint.",
)
@click.option(
    "--retries",
    default=3,
    show_default=True,
    type=click.IntRange(0),
    help="Retries (with exponential backoff) when --endpoint fails or is busy.",
)
@click.option(
    "--arch",
    default=None,
    callback=check_arch,
    help="Architecture of a --blackbox model file that records none "
    "(default: the one the credential names).",
)
@arch_arg_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_input_errors
def verify(
    suspect: str,
    credential: str | None,
    key_path: str | None,
    passphrase_file: str | None,
    reveal: str | None,
    public_key: str | None,
    reference: str | None,
    null_ticket: tuple[str, ...],
    null_samples: int,
    no_align: bool,
    alpha: float,
    security_bits: int,
    seed: int,
    blackbox: bool,
    endpoint: str | None,
    send: str,
    batch_size: int,
    timeout: float,
    retries: int,
    arch: str | None,
    arch_arg: tuple[str, ...],
    device: str,
    as_json: bool,
) -> None:
    """Verify who owns SUSPECT: any model file ticketguard reads (none of it runs).

    With a credential and the owner's key (or a revealed seed), the embedded W2 bits are read
    and judged (binomial p-value) and decoded (Ed25519 check). With a reference ticket, channels
    are aligned to it first and the W1 topology overlap is judged against random masks pushed
    through the same alignment; W1 can decide only against --null-ticket tickets.

    Black-box (B1): the credential's trigger set is sent to the suspect and the hits are judged
    against the largest label frequency of the set. The suspect is queried when it is an
    --endpoint URL, a Python callable given as SUSPECT = package.module:function, or a model
    file with --blackbox (then white-box and black-box evidence are judged together). An
    imported trigger set is reported but never decides.

    A claimant can retry (new keys, seeds, texts, trigger sets) until a claim matches by chance,
    so a p-value decides only at p <= 2^-128/m (--security-bits); a valid signature decides on
    its own. Each p-value is shown with the tries a forger needs to reach it.
    Exit code: 0 verified, 1 not verified, 2 usage or input error (an endpoint that is down,
    too slow or answers garbage included).

    \b
    Examples:
      ticketguard verify stolen.pth --credential signed.cred.json --key alice.key
      ticketguard verify stolen.pth --credential signed.cred.json --reveal signed.secret.json \\
          --public-key alice.pub --reference signed.ticket
      ticketguard verify suspect.pth --reference extreme.ticket
      ticketguard verify --endpoint http://127.0.0.1:8000/predict \\
          --credential signed.cred.json --key alice.key
    """
    from ticketguard.api import QueryConfig, is_callable_spec
    from ticketguard.api import verify as verify_file
    from ticketguard.errors import ConfigError
    from ticketguard.signatures.keys import passphrase_from
    from ticketguard.verify.verification import VerifyConfig

    if endpoint is not None and suspect is not None:
        raise click.UsageError("give either SUSPECT or --endpoint, not both")
    if endpoint is None and suspect is None:
        raise click.UsageError(
            "give SUSPECT (a model file or package.module:function) or --endpoint"
        )
    queried_only = endpoint is not None or (suspect is not None and is_callable_spec(suspect))
    if suspect is not None and not queried_only:
        path = Path(suspect)
        if not path.exists():
            raise click.BadParameter(f"File {suspect!r} does not exist.", param_hint="SUSPECT")
        if path.is_dir():
            raise click.BadParameter(f"{suspect} is a directory", param_hint="SUSPECT")
    if (queried_only or blackbox) and credential is None:
        raise click.UsageError("black-box verification needs --credential (with --key or --reveal)")
    if endpoint is None:
        stray = given_options(click.get_current_context(), "send", "timeout", "retries")
        if stray:
            raise click.UsageError(f"{stray[0]} belongs to --endpoint")
    if queried_only and (reference or null_ticket):
        raise click.UsageError("--reference compares weights; a queried suspect has none to read")
    if credential is None and reference is None:
        raise click.UsageError("give --credential (with --key or --reveal), --reference, or both")
    if credential is not None and key_path is None and reveal is None:
        raise click.UsageError("--credential needs --key (the owner) or --reveal (a judge)")
    if (key_path or reveal) and credential is None:
        raise click.UsageError("--key and --reveal verify a credential: give --credential too")
    if null_ticket and reference is None:
        raise click.UsageError("--null-ticket needs --reference")
    if len(null_ticket) == 1:
        raise click.UsageError("--null-ticket needs at least 2 independently found tickets")
    try:
        config = VerifyConfig(
            alpha=alpha,
            null_samples=null_samples,
            seed=seed,
            align=not no_align,
            batch_size=batch_size,
            security_bits=security_bits,
        )
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--alpha") from None
    passphrase = passphrase_from(passphrase_file) if key_path else None
    warn_pending_writes(suspect, credential, reveal, reference)
    report = verify_file(
        suspect,
        credential=credential,
        key=key_path,
        passphrase=passphrase,
        reveal=reveal,
        reference=reference,
        public_key=public_key,
        null_tickets=null_ticket,
        config=config,
        blackbox=blackbox,
        endpoint=endpoint,
        query=QueryConfig(
            send=send,
            timeout=timeout,
            retries=retries,
            device=device,
            arch=arch,
            arch_kwargs=parse_kwargs(arch_arg, "--arch-arg") if arch_arg else None,
        ),
    )
    data = report.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        _print_human(data)
    raise SystemExit(VERIFIED if report.verified else NOT_VERIFIED)
