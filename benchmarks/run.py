"""Run every benchmark and print its figures (`make bench`)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHMARKS = [
    "bench_masked_step",
    "bench_whitebox",
    "bench_graphstats",
    "bench_blackbox",
    "bench_w3",
    "bench_attacks",
    "bench_grind",
    "bench_serve",
]


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for name in BENCHMARKS:
        print(f"== {name} ==", flush=True)
        importlib.import_module(name).main()
        print()


if __name__ == "__main__":
    main()
