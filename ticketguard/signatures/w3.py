"""Scheme W3: a QR code written into a window of one layer's channel connectivity.

The paper's visual scheme (method §3 W3). The owner's text is encoded as a QR code by `segno` at
error-correction level H, in the smallest version that holds it (a version-v symbol has
`17 + 4 v` modules a side: 29 x 29 for version 3, which holds 24 bytes). It is written into a
square window of one layer's channel-connectivity matrix `A[o, i]`, light module = connected, dark
module = not connected, at a location drawn from the embedding seed and recorded in the credential.
Each layer's weight count is restored outside the window exactly as in W2
(`w2.write_connectivity`), and the connected (light) modules keep strong carriers as W2's do.

Reading it back crops the recorded window (after channel alignment when the owner's ticket is
at hand), compares the modules that are not fixed function patterns with the symbol, and hands
the window to a real QR reader (`zxing-cpp`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ticketguard.errors import EmbeddingError
from ticketguard.signatures.payload import KeyedStream
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.signatures.w2 import (
    MAX_CONNECTIVITY_ENTRIES,
    MAX_LAYER_FRACTION,
    EmbeddingLayer,
    Written,
    write_connectivity,
)
from ticketguard.tickets.mask import Mask

SCHEME = "W3"
ERROR_LEVEL = "H"
#: QR versions 1..40; the text must fit version 40 at level H (1273 bytes).
MAX_VERSION = 40
MAX_TEXT_BYTES = 1273
_PLACEMENT = "row, col uniform over the positions where the window fits (keystream 'W3 window')"


@dataclass(frozen=True)
class QrSymbol:
    """A QR code: its text, version, mask pattern, dark modules and function-pattern modules."""

    text: str
    version: int
    mask_pattern: int
    dark: np.ndarray
    function: np.ndarray

    @property
    def size(self) -> int:
        return int(self.dark.shape[0])


def make_symbol(text: str) -> QrSymbol:
    """Encode `text` at error level H in the smallest QR version that holds it (segno)."""
    import segno

    if not isinstance(text, str) or not text:
        raise EmbeddingError("the QR text must be a non-empty string")
    if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise EmbeddingError(
            f"the QR text is {len(text.encode('utf-8'))} bytes; at error level H a QR code holds "
            f"at most {MAX_TEXT_BYTES}"
        )
    try:
        code = segno.make(text, error=ERROR_LEVEL.lower(), boost_error=False, micro=False)
    except segno.DataOverflowError as exc:
        raise EmbeddingError(f"the QR text does not fit a QR code at level H ({exc})") from None
    return _symbol_of(code, text)


def encode_symbol(text: str, version: int, mask_pattern: int) -> QrSymbol:
    """Encode `text` exactly as recorded (level H, this version and mask pattern), or refuse."""
    import segno

    try:
        code = segno.make(
            text,
            error=ERROR_LEVEL.lower(),
            version=version,
            mask=mask_pattern,
            boost_error=False,
            micro=False,
        )
    except (segno.DataOverflowError, ValueError) as exc:
        raise EmbeddingError(
            f"the QR text does not encode as a version-{version} code at level H ({exc})"
        ) from None
    return _symbol_of(code, text)


def _symbol_of(code: Any, text: str) -> QrSymbol:
    from segno import consts

    dark = np.array([list(row) for row in code.matrix], dtype=bool)
    types = np.array(
        [list(row) for row in code.matrix_iter(scale=1, border=0, verbose=True)], dtype=np.int64
    )
    data = np.isin(types, [consts.TYPE_DATA_DARK, consts.TYPE_DATA_LIGHT])
    return QrSymbol(text, int(code.version), int(code.mask), dark, ~data)


def _pack(bits: np.ndarray) -> str:
    return base64.b64encode(np.packbits(bits.astype(np.uint8).reshape(-1)).tobytes()).decode()


def _unpack(text: object, size: int, what: str) -> np.ndarray:
    if not isinstance(text, str):
        raise EmbeddingError(f"the credential's W3 {what} is not a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise EmbeddingError(f"the credential's W3 {what} is not valid base64") from None
    if len(raw) != (size * size + 7) // 8:
        raise EmbeddingError(f"the credential's W3 {what} does not hold {size}x{size} modules")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[: size * size].reshape(size, size) == 1


@dataclass(frozen=True)
class W3Params:
    """Where the QR code sits and what it is: everything verification needs besides the mask."""

    layer: EmbeddingLayer
    row: int
    col: int
    symbol: QrSymbol

    @property
    def size(self) -> int:
        return self.symbol.size

    @property
    def num_bits(self) -> int:
        return self.size * self.size

    @property
    def layer_names(self) -> list[str]:
        return [self.layer.name]

    @property
    def layers(self) -> tuple[EmbeddingLayer, ...]:
        return (self.layer,)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": SCHEME,
            "layer": self.layer.to_dict(),
            "window": {"row": self.row, "col": self.col, "size": self.size},
            "placement": _PLACEMENT,
            "qr": {
                "text": self.symbol.text,
                "version": self.symbol.version,
                "error": ERROR_LEVEL,
                "mask_pattern": self.symbol.mask_pattern,
                "dark": _pack(self.symbol.dark),
                "function": _pack(self.symbol.function),
            },
        }

    @classmethod
    def from_dict(cls, data: Any) -> W3Params:
        """Read W3 parameters from an (untrusted) credential, validating every field."""

        def bad(what: str) -> EmbeddingError:
            return EmbeddingError(f"the credential's W3 embedding {what}")

        def integer(value: Any, low: int, high: int, what: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise bad(f"has no {what} in {low}..{high}")
            return value

        if not isinstance(data, dict) or data.get("scheme") != SCHEME:
            raise bad("is not a W3 object")
        layer, window, qr = data.get("layer"), data.get("window"), data.get("qr")
        if not isinstance(layer, dict) or not isinstance(window, dict) or not isinstance(qr, dict):
            raise bad("lacks its layer, window or qr object")
        name = layer.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 300:
            raise bad("has no layer name")
        shape = layer.get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise bad("has no layer shape [out, in]")
        out = integer(shape[0], 1, MAX_CONNECTIVITY_ENTRIES, "layer height")
        inp = integer(shape[1], 1, MAX_CONNECTIVITY_ENTRIES, "layer width")
        if out * inp > MAX_CONNECTIVITY_ENTRIES:
            raise bad("has a layer larger than any real one")
        surviving = integer(layer.get("surviving"), 0, 2**62, "surviving count")
        version = integer(qr.get("version"), 1, MAX_VERSION, "QR version")
        size = 17 + 4 * version
        if window.get("size") != size:
            raise bad(f"has a window size that is not {size} (version {version})")
        row = integer(window.get("row"), 0, out - size, "window row inside the layer")
        col = integer(window.get("col"), 0, inp - size, "window column inside the layer")
        if qr.get("error") != ERROR_LEVEL:
            raise bad(f"has an error level other than {ERROR_LEVEL}")
        mask_pattern = integer(qr.get("mask_pattern"), 0, 7, "QR mask pattern")
        text = qr.get("text")
        if not isinstance(text, str):
            raise bad("has no QR text")
        if not text or len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
            raise bad(f"has a QR text that is empty or over {MAX_TEXT_BYTES} bytes")
        dark = _unpack(qr.get("dark"), size, "dark modules")
        function = _unpack(qr.get("function"), size, "function modules")
        # The recorded modules must be exactly the code of the text: a credential cannot claim
        # an arbitrary pattern (say, a copy of an innocent model's window) as its QR code.
        symbol = encode_symbol(text, version, mask_pattern)
        if not (np.array_equal(symbol.dark, dark) and np.array_equal(symbol.function, function)):
            raise bad("records modules that are not the QR code of its text")
        return cls(EmbeddingLayer(name, (out, inp), size * size, surviving), row, col, symbol)


def capacity(mask: torch.Tensor) -> int:
    """Return how many connectivity entries of a layer can be written with its count restored."""
    conn = channel_connectivity(mask)
    count = int(mask.sum())
    kernel = mask.numel() // conn.numel()
    return min(
        int(conn.numel() * MAX_LAYER_FRACTION),
        count // (kernel + 1),
        (mask.numel() - count) // (2 * kernel),
    )


def choose_layer(mask: Mask, candidates: Sequence[str], size: int) -> str:
    """Return the candidate layer that holds a size x size window with the most room to spare."""
    fits = []
    for name in candidates:
        m = mask[name]
        if m.dim() < 2 or m.shape[0] < size or m.shape[1] < size:
            continue
        room = capacity(m)
        if room >= size * size:
            fits.append((room, name))
    if not fits:
        raise EmbeddingError(
            f"no layer can hold a {size}x{size} QR code (each needs at least {size} input and "
            f"output channels and room for {size * size} written connections); use a shorter "
            "text or name a larger --layer"
        )
    return max(fits, key=lambda item: item[0])[1]


def plan_qr(mask: Mask, layer: str, symbol: QrSymbol, seed: bytes) -> W3Params:
    """Place the symbol in `layer` at a window drawn from the seed's 'W3 window' keystream."""
    m = mask[layer]
    size = symbol.size
    if m.dim() < 2 or m.shape[0] < size or m.shape[1] < size:
        raise EmbeddingError(
            f"{layer}: its {tuple(m.shape[:2])} connectivity cannot hold a {size}x{size} QR code"
        )
    room = capacity(m)
    if room < size * size:
        raise EmbeddingError(
            f"{layer}: its weight count can absorb {room} written connections, the QR code needs "
            f"{size * size}; use a shorter text or a denser layer"
        )
    out, inp = int(m.shape[0]), int(m.shape[1])
    row, col = keyed_window(seed, (out, inp), size)
    return W3Params(EmbeddingLayer(layer, (out, inp), size * size, int(m.sum())), row, col, symbol)


