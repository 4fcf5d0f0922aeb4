"""Hostile inputs for every command that reads files or talks HTTP, deterministic given a seed.

A `Case` has an id `CLASS/NAME` and a `build(case_dir, base)` that writes its inputs into a
fresh folder and returns the `Invocation` to run. Two sources:

- hand-written hostile cases, one per attack in the red team's report (zip bombs, huge sparse
  files, bad safetensors headers, deep nesting, NaN, lone surrogates, duplicate keys, symlinks
  out of a trigger folder, grids of 10^9 cells, malicious pickles, ...);
- seeded mutations of valid files made by `Base` (a small signed ticket, its credential and
  secret, a bench config, a find run): byte flips, truncation, field replacement with hostile
  values, duplicate keys and deep nesting. `random.Random(f"{class}:{seed}")` drives them, so
  a seed always gives the same input.

Classes: checkpoint (inspect, verify SUSPECT), credential (verify, dispute, render), secret
(verify --reveal, dispute), bench, trigger (sign --trigger DIR), resume (find --resume), serve
and endpoint (raw HTTP, in `http_cases`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import Invocation

GiB = 1024**3

#: Values that no numeric or structured field may take.
HOSTILE_JSON = (
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1",
    "1" + "0" * 30,
    '"\\ud800"',
    "true",
    "null",
    '"' + "x" * 100_000 + '"',
    "[" * 5000 + "]" * 5000,
    '{"a": ' * 5000 + "1" + "}" * 5000,
    "[]",
    "{}",
)
HOSTILE_TOML = (
    "nan",
    "inf",
    "-inf",
    "1e400",
    "1" + "0" * 30,
    "-7",
    '"x"',
    "{ a = 1 }",
    "[" * 3000 + "]" * 3000,
    "true",
)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path, Base], Invocation]
    slow: bool = False

    @property
    def klass(self) -> str:
        return self.id.split("/")[0]

    @property
    def slug(self) -> str:
        return self.id.replace("/", "__").replace(":", "-")


# ---------------------------------------------------------------------------------------------
# Valid base files, made once and lazily (each builder takes a few seconds of CPU).


class Base:
    """Valid small files the cases start from, built on first use under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cache: dict[str, Any] = {}

    def _once(self, name: str, make: Callable[[], Any]) -> Any:
        with self._lock:
            if name not in self._cache:
                self._cache[name] = make()
            return self._cache[name]

    @property
    def signed(self) -> dict[str, Path]:
        """Alice's small signed W2 ticket (width 8), credential, secret and key pair."""
        return self._once("signed", lambda: _make_signed(self.root / "signed", triggers=False))

    @property
    def signed_triggers(self) -> dict[str, Path]:
        """The same, signed with a small generated trigger set (for black-box cases)."""
        return self._once("triggers", lambda: _make_signed(self.root / "trig", triggers=True))

    @property
    def mallory(self) -> dict[str, Path]:
        """Mallory's own signed ticket (another key, another ticket): a second, distinct claim."""
        return self._once(
            "mallory", lambda: _make_signed(self.root / "mallory", False, "mallory", seed=1)
        )

    @property
    def run_dir(self) -> Path:
        """A finished `find` run of one round of one epoch on digits."""
        return self._once("run", lambda: _make_run(self.root / "run"))


def _small_ticket(seed: int = 0, width: int = 8, keep: float = 0.3):
    import torch

    from ticketguard.tickets.mask import Mask
    from ticketguard.tickets.models import DigitsCNN
    from ticketguard.tickets.ticket import Ticket

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rewind = {k: v.detach().clone() for k, v in DigitsCNN(width=width).state_dict().items()}
    trained = {
        k: v * 1.5 + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in rewind.items()
    }
    masks = {}
    for name in ("conv2.weight", "conv3.weight", "fc1.weight"):
        numel = trained[name].numel()
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=gen)[: round(keep * numel)]] = True
        masks[name] = flat.view(trained[name].shape)
        trained[name] = trained[name] * masks[name]
    metadata = {
        "architecture": {"name": "digits_cnn", "kwargs": {"width": width}},
        "num_classes": 10,
        "dataset": {"name": "digits", "split_seed": 0},
        "input_shape": [1, 8, 8],
    }
    return Ticket(Mask(masks), trained, rewind, metadata)


