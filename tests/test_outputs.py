"""Output sets are written all at once, one run at a time (docs/outputs.md).

A crash is simulated three ways: a real SIGKILL at each step of the commit (a forked child of a
helper process that has the signed ticket ready), an exception raised in-process at each step
(for every writer: sign, attack, bench, find), and, marked slow, `ticketguard sign --force`
killed at 100 instants spread over its whole run. After each, the files at the final names must
be the complete old set or the complete new set, or a journal is pending and the next run's
recovery makes them the complete new set; after that recovery no staged or temporary file is
left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import OWNER, _build_ticket

from ticketguard import files
from ticketguard.errors import EmbeddingError, RunStateError
from ticketguard.files import (
    hold_outputs,
    is_leftover,
    journal_file,
    output_lock,
    pending_note,
    settle,
    sha256_hex,
)
from ticketguard.signatures.signing import (
    SignConfig,
    output_paths,
    sign_without_data,
    write_signed,
)
from ticketguard.tickets.ticket import load_ticket

PYTHON = sys.executable
TESTS = Path(__file__).parent
ROOT = TESTS.parent
#: The steps of a commit, in order (ticketguard.files._step), and a kill while staging.
STEPS = ("staged", "committed", "renamed 1", "renamed 2", "renamed 3", "renamed", "done")


class Crash(BaseException):
    """Raised by the step hook: like a kill, nothing catches it."""


def _leftovers(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.rglob("*") if is_leftover(p.name) or p.name.endswith(".journal")
    )


def _signed(seed: int):
    ticket = _build_ticket(width=8, keep=0.3, seed=0)
    config = SignConfig(random_seed=True)
    return sign_without_data(ticket, OWNER, config, created=f"2026-01-0{seed + 1}T00:00:00Z")


def _set_bytes(paths: list[Path]) -> tuple[bytes | None, ...]:
    return tuple(p.read_bytes() if p.exists() else None for p in paths)


def _consistent(out: Path) -> str:
    """Check that a signed set binds together; return its ticket's fingerprint."""
    ticket_path, cred_path, secret_path = output_paths(out)
    ticket = load_ticket(ticket_path)
    raw = cred_path.read_bytes()
    credential = json.loads(raw)
    secret = json.loads(secret_path.read_text())
    assert secret["credential_sha256"] == sha256_hex(raw), "secret of another credential"
    assert secret["fingerprint"] == ticket.fingerprint, "secret of another ticket"
    assert credential["fingerprint_after"] == ticket.fingerprint, "credential of another ticket"
    assert ticket.metadata["signature"]["credential_sha256"] == sha256_hex(raw)
    return ticket.fingerprint


def _crash_at(step: str) -> Callable[[str], None]:
    def hook(name: str) -> None:
        if name == step:
            raise Crash(step)

    return hook


def _interrupted(monkeypatch: pytest.MonkeyPatch, step: str, write: Callable[[], Any]) -> bool:
    """Run `write` with a crash at `step`; return whether it crashed."""
    monkeypatch.setattr(files, "_STEP_HOOK", _crash_at(step))
    try:
        write()
    except Crash:
        return True
    finally:
        monkeypatch.setattr(files, "_STEP_HOOK", None)
    return False


def _check_old_new_or_pending(
    key: Path, finals: list[Path], old: tuple, new: tuple, members: list[Path], folder: Path
) -> str:
    """After a crash: old set, new set, or a pending journal that recovery makes the new set."""
    now = _set_bytes(finals)
    pending = journal_file(key).exists()
    if not pending:
        assert now in (old, new), "a mixed set without a journal"
    with hold_outputs(key, members):  # what the next run on these outputs does first
        pass
    after = _set_bytes(finals)
    assert after == (new if pending else now)
    assert after in (old, new)
    assert _leftovers(folder) == []
    return "pending" if pending else ("new" if now == new else "old")


# --- the signed set: a real SIGKILL at every step of the commit ----------------------------------