def keyed_window(seed: bytes, shape: tuple[int, int], size: int) -> tuple[int, int]:
    """Return the window's (row, col): uniform draws from the seed's 'W3 window' keystream."""
    stream = KeyedStream(seed, "W3 window")
    row = stream.uniform(shape[0] - size + 1)
    col = stream.uniform(shape[1] - size + 1)
    return row, col


def window_positions(params: W3Params) -> np.ndarray:
    """Return the flat connectivity indices of the window, row by row (vectorised)."""
    rows = np.arange(params.row, params.row + params.size, dtype=np.int64)
    cols = np.arange(params.col, params.col + params.size, dtype=np.int64)
    return np.add.outer(rows * params.layer.shape[1], cols).reshape(-1)


def window_matrix(params: W3Params) -> dict[str, torch.Tensor]:
    """Return the window as a bool connectivity-shaped matrix (to leave it out of alignment)."""
    out, inp = params.layer.shape
    matrix = torch.zeros(out, inp, dtype=torch.bool)
    matrix[params.row : params.row + params.size, params.col : params.col + params.size] = True
    return {params.layer.name: matrix}


def write_qr(
    mask: Mask,
    trained: Mapping[str, torch.Tensor],
    rewind: Mapping[str, torch.Tensor],
    params: W3Params,
) -> Written:
    """Return a new mask with the QR code in its window; the layer's weight count is unchanged."""
    light = ~params.symbol.dark.reshape(-1)
    layer = params.layer
    return write_connectivity(
        mask, trained, rewind, [(layer.name, layer.shape, window_positions(params), light)]
    )


