"""`ticketguard serve` under load: 50 concurrent clients, one sample and 64 samples per request.

The server runs in its own process (an untrained DigitsCNN, 1x8x8, CPU, the default limits)
and 50 client threads in this one each keep one `HttpSuspect` connection (`send="tensor"`, no
retries, so every failure counts) and send requests back to back. Printed: requests per second
at batch 1 and images per second at batch 64, failed requests, and the figures the red team
measured on the previous `http.server`-based server (issue 13): 293 requests/s at batch 1 and
3,410 images/s at batch 64, with 27 of 10,000 and 32 of 1,000 requests reset.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import torch

from ticketguard.errors import EndpointError
from ticketguard.verify.blackbox import HttpSuspect

CLIENTS = 50
#: (samples per request, requests per client, the old server's figure, its unit)
CASES = [(1, 200, 293.0, "requests/s"), (64, 20, 3410.0, "images/s")]

#: Started with `python -c`: builds the server, prints its URL, serves until killed.
SERVER = """
import sys, torch
from ticketguard.tickets.data import pixel_normalization
from ticketguard.tickets.models import build_model
from ticketguard.verify.server import PredictionService, make_server
torch.manual_seed(0)
torch.set_num_threads(1)
service = PredictionService(build_model("digits_cnn", 10), input_shape=(1, 8, 8),
    normalization=pixel_normalization("digits"), device=torch.device("cpu"), description="bench")
server = make_server(service, "127.0.0.1", 0)
print(server.url, flush=True)
server.serve_forever()
"""


def start_server() -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise RuntimeError("the server did not start")
    return proc, url


def load(url: str, clients: int, requests: int, batch: int) -> tuple[float, int, int]:
    """`clients` threads send `requests` requests of `batch` samples each; (seconds, ok, failed)."""
    inputs = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = torch.zeros(batch, 1, 8, 8, dtype=torch.uint8)
    counts = [0, 0]
    lock = threading.Lock()
    go = threading.Barrier(clients + 1)

    def client() -> None:
        ok = failed = 0
        with HttpSuspect(url, timeout=60.0, retries=0) as suspect:
            go.wait()
            for _ in range(requests):
                try:
                    suspect.predict(inputs, images)
                    ok += 1
                except EndpointError:
                    failed += 1
        with lock:
            counts[0] += ok
            counts[1] += failed

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    go.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, counts[0], counts[1]


def main() -> dict[str, float]:
    figures: dict[str, float] = {}
    proc, url = start_server()
    try:
        load(url, 4, 20, 1)  # warm up
        for batch, requests, old, unit in CASES:
            seconds, ok, failed = load(url, CLIENTS, requests, batch)
            rate = ok * (1 if batch == 1 else batch) / seconds
            figures[f"serve_b{batch}"] = rate
            figures[f"serve_b{batch}_failed"] = failed
            print(
                f"serve, {CLIENTS} clients, batch {batch:>2}: {ok + failed:>5} requests, "
                f"{failed} failed, {rate:7.0f} {unit} (old server: {old:.0f} {unit}, "
                f"x{rate / old:.1f})",
                flush=True,
            )
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return figures


if __name__ == "__main__":
    main()
