"""The pruning mask: a validated mapping from parameter name to a bool tensor."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ticketguard.errors import MaskError, MaskShapeError, MaskViolationError, TicketFormatError
from ticketguard.files import atomic_path


@dataclass(frozen=True)
class LayerStats:
    """Size and survival counts of one masked tensor."""

    name: str
    shape: tuple[int, ...]
    total: int
    surviving: int

    @property
    def density(self) -> float:
        return self.surviving / self.total if self.total else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "total": self.total,
            "surviving": self.surviving,
            "density": self.density,
            "sparsity": self.sparsity,
        }


def _as_bool(name: str, value: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise MaskError(f"mask for {name!r} is a {type(value).__name__}, not a tensor")
    if value.dtype == torch.bool:
        return value
    if value.is_floating_point() or value.dtype in (
        torch.uint8,
        torch.int8,
        torch.int32,
        torch.int64,
    ):
        if not bool(((value == 0) | (value == 1)).all()):
            raise MaskError(f"mask for {name!r} has values other than 0 and 1")
        return value != 0
    raise MaskError(f"mask for {name!r} has unsupported dtype {value.dtype}")


class Mask(Mapping[str, torch.Tensor]):
    """Which entries of each prunable weight tensor survive (True) or are pruned (False)."""

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        checked: dict[str, torch.Tensor] = {}
        for name, value in masks.items():
            if not isinstance(name, str) or not name:
                raise MaskError(f"mask names must be non-empty strings, got {name!r}")
            checked[name] = _as_bool(name, value)
        self._masks = checked

    # Mapping protocol -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return self.keys() == other.keys() and all(
            self[n].shape == other[n].shape and torch.equal(self[n].cpu(), other[n].cpu())
            for n in self
        )

    def __repr__(self) -> str:
        return f"Mask({len(self)} tensors, density={self.density:.4f})"

    # Construction -----------------------------------------------------------------------------
    @classmethod
    def ones_like(cls, weights: Mapping[str, torch.Tensor], names: Iterable[str]) -> Mask:
        """Build a dense mask (nothing pruned) for the named weights."""
        return cls({n: torch.ones_like(weights[n], dtype=torch.bool) for n in names})

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], names: Iterable[str]) -> Mask:
        """Build the mask implied by the zero pattern of the named weights."""
        return cls({n: weights[n] != 0 for n in names})

    # Statistics -------------------------------------------------------------------------------
    def layer_stats(self) -> list[LayerStats]:
        """Return per-tensor counts, in the mask's order."""
        return [
            LayerStats(n, tuple(m.shape), m.numel(), int(m.sum().item()))
            for n, m in self._masks.items()
        ]

    @property
    def num_weights(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    @property
    def num_surviving(self) -> int:
        return sum(int(m.sum().item()) for m in self._masks.values())

    @property
    def density(self) -> float:
        total = self.num_weights
        return self.num_surviving / total if total else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def report(self) -> dict[str, object]:
        """Return global and per-layer sparsity as plain data (for JSON)."""
        return {
            "total": self.num_weights,
            "surviving": self.num_surviving,
            "density": self.density,
            "sparsity": self.sparsity,
            "layers": [s.as_dict() for s in self.layer_stats()],
        }

    # Relations and checks ---------------------------------------------------------------------
    def is_subset_of(self, other: Mask) -> bool:
        """Whether every surviving entry here also survives in `other` (masks only shrink)."""
        if self.keys() != other.keys():
            return False
        return all(not bool((self[n].cpu() & ~other[n].cpu()).any()) for n in self)

    def check_shapes(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Raise MaskShapeError unless every masked tensor exists in `weights` with the same shape."""
        for name, m in self._masks.items():
            if name not in weights:
                raise MaskShapeError(f"mask names {name!r}, which is not among the weights")
            if tuple(weights[name].shape) != tuple(m.shape):
                raise MaskShapeError(
                    f"mask for {name!r} has shape {tuple(m.shape)} but the weight has "
                    f"shape {tuple(weights[name].shape)}"
                )

    def check_zeros(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Raise MaskViolationError if any weight is non-zero where the mask is off."""
        self.check_shapes(weights)
        for name, m in self._masks.items():
            w = weights[name]
            bad = int((w.detach().to(m.device)[~m] != 0).sum().item())
            if bad:
                raise MaskViolationError(
                    f"{name!r} has {bad} non-zero weights where the mask is off"
                )

    # Use --------------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Mask:
        """Return a copy of the mask on `device`."""
        return Mask({n: m.to(device) for n, m in self._masks.items()})

    @torch.no_grad()
    def apply_(self, params: Mapping[str, torch.Tensor]) -> None:
        """Zero, in place, every entry of `params` that the mask prunes."""
        for name, m in self._masks.items():
            params[name].mul_(m)

    def fingerprint(self) -> str:
        """Return the SHA-256 of the canonical mask bytes (see docs/ticket-format.md)."""
        digest = hashlib.sha256()
        for name in sorted(self._masks):
            m = self._masks[name]
            digest.update(name.encode("utf-8") + b"\0")
            digest.update(",".join(str(d) for d in m.shape).encode("ascii") + b"\0")
            bits = np.packbits(m.detach().cpu().contiguous().view(-1).numpy().astype(np.uint8))
            digest.update(bits.tobytes())
        return digest.hexdigest()

    def save(self, path: str | Path) -> None:
        """Write the mask to a safetensors file atomically."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({n: m.detach().cpu().contiguous() for n, m in self._masks.items()}, str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        """Read a mask written by `save`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return cls(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise TicketFormatError(f"cannot read mask {path}: {exc}") from None