def crop_window(mask: Mapping[str, torch.Tensor], params: W3Params) -> np.ndarray | None:
    """Return the window's connectivity (True = connected), or None if the layer is not there."""
    m = mask.get(params.layer.name)
    if m is None or m.dim() < 2 or (int(m.shape[0]), int(m.shape[1])) != params.layer.shape:
        return None
    # Only the window's kernels are looked at: A[o, i] = any(mask[o, i, ...]).
    size = params.size
    kernels = m[params.row : params.row + size, params.col : params.col + size].bool().cpu()
    return kernels.reshape(size, size, -1).any(dim=2).numpy().copy()


def qr_pixels(connected: np.ndarray, *, scale: int = 1, border: int = 4) -> np.ndarray:
    """Return the window as a QR image: connected = light (255), with a light quiet zone."""
    image = np.where(connected, 255, 0).astype(np.uint8)
    image = np.pad(image, border, constant_values=255)
    return np.kron(image, np.ones((scale, scale), dtype=np.uint8)) if scale > 1 else image


def decode_window(connected: np.ndarray) -> str | None:
    """Read the window with zxing-cpp; return the decoded text, or None if it does not read."""
    import zxingcpp

    results = zxingcpp.read_barcodes(
        qr_pixels(connected, scale=4), formats=zxingcpp.BarcodeFormat.QRCode
    )
    return results[0].text if results else None