KILLER = r"""
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from conftest import OWNER, _build_ticket
from ticketguard import files
from ticketguard.signatures import credential
from ticketguard.signatures.signing import SignConfig, sign_without_data, write_signed

root = Path(sys.argv[2])
points = sys.argv[3:]
ticket = _build_ticket(width=8, keep=0.3, seed=0)
old = sign_without_data(ticket, OWNER, SignConfig(random_seed=True), created="2026-01-01T00:00:00Z")
new = sign_without_data(ticket, OWNER, SignConfig(random_seed=True), created="2026-01-02T00:00:00Z")
write_signed(old, root / "old" / "s.ticket")
write_signed(new, root / "new" / "s.ticket")

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

for i, point in enumerate(points):
    out = root / f"kill{i}" / "s.ticket"
    write_signed(old, out)
    pid = os.fork()
    if pid == 0:
        if point == "staging":  # the staged ticket is written, the credential is not
            credential.write_credential = die
        elif point.startswith("replace-"):  # right after the Nth rename of the write, any code
            count, real = [0], os.replace
            def replace(*args, n=int(point[8:]), **kwargs):
                real(*args, **kwargs)
                count[0] += 1
                if count[0] == n:
                    die()
            os.replace = replace
        else:
            files._STEP_HOOK = lambda name, point=point: die() if name == point else None
        write_signed(new, out)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps({"point": point, "dir": str(out.parent), "killed": killed}), flush=True)
"""


def test_sign_killed_at_every_step_of_the_commit_leaves_old_or_new(tmp_path) -> None:
    # Renames of a signed write: 3 into the staging names, the journal, 3 into place.
    replaces = [f"replace-{n}" for n in range(1, 8)]
    points = ["staging", *STEPS, *replaces]
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = subprocess.run(
        [PYTHON, str(script), str(TESTS), str(tmp_path), *points],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    runs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["point"] for r in runs] == points
    assert all(r["killed"] for r in runs), runs
    old = _set_bytes(list(output_paths(tmp_path / "old" / "s.ticket")))
    new = _set_bytes(list(output_paths(tmp_path / "new" / "s.ticket")))
    assert old != new
    seen = {}
    for run in runs:
        folder = Path(run["dir"])
        out = folder / "s.ticket"
        finals = list(output_paths(out))
        # What a kill leaves before the next run: staging files up to the commit point, a
        # journal after it (and, while the renames are half done, a mix at the final names).
        if run["point"].startswith("replace-"):
            pass  # checked below, whatever the implementation's steps are
        elif run["point"] in ("staging", "staged"):
            assert _set_bytes(finals) == old
            assert any(n.endswith(".staged") for n in os.listdir(folder))
        elif run["point"] != "done":
            assert journal_file(out).exists()
        note = pending_note(finals[1])
        assert (note is not None) == journal_file(out).exists()
        seen[run["point"]] = _check_old_new_or_pending(out, finals, old, new, finals, folder)
        _consistent(out)
    assert [seen.pop(p) for p in replaces] == ["old"] * 3 + ["pending"] * 4
    assert seen == {
        "staging": "old",
        "staged": "old",
        "committed": "pending",
        "renamed 1": "pending",
        "renamed 2": "pending",
        "renamed 3": "pending",
        "renamed": "pending",
        "done": "new",
    }


# --- the same, in-process, for every writer ------------------------------------------------------


@pytest.fixture(scope="module")
def two_claims():
    return _signed(0), _signed(1)


def test_write_signed_interrupted_in_process_at_every_step(tmp_path, monkeypatch, two_claims):
    old_claim, new_claim = two_claims
    write_signed(old_claim, tmp_path / "ref-old" / "s.ticket")
    write_signed(new_claim, tmp_path / "ref-new" / "s.ticket")
    old = _set_bytes(list(output_paths(tmp_path / "ref-old" / "s.ticket")))
    new = _set_bytes(list(output_paths(tmp_path / "ref-new" / "s.ticket")))
    for i, step in enumerate(STEPS):
        out = tmp_path / f"k{i}" / "s.ticket"
        write_signed(old_claim, out)
        assert _interrupted(monkeypatch, step, lambda out=out: write_signed(new_claim, out))
        finals = list(output_paths(out))
        state = _check_old_new_or_pending(out, finals, old, new, finals, out.parent)
        assert state == ("old" if step == "staged" else "new" if step == "done" else "pending")


