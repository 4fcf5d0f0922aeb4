"""A small HTTP prediction server: the suspect's side of black-box verification, for testing it.

Protocol `ticketguard-predict/1` (docs/serve-protocol.md): `GET /info` describes the model,
`POST /predict` answers labels (and optionally softmax probabilities) for a JSON batch of
model-ready `inputs` or base64-encoded `images`. Request handling (`PredictionService.handle`)
is pure, so every protocol case is testable without sockets; `make_server` wraps it in an
asyncio HTTP/1.1 server (one event-loop thread for every socket, a fixed pool of worker threads
for parsing and prediction) with a listen backlog, a connection cap, deadlines for headers,
bodies and answers, and a body cap checked from `Content-Length` before a byte of the body is
read. Nothing in a request is ever executed: bodies are parsed as strict JSON and images decoded
by Pillow, and every malformed request gets a one-line JSON error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import io
import json
import math
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import nn

from ticketguard.documents import Refused, loads_strict
from ticketguard.errors import ArchitectureError, ConfigError, DatasetError
from ticketguard.version import __version__

PROTOCOL = "ticketguard-predict/1"
DEFAULT_MAX_BATCH = 1024
#: Ceiling of the body cap, whatever the model's input shape and max batch imply.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: Floor of the body cap: room for images larger than the model's input (resized server-side).
MIN_BODY_BYTES = 1024 * 1024
#: JSON characters one float may take in `inputs` ("-1.1754943508222875e-38" and a separator).
BYTES_PER_NUMBER = 26
#: PNG signature, chunks and zlib framing of one image, over its raw pixels (generous).
PNG_OVERHEAD_BYTES = 1024
#: Larger images are refused before decoding (a small PNG can inflate to gigabytes).
MAX_IMAGE_PIXELS = 40_000_000
#: An image may hold up to this many times the model's input pixels (at least 4 megapixels) ...
IMAGE_PIXEL_FACTOR = 64
#: ... and a request up to this many images' worth of decoded pixels in all.
REQUEST_IMAGE_BUDGET = 16
#: Requests parsed and predicted at once; further ones wait, so a flood cannot multiply the work.
MAX_CONCURRENT_REQUESTS = 4
#: Pillow decoders a request may use: raster formats decoded in-process (never, e.g., EPS,
#: which Pillow hands to Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")

# --- transport limits (docs/serve-protocol.md, "Limits") -----------------------------------------
#: Connections the kernel queues before they are accepted: a burst of clients waits, not resets.
BACKLOG = 1024
#: Connections open at once; one more is answered 503 and closed (each costs memory, no thread).
MAX_CONNECTIONS = 512
#: Seconds from a connection's opening (or its previous answer) until a request's headers are
#: complete: closes idle kept-alive connections and slowloris clients dripping header bytes.
HEADER_TIMEOUT = 10.0
#: Seconds the body may take to arrive once the headers are in.
BODY_TIMEOUT = 30.0
#: Seconds a request may wait for a worker before it is answered 503 (retry later).
QUEUE_TIMEOUT = 30.0
#: Seconds the client may take to read the answer.
SEND_TIMEOUT = 30.0
#: Longest request line plus headers, and most header lines.
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 64
#: Request bodies held in memory at once (read, queued or being parsed); further ones wait.
BODY_BUFFER_BYTES = 256 * 1024 * 1024
#: Bodies are read (and counted against BODY_BUFFER_BYTES) in pieces of at most this size.
BODY_CHUNK_BYTES = 1024 * 1024

#: Pillow mode that gives an image the model's channel count.
_PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
#: Methods each path answers; any other method on a known path is a 405.
ROUTES: dict[str, tuple[str, ...]] = {"/": ("GET",), "/info": ("GET",), "/predict": ("POST",)}
_FIELDS = ("inputs", "images", "probabilities")


class _BadRequest(Exception):
    """A request the client must fix; the message is sent back as the one-line error."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = int(status)


