"""The ticket file format: masks, rewind weights, trained weights and metadata in one safetensors file.

Layout (see docs/ticket-format.md): tensors `mask::NAME` (bool), `trained::NAME` and `rewind::NAME`,
and one safetensors metadata entry `ticketguard` holding canonical JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketguard.errors import ArchitectureError, MaskError, TicketFormatError
from ticketguard.files import atomic_path, canonical_json
from ticketguard.tickets.mask import Mask

FORMAT = "ticketguard-ticket/1"
METADATA_KEY = "ticketguard"
SECTIONS = ("mask", "trained", "rewind")


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
        from ticketguard import __version__

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


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file, or raise TicketFormatError."""
    from safetensors import SafetensorError, safe_open

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
        isinstance(classes, int) and not isinstance(classes, bool) and classes > 0
    ):
        raise bad("num_classes")
    shape = meta.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise bad("input_shape")
    dataset = meta.get("dataset")
    if dataset is not None and not (
        isinstance(dataset, dict)
        and isinstance(dataset.get("name"), str)
        and isinstance(dataset.get("split_seed", 0), int)
    ):
        raise bad("dataset")
    accuracy = meta.get("accuracy")
    if accuracy is not None and not (
        isinstance(accuracy, dict) and all(v is None or _is_number(v) for v in accuracy.values())
    ):
        raise bad("accuracy")


def ticket_from_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Ticket:
    """Assemble and validate a Ticket from the contents of a ticket file."""
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise TicketFormatError(f"{path}: ticket metadata is not valid JSON ({exc})") from None
    _check_metadata(path, meta)
    parts: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SECTIONS}
    for key, tensor in tensors.items():
        section, sep, name = key.partition("::")
        if not sep or section not in parts:
            raise TicketFormatError(f"{path}: unexpected tensor {key!r} in a ticket file")
        parts[section][name] = tensor
    try:
        ticket = Ticket(Mask(parts["mask"]), parts["trained"], parts["rewind"], meta)
    except MaskError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    if meta.get("fingerprint") != ticket.fingerprint:
        raise TicketFormatError(
            f"{path}: the mask's fingerprint does not match the one recorded (file altered?)"
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
