"""Black-box querying over real HTTP: batched requests against one sample per request.

A `ticketguard-predict/1` server runs in this process (a thread, loopback, CPU model) and
`HttpSuspect` asks it for the labels of random uint8 images, as model-ready floats
(`send="tensor"`) and as PNG files (`send="png"`), with 1, 64 and 512 samples per request.
Printed: samples (queries) per second for each, and each batch size's speed-up over one sample
per request in the same mode. Models: an untrained DigitsCNN (1x8x8, 512 images) and an untrained
ResNet-20 (3x32x32, 256 images); the server's answers must equal the model's own argmax.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from torch import nn

from ticketguard.tickets.data import pixel_normalization
from ticketguard.tickets.models import build_model
from ticketguard.verify.blackbox import HttpSuspect, query_labels
from ticketguard.verify.server import PredictionService, make_server, normalize_pixels

BATCH_SIZES = (1, 64, 512)
SEND_MODES = ("tensor", "png")
CASES = [
    # (architecture, input shape, images, dataset whose pixel normalization the server uses)
    ("digits_cnn", (1, 8, 8), 512, "digits"),
    ("resnet20", (3, 32, 32), 256, "cifar10"),
]


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, 10).eval()


def bench_case(
    arch: str,
    shape: tuple[int, int, int],
    count: int,
    dataset: str,
) -> dict[str, float]:
    normalization = pixel_normalization(dataset)
    model = _model(arch)
    service = PredictionService(
        model,
        input_shape=shape,
        normalization=normalization,
        device=torch.device("cpu"),
        description=arch,
    )
    server = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, *shape), generator=gen, dtype=torch.uint8)
    inputs = normalize_pixels(images, *normalization)
    with torch.no_grad():
        expected = model(inputs).argmax(1).numpy()
    figures: dict[str, float] = {}
    try:
        for send in SEND_MODES:
            with HttpSuspect(server.url, send=send, timeout=60.0) as suspect:
                query_labels(suspect, inputs[:8], images[:8], batch_size=8)  # warm up
                base = None
                for batch in BATCH_SIZES:
                    start = time.perf_counter()
                    result = query_labels(suspect, inputs, images, batch_size=batch)
                    qps = count / (time.perf_counter() - start)
                    if not np.array_equal(result.labels, expected):
                        raise AssertionError(f"{arch} {send} batch {batch}: labels differ")
                    base = base or qps
                    figures[f"{arch}_{send}_b{batch}_qps"] = qps
                    ratio = f"  x{qps / base:6.1f} vs one at a time" if batch > 1 else ""
                    print(
                        f"{arch:<11} {'x'.join(map(str, shape)):<8} send={send:<6} "
                        f"batch {batch:>3}: {result.requests:>3} requests, {qps:9.0f} queries/s"
                        f"{ratio}",
                        flush=True,
                    )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return figures


def main() -> dict[str, float]:
    figures: dict[str, float] = {}
    for arch, shape, count, dataset in CASES:
        start = time.perf_counter()
        figures.update(bench_case(arch, shape, count, dataset))
        print(f"{arch}: {time.perf_counter() - start:.1f} s in all", flush=True)
    return figures


if __name__ == "__main__":
    main()
