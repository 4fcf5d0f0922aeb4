"""Load what people in this field have on disk, as a ticket or a suspect, without executing code.

Accepted: ticketguard tickets; safetensors files; PyTorch files holding a state dict, a
`torch.nn.utils.prune` state dict (`<layer>.weight_orig` + `<layer>.weight_mask`) or a checkpoint
dict wrapping one under `state_dict`, `model` or `init_weight`. PyTorch files are read with
`torch.load(weights_only=True)`; a file that needs arbitrary code to unpickle is refused.
"""

from __future__ import annotations

import io
import pickletools
import struct
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketguard.errors import ArchitectureError, MaskShapeError, TicketFormatError, UnsafeFileError
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.ticket import (
    MAX_TENSORS,
    Ticket,
    is_ticket_metadata,
    load_state,
    read_safetensors,
    ticket_from_safetensors,
)

#: The local-file-header magic torch.load tests to choose its zip format.
ZIP_MAGIC = b"PK\x03\x04"
WRAPPER_KEYS = ("state_dict", "model", "init_weight")
PRUNE_ORIG, PRUNE_MASK = "_orig", "_mask"

# --- Budgets (docs/ticket-format.md, "Budgets") ---------------------------------------------------
# Every model file is checked against these before anything is inflated, unpickled or allocated,
# so a hostile file is refused in seconds and within a few hundred MB.

#: Largest model file (and largest total a zip's members may declare): 4 GiB holds a checkpoint
#: of a MAX_MODEL_PARAMETERS (200 M) model in float32 with its rewind weights and an optimizer's
#: state; the models ticketguard works with are 0.1-60 MB.
MAX_MODEL_FILE_BYTES = 4 << 30
#: Largest pickle (a zip's `data.pkl`, or the pickles at the start of a legacy file) read: a
#: state dict's pickle takes about 100 bytes a tensor, so 64 MiB leaves room for numpy arrays
#: and training logs stored in a checkpoint dict; a pickle is never read past it.
MAX_PICKLE_BYTES = 64 << 20
#: Most pickle opcodes scanned (and so handed to torch's pure-Python weights-only unpickler, about
#: 1 us each): a state dict needs a few dozen a tensor; 2 M keep the unpickling within seconds.
MAX_PICKLE_OPCODES = 2_000_000
#: Pickles at the start of a legacy (pre-1.6, non-zip) torch file: magic number, protocol, system
#: info, the object, the storage keys.
LEGACY_PICKLES = 5
#: Most members a zip may declare (torch writes one a storage plus a few), and the largest central
#: directory, both checked before the zip is opened: Python's and torch's zip readers parse the
#: whole directory into memory.
MAX_ZIP_MEMBERS = 2 * MAX_TENSORS + 100
MAX_ZIP_DIRECTORY_BYTES = 16 << 20
#: Largest ratio of declared to compressed size of a compressed zip member above 1 MiB: torch
#: stores members uncompressed, and deflated float weights shrink by a few times at most (99%
#: pruned ones by tens), while a bomb of zeros shrinks by 1000x.
MAX_COMPRESSION_RATIO = 100


