"""Tests of the prediction server: the protocol without sockets, a real server, and `ticketguard serve`."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import error_line, invoke
from PIL import Image
from torch import nn

from ticketguard.errors import ArchitectureError, DatasetError, EndpointError
from ticketguard.tickets.data import pixel_normalization
from ticketguard.verify.blackbox import HttpSuspect, query_labels
from ticketguard.verify.server import (
    PROTOCOL,
    PredictionService,
    make_server,
    normalize_pixels,
    service_from_file,
)

SHAPE = (1, 8, 8)
CPU = torch.device("cpu")


def _pixels(n: int, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)


def _png(array: np.ndarray, mode: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _post(payload: object) -> bytes:
    return json.dumps(payload).encode()


def _argmax(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(inputs).argmax(dim=1).numpy()


@pytest.fixture
def digits_norm():
    return pixel_normalization("digits", split_seed=0)


@pytest.fixture
def model(make_ticket):
    return make_ticket(seed=3).build_model()


@pytest.fixture
def service(model, digits_norm):
    return PredictionService(
        model, input_shape=SHAPE, normalization=digits_norm, device=CPU, description="test model"
    )


@pytest.fixture
def running(service):
    """A real server on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    server = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


# --- the protocol, without sockets ---------------------------------------------------------------


def test_info_describes_the_model(service, digits_norm):
    for path in ("/info", "/", "/info/", "/info?x=1"):
        status, info = service.handle("GET", path, b"")
        assert status == 200
        assert info["protocol"] == PROTOCOL == "ticketguard-predict/1"
        assert info["model"] == "test model"
        assert info["input_shape"] == [1, 8, 8]
        assert info["num_classes"] == 10
        assert info["accepts"] == ["inputs", "images"]
        assert info["max_batch"] == 1024
        assert info["normalization"] == {"mean": list(digits_norm[0]), "std": list(digits_norm[1])}
        json.dumps(info, allow_nan=False)


def test_predict_inputs_answers_the_models_argmax(service, model, digits_norm):
    inputs = normalize_pixels(_pixels(20), *digits_norm)
    status, answer = service.handle("POST", "/predict", _post({"inputs": inputs.tolist()}))
    assert status == 200
    assert set(answer) == {"labels"}
    assert answer["labels"] == _argmax(model, inputs).tolist()
    labels, probs = service.predict(inputs)
    assert labels.dtype == np.int64 and labels.shape == (20,)
    assert probs.dtype == np.float32 and probs.shape == (20, 10)


def test_predict_probabilities_when_asked(service, model):
    inputs = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    body = _post({"inputs": inputs.tolist(), "probabilities": True})
    status, answer = service.handle("POST", "/predict", body)
    assert status == 200
    probs = np.asarray(answer["probabilities"])
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert probs.argmax(axis=1).tolist() == answer["labels"] == _argmax(model, inputs).tolist()
    with torch.no_grad():
        expected = torch.softmax(model(inputs), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)


def test_predict_images_normalises_pixels(service, model, digits_norm):
    pixels = _pixels(12, seed=2)
    images = [_png(p[0].numpy(), "L") for p in pixels]
    status, answer = service.handle("POST", "/predict", _post({"images": images}))
    assert status == 200
    assert answer["labels"] == _argmax(model, normalize_pixels(pixels, *digits_norm)).tolist()


def test_images_are_converted_and_resized(service, model, digits_norm):
    gray = _pixels(1, seed=4, shape=(16, 16))[0].numpy()
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    # What the server must compute: one channel, resized to 8 x 8.
    small = np.array(Image.fromarray(gray, "L").resize((8, 8), Image.Resampling.BILINEAR))
    expected = _argmax(model, normalize_pixels(torch.from_numpy(small)[None, None], *digits_norm))
    status, answer = service.handle("POST", "/predict", _post({"images": [_png(rgb, "RGB")]}))
    assert status == 200
    assert answer["labels"] == expected.tolist()
    # A JPEG under any name is read too.
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, "JPEG")
    jpeg = base64.b64encode(buffer.getvalue()).decode()
    assert service.handle("POST", "/predict", _post({"images": [jpeg]}))[0] == 200


def _inputs(n: int) -> list:
    return torch.zeros(n, *SHAPE).tolist()


