"""Run one hostile input through the real CLI in a subprocess and classify the outcome.

Limits: a wall-clock timeout (30 s) and a memory budget (2 GiB). RLIMIT_AS cannot enforce the
budget: torch's shared libraries reserve address space and `import torch` fails under it
("libtorch_cpu.so: failed to map segment"). So the budget is enforced twice:

- RLIMIT_DATA (private writable memory) at the budget, a hard backstop that makes a single
  oversized allocation fail at once (torch imports fine under it), and
- a poller that reads VmRSS/VmHWM from /proc/PID/status every 20 ms and kills the process group
  past the budget (this also catches file-backed pages, e.g. an mmap of a huge file).

The peak RSS is the last VmHWM the poller read (wait4's ru_maxrss would count the parent's RSS
at the fork, which Linux carries over exec).
Each case runs with its own TMPDIR, inside the case folder, so stray temporary files are seen.

Outcomes, worst first:

- `memory`: over the budget (killed by the poller, or an allocation refused by the backstop);
- `hang`: still running at the timeout;
- `executed`: a malicious pickle ran its payload (the marker file exists);
- `traceback`: "Traceback" or "failed unexpectedly" in the output;
- `accepted`: exit code 0 for an input that must be refused;
- `crash`: refused, but not cleanly (killed by a signal, or no single `Error:` line);
- `leftover`: refused cleanly, but files remain in the case folder or its TMPDIR;
- `clean`: non-zero exit with exactly one stderr line starting with `Error:`, or (where the
  command documents it: verify, dispute) exit 1 "not verified"/"undecided" with no traceback.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Wall-clock limit of one command, seconds.
TIMEOUT_S = 30.0
#: Memory budget of one command, bytes.
MEMORY_BUDGET = 2 * 1024**3
#: How often the poller reads /proc/PID/status.
POLL_S = 0.02
#: Outcome kinds, worst first (the summary lists them in this order).
KINDS = ("memory", "hang", "executed", "traceback", "accepted", "crash", "leftover", "clean")
#: Signs in the output that the RLIMIT_DATA backstop refused an allocation.
ALLOCATION_FAILED = (
    "MemoryError",
    "Cannot allocate memory",
    "can't allocate memory",
    "std::bad_alloc",
)
#: Files a subprocess may create in its case folder whatever it does (Python's bytecode caches).
IGNORED_NAMES = ("__pycache__",)


@dataclass
class Invocation:
    """One command to run: `ticketguard ARGV` in `cwd`, and what counts as a clean refusal."""

    argv: Sequence[str]
    cwd: Path
    #: Exit 1 without a traceback is the documented "not verified" / "undecided" answer.
    allow_not_verified: bool = False
    #: Exit 0 is fine too: a mutant of a valid file may still be a valid file.
    may_succeed: bool = False
    #: Paths (relative to the case folder, with everything under them) that may be created;
    #: none for a refused input.
    expected_outputs: frozenset[str] = frozenset()
    #: A file whose existence proves that a malicious payload ran.
    marker: Path | None = None
    #: Extra environment variables.
    env: dict[str, str] = field(default_factory=dict)
    #: A custom runner (HTTP cases): called as runner(self, limits) -> Outcome fields.
    runner: Callable[..., RawResult] | None = None


@dataclass
class RawResult:
    """What a process did: its exit code (None when it was killed by us), output and resources."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int
    timed_out: bool = False
    over_memory: bool = False
    #: A custom runner's own verdict (HTTP cases), or None to classify from the above.
    kind: str | None = None
    detail: str = ""


@dataclass
class Outcome:
    """The classified result of one case."""

    case: str
    kind: str
    returncode: int | None
    seconds: float
    peak_rss_mb: float
    detail: str

    def describe(self) -> str:
        return (
            f"{self.case}: {self.kind} (exit {self.returncode}, {self.seconds:.1f} s, "
            f"peak RSS {self.peak_rss_mb:.0f} MiB)\n{self.detail}"
        )


def cli_command() -> list[str]:
    """The real command line: this interpreter running the package."""
    return [sys.executable, "-m", "ticketguard"]


