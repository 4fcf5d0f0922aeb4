"""Hostile model files: every reader stays within its budgets (issue 13, loading part).

Each file is generated small on disk (sparse files, zip members of deflated zeros, headers that
declare more than they hold) and given to the real command line in a subprocess, which must answer
one `Error:` line, exit non-zero, print no traceback, write nothing, and stay within 30 s and
2 GB of peak resident memory (measured with wait4; an address-space limit cannot be used, since
importing torch alone maps more than 2 GiB of libraries).
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ticketguard.errors import ArchitectureError, TicketFormatError
from ticketguard.tickets import loading
from ticketguard.tickets import ticket as ticket_module
from ticketguard.tickets.loading import MAX_MODEL_FILE_BYTES, MAX_PICKLE_BYTES, load_checkpoint
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import MAX_MODEL_PARAMETERS, DigitsCNN, build_model
from ticketguard.tickets.ticket import MAX_SAFETENSORS_HEADER_BYTES, MAX_TENSORS, Ticket

TIME_LIMIT_S = 30
MEMORY_LIMIT_BYTES = 2 << 30
#: A safety net only: a runaway child is stopped before it can exhaust the machine.
_ADDRESS_SPACE_NET = 8 << 30


# --- running the CLI -----------------------------------------------------------------------------


def run_cli(args: list, cwd: Path) -> tuple[int, str, str, float, int]:
    """Run `python -m ticketguard ARGS`; return exit code, stdout, stderr, seconds, peak RSS."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE_NET, _ADDRESS_SPACE_NET))

    out_path, err_path = cwd / ".stdout", cwd / ".stderr"
    env = {**os.environ, "COLUMNS": "300"}
    start = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ticketguard", *map(str, args)],
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=env,
            preexec_fn=limit,
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > TIME_LIMIT_S:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - start
    stdout, stderr = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    return proc.returncode, stdout, stderr, elapsed, usage.ru_maxrss * 1024


def assert_refused(path: Path, command: str = "inspect", *extra: str) -> str:
    """Run COMMAND on the hostile file; check the clean, bounded refusal; return the Error line."""
    workdir = path.parent
    before = sorted(p.name for p in workdir.iterdir())
    code, stdout, stderr, elapsed, peak = run_cli([command, path, *extra], workdir)
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.1f} s: {stderr[-500:]}"
    assert peak < MEMORY_LIMIT_BYTES, f"peak RSS {peak / 2**30:.2f} GiB"
    assert code in (1, 2), (code, stdout, stderr[-2000:])
    assert "Traceback" not in stderr + stdout
    assert "unexpectedly" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr[-2000:]
    assert sorted(p.name for p in workdir.iterdir()) == before, "the command wrote a file"
    return lines[0]


# --- hostile files ---------------------------------------------------------------------------------