def _make_signed(root: Path, triggers: bool, who: str = "alice", seed: int = 0) -> dict[str, Path]:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ticketguard.signatures.keys import OwnerKey, write_keypair
    from ticketguard.signatures.signing import SignConfig, TriggerConfig, sign_ticket, write_signed
    from ticketguard.tickets.retrain import RetrainConfig

    root.mkdir(parents=True, exist_ok=True)
    raw_key = bytes((i + seed) % 256 for i in range(32))
    owner = OwnerKey(f"{who}@example.org", Ed25519PrivateKey.from_private_bytes(raw_key))
    ticket = _small_ticket(seed=seed)
    ticket.save(root / "unsigned.ticket")
    config = SignConfig(
        retrain=RetrainConfig(epochs=1),
        triggers=TriggerConfig(size=16, max_epochs=1) if triggers else None,
    )
    result = sign_ticket(
        ticket, owner, config, device=torch.device("cpu"), created="2026-01-01T00:00:00Z"
    )
    write_signed(result, root / f"{who}.ticket")
    write_keypair(owner, root / who)
    return {
        "unsigned": root / "unsigned.ticket",
        "ticket": root / f"{who}.ticket",
        "cred": root / f"{who}.cred.json",
        "secret": root / f"{who}.secret.json",
        "key": root / f"{who}.key",
        "pub": root / f"{who}.pub",
    }


def _make_run(root: Path) -> Path:
    from ticketguard.tickets.finding import FindConfig, find_ticket
    from ticketguard.tickets.pruning import PruneConfig
    from ticketguard.tickets.training import TrainConfig

    config = FindConfig(
        rounds=1, prune=PruneConfig(rate=0.3), train=TrainConfig(epochs=1), arch_kwargs={"width": 4}
    )
    find_ticket(config, root, device="cpu")
    return root


# ---------------------------------------------------------------------------------------------
# File builders.


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header (parsed) and the data section of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes) -> None:
    """Write a safetensors file from a header (dict, or raw bytes taken verbatim) and data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def ticket_meta(header: dict[str, Any]) -> dict[str, Any]:
    return json.loads(header["__metadata__"]["ticketguard"])


def with_meta(header: dict[str, Any], meta: dict[str, Any] | str) -> dict[str, Any]:
    header = dict(header)
    text = meta if isinstance(meta, str) else json.dumps(meta, sort_keys=True)
    header["__metadata__"] = {**header["__metadata__"], "ticketguard": text}
    return header


def zip_archive(path: Path, entries: list[tuple[str, bytes, int, int, int]]) -> None:
    """Write a zip from (name, stored bytes, method, crc32, uncompressed size) entries.

    The data is taken as given (method 8 = already deflated), so a bomb's huge uncompressed
    size need never be compressed by us.
    """
    out, central = bytearray(), bytearray()
    for name, data, method, crc, size in entries:
        offset = len(out)
        fname = name.encode()
        out += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), size, len(fname), 0
        )
        out += fname + data
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            method,
            0,
            0,
            crc,
            len(data),
            size,
            len(fname),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += fname
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(out), 0
    )
    path.write_bytes(bytes(out) + bytes(central) + end)


def deflated_zeros(size: int) -> tuple[bytes, int]:
    """A raw deflate stream of `size` zero bytes (a whole MiB at a time) and its CRC-32."""
    mib = bytes(1 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, no back-refs
    count = size >> 20
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = block * count + tail.compress(b"") + tail.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(mib, crc)
    return stream, crc


def torch_zip(path: Path, pickle_bytes: bytes | None = None, bomb: int = 0) -> None:
    """A torch.save-style zip: archive/data.pkl (given, or `bomb` zero bytes) and version."""
    entries = [("archive/version", b"3\n", 0, zlib.crc32(b"3\n"), 2)]
    if bomb:
        stream, crc = deflated_zeros(bomb)
        entries.insert(0, ("archive/data.pkl", stream, 8, crc, bomb))
    else:
        assert pickle_bytes is not None
        entries.insert(
            0, ("archive/data.pkl", pickle_bytes, 0, zlib.crc32(pickle_bytes), len(pickle_bytes))
        )
    zip_archive(path, entries)


def evil_pickle(marker: Path) -> bytes:
    """A pickle whose loading runs `touch MARKER` through os.system (protocol 2, by hand)."""
    cmd = f"touch {marker}".encode()
    return (
        b"\x80\x02cposix\nsystem\nq\x00X"
        + struct.pack("<I", len(cmd))
        + cmd
        + b"q\x01\x85q\x02Rq\x03."
    )


def sparse_file(path: Path, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


def copy_in(src: Path, case_dir: Path, name: str | None = None) -> Path:
    dst = case_dir / (name or src.name)
    shutil.copyfile(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Mutations.


def flip_bytes(data: bytes, rng: random.Random, count: int = 1, lo: int = 0, hi: int = 0) -> bytes:
    """XOR `count` bytes in [lo, hi) with a non-zero value (never 0x20, a mere case change)."""
    buf = bytearray(data)
    hi = hi or len(buf)
    for _ in range(count):
        i = rng.randrange(lo, hi)
        buf[i] ^= rng.choice([v for v in range(1, 256) if v != 0x20])
    return bytes(buf)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(0, len(data))]


def json_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in a parsed JSON document."""
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            found += json_paths(v, (*prefix, i))
    return found


_SENTINEL = "@@FUZZ@@"


