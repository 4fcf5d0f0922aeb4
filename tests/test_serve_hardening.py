"""`ticketguard serve` under load and abuse, and a client that bounds what a server can do to it.

The server side runs `ticketguard serve` in a subprocess (so its RSS and threads can be read from
/proc) or, where a limit is lowered to keep the test short, `make_server` in a thread. The client
side runs `HttpSuspect` against tiny raw-socket servers that drip or flood their answers.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ticketguard.errors import EndpointError
from ticketguard.tickets.data import pixel_normalization
from ticketguard.verify.blackbox import MAX_INFO_BYTES, HttpSuspect
from ticketguard.verify.server import (
    BACKLOG,
    MAX_CONCURRENT_REQUESTS,
    PredictionService,
    implied_body_bytes,
    make_server,
)

SHAPE = (1, 8, 8)
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


# --- a `ticketguard serve` process -----------------------------------------------------------------


class Served:
    def __init__(self, proc: subprocess.Popen[str], url: str):
        self.proc, self.url = proc, url
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)

    def status(self, field: str) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))

    def threads(self) -> int:
        return len(list(Path(f"/proc/{self.proc.pid}/task").iterdir()))

    def connect(self, timeout: float = 10) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)


@pytest.fixture(scope="module")
def served(make_ticket, tmp_path_factory) -> Iterator[Served]:
    ticket = make_ticket(seed=7)
    ticket.metadata["input_shape"] = [1, 8, 8]
    ticket.metadata["dataset"] = {"name": "digits", "split_seed": 0}
    path = tmp_path_factory.mktemp("serve") / "owner.ticket"
    ticket.save(path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ticketguard", "serve", str(path), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
    )
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        match = re.search(r" at (http://127\.0\.0\.1:\d+) ", proc.stdout.readline())
        assert match, "the server did not start"
        yield Served(proc, match.group(1))
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], dict]:
    """Send raw bytes; read one answer (status, headers, JSON body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-answer"
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body[:length])


def _post(body: bytes, extra: str = "") -> bytes:
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def _load(url: str, clients: int, requests: int) -> tuple[int, int, list[str]]:
    """`clients` threads send `requests` one-sample requests each, no retries: (ok, failed)."""
    inputs = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0))
    images = torch.zeros(1, *SHAPE, dtype=torch.uint8)
    ok, failed, errors = [0], [0], []
    lock = threading.Lock()
    go = threading.Barrier(clients)

    def client() -> None:
        with HttpSuspect(url, timeout=60.0, retries=0) as suspect:
            go.wait()
            for _ in range(requests):
                try:
                    suspect.predict(inputs, images)
                    with lock:
                        ok[0] += 1
                except EndpointError as exc:
                    with lock:
                        failed[0] += 1
                        errors.append(str(exc))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ok[0], failed[0], errors


# --- (a) load ---------------------------------------------------------------------------------------


def test_concurrent_clients_all_answered(served):
    ok, failed, errors = _load(served.url, clients=20, requests=20)
    assert (ok, failed) == (400, 0), errors[:3]


@pytest.mark.slow
def test_fifty_clients_two_hundred_requests_each_all_answered(served):
    # The red team's load: 50 clients at batch 1; the old server reset 27 of 10,000 requests.
    ok, failed, errors = _load(served.url, clients=50, requests=200)
    assert (ok, failed) == (10_000, 0), errors[:3]


def test_a_burst_of_connections_queues_in_the_backlog(served):
    # 200 connections opened at once, before the server accepts any: none is reset.
    assert BACKLOG >= 1024
    socks = [served.connect() for _ in range(200)]
    try:
        request = b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for sock in socks:
            sock.sendall(request)
        for sock in socks:
            assert _exchange(sock, b"")[0] == 200
    finally:
        for sock in socks:
            sock.close()


# --- (c), (d), (e) framing and input types --------------------------------------------------------------