def normalize_pixels(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Turn uint8 (N, C, H, W) pixels into float32 model inputs: `(pixel / 255 - mean) / std`."""
    shape = (1, len(mean), 1, 1)
    x = images.to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32).view(shape)
    return x.sub_(mean_t).div_(std_t)


def implied_body_bytes(input_shape: tuple[int, int, int], max_batch: int) -> int:
    """The body cap a model's input shape and max batch imply.

    The larger of a full batch of `inputs` (`BYTES_PER_NUMBER` per value) and a full batch of
    base64 PNG files at the model's size stored uncompressed, within
    [`MIN_BODY_BYTES`, `DEFAULT_MAX_BODY_BYTES`].
    """
    channels, height, width = input_shape
    values = channels * height * width
    as_numbers = values * BYTES_PER_NUMBER
    as_png = math.ceil((values + height + PNG_OVERHEAD_BYTES) * 4 / 3) + 4
    wanted = max_batch * max(as_numbers, as_png) + 4096
    return min(DEFAULT_MAX_BODY_BYTES, max(MIN_BODY_BYTES, wanted))


def _loads(body: bytes) -> Any:
    """Parse a request body with the rules of `ticketguard.documents.parse_json` for numbers.

    UTF-8 only; duplicate keys, NaN/Infinity and integers of more than `MAX_INT_DIGITS` digits
    are refused while parsing. Floats get no per-number hook (that would cost a Python call per
    value): an overflowing literal such as 1e400 becomes infinity, which `_tensor_inputs`
    refuses as non-finite. Depth needs no separate check: `inputs` must nest exactly 4 deep.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadRequest("the body is not valid JSON (not UTF-8)") from None
    try:
        return loads_strict(text, check_floats=False)
    except Refused as exc:
        raise _BadRequest(f"the body is refused: {exc}") from None
    except (ValueError, RecursionError):
        raise _BadRequest("the body is not valid JSON") from None


#: JSON values `inputs` may hold: numbers only (`bool` is its own type, so true/false are refused).
_NUMBER_TYPES = frozenset({float, int})


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else "no message"
    return f"{type(exc).__name__}: {first[:limit]}"


class PredictionService:
    """A model behind the `ticketguard-predict/1` protocol: validates requests, answers labels."""

    def __init__(
        self,
        model: nn.Module,
        *,
        input_shape: tuple[int, int, int],
        normalization: tuple[Sequence[float], Sequence[float]] | None,
        device: torch.device,
        description: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_body_bytes: int | None = None,
        architecture: str | None = None,
    ):
        shape = tuple(input_shape)
        if len(shape) != 3 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
        ):
            raise ConfigError(f"input_shape must be three positive integers (C, H, W), got {shape}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_body_bytes is None and len(shape) == 3:
            max_body_bytes = implied_body_bytes(shape, max_batch)  # type: ignore[arg-type]
        if max_body_bytes is None or max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be positive, got {max_body_bytes!r}")
        self.input_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.normalization = self._check_normalization(normalization, shape[0])
        self.device = device
        self.description = description
        self.architecture = architecture
        self.max_batch = max_batch
        self.max_body_bytes = int(max_body_bytes)
        self.model = model.to(device).eval()
        self._lock = threading.Lock()
        self._work = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        pixels = shape[1] * shape[2]
        self.max_image_pixels = min(MAX_IMAGE_PIXELS, max(4_000_000, IMAGE_PIXEL_FACTOR * pixels))
        self.max_request_pixels = REQUEST_IMAGE_BUDGET * self.max_image_pixels
        self.num_classes = self._probe()

    @staticmethod
    def _check_normalization(
        normalization: tuple[Sequence[float], Sequence[float]] | None, channels: int
    ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        if normalization is None:
            return None
        mean, std = (tuple(float(v) for v in part) for part in normalization)
        if len(mean) != channels or len(std) != channels:
            raise DatasetError(
                f"the normalization has {len(mean)} mean and {len(std)} std values but the model "
                f"takes {channels} channel(s)"
            )
        if not all(math.isfinite(v) for v in mean) or not all(
            math.isfinite(v) and v > 0 for v in std
        ):
            raise ConfigError(f"normalization must be finite with std > 0, got {mean}, {std}")
        return mean, std

    def _probe(self) -> int:
        """Run one zero input through the model: it must take the shape and answer (1, K) logits."""
        try:
            logits = self._logits(torch.zeros((1, *self.input_shape)))
        except Exception as exc:  # noqa: BLE001 - any failure means the shape does not fit
            raise ArchitectureError(
                f"{self.description}: the model cannot take inputs of shape "
                f"{'x'.join(map(str, self.input_shape))} ({_one_line(exc)})"
            ) from None
        if logits.dim() != 2 or logits.shape[0] != 1 or logits.shape[1] < 1:
            raise ArchitectureError(
                f"{self.description}: the model answers shape {tuple(logits.shape)}, "
                "not (batch, classes) logits"
            )
        return int(logits.shape[1])

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        from ticketguard.tickets.training import logits_of

        with self._lock, torch.inference_mode():
            return logits_of(self.model(inputs.to(self.device, torch.float32))).float()

    @property
    def accepts_images(self) -> bool:
        return self.normalization is not None and self.input_shape[0] in _PIL_MODES

    def predict(self, inputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Return int64 labels (N,) and float32 softmax probabilities (N, K) for model-ready inputs."""
        if inputs.dim() != 4 or tuple(inputs.shape[1:]) != self.input_shape:
            raise ConfigError(
                f"inputs must have shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(inputs.shape)}"
            )
        labels, probs = [], []
        for chunk in inputs.split(self.max_batch):
            logits = self._logits(chunk)
            if not torch.isfinite(logits).all():
                raise ArithmeticError("the model produced non-finite scores")
            labels.append(logits.argmax(dim=1).cpu())
            probs.append(torch.softmax(logits, dim=1).cpu())
        return (
            torch.cat(labels).numpy().astype(np.int64),
            torch.cat(probs).numpy().astype(np.float32),
        )

    def info(self) -> dict[str, Any]:
        """Describe the model and what `/predict` accepts (the `GET /info` answer)."""
        norm = self.normalization
        return {
            "protocol": PROTOCOL,
            "model": self.description,
            "architecture": self.architecture,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "accepts": ["inputs", "images"] if self.accepts_images else ["inputs"],
            "max_batch": self.max_batch,
            "max_body_bytes": self.max_body_bytes,
            "normalization": None
            if norm is None
            else {"mean": list(norm[0]), "std": list(norm[1])},
        }

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """Answer one request: (HTTP status, JSON-ready object). Never raises for a bad request."""
        route = urlsplit(path).path.rstrip("/") or "/"
        allowed = ROUTES.get(route)
        if allowed is None:
            return 404, {"error": f"no such path {route[:100]!r} (use GET /info or POST /predict)"}
        if method not in allowed:
            return 405, {
                "error": f"{route} answers {' and '.join(allowed)} only, not {method[:20]}"
            }
        if method == "GET":
            return 200, self.info()
        if len(body) > self.max_body_bytes:
            return 413, {"error": f"the body is over the limit of {self.max_body_bytes} bytes"}
        with self._work:
            try:
                inputs, with_probs = self._parse_predict(body)
            except _BadRequest as exc:
                return exc.status, {"error": str(exc)}
            try:
                labels, probs = self.predict(inputs)
            except Exception as exc:  # noqa: BLE001 - a model failure is the server's fault: 500
                return 500, {"error": f"the model failed ({_one_line(exc)})"}
        answer: dict[str, Any] = {"labels": labels.tolist()}
        if with_probs:
            answer["probabilities"] = probs.tolist()
        return 200, answer

    # --- request parsing -------------------------------------------------------------------------

    def _parse_predict(self, body: bytes) -> tuple[torch.Tensor, bool]:
        if not body.strip():
            raise _BadRequest("the request has no body (send a JSON object)")
        request = _loads(body)
        if not isinstance(request, dict):
            raise _BadRequest(f"the body must be a JSON object, not {_json_type(request)}")
        unknown = sorted(str(k) for k in request if k not in _FIELDS)
        if unknown:
            raise _BadRequest(f"unknown field {unknown[0][:50]!r} (known: {', '.join(_FIELDS)})")
        with_probs = request.get("probabilities", False)
        if not isinstance(with_probs, bool):
            raise _BadRequest("'probabilities' must be true or false")
        given = [k for k in ("inputs", "images") if k in request]
        if len(given) != 1:
            raise _BadRequest("give exactly one of 'inputs' and 'images'")
        field = given[0]
        batch = request[field]
        if not isinstance(batch, list):
            raise _BadRequest(f"'{field}' must be a list, not {_json_type(batch)}")
        if not batch:
            raise _BadRequest(f"'{field}' is empty")
        if len(batch) > self.max_batch:
            raise _BadRequest(
                f"the batch has {len(batch)} samples, more than the limit of {self.max_batch}"
            )
        if field == "inputs":
            return self._tensor_inputs(batch), with_probs
        return self._image_inputs(batch), with_probs

    def _tensor_inputs(self, batch: list[Any]) -> torch.Tensor:
        expected = f"(N, {', '.join(map(str, self.input_shape))})"
        bad = f"'inputs' must be nested lists of numbers shaped {expected}"
        # Check the nesting and every value's type first, so a huge, ragged or mistyped list
        # (booleans, strings, null, objects) is refused before a tensor is built.
        channels, height, width = self.input_shape
        numbers = _NUMBER_TYPES
        for sample in batch:
            if type(sample) is not list or len(sample) != channels:
                raise _BadRequest(bad)
            for plane in sample:
                if type(plane) is not list or len(plane) != height:
                    raise _BadRequest(bad)
                for row in plane:
                    if type(row) is not list or len(row) != width:
                        raise _BadRequest(bad)
                    if not numbers.issuperset(map(type, row)):
                        raise _BadRequest(f"{bad} (not booleans, strings, null or objects)")
        try:
            inputs = torch.tensor(batch, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise _BadRequest(
                f"'inputs' must be nested lists of numbers shaped {expected}"
            ) from None
        if inputs.dim() != 4 or tuple(inputs.shape[1:]) != self.input_shape:
            raise _BadRequest(f"'inputs' has shape {tuple(inputs.shape)}, expected {expected}")
        if not torch.isfinite(inputs).all():
            raise _BadRequest("'inputs' holds non-finite numbers (NaN, Infinity or overflow)")
        return inputs

    def _image_inputs(self, batch: list[Any]) -> torch.Tensor:
        if self.normalization is None:
            raise _BadRequest(
                "this server does not know the model's pixel normalization; send 'inputs'"
            )
        if not self.accepts_images:
            raise _BadRequest(
                f"images cannot be converted to {self.input_shape[0]} channels; send 'inputs'"
            )
        budget = [self.max_request_pixels]
        pixels = np.stack([self._decode_image(i, item, budget) for i, item in enumerate(batch)])
        return normalize_pixels(torch.from_numpy(pixels), *self.normalization)

    def _decode_image(self, index: int, item: Any, budget: list[int]) -> np.ndarray:
        """Decode one base64 image file to uint8 (C, H, W) at the model's size and channel count."""
        from PIL import Image, UnidentifiedImageError

        channels, height, width = self.input_shape
        if not isinstance(item, str):
            raise _BadRequest(f"image {index} is {_json_type(item)}, not a base64 string")
        try:
            raw = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise _BadRequest(f"image {index} is not valid base64") from None
        try:
            with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as img:
                if img.width * img.height > self.max_image_pixels:
                    raise _BadRequest(
                        f"image {index} is {img.width}x{img.height}, over the limit of "
                        f"{self.max_image_pixels} pixels"
                    )
                budget[0] -= img.width * img.height
                if budget[0] < 0:
                    raise _BadRequest(
                        f"the images hold more than {self.max_request_pixels} pixels in all; "
                        "send fewer or smaller ones per request"
                    )
                img = img.convert(_PIL_MODES[channels])
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except _BadRequest:
            raise
        except UnidentifiedImageError:
            raise _BadRequest(
                f"image {index} is not a {', '.join(IMAGE_FORMATS)} file Pillow can read"
            ) from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types on hostile files
            raise _BadRequest(f"image {index} cannot be decoded ({_one_line(exc, 120)})") from None
        array = array.reshape(height, width, channels)
        return np.ascontiguousarray(array.transpose(2, 0, 1))


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return "a list" if isinstance(value, list) else "an object"


# --- transport ---------------------------------------------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_TARGET = re.compile(rb"[\x21-\x7e]{1,8192}")
_LENGTH = re.compile(rb"[0-9]{1,18}")


class _Refusal(Exception):
    """A request refused while reading it: answered with `status`, then the connection closes."""

    def __init__(self, status: int, message: str, headers: tuple[str, ...] = ()):
        super().__init__(message)
        self.status = status
        self.headers = headers


class _Request:
    __slots__ = ("method", "target", "version", "headers", "keep_alive")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, list[str]]):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        tokens = {t.strip().lower() for v in headers.get("connection", ()) for t in v.split(",")}
        self.keep_alive = version == "HTTP/1.1" and "close" not in tokens


def _parse_head(head: bytes) -> _Request:
    """Parse a request line and headers (CRLF-terminated, as read), strictly; _Refusal if bad."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise _Refusal(400, "malformed request line")
    version = parts[2]
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version):
            raise _Refusal(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        raise _Refusal(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise _Refusal(431, f"more than {MAX_HEADERS} header lines")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _Refusal(400, "malformed header line")
        if b"\n" in value or b"\r" in value or b"\x00" in value:
            # A bare LF is a line end to some proxies: two readings of one request (smuggling).
            raise _Refusal(400, "a header value holds a bare CR, LF or NUL")
        headers.setdefault(name.decode("ascii").lower(), []).append(
            value.strip(b" \t").decode("latin-1")
        )
    return _Request(parts[0].decode("ascii"), parts[1].decode("ascii"), version.decode(), headers)


def _body_length(request: _Request, limit: int) -> int:
    """The announced body length, checked against `limit` before any of the body is read."""
    if "transfer-encoding" in request.headers:
        raise _Refusal(411, "send the body with a Content-Length (no chunked bodies)")
    values = request.headers.get("content-length", [])
    if len(values) > 1:
        raise _Refusal(400, "more than one Content-Length header")
    if not values:
        return 0
    raw = values[0].encode("latin-1")
    if not _LENGTH.fullmatch(raw):
        raise _Refusal(400, "the Content-Length header is not a byte count")
    length = int(raw)
    if length > limit:
        raise _Refusal(413, f"the body is over the limit of {limit} bytes")
    return length


class _Busy(Exception):
    """The bodies being read already hold the whole body budget: answer 503."""


class _ByteBudget:
    """Bytes of request bodies held at once, counted as they arrive (all on the event loop)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def try_acquire(self, n: int) -> bool:
        """Take `n` bytes if they fit now (or none are held). Never waits: bodies that arrive
        piece by piece must not wait on each other, or partly read bodies could block one
        another; a body that does not fit is answered 503."""
        if self.used and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n


_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, formatdate(now, usegmt=True)]
    return _date_cache[1]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _encode(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def _response(
    status: int, data: bytes, *, close: bool, head_only: bool = False, extra: Sequence[str] = ()
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_phrase(status)}",
        f"Server: ticketguard/{__version__}",
        f"Date: {_http_date()}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        *extra,
    ]
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + data


