"""`ticketguard sign` and `ticketguard thin`: write ownership evidence into a ticket."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click

from ticketguard.cli._common import (
    check_dataset,
    data_dir_option,
    device_option,
    download_option,
    given_options,
    library_errors,
    passphrase_option,
    percent,
)
from ticketguard.errors import ConfigError


def _passphrase(passphrase_file: str | None) -> bytes | None:
    from ticketguard.signatures.keys import passphrase_from

    return passphrase_from(passphrase_file)


def _retrain_config(epochs: int, lr: float, start: str, dataset: str | None, seed: int):
    from ticketguard.tickets.retrain import RetrainConfig

    try:
        return RetrainConfig(epochs=epochs, lr=lr, start=start, dataset=dataset, seed=seed)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@contextlib.contextmanager
def _outputs_held(key: Path, members: list[Path]) -> Iterator[None]:
    """Hold the lock of an output set for a command's whole run; finish an interrupted write."""
    from ticketguard.files import hold_outputs

    notes: list[str] = []
    with hold_outputs(key, members, label=str(key), notes=notes):
        for line in notes:
            click.echo(f"note: {line}", err=True)
        yield


dataset_option = click.option(
    "--dataset",
    default=None,
    callback=check_dataset,
    help="Data to retrain and measure on (default: the dataset the ticket records).",
)
force_option = click.option("--force", is_flag=True, help="Replace existing output files.")


