"""Pictures of the W3 evidence: a layer's connectivity, its QR window, and what differs.

Three PNG files a person can look at (method §3 W3: the QR window is "rendered as a picture a
person can look at"):

* `connectivity.png`: one layer's channel-connectivity matrix `A[o, i]` (rows = output channels,
  columns = input channels), each entry a `cell` x `cell` block, white = connected, black = not,
  with the QR window framed in red.
* `qr.png`: the suspect's window alone, scaled up with a light quiet zone, so a phone's camera
  can read it off the screen (light = connected, the W3 convention).
* `comparison.png`: the expected symbol, the suspect's window and their difference side by side.

Every picture is built with vectorised numpy and handed to Pillow once; the files are written
atomically, all or none, and never over an input.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ticketguard.errors import ArchitectureError, ConfigError, CredentialError, EmbeddingError
from ticketguard.files import atomic_path
from ticketguard.signatures.credential import read_credential
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.signatures.w3 import (
    SCHEME,
    W3Params,
    crop_window,
    decode_window,
    qr_pixels,
    window_matrix,
)
from ticketguard.tickets.loading import load_checkpoint
from ticketguard.tickets.ticket import load_ticket
from ticketguard.verify.recovery import recover_mask
from ticketguard.verify.verification import aligned_to, check_layers

#: The files a rendering writes into its output folder (named here and nowhere else).
CONNECTIVITY_PNG = "connectivity.png"
QR_PNG = "qr.png"
COMPARISON_PNG = "comparison.png"

#: Pixels of one connectivity entry at most; large layers get smaller cells (down to 1).
DEFAULT_CELL = 4
#: Pixels of one QR module in `qr.png` and `comparison.png` (a 29-module code: 444 px with border).
DEFAULT_SCALE = 12
#: The quiet zone the QR standard asks for, in modules.
DEFAULT_BORDER = 4
#: The largest connectivity picture drawn (pixels); a larger layer is shown cropped around the
#: window. Kept well under Pillow's decompression-bomb warning (about 89 M pixels) so any viewer
#: opens it.
MAX_PIXELS = 1 << 25

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
RED = (255, 0, 0)
#: Difference panel: a module that agrees is drawn dimmed, light grey (connected) or dark grey.
AGREE_LIGHT = (190, 190, 190)
AGREE_DARK = (70, 70, 70)


def _bool_matrix(array: np.ndarray, what: str) -> np.ndarray:
    matrix = np.asarray(array)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ConfigError(f"the {what} must be a non-empty 2-D matrix, got shape {matrix.shape}")
    return matrix.astype(bool, copy=False)


def _positive(value: int, what: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ConfigError(f"the {what} must be an integer >= {low}, got {value!r}")
    return int(value)


def _blow_up(pixels: np.ndarray, scale: int) -> np.ndarray:
    """Repeat every entry of a (h, w[, c]) array into a scale x scale block."""
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else pixels


def outline_width(cell: int) -> int:
    """Return how many pixels thick the window's red frame is at `cell` pixels per entry."""
    return max(1, cell // 2)


def connectivity_image(
    conn: np.ndarray,
    *,
    window: tuple[int, int, int] | None = None,
    cell: int = DEFAULT_CELL,
) -> Image.Image:
    """Draw a connectivity matrix: white = connected, black = not, the window framed in red.

    The picture is RGB, exactly `conn.shape[1] * cell` pixels wide and `conn.shape[0] * cell`
    high. The window `(row, col, size)` (in entries) is framed by a red line
    `outline_width(cell) = max(1, cell // 2)` pixels thick, drawn just *outside* it over the
    edge pixels of the neighbouring entries and clipped to the picture: every entry inside the
    window keeps its own colour, and a neighbour is covered only along the half of it nearest
    the window when `cell >= 2` (entirely when `cell == 1`).
    """
    matrix = _bool_matrix(conn, "connectivity")
    cell = _positive(cell, "cell size")
    pixels = _blow_up(np.where(matrix, np.uint8(255), np.uint8(0)), cell)
    rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    if window is not None:
        row, col, size = (int(v) for v in window)
        if size < 1:
            raise ConfigError(f"the window size must be >= 1, got {size}")
        t = outline_width(cell)
        top, left = row * cell, col * cell
        bottom, right = (row + size) * cell, (col + size) * cell
        height, width = rgb.shape[:2]

        def paint(r0: int, r1: int, c0: int, c1: int) -> None:
            r0, r1 = max(r0, 0), min(r1, height)
            c0, c1 = max(c0, 0), min(c1, width)
            if r0 < r1 and c0 < c1:
                rgb[r0:r1, c0:c1] = RED

        paint(top - t, top, left - t, right + t)
        paint(bottom, bottom + t, left - t, right + t)
        paint(top, bottom, left - t, left)
        paint(top, bottom, right, right + t)
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def qr_image(
    connected: np.ndarray, *, scale: int = DEFAULT_SCALE, border: int = DEFAULT_BORDER
) -> Image.Image:
    """Draw a QR window for a phone: grayscale, light = connected, with a light quiet zone.

    The picture is square, `(S + 2 * border) * scale` pixels a side for an S x S window.
    """
    matrix = _bool_matrix(connected, "QR window")
    if matrix.shape[0] != matrix.shape[1]:
        raise ConfigError(f"a QR window is square, got shape {matrix.shape}")
    scale = _positive(scale, "QR scale")
    border = _positive(border, "QR border", low=0)
    return Image.fromarray(qr_pixels(matrix, scale=scale, border=border), mode="L")


def comparison_image(
    reference: np.ndarray, suspect: np.ndarray, *, scale: int = DEFAULT_SCALE, gap: int = 2
) -> Image.Image:
    """Draw reference, suspect and difference panels side by side (True = connected = light).

    Each panel is `S * scale` pixels square; white columns `gap * scale` pixels wide separate
    them, so the RGB picture is `3 * S * scale + 2 * gap * scale` pixels wide and `S * scale`
    high. The first two panels are white (connected) and black modules. In the difference panel
    a module that agrees is dimmed (light grey where both are connected, dark grey where neither
    is) and a module that disagrees, either way, is red.
    """
    ref = _bool_matrix(reference, "reference window")
    sus = _bool_matrix(suspect, "suspect window")
    if ref.shape != sus.shape:
        raise ConfigError(f"the windows differ in shape: {ref.shape} and {sus.shape}")
    scale = _positive(scale, "comparison scale")
    gap = _positive(gap, "comparison gap", low=0)
    palette = np.array([BLACK, WHITE, AGREE_DARK, AGREE_LIGHT, RED], dtype=np.uint8)
    diff = np.where(ref != sus, 4, np.where(ref, 3, 2))
    spacer = np.full((ref.shape[0], gap), 1, dtype=np.int64)
    codes = np.concatenate([ref.astype(np.int64), spacer, sus.astype(np.int64), spacer, diff], 1)
    return Image.fromarray(np.ascontiguousarray(_blow_up(palette[codes], scale)), mode="RGB")


@dataclass(frozen=True)
class Region:
    """The part of a layer's connectivity a picture shows (rows, columns half-open) and its cell."""

    row0: int
    row1: int
    col0: int
    col1: int
    cell: int
    cropped: bool

    def describe(self, layer: str) -> str:
        shown = f"{layer}, {self.row1 - self.row0}x{self.col1 - self.col0} entries"
        if self.cropped:
            shown += (
                f" (rows {self.row0}..{self.row1 - 1}, columns {self.col0}..{self.col1 - 1}: "
                "the layer is too large for one picture)"
            )
        return f"{shown}, {self.cell} px per entry"


def _span(length: int, start: int, size: int, limit: int) -> tuple[int, int]:
    """Return the `limit`-long stretch of `0..length` centred on `start..start+size`, clamped."""
    if length <= limit:
        return 0, length
    lo = max(0, min(start + size // 2 - limit // 2, length - limit))
    return lo, lo + limit


def view_region(
    shape: tuple[int, int],
    window: tuple[int, int, int] | None = None,
    *,
    cell: int = DEFAULT_CELL,
    max_pixels: int = MAX_PIXELS,
) -> Region:
    """Choose how much of a connectivity matrix to draw and how big, within `max_pixels`.

    The cell shrinks from `cell` down to 1 until the whole matrix fits; a matrix that does not
    fit even then is cropped to a region centred on the window (the top-left corner without one).
    """
    out, inp = shape
    for size in range(cell, 0, -1):
        if out * inp * size * size <= max_pixels:
            return Region(0, out, 0, inp, size, False)
    row, col, size = window if window is not None else (0, 0, 1)
    side = math.isqrt(max_pixels)
    rows = min(out, max(side, max_pixels // inp))
    cols = min(inp, max_pixels // rows)
    r0, r1 = _span(out, row, size, rows)
    c0, c1 = _span(inp, col, size, cols)
    return Region(r0, r1, c0, c1, 1, True)


def _layer_picture(
    conn: np.ndarray, window: tuple[int, int, int] | None
) -> tuple[Image.Image, Region]:
    region = view_region((int(conn.shape[0]), int(conn.shape[1])), window)
    shown = conn[region.row0 : region.row1, region.col0 : region.col1]
    local = None
    if window is not None:
        local = (window[0] - region.row0, window[1] - region.col0, window[2])
    return connectivity_image(shown, window=local, cell=region.cell), region


@dataclass
class EvidencePictures:
    """The W3 pictures of one suspect, before they are written, and what they show."""

    layer: str
    window_at: tuple[int, int, int]
    text: str
    expected: np.ndarray
    window: np.ndarray
    data_modules: np.ndarray
    images: dict[str, Image.Image]
    region: Region
    aligned: bool
    mask_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        """Return how many data modules (not function patterns) differ from the symbol."""
        return int((self.window != self.expected)[self.data_modules].sum())

    @property
    def num_data_modules(self) -> int:
        return int(self.data_modules.sum())

    def decoded(self) -> str | None:
        """Read the suspect's window with a real QR reader; None if it does not read."""
        return decode_window(self.window)


def _credential_params(credential_path: str | Path) -> W3Params:
    """Read a credential's W3 parameters; refuse an invalid credential or another scheme."""
    cred = read_credential(credential_path)
    if not cred.valid:
        raise CredentialError(f"{credential_path}: invalid credential: {cred.problems[0]}")
    embedding = (cred.document or {}).get("embedding")
    scheme = embedding.get("scheme") if isinstance(embedding, dict) else None
    if scheme != SCHEME:
        raise EmbeddingError(
            f"{credential_path}: the credential's embedding is {scheme or 'unnamed'}, not the "
            f"QR scheme {SCHEME}; only a QR code can be rendered"
        )
    return W3Params.from_dict(embedding)


def evidence_pictures(
    suspect_path: str | Path,
    credential_path: str | Path,
    *,
    reference_path: str | Path | None = None,
    align: bool = True,
) -> EvidencePictures:
    """Draw a suspect's W3 evidence in memory: its layer, its QR window, the comparison.

    The suspect's mask is recovered for the credential's layer (top magnitudes down to the
    layer's recorded surviving count, or the reference's, when the suspect holds more). With
    a reference ticket and `align`, the suspect's channels are first put into the reference's
    order, the window left out of the alignment cost so it cannot steer what it is used to read.
    The expected panel is always the credential's symbol (light = connected).
    """
    params = _credential_params(credential_path)
    name = params.layer.name
    reference = load_ticket(reference_path) if reference_path is not None else None
    if reference is not None:
        ref_layer = reference.mask.get(name)
        if ref_layer is None or ref_layer.dim() < 2:
            raise ArchitectureError(
                f"{reference_path}: the reference ticket has no masked layer {name!r}"
            )
        if (int(ref_layer.shape[0]), int(ref_layer.shape[1])) != params.layer.shape:
            raise ArchitectureError(
                f"{reference_path}: {name!r} connects {tuple(ref_layer.shape[:2])} channels, "
                f"the credential's layer {params.layer.shape}"
            )
    loaded = load_checkpoint(suspect_path)
    counts = {name: params.layer.surviving}
    if reference is not None:
        counts.update({n: int(m.sum()) for n, m in reference.mask.items()})
    mask, sources = recover_mask(loaded, list(counts), counts)
    layer = mask.get(name)
    if layer is None:
        raise ArchitectureError(f"{suspect_path}: has no weight matrix {name!r} (the QR's layer)")
    if layer.dim() < 2 or (int(layer.shape[0]), int(layer.shape[1])) != params.layer.shape:
        raise ArchitectureError(
            f"{suspect_path}: {name!r} has shape {tuple(layer.shape)}, the credential's layer "
            f"connects {params.layer.shape} channels"
        )
    notes = []
    aligned = False
    if reference is not None and align:
        check_layers(suspect_path, mask, reference.mask, list(reference.mask))
        if reference.architecture is None or reference.num_classes is None:
            raise ArchitectureError(
                f"{reference_path}: the reference ticket records no architecture"
            )
        mask, alignment = aligned_to(reference, mask, window_matrix(params))
        aligned = True
        notes.append(
            f"channels aligned to {reference_path} ({alignment.moved} channels moved); the "
            "pictures are in the reference's channel order"
        )
    elif reference is not None:
        notes.append("channels not aligned (--no-align): the pictures are in the suspect's order")

    window = crop_window(mask, params)
    assert window is not None  # the layer's shape was checked above
    conn = channel_connectivity(mask[name].bool().cpu()).numpy()
    at = (params.row, params.col, params.size)
    layer_image, region = _layer_picture(conn, at)
    expected = ~params.symbol.dark
    images = {
        CONNECTIVITY_PNG: layer_image,
        QR_PNG: qr_image(window),
        COMPARISON_PNG: comparison_image(expected, window),
    }
    return EvidencePictures(
        name,
        at,
        params.symbol.text,
        expected,
        window,
        ~params.symbol.function,
        images,
        region,
        aligned,
        sources.get(name, "unknown"),
        notes,
    )


def save_pictures(
    images: Mapping[str, Image.Image],
    out_dir: str | Path,
    *,
    inputs: Sequence[str | Path] = (),
) -> list[Path]:
    """Write PNG pictures into `out_dir` (created if missing), all or none, never over an input.

    Each picture is written in full under a temporary name beside its target and renamed into
    place only once every picture has been written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    targets = [out / name for name in images]
    protected = {Path(p).resolve() for p in inputs}
    for target in targets:
        if target.resolve() in protected:
            raise ConfigError(f"{target}: is an input; refusing to overwrite it")
        if target.exists() and not target.is_file():
            raise ConfigError(f"{target}: exists and is not a file; nothing was written")
    created = not out.exists()
    try:
        with contextlib.ExitStack() as stack:
            for target, image in zip(targets, images.values(), strict=True):
                tmp = stack.enter_context(atomic_path(target))
                image.save(tmp, format="PNG")
    except BaseException as exc:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write into {out}: {exc.strerror or exc}") from None
        raise
    return targets


def render_evidence(
    suspect_path: str | Path,
    credential_path: str | Path,
    out_dir: str | Path,
    *,
    reference_path: str | Path | None = None,
    align: bool = True,
) -> list[Path]:
    """Write `connectivity.png`, `qr.png` and `comparison.png` of a suspect's W3 evidence."""
    pictures = evidence_pictures(
        suspect_path, credential_path, reference_path=reference_path, align=align
    )
    inputs = [p for p in (suspect_path, credential_path, reference_path) if p is not None]
    return save_pictures(pictures.images, out_dir, inputs=inputs)


@dataclass
class LayerPicture:
    """The connectivity picture of one layer of a model file, before it is written."""

    layer: str
    image: Image.Image
    region: Region
    mask_source: str


def layer_picture(path: str | Path, layer: str) -> LayerPicture:
    """Draw one layer's connectivity from a ticket or model file (its mask or zero pattern)."""
    loaded = load_checkpoint(path)
    weight = loaded.state.get(layer)
    if weight is None or weight.dim() < 2 or weight.dtype == torch.bool:
        matrices = [n for n, v in loaded.state.items() if v.dim() >= 2 and v.dtype != torch.bool]
        more = ", ..." if len(matrices) > 6 else ""
        hint = f" (its weight matrices: {', '.join(matrices[:6])}{more})" if matrices else ""
        raise ArchitectureError(f"{path}: has no weight matrix {layer!r}{hint}")
    mask, sources = recover_mask(loaded, [layer])
    conn = channel_connectivity(mask[layer].bool().cpu()).numpy()
    image, region = _layer_picture(conn, None)
    return LayerPicture(layer, image, region, sources[layer])


def render_layer(path: str | Path, layer: str, out_dir: str | Path) -> list[Path]:
    """Write `connectivity.png` of one layer of a ticket or model file (no credential needed)."""
    picture = layer_picture(path, layer)
    return save_pictures({CONNECTIVITY_PNG: picture.image}, out_dir, inputs=[path])


def png_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return a written picture's (width, height) in pixels."""
    with Image.open(path) as image:
        return image.size