def _limits() -> None:  # runs in the child, between fork and exec
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_BUDGET, MEMORY_BUDGET))
    # A runaway writer must not fill the disk either (SIGXFSZ past 1 GiB).
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024**3, 1024**3))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Watched:
    """A process started under the limits, its output in files, watched by a poller."""

    def __init__(
        self, argv: Sequence[str], cwd: Path, env: dict[str, str], logs: Path, name: str = "cmd"
    ):
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            preexec_fn=_limits,
            start_new_session=True,
        )
        self.peak = 0
        self.status: int | None = None
        self.timed_out = self.over_memory = False

    def poll(self) -> bool:
        """Check the process once; True when it has finished (or been killed)."""
        if self.status is not None:
            return True
        rss = _status_kib(self.proc.pid, "VmRSS:") * 1024
        self.peak = max(self.peak, rss, _status_kib(self.proc.pid, "VmHWM:") * 1024)
        if self.peak > MEMORY_BUDGET:
            self.over_memory = True
            _kill_group(self.proc)
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.status = status
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        # Not usage.ru_maxrss: Linux carries it over exec, so it counts the parent's RSS at
        # the fork; VmHWM belongs to the new program alone.
        _kill_group(self.proc)  # grandchildren (workers) go with it
        return True

    def wait(self, timeout: float) -> None:
        deadline = self.start + timeout
        while not self.poll():
            if time.monotonic() > deadline:
                self.timed_out = True
                _kill_group(self.proc)
                deadline = float("inf")
            time.sleep(POLL_S)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Ask the process to stop, and kill it after `grace` seconds."""
        if self.status is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            end = time.monotonic() + grace
            while not self.poll():
                if time.monotonic() > end:
                    _kill_group(self.proc)
                    end = float("inf")
                time.sleep(POLL_S)

    def result(self) -> RawResult:
        self._out.close()
        self._err.close()
        text = lambda p: p.read_bytes().decode("utf-8", "replace")  # noqa: E731
        killed = self.timed_out or self.over_memory
        return RawResult(
            returncode=None if killed else self.proc.returncode,
            stdout=text(self.out_path),
            stderr=text(self.err_path),
            seconds=time.monotonic() - self.start,
            peak_rss=self.peak,
            timed_out=self.timed_out,
            over_memory=self.over_memory,
        )


def child_env(case_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a case's command: its own TMPDIR, a wide terminal, no CUDA."""
    tmp = case_dir / ".tmp"
    tmp.mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST", "COV_")) and k != "TICKETGUARD_PASSPHRASE"
    }
    repo = str(Path(__file__).resolve().parents[2])
    env.update(
        TMPDIR=str(tmp),
        TEMP=str(tmp),
        TMP=str(tmp),
        COLUMNS="300",
        CUDA_VISIBLE_DEVICES="",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=repo + os.pathsep + env.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    env.update(extra or {})
    return env


def run_invocation(inv: Invocation, case_dir: Path, logs: Path) -> RawResult:
    """Run the command of `inv` under the limits."""
    if inv.runner is not None:
        return inv.runner(inv, case_dir, logs)
    watched = Watched(
        [*cli_command(), *map(str, inv.argv)], inv.cwd, child_env(case_dir, inv.env), logs
    )
    watched.wait(TIMEOUT_S)
    return watched.result()


def snapshot(folder: Path) -> set[str]:
    """Every path under `folder`, relative, symlinks not followed."""
    found = set()
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in IGNORED_NAMES]
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(root, name), folder))
    return found


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _expected(path: str, expected: frozenset[str]) -> bool:
    return any(path == e or path.startswith(e + os.sep) for e in expected)


