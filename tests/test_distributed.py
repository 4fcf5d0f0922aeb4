"""`find` under torchrun: two CPU processes with gloo match a single-process run; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ticketguard.tickets import paths
from ticketguard.tickets.ticket import load_ticket

ARGS = [
    "find",
    "--rounds",
    "1",
    "--epochs",
    "1",
    "--arch-arg",
    "width=8",
    "--device",
    "cpu",
    "--quiet",
]

# Records, per rank, every file this process opens for writing, through Python's audit hooks.
# Every output goes through ticketguard.files.atomic_path (mkstemp + os.replace), which these
# hooks see even when the bytes are then written by native code (safetensors).
AUDIT = textwrap.dedent(
    """
    import os, sys
    _path = os.path.join(os.environ["TG_AUDIT_DIR"], "rank-" + os.environ.get("RANK", "none") + ".txt")
    _fd = os.open(_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # opened before the hook exists
    def _hook(event, args):
        target = None
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
            ):
                target = args[0]
        elif event in ("os.rename", "os.replace"):
            target = args[1]
        if target is not None:
            os.write(_fd, (os.fsdecode(target) + "\\n").encode())
    sys.addaudithook(_hook)
    """
)


def _env(tmp_path) -> dict[str, str]:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT)
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(hook_dir), env.get("PYTHONPATH", "")]),
        TG_AUDIT_DIR=str(audit_dir),
        OMP_NUM_THREADS="1",
        SOURCE_DATE_EPOCH="1700000000",
    )
    return env


def test_torchrun_two_cpu_processes_match_a_single_process_run(tmp_path) -> None:
    env = _env(tmp_path)
    single = tmp_path / "single"
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "ticketguard", *ARGS, "--out", str(single)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in (tmp_path / "audit").iterdir():
        f.unlink()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "ticketguard",
            *ARGS,
            "--out",
            str(ddp),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    a, b = load_ticket(paths.final_ticket(single)), load_ticket(paths.final_ticket(ddp))
    assert a.mask.keys() == b.mask.keys()
    assert {n: t.shape for n, t in a.trained.items()} == {n: t.shape for n, t in b.trained.items()}
    assert [
        s.surviving for s in a.mask.layer_stats()
    ] != [] and a.mask.num_surviving == b.mask.num_surviving
    assert b.mask.sparsity == pytest.approx(0.2, abs=1e-4)
    assert json.loads(paths.log_file(ddp).read_text())["world_size"] == 2
    assert sorted(p.relative_to(ddp) for p in ddp.rglob("*")) == sorted(
        p.relative_to(single) for p in single.rglob("*")
    )

    audit = {f.name: f.read_text().splitlines() for f in (tmp_path / "audit").iterdir()}
    in_run = {name: [p for p in lines if str(ddp) in p] for name, lines in audit.items()}
    assert in_run.get("rank-0.txt"), f"rank 0 wrote nothing into the run: {sorted(audit)}"
    assert in_run.get("rank-1.txt", []) == [], in_run.get("rank-1.txt")