def test_an_error_before_the_commit_keeps_the_old_set(tmp_path, monkeypatch, two_claims):
    old_claim, new_claim = two_claims
    out = tmp_path / "s.ticket"
    write_signed(old_claim, out)
    before = _set_bytes(list(output_paths(out)))

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ticketguard.signatures.signing.write_secret", fail)
    with pytest.raises(EmbeddingError, match="No space left"):
        write_signed(new_claim, out)
    assert _set_bytes(list(output_paths(out))) == before
    assert _leftovers(tmp_path) == []


def test_attack_outputs_interrupted_at_every_step(tmp_path, monkeypatch, two_claims):
    """A claim (fake-triggers, forge), an attacked model, and a report with a found claim."""
    from ticketguard.attacks.base import AttackResult
    from ticketguard.attacks.outputs import claim_paths, set_key, write_result

    old_claim, new_claim = two_claims
    cases = {
        "fake-triggers": (
            AttackResult(old_claim.ticket, {"n": 1}, claim=old_claim),
            AttackResult(new_claim.ticket, {"n": 2}, claim=new_claim),
            "fake.ticket",
        ),
        "prune": (
            AttackResult(old_claim.ticket, {"n": 1}),
            AttackResult(new_claim.ticket, {"n": 2}),
            "pruned.ticket",
        ),
        "grind": (
            AttackResult(None, {"tries": 1}, claim=old_claim),
            AttackResult(None, {"tries": 2}, claim=new_claim),
            "grind.json",
        ),
    }
    for name, (old_result, new_result, filename) in cases.items():
        ref_old, ref_new = tmp_path / name / "old" / filename, tmp_path / name / "new" / filename
        finals_of = {
            ref: write_result(name, result, ref)
            for ref, result in ((ref_old, old_result), (ref_new, new_result))
        }
        old, new = _set_bytes(finals_of[ref_old]), _set_bytes(finals_of[ref_new])
        assert old != new
        if name == "grind":
            assert finals_of[ref_new][1:] == claim_paths(ref_new)
        steps = [s for s in STEPS if not s.startswith("renamed ") or int(s[-1]) <= len(old)]
        for i, step in enumerate(steps):
            out = tmp_path / name / f"k{i}" / filename
            finals = write_result(name, old_result, out)
            assert _interrupted(
                monkeypatch,
                step,
                lambda out=out, name=name, result=new_result: write_result(name, result, out),
            )
            key = set_key(name, out)
            state = _check_old_new_or_pending(key, finals, old, new, finals, out.parent)
            expected = "old" if step == "staged" else "new" if step == "done" else "pending"
            assert state == expected, (name, step)


def _bench_config(marker: float) -> Any:
    return SimpleNamespace(
        to_dict=lambda: {"marker": marker},
        name=f"bench {marker}",
        data_fraction=0.5,
        max_drop=marker,
        alpha=0.01,
        security_bits=0,
        ticket="t.ticket",
        credential="t.cred.json",
        secret="t.secret.json",
        seeds=[0],
        workers=1,
        blackbox=None,
        null_samples=10,
        reference=None,
        device="cpu",
    )


