"""Tests of the black-box client: batching, local suspects, and HttpSuspect against stub servers."""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from ticketguard.errors import ConfigError, EndpointError
from ticketguard.tickets.models import DigitsCNN
from ticketguard.verify.blackbox import (
    CallableSuspect,
    HttpSuspect,
    ModelSuspect,
    QueryResult,
    Suspect,
    query_labels,
)

SHAPE = (1, 8, 8)


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *SHAPE), generator=gen, dtype=torch.uint8)
    return images.float() / 255, images


class _Recorder:
    """A suspect whose label for a sample is the number written in its first pixel."""

    description = "recorder"

    def __init__(self, extra: int = 0):
        self.batches: list[int] = []
        self.extra = extra

    def predict(self, inputs: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        self.batches.append(len(inputs))
        labels = inputs[:, 0, 0, 0].numpy().astype(np.int64)
        return np.concatenate([labels, np.zeros(self.extra, np.int64)])


# --- batching --------------------------------------------------------------------------------------


def test_query_labels_batches_in_order():
    inputs = torch.zeros(10, *SHAPE)
    inputs[:, 0, 0, 0] = torch.arange(10, 0, -1).float()
    suspect = _Recorder()
    assert isinstance(suspect, Suspect)
    result = query_labels(suspect, inputs, torch.zeros(10, *SHAPE, dtype=torch.uint8), batch_size=3)
    assert suspect.batches == [3, 3, 3, 1]
    assert result.requests == 4 and result.retries == 0
    assert result.labels.dtype == np.int64
    assert result.labels.tolist() == list(range(10, 0, -1))
    assert result.seconds >= 0 and result.queries_per_second > 0
    one = query_labels(
        _Recorder(), inputs, torch.zeros(10, *SHAPE, dtype=torch.uint8), batch_size=64
    )
    assert one.requests == 1 and one.labels.tolist() == result.labels.tolist()


def test_query_labels_of_nothing():
    result = query_labels(
        _Recorder(), torch.zeros(0, *SHAPE), torch.zeros(0, *SHAPE, dtype=torch.uint8)
    )
    assert result.requests == 0 and result.labels.shape == (0,)
    assert result.queries_per_second == 0.0


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.5])
def test_query_labels_refuses_a_bad_batch_size(batch_size):
    inputs, images = _batch(4)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        query_labels(_Recorder(), inputs, images, batch_size=batch_size)


def test_query_labels_refuses_mismatched_inputs():
    inputs, images = _batch(4)
    with pytest.raises(ConfigError, match="same samples"):
        query_labels(_Recorder(), inputs, images[:3])


def test_query_labels_checks_every_answer():
    inputs, images = _batch(5)
    with pytest.raises(
        EndpointError, match=r"^recorder: answered int64 of shape \(4,\) for 3 inputs"
    ):
        query_labels(_Recorder(extra=1), inputs, images, batch_size=3)


def test_queries_per_second():
    assert QueryResult(np.zeros(10, np.int64), 1, 2.0).queries_per_second == 5.0


# --- local suspects --------------------------------------------------------------------------------


def test_model_suspect_is_the_argmax():
    torch.manual_seed(0)
    model = DigitsCNN(width=4).eval()
    inputs, images = _batch(9)
    result = query_labels(ModelSuspect(model, "cpu", "local"), inputs, images, batch_size=4)
    with torch.no_grad():
        assert result.labels.tolist() == model(inputs).argmax(1).tolist()


SUSPECT_MODULE = """
import numpy as np
import torch

def labels(x):
    return x[:, 0, 0, 0].long()

def scores(x):
    out = np.zeros((len(x), 4), dtype=np.float32)
    out[np.arange(len(x)), x[:, 0, 0, 0].long().numpy() % 4] = 1.0
    return out

def as_list(x):
    return [int(v) for v in x[:, 0, 0, 0]]

def integral_floats(x):
    return [float(v) for v in x[:, 0, 0, 0]]

def one_too_many(x):
    return list(range(len(x) + 1))

def fractions(x):
    return [0.5] * len(x)

def words(x):
    return ["cat"] * len(x)

def booleans(x):
    return torch.ones(len(x), dtype=torch.bool)

def ragged(x):
    return [[1, 2], [3]]

def cube(x):
    return torch.zeros(len(x), 2, 2)

def boom(x):
    raise RuntimeError("the suspect broke\\nsecond line")

class Holder:
    @staticmethod
    def nested(x):
        return labels(x)

not_callable = 3
"""


