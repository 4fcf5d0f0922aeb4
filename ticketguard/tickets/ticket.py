"""The ticket file format: masks, rewind weights, trained weights and metadata in one safetensors file.

Layout (see docs/ticket-format.md): tensors `mask::NAME` (bool), `trained::NAME` and `rewind::NAME`,
and one safetensors metadata entry `ticketguard` holding canonical JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketguard.documents import parse_json
from ticketguard.errors import ArchitectureError, MaskError, TicketFormatError
from ticketguard.files import atomic_path, canonical_json
from ticketguard.tickets.mask import Mask
from ticketguard.version import __version__

FORMAT = "ticketguard-ticket/1"
METADATA_KEY = "ticketguard"
SECTIONS = ("mask", "trained", "rewind")

# --- Budgets (docs/ticket-format.md, "Budgets") ---------------------------------------------------

#: Largest safetensors header (JSON: tensor index plus metadata) read. An index entry takes about
#: 100 bytes, so a ticket of a 1,000-layer model needs ~0.5 MB; 16 MiB leaves 30x room while a
#: header is parsed in well under a second (the safetensors library itself allows 100 MB).
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20
#: Most tensors a model file may hold: a ticket holds three a masked layer and two every other
#: state entry, 3,436 for the largest torchvision model (EfficientNet-V2-L). Inspecting costs about
#: 1 ms a tensor, so 10,000 stay well within 30 s.
MAX_TENSORS = 10_000
#: Highest tensor rank accepted (conv weights have 5 at most).
MAX_TENSOR_RANK = 8
#: Largest ticket metadata JSON: its biggest part is the per-layer sparsity, ~150 bytes a layer.
MAX_TICKET_METADATA_BYTES = 8 << 20
#: Largest number of classes a ticket may record (ImageNet-21k has 21,841).
MAX_NUM_CLASSES = 100_000
#: Most values one input may have (C*H*W): 3x1024x1024, as for trigger images
#: (signatures/triggers.py: MAX_IMAGE_VALUES).
MAX_INPUT_VALUES = 3 * 1024 * 1024

#: safetensors dtypes and their sizes in bytes.
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass
class Ticket:
    """A sparse subnetwork: its mask, the weights it trains from, the weights it reached, metadata."""

    mask: Mask
    trained: dict[str, torch.Tensor]
    rewind: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check mask shapes against both weight sets and that trained weights obey the mask."""
        for section, weights in (("trained", self.trained), ("rewind", self.rewind)):
            bad = next(
                (k for k in self.mask if k in weights and not weights[k].is_floating_point()), None
            )
            if bad is not None:
                raise TicketFormatError(
                    f"{section} weight {bad!r} is {weights[bad].dtype}, not floating point"
                )
        self.mask.check_zeros(self.trained)
        if self.rewind:
            self.mask.check_shapes(self.rewind)
            missing = sorted(set(self.trained) - set(self.rewind))
            if missing:
                raise TicketFormatError(
                    f"rewind weights lack {missing[0]!r} (and {len(missing) - 1} more)"
                )

    @property
    def fingerprint(self) -> str:
        return self.mask.fingerprint()

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("architecture") or {}
        return arch.get("name")

    @property
    def architecture_kwargs(self) -> dict[str, Any]:
        return dict((self.metadata.get("architecture") or {}).get("kwargs") or {})

    @property
    def num_classes(self) -> int | None:
        return self.metadata.get("num_classes")

    def full_metadata(self) -> dict[str, Any]:
        """Return the metadata with the derived fields (fingerprint, sparsity) filled in fresh."""
        meta = dict(self.metadata)
        meta["format"] = FORMAT
        meta.setdefault("toolkit_version", __version__)
        meta["fingerprint"] = self.fingerprint
        meta["sparsity"] = self.mask.report()
        return meta

    def build_model(self, *, weights: str = "trained", allow_import: bool = False) -> nn.Module:
        """Build the architecture, load the trained (or masked rewind) weights, return it in eval mode."""
        from ticketguard.tickets.models import build_model

        if self.architecture is None or self.num_classes is None:
            raise ArchitectureError("the ticket records no architecture; pass one explicitly")
        model = build_model(
            self.architecture, self.num_classes, self.architecture_kwargs, allow_import=allow_import
        )
        state = self.trained if weights == "trained" else self.masked_rewind()
        load_state(model, state)
        return model.eval()

    def masked_rewind(self) -> dict[str, torch.Tensor]:
        """Return the rewind weights with the mask applied: the ticket's starting point."""
        if not self.rewind:
            raise TicketFormatError("the ticket has no rewind weights")
        state = {k: v.clone() for k, v in self.rewind.items()}
        self.mask.apply_(state)
        return state

    def save(self, path: str | Path) -> None:
        """Write the ticket atomically as a safetensors file."""
        from safetensors.torch import save_file

        self.validate()
        tensors: dict[str, torch.Tensor] = {}
        for name, m in self.mask.items():
            tensors[f"mask::{name}"] = m.detach().cpu().contiguous()
        for section, state in (("trained", self.trained), ("rewind", self.rewind)):
            for name, t in state.items():
                tensors[f"{section}::{name}"] = t.detach().cpu().contiguous().clone()
        with atomic_path(path) as tmp:
            save_file(
                tensors, str(tmp), metadata={METADATA_KEY: canonical_json(self.full_metadata())}
            )


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a state dict strictly, turning mismatches into an ArchitectureError."""
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:2]
        raise ArchitectureError(
            f"weights do not fit the architecture: {' '.join(s.strip() for s in first)}"
        ) from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_safetensors_header(path: str | Path) -> None:
    """Refuse a safetensors file whose header is past the budgets or inconsistent.

    Read before the safetensors library maps anything: the header's size, its tensor count, and
    every tensor's dtype, shape and offsets, which must lie inside the file and match the shape.
    """
    from ticketguard.tickets.loading import MAX_MODEL_FILE_BYTES

    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > MAX_SAFETENSORS_HEADER_BYTES or n > size - 8:
                raw = b""
            else:
                raw = f.read(n)
    except OSError as exc:
        raise TicketFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size > MAX_MODEL_FILE_BYTES:
        raise TicketFormatError(
            f"{path}: {size:,} bytes, more than the {MAX_MODEL_FILE_BYTES:,}-byte budget of a "
            "model file; refused"
        )
    if n > MAX_SAFETENSORS_HEADER_BYTES:
        raise TicketFormatError(
            f"{path}: safetensors header of {n:,} bytes, more than the "
            f"{MAX_SAFETENSORS_HEADER_BYTES:,}-byte budget; refused"
        )
    if not raw:
        raise TicketFormatError(f"{path}: cannot be read as safetensors (truncated header)")
    header = parse_json(
        raw, what=f"{path}: safetensors header", error=TicketFormatError, max_depth=4
    )
    if not isinstance(header, dict):
        raise TicketFormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TicketFormatError(f"{path}: safetensors metadata is not a map of strings")
    count = len(header) - ("__metadata__" in header)
    if count > MAX_TENSORS:
        raise TicketFormatError(
            f"{path}: declares {count:,} tensors, more than the budget of {MAX_TENSORS:,}; refused"
        )
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: safetensors tensor {name[:80]!r}"
        if not isinstance(entry, dict):
            raise TicketFormatError(f"{where} is not described by an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise TicketFormatError(f"{where} has an unsupported dtype {str(dtype)[:20]!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_TENSOR_RANK
            or not all(_is_count(d) for d in shape)
        ):
            raise TicketFormatError(f"{where} has a malformed shape")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_size
        ):
            raise TicketFormatError(f"{where} has data offsets outside the file")
        numel = 1
        for d in shape:
            numel *= d
        if numel * SAFETENSORS_DTYPES[dtype] != offsets[1] - offsets[0]:
            raise TicketFormatError(f"{where}: its shape does not match its data offsets")


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file, or raise TicketFormatError.

    The header is checked against the budgets first (`check_safetensors_header`).
    """
    from safetensors import SafetensorError, safe_open

    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise TicketFormatError(f"{path}: cannot be read as safetensors ({exc})") from None
    return tensors, metadata