def _torch_zip(tmp_path: Path, replace: dict[str, tuple[int, bytes | None]]) -> Path:
    """A real torch zip of a tiny state dict, with members replaced by deflated zeros.

    `replace` maps a member name suffix to (bytes of zeros, or explicit data) written ZIP_DEFLATED.
    """
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2, 2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for info in src.infolist():
            hit = next((v for k, v in replace.items() if info.filename.endswith(k)), None)
            if hit is None:
                out.writestr(info, src.read(info), compress_type=zipfile.ZIP_STORED)
                continue
            size, data = hit
            zinfo = zipfile.ZipInfo(info.filename)
            zinfo.compress_type = zipfile.ZIP_DEFLATED
            with out.open(zinfo, "w", force_zip64=True) as member:
                if data is not None:
                    member.write(data)
                else:
                    chunk = bytes(16 << 20)
                    for _ in range(size // len(chunk)):
                        member.write(chunk)
    return path


def _sparse(path: Path, size: int, head: bytes = b"") -> Path:
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def _small_ticket() -> Ticket:
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = {k: v.detach().clone() for k, v in DigitsCNN(width=4).state_dict().items()}
    mask = (torch.rand(state["conv2.weight"].shape, generator=gen) > 0.5).to(torch.bool)
    trained = dict(state)
    trained["conv2.weight"] = state["conv2.weight"] * mask
    meta = {
        "architecture": {"name": "digits_cnn", "kwargs": {"width": 4}},
        "num_classes": 10,
        "input_shape": [1, 8, 8],
        "accuracy": {"test": 0.5},
    }
    return Ticket(Mask({"conv2.weight": mask}), trained, state, meta)


def _ticket_with_metadata(tmp_path: Path, change) -> Path:
    """A valid ticket whose metadata JSON is replaced by `change(meta)` (a dict or a string)."""
    good = tmp_path / "good.ticket"
    _small_ticket().save(good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()["ticketguard"])
    good.unlink()
    changed = change(meta)
    text = changed if isinstance(changed, str) else json.dumps(changed)
    path = tmp_path / "hostile.ticket"
    save_file(tensors, str(path), metadata={"ticketguard": text})
    return path


def _safetensors_with_header(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# --- the CLI refuses, in bounded time and memory ---------------------------------------------------


def test_zip_whose_pickle_inflates_past_the_budget(tmp_path):
    # 256 MiB of zeros deflate to ~250 KB: refused on the declared size, never inflated.
    path = _torch_zip(tmp_path, {"data.pkl": (256 << 20, None)})
    assert path.stat().st_size < 2 << 20
    line = assert_refused(path)
    assert "refused" in line and ("budget" in line or "zip bomb" in line)


def test_verify_refuses_a_zip_bomb_suspect(tmp_path):
    path = _torch_zip(tmp_path, {"data.pkl": (256 << 20, None)})
    reference = tmp_path / "reference.ticket"
    _small_ticket().save(reference)
    line = assert_refused(path, "verify", "--reference", str(reference))
    assert str(path) in line and "refused" in line


def test_zip_whose_storage_is_a_bomb(tmp_path):
    path = _torch_zip(tmp_path, {"data/0": (256 << 20, None)})
    line = assert_refused(path)
    assert "zip bomb" in line


@pytest.mark.slow
def test_zip_whose_pickle_inflates_to_3_gib(tmp_path):
    # The red team's file: a 3 MB zip whose data.pkl inflates to 3 GiB (took 25-57 s, 4.5 GB).
    path = _torch_zip(tmp_path, {"data.pkl": (3 << 30, None)})
    line = assert_refused(path)
    assert "refused" in line
    reference = tmp_path / "reference.ticket"
    _small_ticket().save(reference)
    assert "refused" in assert_refused(path, "verify", "--reference", str(reference))


def test_zip_with_a_pickle_of_millions_of_opcodes(tmp_path):
    # 8 MB of pickle opcodes: under the byte budget, over the opcode budget.
    n = 4_000_000
    body = b"\x80\x02]q\x00(" + b"K\x01" * n + b"e."
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    path = tmp_path / "many-opcodes.pt"
    with zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info, body if info.filename.endswith("data.pkl") else src.read(info))
    line = assert_refused(path)
    assert "opcodes" in line


def test_sparse_non_zip_file_past_the_size_budget(tmp_path):
    path = _sparse(tmp_path / "huge.pt", MAX_MODEL_FILE_BYTES + (6 << 30))  # 10 GiB
    line = assert_refused(path)
    assert "budget" in line and f"{MAX_MODEL_FILE_BYTES:,}" in line


def test_sparse_non_zip_file_under_the_size_budget(tmp_path):
    # 3 GiB of zeros (took 17 s and 3.7 GB): only MAX_PICKLE_BYTES of it are ever read.
    path = _sparse(tmp_path / "zeros.pt", 3 << 30)
    line = assert_refused(path)
    assert "not a ticket, safetensors or PyTorch checkpoint" in line


def test_legacy_pickle_stream_past_the_byte_budget_names_what_it_calls(tmp_path):
    # A pickle calling os.system at the start, then gigabytes of nothing.
    head = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    path = _sparse(tmp_path / "evil.pt", 3 << 30, head)
    line = assert_refused(path)
    assert "os.system" in line


def test_safetensors_header_past_the_budget(tmp_path):
    # The header length says 71 MB (1.2 M zero-size tensors); the file is sparse.
    n = 71_000_000
    path = _sparse(tmp_path / "header.safetensors", 8 + n + 16, struct.pack("<Q", n) + b"{")
    line = assert_refused(path)
    assert "header" in line and f"{MAX_SAFETENSORS_HEADER_BYTES:,}" in line


def test_safetensors_with_too_many_zero_size_tensors(tmp_path):
    header = {
        f"t{i}": {"dtype": "F32", "shape": [0, 0], "data_offsets": [0, 0]}
        for i in range(MAX_TENSORS + 1)
    }
    path = _safetensors_with_header(tmp_path / "many.safetensors", header)
    line = assert_refused(path)
    assert f"{MAX_TENSORS + 1:,} tensors" in line


@pytest.mark.slow
def test_safetensors_at_the_tensor_budget_is_inspected_in_time(tmp_path):
    header = {
        f"t{i}": {"dtype": "F32", "shape": [0, 0], "data_offsets": [0, 0]}
        for i in range(MAX_TENSORS)
    }
    path = _safetensors_with_header(tmp_path / "many.safetensors", header)
    code, _, stderr, elapsed, peak = run_cli(["inspect", path, "--json"], tmp_path)
    assert code == 0, stderr[-2000:]
    assert elapsed < TIME_LIMIT_S and peak < MEMORY_LIMIT_BYTES


def test_torch_file_with_too_many_tensors(tmp_path):
    # One shared storage, MAX_TENSORS + 1 views of it: small, under the opcode budget.
    base = torch.zeros(4)
    path = tmp_path / "views.pt"
    torch.save({f"t{i}": base[:1] for i in range(MAX_TENSORS + 1)}, path)
    with pytest.raises(TicketFormatError, match=f"{MAX_TENSORS + 1:,} tensors"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}, "does not match"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}, "outside the file"),
        ({"dtype": "X99", "shape": [4], "data_offsets": [0, 16]}, "unsupported dtype"),
        ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "malformed shape"),
        ({"dtype": "F32", "shape": [1] * 100, "data_offsets": [0, 4]}, "malformed shape"),
    ],
)
def test_safetensors_entries_are_checked_before_reading(tmp_path, entry, message):
    path = _safetensors_with_header(tmp_path / "bad.safetensors", {"w": entry}, bytes(16))
    with pytest.raises(TicketFormatError, match=message):
        load_checkpoint(path)


