"""Run the CLI fuzz suite standalone and print the counts (for the README).

    .venv/bin/python scripts/fuzz.py                 # the quick set
    .venv/bin/python scripts/fuzz.py --seeds 8       # the quick set and the wide run, 8 seeds
    .venv/bin/python scripts/fuzz.py --seeds 2 --only checkpoint,bench --json summary.json

Every input runs through `python -m ticketguard` in a subprocess with a 30 s timeout and a
2 GiB memory budget (see tests/fuzz/harness.py). Exit code 0 when every input was refused
cleanly, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fuzz import generators, harness  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, default=0, help="Mutation seeds of the wide run (0: quick set only)."
    )
    parser.add_argument("--only", default="", help="Comma-separated input classes to run.")
    parser.add_argument("--workers", type=int, default=2, help="Cases run at once.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the summary here.")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder and print it.")
    args = parser.parse_args()

    cases = generators.quick_cases()
    if args.seeds > 0:
        cases += generators.wide_cases(range(args.seeds))
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c.klass in wanted]
    work = Path(tempfile.mkdtemp(prefix="ticketguard-fuzz-"))
    try:
        base = generators.Base(work / "base")
        print(f"{len(cases)} inputs; building the valid base files...", flush=True)
        outcomes = []
        for outcome in _run(cases, base, work / "cases", args.workers):
            outcomes.append(outcome)
            print(f"  {outcome.kind:<9} {outcome.case} ({outcome.seconds:.1f} s)", flush=True)
        summary = harness.summarize(outcomes)
        print(harness.format_summary(summary))
        if args.json:
            harness.write_summary(summary, args.json)
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["clean"] == summary["inputs"] else 1


def _run(cases, base, root, workers):
    from concurrent.futures import ThreadPoolExecutor

    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from pool.map(lambda c: harness.run_case(c, base, root), cases)


if __name__ == "__main__":
    sys.exit(main())