def replace_json(text: str, rng: random.Random) -> tuple[str, str]:
    """Replace one random field of a JSON document with a hostile value (raw JSON text)."""
    doc = json.loads(text)
    path = rng.choice(json_paths(doc))
    hostile = rng.choice(HOSTILE_JSON)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = _SENTINEL
    out = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return out.replace(
        json.dumps(_SENTINEL), hostile, 1
    ), f"{'.'.join(map(str, path))}={hostile[:12]}"


def duplicate_key(text: str, rng: random.Random) -> str:
    """Repeat one top-level key of a JSON object with another value, first or last."""
    doc = json.loads(text)
    key = rng.choice(sorted(doc))
    extra = f"{json.dumps(key)}:{rng.choice(HOSTILE_JSON[:8])}"
    body = text.strip()[1:-1]
    return "{" + (extra + "," + body if rng.random() < 0.5 else body + "," + extra) + "}"


def mutate_json(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One seeded mutation of a JSON file, and its name."""
    op = rng.choice(["flip", "flip3", "truncate", "replace", "replace", "duplicate", "nest"])
    if op.startswith("flip"):
        return flip_bytes(data, rng, 3 if op == "flip3" else 1), op
    if op == "truncate":
        return truncate(data, rng), op
    text = data.decode()
    if op == "replace":
        out, what = replace_json(text, rng)
        return out.encode(), f"replace {what}"
    if op == "duplicate":
        return duplicate_key(text, rng).encode(), op
    depth = rng.choice([1000, 100_000])
    return ("[" * depth + text + "]" * depth).encode(), f"nest{depth}"


def mutate_ticket(data: bytes, rng: random.Random) -> tuple[bytes, str, bool]:
    """One seeded mutation of a ticket file: (bytes, name, may it still be a valid file?)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    op = rng.choice(["truncate", "flip-header", "flip-data", "meta", "meta", "offsets", "dtype"])
    if op == "truncate":
        return truncate(data, rng), op, False
    if op == "flip-header":
        return flip_bytes(data, rng, 1, 0, 8 + n), op, True
    if op == "flip-data":
        return flip_bytes(data, rng, rng.choice([1, 16]), 8 + n), op, True
    names = sorted(k for k in header if k != "__metadata__")
    if op == "meta":
        text, what = replace_json(header["__metadata__"]["ticketguard"], rng)
        blob = json.dumps(with_meta(header, text)).encode()
        blob += b" " * (-len(blob) % 8)
        return struct.pack("<Q", len(blob)) + blob + data[8 + n :], f"meta {what}", True
    name = rng.choice(names)
    header = dict(header)
    entry = dict(header[name])
    if op == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [[b, a], [a, b + 10**12], [0, len(data)], [a + 1, b + 1], [-1, b], [a, a]]
        )
    else:
        entry["dtype"] = rng.choice(["F64", "BOOL", "I64", "U8", "F16", "Q4", "F8_E4M3"])
    header[name] = entry
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data[8 + n :], f"{op} {name}", False


def mutate_toml(text: str, rng: random.Random) -> tuple[str, str]:
    """Replace the value of one `key = value` line with a hostile TOML value."""
    lines = text.splitlines()
    candidates = [
        i
        for i, line in enumerate(lines)
        if "=" in line and not line.lstrip().startswith(("#", "[", "name", "label"))
    ]
    i = rng.choice(candidates)
    key = lines[i].split("=", 1)[0].strip()
    value = rng.choice(HOSTILE_TOML)
    lines[i] = f"{key} = {value}"
    return "\n".join(lines) + "\n", f"{key}={value[:12]}"


# ---------------------------------------------------------------------------------------------
# Commands.


def inspect_cmd(case_dir: Path, suspect: Path, **kw: Any) -> Invocation:
    return Invocation(["inspect", suspect], case_dir, **kw)


def verify_cmd(case_dir: Path, base: Base, suspect: Path, **kw: Any) -> Invocation:
    s = base.signed
    argv = ["verify", suspect, "--credential", s["cred"], "--key", s["key"], "--device", "cpu"]
    return Invocation(argv, case_dir, allow_not_verified=True, **kw)


# ---------------------------------------------------------------------------------------------
# Class 1: checkpoints, for `inspect` and `verify SUSPECT`.


def _meta_case(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path, Base], Path]:
    def make(case_dir: Path, base: Base) -> Path:
        header, data = read_safetensors(base.signed["ticket"])
        meta = ticket_meta(header)
        replaced = edit(meta)
        path = case_dir / "suspect.ticket"
        write_safetensors(path, with_meta(header, replaced if replaced is not None else meta), data)
        return path

    return make


