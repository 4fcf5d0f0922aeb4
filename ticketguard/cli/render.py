"""`ticketguard render`: PNG pictures of a layer's connectivity and of a QR-code signature."""

from __future__ import annotations

from pathlib import Path

import click

from ticketguard.cli._common import library_errors, warn_pending_writes


def _echo_written(paths: list[Path], shows: dict[str, str]) -> None:
    from ticketguard.verify.render import png_size

    for path in paths:
        width, height = png_size(path)
        click.echo(f"wrote {path}  {width}x{height} px  {shows[path.name]}")


@click.command()
@click.argument("file", metavar="SUSPECT|TICKET", type=click.Path(dir_okay=False))
@click.option(
    "--credential",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="C.cred.json",
    help="Credential of a QR-code (W3) signature: draw its window in SUSPECT.",
)
@click.option(
    "--reference",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="REF.ticket",
    help="The owner's ticket: align SUSPECT's channels to it first (with --credential).",
)
@click.option(
    "--no-align",
    is_flag=True,
    help="Keep SUSPECT's own channel order even with --reference.",
)
@click.option(
    "--layer",
    default=None,
    metavar="NAME",
    help="Without a credential: the weight whose connectivity to draw (e.g. fc1.weight).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Folder the PNG files are written into (created if missing).",
)
@library_errors
def render(
    file: str,
    credential: str | None,
    reference: str | None,
    no_align: bool,
    layer: str | None,
    out_dir: str,
) -> None:
    """Draw PNG pictures of a layer's connectivity and of a QR-code (W3) signature.

    With --credential: connectivity.png (the signed layer of SUSPECT, one white square per
    connected channel pair, the QR window framed in red), qr.png (the window scaled up with a
    quiet zone, for a phone to read off the screen) and comparison.png (the expected QR code,
    the suspect's window and their difference: agreeing modules dimmed, differing ones red).
    It then says whether the window reads as a QR code, and as what text. A suspect whose
    channels were shuffled needs --reference (the owner's ticket) to bring them back in place.

    With --layer instead: connectivity.png of that layer of any ticket or model file.

    \b
    Examples:
      ticketguard render stolen.pth --credential signed.cred.json --out pictures
      ticketguard render stolen.pth --credential signed.cred.json --reference signed.ticket \\
          --out pictures
      ticketguard render runs/digits/final.ticket --layer fc1.weight --out pictures
    """
    from ticketguard.verify.render import (
        COMPARISON_PNG,
        CONNECTIVITY_PNG,
        QR_PNG,
        evidence_pictures,
        layer_picture,
        save_pictures,
    )

    if (credential is None) == (layer is None):
        raise click.UsageError("give either --credential (a QR signature) or --layer NAME")
    if credential is None and (reference is not None or no_align):
        given = "--reference" if reference is not None else "--no-align"
        raise click.UsageError(f"{given} goes with --credential")
    warn_pending_writes(file, credential, reference)

    if layer is not None:
        picture = layer_picture(file, layer)
        paths = save_pictures({CONNECTIVITY_PNG: picture.image}, out_dir, inputs=[file])
        shows = picture.region.describe(picture.layer) + f", mask from {picture.mask_source}"
        _echo_written(paths, {CONNECTIVITY_PNG: shows})
        return

    assert credential is not None
    pictures = evidence_pictures(file, credential, reference_path=reference, align=not no_align)
    inputs = [p for p in (file, credential, reference) if p is not None]
    paths = save_pictures(pictures.images, out_dir, inputs=inputs)
    size = pictures.window.shape[0]
    row, col, _ = pictures.window_at
    _echo_written(
        paths,
        {
            CONNECTIVITY_PNG: pictures.region.describe(pictures.layer)
            + f", window framed at ({row}, {col}), mask from {pictures.mask_source}",
            QR_PNG: f"the {size}x{size} window, scaled up with a quiet zone",
            COMPARISON_PNG: "expected QR | suspect's window | difference (red = differs)",
        },
    )
    for note in pictures.notes:
        click.echo(f"note: {note}")
    click.echo(
        f"data modules differing from the QR code: {pictures.mismatches} of "
        f"{pictures.num_data_modules}"
    )
    decoded = pictures.decoded()
    if decoded is None:
        click.echo("QR window: does not decode")
    else:
        verdict = "the credential's text" if decoded == pictures.text else "NOT the credential's"
        click.echo(f"QR window: decodes to {decoded!r} ({verdict})")