@pytest.fixture
def suspect_module(tmp_path, monkeypatch) -> Iterator[str]:
    """A module of suspect functions, importable as `tg_test_suspects`."""
    (tmp_path / "tg_test_suspects.py").write_text(SUSPECT_MODULE, encoding="utf-8")
    (tmp_path / "tg_test_broken.py").write_text("raise ImportError('no luck')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tg_test_suspects"
    for name in ("tg_test_suspects", "tg_test_broken"):
        sys.modules.pop(name, None)


def _indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.zeros(n, *SHAPE)
    inputs[:, 0, 0, 0] = torch.arange(n).float()
    return inputs, torch.zeros(n, *SHAPE, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("labels", list(range(7))),
        ("scores", [i % 4 for i in range(7)]),
        ("as_list", list(range(7))),
        ("integral_floats", list(range(7))),
        ("Holder.nested", list(range(7))),
    ],
)
def test_callable_suspect_from_spec(suspect_module, function, expected):
    suspect = CallableSuspect.from_spec(f"{suspect_module}:{function}")
    assert suspect.description == f"{suspect_module}:{function}"
    result = query_labels(suspect, *_indexed(7), batch_size=3)
    assert result.labels.tolist() == expected
    assert result.requests == 3


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("one_too_many", r"shape \(4,\) for 3 inputs"),
        ("fractions", "not integers"),
        ("words", "not labels or scores"),
        ("booleans", "not labels or scores"),
        ("ragged", "ragged"),
        ("cube", r"shape \(3, 2, 2\)"),
        ("boom", "raised RuntimeError: the suspect broke$"),
    ],
)
def test_callable_suspect_bad_answers(suspect_module, function, message):
    suspect = CallableSuspect.from_spec(f"{suspect_module}:{function}")
    with pytest.raises(EndpointError, match=message) as caught:
        query_labels(suspect, *_indexed(3))
    assert str(caught.value).startswith(f"{suspect_module}:{function}: ")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "is not package.module:function"),
        (":labels", "is not package.module:function"),
        ("tg_test_suspects:", "is not package.module:function"),
        ("tg_no_such_module_anywhere:f", "cannot import 'tg_no_such_module_anywhere'"),
        ("tg_test_broken:f", r"cannot import 'tg_test_broken' \(ImportError: no luck\)"),
        ("tg_test_suspects:missing", "has no attribute 'missing'"),
        ("tg_test_suspects:not_callable", "'not_callable' is a int, not a function"),
    ],
)
def test_callable_suspect_bad_specs(suspect_module, spec, message):
    with pytest.raises(ConfigError, match=message) as caught:
        CallableSuspect.from_spec(spec)
    assert "\n" not in str(caught.value)


# --- HttpSuspect against stub servers --------------------------------------------------------------

Reply = tuple[int, bytes, float]  # status, body, seconds to wait before answering


class _Stub:
    """A scripted HTTP server: answers the replies in order (the last one repeats)."""

    def __init__(self, replies: list[Reply], *, keep_alive: bool = False, idle_timeout: float = 5):
        self.replies = list(replies)
        self.bodies: list[bytes] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"
            timeout = idle_timeout

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.bodies.append(body)
                status, data, wait = stub.replies[min(len(stub.bodies), len(stub.replies)) - 1]
                time.sleep(wait)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def hits(self) -> int:
        return len(self.bodies)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Callable[..., _Stub]]:
    started: list[_Stub] = []

    def start(replies: list[Reply], **kwargs) -> _Stub:
        started.append(_Stub(replies, **kwargs))
        return started[-1]

    yield start
    for s in started:
        s.close()


def _ok(labels: list) -> Reply:
    return 200, json.dumps({"labels": labels}).encode(), 0.0


def _fast(url: str, **kwargs) -> HttpSuspect:
    kwargs.setdefault("backoff", 0.01)
    kwargs.setdefault("timeout", 5.0)
    return HttpSuspect(url, **kwargs)


def test_http_suspect_sends_tensors(stub):
    server = stub([_ok([4, 2])])
    inputs, images = _batch(2)
    labels = _fast(server.url).predict(inputs, images)
    assert labels.dtype == np.int64 and labels.tolist() == [4, 2]
    sent = json.loads(server.bodies[0])
    assert set(sent) == {"inputs"}
    assert torch.equal(torch.tensor(sent["inputs"], dtype=torch.float32), inputs)


def test_http_suspect_sends_png(stub):
    server = stub([_ok([1, 1, 1])])
    inputs, images = _batch(3)
    _fast(server.url + "/", send="png").predict(inputs, images)
    sent = json.loads(server.bodies[0])
    assert set(sent) == {"images"}
    for encoded, image in zip(sent["images"], images, strict=True):
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as png:
            assert png.format == "PNG" and png.mode == "L"
            assert np.array_equal(np.asarray(png), image[0].numpy())


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_endpoint_down():
    url = f"http://127.0.0.1:{_closed_port()}"
    suspect = _fast(url, retries=2)
    with pytest.raises(EndpointError) as caught:
        suspect.predict(*_batch(1))
    assert (
        str(caught.value) == f"{url}/predict: cannot connect (Connection refused) after 3 attempts"
    )
    assert suspect.retries_made == 2