def _set(path: tuple, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def _zip_bomb(case_dir: Path, base: Base) -> Path:
    path = case_dir / "bomb.pth"
    torch_zip(path, bomb=3 * GiB)  # 3 GiB of zeros in about 3 MiB
    return path


def _sparse_huge(case_dir: Path, base: Base) -> Path:
    path = case_dir / "huge.pth"
    sparse_file(path, 64 * GiB)
    return path


def _st_header_len(case_dir: Path, base: Base) -> Path:
    path = case_dir / "huge-header-len.safetensors"
    sparse_file(path, 8 * GiB, struct.pack("<Q", 6 * GiB) + b"{")
    return path


def _st_huge_header(case_dir: Path, base: Base) -> Path:
    header, data = read_safetensors(base.signed["ticket"])
    header = with_meta(header, ticket_meta(header))
    header["__metadata__"]["padding"] = "x" * (90 * 1024**2)
    path = case_dir / "huge-header.ticket"
    write_safetensors(path, header, data)
    return path


def _st_many_tensors(case_dir: Path, base: Base) -> Path:
    header, data = read_safetensors(base.signed["ticket"])
    end = len(data)
    for i in range(300_000):
        header[f"trained::z{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    path = case_dir / "many.ticket"
    write_safetensors(path, header, data)
    return path


def _st_edit(name: str, change: Callable[[dict[str, Any], int], None]) -> Callable:
    def make(case_dir: Path, base: Base) -> Path:
        header, data = read_safetensors(base.signed["ticket"])
        target = sorted(k for k in header if k.startswith(name))[0]
        entry = dict(header[target])
        change(entry, len(data))
        header[target] = entry
        path = case_dir / "edited.ticket"
        write_safetensors(path, header, data)
        return path

    return make


def _st_huge_shape(case_dir: Path, base: Base) -> Path:
    header, data = read_safetensors(base.signed["ticket"])
    target = sorted(k for k in header if k.startswith("trained::fc1"))[0]
    header[target] = {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 0]}
    path = case_dir / "huge-shape.ticket"
    write_safetensors(path, header, data)
    return path


def _false_sparsity(case_dir: Path, base: Base) -> Path:
    header, data = read_safetensors(base.signed["ticket"])
    buf = bytearray(data)
    for name, entry in header.items():
        if name.startswith("trained::") and name.replace("trained::", "mask::") in header:
            a, b = entry["data_offsets"]
            buf[a:b] = bytes([0x3F]) * (b - a)  # every weight 0.75-ish: dense under a sparse mask
    path = case_dir / "false-sparsity.ticket"
    write_safetensors(path, header, bytes(buf))
    return path


def _deep_meta(case_dir: Path, base: Base) -> Path:
    header, data = read_safetensors(base.signed["ticket"])
    meta = json.dumps(ticket_meta(header), sort_keys=True)
    deep = meta[:-1] + ',"deep":' + "[" * 200_000 + "]" * 200_000 + "}"
    path = case_dir / "deep.ticket"
    write_safetensors(path, with_meta(header, deep), data)
    return path


def _evil_zip(case_dir: Path, base: Base) -> Path:
    path = case_dir / "evil.pth"
    torch_zip(path, evil_pickle(case_dir / "PWNED"))
    return path


def _evil_legacy(case_dir: Path, base: Base) -> Path:
    path = case_dir / "evil-legacy.pt"
    path.write_bytes(evil_pickle(case_dir / "PWNED"))
    return path


CHECKPOINTS: dict[str, Callable[[Path, Base], Path]] = {
    "zip-bomb": _zip_bomb,
    "sparse-64g": _sparse_huge,
    "st-header-len-6g": _st_header_len,
    "st-header-90m": _st_huge_header,
    "st-300k-empty-tensors": _st_many_tensors,
    "st-offsets-past-end": _st_edit(
        "trained::fc1", lambda e, n: e.update(data_offsets=[0, n + 10**9])
    ),
    "st-offsets-reversed": _st_edit(
        "trained::conv2", lambda e, n: e.update(data_offsets=e["data_offsets"][::-1])
    ),
    "st-dtype-mask-f32": _st_edit("mask::", lambda e, n: e.update(dtype="F32")),
    "st-dtype-trained-i32": _st_edit("trained::fc1", lambda e, n: e.update(dtype="I32")),
    "st-shape-2^62": _st_huge_shape,
    "meta-deep-200k": _deep_meta,
    "meta-num-classes-1e9": _meta_case(_set(("num_classes",), 10**9)),
    "meta-input-3x1e5x1e5": _meta_case(_set(("input_shape",), [3, 100_000, 100_000])),
    "meta-width-3000": _meta_case(_set(("architecture", "kwargs"), {"width": 3000})),
    "meta-nan": _meta_case(lambda m: json.dumps(m)[:-1] + ',"num_classes":NaN}'),
    "false-sparsity": _false_sparsity,
    "pickle-os-system-zip": _evil_zip,
    "pickle-os-system-legacy": _evil_legacy,
}
#: Hand-written checkpoint cases in the quick set (inspect; verify for the last two).
QUICK_CHECKPOINTS = ("meta-width-3000", "zip-bomb", "st-header-len-6g", "pickle-os-system-zip")
QUICK_VERIFY_CHECKPOINTS = ("sparse-64g",)


def checkpoint_case(name: str, command: str, slow: bool) -> Case:
    def build(case_dir: Path, base: Base) -> Invocation:
        path = CHECKPOINTS[name](case_dir, base)
        marker = case_dir / "PWNED" if name.startswith("pickle") else None
        if command == "inspect":
            # An unmasked tensor (a bias) stored as integers is a fact inspect may report; the
            # model will not load it (verify refuses).
            shown = name == "st-dtype-trained-i32"
            return inspect_cmd(case_dir, path, marker=marker, may_succeed=shown)
        # verify reads the owner's mark from the tensors: a lie in the metadata (or dense
        # weights) may still carry it, so "verified" is a fine answer there.
        # So may an unmasked bias relabelled as integers: the signed layers are untouched.
        may = name.startswith("meta-") or name in ("false-sparsity", "st-dtype-trained-i32")
        return verify_cmd(case_dir, base, path, marker=marker, may_succeed=may)

    return Case(f"checkpoint/{command}-{name}", build, slow)


def checkpoint_mutation(seed: int, command: str, slow: bool) -> Case:
    def build(case_dir: Path, base: Base) -> Invocation:
        rng = random.Random(f"checkpoint:{command}:{seed}")
        data, name, may_pass = mutate_ticket(base.signed["ticket"].read_bytes(), rng)
        path = case_dir / "mutant.ticket"
        path.write_bytes(data)
        (case_dir / "MUTATION").write_text(name)
        if command == "inspect":
            return inspect_cmd(case_dir, path, may_succeed=may_pass)
        return verify_cmd(case_dir, base, path, may_succeed=may_pass)

    return Case(f"checkpoint/{command}-mutant-{seed}", build, slow)


# ---------------------------------------------------------------------------------------------
# Class 2: credentials and secrets, for `verify`, `dispute`, `render`.


def _json_hostile(kind: str, valid: bytes) -> bytes:
    text = valid.decode()
    if kind == "nan":
        return text.replace('"format":', '"format":NaN,"format":', 1).encode()
    if kind == "infinity":
        return ('{"payload_bits":Infinity,' + text[1:]).encode()
    if kind == "1e400":
        return ('{"payload_bits":1e400,' + text[1:]).encode()
    if kind == "surrogate-escaped":
        return text.replace('"ticketguard-', '"ticketguard\\ud800-', 1).encode()
    if kind == "surrogate-raw":
        return valid.replace(b'"ticketguard-', b'"ticketguard\xed\xa0\x80-', 1)
    if kind == "duplicate-keys":
        return ('{"format":"ticketguard-x/9",' + text[1:]).encode()
    if kind == "deep":
        return ("[" * 100_000 + "]" * 100_000).encode()
    if kind == "deep-object":
        return ('{"a":' * 50_000 + "1" + "}" * 50_000).encode()
    if kind == "one-byte":
        i = len(valid) // 2
        return valid[:i] + bytes([valid[i] ^ 0x01]) + valid[i + 1 :]
    if kind == "truncated":
        return valid[: len(valid) // 2]
    if kind == "not-utf8":
        return b"\xff\xfe" + valid
    raise ValueError(kind)


JSON_HOSTILE_KINDS = (
    "nan",
    "infinity",
    "1e400",
    "surrogate-escaped",
    "surrogate-raw",
    "duplicate-keys",
    "deep",
    "deep-object",
    "one-byte",
    "truncated",
    "not-utf8",
    "huge-sparse",
    "huge-string",
)


def _write_hostile(case_dir: Path, valid: Path, kind: str, name: str) -> Path:
    path = case_dir / name
    if kind == "huge-sparse":
        sparse_file(path, 16 * GiB, b'{"a":"')
    elif kind == "huge-string":
        with open(path, "wb") as f:
            f.write(valid.read_bytes()[:-1] + b',"zz":"')
            f.write(b"x" * (300 * 1024**2))
            f.write(b'"}')
    elif kind == "edit-credential-sha256":
        doc = json.loads(valid.read_text())
        doc["credential_sha256"] = "0" * 64
        path.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))
    elif kind == "edit-fingerprint":
        doc = json.loads(valid.read_text())
        doc["fingerprint"] = doc["fingerprint"][::-1]
        path.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))
    else:
        path.write_bytes(_json_hostile(kind, valid.read_bytes()))
    return path