BAD_REQUESTS = [
    ("GET", "/nowhere", b"", 404, "no such path"),
    ("POST", "/nowhere", b"{}", 404, "no such path"),
    ("POST", "/info", b"", 405, "GET only"),
    ("GET", "/predict", b"", 405, "POST only"),
    ("DELETE", "/predict", b"", 405, "POST only"),
    ("POST", "/predict", b"", 400, "no body"),
    ("POST", "/predict", b"{not json", 400, "not valid JSON"),
    ("POST", "/predict", b"\xff\xfe\x00garbage", 400, "not valid JSON"),
    ("POST", "/predict", b"[" * 100_000, 400, "not valid JSON"),
    ("POST", "/predict", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/predict", _post({}), 400, "exactly one of 'inputs' and 'images'"),
    ("POST", "/predict", _post({"inputs": _inputs(1), "images": []}), 400, "exactly one"),
    ("POST", "/predict", _post({"input": _inputs(1)}), 400, "unknown field 'input'"),
    ("POST", "/predict", _post({"inputs": 3}), 400, "must be a list"),
    ("POST", "/predict", _post({"inputs": []}), 400, "is empty"),
    ("POST", "/predict", _post({"inputs": [[["a"]]]}), 400, "nested lists of numbers"),
    ("POST", "/predict", _post({"inputs": [[[1, 2], [3]]]}), 400, "nested lists of numbers"),
    ("POST", "/predict", _post({"inputs": [None]}), 400, "nested lists of numbers"),
    ("POST", "/predict", _post({"inputs": torch.zeros(2, 1, 8, 7).tolist()}), 400, "shape"),
    ("POST", "/predict", _post({"inputs": torch.zeros(1, 8, 8).tolist()}), 400, "shape"),
    ("POST", "/predict", _post({"inputs": torch.zeros(1, 3, 8, 8).tolist()}), 400, "shape"),
    ("POST", "/predict", b'{"inputs": [[[[NaN' + b", 0" * 7 + b"]" + b", [0,0,0,0,0,0,0,0]" * 7 + b"]]]}", 400, "non-finite"),
    ("POST", "/predict", _post({"inputs": torch.full((1, *SHAPE), 1e39, dtype=torch.float64).tolist()}), 400, "non-finite"),
    ("POST", "/predict", _post({"inputs": [[[[10**400] * 8] * 8]]}), 400, "an integer of 401 digits"),
    ("POST", "/predict", _post({"inputs": [[[[True] * 8] * 8]]}), 400, "not booleans"),
    ("POST", "/predict", _post({"inputs": [[[[0.5] * 7 + [False]] * 8]]}), 400, "not booleans"),
    ("POST", "/predict", _post({"inputs": [[[["0.5"] * 8] * 8]]}), 400, "nested lists of numbers"),
    ("POST", "/predict", _post({"inputs": [[[[None] * 8] * 8]]}), 400, "nested lists of numbers"),
    ("POST", "/predict", _post({"inputs": [[[[{}] * 8] * 8]]}), 400, "nested lists of numbers"),
    ("POST", "/predict", _post({"inputs": [[[[[0.5]] * 8] * 8]]}), 400, "nested lists of numbers"),
    ("POST", "/predict", b'{"inputs": [], "inputs": []}', 400, "duplicate key 'inputs'"),
    ("POST", "/predict", b'{"inputs": [[[[Infinity]]]]}', 400, "non-finite number Infinity"),
    ("POST", "/predict", _post({"inputs": _inputs(1025)}), 400, "more than the limit of 1024"),
    ("POST", "/predict", _post({"inputs": _inputs(1), "probabilities": "yes"}), 400, "true or false"),
    ("POST", "/predict", _post({"images": ["%%%"]}), 400, "image 0 is not valid base64"),
    ("POST", "/predict", _post({"images": [base64.b64encode(b"hello").decode()]}), 400, "image 0 is not a PNG"),
    ("POST", "/predict", _post({"images": [7]}), 400, "not a base64 string"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_one_line_errors(service, method, path, body, status, message):
    got, answer = service.handle(method, path, body)
    assert got == status, answer
    assert set(answer) == {"error"}
    assert message in answer["error"]
    assert "\n" not in answer["error"]


def test_truncated_image_is_refused(service):
    # The header survives, the pixel data is cut: Pillow opens it and fails while decoding.
    data = base64.b64decode(_png(_pixels(1, shape=(64, 64))[0].numpy(), "L"))
    broken = base64.b64encode(data[: len(data) // 2]).decode()
    status, answer = service.handle("POST", "/predict", _post({"images": [broken]}))
    assert status == 400 and "image 0 cannot be decoded" in answer["error"]


def test_body_over_the_limit(model):
    small = PredictionService(
        model, input_shape=SHAPE, normalization=None, device=CPU, description="m", max_body_bytes=64
    )
    status, answer = small.handle("POST", "/predict", b" " * 65)
    assert status == 413 and "64 bytes" in answer["error"]


def test_images_need_a_known_normalization(model):
    plain = PredictionService(
        model, input_shape=SHAPE, normalization=None, device=CPU, description="m"
    )
    assert plain.info()["accepts"] == ["inputs"]
    assert plain.info()["normalization"] is None
    image = _png(np.zeros((8, 8), np.uint8), "L")
    status, answer = plain.handle("POST", "/predict", _post({"images": [image]}))
    assert status == 400 and "normalization" in answer["error"]
    assert plain.handle("POST", "/predict", _post({"inputs": _inputs(2)}))[0] == 200


class _Fragile(nn.Module):
    """Answers 3 classes, but fails on inputs above 100 (a model that breaks on some requests)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 100:
            raise RuntimeError("kernel exploded\n  with a second line")
        return x.flatten(1)[:, :3]


def test_model_failure_is_a_500_without_traceback():
    service = PredictionService(
        _Fragile(), input_shape=SHAPE, normalization=None, device=CPU, description="m"
    )
    status, answer = service.handle("POST", "/predict", _post({"inputs": [[[[500.0] * 8] * 8]]}))
    assert status == 500
    assert answer == {"error": "the model failed (RuntimeError: kernel exploded)"}


def test_service_refuses_a_model_that_does_not_take_the_shape(model):
    with pytest.raises(ArchitectureError, match="cannot take inputs of shape 3x32x32"):
        PredictionService(
            model, input_shape=(3, 32, 32), normalization=None, device=CPU, description="m"
        )
    with pytest.raises(DatasetError, match="3 mean"):
        PredictionService(
            model,
            input_shape=SHAPE,
            normalization=((0.5,) * 3, (0.5,) * 3),
            device=CPU,
            description="m",
        )


# --- a real server --------------------------------------------------------------------------------


@pytest.mark.parametrize("send", ["tensor", "png"])
def test_http_suspect_gets_the_models_labels(running, model, digits_norm, send):
    pixels = _pixels(50, seed=5)
    inputs = normalize_pixels(pixels, *digits_norm)
    with HttpSuspect(running, send=send, timeout=10) as suspect:
        assert suspect.url == running + "/predict"
        result = query_labels(suspect, inputs, pixels, batch_size=16)
    assert result.requests == 4 and result.retries == 0
    assert result.labels.dtype == np.int64
    assert result.labels.tolist() == _argmax(model, inputs).tolist()


def test_real_server_answers_json_errors(running):
    with urllib.request.urlopen(running + "/info", timeout=10) as response:
        assert json.load(response)["num_classes"] == 10
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(running + "/predict", timeout=10)
    assert caught.value.code == 405
    assert caught.value.headers["Allow"] == "POST"
    assert "POST only" in json.load(caught.value)["error"]
    request = urllib.request.Request(running + "/predict", data=b"{oops", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert json.load(caught.value) == {"error": "the body is not valid JSON"}
    with pytest.raises(EndpointError, match=r"/nowhere: HTTP 404: no such path"):
        HttpSuspect(running + "/nowhere", retries=0).predict(torch.zeros(1, *SHAPE), _pixels(1))


def _raw(url: str, request: bytes) -> tuple[int, dict]:
    """Send raw bytes to the server; return the status and JSON body of its answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_real_server_checks_the_length_before_reading(running):
    # The announced body never comes: the answer must not wait for it.
    status, answer = _raw(
        running, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n"
    )
    assert status == 413 and "over the limit" in answer["error"]
    status, answer = _raw(
        running, b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert status == 411
    status, answer = _raw(running, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert status == 400 and answer["error"]


# --- `ticketguard serve` ---------------------------------------------------------------------------


@pytest.fixture
def ticket_file(make_ticket, tmp_path):
    ticket = make_ticket(seed=7)
    ticket.metadata["input_shape"] = [1, 8, 8]
    ticket.metadata["dataset"] = {"name": "digits", "split_seed": 0}
    path = tmp_path / "owner.ticket"
    ticket.save(path)
    return path, ticket


def test_service_from_file_reads_shape_and_normalization(ticket_file, digits_norm):
    path, _ = ticket_file
    service = service_from_file(path, device="cpu")
    info = service.info()
    assert info["input_shape"] == [1, 8, 8]
    assert info["architecture"] == "digits_cnn"
    assert info["normalization"] == {"mean": list(digits_norm[0]), "std": list(digits_norm[1])}
    assert info["model"] == "owner.ticket (digits_cnn)"


def test_serve_command_serves_until_terminated(ticket_file, digits_norm):
    path, ticket = ticket_file
    proc = subprocess.Popen(
        [sys.executable, "-m", "ticketguard", "serve", str(path), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    watchdog = threading.Timer(60, proc.kill)  # a hung server fails the test instead of hanging it
    watchdog.start()
    try:
        line = proc.stdout.readline()
        match = re.search(r" at (http://127\.0\.0\.1:\d+) ", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        assert line.startswith(f"serving {path} (digits_cnn, input 1x8x8, 10 classes) at ")
        pixels = _pixels(30, seed=6)
        inputs = normalize_pixels(pixels, *digits_norm)
        result = query_labels(HttpSuspect(match.group(1), send="png"), inputs, pixels)
        assert result.labels.tolist() == _argmax(ticket.build_model(), inputs).tolist()
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        assert proc.stderr.read() == ""
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_serve_refuses_a_bad_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a model")
    line = error_line(invoke(["serve", bad, "--port", "0"]), 1)
    assert line == f"Error: {bad}: not a ticket, safetensors or PyTorch checkpoint"


def test_serve_asks_for_a_dataset_or_an_architecture(tmp_path, make_ticket):
    from safetensors.torch import save_file

    state = tmp_path / "plain.safetensors"
    save_file(dict(make_ticket().trained), str(state))
    assert "pass --arch" in error_line(invoke(["serve", state, "--port", "0"]), 1)
    line = error_line(invoke(["serve", state, "--arch", "digits_cnn", "--arch-arg", "width=4"]), 2)
    assert "records no input shape or dataset; pass --dataset" in line
    result = invoke(["serve", state, "--arch", "no_such_net"])
    assert result.exit_code == 2 and "unknown architecture" in result.output


def test_serve_reports_a_port_in_use(ticket_file):
    path, _ = ticket_file
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = error_line(invoke(["serve", path, "--port", port, "--device", "cpu"]), 1)
    assert line.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in line


def test_serve_is_documented():
    doc = Path(__file__).resolve().parents[1] / "docs" / "serve-protocol.md"
    assert PROTOCOL in doc.read_text(encoding="utf-8")


# --- limits on the work one request can cause ----------------------------------------------------


def test_image_pixels_are_bounded_relative_to_the_input(service):
    # An 8x8 model takes images up to max(4 MP, 64 x 64 pixels) = 4 MP; a 2100x2100 one is over.
    assert service.max_image_pixels == 4_000_000
    big = np.zeros((2100, 2100), dtype=np.uint8)
    status, answer = service.handle("POST", "/predict", _post({"images": [_png(big, "L")]}))
    assert status == 400
    assert "over the limit of 4000000 pixels" in answer["error"]


def test_decoded_pixels_per_request_are_bounded(service):
    # 17 images of 1000x1000 fit one by one, not together (16 x 4 MP budget would; use 4 MP each).
    image = _png(np.zeros((2000, 2000), dtype=np.uint8), "L")
    status, answer = service.handle("POST", "/predict", _post({"images": [image] * 17}))
    assert status == 400
    assert f"more than {service.max_request_pixels} pixels in all" in answer["error"]
    assert service.handle("POST", "/predict", _post({"images": [image] * 2}))[0] == 200


def test_ragged_inputs_are_refused_before_a_tensor_is_built(service, monkeypatch):
    def no_tensor(*args, **kwargs):
        raise AssertionError("a tensor was built from a malformed request")

    row = [0.0] * 8
    ragged = [[[row] * 8], [[row] * 7]]
    monkeypatch.setattr(torch, "tensor", no_tensor)
    status, answer = service.handle("POST", "/predict", _post({"inputs": ragged}))
    assert status == 400
    assert "nested lists of numbers shaped (N, 1, 8, 8)" in answer["error"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_on_a_signal_while_connections_are_dropped(ticket_file, sig):
    """The signal asks the loop to stop; it is never raised inside a transport's __del__."""
    path, _ = ticket_file
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ticketguard", "serve", str(path), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            match = re.search(r" at http://127\.0\.0\.1:(\d+) ", proc.stdout.readline())
            assert match
            port = int(match.group(1))
            for _ in range(20):  # connections dropped mid-request leave transports to collect
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"POST /predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            proc.send_signal(sig)
            assert proc.wait(timeout=20) == 0
            assert "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
