"""`ticketguard render`: pictures of a layer's connectivity and of a W3 QR window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zxingcpp
from cli_helpers import error_line, invoke
from PIL import Image

from ticketguard.errors import ArchitectureError, ConfigError, CredentialError, EmbeddingError
from ticketguard.signatures.keys import generate_key
from ticketguard.signatures.signing import SignConfig, sign_without_data, write_signed
from ticketguard.signatures.topology import channel_connectivity, ticket_structure
from ticketguard.signatures.w3 import W3Params, make_symbol
from ticketguard.tickets.ticket import load_ticket
from ticketguard.verify.render import (
    AGREE_DARK,
    AGREE_LIGHT,
    COMPARISON_PNG,
    CONNECTIVITY_PNG,
    MAX_PIXELS,
    QR_PNG,
    RED,
    WHITE,
    comparison_image,
    connectivity_image,
    outline_width,
    qr_image,
    render_evidence,
    render_layer,
    view_region,
)

TEXT = "render test"
LAYER = "fc1.weight"  # (128, 256) in a width-32 DigitsCNN
OUTPUTS = [CONNECTIVITY_PNG, QR_PNG, COMPARISON_PNG]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _decodes(path: Path) -> str | None:
    """Read a PNG the way a phone would: a real QR reader on the picture's pixels."""
    with Image.open(path) as image:
        results = zxingcpp.read_barcodes(np.asarray(image))
    return results[0].text if results else None