def _doc_command(command: str, role: str, doc: Path, case_dir: Path, base: Base) -> Invocation:
    """Run `command` with the hostile `doc` as the credential or the secret."""
    s = base.signed
    cred = doc if role == "cred" else s["cred"]
    secret = doc if role == "secret" else s["secret"]
    if command == "verify":
        extra = ["--key", s["key"]] if role == "cred" else ["--reveal", secret]
        argv = ["verify", s["ticket"], "--credential", cred, *extra, "--device", "cpu"]
        return Invocation(argv, case_dir, allow_not_verified=True)
    if command == "dispute":
        # The second claim is Mallory's, on another ticket: neither claim can be shown first
        # (exit 1) unless the hostile one counts.
        m = base.mallory
        argv = ["dispute", "--claim", cred, secret, s["ticket"], "--claim", m["cred"], m["secret"], m["ticket"]]  # fmt: skip
        return Invocation([*argv, "--device", "cpu"], case_dir, allow_not_verified=True)
    assert command == "render"
    argv = ["render", s["ticket"], "--credential", cred, "--out", case_dir / "pictures"]
    return Invocation(argv, case_dir)


def document_case(role: str, command: str, kind: str, slow: bool) -> Case:
    def build(case_dir: Path, base: Base) -> Invocation:
        valid = base.signed[role]
        path = _write_hostile(case_dir, valid, kind, f"hostile.{role}.json")
        return _doc_command(command, role, path, case_dir, base)

    klass = "credential" if role == "cred" else "secret"
    return Case(f"{klass}/{command}-{kind}", build, slow)


