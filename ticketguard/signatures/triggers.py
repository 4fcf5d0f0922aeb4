"""B1 trigger sets: generated from the embedding seed or loaded from an Adi et al. folder.

A trigger set is a small batch of out-of-distribution images with owner-assigned labels
(method §4). The credential commits to `TriggerSet.commitment()`, so the set cannot be chosen
after the fact; the owner's secret file keeps the set itself in its `to_dict()` form.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ticketguard.errors import ConfigError, TriggerSetError
from ticketguard.files import canonical_json, sha256_hex
from ticketguard.signatures.payload import KeyedStream

__all__ = [
    "COMMITMENT_PREFIX",
    "KINDS",
    "MAX_IMAGE_VALUES",
    "MAX_TOTAL_VALUES",
    "MAX_TRIGGERS",
    "ORDERS",
    "SOURCES",
    "TRIGGER_FORMAT",
    "TriggerSet",
    "check_trigger_dict",
    "generate_triggers",
    "load_trigger_folder",
]

TRIGGER_FORMAT = "ticketguard-triggers/1"
#: Domain separation of the trigger-set commitment from every other SHA-256 in the toolkit.
COMMITMENT_PREFIX = b"ticketguard/trigger-commitment/1\x00"
MAX_TRIGGERS = 10_000
#: Largest C * H * W of one image (3 x 1024 x 1024).
MAX_IMAGE_VALUES = 3 * 1024 * 1024
#: Largest N * C * H * W of a whole set (256 MiB of pixels), so no file can make us allocate more.
MAX_TOTAL_VALUES = 256 * 1024 * 1024
SOURCES = ("generated", "folder")
ORDERS = ("lexicographic", "numeric")
#: The kinds of generated image, in the order `uniform(len(KINDS))` picks them.
KINDS = ("field", "stripes", "noise", "checkerboard", "rings")

_PURPOSE = "B1 trigger set"
_DICT_KEYS = frozenset({"format", "source", "shape", "labels", "names", "images"})
#: A labels file is one short number per line; anything far bigger is not one.
_MAX_LABELS_FILE_BYTES = 4 * 1024 * 1024
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,6})?")
_DIGITS = re.compile(r"\d+")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: object, limit: int = 60) -> str:
    """A short, printable repr of a value read from a file (for one-line messages)."""
    text = repr(value)
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, eq=False, repr=False)
class TriggerSet:
    """Trigger images (uint8, N x C x H x W, CPU) and the labels the owner assigned to them."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Refuse tensors, sources or names that do not make a trigger set."""
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TriggerSetError("trigger images and labels must be tensors")
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TriggerSetError(
                f"trigger images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if images.device.type != "cpu" or labels.device.type != "cpu":
            raise TriggerSetError("trigger images and labels must be on the CPU")
        n, c, h, w = images.shape
        if min(n, c, h, w) < 1:
            raise TriggerSetError(f"trigger images have an empty dimension: {tuple(images.shape)}")
        if n > MAX_TRIGGERS:
            raise TriggerSetError(f"a trigger set holds at most {MAX_TRIGGERS} images, got {n}")
        if c * h * w > MAX_IMAGE_VALUES or n * c * h * w > MAX_TOTAL_VALUES:
            raise TriggerSetError(f"trigger images of shape {tuple(images.shape)} are too large")
        if labels.dtype != torch.int64 or labels.shape != (n,):
            raise TriggerSetError(
                f"trigger labels must be int64 of shape ({n},), "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
        if bool((labels < 0).any()):
            raise TriggerSetError("trigger labels must be >= 0")
        if self.source not in SOURCES:
            raise TriggerSetError(f"trigger source must be one of {SOURCES}, got {self.source!r}")
        if not isinstance(self.names, tuple) or not all(isinstance(s, str) for s in self.names):
            raise TriggerSetError("trigger names must be a tuple of strings")
        if self.source == "folder" and len(self.names) != n:
            raise TriggerSetError(f"a folder trigger set needs {n} names, got {len(self.names)}")
        if self.source == "generated" and self.names:
            raise TriggerSetError("a generated trigger set has no file names")
        # Byte layout of the commitment and of to_dict is C order; make it so once, here.
        object.__setattr__(self, "images", images.contiguous())
        object.__setattr__(self, "labels", labels.contiguous())

    @property
    def size(self) -> int:
        """Return the number of trigger images N."""
        return int(self.images.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Return the (C, H, W) shape of one image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TriggerSet):
            return NotImplemented
        return (
            self.source == other.source
            and self.names == other.names
            and self.images.shape == other.images.shape
            and torch.equal(self.images, other.images)
            and torch.equal(self.labels, other.labels)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"TriggerSet(source={self.source!r}, size={self.size}, input_shape={self.input_shape})"
        )

    def _raw(self) -> bytes:
        return self.images.numpy().tobytes(order="C")

    def commitment(self) -> str:
        """Return the SHA-256 hex commitment binding the shape, every label and every pixel."""
        header = canonical_json(
            {"shape": list(self.images.shape), "labels": self.labels.tolist()}
        ).encode("utf-8")
        return sha256_hex(COMMITMENT_PREFIX + header + b"\x00" + self._raw())

    def inputs(self, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """Return float32 model inputs `(images / 255 - mean[c]) / std[c]`, shape (N, C, H, W)."""
        c = self.input_shape[0]
        try:
            mean_t = torch.tensor([float(v) for v in mean], dtype=torch.float32)
            std_t = torch.tensor([float(v) for v in std], dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"mean and std must be sequences of numbers: {exc}") from None
        if mean_t.numel() != c or std_t.numel() != c:
            raise ConfigError(
                f"mean and std need {c} values each for {c}-channel triggers, "
                f"got {mean_t.numel()} and {std_t.numel()}"
            )
        finite = bool(torch.isfinite(mean_t).all()) and bool(torch.isfinite(std_t).all())
        if not finite or not bool((std_t > 0).all()):
            raise ConfigError("mean must be finite and std finite and positive")
        shape = (1, c, 1, 1)
        x = self.images.to(torch.float32).div_(255.0)
        return x.sub_(mean_t.view(shape)).div_(std_t.view(shape))

    def max_label_frequency(self) -> float:
        """Return the count of the most frequent label over N: a constant predictor's hit rate."""
        # unique, not bincount: a stored label may be huge, and must not size an allocation.
        _, counts = torch.unique(self.labels, return_counts=True)
        return int(counts.max()) / self.size

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form kept in the owner's secret file."""
        return {
            "format": TRIGGER_FORMAT,
            "source": self.source,
            "shape": [int(v) for v in self.images.shape],
            "labels": [int(v) for v in self.labels.tolist()],
            "names": list(self.names),
            "images": base64.b64encode(zlib.compress(self._raw(), 9)).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: object, *, what: str = "trigger set") -> TriggerSet:
        """Read a trigger set from untrusted JSON, refusing anything malformed or oversized."""
        n, c, h, w = check_trigger_dict(data, what=what)
        assert isinstance(data, Mapping)
        raw = _decode_images(data["images"], n * c * h * w, what)
        images = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(n, c, h, w)
        try:
            return cls(
                images=images,
                labels=torch.tensor(data["labels"], dtype=torch.int64),
                source=data["source"],
                names=tuple(data["names"]),
            )
        except TriggerSetError as exc:
            raise TriggerSetError(f"{what}: {exc}") from None


def check_trigger_dict(data: object, *, what: str = "trigger set") -> tuple[int, int, int, int]:
    """Check the outline of a trigger set's JSON form without decoding its images.

    Every field is checked (keys, format, source, a 4-integer shape within the size limits,
    labels, names, images a string no longer than the shape can need); return the shape. A
    secret file's copy is checked this way when it is read, and decoded only where it is used.
    """
    if not isinstance(data, Mapping):
        raise TriggerSetError(f"{what}: expected an object, got {type(data).__name__}")
    keys = set(data)
    if keys != _DICT_KEYS:
        missing = sorted(map(str, _DICT_KEYS - keys))
        extra = sorted(map(str, keys - _DICT_KEYS))[:5]
        raise TriggerSetError(f"{what}: missing keys {missing}, unknown keys {extra}")
    if data["format"] != TRIGGER_FORMAT:
        raise TriggerSetError(
            f"{what}: format must be {TRIGGER_FORMAT!r}, got {_shown(data['format'])}"
        )
    source = data["source"]
    if not isinstance(source, str) or source not in SOURCES:
        raise TriggerSetError(f"{what}: source must be one of {SOURCES}, got {_shown(source)}")
    shape = data["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(_is_int(v) and v >= 1 for v in shape)
    ):
        raise TriggerSetError(f"{what}: shape must be 4 positive integers, got {_shown(shape)}")
    n, c, h, w = shape
    if n > MAX_TRIGGERS:
        raise TriggerSetError(f"{what}: at most {MAX_TRIGGERS} images, shape claims {n}")
    if c * h * w > MAX_IMAGE_VALUES or n * c * h * w > MAX_TOTAL_VALUES:
        raise TriggerSetError(f"{what}: shape {shape} is too large")
    labels = data["labels"]
    if not isinstance(labels, list) or len(labels) != n:
        raise TriggerSetError(f"{what}: labels must be a list of {n} integers")
    for i, v in enumerate(labels):
        if not _is_int(v) or not 0 <= v < 2**63:
            raise TriggerSetError(f"{what}: label {i} must be an integer >= 0, got {_shown(v)}")
    names = data["names"]
    if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
        raise TriggerSetError(f"{what}: names must be a list of strings")
    expected_names = n if source == "folder" else 0
    if len(names) != expected_names:
        raise TriggerSetError(
            f"{what}: a {source} set has {expected_names} names, got {len(names)}"
        )
    images = data["images"]
    if not isinstance(images, str):
        raise TriggerSetError(f"{what}: images must be a base64 string")
    expected = n * c * h * w
    if len(images) > _max_encoded_length(expected):
        raise TriggerSetError(f"{what}: images data is longer than {expected} pixels can need")
    return int(n), int(c), int(h), int(w)


def _max_encoded_length(expected: int) -> int:
    """Longest base64 text an honest zlib encoding of `expected` bytes can have."""
    # zlib's compressBound is below this, so a longer string cannot be an honest encoding.
    limit = expected + expected // 1000 + 64
    return 4 * ((limit + 2) // 3)


def _decode_images(text: object, expected: int, what: str) -> bytes:
    """Return exactly `expected` pixel bytes from base64 zlib data, never inflating more."""
    if not isinstance(text, str):
        raise TriggerSetError(f"{what}: images must be a base64 string")
    if len(text) > _max_encoded_length(expected):
        raise TriggerSetError(f"{what}: images data is longer than {expected} pixels can need")
    try:
        compressed = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise TriggerSetError(f"{what}: images are not valid base64") from None
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(compressed, expected + 1)
    except zlib.error:
        raise TriggerSetError(f"{what}: images are not valid zlib data") from None
    if len(raw) > expected or inflater.unconsumed_tail:
        raise TriggerSetError(f"{what}: images hold more than the {expected} bytes of the shape")
    if len(raw) != expected:
        raise TriggerSetError(f"{what}: images hold {len(raw)} bytes, shape needs {expected}")
    if not inflater.eof:
        raise TriggerSetError(f"{what}: images end in a truncated zlib stream")
    if inflater.unused_data:
        raise TriggerSetError(f"{what}: images have trailing data after the zlib stream")
    return raw


# --- argument checks -----------------------------------------------------------------------------


def _check_shape(input_shape: object) -> tuple[int, int, int]:
    if (
        not isinstance(input_shape, Sequence)
        or isinstance(input_shape, str)
        or len(input_shape) != 3
        or not all(_is_int(v) and v >= 1 for v in input_shape)
    ):
        raise ConfigError(f"input_shape must be 3 positive integers (C, H, W), got {input_shape!r}")
    c, h, w = (int(v) for v in input_shape)
    if c * h * w > MAX_IMAGE_VALUES:
        raise ConfigError(f"input_shape {tuple(input_shape)} is too large for a trigger image")
    return c, h, w


def _check_num_classes(num_classes: object) -> int:
    if not _is_int(num_classes) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


# --- generation ----------------------------------------------------------------------------------


def _unit(stream: KeyedStream, n: int) -> np.ndarray:
    """Return `n` float64 values in [0, 1): the top 53 bits of big-endian uint64s times 2^-53."""
    words = np.frombuffer(stream.read(8 * n), dtype=">u8")
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Return pixel-centre coordinates y (H, 1) and x (1, W), each in (0, 1)."""
    y = ((np.arange(h, dtype=np.float64) + 0.5) / h)[:, None]
    x = ((np.arange(w, dtype=np.float64) + 0.5) / w)[None, :]
    return y, x


def _contrast_pair(u: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Two colours per channel at least 0.25 apart, from 2C unit values."""
    a = u[:c]
    b = np.mod(a + 0.25 + 0.5 * u[c : 2 * c], 1.0)
    return a[:, None, None], b[:, None, None]


def _max_cycles(h: int, w: int) -> float:
    """Most cycles across the image that still leave about 4 pixels per cycle."""
    return max(1.0, min(h, w) / 4.0)


def _field(stream: KeyedStream, c: int, h: int, w: int) -> np.ndarray:
    g = 2 + stream.uniform(7)
    values = _unit(stream, c * g * g).reshape(c, g, g)
    y, x = _grid(h, w)
    py, px = y[:, 0] * (g - 1), x[0] * (g - 1)
    y0 = np.minimum(np.floor(py).astype(np.int64), g - 2)
    x0 = np.minimum(np.floor(px).astype(np.int64), g - 2)
    ty, tx = (py - y0)[:, None], (px - x0)[None, :]
    top = values[:, y0][:, :, x0] * (1 - tx) + values[:, y0][:, :, x0 + 1] * tx
    bottom = values[:, y0 + 1][:, :, x0] * (1 - tx) + values[:, y0 + 1][:, :, x0 + 1] * tx
    return top * (1 - ty) + bottom * ty


def _stripes(stream: KeyedStream, c: int, h: int, w: int) -> np.ndarray:
    u = _unit(stream, 3 + 2 * c)
    theta, cycles, phase = math.pi * u[0], 1 + u[1] * (_max_cycles(h, w) - 1), 2 * math.pi * u[2]
    a, b = _contrast_pair(u[3:], c)
    y, x = _grid(h, w)
    wave = 0.5 + 0.5 * np.sin(
        2 * math.pi * cycles * (x * math.cos(theta) + y * math.sin(theta)) + phase
    )
    return a + (b - a) * wave[None]


def _noise(stream: KeyedStream, c: int, h: int, w: int) -> np.ndarray:
    block = 1 + stream.uniform(max(1, min(h, w) // 4))
    gh, gw = -(-h // block), -(-w // block)
    values = _unit(stream, c * gh * gw).reshape(c, gh, gw)
    return values.repeat(block, axis=1).repeat(block, axis=2)[:, :h, :w]


def _checkerboard(stream: KeyedStream, c: int, h: int, w: int) -> np.ndarray:
    cell = 1 + stream.uniform(max(1, min(h, w) // 2))
    a, b = _contrast_pair(_unit(stream, 2 * c), c)
    rows, cols = np.arange(h)[:, None] // cell, np.arange(w)[None, :] // cell
    return np.where(((rows + cols) % 2 == 1)[None], b, a)


def _rings(stream: KeyedStream, c: int, h: int, w: int) -> np.ndarray:
    u = _unit(stream, 4 + 2 * c)
    cy, cx = u[0], u[1]
    cycles, phase = 1 + u[2] * (_max_cycles(h, w) - 1), 2 * math.pi * u[3]
    a, b = _contrast_pair(u[4:], c)
    y, x = _grid(h, w)
    radius = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    wave = 0.5 + 0.5 * np.cos(2 * math.pi * cycles * radius + phase)
    return a + (b - a) * wave[None]


_PAINTERS = (_field, _stripes, _noise, _checkerboard, _rings)


def generate_triggers(
    seed: bytes, size: int, input_shape: tuple[int, int, int], num_classes: int
) -> TriggerSet:
    """Generate `size` abstract out-of-distribution images and their labels from `seed`.

    Every random value comes from `KeyedStream(seed, "B1 trigger set")`, so the set is
    byte-identical on any machine. A *unit* draw reads 8 bytes as a big-endian uint64 u and is
    (u >> 11) * 2^-53, in [0, 1). The draws, in order:

    1. the labels: `uniform(num_classes)` once per image, images 0..N-1 (independent of content);
    2. per image, in order: its kind `uniform(5)` from KINDS, then (pixel coordinates
       y = (i + 0.5) / H, x = (j + 0.5) / W; "two colours" are 2C unit draws u, a_c = u_c,
       b_c = (a_c + 0.25 + 0.5 u_{C+c}) mod 1):

       - field: grid g = 2 + uniform(7); C*g*g unit values (channel, row, column), bilinearly
         interpolated at (y (g - 1), x (g - 1));
       - stripes: 3 unit values (angle pi u0, cycles 1 + u1 (m - 1), phase 2 pi u2) and two
         colours; a + (b - a)(1 + sin(2 pi cycles (x cos angle + y sin angle) + phase)) / 2,
         where m = max(1, min(H, W) / 4);
       - noise: block = 1 + uniform(max(1, min(H, W) // 4)); C*ceil(H/block)*ceil(W/block)
         unit values (channel, row, column), each filling a block x block square;
       - checkerboard: cell = 1 + uniform(max(1, min(H, W) // 2)), two colours; a where
         (i // cell + j // cell) is even, b elsewhere;
       - rings: 4 unit values (centre y u0, centre x u1, cycles 1 + u2 (m - 1), phase 2 pi u3)
         and two colours; a + (b - a)(1 + cos(2 pi cycles r + phase)) / 2, r the distance to
         the centre.

    Values v in [0, 1] become pixels floor(v * 255 + 0.5) clipped to 0..255, in float64.
    """
    if not _is_int(size) or not 1 <= size <= MAX_TRIGGERS:
        raise ConfigError(f"size must be an integer in [1, {MAX_TRIGGERS}], got {size!r}")
    c, h, w = _check_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    if size * c * h * w > MAX_TOTAL_VALUES:
        raise ConfigError(f"{size} trigger images of shape {(c, h, w)} are too large")
    stream = KeyedStream(seed, _PURPOSE)
    labels = [stream.uniform(num_classes) for _ in range(size)]
    images = np.empty((size, c, h, w), dtype=np.uint8)
    for k in range(size):
        values = _PAINTERS[stream.uniform(len(_PAINTERS))](stream, c, h, w)
        images[k] = np.clip(np.floor(values * 255.0 + 0.5), 0, 255).astype(np.uint8)
    return TriggerSet(
        images=torch.from_numpy(images),
        labels=torch.tensor(labels, dtype=torch.int64),
        source="generated",
    )


# --- the Adi et al. folder format ----------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    """Return whether `path`, every link followed, stays inside the (resolved) folder `root`."""
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # a dangling link or a loop
        return False


def _find_labels_file(folder: Path, labels_file: str | Path | None, root: Path) -> Path:
    if labels_file is not None:
        # Named on the command line: the owner chose it, wherever it is.
        path = Path(labels_file)
        if not path.is_file():
            raise TriggerSetError(f"labels file {path} does not exist or is not a file")
        return path
    found = sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.startswith("."))
    if not found:
        raise TriggerSetError(f"trigger folder {folder} has no labels file (*.txt)")
    if len(found) > 1:
        listed = ", ".join(p.name for p in found)
        raise TriggerSetError(
            f"trigger folder {folder} has more than one labels file ({listed}); name one"
        )
    if not _inside(found[0], root):
        raise TriggerSetError(
            f"labels file {found[0]} is a link to a file outside the trigger folder; refused"
        )
    return found[0]


def _read_labels(path: Path, num_classes: int) -> list[int]:
    """Parse one integral number per line (floats such as 6.0e+00 allowed); trailing blanks ignored.

    A line that is not a label is named by its number only: the file may be any file the
    caller can read, and its content is not echoed.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_LABELS_FILE_BYTES + 1)
    except OSError as exc:
        raise TriggerSetError(f"labels file {path} cannot be read: {exc.strerror}") from None
    if len(data) > _MAX_LABELS_FILE_BYTES:
        raise TriggerSetError(f"labels file {path} is too large to be a labels file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TriggerSetError(f"labels file {path} is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    expected = f"expected one integer label in [0, {num_classes}) per line"
    labels = []
    for number, line in enumerate(lines, start=1):
        where = f"labels file {path}, line {number}"
        if not line:
            raise TriggerSetError(f"{where}: blank line ({expected})")
        if _NUMBER.fullmatch(line) is None:
            raise TriggerSetError(f"{where}: not a number ({expected})")
        try:
            value = Decimal(line)
            integral = value == value.to_integral_value()
        except InvalidOperation:
            raise TriggerSetError(f"{where}: not a number ({expected})") from None
        if not integral:
            raise TriggerSetError(f"{where}: not an integer ({expected})")
        if not 0 <= value < num_classes:
            raise TriggerSetError(f"{where}: a label outside [0, {num_classes})")
        labels.append(int(value))
    return labels


def _order_names(names: list[str], order: str, pics: Path) -> list[str]:
    if order == "lexicographic":
        return sorted(names)
    keyed: dict[int, str] = {}
    for name in sorted(names):
        stem = Path(name).stem
        if _DIGITS.fullmatch(stem) is None:
            raise TriggerSetError(f"{pics / name}: numeric order needs an integer file name stem")
        key = int(stem)
        if key in keyed:
            raise TriggerSetError(
                f"{pics}: {keyed[key]} and {name} have the same number {key} in numeric order"
            )
        keyed[key] = name
    return [keyed[k] for k in sorted(keyed)]


#: Most pixels a trigger image file may declare before it is decoded (a 4096 x 4096 photo).
MAX_SOURCE_PIXELS = 4096 * 4096


def _load_image(path: Path, c: int, h: int, w: int) -> np.ndarray:
    """Read one image as uint8 (C, H, W): convert, scale the shorter side, centre-crop."""
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if width * height > MAX_SOURCE_PIXELS:
                raise TriggerSetError(
                    f"trigger image {path} is {width}x{height}: more than {MAX_SOURCE_PIXELS} "
                    "pixels; refused before decoding"
                )
            image = opened.convert("L" if c == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise TriggerSetError(f"trigger image {path} cannot be read: {exc}") from None
    width, height = image.size
    if (width, height) != (w, h):
        # Cover the target with the aspect ratio kept, then cut the centre.
        if width * h >= height * w:
            new_w, new_h = max(w, round(width * h / height)), h
        else:
            new_w, new_h = w, max(h, round(height * w / width))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - w) // 2, (new_h - h) // 2
        image = image.crop((left, top, left + w, top + h))
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)


def load_trigger_folder(
    folder: str | Path,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    order: str = "lexicographic",
    labels_file: str | Path | None = None,
) -> TriggerSet:
    """Load an Adi et al. (2018) trigger folder: images in `pics/`, one label per line in `*.txt`.

    The i-th label belongs to the i-th file name of `pics/` in `order`: "lexicographic" (a plain
    string sort, as the original loader did) or "numeric" (by the integer stem). Every non-hidden
    regular file in `pics/` is an image, its format found from its content; it is converted to
    L (C = 1) or RGB (C = 3), its shorter side scaled (bilinear, antialiased) to cover H x W and
    the centre cut out.
    """
    c, h, w = _check_shape(input_shape)
    if c not in (1, 3):
        raise ConfigError(f"trigger folders load 1- or 3-channel images, input_shape has {c}")
    num_classes = _check_num_classes(num_classes)
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
    folder = Path(folder)
    if not folder.exists():
        raise TriggerSetError(f"trigger folder {folder} does not exist")
    if not folder.is_dir():
        raise TriggerSetError(f"trigger folder {folder} is not a directory")
    root = folder.resolve()
    pics = folder / "pics"
    if not pics.is_dir():
        raise TriggerSetError(f"trigger folder {folder} has no pics/ subfolder")
    if not _inside(pics, root):
        raise TriggerSetError(f"{pics} is a link to a folder outside {folder}; refused")
    names = []
    for entry in pics.iterdir():
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if not _inside(entry, root):
            # A link out of the folder would read (and commit to) a file the folder does not hold.
            raise TriggerSetError(f"{entry} is a link to a file outside {folder}; refused")
        names.append(entry.name)
        if len(names) > MAX_TRIGGERS:
            break
    if not names:
        raise TriggerSetError(f"{pics} holds no image files")
    if len(names) > MAX_TRIGGERS or len(names) * c * h * w > MAX_TOTAL_VALUES:
        raise TriggerSetError(
            f"{pics} holds {len(names)} images, too many for a trigger set at {(c, h, w)}"
        )
    path = _find_labels_file(folder, labels_file, root)
    labels = _read_labels(path, num_classes)
    if len(labels) != len(names):
        raise TriggerSetError(
            f"trigger folder {folder}: {len(names)} images but {len(labels)} labels in {path.name}"
        )
    ordered = _order_names(names, order, pics)
    images = np.stack([_load_image(pics / name, c, h, w) for name in ordered])
    return TriggerSet(
        images=torch.from_numpy(images),
        labels=torch.tensor(labels, dtype=torch.int64),
        source="folder",
        names=tuple(ordered),
    )