def test_bench_reports_interrupted_at_every_step(tmp_path, monkeypatch):
    """The report set commits whole; the old run's plot goes in the same commit."""
    from ticketguard.attacks.report import PLOT_NAME, REPORT_NAMES, write_reports

    def write(folder: Path, marker: float, plot: bool) -> None:
        write_reports([], _bench_config(marker), folder)
        if plot:  # an earlier run that had something to plot
            (folder / PLOT_NAME).write_bytes(b"\x89PNG old plot")

    for ref, marker, plot in ((tmp_path / "old", 0.01, True), (tmp_path / "new", 0.02, False)):
        ref.mkdir()
        write(ref, marker, plot)
    finals_in = {d: [d / n for n in REPORT_NAMES] for d in (tmp_path / "old", tmp_path / "new")}
    old, new = _set_bytes(finals_in[tmp_path / "old"]), _set_bytes(finals_in[tmp_path / "new"])
    assert old != new and old[2] is not None and new[2] is None
    for i, step in enumerate(STEPS + ("renamed 4", "renamed 5")):
        out = tmp_path / f"k{i}"
        out.mkdir()
        write(out, 0.01, True)
        assert _interrupted(
            monkeypatch, step, lambda out=out: write_reports([], _bench_config(0.02), out)
        )
        finals = [out / n for n in REPORT_NAMES]
        key = files.directory_key(out)
        state = _check_old_new_or_pending(key, finals, old, new, finals, out)
        assert state == ("old" if step == "staged" else "new" if step == "done" else "pending")


# --- the lock ------------------------------------------------------------------------------------

HOLDER = r"""
import sys, time
from ticketguard.files import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _hold_in_child(key: Path) -> subprocess.Popen:
    child = subprocess.Popen(
        [PYTHON, "-c", HOLDER, str(key)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_held_lock_refuses_with_the_holders_pid_and_a_killed_holder_frees_it(tmp_path):
    key = tmp_path / "s.ticket"
    child = _hold_in_child(key)
    try:
        with pytest.raises(RunStateError) as caught, output_lock(key):
            pass
        message = str(caught.value)
        assert message == f"{key} is being written by another ticketguard run (pid {child.pid})"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The kernel dropped the flock with its holder: the lock is free, though the file is left.
    assert files.lock_file(key).exists()
    with output_lock(key):
        assert files.lock_file(key).read_text().strip() == str(os.getpid())
    assert not files.lock_file(key).exists()  # removed after use


def test_a_lock_file_removed_under_a_waiting_run_is_not_trusted(tmp_path, monkeypatch):
    """A run that locks a file which has meanwhile lost its name tries again on the new file."""
    key = tmp_path / "s.ticket"
    path = files.lock_file(key)
    real_flock = files.fcntl.flock
    calls: list[int] = []

    def flock(fd: int, op: int) -> None:
        real_flock(fd, op)
        if not calls:  # as if the previous holder removed the file just before we got it
            path.unlink()
            path.write_text("")
        calls.append(fd)

    monkeypatch.setattr(files.fcntl, "flock", flock)
    with output_lock(key):
        named = os.stat(path)
        assert len(calls) == 2
        held = files._held[files._identity(path)]
        mine = os.fstat(held.fd)
        assert (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    key = tmp_path / "s.ticket"
    with output_lock(key), output_lock(key):
        assert files.lock_file(key).exists()
    assert not files.lock_file(key).exists()


def _sign_args(ticket: Path, key: Path, out: Path) -> list[str]:
    return [
        PYTHON,
        "-m",
        "ticketguard",
        "sign",
        str(ticket),
        "--key",
        str(key),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--recover-epochs",
        "0",
        "--random-seed",
    ]


@pytest.fixture(scope="module")
def small_ticket(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small unsigned digits ticket file and Alice's key."""
    from ticketguard.signatures.keys import write_keypair

    root = tmp_path_factory.mktemp("small-unsigned")
    ticket = _build_ticket(width=8, keep=0.3, seed=0)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    ticket.save(root / "small.ticket")
    write_keypair(OWNER, root / "alice")
    return {"ticket": root / "small.ticket", "key": root / "alice.key"}


def test_sign_refuses_outputs_another_run_is_writing(tmp_path, small_ticket):
    out = tmp_path / "s.ticket"
    with output_lock(out):
        done = subprocess.run(
            _sign_args(small_ticket["ticket"], small_ticket["key"], out),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"Error: {out} is being written by another ticketguard run (pid {os.getpid()})"
    ]
    assert not out.exists()


def test_two_concurrent_signs_on_one_out_never_both_succeed(tmp_path, small_ticket):
    out = tmp_path / "s.ticket"
    args = _sign_args(small_ticket["ticket"], small_ticket["key"], out)
    runs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(2)
    ]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refusal = next(err for code, err in results if code == 1)
    assert (
        "is being written by another ticketguard run (pid" in refusal
        or "already exists; pass --force" in refusal
    ), refusal
    _consistent(out)


