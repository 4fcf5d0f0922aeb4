"""Query a suspect model for labels: a prediction endpoint, a local model, or a Python function.

This is the transport of black-box verification (method §4): it sends the trigger inputs to the
suspect in batches and returns the labels it answers; counting hits and judging them is done
elsewhere. Every way a suspect can fail (down, too slow, an unreadable or wrong-sized answer) is
an `EndpointError` with one line that names the suspect.

A suspect answers one batch at a time: `predict(inputs, images)` gets the same samples twice,
`inputs` float32 (n, C, H, W) ready for the model and `images` uint8 (n, C, H, W) pixels, and uses
whichever it needs (an endpoint taking PNG files sends the pixels).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import importlib
import io
import json
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
from torch import nn

from ticketguard.documents import parse_json
from ticketguard.errors import ConfigError, EndpointError
from ticketguard.version import __version__

DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: Largest `GET /info` answer read (a real one is under 1 KiB).
MAX_INFO_BYTES = 1024 * 1024
#: Values of a server-sent list shown in a message before "... (N values)".
SHOWN_VALUES = 4
SEND_MODES = ("tensor", "png")
#: Labels beyond this magnitude cannot be class indices (and would not fit int64 safely).
_LABEL_LIMIT = 2**62
_PNG_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


@runtime_checkable
class Suspect(Protocol):
    """A model that answers labels for one batch of samples."""

    description: str

    def predict(self, inputs: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        """Return int64 labels (n,) for float32 `inputs` and the same samples as uint8 `images`."""
        ...


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else "no message"
    return f"{type(exc).__name__}: {first[:limit]}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _labels_from_answer(source: str, answer: Any, n: int) -> np.ndarray:
    """Turn labels (n,) or scores (n, K) (tensor, array or list) into int64 labels, or refuse."""
    if isinstance(answer, torch.Tensor):
        tensor = answer.detach().cpu()
        array = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    else:
        try:
            array = np.asarray(answer)
        except (ValueError, TypeError):
            raise EndpointError(f"{source}: answered a ragged or unreadable array") from None
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise EndpointError(f"{source}: answered {array.dtype} values, not labels or scores")
    if array.ndim == 2 and array.shape[1:] == (1,):
        # A column of labels, not scores for a single class (whose argmax would always be 0).
        array = array[:, 0]
    if array.ndim == 2:
        if array.shape[0] != n or array.shape[1] < 2:
            raise EndpointError(f"{source}: answered scores of shape {array.shape} for {n} inputs")
        if not np.isfinite(array).all():
            raise EndpointError(f"{source}: answered non-finite scores")
        return array.argmax(axis=1).astype(np.int64)
    if array.ndim != 1 or array.shape[0] != n:
        raise EndpointError(
            f"{source}: answered an array of shape {array.shape} for {n} inputs "
            f"(expected {n} labels or ({n}, classes) scores)"
        )
    if np.issubdtype(array.dtype, np.floating):
        if not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise EndpointError(f"{source}: answered labels that are not integers")
    if n and np.abs(array).max() >= _LABEL_LIMIT:
        raise EndpointError(f"{source}: answered labels out of range")
    return array.astype(np.int64)


class ModelSuspect:
    """A local torch model as a suspect: the argmax of its logits."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str = "cpu",
        description: str = "local model",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.description = description

    def describe(self) -> str:
        return self.description

    def predict(self, inputs: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        from ticketguard.tickets.training import logits_of

        try:
            with torch.inference_mode():
                logits = logits_of(self.model(inputs.to(self.device, torch.float32)))
        except Exception as exc:  # noqa: BLE001 - the suspect's failure, reported in one line
            raise EndpointError(
                f"{self.description}: the model failed ({_one_line(exc)})"
            ) from None
        return _labels_from_answer(self.description, logits, len(inputs))


class CallableSuspect:
    """A Python function as a suspect: it gets the float batch, returns labels or scores."""

    def __init__(self, function: Callable[[torch.Tensor], Any], description: str | None = None):
        if not callable(function):
            raise ConfigError(f"{function!r} is not callable")
        self.function = function
        self.description = description or getattr(function, "__qualname__", repr(function))

    @classmethod
    def from_spec(cls, spec: str) -> CallableSuspect:
        """Import `package.module:function` (this runs that module's code: the user named it)."""
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ConfigError(f"{spec!r} is not package.module:function")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            hint = (
                " (is its folder on PYTHONPATH?)" if exc.name == module_name.split(".")[0] else ""
            )
            raise ConfigError(
                f"{spec}: cannot import {module_name!r} ({_one_line(exc)}){hint}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - importing user code can fail in any way
            raise ConfigError(f"{spec}: cannot import {module_name!r} ({_one_line(exc)})") from None
        function: Any = module
        for part in attr.split("."):
            function = getattr(function, part, None)
            if function is None:
                raise ConfigError(f"{spec}: module {module_name!r} has no attribute {attr!r}")
        if not callable(function):
            raise ConfigError(f"{spec}: {attr!r} is a {type(function).__name__}, not a function")
        return cls(function, spec)

    def describe(self) -> str:
        return self.description

    def predict(self, inputs: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        try:
            answer = self.function(inputs)
        except Exception as exc:  # noqa: BLE001 - the suspect's failure, reported in one line
            raise EndpointError(f"{self.description}: raised {_one_line(exc)}") from None
        return _labels_from_answer(self.description, answer, len(inputs))


class _Failure(Exception):
    """One failed attempt: why, and whether trying again could help."""

    def __init__(self, reason: str, *, retry: bool, kind: str = "other"):
        super().__init__(reason)
        self.retry = retry
        self.kind = kind


class HttpSuspect:
    """A prediction endpoint speaking `ticketguard-predict/1` (docs/serve-protocol.md).

    One persistent connection is reused between batches. Connection errors, timeouts, HTTP 5xx
    and 429 are retried `retries` times after `backoff * 2**attempt` seconds; other answers
    are final. `timeout` bounds each connect and each wait for data, in seconds. The attribute
    `retries_made` counts the extra attempts made over this suspect's life.
    """

    def __init__(
        self,
        url: str,
        *,
        send: str = "tensor",
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        if send not in SEND_MODES:
            raise ConfigError(f"send must be one of {', '.join(SEND_MODES)}, got {send!r}")
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be a non-negative integer, got {retries!r}")
        if not (isinstance(backoff, int | float) and math.isfinite(backoff) and backoff >= 0):
            raise ConfigError(f"backoff must be a non-negative number of seconds, got {backoff!r}")
        if max_response_bytes < 1:
            raise ConfigError(f"max_response_bytes must be positive, got {max_response_bytes!r}")
        self.url, self._scheme, self._host, self._port, self._target = self._parse_url(url)
        self.description = self.url
        self.send = send
        self.timeout = float(timeout)
        self.max_retries = retries
        self.backoff = float(backoff)
        self.max_response_bytes = int(max_response_bytes)
        self.retries_made = 0
        self._conn: http.client.HTTPConnection | None = None
        self._conn_used = False
        self._lock = threading.Lock()

    @staticmethod
    def _parse_url(url: str) -> tuple[str, str, str, int | None, str]:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"{url!r}: only http:// and https:// endpoints are supported")
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise ConfigError(f"{url!r}: the port is not a number from 0 to 65535") from None
        if not host:
            raise ConfigError(f"{url!r}: no host")
        if parts.username is not None or parts.password is not None:
            # The URL is printed in every report and error; credentials must not be.
            raise ConfigError(f"{parts.scheme}://{host}: credentials in the URL are not supported")
        path = parts.path if parts.path not in ("", "/") else "/predict"
        full = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        target = path + (f"?{parts.query}" if parts.query else "")
        return full, parts.scheme, host, port, target

    def describe(self) -> str:
        return self.url

    def server_info(self) -> dict[str, Any] | None:
        """Return the server's `GET /info` answer, or None if it has none (one try, no retry).

        The whole exchange (connect, headers, body) must finish within `timeout` seconds and
        the answer fit in `MAX_INFO_BYTES`, else EndpointError: a server that drips or floods
        its `/info` cannot hold verification up. A server that is down, answers non-200 or
        non-JSON has no `/info` (None). Long lists in `normalization` print shortened.
        """
        parts = urlsplit(self.url)
        base = parts.path.rsplit("/", 1)[0]
        where = urlunsplit((parts.scheme, parts.netloc, f"{base}/info", "", ""))
        conn = self._new_connection()
        deadline = _Deadline(self.timeout)
        try:
            try:
                conn.timeout = min(self.timeout, deadline.remaining())
                conn.connect()
            except (OSError, http.client.HTTPException):
                if deadline.expired.is_set() or deadline.left() <= 0:
                    raise EndpointError(f"{where}: no answer within {self.timeout:g} s") from None
                return None
            deadline.watch(conn.sock)
            conn.request(
                "GET",
                f"{base}/info",
                headers={"Accept": "application/json", "User-Agent": _user_agent()},
            )
            response = conn.getresponse()
            length = response.getheader("Content-Length")
            too_large = f"{where}: the answer is larger than {MAX_INFO_BYTES} bytes"
            if length is not None and length.isdigit() and int(length) > MAX_INFO_BYTES:
                raise EndpointError(too_large)
            data = response.read(MAX_INFO_BYTES + 1)
            if deadline.expired.is_set():
                raise TimeoutError
            if len(data) > MAX_INFO_BYTES:
                raise EndpointError(too_large)
            if response.status != 200:
                return None
        except (TimeoutError, OSError, http.client.HTTPException):
            if deadline.expired.is_set() or deadline.left() <= 0:
                raise EndpointError(f"{where}: no answer within {self.timeout:g} s") from None
            return None
        finally:
            deadline.cancel()
            conn.close()
        try:
            answer = parse_json(data, what=where, error=EndpointError)
        except EndpointError:
            return None
        if not isinstance(answer, dict):
            return None
        norm = answer.get("normalization")
        if isinstance(norm, dict):
            answer["normalization"] = {
                k: ShortList(v) if isinstance(v, list) else v for k, v in norm.items()
            }
        return answer

    def close(self) -> None:
        """Close the kept-alive connection (a later batch opens a new one)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> HttpSuspect:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one batch -------------------------------------------------------------------------------

    def predict(self, inputs: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        n = len(inputs)
        body = json.dumps(self._payload(inputs, images), separators=(",", ":")).encode()
        attempts = self.max_retries + 1
        failure: _Failure | None = None
        with self._lock:
            for attempt in range(attempts):
                if attempt:
                    self.retries_made += 1
                    time.sleep(self.backoff * 2 ** (attempt - 1))
                try:
                    status, data = self._exchange(body)
                except _Failure as exc:
                    failure = exc
                else:
                    if status == 200:
                        return self._read_labels(data, n)
                    failure = _Failure(
                        f"HTTP {status}: {self._error_text(data)}",
                        retry=status >= 500 or status == 429,
                    )
                if not failure.retry:
                    raise EndpointError(f"{self.url}: {failure}")
        assert failure is not None
        tried = _plural(attempts, "attempt")
        if failure.kind == "connect":
            raise EndpointError(f"{self.url}: {failure} after {tried}")
        raise EndpointError(f"{self.url}: {failure} ({tried})")

    def _payload(self, inputs: torch.Tensor, images: torch.Tensor) -> dict[str, Any]:
        if self.send == "tensor":
            return {"inputs": inputs.detach().to("cpu", torch.float32).tolist()}
        return {"images": [self._png(image) for image in images]}

    def _png(self, image: torch.Tensor) -> str:
        from PIL import Image

        channels = image.shape[0]
        if image.dtype != torch.uint8 or channels not in _PNG_MODES:
            raise ConfigError(
                f"cannot send a {tuple(image.shape)} {image.dtype} image as PNG "
                "(uint8 with 1 to 4 channels needed)"
            )
        array = image.detach().cpu().permute(1, 2, 0).numpy()
        if channels == 1:
            array = array[:, :, 0]
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array), _PNG_MODES[channels]).save(
            buffer, "PNG", compress_level=1
        )
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    # --- the wire --------------------------------------------------------------------------------

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._conn_used = None, False

    def _exchange(self, body: bytes) -> tuple[int, bytes]:
        """POST the body once; a kept-alive connection the server has closed is reopened for free."""
        end = time.monotonic() + self.timeout  # one deadline, a reopened connection included
        while True:
            reused = self._conn is not None and self._conn_used
            try:
                left = end - time.monotonic()
                if left <= 0:
                    raise _Failure(f"no answer within {self.timeout} s", retry=True)
                return self._round_trip(body, left)
            except _Stale:
                self._drop()
                if not reused:
                    raise _Failure(
                        "connection lost (the server closed it without answering)", retry=True
                    ) from None

    def _new_connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout)

    def _connection(self, deadline: _Deadline) -> http.client.HTTPConnection:
        if self._conn is None:
            conn = self._new_connection()
            try:
                conn.timeout = min(self.timeout, deadline.remaining())
                conn.connect()
            except TimeoutError:
                conn.close()
                raise _Failure("cannot connect (timed out)", retry=True, kind="connect") from None
            except ssl.SSLCertVerificationError as exc:
                conn.close()
                raise _Failure(
                    f"TLS certificate rejected ({exc.verify_message})", retry=False
                ) from None
            except OSError as exc:
                conn.close()
                reason = exc.strerror or _one_line(exc)
                raise _Failure(f"cannot connect ({reason})", retry=True, kind="connect") from None
            self._conn, self._conn_used = conn, False
        elif self._conn.sock is not None:
            self._conn.sock.settimeout(min(self.timeout, deadline.remaining()))
        return self._conn

    def _round_trip(self, body: bytes, seconds: float) -> tuple[int, bytes]:
        """One POST and its whole answer, within `seconds` in all, connecting included.

        The socket timeout bounds each wait for data; a watchdog bounds the whole exchange, so
        a server that drips its answer a byte at a time cannot hold verification up.
        """
        deadline = _Deadline(seconds)
        try:
            conn = self._connection(deadline)
            # Held here: http.client drops `conn.sock` once an HTTP/1.0 answer starts, but the
            # answer is still read from this socket.
            deadline.watch(conn.sock)
            conn.request(
                "POST",
                self._target,
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                    "User-Agent": _user_agent(),
                },
            )
            response = conn.getresponse()
            self._conn_used = True
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.max_response_bytes:
                self._drop()
                raise _Failure(self._too_large(), retry=False)
            data = response.read(self.max_response_bytes + 1)
            if deadline.expired.is_set():
                raise TimeoutError
            if len(data) > self.max_response_bytes:
                self._drop()
                raise _Failure(self._too_large(), retry=False)
            if response.will_close:
                self._drop()
            return response.status, data
        except _Failure:
            raise
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            self._drop()
            if deadline.expired.is_set() or isinstance(exc, TimeoutError):
                raise _Failure(f"no answer within {self.timeout} s", retry=True) from None
            if isinstance(
                exc,
                http.client.RemoteDisconnected
                | ConnectionResetError
                | ConnectionAbortedError
                | BrokenPipeError,
            ):
                raise _Stale() from None
            raise _Failure(f"connection failed ({_one_line(exc)})", retry=True) from None
        finally:
            deadline.cancel()

    def _too_large(self) -> str:
        return f"the answer is larger than {self.max_response_bytes} bytes"

    @staticmethod
    def _error_text(data: bytes) -> str:
        """The server's one-line `error`, else the start of what it sent."""
        try:
            answer = json.loads(data)
        except (ValueError, RecursionError):
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            text = answer["error"]
        else:
            text = data[:200].decode("utf-8", "replace")
        text = " ".join(text.split())[:200]
        return text or "no error message"

    def _read_labels(self, data: bytes, n: int) -> np.ndarray:
        try:
            answer = json.loads(data)
        except (ValueError, RecursionError):
            raise EndpointError(f"{self.url}: the answer is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("labels"), list):
            raise EndpointError(f"{self.url}: the answer has no 'labels' list")
        labels = answer["labels"]
        if len(labels) != n:
            raise EndpointError(f"{self.url}: answered {len(labels)} labels for {n} inputs")
        for i, label in enumerate(labels):
            integral = isinstance(label, int) or (
                isinstance(label, float) and math.isfinite(label) and label.is_integer()
            )
            if isinstance(label, bool) or not integral:
                raise EndpointError(f"{self.url}: label {i} is not an integer ({label!r:.40})")
            if abs(label) >= _LABEL_LIMIT:
                raise EndpointError(f"{self.url}: label {i} is out of range ({label!r:.40})")
        return np.asarray([int(v) for v in labels], dtype=np.int64)


class _Deadline:
    """A wall-clock limit on one exchange, connecting included.

    When it passes, the watched socket is shut down, so a read blocked on a server that drips
    bytes (each within the socket timeout) returns at once.
    """

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = threading.Event()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return self.end - time.monotonic()

    def remaining(self) -> float:
        """Seconds left; TimeoutError if none."""
        left = self.left()
        if left <= 0 or self.expired.is_set():
            raise TimeoutError
        return left

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.expired.is_set():
                self._shut()

    def _expire(self) -> None:
        with self._lock:
            self.expired.set()
            self._shut()

    def _shut(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class ShortList(list):
    """A list from a server's answer that prints its first `SHOWN_VALUES` values and its length.

    The values are all there (comparisons see them); only `str`/`repr` are shortened, so a
    message quoting a hostile server's million-value list stays one short line.
    """

    def __repr__(self) -> str:
        if len(self) <= SHOWN_VALUES:
            return super().__repr__()
        shown = ", ".join(repr(v)[:24] for v in self[:SHOWN_VALUES])
        return f"[{shown}, ... ({len(self)} values)]"

    __str__ = __repr__


class _Stale(Exception):
    """The server closed the connection without answering (maybe a kept-alive one timed out)."""


def _user_agent() -> str:
    return f"ticketguard/{__version__}"


# --- batching ----------------------------------------------------------------------------------


@dataclass
class QueryResult:
    """The labels a suspect answered, in input order, and what it took to get them.

    `requests` counts the batches answered; `retries` the extra attempts an HttpSuspect needed.
    """

    labels: np.ndarray
    requests: int
    seconds: float
    retries: int = 0

    @property
    def queries_per_second(self) -> float:
        """Samples answered per second of wall time."""
        if len(self.labels) == 0:
            return 0.0
        return len(self.labels) / self.seconds if self.seconds > 0 else math.inf


def query_labels(
    suspect: Suspect,
    inputs: torch.Tensor,
    images: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> QueryResult:
    """Ask the suspect for the labels of every sample, `batch_size` samples per request."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if inputs.dim() != 4 or images.dim() != 4 or len(inputs) != len(images):
        raise ConfigError(
            f"inputs {tuple(inputs.shape)} and images {tuple(images.shape)} must be (N, C, H, W) "
            "batches of the same samples"
        )
    # HttpSuspect counts its retries; other suspects have none to count.
    retries_before = getattr(suspect, "retries_made", 0)
    start = time.perf_counter()
    answers: list[np.ndarray] = []
    for lo in range(0, len(inputs), batch_size):
        batch_inputs, batch_images = inputs[lo : lo + batch_size], images[lo : lo + batch_size]
        n = len(batch_inputs)
        labels = np.asarray(suspect.predict(batch_inputs, batch_images))
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise EndpointError(
                f"{suspect.description}: answered {labels.dtype} of shape {labels.shape} "
                f"for {n} inputs (expected {n} integer labels)"
            )
        answers.append(labels.astype(np.int64))
    seconds = time.perf_counter() - start
    labels = np.concatenate(answers) if answers else np.zeros(0, dtype=np.int64)
    retries = getattr(suspect, "retries_made", 0) - retries_before
    return QueryResult(labels, len(answers), seconds, retries if isinstance(retries, int) else 0)