def test_oversized_body_is_refused_before_it_is_read(served):
    limit = implied_body_bytes(SHAPE, 1024)
    assert 1_000_000 <= limit < 4_000_000  # a full batch of 1x8x8 inputs, not 64 MiB
    rss_before = served.status("VmRSS")
    for _ in range(8):  # the red team sent eight 60 MB bodies
        with served.connect() as sock:
            head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {60_000_000}\r\n\r\n"
            sock.sendall(head.encode() + b"[" * 65536)
            status, headers, answer = _exchange(sock, b"")
            assert status == 413 and answer == {
                "error": f"the body is over the limit of {limit} bytes"
            }
            assert headers["connection"] == "close"
            # The server closes instead of reading on: sending the rest fails or goes nowhere.
            with pytest.raises(OSError):
                for _ in range(1000):
                    sock.sendall(b"0" * 65536)
    assert served.status("VmRSS") - rss_before < 20_000  # kB


def test_body_just_under_the_cap_is_read(served):
    limit = implied_body_bytes(SHAPE, 1024)
    body = json.dumps({"inputs": torch.zeros(1, *SHAPE).tolist()}).encode()
    body += b" " * (limit - len(body))
    with served.connect() as sock:
        status, _, answer = _exchange(sock, _post(body))
    assert status == 200 and len(answer["labels"]) == 1


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (_post(b"{}", "Content-Length: 2\r\n"), 400, "more than one Content-Length header"),
        (_post(b"{}", "Content-Length: 9\r\n"), 400, "more than one Content-Length header"),
        (_post(b"{}", "Transfer-Encoding: chunked\r\n"), 411, "no chunked bodies"),
        (b"POST /predict HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "not a byte count"),
        (b"POST /predict HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400, "not a byte count"),
        (b"GET /info HTTP/2.0\r\n\r\n", 505, "HTTP/1.0 and HTTP/1.1"),
        (b"GET /info HTTP/1.1\r\n folded: header\r\n\r\n", 400, "malformed header"),
        (b"GET /info HTTP/1.1\r\nX: y\r\n" + b"A: b\r\n" * 100 + b"\r\n", 431, "header lines"),
        (b"GET /info HTTP/1.1\r\nX: " + b"y" * 20_000 + b"\r\n\r\n", 431, "too large"),
        (_post(b"{}", "X: a\nContent-Length: 5\r\n"), 400, "bare CR, LF or NUL"),
        (b"GET /info HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "bare CR, LF or NUL"),
    ],
)
def test_bad_framing_is_refused(served, request_bytes, status, message):
    with served.connect() as sock:
        got, headers, answer = _exchange(sock, request_bytes)
    assert got == status and message in answer["error"], answer
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"


def _inputs_with(value: object) -> bytes:
    row = [0.5] * 7 + [value]
    return json.dumps({"inputs": [[[row] * 8]]}).encode()


@pytest.mark.parametrize(
    "body",
    [
        _inputs_with(True),
        _inputs_with(False),
        _inputs_with("0.5"),
        _inputs_with(None),
        _inputs_with({"a": 1}),
        _inputs_with([0.5]),
        _inputs_with(10**70),
        json.dumps({"inputs": True}).encode(),
        json.dumps({"inputs": [[[[[[[0.5]]]]]]]}).encode(),
        b'{"inputs": [[[[NaN, 0, 0, 0, 0, 0, 0, 0]]]]}',
        b'{"inputs": [], "inputs": []}',
        b"[" * 50_000,
    ],
)
def test_junk_inputs_are_refused_with_a_json_error(served, body):
    with served.connect() as sock:
        status, headers, answer = _exchange(sock, _post(body))
        assert status == 400 and set(answer) == {"error"}, answer
        assert "\n" not in answer["error"]
        # A refused body is a well-framed request: the connection stays usable.
        ok = json.dumps({"inputs": torch.zeros(1, *SHAPE).tolist()}).encode()
        assert _exchange(sock, _post(ok))[0] == 200


# --- (f) idle sockets cost no thread -------------------------------------------------------------------


def test_idle_sockets_do_not_grow_threads(served):
    with served.connect() as sock:  # let the worker pool start
        for _ in range(2 * MAX_CONCURRENT_REQUESTS):
            body = json.dumps({"inputs": torch.zeros(1, *SHAPE).tolist()}).encode()
            assert _exchange(sock, _post(body))[0] == 200
    before = served.threads()
    socks = [served.connect() for _ in range(300)]
    try:
        for sock in socks[::2]:
            sock.sendall(b"GET /info HTTP/1.1\r\n")  # half a request
        time.sleep(1.0)
        assert served.threads() <= before + MAX_CONCURRENT_REQUESTS
        with served.connect() as sock:  # still answering
            assert _exchange(sock, b"GET /info HTTP/1.1\r\n\r\n")[0] == 200
    finally:
        for sock in socks:
            sock.close()


# --- servers in a thread, with limits lowered -------------------------------------------------------


@pytest.fixture
def start(make_ticket) -> Iterator[Callable[..., str]]:
    servers = []

    def run(**limits) -> str:
        service = PredictionService(
            make_ticket(seed=3).build_model(),
            input_shape=SHAPE,
            normalization=pixel_normalization("digits", split_seed=0),
            device=torch.device("cpu"),
            description="test model",
        )
        server = make_server(service, "127.0.0.1", 0, **limits)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server.url

    yield run
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def test_slowloris_is_closed_at_the_header_deadline(start):
    url = start(header_timeout=1.0)
    with socket.create_connection(_address(url), timeout=10) as sock:
        began = time.monotonic()
        sock.sendall(b"GET /info HTTP/1.1\r\n")
        closed = None
        for _ in range(100):  # one header byte every 0.1 s: 10 s if nobody stops it
            try:
                sock.sendall(b"X")
                sock.settimeout(0.1)
                if sock.recv(1) == b"":
                    closed = time.monotonic() - began
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = time.monotonic() - began
                break
    assert closed is not None and 0.9 <= closed < 2.5, closed
    # A quick client meanwhile is answered.
    with socket.create_connection(_address(url), timeout=10) as sock:
        assert _exchange(sock, b"GET /info HTTP/1.1\r\n\r\n")[0] == 200


def test_a_body_that_never_comes_is_answered_408(start):
    url = start(body_timeout=0.5)
    with socket.create_connection(_address(url), timeout=10) as sock:
        began = time.monotonic()
        status, _, answer = _exchange(
            sock, b"POST /predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"
        )
        assert status == 408 and "within 0.5 s" in answer["error"]
        assert time.monotonic() - began < 2.0


def test_announced_bodies_that_never_come_hold_no_budget(start, make_ticket):
    """The body budget is taken as bytes arrive: silent announcers cannot starve real POSTs."""
    url = start(body_buffer_bytes=4096, body_timeout=5.0)
    silent = []
    try:
        for _ in range(4):  # each announces more than the whole budget, then sends nothing
            sock = socket.create_connection(_address(url), timeout=10)
            sock.sendall(b"POST /predict HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
            silent.append(sock)
        time.sleep(0.2)
        body = json.dumps({"inputs": torch.zeros(1, *SHAPE).tolist()}).encode()
        assert len(body) < 4096
        began = time.monotonic()
        with socket.create_connection(_address(url), timeout=10) as sock:
            status, _, answer = _exchange(sock, _post(body))
        assert status == 200 and len(answer["labels"]) == 1
        assert time.monotonic() - began < 2.0
    finally:
        for sock in silent:
            sock.close()


def test_connections_over_the_cap_get_503(start):
    url = start(max_connections=5)
    held = [socket.create_connection(_address(url), timeout=10) for _ in range(5)]
    try:
        for sock in held:  # each is accepted and answers
            assert _exchange(sock, b"GET /info HTTP/1.1\r\n\r\n")[0] == 200
        with socket.create_connection(_address(url), timeout=10) as extra:
            status, headers, answer = _exchange(extra, b"GET /info HTTP/1.1\r\n\r\n")
        assert status == 503 and "5 connections open" in answer["error"]
        assert headers["retry-after"] == "1"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    with socket.create_connection(_address(url), timeout=10) as sock:
        assert _exchange(sock, b"GET /info HTTP/1.1\r\n\r\n")[0] == 200


def test_keep_alive_expect_and_head(start):
    url = start()
    with socket.create_connection(_address(url), timeout=10) as sock:
        body = json.dumps({"inputs": torch.zeros(2, *SHAPE).tolist()}).encode()
        head = (
            f"POST /predict HTTP/1.1\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        )
        sock.sendall(head.encode())
        assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        status, headers, answer = _exchange(sock, body)
        assert status == 200 and len(answer["labels"]) == 2 and "connection" not in headers
        sock.sendall(b"HEAD /info HTTP/1.1\r\n\r\n")
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
        assert _exchange(sock, b"GET /info HTTP/1.0\r\n\r\n")[1]["connection"] == "close"


# --- (g) the client's deadline and caps -------------------------------------------------------------


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A one-thread raw-socket server running `answer(conn)` for each connection."""
    listeners = []

    def run(answer: Callable[[socket.socket], None]) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=_serve_one, args=(conn, answer), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield run
    for listener in listeners:
        listener.close()


def _serve_one(conn: socket.socket, answer: Callable[[socket.socket], None]) -> None:
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        try:
            answer(conn)
        except OSError:
            pass


def _drip(text: bytes) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        for byte in text:
            conn.sendall(bytes([byte]))
            time.sleep(0.1)

    return answer


INFO = {
    "protocol": "ticketguard-predict/1",
    "input_shape": [1, 8, 8],
    "normalization": {"mean": [0.3], "std": [0.37]},
}


def _info_bytes(info: object) -> bytes:
    body = json.dumps(info).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


@pytest.mark.parametrize(
    "answer",
    [
        _info_bytes(INFO),  # the body drips
        b"HTTP/1.1 200 OK\r\n" + b"X-Pad: y\r\n" * 40,  # the headers drip
    ],
    ids=["body", "headers"],
)
def test_dripping_info_fails_within_the_deadline(raw_server, answer):
    url = raw_server(_drip(answer))
    suspect = HttpSuspect(url, send="png", timeout=1.0)
    began = time.monotonic()
    with pytest.raises(EndpointError) as caught:
        suspect.server_info()
    assert time.monotonic() - began < 2.0
    assert str(caught.value) == f"{url}/info: no answer within 1 s"


def test_dripping_info_stops_png_verification(raw_server):
    from ticketguard.verify.verification import _png_normalization_warning

    url = raw_server(_drip(_info_bytes(INFO)))
    began = time.monotonic()
    with pytest.raises(EndpointError, match="no answer within 1 s"):
        _png_normalization_warning(
            HttpSuspect(url, send="png", timeout=1.0), {"mean": [0.3], "std": [0.37]}
        )
    assert time.monotonic() - began < 2.0


def test_a_huge_normalization_prints_short(raw_server):
    from ticketguard.verify.verification import _png_normalization_warning

    values = [0.5] * 100_000
    info = dict(INFO, normalization={"mean": values, "std": values})
    url = raw_server(lambda conn: conn.sendall(_info_bytes(info)))
    suspect = HttpSuspect(url, send="png", timeout=5.0)
    served = suspect.server_info()["normalization"]
    assert served["mean"] == values  # every value is there to compare
    assert str(served["mean"]) == "[0.5, 0.5, 0.5, 0.5, ... (100000 values)]"
    began = time.monotonic()
    warning = _png_normalization_warning(suspect, {"mean": [0.3], "std": [0.37]})
    assert time.monotonic() - began < 2.0
    assert warning is not None and len(warning) < 400 and "(100000 values)" in warning


def test_an_info_over_the_cap_is_refused(raw_server):
    values = [0.5] * 300_000  # the red team sent 3 M; 300 k is already over the cap
    body = json.dumps({"normalization": {"mean": values, "std": values}}).encode()
    url = raw_server(
        lambda conn: conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
    )
    with pytest.raises(EndpointError) as caught:
        HttpSuspect(url, timeout=5.0).server_info()
    assert str(caught.value) == f"{url}/info: the answer is larger than {MAX_INFO_BYTES} bytes"
    # Without a Content-Length, the read stops at the cap too.
    url = raw_server(
        lambda conn: conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + body[: 2 * MAX_INFO_BYTES])
    )
    with pytest.raises(EndpointError, match="larger than"):
        HttpSuspect(url, timeout=5.0).server_info()


def test_info_from_a_server_without_one_is_none(raw_server):
    url = raw_server(
        lambda conn: conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    )
    assert HttpSuspect(url, timeout=5.0).server_info() is None
    url = raw_server(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnope"))
    assert HttpSuspect(url, timeout=5.0).server_info() is None


def test_predict_headers_dripping_fail_within_the_deadline(raw_server):
    url = raw_server(_drip(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: y\r\n" * 40))
    suspect = HttpSuspect(url, timeout=1.0, retries=0)
    began = time.monotonic()
    with pytest.raises(EndpointError, match=r"no answer within 1.0 s \(1 attempt\)"):
        suspect.predict(torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE, dtype=torch.uint8))
    assert time.monotonic() - began < 2.0