@click.command()
@click.argument("ticket", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The owner's private key (from `ticketguard keygen`).",
)
@passphrase_option
@click.option(
    "--out",
    required=True,
    metavar="OUT.ticket",
    help="Signed ticket; OUT.cred.json and OUT.secret.json are written beside it.",
)
@click.option(
    "--layers",
    multiple=True,
    metavar="PATTERN",
    help="Layers that carry bits (default: every pruned layer but the first conv and "
    "the classifier). Repeatable; names or globs.",
)
@click.option(
    "--scheme",
    type=click.Choice(["w2", "qr"], case_sensitive=False),
    default="w2",
    show_default=True,
    help="w2: the owner's signature in keyed positions of many layers; qr: a QR code of "
    "--qr-text in a keyed window of one layer (W3, readable by eye and by a phone).",
)
@click.option("--qr-text", default=None, metavar="TEXT", help="Text of the QR code (--scheme qr).")
@click.option(
    "--layer",
    "qr_layer",
    default=None,
    metavar="NAME",
    help="The layer that holds the QR code (--scheme qr; default: the one with the most room).",
)
@click.option(
    "--ecc-symbols",
    default=64,
    show_default=True,
    type=click.IntRange(2, 190),
    help="Reed-Solomon parity bytes added to the 64-byte payload.",
)
@click.option(
    "--repetition",
    default=None,
    type=click.IntRange(2, 16),
    help="Mask positions per codeword bit, an even number (default: as many as the ticket's "
    "size allows; each bit connects half of its positions).",
)
@click.option(
    "--carrier-strength",
    default=0.9,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Written connections keep at least this quantile of their layer's surviving "
    "magnitudes, so magnitude pruning does not take them first (0: no floor).",
)
@click.option(
    "--recover-epochs",
    default=3,
    show_default=True,
    type=click.IntRange(0),
    help="Epochs of recovery training with the signed mask fixed.",
)
@click.option(
    "--recover-lr",
    default=0.01,
    show_default=True,
    type=float,
    help="Learning rate of the recovery training (without --trigger).",
)
@click.option(
    "--recover-from",
    type=click.Choice(["trained", "rewind"]),
    default="trained",
    show_default=True,
    help="Fine-tune the trained weights, or retrain from the rewind point.",
)
@click.option(
    "--random-seed",
    is_flag=True,
    help="Draw the embedding seed at random instead of deriving it from the key "
    "(then the secret file is the only way to verify).",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the recovery training."
)
@click.option(
    "--trigger",
    "trigger",
    default=None,
    metavar="generate|DIR",
    help="Also teach the ticket a trigger set (black-box evidence): 'generate' draws abstract "
    "images from the embedding seed; DIR imports a folder (pics/ and a labels .txt file).",
)
@click.option(
    "--trigger-size",
    default=100,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Images in a generated trigger set.",
)
@click.option(
    "--trigger-order",
    type=click.Choice(["lexicographic", "numeric"]),
    default="lexicographic",
    show_default=True,
    help="How a folder's file names are matched to its label lines.",
)
@click.option(
    "--trigger-labels",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The folder's labels file, when it holds more than one .txt file.",
)
@click.option(
    "--trigger-per-batch",
    default=16,
    show_default=True,
    type=click.IntRange(1),
    help="Trigger samples mixed into every training batch.",
)
@click.option(
    "--trigger-epochs",
    default=30,
    show_default=True,
    type=click.IntRange(1),
    help="Most epochs of trigger training.",
)
@click.option(
    "--trigger-lr",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Learning rate at the start of each cosine cycle of trigger training.",
)
@click.option(
    "--trigger-target",
    default=0.95,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Trigger accuracy at which training stops.",
)
@dataset_option
@data_dir_option
@download_option
@device_option
@force_option
@library_errors
def sign(
    ticket: str,
    key_path: str,
    passphrase_file: str | None,
    out: str,
    layers: tuple[str, ...],
    scheme: str,
    qr_text: str | None,
    qr_layer: str | None,
    ecc_symbols: int,
    repetition: int | None,
    carrier_strength: float,
    recover_epochs: int,
    recover_lr: float,
    recover_from: str,
    random_seed: bool,
    seed: int,
    trigger: str | None,
    trigger_size: int,
    trigger_order: str,
    trigger_labels: str | None,
    trigger_per_batch: int,
    trigger_epochs: int,
    trigger_lr: float,
    trigger_target: float,
    dataset: str | None,
    data_dir: str | None,
    download: bool,
    device: str,
    force: bool,
) -> None:
    """Sign TICKET: embed a W2 signature or a W3 QR code; issue its credential.

    Writes the signed ticket, its credential OUT.cred.json (public: give it with the model) and
    OUT.secret.json (mode 0600: the embedding seed and any trigger set, for the owner and,
    later, a judge). Per-layer weight counts are unchanged; accuracy is printed before and
    after. With --trigger the ticket also learns a trigger set (mask fixed) until its trigger
    accuracy reaches --trigger-target with clean accuracy within a point; the credential
    commits to the set.

    \b
    Examples:
      ticketguard sign runs/digits/final.ticket --key keys/alice.key --out signed.ticket
      ticketguard sign runs/digits/final.ticket --key keys/alice.key --out signed.ticket \\
          --trigger generate
      ticketguard sign runs/digits/final.ticket --key keys/alice.key --out qr.ticket \\
          --scheme qr --qr-text "alice@example.org 2026"
    """
    from ticketguard.api import sign as sign_file
    from ticketguard.signatures.signing import SignConfig, TriggerConfig, output_paths
    from ticketguard.signatures.w3 import W3Params

    triggers = None
    if trigger is not None:
        if trigger != "generate" and not Path(trigger).is_dir():
            raise click.BadParameter(
                f"{trigger!r} is neither 'generate' nor a folder", param_hint="--trigger"
            )
        try:
            triggers = TriggerConfig(
                source=trigger,
                size=trigger_size,
                order=trigger_order,
                labels_file=trigger_labels,
                per_batch=trigger_per_batch,
                target=trigger_target,
                max_epochs=trigger_epochs,
                lr=trigger_lr,
            )
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
    else:
        stray = given_options(
            click.get_current_context(),
            "trigger_size",
            "trigger_order",
            "trigger_labels",
            "trigger_per_batch",
            "trigger_epochs",
            "trigger_lr",
            "trigger_target",
        )
        if stray:
            raise click.UsageError(f"{stray[0]} belongs to --trigger generate|DIR")
    if scheme.lower() == "qr":
        stray = given_options(click.get_current_context(), "ecc_symbols", "repetition")
        if stray:
            raise click.UsageError(f"{stray[0]} belongs to the W2 scheme, not --scheme qr")
    try:
        config = SignConfig(
            layers=tuple(layers) or None,
            ecc_symbols=ecc_symbols,
            retrain=_retrain_config(recover_epochs, recover_lr, recover_from, dataset, seed),
            random_seed=random_seed,
            triggers=triggers,
            scheme="W3" if scheme.lower() == "qr" else "W2",
            qr_text=qr_text,
            qr_layer=qr_layer,
            repetition=repetition,
            carrier_quantile=carrier_strength,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    ticket_path, cred_path, secret_path = output_paths(out)
    # The outputs' lock is held for the whole run: a second run on the same --out refuses at
    # once, and the existence check below it sees a finished set (docs/outputs.md).
    with _outputs_held(ticket_path, [ticket_path, cred_path, secret_path]):
        result = sign_file(
            ticket,
            key_path,
            out,
            passphrase=_passphrase(passphrase_file),
            config=config,
            device=device,
            data_dir=data_dir,
            download=download,
            force=force,
        )
    params = result.params
    if isinstance(params, W3Params):
        size = params.size
        click.echo(
            f"wrote a version-{params.symbol.version} QR code ({size}x{size}, level H) of "
            f"{params.symbol.text!r} into {params.layer.name} at rows {params.row}-"
            f"{params.row + size - 1}, columns {params.col}-{params.col + size - 1}; "
            f"{result.changed_connections} mask entries changed, weight counts unchanged"
        )
    else:
        layer_text = ", ".join(f"{layer.name} {layer.bits}" for layer in params.layers)
        click.echo(
            f"embedded {params.num_bits} bits x {params.repetition} positions ({layer_text}); "
            f"{result.changed_connections} mask entries changed, weight counts unchanged"
        )
    click.echo(
        f"accuracy on {result.dataset}: {percent(result.accuracy_before)} before signing, "
        f"{percent(result.accuracy_after)} after"
    )
    if result.triggers is not None:
        source = "generated" if triggers and triggers.generated else f"from {trigger}"
        click.echo(
            f"trigger set: {result.triggers.size} images ({source}), trigger accuracy "
            f"{percent(result.trigger_accuracy)} after {result.trigger_kept_epoch} epoch(s)"
        )
        if not result.trigger_reached:
            click.echo(
                f"warning: the stopping rule was not met within {result.trigger_epochs} epochs "
                f"(trigger accuracy >= {percent(trigger_target)} with validation accuracy "
                f"within 1 point); kept the weights after epoch {result.trigger_kept_epoch}, "
                "the best cycle; raise --trigger-epochs or --trigger-lr",
                err=True,
            )
    click.echo(f"wrote {ticket_path}")
    click.echo(f"wrote {cred_path} (credential: publish it with the model)")
    click.echo(f"wrote {secret_path} (secret seed: keep it; reveal it only to a judge)")


@click.command()
@click.argument("ticket", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--paths",
    "paths",
    required=True,
    type=click.IntRange(1),
    help="Number of magnitude-weighted input-to-output paths to remove.",
)
@click.option(
    "--out", required=True, metavar="OUT.ticket", help="Where to write the thinned ticket."
)
@click.option(
    "--epochs",
    default=None,
    type=click.IntRange(0),
    help="Retraining epochs (default: the ticket's recorded schedule).",
)
@click.option(
    "--lr", default=None, type=float, help="Retraining learning rate (default: recorded)."
)
@click.option(
    "--start",
    type=click.Choice(["rewind", "trained"]),
    default="rewind",
    show_default=True,
    help="Retrain from the rewind point, or fine-tune.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the walks and training."
)
@dataset_option
@data_dir_option
@download_option
@device_option
@force_option
@library_errors
def thin(
    ticket: str,
    paths: int,
    out: str,
    epochs: int | None,
    lr: float | None,
    start: str,
    seed: int,
    dataset: str | None,
    data_dir: str | None,
    download: bool,
    device: str,
    force: bool,
) -> None:
    """Make an extreme ticket: remove magnitude-weighted paths, then retrain.

    \b
    Example:
      ticketguard thin runs/digits/final.ticket --paths 200 --out extreme.ticket
    """
    from ticketguard.api import default_thin_config
    from ticketguard.api import thin as thin_file
    from ticketguard.tickets.ticket import load_ticket

    base = default_thin_config(load_ticket(ticket))
    config = _retrain_config(
        base.epochs if epochs is None else epochs,
        base.lr if lr is None else lr,
        start,
        dataset,
        seed,
    )
    with _outputs_held(Path(out), [Path(out)]):
        result = thin_file(
            ticket,
            paths,
            out,
            config=config,
            seed=seed,
            device=device,
            data_dir=data_dir,
            download=download,
            force=force,
        )
    mask = result.ticket.mask
    click.echo(
        f"removed {result.walks} paths: {result.removed_kernels} connections, "
        f"{result.removed_weights} weights; sparsity now {100 * mask.sparsity:.2f}%"
    )
    click.echo(
        f"accuracy: {percent(result.accuracy_before)} before, "
        f"{percent(result.accuracy_after)} after retraining"
    )
    click.echo(f"wrote {out}")