@dataclass(frozen=True)
class QrReading:
    """The window as read back: data-module agreement, its chance level, and the decoded text."""

    modules: int
    mismatches: int
    chance: float
    density: float
    decoded: str | None
    others: OtherWindows | None = None


#: Layers with more connectivity entries than this are not scanned for other windows.
MAX_SCAN_ENTRIES = 1 << 24


@dataclass(frozen=True)
class OtherWindows:
    """How well the code fits every other window of the layer: a null from the suspect itself.

    Windows overlapping the recorded one are left out. `exceeding` counts the windows that agree
    at least as well as the recorded one; `(1 + exceeding) / (1 + count)` is an empirical p-value.
    """

    count: int
    mean: float
    std: float
    best: int
    exceeding: int

    @property
    def empirical_p(self) -> float:
        return (1 + self.exceeding) / (1 + self.count)


def other_windows(conn: torch.Tensor, params: W3Params, agree: int) -> OtherWindows | None:
    """Score the code against every window of `conn` that does not overlap the recorded one.

    Agreement at every offset is two cross-correlations of the connectivity with the code's light
    and dark data modules (vectorised; no loop over offsets or modules). None when the layer is
    larger than MAX_SCAN_ENTRIES or has no window apart from the recorded one.
    """
    out, inp = conn.shape
    size = params.size
    if out * inp > MAX_SCAN_ENTRIES:
        return None
    data = ~params.symbol.function
    light = torch.from_numpy((data & ~params.symbol.dark).astype(np.float32))[None, None]
    dark = torch.from_numpy((data & params.symbol.dark).astype(np.float32))[None, None]
    a = conn.float()[None, None]
    scores = torch.nn.functional.conv2d(a, light) + torch.nn.functional.conv2d(1 - a, dark)
    scores = scores[0, 0].round().to(torch.int64)
    rows = torch.arange(scores.shape[0])[:, None]
    cols = torch.arange(scores.shape[1])[None, :]
    overlapping = ((rows - params.row).abs() < size) & ((cols - params.col).abs() < size)
    others = scores[~overlapping].double()
    if others.numel() == 0:
        return None
    return OtherWindows(
        count=int(others.numel()),
        mean=float(others.mean()),
        std=float(others.std()) if others.numel() > 1 else 0.0,
        best=int(others.max()),
        exceeding=int((others >= agree).sum()),
    )


def read_qr(mask: Mapping[str, torch.Tensor], params: W3Params) -> QrReading | None:
    """Compare the suspect's window with the symbol over the data modules; try to decode it.

    The chance level is the agreement a window placed independently of the code can expect at
    most, whatever its density: a window of density `d` agrees on `d w + (1 - d)(1 - w)` of the
    modules on average, `w` being the light fraction of the data modules, which is largest at
    `max(w, 1 - w)` (an all-connected or all-unconnected window). The layer's density is not
    used: a window can be much denser or sparser than its layer (a dense block, pruned-away
    channels), and the window's own density would depend on the code when the code is there.
    """
    window = crop_window(mask, params)
    if window is None:
        return None
    data = ~params.symbol.function
    if not data.any():
        raise EmbeddingError("the QR code has no data modules to compare")
    m = mask[params.layer.name]
    conn = channel_connectivity(m.bool().cpu())
    density = float(conn.float().mean())
    expected_light = ~params.symbol.dark[data]
    got = window[data]
    light = float(expected_light.mean())
    chance = max(light, 1.0 - light)
    mismatches = int((got != expected_light).sum())
    modules = int(data.sum())
    others = other_windows(conn, params, modules - mismatches)
    return QrReading(modules, mismatches, chance, density, decode_window(window), others)