def is_ticket_metadata(metadata: Mapping[str, str]) -> bool:
    """Whether safetensors metadata marks the file as a ticketguard ticket."""
    return METADATA_KEY in metadata


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_metadata(path: str | Path, meta: Any) -> None:
    """Raise TicketFormatError unless the metadata has the types the format promises."""

    def bad(field: str) -> TicketFormatError:
        return TicketFormatError(f"{path}: ticket metadata field {field!r} is malformed")

    if not isinstance(meta, dict):
        raise TicketFormatError(f"{path}: ticket metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise TicketFormatError(f"{path}: unsupported ticket format {meta.get('format')!r}")
    arch = meta.get("architecture")
    if arch is not None and not (
        isinstance(arch, dict)
        and isinstance(arch.get("name"), str)
        and isinstance(arch.get("kwargs", {}), dict)
    ):
        raise bad("architecture")
    classes = meta.get("num_classes")
    if classes is not None and not (
        isinstance(classes, int) and not isinstance(classes, bool) and 0 < classes
    ):
        raise bad("num_classes")
    if classes is not None and classes > MAX_NUM_CLASSES:
        raise TicketFormatError(
            f"{path}: ticket metadata records {classes:,} classes, more than the budget of "
            f"{MAX_NUM_CLASSES:,}; refused"
        )
    shape = meta.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise bad("input_shape")
    if shape is not None and shape[0] * shape[1] * shape[2] > MAX_INPUT_VALUES:
        raise TicketFormatError(
            f"{path}: ticket metadata records an input of shape {shape}, more than "
            f"{MAX_INPUT_VALUES:,} values (the budget); refused"
        )
    dataset = meta.get("dataset")
    if dataset is not None and not (
        isinstance(dataset, dict)
        and isinstance(dataset.get("name"), str)
        and isinstance(dataset.get("split_seed", 0), int)
    ):
        raise bad("dataset")
    accuracy = meta.get("accuracy")
    if accuracy is not None and not (
        isinstance(accuracy, dict)
        and all(v is None or (_is_number(v) and 0 <= v <= 1) for v in accuracy.values())
    ):
        raise bad("accuracy")
    sparsity = meta.get("sparsity")
    if sparsity is not None and not (
        isinstance(sparsity, dict)
        and isinstance(sparsity.get("layers", []), list)
        and all(isinstance(x, dict) for x in sparsity.get("layers", []))
    ):
        raise bad("sparsity")


def _sparsity_counts(report: Mapping[str, Any]) -> tuple[Any, ...]:
    """The counts of a sparsity report (global and per layer), which a mask determines."""
    layers = tuple(
        (x.get("name"), tuple(x.get("shape") or ()), x.get("total"), x.get("surviving"))
        for x in report.get("layers", [])
    )
    return report.get("total"), report.get("surviving"), layers


def ticket_from_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Ticket:
    """Assemble and validate a Ticket from the contents of a ticket file."""
    text = metadata.get(METADATA_KEY)
    if not isinstance(text, str):
        raise TicketFormatError(f"{path}: ticket metadata is missing")
    if len(text) > MAX_TICKET_METADATA_BYTES:
        raise TicketFormatError(
            f"{path}: ticket metadata of {len(text):,} characters, more than the "
            f"{MAX_TICKET_METADATA_BYTES:,} budget; refused"
        )
    meta = parse_json(text, what=f"{path}: ticket metadata", error=TicketFormatError)
    _check_metadata(path, meta)
    parts: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SECTIONS}
    for key, tensor in tensors.items():
        section, sep, name = key.partition("::")
        if not sep or section not in parts:
            raise TicketFormatError(f"{path}: unexpected tensor {key!r} in a ticket file")
        parts[section][name] = tensor
    try:
        ticket = Ticket(Mask(parts["mask"]), parts["trained"], parts["rewind"], meta)
    except (MaskError, TicketFormatError) as exc:
        raise type(exc)(f"{path}: {exc}") from None
    if meta.get("fingerprint") != ticket.fingerprint:
        raise TicketFormatError(
            f"{path}: the mask's fingerprint does not match the one recorded (file altered?)"
        )
    recorded = meta.get("sparsity")
    if recorded is not None and _sparsity_counts(recorded) != _sparsity_counts(
        ticket.mask.report()
    ):
        raise TicketFormatError(
            f"{path}: the sparsity recorded in the metadata does not match the mask (file altered?)"
        )
    return ticket


def load_ticket(path: str | Path) -> Ticket:
    """Read and validate a ticket file written by Ticket.save."""
    path = Path(path)
    if not path.is_file():
        raise TicketFormatError(f"{path}: no such file")
    tensors, metadata = read_safetensors(path)
    if not is_ticket_metadata(metadata):
        raise TicketFormatError(f"{path}: a safetensors file, but not a ticketguard ticket")
    return ticket_from_safetensors(path, tensors, metadata)