def test_a_library_write_without_force_refuses_what_appeared_meanwhile(tmp_path, two_claims):
    old_claim, new_claim = two_claims
    out = tmp_path / "s.ticket"
    write_signed(old_claim, out, force=False)
    with pytest.raises(EmbeddingError, match="already exists"):
        write_signed(new_claim, out, force=False)
    assert load_ticket(out).fingerprint == old_claim.ticket.fingerprint


# --- journals ------------------------------------------------------------------------------------


def test_a_damaged_or_planted_journal_is_refused_in_one_line(tmp_path, two_claims):
    out = tmp_path / "s.ticket"
    write_signed(two_claims[0], out)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    journal = journal_file(out)
    renames = [{"from": "victim.txt", "to": "s.ticket"}]
    planted = {
        "format": files.JOURNAL_FORMAT,
        "renames": renames,
        "sha256": sha256_hex(files.canonical_json(renames)),
    }
    escaping = [{"from": None, "to": "../outside.txt"}]
    cases = [
        (b'{"format": "ticketguard-journal/1", "renames": [', "not valid JSON"),
        (json.dumps(planted).encode(), "is not a staged file"),
        (
            json.dumps(
                {
                    **planted,
                    "renames": escaping,
                    "sha256": sha256_hex(files.canonical_json(escaping)),
                }
            ).encode(),
            "a path leaves its folder",
        ),
        (json.dumps({**planted, "sha256": "0" * 64}).encode(), "checksum"),
    ]
    for data, message in cases:
        journal.write_bytes(data)
        with pytest.raises(RunStateError, match=message) as caught, hold_outputs(out):
            pass
        assert "\n" not in str(caught.value)
    assert victim.read_text() == "keep me"
    _consistent(out)


def test_readers_are_told_of_a_pending_write_and_settle_finishes_it(
    tmp_path, monkeypatch, two_claims
):
    out = tmp_path / "s.ticket"
    write_signed(two_claims[0], out)
    assert pending_note(out) is None
    assert _interrupted(monkeypatch, "renamed 1", lambda: write_signed(two_claims[1], out))
    cred = output_paths(out)[1]
    note = pending_note(cred)
    assert note is not None and "\n" not in note
    assert "interrupted write" in note and "ticketguard.files finish" in note
    child = _hold_in_child(out)  # being written right now: settle can only say so
    try:
        assert settle(cred) == note
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert settle(cred) is None
    assert pending_note(cred) is None and not journal_file(out).exists()
    assert _consistent(out) == two_claims[1].ticket.fingerprint


