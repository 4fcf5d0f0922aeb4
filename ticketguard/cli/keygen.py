"""`ticketguard keygen`: make an owner's Ed25519 key pair."""

from __future__ import annotations

import click

from ticketguard.cli._common import library_errors
from ticketguard.errors import ConfigError
from ticketguard.signatures.keys import (
    PASSPHRASE_ENV,
    generate_key,
    passphrase_from,
    validate_owner,
    write_keypair,
)


def _check_owner(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Click callback: refuse an unusable owner id (exit code 2)."""
    try:
        return validate_owner(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command()
@click.option(
    "--owner",
    required=True,
    metavar="ID",
    callback=_check_owner,
    help="Owner id recorded with the key and in every credential (e.g. an e-mail address).",
)
@click.option(
    "--out",
    required=True,
    metavar="NAME",
    help="Writes NAME.key (private, mode 0600) and NAME.pub (public); never overwrites.",
)
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"Encrypt the private key with the passphrase in this file (else ${PASSPHRASE_ENV}; "
    "neither: the key is stored unencrypted).",
)
@library_errors
def keygen(owner: str, out: str, passphrase_file: str | None) -> None:
    """Make an owner's Ed25519 key pair for signing tickets.

    \b
    Example:
      ticketguard keygen --owner alice@example.org --out keys/alice
    """
    passphrase = passphrase_from(passphrase_file)
    key = generate_key(owner)
    key_path, pub_path = write_keypair(key, out, passphrase)
    protection = "encrypted" if passphrase is not None else "unencrypted"
    click.echo(f"wrote {key_path} (private, {protection}; keep it secret)")
    click.echo(f"wrote {pub_path} (public; give it to verifiers)")
    click.echo(f"key id {key.public_key.key_id()} for owner {owner}")