@dataclass
class LoadedCheckpoint:
    """A model read from disk: merged weights, the explicit mask if any, and what was noticed."""

    path: Path
    source_format: str
    state: dict[str, torch.Tensor]
    mask: Mask | None = None
    rewind: dict[str, torch.Tensor] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ticket: Ticket | None = None

    @property
    def architecture(self) -> str | None:
        return (self.metadata.get("architecture") or {}).get("name")


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts like safetensors: an 8-byte header length, then a JSON object.

    Any length is accepted here so that an oversized header is refused by `read_safetensors`
    with a reason, not misread as a pickle.
    """
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return size >= 2 and head[8:9] == b"{"


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars and arrays of plain dtypes: common in checkpoints (`best_acc`), and inert."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [
        np.float16,
        np.float32,
        np.float64,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.bool_,
    ]
    return [
        core.multiarray.scalar,
        core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        *(type(np.dtype(d)) for d in dtypes),
    ]


def _zip_directory(path: Path) -> tuple[int, int] | None:
    """The member count and central-directory size a zip declares, read before parsing it."""
    try:
        with path.open("rb") as f:
            end = zipfile._EndRecData(f)  # type: ignore[attr-defined]
    except (OSError, AttributeError, struct.error):
        return None
    if not end:
        return None
    return int(end[zipfile._ECD_ENTRIES_TOTAL]), int(end[zipfile._ECD_SIZE])  # type: ignore[attr-defined]


def _check_zip(path: Path, archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Refuse a zip whose declared contents exceed the budgets; return its pickle members."""
    infos = archive.infolist()
    total = 0
    for info in infos:
        if info.file_size > MAX_MODEL_FILE_BYTES:
            raise TicketFormatError(
                f"{path}: zip member {info.filename[:80]!r} declares {info.file_size:,} bytes, "
                f"more than the {MAX_MODEL_FILE_BYTES:,}-byte budget; refused"
            )
        total += info.file_size
        if (
            info.compress_type != zipfile.ZIP_STORED
            and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)
            and info.file_size > 1 << 20
        ):
            raise TicketFormatError(
                f"{path}: zip member {info.filename[:80]!r} inflates {info.compress_size:,} bytes "
                f"to {info.file_size:,} (more than {MAX_COMPRESSION_RATIO}x: a zip bomb); refused"
            )
    if total > MAX_MODEL_FILE_BYTES:
        raise TicketFormatError(
            f"{path}: the zip's members declare {total:,} bytes in all, more than the "
            f"{MAX_MODEL_FILE_BYTES:,}-byte budget; refused"
        )
    packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    inflated = sum(i.file_size for i in packed)
    if inflated > 1 << 20 and inflated > MAX_COMPRESSION_RATIO * max(
        sum(i.compress_size for i in packed), 1
    ):
        # Many small members each under the per-member check add up to the same bomb.
        raise TicketFormatError(
            f"{path}: its compressed members inflate to {inflated:,} bytes, more than "
            f"{MAX_COMPRESSION_RATIO}x their size (a zip bomb); refused"
        )
    pickles = [i for i in infos if i.filename.endswith(".pkl")]
    for info in pickles:
        if info.file_size > MAX_PICKLE_BYTES:
            raise TicketFormatError(
                f"{path}: its pickle {info.filename[:80]!r} declares {info.file_size:,} bytes, "
                f"more than the {MAX_PICKLE_BYTES:,}-byte budget; refused"
            )
    return pickles


def _check_file(path: Path) -> int:
    """Refuse a file past the size budget (or a zip past its directory budget); return its size."""
    size = path.stat().st_size
    if size > MAX_MODEL_FILE_BYTES:
        raise TicketFormatError(
            f"{path}: {size:,} bytes, more than the {MAX_MODEL_FILE_BYTES:,}-byte budget of a "
            "model file; refused"
        )
    return size


def _pickle_streams(path: Path) -> list[bytes]:
    """Return the pickle byte streams of a file, each read up to the budget, never more.

    A torch zip: its `*.pkl` members (after the zip's declared sizes passed the budgets). Any
    other file: its first MAX_PICKLE_BYTES bytes (legacy torch files and plain pickles start with
    their pickles; the raw storages after them are not needed to name what the file calls).
    """
    with path.open("rb") as f:
        head = f.read(4)
    # torch.load decides between its zip and legacy formats by these four bytes, so the budgets
    # follow the same branch (a legacy file with a zip footer is still scanned as legacy).
    if head == ZIP_MAGIC:
        directory = _zip_directory(path)
        if directory is not None and (
            directory[0] > MAX_ZIP_MEMBERS or directory[1] > MAX_ZIP_DIRECTORY_BYTES
        ):
            raise TicketFormatError(
                f"{path}: the zip declares {directory[0]:,} members in a {directory[1]:,}-byte "
                f"directory (budget: {MAX_ZIP_MEMBERS:,} members, {MAX_ZIP_DIRECTORY_BYTES:,} "
                "bytes); refused"
            )
        if directory is None or not zipfile.is_zipfile(path):
            raise TicketFormatError(f"{path}: starts like a zip file but is not a readable one")
        try:
            with zipfile.ZipFile(path) as archive:
                streams = []
                for info in _check_zip(path, archive):
                    with archive.open(info) as member:
                        streams.append(member.read(MAX_PICKLE_BYTES + 1))
                return streams
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:120] or type(exc).__name__
            raise TicketFormatError(f"{path}: a damaged zip file ({reason})") from None
    with path.open("rb") as f:
        return [f.read(MAX_PICKLE_BYTES)]