def _blown_up(conn: np.ndarray, cell: int) -> np.ndarray:
    """The grey level each pixel should have: 255 for a connected entry, 0 otherwise."""
    return np.where(conn, 255, 0).repeat(cell, 0).repeat(cell, 1)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def signed(make_ticket, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Alice's ticket signed with a QR code (no training), a W2-signed twin, and stolen copies."""
    root = tmp_path_factory.mktemp("render")
    ticket = make_ticket(width=32, keep=0.3)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    key = generate_key("alice")
    result = sign_without_data(ticket, key, SignConfig(scheme="W3", qr_text=TEXT, qr_layer=LAYER))
    write_signed(result, root / "signed")
    write_signed(sign_without_data(ticket, key, SignConfig()), root / "w2")
    params = result.params
    assert isinstance(params, W3Params)

    signed_ticket = load_ticket(root / "signed.ticket")
    structure = ticket_structure("digits_cnn", 10, (1, 8, 8), {"width": 32})
    perm = structure.random_permutation(np.random.default_rng(3))
    torch.save(structure.permute_state(dict(signed_ticket.trained), perm), root / "stolen.pt")

    # A copy whose window lost two connections the QR code needs (light modules turned dark).
    state = {k: v.clone() for k, v in signed_ticket.trained.items()}
    light = np.argwhere(~params.symbol.dark & ~params.symbol.function)
    flipped = [tuple(int(v) for v in light[0]), tuple(int(v) for v in light[-1])]
    for r, c in flipped:
        state[LAYER][params.row + r, params.col + c] = 0.0
    torch.save(state, root / "damaged.pt")
    return {
        "root": root,
        "ticket": root / "signed.ticket",
        "cred": root / "signed.cred.json",
        "w2_cred": root / "w2.cred.json",
        "stolen": root / "stolen.pt",
        "damaged": root / "damaged.pt",
        "flipped": flipped,
        "params": params,
    }


# --- the pictures, drawn from arrays -------------------------------------------------------------


@pytest.mark.parametrize(("out", "inp", "cell"), [(5, 7, 1), (5, 7, 4), (128, 256, 3), (1, 1, 2)])
def test_connectivity_image_has_the_exact_size_and_colours(out: int, inp: int, cell: int) -> None:
    conn = np.random.default_rng(0).random((out, inp)) < 0.4
    image = connectivity_image(conn, cell=cell)
    assert (image.mode, image.size) == ("RGB", (inp * cell, out * cell))
    pixels = np.asarray(image)
    expected = _blown_up(conn, cell)
    for channel in range(3):
        assert (pixels[:, :, channel] == expected).all()


@pytest.mark.parametrize("cell", [1, 2, 4, 7])
def test_window_is_framed_in_red_outside_it(cell: int) -> None:
    conn = np.random.default_rng(1).random((20, 30)) < 0.5
    row, col, size = 5, 8, 6
    pixels = np.asarray(connectivity_image(conn, window=(row, col, size), cell=cell))
    assert pixels.shape == (20 * cell, 30 * cell, 3)
    t = outline_width(cell)
    red = (pixels == RED).all(axis=2)
    top, left, bottom, right = row * cell, col * cell, (row + size) * cell, (col + size) * cell
    # The frame: t pixels on each side, corners included.
    assert red[top - t : top, left - t : right + t].all()
    assert red[bottom : bottom + t, left - t : right + t].all()
    assert red[top:bottom, left - t : left].all() and red[top:bottom, right : right + t].all()
    assert red.sum() == (size * cell + 2 * t) ** 2 - (size * cell) ** 2
    # Every entry inside the window keeps its own colour.
    inside = pixels[top:bottom, left:right, 0]
    assert (inside == _blown_up(conn[row : row + size, col : col + size], cell)).all()
    if cell >= 2:
        # A neighbour keeps its colour on the side away from the window.
        assert pixels[top - 1, left - cell, 0] == (255 if conn[row - 1, col - 1] else 0)
        assert not red[top - cell, left]


@pytest.mark.parametrize(("row", "col"), [(0, 0), (14, 24)])
def test_window_frame_is_clipped_at_the_edges(row: int, col: int) -> None:
    conn = np.ones((20, 30), dtype=bool)
    cell, size = 4, 6
    pixels = np.asarray(connectivity_image(conn, window=(row, col, size), cell=cell))
    assert pixels.shape == (80, 120, 3)
    red = (pixels == RED).all(axis=2)
    inside = red[row * cell : (row + size) * cell, col * cell : (col + size) * cell]
    assert not inside.any()
    t = outline_width(cell)
    # Only the two sides away from the image edge are drawn.
    assert red.sum() == 2 * size * cell * t + t * t


@pytest.mark.parametrize(("scale", "border"), [(1, 0), (12, 4), (5, 2)])
def test_qr_image_size_and_quiet_zone(scale: int, border: int) -> None:
    symbol = make_symbol(TEXT)
    connected = ~symbol.dark
    image = qr_image(connected, scale=scale, border=border)
    side = (symbol.size + 2 * border) * scale
    assert (image.mode, image.size) == ("L", (side, side))
    pixels = np.asarray(image)
    edge = border * scale
    if border:
        assert (pixels[:edge] == 255).all() and (pixels[:, -edge:] == 255).all()
    body = pixels[edge : side - edge, edge : side - edge]
    assert (body == _blown_up(connected, scale)).all()
    if (scale, border) == (12, 4):
        assert zxingcpp.read_barcodes(pixels)[0].text == TEXT


def test_comparison_image_panels_and_difference() -> None:
    symbol = make_symbol(TEXT)
    reference = ~symbol.dark
    suspect = reference.copy()
    suspect[10, 11] = ~suspect[10, 11]
    suspect[0, 0] = ~suspect[0, 0]
    scale, gap, size = 12, 2, symbol.size
    image = comparison_image(reference, suspect, scale=scale, gap=gap)
    assert image.mode == "RGB"
    assert image.size == (3 * size * scale + 2 * gap * scale, size * scale)
    pixels = np.asarray(image)

    def module(panel: int, r: int, c: int) -> tuple[int, ...]:
        x = panel * (size + gap) * scale + c * scale + scale // 2
        return tuple(int(v) for v in pixels[r * scale + scale // 2, x])

    for r, c in [(10, 11), (0, 0), (5, 20), (14, 14)]:
        assert module(0, r, c) == (WHITE if reference[r, c] else (0, 0, 0))
        assert module(1, r, c) == (WHITE if suspect[r, c] else (0, 0, 0))
    assert module(2, 10, 11) == RED and module(2, 0, 0) == RED
    differs = np.zeros_like(reference)
    differs[10, 11] = differs[0, 0] = True
    for r, c in np.argwhere(~differs)[::37]:
        assert module(2, r, c) == (AGREE_LIGHT if reference[r, c] else AGREE_DARK)
    # The gaps between panels are white.
    gap_cols = pixels[:, size * scale : (size + gap) * scale]
    assert (gap_cols == 255).all()
    assert (pixels == RED).all(axis=2).sum() == 2 * scale * scale


def test_pictures_refuse_bad_arguments() -> None:
    square = np.ones((5, 5), dtype=bool)
    with pytest.raises(ConfigError, match="differ in shape"):
        comparison_image(square, np.ones((6, 6), dtype=bool))
    with pytest.raises(ConfigError, match="square"):
        qr_image(np.ones((5, 6), dtype=bool))
    with pytest.raises(ConfigError, match="cell size"):
        connectivity_image(square, cell=0)
    with pytest.raises(ConfigError, match="2-D"):
        connectivity_image(np.ones(5, dtype=bool))


@pytest.mark.parametrize(
    ("shape", "window"),
    [
        ((128, 256), (15, 85, 25)),
        ((3000, 3000), (100, 2000, 29)),
        ((20000, 9000), (19900, 0, 29)),
        ((4, 10**8), (0, 5 * 10**7, 1)),
    ],
)
def test_view_region_fits_the_pixel_budget_and_keeps_the_window(shape, window) -> None:
    region = view_region(shape, window)
    rows, cols = region.row1 - region.row0, region.col1 - region.col0
    assert rows * cols * region.cell**2 <= MAX_PIXELS
    assert 0 <= region.row0 <= window[0] and window[0] + window[2] <= region.row1 <= shape[0]
    assert 0 <= region.col0 <= window[1] and window[1] + window[2] <= region.col1 <= shape[1]
    assert region.cropped == (shape[0] * shape[1] > MAX_PIXELS)
    if shape == (128, 256):
        assert (region.cell, rows, cols) == (4, 128, 256)


# --- the evidence of a signed ticket -------------------------------------------------------------


def test_signed_ticket_renders_exact_pictures_that_decode(signed: dict, tmp_path: Path) -> None:
    params = signed["params"]
    out = tmp_path / "new" / "pics"
    paths = render_evidence(signed["ticket"], signed["cred"], out)
    assert paths == [out / name for name in OUTPUTS]
    assert _listing(out) == sorted(OUTPUTS)  # no temporary file left behind
    size = params.size
    sizes = {p.name: Image.open(p).size for p in paths}
    assert sizes == {
        CONNECTIVITY_PNG: (256 * 4, 128 * 4),
        QR_PNG: ((size + 8) * 12, (size + 8) * 12),
        COMPARISON_PNG: (3 * size * 12 + 2 * 2 * 12, size * 12),
    }
    assert _decodes(out / QR_PNG) == TEXT

    conn = _pixels(out / CONNECTIVITY_PNG)
    mask = load_ticket(signed["ticket"]).mask[LAYER]
    connected = channel_connectivity(mask).numpy()
    r, c = np.argwhere(connected)[0]
    assert tuple(conn[r * 4 + 2, c * 4 + 2]) == WHITE
    r, c = np.argwhere(~connected)[0]
    assert tuple(conn[r * 4 + 2, c * 4 + 2]) == (0, 0, 0)
    # The frame runs just outside the window: above it, or below it when the window starts at
    # row 0 (the key is random, so the window may touch either edge).
    frame_row = params.row * 4 - 1 if params.row > 0 else (params.row + size) * 4
    assert tuple(conn[frame_row, params.col * 4 + 5]) == RED
    # The window shows the QR code itself: light modules connected.
    inside = conn[params.row * 4 + 2 :: 4, params.col * 4 + 2 :: 4][:size, :size, 0] == 255
    assert (inside == ~params.symbol.dark).all()

    comparison = _pixels(out / COMPARISON_PNG)
    assert not (comparison == RED).all(axis=2).any()


def test_differing_modules_are_red_in_the_difference_panel(signed: dict, tmp_path: Path) -> None:
    size = signed["params"].size
    render_evidence(signed["damaged"], signed["cred"], tmp_path)
    pixels = _pixels(tmp_path / COMPARISON_PNG)
    red = (pixels == RED).all(axis=2)
    x0 = 2 * (size + 2) * 12
    for r, c in signed["flipped"]:
        assert red[r * 12 : (r + 1) * 12, x0 + c * 12 : x0 + (c + 1) * 12].all()
        # The suspect's panel shows the module dark.
        assert tuple(pixels[r * 12 + 6, (size + 2) * 12 + c * 12 + 6]) == (0, 0, 0)
    assert red.sum() == len(signed["flipped"]) * 144
    assert _decodes(tmp_path / QR_PNG) == TEXT  # level H shrugs off two modules


def test_channel_permuted_copy_decodes_only_when_aligned(signed: dict, tmp_path: Path) -> None:
    plain, aligned, unaligned = tmp_path / "plain", tmp_path / "aligned", tmp_path / "unaligned"
    render_evidence(signed["stolen"], signed["cred"], plain)
    assert _decodes(plain / QR_PNG) is None
    assert (_pixels(plain / COMPARISON_PNG) == RED).all(axis=2).any()
    render_evidence(signed["stolen"], signed["cred"], aligned, reference_path=signed["ticket"])
    assert _decodes(aligned / QR_PNG) == TEXT
    assert not (_pixels(aligned / COMPARISON_PNG) == RED).all(axis=2).any()
    render_evidence(
        signed["stolen"], signed["cred"], unaligned, reference_path=signed["ticket"], align=False
    )
    assert _decodes(unaligned / QR_PNG) is None


def test_render_layer_writes_only_the_connectivity(signed: dict, tmp_path: Path) -> None:
    paths = render_layer(signed["ticket"], "conv2.weight", tmp_path / "layer")
    assert paths == [tmp_path / "layer" / CONNECTIVITY_PNG]
    assert _listing(tmp_path / "layer") == [CONNECTIVITY_PNG]
    pixels = _pixels(paths[0])
    assert pixels.shape == (64 * 4, 32 * 4, 3)  # conv2: 64 outputs x 32 inputs
    assert not (pixels == RED).all(axis=2).any()
    expected = channel_connectivity(load_ticket(signed["ticket"]).mask["conv2.weight"]).numpy()
    assert ((pixels[2::4, 2::4, 0] == 255) == expected).all()


def test_library_refusals_write_nothing(signed: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(EmbeddingError, match="not the QR scheme W3"):
        render_evidence(signed["ticket"], signed["w2_cred"], out)
    with pytest.raises(CredentialError, match="no such file"):
        render_evidence(signed["ticket"], tmp_path / "missing.cred.json", out)
    with pytest.raises(ArchitectureError, match="no weight matrix 'nope'"):
        render_layer(signed["ticket"], "nope", out)
    assert not out.exists()
    # An output that would land on an input is refused, and the input is untouched.
    victim = tmp_path / QR_PNG
    victim.write_bytes(Path(signed["ticket"]).read_bytes())
    before = victim.read_bytes()
    with pytest.raises(ConfigError, match="is an input"):
        render_evidence(victim, signed["cred"], tmp_path)
    assert victim.read_bytes() == before
    assert _listing(tmp_path) == [QR_PNG]


# --- the command line ----------------------------------------------------------------------------


def test_cli_renders_and_reports_the_decoded_text(signed: dict, tmp_path: Path) -> None:
    size = signed["params"].size
    result = invoke(["render", signed["ticket"], "--credential", signed["cred"], "--out", tmp_path])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    side = (size + 8) * 12
    assert lines[0].startswith(f"wrote {tmp_path / CONNECTIVITY_PNG}  1024x512 px")
    assert lines[1].startswith(f"wrote {tmp_path / QR_PNG}  {side}x{side} px")
    assert lines[2].startswith(
        f"wrote {tmp_path / COMPARISON_PNG}  {36 * size + 48}x{12 * size} px"
    )
    assert "data modules differing from the QR code: 0 of " in result.output
    assert lines[-1] == f"QR window: decodes to {TEXT!r} (the credential's text)"
    assert _decodes(tmp_path / QR_PNG) == TEXT


def test_cli_needs_the_reference_for_a_permuted_copy(signed: dict, tmp_path: Path) -> None:
    args = ["render", signed["stolen"], "--credential", signed["cred"]]
    result = invoke([*args, "--out", tmp_path / "a"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "QR window: does not decode"
    result = invoke([*args, "--reference", signed["ticket"], "--out", tmp_path / "b"])
    assert result.exit_code == 0, result.output
    assert "note: channels aligned to" in result.output
    assert result.output.splitlines()[-1].startswith(f"QR window: decodes to {TEXT!r}")
    result = invoke([*args, "--reference", signed["ticket"], "--no-align", "--out", tmp_path / "c"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "QR window: does not decode"


def test_cli_layer_without_a_credential(signed: dict, tmp_path: Path) -> None:
    result = invoke(["render", signed["ticket"], "--layer", LAYER, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {tmp_path / CONNECTIVITY_PNG}  1024x512 px  {LAYER}")
    assert len(result.output.splitlines()) == 1
    assert _listing(tmp_path) == [CONNECTIVITY_PNG]


def test_cli_bad_inputs_are_one_line_errors_and_write_nothing(signed: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bad_cred = tmp_path / "bad.cred.json"
    raw = Path(signed["cred"]).read_bytes()
    bad_cred.write_bytes(raw.replace(TEXT.encode(), b"render TEST"))
    cred = ["--credential", signed["cred"]]
    cases = [
        (["render", tmp_path / "nope.pt", *cred], 1, "no such file"),
        (["render", signed["ticket"], "--credential", tmp_path / "nope.json"], 1, "no such file"),
        (["render", signed["ticket"], "--credential", bad_cred], 1, "invalid credential"),
        (["render", signed["ticket"], "--credential", signed["w2_cred"]], 1, "not the QR scheme"),
        (["render", signed["ticket"], "--layer", "fc9.weight"], 1, "no weight matrix 'fc9.weight'"),
        (["render", signed["ticket"], *cred, "--reference", tmp_path / "x"], 1, "no such file"),
        (["render", signed["ticket"]], 2, "--credential"),
        (["render", signed["ticket"], *cred, "--layer", LAYER], 2, "either --credential"),
        (["render", signed["ticket"], "--layer", LAYER, "--no-align"], 2, "goes with --credential"),
    ]
    for args, code, message in cases:
        line = error_line(invoke([*args, "--out", out]), code)
        assert message in line, (args, line)
        assert not out.exists(), args
    # The credential's own layer missing from the suspect.
    state = dict(load_ticket(signed["ticket"]).trained)
    del state[LAYER]
    torch.save(state, tmp_path / "partial.pt")
    line = error_line(invoke(["render", tmp_path / "partial.pt", *cred, "--out", out]), 1)
    assert (
        line == f"Error: {tmp_path / 'partial.pt'}: has no weight matrix {LAYER!r} (the QR's layer)"
    )
    assert not out.exists()