def test_ticket_metadata_nested_100k_deep(tmp_path):
    path = _ticket_with_metadata(tmp_path, lambda meta: "[" * 100_000 + "]" * 100_000)
    line = assert_refused(path)
    assert "ticket metadata" in line and "nested deeper" in line


def test_ticket_metadata_past_the_length_budget(tmp_path):
    path = _ticket_with_metadata(tmp_path, lambda meta: {**meta, "pad": "x" * (9 << 20)})
    with pytest.raises(TicketFormatError, match="ticket metadata of .* characters"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: {**m, "num_classes": 10**9}, "1,000,000,000 classes"),
        (lambda m: {**m, "input_shape": [3, 10**5, 10**5]}, "input of shape"),
        (lambda m: {**m, "accuracy": {"test": 5.0}}, "'accuracy' is malformed"),
        (lambda m: {**m, "accuracy": {"test": -0.1}}, "'accuracy' is malformed"),
        (lambda m: {**m, "num_classes": True}, "'num_classes' is malformed"),
        (lambda m: {**m, "sparsity": {**m["sparsity"], "surviving": 1}}, "sparsity recorded"),
        (
            lambda m: {
                **m,
                "sparsity": {
                    **m["sparsity"],
                    "layers": [{**m["sparsity"]["layers"][0], "surviving": 0}],
                },
            },
            "sparsity recorded",
        ),
        (lambda m: {**m, "sparsity": "all of it"}, "'sparsity' is malformed"),
        (lambda m: {**m, "a": 1, "A": {"b": float("nan")}}, "non-finite"),
    ],
)
def test_ticket_metadata_values_are_range_checked(tmp_path, change, message):
    path = _ticket_with_metadata(tmp_path, change)
    with pytest.raises(TicketFormatError, match=message):
        load_checkpoint(path)


def test_cli_refuses_false_metadata(tmp_path):
    path = _ticket_with_metadata(tmp_path, lambda m: {**m, "num_classes": 10**9})
    assert "classes" in assert_refused(path)


def test_architecture_kwargs_past_the_parameter_budget_are_not_built(tmp_path):
    # {"width": 3000} built a 2.2 GB DigitsCNN before the refusal.
    path = _ticket_with_metadata(
        tmp_path, lambda m: {**m, "architecture": {"name": "digits_cnn", "kwargs": {"width": 3000}}}
    )
    line = assert_refused(path)
    assert f"{MAX_MODEL_PARAMETERS:,} parameters" in line