def document_mutation(role: str, command: str, seed: int, slow: bool) -> Case:
    klass = "credential" if role == "cred" else "secret"

    def build(case_dir: Path, base: Base) -> Invocation:
        rng = random.Random(f"{klass}:{command}:{seed}")
        data, name = mutate_json(base.signed[role].read_bytes(), rng)
        path = case_dir / f"mutant.{role}.json"
        path.write_bytes(data)
        (case_dir / "MUTATION").write_text(name)
        return _doc_command(command, role, path, case_dir, base)

    return Case(f"{klass}/{command}-mutant-{seed}", build, slow)


# ---------------------------------------------------------------------------------------------
# Class 3: bench configs.


def bench_text(ticket: Path, cred: Path, secret: Path) -> str:
    """A valid one-cell bench config (it would run one noise attack on the CPU)."""
    return f"""name = "fuzz"
seeds = [0]
alpha = 1e-6
security_bits = 128
max_drop = 0.05
data_fraction = 0.5
blackbox = false
reference = false
null_samples = 5
device = "cpu"
workers = 1

[target]
ticket = "{ticket}"
credential = "{cred}"
secret = "{secret}"

[[attack]]
name = "noise"
[attack.params]
sigma = 0.1
"""


def _bench(case_dir: Path, text: str) -> Invocation:
    path = case_dir / "bench.toml"
    path.write_text(text)
    return Invocation(["bench", path, "--out", case_dir / "out"], case_dir)