def classify(inv: Invocation, raw: RawResult, new_paths: Iterable[str]) -> tuple[str, str]:
    """The outcome kind of a finished command, and a short detail."""
    output = raw.stdout + "\n" + raw.stderr
    detail = raw.detail or (f"stderr: {_tail(raw.stderr)}" if raw.stderr.strip() else "")
    if raw.over_memory or any(sign in output for sign in ALLOCATION_FAILED):
        return "memory", detail or f"peak RSS {raw.peak_rss / 2**20:.0f} MiB"
    if raw.timed_out:
        return "hang", detail or f"killed after {TIMEOUT_S:.0f} s"
    if inv.marker is not None and inv.marker.exists():
        return "executed", f"the payload ran: {inv.marker} exists"
    if "Traceback" in output or "failed unexpectedly" in output:
        return "traceback", f"output: {_tail(output, 10)}"
    if raw.kind is not None:
        kind = raw.kind
    elif raw.returncode == 0 and inv.may_succeed:
        kind = "clean"
    elif raw.returncode == 0:
        kind = "accepted"
        detail = f"exit 0; stdout: {_tail(raw.stdout, 4)}"
    else:
        errors = [line for line in raw.stderr.splitlines() if line.startswith("Error:")]
        if len(errors) == 1 or (inv.allow_not_verified and raw.returncode == 1):
            kind = "clean"
        else:
            kind = "crash"
            detail = f"exit {raw.returncode}, {len(errors)} Error: lines; {detail}"
    if kind == "clean":
        left = sorted(p for p in new_paths if not _expected(p, inv.expected_outputs))
        if left:
            return "leftover", "left behind: " + ", ".join(left[:8])
    return kind, detail


def run_case(case: Any, base: Any, root: Path) -> Outcome:
    """Build `case` in a fresh folder under `root`, run it and classify the outcome."""
    case_dir = root / case.slug
    case_dir.mkdir(parents=True)
    logs = root / "_logs" / case.slug
    try:
        inv = case.build(case_dir, base)
    except Exception as exc:  # noqa: BLE001 - a generator bug is a result, not a crash of the run
        return Outcome(case.id, "crash", None, 0.0, 0.0, f"the generator failed: {exc!r}")
    (case_dir / ".tmp").mkdir(exist_ok=True)
    before = snapshot(case_dir)
    raw = run_invocation(inv, case_dir, logs)
    new = snapshot(case_dir) - before
    kind, detail = classify(inv, raw, new)
    return Outcome(
        case.id, kind, raw.returncode, round(raw.seconds, 2), round(raw.peak_rss / 2**20, 1), detail
    )


def run_cases(cases: Sequence[Any], base: Any, root: Path, workers: int = 2) -> list[Outcome]:
    """Run `cases` (a few at a time) and return their outcomes in the same order."""
    from concurrent.futures import ThreadPoolExecutor

    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda c: run_case(c, base, root), cases))


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts per outcome kind, per input class, and the cases that were not clean."""
    counts = Counter(o.kind for o in outcomes)
    per_class: dict[str, Counter] = {}
    for o in outcomes:
        per_class.setdefault(o.case.split("/")[0], Counter())[o.kind] += 1
    return {
        "inputs": len(outcomes),
        **{kind: counts.get(kind, 0) for kind in KINDS},
        "per_class": {k: dict(v) for k, v in sorted(per_class.items())},
        "peak_rss_mb": max((o.peak_rss_mb for o in outcomes), default=0.0),
        "failures": [asdict(o) for o in outcomes if o.kind != "clean"],
    }


def format_summary(summary: dict[str, Any], *, failures: bool = True) -> str:
    """The summary as text: one line of counts, one per class, then each failure."""
    head = (
        f"fuzz: {summary['inputs']} inputs tried, {summary['clean']} clean, "
        f"{summary['traceback']} tracebacks, {summary['hang']} hangs, {summary['memory']} memory, "
        f"{summary['accepted']} accepted, {summary['executed']} executed, "
        f"{summary['crash']} crashes, {summary['leftover']} leftovers "
        f"(largest peak RSS {summary['peak_rss_mb']:.0f} MiB)"
    )
    lines = [head]
    for klass, counts in summary["per_class"].items():
        parts = ", ".join(f"{counts[k]} {k}" for k in KINDS if k in counts)
        lines.append(f"  {klass:<10} {parts}")
    if failures:
        for f in summary["failures"]:
            first = (f["detail"] or "").strip().splitlines()[-1:] or [""]
            lines.append(
                f"  FAIL {f['case']}: {f['kind']} (exit {f['returncode']}) {first[0][:160]}"
            )
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
