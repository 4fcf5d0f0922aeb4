"""Fuzz the command line with hostile inputs (issue 13): each must be refused cleanly.

Every case runs `python -m ticketguard ...` in a subprocess in a fresh folder, with a 30 s
timeout and a 2 GiB memory budget (tests/fuzz/harness.py), and must end `clean`: a non-zero
exit with one `Error:` line (or verify's / dispute's documented exit 1), no traceback, no hang,
nothing over budget, no payload run, no file left behind. The quick set runs by default; the
wide run (every hand-written case on every command, TICKETGUARD_FUZZ_SEEDS mutation seeds per
file type, 1 by default so `make test-all` stays near 15 minutes, and the raw HTTP cases) is
marked slow. `scripts/fuzz.py` runs the same cases standalone, with as many seeds as asked.

The selected cases run together, two at a time, the first time one of them is asked for.
"""

from __future__ import annotations

import os

import pytest
from fuzz import generators, harness

QUICK = generators.quick_cases()
WIDE = generators.wide_cases(range(int(os.environ.get("TICKETGUARD_FUZZ_SEEDS", "1"))))
CASES = {c.id: c for c in QUICK + WIDE}


@pytest.fixture(scope="session")
def fuzz_outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Run every selected fuzz case once (in parallel) and map case id -> Outcome."""
    selected = [
        item.callspec.params["case_id"]
        for item in request.session.items
        if getattr(item, "callspec", None) is not None and "case_id" in item.callspec.params
    ]
    cases = [CASES[i] for i in dict.fromkeys(selected)]
    root = tmp_path_factory.mktemp("fuzz")
    base = generators.Base(root / "base")
    outcomes = harness.run_cases(cases, base, root / "cases", workers=2)
    summary = harness.summarize(outcomes)
    harness.write_summary(summary, root / "summary.json")
    return {"by_id": {o.case: o for o in outcomes}, "summary": summary}


def _check(case_id: str, fuzz_outcomes) -> None:
    outcome = fuzz_outcomes["by_id"][case_id]
    assert outcome.kind == "clean", outcome.describe()


@pytest.mark.parametrize("case_id", [c.id for c in QUICK])
def test_quick(case_id: str, fuzz_outcomes) -> None:
    _check(case_id, fuzz_outcomes)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [c.id for c in WIDE])
def test_wide(case_id: str, fuzz_outcomes) -> None:
    _check(case_id, fuzz_outcomes)


def test_summary(fuzz_outcomes, capsys: pytest.CaptureFixture[str]) -> None:
    """Print the counts (inputs tried, clean, tracebacks, hangs, memory, accepted)."""
    summary = fuzz_outcomes["summary"]
    with capsys.disabled():
        print("\n" + harness.format_summary(summary))
    assert summary["inputs"] == len(fuzz_outcomes["by_id"])


def test_generators_are_deterministic(tmp_path) -> None:
    """The same seed writes the same bytes; the case ids do not depend on anything else."""
    assert [c.id for c in generators.quick_cases()] == [c.id for c in QUICK]
    import random

    data = bytes(range(256)) * 4
    a = generators.flip_bytes(data, random.Random("x"), 3)
    assert a == generators.flip_bytes(data, random.Random("x"), 3) and a != data
    doc = b'{"a":1,"b":{"c":[1,2]}}'
    assert generators.mutate_json(doc, random.Random("s:1")) == generators.mutate_json(
        doc, random.Random("s:1")
    )


def test_harness_classifies(tmp_path) -> None:
    """The harness tells a clean refusal from a traceback, a hang and a blow-up (no CLI)."""
    import sys

    def run(code: str, timeout: float = 5.0) -> harness.RawResult:
        w = harness.Watched(
            [sys.executable, "-c", code], tmp_path, harness.child_env(tmp_path), tmp_path / "logs"
        )
        w.wait(timeout)
        return w.result()

    inv = harness.Invocation([], tmp_path)
    clean = run("import sys; print('Error: no', file=sys.stderr); sys.exit(2)")
    assert harness.classify(inv, clean, [])[0] == "clean"
    assert harness.classify(inv, clean, ["junk.tmp"])[0] == "leftover"
    assert harness.classify(inv, run("raise ValueError('x')"), [])[0] == "traceback"
    assert harness.classify(inv, run("print('ok')"), [])[0] == "accepted"
    assert harness.classify(inv, run("import time; time.sleep(9)", 1.0), [])[0] == "hang"
    # Over the budget at once: the RLIMIT_DATA backstop refuses the allocation.
    big = run("b = bytearray(3 * 1024**3)")
    assert harness.classify(inv, big, [])[0] == "memory"
    # Growing past it through file-backed pages (not data): the RSS poller kills it.
    with open(tmp_path / "big", "wb") as f:
        f.truncate(3 * 1024**3)
    grow = run(
        "import mmap\n"
        "f = open('big', 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "s = sum(m[i] for i in range(0, len(m), 4096))\n",
        30.0,
    )
    (tmp_path / "big").unlink()
    assert grow.over_memory and harness.classify(inv, grow, [])[0] == "memory"
    assert grow.peak_rss > harness.MEMORY_BUDGET