def test_architecture_that_does_not_fit_the_file_is_refused_before_it_is_built(tmp_path):
    # width 600 is under the parameter budget (~14 M) but does not fit the width-4 tensors.
    path = _ticket_with_metadata(
        tmp_path, lambda m: {**m, "architecture": {"name": "digits_cnn", "kwargs": {"width": 600}}}
    )
    with pytest.raises(ArchitectureError, match="shape"):
        from ticketguard.tickets.inspection import inspect_file

        inspect_file(path)


# --- the budgets themselves ------------------------------------------------------------------------


def test_build_model_refuses_before_allocating():
    start = time.monotonic()
    with pytest.raises(ArchitectureError, match="parameters"):
        build_model("digits_cnn", 10, {"width": 3000})
    with pytest.raises(ArchitectureError, match="parameters"):
        build_model("digits_cnn", 10**9)
    assert time.monotonic() - start < 5


def test_build_model_draws_the_same_weights_as_before():
    # The size probe must not consume the random generator (RegNets take the fallback probe).
    torch.manual_seed(3)
    built = build_model("digits_cnn", 10, {"width": 4})
    torch.manual_seed(3)
    direct = DigitsCNN(10, width=4)
    for a, b in zip(built.state_dict().values(), direct.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_regular_files_still_load(tmp_path):
    ticket_path = tmp_path / "ok.ticket"
    _small_ticket().save(ticket_path)
    assert load_checkpoint(ticket_path).source_format == "ticket"
    pt = tmp_path / "ok.pt"
    torch.save(DigitsCNN(width=4).state_dict(), pt)
    assert load_checkpoint(pt).source_format == "pytorch"


def test_budgets_are_named_constants():
    assert loading.MAX_MODEL_FILE_BYTES == 4 << 30
    assert MAX_PICKLE_BYTES == 64 << 20
    assert ticket_module.MAX_SAFETENSORS_HEADER_BYTES == 16 << 20
    assert MAX_MODEL_PARAMETERS == 200_000_000


@pytest.mark.parametrize("section", ["trained", "rewind"])
def test_weights_relabelled_as_integers_are_refused(tmp_path, section):
    """A float tensor whose header says I32 is well-formed safetensors, but not a ticket."""
    good = tmp_path / "good.ticket"
    _small_ticket().save(good)
    raw = good.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    header[f"{section}::conv2.weight"]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode()
    path = tmp_path / "relabelled.ticket"
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])
    with pytest.raises(TicketFormatError, match=f"{section} weight 'conv2.weight' is torch.int32"):
        load_checkpoint(path)
    line = assert_refused(path)
    assert "not floating point" in line


def test_an_unmasked_tensor_relabelled_as_integers_does_not_load_into_a_model(tmp_path):
    from ticketguard.tickets.loading import load_model

    good = tmp_path / "good.ticket"
    _small_ticket().save(good)
    raw = good.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    bias = next(k for k in header if k.startswith("trained::") and k.endswith(".bias"))
    header[bias]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode()
    path = tmp_path / "relabelled.ticket"
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])
    loaded = load_checkpoint(path)  # a bias is not covered by the mask: the file itself reads
    with pytest.raises(ArchitectureError, match="is int32, the architecture expects float32"):
        load_model(loaded)


def test_a_legacy_file_with_a_zip_footer_is_still_scanned_as_legacy(tmp_path, monkeypatch):
    """torch.load picks its format by the first four bytes; the budgets follow it."""
    monkeypatch.setattr(loading, "MAX_PICKLE_OPCODES", 1000)
    buffer = io.BytesIO()
    torch.save(
        {"w": torch.zeros(3), "log": list(range(5000))},
        buffer,
        _use_new_zipfile_serialization=False,
    )
    footer = io.BytesIO()
    zipfile.ZipFile(footer, "w").close()
    path = tmp_path / "legacy-with-footer.pt"
    path.write_bytes(buffer.getvalue() + footer.getvalue())
    assert zipfile.is_zipfile(path)
    with pytest.raises(TicketFormatError, match="more than 1,000 opcodes"):
        load_checkpoint(path)


def test_a_zip_bomb_split_into_small_members_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({f"w{i}": torch.zeros(262144) for i in range(24)}, buffer)  # 24 x 1 MiB storages
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    path = tmp_path / "split-bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info.filename))
    assert all(i.file_size <= 1 << 20 for i in zipfile.ZipFile(path).infolist())
    with pytest.raises(TicketFormatError, match="a zip bomb"):
        load_checkpoint(path)