def test_finish_from_the_command_line(tmp_path, monkeypatch, two_claims):
    out = tmp_path / "s.ticket"
    write_signed(two_claims[0], out)
    assert _interrupted(monkeypatch, "committed", lambda: write_signed(two_claims[1], out))
    done = subprocess.run(
        [PYTHON, "-m", "ticketguard.files", "finish", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "finished an interrupted write" in done.stdout
    assert _consistent(out) == two_claims[1].ticket.fingerprint
    assert _leftovers(tmp_path) == []


# --- find ----------------------------------------------------------------------------------------


def test_find_interrupted_in_a_round_commit_resumes_to_the_same_ticket(tmp_path, monkeypatch):
    from ticketguard.tickets import paths
    from ticketguard.tickets.finding import FindConfig, find_ticket
    from ticketguard.tickets.training import TrainConfig

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    config = FindConfig(rounds=1, train=TrainConfig(epochs=1), arch_kwargs={"width": 8})
    full = find_ticket(config, tmp_path / "full", device="cpu")
    out = tmp_path / "cut"
    commits = []

    def hook(name: str) -> None:
        if name == "committed":
            commits.append(name)
            if len(commits) == 2:  # round 1's ticket and log: committed, not yet in place
                raise Crash(name)

    monkeypatch.setattr(files, "_STEP_HOOK", hook)
    with pytest.raises(Crash):
        find_ticket(config, out, device="cpu")
    monkeypatch.setattr(files, "_STEP_HOOK", None)
    assert journal_file(paths.run_key(out)).exists()
    (out / ".final.ticket.abcd1234.tmp").write_bytes(b"half a ticket")  # an older version's
    notes: list[str] = []
    reporter = SimpleNamespace(
        note=notes.append,
        round_started=lambda *a: None,
        advance=lambda *a: None,
        round_finished=lambda *a: None,
    )
    resumed = find_ticket(config, out, device="cpu", resume=True, reporter=reporter)
    assert any("finished an interrupted write" in n for n in notes), notes
    assert any(".final.ticket.abcd1234.tmp" in n for n in notes), notes
    assert not any("redoing" in n for n in notes), notes  # the journal kept round 1
    assert [r["round"] for r in resumed.rounds] == [0, 1]
    assert paths.final_ticket(out).read_bytes() == paths.final_ticket(full.run_dir).read_bytes()
    assert _leftovers(out) == []


def test_find_refuses_a_run_folder_another_run_is_writing(tmp_path):
    out = tmp_path / "run"
    with output_lock(files.directory_key(out)):
        done = subprocess.run(
            [PYTHON, "-m", "ticketguard", "find", "--out", str(out), "--rounds", "0"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"Error: {out} is being written by another ticketguard run (pid {os.getpid()})"
    ]


# --- the slow test: `sign --force` killed at 100 instants ------------------------------------------


def _timed_sign(args: list[str], folder: Path) -> tuple[float, float]:
    """Run `sign` once; return (its duration, when its first staged file appeared)."""
    started = time.monotonic()
    run = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    staged_at = None
    while run.poll() is None:
        if staged_at is None and any(n.endswith(".staged") for n in os.listdir(folder)):
            staged_at = time.monotonic() - started
        time.sleep(0.001)
    duration = time.monotonic() - started
    assert run.returncode == 0
    return duration, staged_at if staged_at is not None else duration


def _kill_series(args: list[str], out: Path, delays: list[float]) -> dict[str, int]:
    """Kill `sign` after each delay; check old-or-new and the next run's recovery each time."""
    finals = list(output_paths(out))
    counts = {"old": 0, "new": 0, "pending": 0, "leftovers": 0}
    for delay in delays:
        before = _set_bytes(finals)
        run = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait()
        now = _set_bytes(finals)
        pending = journal_file(out).exists()
        counts["leftovers"] += bool(_leftovers(out.parent))
        if not pending:
            assert now == before or now != before and _consistent(out)
            counts["old" if now == before else "new"] += 1
        else:
            counts["pending"] += 1
        with hold_outputs(out, finals):  # the next run's recovery
            pass
        _consistent(out)
        assert _leftovers(out.parent) == []
    return counts


@pytest.mark.slow
def test_sign_force_killed_at_100_instants_leaves_old_or_new(tmp_path, small_ticket):
    """100 SIGKILLs, two series side by side (one per core), each against its own outputs."""
    from concurrent.futures import ThreadPoolExecutor

    outs = [tmp_path / name / "s.ticket" for name in ("a", "b")]
    for out in outs:
        out.parent.mkdir()
    runs = [[*_sign_args(small_ticket["ticket"], small_ticket["key"], o), "--force"] for o in outs]
    with ThreadPoolExecutor(2) as pool:  # timed under the same load as the kills
        timings = list(pool.map(_timed_sign, runs, [o.parent for o in outs]))
    duration = max(d for d, _ in timings)
    staged_at = min(s for _, s in timings)
    # Half the kills spread over the whole run (and past its end), half over the write: from
    # 30 ms before the first staged file to 70 ms after it.
    delays = [duration * 1.2 * i / 49 for i in range(50)]
    delays += [max(0.0, staged_at - 0.03 + 0.1 * i / 49) for i in range(50)]
    with ThreadPoolExecutor(2) as pool:
        series = list(pool.map(_kill_series, runs, outs, [delays[0::2], delays[1::2]]))
    counts = {k: sum(c[k] for c in series) for k in series[0]}
    print(f"\n100 kills over {duration:.2f} s runs (staged at {staged_at:.2f} s): {counts}")
    assert sum(counts[k] for k in ("old", "new", "pending")) == 100
    assert counts["old"] > 0 and counts["new"] > 0


def test_a_bench_folder_being_written_is_refused_and_reports_wait(tmp_path):
    from ticketguard.attacks.report import bench_lock

    out = tmp_path / "bench"
    child = _hold_in_child(files.directory_key(out))
    try:
        with pytest.raises(RunStateError, match="being written by another") as caught:
            with bench_lock(out):
                pass
        assert f"(pid {child.pid})" in str(caught.value)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with bench_lock(out):  # freed by the kernel when its holder died
        pass


def test_verify_warns_of_a_pending_write_of_its_inputs(tmp_path, monkeypatch, two_claims):
    from cli_helpers import invoke

    out = tmp_path / "s.ticket"
    write_signed(two_claims[0], out)
    ticket, cred, secret = output_paths(out)
    args = ["verify", ticket, "--credential", cred, "--reveal", secret]
    assert "warning:" not in invoke(args).output
    assert _interrupted(monkeypatch, "renamed 1", lambda: write_signed(two_claims[1], out))
    result = invoke(args)
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) >= 1 and all("interrupted write" in line for line in warnings)


def _plant(journal: Path, renames: list) -> None:
    journal.write_text(
        json.dumps(
            {
                "format": files.JOURNAL_FORMAT,
                "renames": renames,
                "sha256": sha256_hex(files.canonical_json(renames)),
            }
        )
    )


def test_a_well_formed_planted_journal_touches_nothing_but_the_sets_files(tmp_path):
    """A journal carries no secret: anyone who can write the folder can plant a valid one."""
    folder = tmp_path / "work"
    elsewhere = tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "lnk").symlink_to(elsewhere, target_is_directory=True)
    thesis, notes, victim = folder / "thesis.pdf", folder / "notes.txt", elsewhere / "victim.txt"
    for path in (thesis, notes, victim):
        path.write_text("keep me")
    (folder / ".notes.txt.aaaaaaaaaaaa.staged").write_text("attacker content")
    (folder / "adir").mkdir()
    (folder / ".adir.bbbbbbbbbbbb.staged").write_text("x")
    out = folder / "result.json"
    cases = [
        ([{"from": None, "to": "thesis.pdf"}], "not a file of this set"),
        ([{"from": None, "to": "lnk/victim.txt"}], "not a file of this set"),
        ([{"from": ".notes.txt.aaaaaaaaaaaa.staged", "to": "notes.txt"}], "not a file of this set"),
    ]
    for renames, message in cases:
        _plant(journal_file(out), renames)
        with pytest.raises(RunStateError, match=message) as caught, hold_outputs(out, [out]):
            pass
        assert "\n" not in str(caught.value)
    # Finishing by hand trusts the journal's names, but not through a link or onto a folder.
    linked = elsewhere / "result.json"
    linked.write_text("keep me")
    _plant(journal_file(out), [{"from": None, "to": "lnk/result.json"}])
    with pytest.raises(RunStateError, match="through a link"), hold_outputs(out, None):
        pass
    _plant(journal_file(out), [{"from": ".adir.bbbbbbbbbbbb.staged", "to": "adir"}])
    with pytest.raises(RunStateError, match="not a regular file"), hold_outputs(out, None):
        pass
    with (
        pytest.raises(RunStateError, match="not a regular file"),
        hold_outputs(out, [out, folder / "adir"]),
    ):
        pass
    assert [p.read_text() for p in (thesis, notes, victim, linked)] == ["keep me"] * 4
    assert (folder / "adir").is_dir()


def test_a_fifo_at_the_lock_name_is_refused_in_one_line(tmp_path):
    out = tmp_path / "s.ticket"
    os.mkfifo(files.lock_file(out))
    with pytest.raises(RunStateError, match="not a regular file"), hold_outputs(out):
        pass