class PredictionServer:
    """An asyncio HTTP/1.1 server bound to one PredictionService.

    One event-loop thread owns every socket (idle or slow connections cost no thread); requests
    to `/predict` are parsed and predicted by a pool of `workers` threads. The listening socket
    is bound on construction (OSError if it cannot be); `serve_forever` runs the loop in the
    calling thread until `shutdown` (from another thread), Ctrl-C or a signal handler's exception.
    """

    def __init__(
        self,
        address: tuple[str, int],
        service: PredictionService,
        *,
        verbose: bool = False,
        backlog: int = BACKLOG,
        max_connections: int = MAX_CONNECTIONS,
        workers: int = MAX_CONCURRENT_REQUESTS,
        header_timeout: float = HEADER_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        queue_timeout: float = QUEUE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        body_buffer_bytes: int = BODY_BUFFER_BYTES,
    ):
        self.service = service
        self.verbose = verbose
        self.backlog = backlog
        self.max_connections = max_connections
        self.workers = workers
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.queue_timeout = queue_timeout
        self.send_timeout = send_timeout
        self.body_buffer_bytes = max(body_buffer_bytes, service.max_body_bytes)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.create_server(address, family=family, backlog=backlog)
        self.server_address = self.socket.getsockname()
        #: Connections open now, and refused so far because `max_connections` were open.
        self.connections = 0
        self.refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_asked = False
        self._guard = threading.Lock()
        self._running = threading.Event()
        self._done = threading.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def url(self) -> str:
        """The base URL clients use (the real port, also when port 0 was asked for)."""
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # --- life cycle ------------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until `shutdown()`; `poll_interval` is accepted for http.server compatibility."""
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._loop_error)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.workers, thread_name_prefix="ticketguard-predict"
        )
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._done.set()
            if not loop.is_running():
                with contextlib.suppress(Exception):
                    loop.close()

    async def _serve(self) -> None:
        with self._guard:
            self._stop = asyncio.Event()
            if self._stop_asked:
                return
        self._slots = asyncio.Semaphore(self.workers)
        self._budget = _ByteBudget(self.body_buffer_bytes)
        server = await asyncio.start_server(
            self._connection, sock=self.socket, backlog=self.backlog, limit=MAX_HEADER_BYTES
        )
        self._running.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2)

    def request_stop(self) -> None:
        """Ask `serve_forever` to return, without waiting: safe in a signal handler."""
        loop, stop = self._loop, self._stop
        self._stop_asked = True
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(stop.set)

    def shutdown(self) -> None:
        """Stop `serve_forever` (called from another thread) and wait until it has returned."""
        with self._guard:
            self._stop_asked = True
            loop, stop = self._loop, self._stop
        if loop is None:
            return
        if stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(stop.set)
        self._done.wait(10)

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Transport noise (a client resetting mid-answer) is not worth a traceback.
        if self.verbose:
            exc = context.get("exception")
            detail = _one_line(exc) if exc is not None else context.get("message", "?")
            print(f"server: {detail}", file=sys.stderr, flush=True)

    # --- one connection --------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
        if self.connections >= self.max_connections:
            self.refused += 1
            message = f"the server has {self.max_connections} connections open; retry later"
            writer.write(
                _response(503, _encode({"error": message}), close=True, extra=("Retry-After: 1",))
            )
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.drain()
            writer.transport.abort()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clean = True
        try:
            while await self._exchange(reader, writer, client):
                pass
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            clean = False  # the client went away or stalled: nobody is left to answer
        finally:
            self.connections -= 1
            if task is not None:
                self._tasks.discard(task)
            if clean:
                writer.close()
            else:  # drop unsent data now: a client that does not read must not hold memory
                writer.transport.abort()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str
    ) -> bool:
        """Read one request and answer it; True if the connection stays open for another."""
        try:
            async with asyncio.timeout(self.header_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._send(writer, client, None, 431, {"error": "the headers are too large"})
            return False
        except (asyncio.IncompleteReadError, TimeoutError):
            return False  # closed, idle past the deadline, or dripping its headers (slowloris)
        started = time.perf_counter()
        try:
            request = _parse_head(head)
            length = _body_length(request, self.service.max_body_bytes)
            expect = [v.lower() for v in request.headers.get("expect", ())]
            if expect and expect != ["100-continue"]:
                raise _Refusal(417, "only 'Expect: 100-continue' is understood")
        except _Refusal as refusal:
            payload = {"error": str(refusal)}
            await self._send(writer, client, None, refusal.status, payload, started=started)
            return False
        method = "GET" if request.method == "HEAD" else request.method
        body = b""
        if length and expect and request.version == "HTTP/1.1":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        reserved = 0
        try:
            if length:
                # The budget is taken as the bytes arrive, not when they are announced: a client
                # that announces a large body and sends nothing holds nothing.
                parts = []
                async with asyncio.timeout(self.body_timeout):
                    while reserved < length:
                        chunk = await reader.read(min(length - reserved, BODY_CHUNK_BYTES))
                        if not chunk:
                            raise asyncio.IncompleteReadError(b"", length)
                        if not self._budget.try_acquire(len(chunk)):
                            raise _Busy
                        reserved += len(chunk)
                        parts.append(chunk)
                body = b"".join(parts)
                del parts
            if method == "POST":
                status, data, extra = await self._work(method, request.target, body)
            else:  # GET /info, 404s and 405s: cheap, answered on the loop
                status, payload = self.service.handle(method, request.target, body)
                data, extra = _encode(payload), self._allow(status, request.target)
        except TimeoutError:
            late = {"error": f"the body did not arrive within {self.body_timeout:g} s"}
            await self._send(writer, client, request, 408, late, started=started)
            return False
        except _Busy:
            busy = {"error": "the server is busy; retry later"}
            extra = ("Retry-After: 1",)
            await self._send(writer, client, request, 503, busy, started=started, extra=extra)
            return False
        finally:
            if reserved:
                self._budget.release(reserved)
        await self._send_data(writer, client, request, status, data, started, extra=extra)
        return request.keep_alive

    async def _work(self, method: str, target: str, body: bytes) -> tuple[int, bytes, tuple]:
        """Run `service.handle` on a worker thread, waiting at most `queue_timeout` for one."""
        try:
            async with asyncio.timeout(self.queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            data = _encode({"error": "the server is busy; retry later"})
            return 503, data, ("Retry-After: 1",)
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._handle, method, target, body)
        finally:
            self._slots.release()

    def _handle(self, method: str, target: str, body: bytes) -> tuple[int, bytes, tuple]:
        try:
            status, payload = self.service.handle(method, target, body)
            return status, _encode(payload), self._allow(status, target)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 instead of dropping the client
            return 500, _encode({"error": f"internal error ({_one_line(exc)})"}), ()

    @staticmethod
    def _allow(status: int, target: str) -> tuple[str, ...]:
        if status != 405:
            return ()
        route = urlsplit(target).path.rstrip("/") or "/"  # the path handle() judged
        return (f"Allow: {', '.join(ROUTES.get(route, ()))}",)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        client: str,
        request: _Request | None,
        status: int,
        payload: Mapping[str, Any],
        *,
        started: float | None = None,
        close: bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        data = _encode(payload)
        await self._send_data(
            writer, client, request, status, data, started, close=close, extra=extra
        )

    async def _send_data(
        self,
        writer: asyncio.StreamWriter,
        client: str,
        request: _Request | None,
        status: int,
        data: bytes,
        started: float | None,
        *,
        close: bool | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        if close is None:
            close = request is None or not request.keep_alive
        head_only = request is not None and request.method == "HEAD"
        writer.write(_response(status, data, close=close, head_only=head_only, extra=extra))
        async with asyncio.timeout(self.send_timeout):
            await writer.drain()
        if self.verbose:
            self._log(client, request, status, data, started)

    @staticmethod
    def _log(
        client: str, request: _Request | None, status: int, data: bytes, started: float | None
    ) -> None:
        ms = 1000 * (time.perf_counter() - started) if started is not None else 0.0
        note = ""
        if status != 200 and len(data) < 1000:
            with contextlib.suppress(ValueError):
                note = f" ({json.loads(data).get('error', '')})"
        elif data.startswith(b'{"labels":['):
            note = f" ({data.count(b',', 0, data.find(b']')) + 1} labels)"
        method = request.method if request else "-"
        target = request.target[:80] if request else ""
        print(f"{client} {method} {target} {status} {ms:.1f} ms{note}", file=sys.stderr, flush=True)


def make_server(
    service: PredictionService, host: str, port: int, *, verbose: bool = False, **limits: Any
) -> PredictionServer:
    """Bind a server for `service` (port 0 picks a free port); OSError if it cannot.

    `limits` overrides PredictionServer's (backlog, max_connections, workers, header_timeout,
    body_timeout, queue_timeout, send_timeout, body_buffer_bytes).
    """
    return PredictionServer((host, port), service, verbose=verbose, **limits)


def service_from_file(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    device: str = "auto",
    max_batch: int = DEFAULT_MAX_BATCH,
) -> PredictionService:
    """Load any model file ticketguard reads (no code from it runs) behind a PredictionService.

    The architecture is the file's own or `arch` (an import path only when given here). The
    input shape is the file's recorded `input_shape`, else the dataset's (`dataset`, else the one
    the file records); the pixel normalization comes from that dataset, and without one only
    model-ready `inputs` are accepted.
    """
    from ticketguard.tickets.data import dataset_info, pixel_normalization
    from ticketguard.tickets.loading import load_checkpoint, load_model
    from ticketguard.tickets.training import resolve_device

    torch_device = resolve_device(device)
    loaded = load_checkpoint(path)
    model = load_model(loaded, arch, arch_kwargs=arch_kwargs, allow_import=arch is not None)
    meta = loaded.metadata
    recorded = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
    spec = dataset or recorded.get("name")
    shape = meta.get("input_shape")
    if shape is None and spec is not None:
        shape = dataset_info(spec)[1]
    if shape is None:
        raise ConfigError(
            f"{loaded.path}: the file records no input shape or dataset; pass --dataset"
        )
    normalization = None
    if spec is not None:
        seed = recorded.get("split_seed", 0) if spec == recorded.get("name") else 0
        normalization = pixel_normalization(spec, split_seed=seed)
    name = arch or loaded.architecture
    return PredictionService(
        model,
        input_shape=tuple(shape),  # type: ignore[arg-type]
        normalization=normalization,
        device=torch_device,
        description=f"{Path(path).name} ({name})",
        max_batch=max_batch,
        architecture=name,
    )
