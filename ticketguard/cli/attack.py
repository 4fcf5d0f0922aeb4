"""`ticketguard attack NAME MODEL --out FILE`: run one removal or ambiguity attack on a model.

The subcommands are made from the attack registry, one per attack, with one option per attack
parameter, so the command line always matches the library.
"""

from __future__ import annotations

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
)


def _option(param: Any) -> click.Option:
    flag = "--" + param.name.replace("_", "-")
    help_text = param.help
    if param.kind is bool:
        no_flag = "--no-" + param.name.replace("_", "-")
        return click.Option(
            [f"{flag}/{no_flag}", param.name],
            default=None,
            help=f"{help_text} [default: {'on' if param.default else 'off'}]",
        )
    metavar = {int: "INT", float: "NUMBER", str: "TEXT"}[param.kind]
    if param.choices:
        metavar = "|".join(param.choices)
    if param.is_path:
        metavar = "FILE"
    shown = param.default if param.default != "" else "none"
    return click.Option(
        [flag, param.name],
        default=None,
        type=str,
        metavar=metavar,
        help=f"{help_text} [default: {shown}]",
    )


def _command(name: str) -> click.Command:
    from ticketguard.attacks.base import get_attack
    from ticketguard.attacks.outputs import MEASUREMENTS

    attack = get_attack(name)
    makes = (
        "OUT (the attacker's signed ticket), OUT.cred.json and OUT.secret.json"
        if attack.makes_claim
        else "a JSON report"
        if attack.name in MEASUREMENTS
        else "the attacked model as a ticket file"
    )
    if attack.name == "grind":
        makes += " (and a claim that verifies: STEM.claim.ticket, .cred.json, .secret.json)"

    @library_errors
    def run(
        model: str,
        out: str,
        seed: int,
        device: str,
        data_dir: str | None,
        download: bool,
        dataset: str | None,
        arch: str | None,
        arch_arg: tuple[str, ...],
        force: bool,
        **given: Any,
    ) -> None:
        from ticketguard.attacks.base import AttackContext
        from ticketguard.attacks.outputs import attack_file, describe
        from ticketguard.tickets.training import resolve_device

        params = {k: v for k, v in given.items() if v is not None}
        context = AttackContext(
            device=resolve_device(device), data_dir=data_dir, download=download, dataset=dataset
        )
        notes: list[str] = []
        done = attack_file(
            name,
            model,
            out,
            params,
            seed=seed,
            context=context,
            arch=arch,
            arch_kwargs=parse_kwargs(arch_arg, "--arch-arg") if arch_arg else None,
            force=force,
            notes=notes,
        )
        for line in notes:
            click.echo(f"note: {line}", err=True)
        for line in describe(done):
            click.echo(line)

    params: list[click.Parameter] = [
        click.Argument(["model"], type=click.Path(dir_okay=False), metavar="MODEL"),
        click.Option(
            ["--out"],
            required=True,
            type=click.Path(dir_okay=False),
            metavar="FILE",
            help=f"Where to write {makes}.",
        ),
        click.Option(
            ["--seed"],
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="The attack's only source of randomness.",
        ),
    ]
    params += [_option(p) for p in attack.params]
    params += [
        device_option(click.Command("x")).params[0],
        data_dir_option(click.Command("x")).params[0],
        download_option(click.Command("x")).params[0],
        click.Option(
            ["--dataset"],
            default=None,
            callback=check_dataset,
            help="The attacker's dataset, if not the one the model records.",
        ),
        click.Option(
            ["--arch"],
            default=None,
            callback=check_arch,
            help="Architecture of a model file that records none.",
        ),
        arch_arg_option(click.Command("x")).params[0],
        click.Option(["--force"], is_flag=True, help="Replace existing output files."),
    ]
    data_note = " It trains, so it needs the model's dataset." if attack.needs_data else ""
    return click.Command(
        name,
        callback=run,
        params=params,
        help=f"{attack.summary}{data_note}\n\nWrites {makes}.",
        short_help=attack.summary,
    )


class AttackGroup(click.Group):
    """A group whose subcommands are the registered attacks, built when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from ticketguard.attacks.base import attack_names

        return attack_names()

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        from ticketguard.attacks.base import attack_names

        if cmd_name not in attack_names():
            return None
        return _command(cmd_name)


@click.group(cls=AttackGroup)
def attack() -> None:
    """Run one removal or ambiguity attack on a model (NAME MODEL --out FILE).

    Removal attacks (fine-tuning, pruning, regrowth, noise, quantisation, weight shifting,
    channel permutation, distillation) write the attacked model; ambiguity attacks write the
    attacker's claim (forge, fake-triggers), or measure how many random keys "verify"
    (key-search) and how much work a claim that verifies by chance costs (grind). Every attack
    is deterministic given --seed. `ticketguard attack NAME --help` lists an attack's parameters.

    \b
    Examples:
      ticketguard attack prune signed.ticket --rate 0.5 --out pruned.ticket
      ticketguard attack finetune signed.ticket --mode dense --epochs 5 --out tuned.ticket
      ticketguard attack forge signed.ticket --owner mallory@example.org --out forged.ticket
      ticketguard attack grind signed.ticket --security-bits 0 --tries 20000000 --out grind.json
    """