def test_endpoint_too_slow(stub):
    server = stub([(200, b'{"labels": [0]}', 1.0)])
    with pytest.raises(EndpointError) as caught:
        _fast(server.url, timeout=0.2, retries=1).predict(*_batch(1))
    assert str(caught.value) == f"{server.url}/predict: no answer within 0.2 s (2 attempts)"
    assert server.hits == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>not json</html>", "the answer is not JSON"),
        (b"[1, 2]", "the answer has no 'labels' list"),
        (b'{"label": [1, 2]}', "the answer has no 'labels' list"),
        (b'{"labels": [1, 2, 3]}', "answered 3 labels for 2 inputs"),
        (b'{"labels": [1]}', "answered 1 labels for 2 inputs"),
        (b'{"labels": [1.5, 2]}', "label 0 is not an integer"),
        (b'{"labels": [1, "2"]}', "label 1 is not an integer"),
        (b'{"labels": [true, 1]}', "label 0 is not an integer"),
        (b'{"labels": [null, 1]}', "label 0 is not an integer"),
        (b'{"labels": [1, NaN]}', "label 1 is not an integer"),
        (b'{"labels": [1, 1e300]}', "label 1 is out of range"),
    ],
)
def test_unreadable_answers(stub, body, message):
    server = stub([(200, body, 0.0)])
    with pytest.raises(EndpointError) as caught:
        _fast(server.url).predict(*_batch(2))
    assert str(caught.value).startswith(f"{server.url}/predict: {message}")
    assert server.hits == 1  # an answer that arrived is not asked again


def test_integral_float_labels_are_accepted(stub):
    server = stub([_ok([3.0, -0.0])])
    assert _fast(server.url).predict(*_batch(2)).tolist() == [3, 0]


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retries_then_succeeds(stub, status):
    server = stub([(status, b'{"error": "busy"}', 0.0), (status, b"", 0.0), _ok([5])])
    suspect = _fast(server.url, retries=3)
    result = query_labels(suspect, *_batch(1))
    assert result.labels.tolist() == [5]
    assert server.hits == 3
    assert result.retries == 2 and result.requests == 1


def test_retries_run_out(stub):
    server = stub([(503, b'{"error": "overloaded\\nfor now"}', 0.0)])
    with pytest.raises(EndpointError) as caught:
        _fast(server.url, retries=2).predict(*_batch(1))
    assert str(caught.value) == f"{server.url}/predict: HTTP 503: overloaded for now (3 attempts)"
    assert server.hits == 3


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            (400, b'{"error": "inputs has the wrong shape"}', 0.0),
            "HTTP 400: inputs has the wrong shape",
        ),
        ((404, b"<h1>Not Found</h1>", 0.0), "HTTP 404: <h1>Not Found</h1>"),
        ((413, b"", 0.0), "HTTP 413: no error message"),
    ],
)
def test_client_errors_are_not_retried(stub, reply, message):
    server = stub([reply, _ok([0])])
    with pytest.raises(EndpointError) as caught:
        _fast(server.url, retries=3).predict(*_batch(1))
    assert str(caught.value) == f"{server.url}/predict: {message}"
    assert server.hits == 1


def test_answer_too_large(stub):
    server = stub([_ok([0] * 1000)])
    with pytest.raises(EndpointError, match="the answer is larger than 100 bytes"):
        _fast(server.url, max_response_bytes=100).predict(*_batch(1))


def test_kept_alive_connection_closed_by_the_server_is_reopened(stub):
    server = stub([_ok([7])], keep_alive=True, idle_timeout=0.1)
    suspect = _fast(server.url, retries=0)
    assert suspect.predict(*_batch(1)).tolist() == [7]
    time.sleep(0.4)  # the server drops the idle connection
    assert suspect.predict(*_batch(1)).tolist() == [7]
    assert server.hits == 2 and suspect.retries_made == 0
    suspect.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/predict"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/predict"),
        (
            "https://models.example.org/v1/classify?key=1",
            "https://models.example.org/v1/classify?key=1",
        ),
        ("http://[::1]:9000", "http://[::1]:9000/predict"),
    ],
)
def test_url_completion(url, expected):
    suspect = HttpSuspect(url)
    assert suspect.url == suspect.description == suspect.describe() == expected


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("ftp://example.org/x", {}, "only http:// and https://"),
        ("/predict", {}, "only http:// and https://"),
        ("http://host:port", {}, "port"),
        ("http://:80/", {}, "no host"),
        ("http://alice:secret@h/p", {}, "^http://h: credentials in the URL are not supported$"),
        ("http://h", {"send": "jpeg"}, "send must be one of tensor, png"),
        ("http://h", {"timeout": 0}, "timeout"),
        ("http://h", {"retries": -1}, "retries"),
        ("http://h", {"backoff": -1}, "backoff"),
    ],
)
def test_bad_http_suspect_config(url, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HttpSuspect(url, **kwargs)
