"""A small HTTP prediction server: the suspect's side of black-box verification, for testing it.

Protocol `ticketguard-predict/1` (docs/serve-protocol.md): `GET /info` describes the model,
`POST /predict` answers labels (and optionally softmax probabilities) for a JSON batch of
model-ready `inputs` or base64-encoded `images`. Request handling (`PredictionService.handle`)
is pure, so every protocol case is testable without sockets; `make_server` wraps it in a
threading `http.server`. Nothing in a request is ever executed: bodies are parsed as JSON and
images decoded by Pillow, and every malformed request gets a one-line JSON error.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import nn

from ticketguard.errors import ArchitectureError, ConfigError, DatasetError

PROTOCOL = "ticketguard-predict/1"
DEFAULT_MAX_BATCH = 1024
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
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
#: Seconds a connection may stay silent (mid-request or idle between requests) before it is closed.
CONNECTION_TIMEOUT = 60.0

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
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        architecture: str | None = None,
    ):
        shape = tuple(input_shape)
        if len(shape) != 3 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
        ):
            raise ConfigError(f"input_shape must be three positive integers (C, H, W), got {shape}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_body_bytes < 1:
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
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            raise _BadRequest("the body is not valid JSON") from None
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
        # Check the nesting first, so a huge or ragged list is refused before a tensor is built.
        channels, height, width = self.input_shape
        for sample in batch:
            if not isinstance(sample, list) or len(sample) != channels:
                raise _BadRequest(f"'inputs' must be nested lists of numbers shaped {expected}")
            for plane in sample:
                if not isinstance(plane, list) or len(plane) != height:
                    raise _BadRequest(f"'inputs' must be nested lists of numbers shaped {expected}")
                for row in plane:
                    if not isinstance(row, list) or len(row) != width:
                        raise _BadRequest(
                            f"'inputs' must be nested lists of numbers shaped {expected}"
                        )
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


class PredictionServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one PredictionService."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], service: PredictionService, *, verbose: bool = False
    ):
        self.service = service
        self.verbose = verbose
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on a machine without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    @property
    def url(self) -> str:
        """The base URL clients use (the real port, also when port 0 was asked for)."""
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer is not worth a traceback on the operator's terminal.
        if self.verbose:
            exc = sys.exc_info()[1]
            detail = _one_line(exc) if exc is not None else "unknown error"
            print(f"{client_address[0]} connection error: {detail}", file=sys.stderr, flush=True)


class _Handler(BaseHTTPRequestHandler):
    server: PredictionServer
    protocol_version = "HTTP/1.1"  # keep-alive: a client sending many batches reuses its socket
    timeout = CONNECTION_TIMEOUT
    # Headers and body go out in two writes; with Nagle's algorithm the body would wait for the
    # client's delayed ACK (~40 ms a request on Linux).
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        from ticketguard import __version__

        return f"ticketguard/{__version__}"

    def _read_body(self) -> bytes | None:
        """Read the body; on a framing problem answer it here and return None.

        After a framing problem the rest of the stream cannot be trusted, so the connection closes.
        """
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            self._answer(411, {"error": "send the body with a Content-Length (no chunked bodies)"})
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._answer(400, {"error": "the Content-Length header is not a byte count"})
            return None
        limit = self.server.service.max_body_bytes
        if length > limit:
            self.close_connection = True
            self._answer(413, {"error": f"the body is over the limit of {limit} bytes"})
            return None
        try:
            body = self.rfile.read(length)
        except OSError:  # timed out or reset mid-body: nobody is left to answer
            self.close_connection = True
            return None
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def _dispatch(self) -> None:
        self._started = time.perf_counter()
        body = self._read_body()
        if body is None:
            return
        method = "GET" if self.command == "HEAD" else self.command
        status, payload = self.server.service.handle(method, self.path, body)
        self._answer(status, payload)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _answer(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            route = urlsplit(self.path).path.rstrip("/") or "/"  # the path handle() judged
            self.send_header("Allow", ", ".join(ROUTES.get(route, ())))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        if self.server.verbose:
            started = getattr(self, "_started", time.perf_counter())
            ms = 1000 * (time.perf_counter() - started)
            note = f" ({payload['error']})" if "error" in payload else ""
            if "labels" in payload:
                note = f" ({len(payload['labels'])} labels)"
            print(
                f"{self.client_address[0]} {self.command or '-'} {getattr(self, 'path', '')[:80]} "
                f"{status} "
                f"{ms:.1f} ms{note}",
                file=sys.stderr,
                flush=True,
            )

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Errors found by http.server itself (bad request line, unknown method) answer JSON too.
        self.close_connection = True
        self._started = time.perf_counter()
        if self.request_version == "HTTP/0.9":
            # An unparsable request line leaves http.server in HTTP/0.9 mode, which sends no
            # status line: answer as HTTP/1.0 so the client sees the error.
            self.request_version = "HTTP/1.0"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = f"HTTP {code}"
        self._answer(code, {"error": message or phrase})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _answer logs one line per request when verbose

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            print(f"{self.client_address[0]} {format % args}", file=sys.stderr, flush=True)


def make_server(
    service: PredictionService, host: str, port: int, *, verbose: bool = False
) -> PredictionServer:
    """Bind a threading HTTP server for `service` (port 0 picks a free port); OSError if it cannot."""
    return PredictionServer((host, port), service, verbose=verbose)


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