@dataclass
class _Scan:
    """What a bounded scan of a file's pickles found."""

    names: list[str] = field(default_factory=list)
    parsed: bool = False
    opcodes: int = 0
    over_budget: bool = False


def _scan_pickles(stream: bytes, scan: _Scan, max_pickles: int = LEGACY_PICKLES) -> None:
    """Add to `scan` the Python objects the pickles at the start of `stream` import.

    Legacy torch files are several pickles in a row followed by raw storage bytes, so parsing
    goes on pickle after pickle (at most `max_pickles`) until the bytes stop parsing. At most
    MAX_PICKLE_OPCODES opcodes are read in all; past that `scan.over_budget` is set.
    """
    source = io.BytesIO(stream)
    last: list[str] = []
    for _ in range(max_pickles):
        if source.tell() >= len(stream):
            return
        try:
            for opcode, arg, pos in pickletools.genops(source):
                scan.opcodes += 1
                if scan.opcodes > MAX_PICKLE_OPCODES:
                    scan.over_budget = True
                    return
                if opcode.name in ("GLOBAL", "INST"):
                    scan.names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    scan.names.append(".".join(last) if len(last) == 2 else "an object")
                elif isinstance(arg, str):
                    last = [*last[-1:], arg]
                if opcode.name == "STOP":
                    scan.parsed = True
                    source.seek(pos + 1)
                    break
            else:
                return
        except Exception:  # noqa: BLE001 - the rest is not a pickle
            return


def _imported_names(stream: bytes) -> list[str] | None:
    """List the Python objects the pickles in `stream` import; None when it holds no pickle."""
    scan = _Scan()
    _scan_pickles(stream, scan)
    return scan.names if scan.parsed else None


def _torch_allowed_names() -> set[str]:
    """Names torch's weights-only unpickler accepts, so they are not blamed for a refusal."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except (ImportError, AttributeError):
        return set()


def _torch_load(path: Path) -> Any:
    """torch.load(weights_only=True) after checking the file against the budgets.

    The pickles are scanned first (bounded in bytes and opcodes), so torch's own unpickler never
    meets more than MAX_PICKLE_OPCODES opcodes, and a zip's declared sizes are checked before
    torch inflates anything.
    """
    scan = _Scan()
    for stream in _pickle_streams(path):
        if len(stream) > MAX_PICKLE_BYTES:
            raise TicketFormatError(
                f"{path}: a pickle larger than the {MAX_PICKLE_BYTES:,}-byte budget; refused"
            )
        _scan_pickles(stream, scan)
        if scan.over_budget:
            raise TicketFormatError(
                f"{path}: its pickles hold more than {MAX_PICKLE_OPCODES:,} opcodes (the budget; "
                "a state dict needs a few dozen a tensor); refused"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - every failure is explained below in our own words
        pass
    called = sorted(set(scan.names) - _torch_allowed_names())
    if called:
        shown = ", ".join(called[:3]) + (" ..." if len(called) > 3 else "")
        raise UnsafeFileError(
            f"{path}: refused: loading it would execute code from the file (it calls {shown})"
        )
    raise TicketFormatError(f"{path}: not a ticket, safetensors or PyTorch checkpoint")


def _tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    return None


def _unwrap(
    path: Path, obj: Any, notes: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Find the state dict (and rewind weights, if stored) inside a loaded object."""
    direct = _tensor_dict(obj)
    if direct is not None:
        return direct, None
    if not isinstance(obj, Mapping):
        raise TicketFormatError(
            f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint"
        )
    found = {k: _tensor_dict(obj[k]) for k in WRAPPER_KEYS if k in obj}
    found = {k: v for k, v in found.items() if v is not None}
    if not found:
        tensors = {
            k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
        }
        if tensors:
            skipped = sorted(str(k) for k in obj if k not in tensors)
            notes.append(f"ignored non-tensor entries: {', '.join(skipped[:6])}")
            return tensors, None
        raise TicketFormatError(
            f"{path}: no state dict found (looked for tensors, or {', '.join(WRAPPER_KEYS)})"
        )
    main_key = next(k for k in WRAPPER_KEYS if k in found)
    rewind = found.get("init_weight") if main_key != "init_weight" else None
    others = sorted(str(k) for k in obj if k not in found)
    notes.append(
        f"state dict taken from '{main_key}'"
        + ("; rewind weights from 'init_weight'" if rewind else "")
    )
    if others:
        notes.append(f"ignored checkpoint entries: {', '.join(others[:6])}")
    return found[main_key], rewind