def _bench_hostile(kind: str) -> Callable[[Path, Base], Invocation]:
    def build(case_dir: Path, base: Base) -> Invocation:
        s = base.signed
        text = bench_text(s["ticket"], s["cred"], s["secret"])
        if kind == "deep-nesting":
            text = text.replace("sigma = 0.1", "sigma = " + "[" * 100_000 + "]" * 100_000)
        elif kind == "deep-tables":
            text += "[" + ".".join(["t"] * 20_000) + "]\nx = 1\n"
        elif kind == "grid-1e6":
            seeds = ", ".join(map(str, range(1000)))
            sigmas = ", ".join(f"{0.001 * (i + 1):.3f}" for i in range(1000))
            text = text.replace("seeds = [0]", f"seeds = [{seeds}]")
            text = text.replace("sigma = 0.1", f"sigma = [{sigmas}]")
        elif kind == "grid-1e9":
            seeds = ", ".join(map(str, range(100_000)))
            sigmas = ", ".join(f"{1e-5 * (i + 1):.5f}" for i in range(10_000))
            text = text.replace("seeds = [0]", f"seeds = [{seeds}]")
            text = text.replace("sigma = 0.1", f"sigma = [{sigmas}]")
        elif kind == "nan-sigma":
            text = text.replace("sigma = 0.1", "sigma = nan")
        elif kind == "nan-max-drop":
            text = text.replace("max_drop = 0.05", "max_drop = nan")
        elif kind == "inf-alpha":
            text = text.replace("alpha = 1e-6", "alpha = inf").replace(
                "security_bits = 128", "security_bits = 0"
            )
        elif kind == "credential-one-byte":
            data = bytearray(s["cred"].read_bytes())
            data[len(data) // 2] ^= 0x01
            bad = case_dir / "target.cred.json"
            bad.write_bytes(bytes(data))
            text = text.replace(str(s["cred"]), str(bad))
        elif kind == "garbage-target":
            bad = case_dir / "target.ticket"
            bad.write_bytes(random.Random("bench:garbage").randbytes(4096))
            text = text.replace(str(s["ticket"]), str(bad))
        elif kind == "garbage-credential":
            bad = case_dir / "target.cred.json"
            bad.write_bytes(random.Random("bench:garbage-cred").randbytes(4096))
            text = text.replace(str(s["cred"]), str(bad))
        else:
            raise ValueError(kind)
        return _bench(case_dir, text)

    return build


BENCH_KINDS = (
    "credential-one-byte",
    "grid-1e9",
    "deep-nesting",
    "deep-tables",
    "grid-1e6",
    "nan-sigma",
    "nan-max-drop",
    "inf-alpha",
    "garbage-target",
    "garbage-credential",
)
QUICK_BENCH = ("credential-one-byte", "grid-1e9")


def bench_mutation(seed: int, slow: bool) -> Case:
    def build(case_dir: Path, base: Base) -> Invocation:
        s = base.signed
        rng = random.Random(f"bench:{seed}")
        text, name = mutate_toml(bench_text(s["ticket"], s["cred"], s["secret"]), rng)
        (case_dir / "MUTATION").write_text(name)
        return _bench(case_dir, text)

    return Case(f"bench/mutant-{seed}", build, slow)


# ---------------------------------------------------------------------------------------------
# Class 4: trigger folders, for `sign --trigger DIR`.


def _png(width: int, height: int, payload: bytes | None = None) -> bytes:
    """A grayscale PNG claiming width x height; its pixel data is `payload` (deflated zeros)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = payload if payload is not None else zlib.compress(bytes(width + 1) * min(height, 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _trigger_folder(case_dir: Path, count: int = 4) -> Path:
    folder = case_dir / "triggers"
    (folder / "pics").mkdir(parents=True)
    for i in range(count):
        (folder / "pics" / f"{i + 1}.png").write_bytes(_png(8, 8))
    (folder / "labels.txt").write_text("".join(f"{i % 10}\n" for i in range(count)))
    return folder


def _trigger_hostile(kind: str) -> Callable[[Path, Base], Invocation]:
    def build(case_dir: Path, base: Base) -> Invocation:
        folder = _trigger_folder(case_dir)
        pics, labels = folder / "pics", folder / "labels.txt"
        outside = case_dir / "outside"
        outside.mkdir()
        if kind == "symlink-image-out":
            (pics / "4.png").unlink()
            (pics / "4.png").symlink_to("/etc/passwd")
        elif kind == "symlink-image-out-png":
            (outside / "secret.png").write_bytes(_png(8, 8))
            (pics / "4.png").unlink()
            (pics / "4.png").symlink_to(outside / "secret.png")
        elif kind == "symlink-pics-out":
            shutil.move(str(pics), str(outside / "pics"))
            pics.symlink_to(outside / "pics")
        elif kind == "symlink-labels-out":
            labels.rename(outside / "labels.txt")
            labels.symlink_to(outside / "labels.txt")
        elif kind == "symlink-loop":
            (pics / "4.png").unlink()
            (pics / "4.png").symlink_to(pics / "4.png")
        elif kind == "labels-nan":
            labels.write_text("0\n1\nnan\n3\n")
        elif kind == "labels-1e400":
            labels.write_text("0\n1\n1e400\n3\n")
        elif kind == "labels-negative":
            labels.write_text("0\n1\n-1\n3\n")
        elif kind == "labels-not-utf8":
            labels.write_bytes(b"0\n1\n\xff\xfe\n3\n")
        elif kind == "labels-huge":
            with open(labels, "w") as f:
                f.write("1\n" * (20 * 1024**2))
        elif kind == "labels-sparse":
            sparse_file(labels, 16 * GiB, b"0\n1\n2\n3")
        elif kind == "image-1e5-square":
            (pics / "4.png").write_bytes(_png(100_000, 100_000))
        elif kind == "image-20000-square":
            (pics / "4.png").write_bytes(_png(20_000, 20_000))
        elif kind == "image-9000-square":
            (pics / "4.png").write_bytes(_png(9000, 9000))
        elif kind == "image-text":
            (pics / "4.png").write_text("not an image\n")
        elif kind == "image-truncated":
            (pics / "4.png").write_bytes(_png(8, 8)[:30])
        elif kind == "image-empty":
            (pics / "4.png").write_bytes(b"")
        elif kind == "image-fifo":
            (pics / "4.png").unlink()
            os.mkfifo(pics / "4.png")
        elif kind == "pics-is-file":
            shutil.rmtree(pics)
            pics.write_text("x")
        else:
            raise ValueError(kind)
        s = base.signed
        argv = [
            "sign", s["unsigned"], "--key", s["key"], "--out", case_dir / "out" / "s.ticket",
            "--trigger", folder, "--trigger-epochs", "1", "--recover-epochs", "1",
            "--device", "cpu",
        ]  # fmt: skip
        (case_dir / "out").mkdir()
        return Invocation(argv, case_dir)

    return build


TRIGGER_KINDS = (
    "symlink-image-out",
    "image-1e5-square",
    "symlink-pics-out",
    "symlink-image-out-png",
    "symlink-labels-out",
    "symlink-loop",
    "labels-nan",
    "labels-1e400",
    "labels-negative",
    "labels-not-utf8",
    "labels-huge",
    "labels-sparse",
    "image-20000-square",
    "image-9000-square",
    "image-text",
    "image-truncated",
    "image-empty",
    "image-fifo",
    "pics-is-file",
)
QUICK_TRIGGER = ("symlink-image-out", "image-1e5-square")


# ---------------------------------------------------------------------------------------------
# Class 5: `find --resume` run folders.


def _resume(kind: str | None, seed: int | None = None) -> Callable[[Path, Base], Invocation]:
    def build(case_dir: Path, base: Base) -> Invocation:
        run = case_dir / "run"
        shutil.copytree(base.run_dir, run)
        cfg = run / "config.json"
        may = False
        if kind == "round-truncated":
            target = run / "rounds" / "round-01.ticket"
            target.write_bytes(target.read_bytes()[:1000])
            may = True  # an unfinished write: the round may be redone
        elif kind == "final-truncated":
            (run / "final.ticket").write_bytes((run / "final.ticket").read_bytes()[:7])
            may = True
        elif kind == "log-truncated":
            (run / "log.json").write_bytes((run / "log.json").read_bytes()[:40])
            may = True
        elif kind == "config-deep":
            cfg.write_text('{"config":' + "[" * 200_000 + "]" * 200_000 + "}")
        elif kind == "config-not-utf8":
            cfg.write_bytes(cfg.read_bytes().replace(b'"digits"', b'"digits\xff\xfe"', 1))
        elif kind == "config-nan":
            cfg.write_text(cfg.read_text().replace('"rounds": 1', '"rounds": NaN', 1))
        elif kind == "config-huge-width":
            doc = json.loads(cfg.read_text())
            doc["config"]["arch_kwargs"] = {"width": 3000}
            cfg.write_text(json.dumps(doc))
        elif kind == "config-sparse":
            sparse_file(cfg, 16 * GiB, b'{"config":"')
        elif kind == "mutant":
            rng = random.Random(f"resume:{seed}")
            data, name = mutate_json(cfg.read_bytes(), rng)
            cfg.write_bytes(data)
            (case_dir / "MUTATION").write_text(name)
        argv = ["find", "--out", run, "--resume", "--quiet", "--device", "cpu"]
        # A resumable run may write its rounds again; a refused one writes nothing.
        return Invocation(argv, case_dir, may_succeed=may, expected_outputs=frozenset({"run"}))

    return build


RESUME_KINDS = (
    "config-deep",
    "round-truncated",
    "config-not-utf8",
    "config-nan",
    "config-huge-width",
    "config-sparse",
    "final-truncated",
    "log-truncated",
)
QUICK_RESUME = ("config-deep",)


# ---------------------------------------------------------------------------------------------
# The sets.


def quick_cases() -> list[Case]:
    """A few hand-written cases per class and one mutation seed per file type (< 60 s)."""
    cases = [checkpoint_case(n, "inspect", False) for n in QUICK_CHECKPOINTS]
    cases += [checkpoint_case(n, "verify", False) for n in QUICK_VERIFY_CHECKPOINTS]
    cases += [checkpoint_mutation(0, "inspect", False)]
    cases += [
        document_case("cred", "verify", "nan", False),
        document_case("cred", "render", "huge-sparse", False),
        document_case("secret", "verify", "edit-credential-sha256", False),
        document_mutation("cred", "verify", 0, False),
    ]
    cases += [Case(f"bench/{k}", _bench_hostile(k)) for k in QUICK_BENCH]
    cases += [Case(f"trigger/{k}", _trigger_hostile(k)) for k in QUICK_TRIGGER]
    cases += [Case(f"resume/{k}", _resume(k)) for k in QUICK_RESUME]
    return cases


def wide_cases(seeds: range = range(8)) -> list[Case]:
    """Every hand-written case on every command that reads it, and `seeds` mutations each."""
    quick = {c.id for c in quick_cases()}
    cases: list[Case] = []
    for name in CHECKPOINTS:
        cases += [checkpoint_case(name, cmd, True) for cmd in ("inspect", "verify")]
    for seed in seeds:
        cases += [checkpoint_mutation(seed, cmd, True) for cmd in ("inspect", "verify")]
    for role, commands in (
        ("cred", ("verify", "dispute", "render")),
        ("secret", ("verify", "dispute")),
    ):
        kinds = JSON_HOSTILE_KINDS
        if role == "secret":
            kinds += ("edit-credential-sha256", "edit-fingerprint")
        for command in commands:
            cases += [document_case(role, command, k, True) for k in kinds]
            cases += [document_mutation(role, command, seed, True) for seed in seeds]
    cases += [Case(f"bench/{k}", _bench_hostile(k), True) for k in BENCH_KINDS]
    cases += [bench_mutation(seed, True) for seed in seeds]
    cases += [Case(f"trigger/{k}", _trigger_hostile(k), True) for k in TRIGGER_KINDS]
    cases += [Case(f"resume/{k}", _resume(k), True) for k in RESUME_KINDS]
    cases += [Case(f"resume/mutant-{s}", _resume("mutant", s), True) for s in seeds]
    from .http import http_cases

    cases += http_cases()
    return [c for c in cases if c.id not in quick]


def all_cases(seeds: range = range(8)) -> list[Case]:
    return quick_cases() + wide_cases(seeds)
