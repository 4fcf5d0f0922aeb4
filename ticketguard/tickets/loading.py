"""Load what people in this field have on disk, as a ticket or a suspect, without executing code.

Accepted: ticketguard tickets; safetensors files; PyTorch files holding a state dict, a
`torch.nn.utils.prune` state dict (`<layer>.weight_orig` + `<layer>.weight_mask`) or a checkpoint
dict wrapping one under `state_dict`, `model` or `init_weight`. PyTorch files are read with
`torch.load(weights_only=True)`; a file that needs arbitrary code to unpickle is refused.
"""

from __future__ import annotations

import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketguard.errors import ArchitectureError, MaskShapeError, TicketFormatError, UnsafeFileError
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.ticket import (
    Ticket,
    is_ticket_metadata,
    load_state,
    read_safetensors,
    ticket_from_safetensors,
)

WRAPPER_KEYS = ("state_dict", "model", "init_weight")
PRUNE_ORIG, PRUNE_MASK = "_orig", "_mask"


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
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= 100_000_000 and head[8:9] == b"{"


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


def _pickle_streams(path: Path) -> list[bytes]:
    """Return the pickle byte streams of a file: the `data.pkl` of a torch zip, or the file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    return [path.read_bytes()]


def _imported_names(stream: bytes) -> list[str] | None:
    """List the Python objects the pickles in `stream` import; None when it holds no pickle.

    Legacy torch files are several pickles in a row followed by raw storage bytes, so parsing
    goes on pickle after pickle until the bytes stop parsing.
    """
    names: list[str] = []
    strings: list[str] = []
    offset, parsed = 0, False
    while offset < len(stream):
        try:
            for opcode, arg, pos in pickletools.genops(stream[offset:]):
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]) if len(strings) >= 2 else "an object")
                elif isinstance(arg, str):
                    strings.append(arg)
                if opcode.name == "STOP":
                    offset += pos + 1
                    parsed = True
                    break
            else:
                break
        except Exception:  # noqa: BLE001 - the rest is not a pickle
            break
    return names if parsed else None


def _torch_allowed_names() -> set[str]:
    """Names torch's weights-only unpickler accepts, so they are not blamed for a refusal."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except (ImportError, AttributeError):
        return set()


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - every failure is explained below in our own words
        pass
    try:
        streams = _pickle_streams(path)
    except (OSError, zipfile.BadZipFile):
        streams = []
    imported = [_imported_names(s) for s in streams]
    called = sorted({n for names in imported if names for n in names} - _torch_allowed_names())
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
    return {k: loaded.state[k] for k in expected}


def infer_num_classes(
    arch: str,
    state: Mapping[str, torch.Tensor],
    kwargs: Mapping[str, Any] | None = None,
    *,
    allow_import: bool = False,
) -> int:
    """Read the number of classes off the classifier weight a state dict holds for `arch`."""
    from ticketguard.tickets.models import build_model, classifier_name

    probe = build_model(arch, 10, dict(kwargs or {}), allow_import=allow_import)
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
    from ticketguard.tickets.models import build_model

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
    model = build_model(arch, n_cls, kwargs, allow_import=allow_import)
    load_state(model, fit_to_model(loaded, model))
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
