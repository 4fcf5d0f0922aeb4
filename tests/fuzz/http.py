"""Raw-socket HTTP cases: malformed requests to `ticketguard serve`, misbehaving endpoints for
`verify --endpoint`. Both run under the same limits as the other cases (harness.Watched).

serve: the server is started on a free port, attacked, then asked for /info on a fresh
connection (it must still answer within 5 s) and stopped with SIGTERM. Clean means the attack
got the documented 4xx answer (or a closed connection), the server stayed up, under budget and
without a traceback. A dripping client must be dropped within 25 s.

endpoint: a fake server in this process misbehaves (drips /info, sends a 10 GB /info, garbage,
booleans, a huge label list, or nothing); `verify --endpoint` must exit 2 with one `Error:` line.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import harness
from .harness import Invocation, RawResult, Watched

INFO = {
    "protocol": "ticketguard-predict/1",
    "model": "alice.ticket (digits_cnn)",
    "architecture": "digits_cnn",
    "input_shape": [1, 8, 8],
    "num_classes": 10,
    "accepts": ["inputs"],
    "max_batch": 1024,
    "max_body_bytes": 67108864,
    "normalization": None,
}


def _request(host: str, port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send `raw` on a fresh connection and read the answer until close or timeout."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except OSError:
            pass
        chunks = []
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except OSError:
            pass
        return b"".join(chunks)


def _complete(resp: bytes) -> bool:
    head, _, body = resp.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _status(resp: bytes) -> int | None:
    try:
        return int(resp.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def _post(body: bytes, extra: str = "") -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body


def _expect_4xx(resp: bytes, what: str) -> tuple[str | None, str]:
    status = _status(resp)
    if status == 200:
        return "accepted", f"{what}: answered 200: {resp[-200:]!r}"
    if status is None or 400 <= status < 500 or not resp:
        return None, f"{what}: status {status}"
    return "crash", f"{what}: status {status}: {resp[-200:]!r}"


def _shape(value: object) -> list:
    return [[[[value] * 8] * 8]]


ATTACKS: dict[str, Callable[[str, int], tuple[str | None, str]]] = {}


def attack(name: str):
    def register(func):
        ATTACKS[name] = func
        return func

    return register


@attack("duplicate-content-length")
def _dup_cl(host: str, port: int):
    body = json.dumps({"inputs": _shape(0.5)}).encode()
    raw = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Length: 5\r\nConnection: close\r\n\r\n"
    ).encode() + body
    return _expect_4xx(_request(host, port, raw), "two Content-Length headers")


@attack("oversized-body")
def _oversized(host: str, port: int):
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(head)
        sent, start = 0, time.monotonic()
        try:
            while sent < 512 * 1024**2 and time.monotonic() - start < 15:
                s.sendall(b"[" * 65536)
                sent += 65536
        except OSError:
            pass
        try:
            resp = s.recv(65536)
        except OSError:
            resp = b""
    if sent >= 512 * 1024**2:
        return "hang", "the server read 512 MiB of a body announced as 1 TB"
    return _expect_4xx(resp, f"1 TB Content-Length (sent {sent >> 20} MiB)")


@attack("booleans-as-inputs")
def _booleans(host: str, port: int):
    body = json.dumps({"inputs": _shape(True)}).encode()
    return _expect_4xx(_request(host, port, _post(body)), "booleans as inputs")


@attack("nan-inputs")
def _nan(host: str, port: int):
    return _expect_4xx(
        _request(
            host,
            port,
            _post(
                b'{"inputs": ' + json.dumps(_shape(0.5)).replace("0.5", "NaN", 1).encode() + b"}"
            ),
        ),
        "NaN input",
    )


@attack("deep-json-body")
def _deep(host: str, port: int):
    body = b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    return _expect_4xx(_request(host, port, _post(body)), "200k-deep body")


@attack("slow-header-drip")
def _drip(host: str, port: int):
    """20 clients drip a header a byte every 0.5 s; others must be served, drips dropped."""
    socks = []
    for _ in range(20):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Drip: ")
        socks.append(s)
    start, open_ = time.monotonic(), set(range(len(socks)))
    served = None
    while open_ and time.monotonic() - start < 25:
        for i in list(open_):
            try:
                socks[i].sendall(b"a")
            except OSError:
                open_.discard(i)
        if served is None and time.monotonic() - start > 2:
            t = time.monotonic()
            try:
                resp = _request(
                    host, port, b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5
                )
            except OSError:
                resp = b""
            served = _status(resp) == 200 and time.monotonic() - t < 5
            if not served:
                for s in socks:
                    s.close()
                return "hang", "GET /info got no answer while 20 clients dripped headers"
        time.sleep(0.5)
    for s in socks:
        s.close()
    if open_:
        return "hang", f"{len(open_)} dripping connections still open after 25 s"
    return None, "drips dropped, others served"


def _serve_runner(name: str):
    def run(inv: Invocation, case_dir: Path, logs: Path) -> RawResult:
        w = Watched(
            [*harness.cli_command(), *map(str, inv.argv)],
            inv.cwd,
            harness.child_env(case_dir),
            logs,
        )
        url, kind, detail = None, None, ""
        while url is None and not w.poll() and time.monotonic() - w.start < harness.TIMEOUT_S:
            text = w.out_path.read_text(errors="replace")
            if " at http://" in text:
                url = text.split(" at http://", 1)[1].split()[0]
            time.sleep(0.05)
        if url is None:
            w.stop(signal.SIGKILL)
            raw = w.result()
            raw.kind, raw.detail = "crash", f"the server did not start: {raw.stderr[-300:]}"
            return raw
        host, port = url.split("/")[0].rsplit(":", 1)
        verdict: list = []
        t = threading.Thread(
            target=lambda: verdict.append(ATTACKS[name](host, int(port))), daemon=True
        )
        t.start()
        while t.is_alive() and not w.poll() and time.monotonic() - w.start < 60:
            time.sleep(harness.POLL_S)
        t.join(timeout=0.1)
        if w.over_memory:
            pass
        elif not verdict:
            kind, detail = "hang", f"the {name} attack did not finish"
        else:
            kind, detail = verdict[0]
            if kind is None and w.status is None:
                resp = _request(
                    host,
                    int(port),
                    b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    5,
                )
                if _status(resp) != 200:
                    kind, detail = "hang", f"after {name}, GET /info got {resp[:80]!r}"
            elif kind is None:
                kind, detail = "crash", f"the server died (exit {w.proc.returncode})"
        w.stop(signal.SIGTERM)
        raw = w.result()
        raw.kind, raw.detail = kind or "clean", detail
        return raw

    return run


class FakeEndpoint:
    """A misbehaving HTTP server on 127.0.0.1: `respond(conn, request_head)` per connection."""

    def __init__(self, respond: Callable[[socket.socket, bytes], None]):
        self.respond = respond
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            self.respond(conn, head)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def _ok(conn: socket.socket, body: bytes) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body)
        + body
    )


def _info_or(predict: Callable[[socket.socket], None]):
    def respond(conn: socket.socket, head: bytes) -> None:
        if head.startswith(b"GET"):
            _ok(conn, json.dumps(INFO).encode())
        else:
            predict(conn)

    return respond


def _drip_info(conn: socket.socket, head: bytes) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    )
    for _ in range(400):
        time.sleep(0.1)
        conn.sendall(b" ")


def _huge_info(conn: socket.socket, head: bytes) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
    )
    chunk = b'{"a":"' + b"x" * (1 << 20)
    conn.settimeout(30)
    for _ in range(10_000):
        conn.sendall(chunk)


def _huge_info_no_length(conn: socket.socket, head: bytes) -> None:
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n")
    conn.settimeout(30)
    for _ in range(10_000):
        conn.sendall(b" " * (1 << 20))


def _garbage_info(conn: socket.socket, head: bytes) -> None:
    _ok(conn, bytes(range(256)) * 4)


def _bool_info(conn: socket.socket, head: bytes) -> None:
    _ok(conn, json.dumps({**INFO, "input_shape": [True, 8, 8], "num_classes": True}).encode())


def _silent(conn: socket.socket, head: bytes) -> None:
    time.sleep(40)


def _huge_labels(conn: socket.socket) -> None:
    _ok(conn, b'{"labels": [' + b"1," * 20_000_000 + b"1]}")


def _bool_labels(conn: socket.socket) -> None:
    _ok(conn, json.dumps({"labels": [True] * 16}).encode())


ENDPOINTS = {
    "info-drip": _drip_info,
    "info-10gb": _huge_info,
    "info-unbounded": _huge_info_no_length,
    "info-garbage": _garbage_info,
    "info-booleans": _bool_info,
    "silent": _silent,
    "predict-20m-labels": _info_or(_huge_labels),
    "predict-boolean-labels": _info_or(_bool_labels),
}


def _endpoint_runner(name: str):
    def run(inv: Invocation, case_dir: Path, logs: Path) -> RawResult:
        fake = FakeEndpoint(ENDPOINTS[name])
        try:
            argv = [*inv.argv, "--endpoint", f"http://127.0.0.1:{fake.port}/predict"]
            w = Watched(
                [*harness.cli_command(), *map(str, argv)],
                inv.cwd,
                harness.child_env(case_dir),
                logs,
            )
            w.wait(harness.TIMEOUT_S)
            return w.result()
        finally:
            fake.close()

    return run


def http_cases() -> list:
    from .generators import Case

    def serve_case(name: str):
        def build(case_dir: Path, base) -> Invocation:
            argv = ["serve", base.signed["ticket"], "--port", "0", "--device", "cpu"]
            return Invocation(argv, case_dir, runner=_serve_runner(name))

        return Case(f"serve/{name}", build, True)

    def endpoint_case(name: str):
        def build(case_dir: Path, base) -> Invocation:
            s = base.signed_triggers
            argv = ["verify", "--credential", s["cred"], "--key", s["key"], "--timeout", "2",
                    "--retries", "0", "--device", "cpu"]  # fmt: skip
            return Invocation(argv, case_dir, runner=_endpoint_runner(name))

        return Case(f"endpoint/{name}", build, True)

    return [serve_case(n) for n in ATTACKS] + [endpoint_case(n) for n in ENDPOINTS]