def _strip_module_prefix(
    state: dict[str, torch.Tensor], notes: list[str]
) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        notes.append("removed the DataParallel 'module.' prefix")
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def merge_prune_state(
    path: Path, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], Mask | None]:
    """Turn `torch.nn.utils.prune` pairs (`X_orig`, `X_mask`) into masked `X` plus a Mask."""
    merged: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(PRUNE_MASK) and key[: -len(PRUNE_MASK)] + PRUNE_ORIG in state:
            continue
        if key.endswith(PRUNE_ORIG):
            base = key[: -len(PRUNE_ORIG)]
            mask_key = base + PRUNE_MASK
            if mask_key not in state:
                raise TicketFormatError(f"{path}: {key!r} has no matching {mask_key!r}")
            raw_mask = state[mask_key]
            if raw_mask.shape != value.shape:
                raise MaskShapeError(
                    f"{path}: {mask_key!r} has shape {tuple(raw_mask.shape)} but {key!r} has {tuple(value.shape)}"
                )
            m = Mask({base: raw_mask})[base]
            masks[base] = m
            merged[base] = value * m
        else:
            merged[key] = value
    return merged, (Mask(masks) if masks else None)


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read any supported model file without executing code from it."""
    path = Path(path)
    if not path.exists():
        raise TicketFormatError(f"{path}: no such file")
    if not path.is_file():
        raise TicketFormatError(f"{path}: not a file")
    notes: list[str] = []
    _check_file(path)
    if _is_safetensors(path):
        tensors, metadata = read_safetensors(path)
        if is_ticket_metadata(metadata):
            ticket = ticket_from_safetensors(path, tensors, metadata)
            return LoadedCheckpoint(
                path,
                "ticket",
                dict(ticket.trained),
                ticket.mask,
                ticket.rewind or None,
                dict(ticket.metadata),
                notes,
                ticket,
            )
        if not tensors:
            raise TicketFormatError(f"{path}: holds no tensors")
        state, rewind, fmt = tensors, None, "safetensors"
    else:
        state, rewind = _unwrap(path, _torch_load(path), notes)
        fmt = "pytorch"
        for tensors in (state, rewind or {}):
            if len(tensors) > MAX_TENSORS:
                raise TicketFormatError(
                    f"{path}: holds {len(tensors):,} tensors, more than the budget of "
                    f"{MAX_TENSORS:,}; refused"
                )
    state = _strip_module_prefix(state, notes)
    state, mask = merge_prune_state(path, state)
    if mask is not None:
        fmt += " (torch.nn.utils.prune)"
    if rewind is not None:
        rewind = _strip_module_prefix(rewind, [])
        rewind, _ = merge_prune_state(path, rewind)
    return LoadedCheckpoint(path, fmt, state, mask, rewind, {}, notes)


def fit_to_model(loaded: LoadedCheckpoint, model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the part of the loaded state that the model has; note what was ignored."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in loaded.state]
    if missing:
        raise ArchitectureError(
            f"{loaded.path}: does not fit the architecture: {len(missing)} tensors missing "
            f"(e.g. {missing[0]!r})"
        )
    extra = sorted(k for k in loaded.state if k not in expected)
    if extra:
        loaded.notes.append(
            f"ignored tensors that are not part of the model: {', '.join(extra[:6])}"
            + (f" (+{len(extra) - 6} more)" if len(extra) > 6 else "")
        )
    for k, v in expected.items():
        if tuple(loaded.state[k].shape) != tuple(v.shape):
            raise ArchitectureError(
                f"{loaded.path}: {k!r} has shape {tuple(loaded.state[k].shape)}, the architecture "
                f"expects {tuple(v.shape)}"
            )
        got = loaded.state[k].dtype
        if got.is_floating_point != v.dtype.is_floating_point or (
            not v.dtype.is_floating_point and got != v.dtype
        ):
            # Loading would reinterpret the values (integers as weights): not this model's file.
            raise ArchitectureError(
                f"{loaded.path}: {k!r} is {str(got).removeprefix('torch.')}, the architecture "
                f"expects {str(v.dtype).removeprefix('torch.')}"
            )
    return {k: loaded.state[k] for k in expected}


def infer_num_classes(
    arch: str,
    state: Mapping[str, torch.Tensor],
    kwargs: Mapping[str, Any] | None = None,
    *,
    allow_import: bool = False,
) -> int:
    """Read the number of classes off the classifier weight a state dict holds for `arch`."""
    from ticketguard.tickets.models import classifier_name, probe_model

    probe = probe_model(arch, 10, dict(kwargs or {}), allow_import=allow_import)
    name = classifier_name(probe)
    if name is None or name not in state or state[name].dim() != 2:
        raise ArchitectureError(f"cannot find the classifier of {arch!r} in the state dict")
    return int(state[name].shape[0])


def load_model(
    loaded: LoadedCheckpoint,
    arch: str | None = None,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    allow_import: bool = False,
) -> nn.Module:
    """Build the loaded file's architecture (recorded, or given) and load its weights."""
    from ticketguard.tickets.models import build_model, probe_model

    meta_arch = loaded.metadata.get("architecture") or {}
    recorded = meta_arch.get("name")
    arch = arch or recorded
    if arch is None:
        raise ArchitectureError(f"{loaded.path}: the file records no architecture; pass --arch")
    if arch_kwargs is not None:
        kwargs = dict(arch_kwargs)
    else:
        # The recorded keywords belong to the recorded architecture only.
        kwargs = dict(meta_arch.get("kwargs") or {}) if arch == recorded else {}
    n_cls = (
        num_classes
        or loaded.metadata.get("num_classes")
        or infer_num_classes(arch, loaded.state, kwargs, allow_import=allow_import)
    )
    # The architecture is checked against the file's tensors on a probe (no weights allocated),
    # so a model that does not fit, or is past the size budget, is never built for real.
    fitting = fit_to_model(loaded, probe_model(arch, n_cls, kwargs, allow_import=allow_import))
    model = build_model(arch, n_cls, kwargs, allow_import=allow_import)
    load_state(model, fitting)
    return model


def observed_mask(loaded: LoadedCheckpoint, names: list[str] | None = None) -> tuple[Mask, str]:
    """Return the file's mask (explicit if stored, else the zero pattern) and where it came from."""
    if loaded.mask is not None and (names is None or set(names) <= set(loaded.mask)):
        mask = loaded.mask if names is None else Mask({n: loaded.mask[n] for n in names})
        return mask, "explicit"
    if names is None:
        names = [k for k, v in loaded.state.items() if v.is_floating_point() and 2 <= v.dim() <= 5]
    missing = [n for n in names if n not in loaded.state]
    if missing:
        raise ArchitectureError(f"{loaded.path}: has no tensor {missing[0]!r}")
    return Mask.from_weights(loaded.state, names), "zero pattern"
