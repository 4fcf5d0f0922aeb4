"""W3 on a ResNet-18-sized layer: keyed placement, writing, cropping and reading a QR window.

The layer is a 512x512x3x3 conv weight (ResNet-18's layer4 convs, 2.36 M weights) with a random
90%-sparse mask. Timed, each the median of a few runs: the keyed placement (capacity check and
window draw), the window's flat indices, writing the code with the count restored, the crop of
the window out of the channel connectivity, and the full reading (data-module comparison and the
zxing-cpp decode). The placement and the crop are vectorised: no Python loop per module.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ticketguard.signatures.w3 import (
    crop_window,
    make_symbol,
    plan_qr,
    read_qr,
    window_positions,
    write_qr,
)
from ticketguard.tickets.mask import Mask

SHAPE = (512, 512, 3, 3)
DENSITY = 0.10
REPEATS = 5
TEXT = "alice@example.org 2026-11-22"


def _median_seconds(run: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    name = "layer4.0.conv2.weight"
    mask = Mask({name: torch.rand(SHAPE, generator=gen) < DENSITY})
    weights = {name: torch.randn(SHAPE, generator=gen) * mask[name]}
    rewind = {name: torch.randn(SHAPE, generator=gen)}
    symbol = make_symbol(TEXT)
    seed = bytes(range(32))
    params = plan_qr(mask, name, symbol, seed)
    signed = write_qr(mask, weights, rewind, params).mask
    reading = read_qr(signed, params)
    assert reading is not None and reading.mismatches == 0 and reading.decoded == TEXT
    size = params.size
    print(
        f"layer {name} {'x'.join(map(str, SHAPE))}, {100 * DENSITY:.0f}% dense; "
        f"QR version {symbol.version} ({size}x{size}) at ({params.row}, {params.col})"
    )
    rows = [
        ("keyed placement (plan_qr)", lambda: plan_qr(mask, name, symbol, seed)),
        ("window indices", lambda: window_positions(params)),
        ("write with count restored", lambda: write_qr(mask, weights, rewind, params)),
        ("crop the window", lambda: crop_window(signed, params)),
        ("read: compare and decode", lambda: read_qr(signed, params)),
    ]
    for label, run in rows:
        print(f"  {label:<28} {1000 * _median_seconds(run):9.2f} ms")


if __name__ == "__main__":
    main()
