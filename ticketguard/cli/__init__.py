"""The `ticketguard` command line: thin click commands over the library."""

from __future__ import annotations

import click

from ticketguard.cli.attack import attack
from ticketguard.cli.bench import bench
from ticketguard.cli.dispute import dispute
from ticketguard.cli.find import find
from ticketguard.cli.inspect import inspect
from ticketguard.cli.keygen import keygen
from ticketguard.cli.render import render
from ticketguard.cli.serve import serve
from ticketguard.cli.sign import sign, thin
from ticketguard.cli.verify import verify
from ticketguard.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ticketguard")
def cli() -> None:
    """Find lottery tickets and prove who owns them."""


cli.add_command(attack)
cli.add_command(bench)
cli.add_command(dispute)
cli.add_command(find)
cli.add_command(inspect)
cli.add_command(keygen)
cli.add_command(render)
cli.add_command(serve)
cli.add_command(sign)
cli.add_command(thin)
cli.add_command(verify)


def main() -> None:
    """Run the command line."""
    cli(prog_name="ticketguard")
