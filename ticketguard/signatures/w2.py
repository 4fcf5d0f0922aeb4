"""Scheme W2: a keyed signature written into the channel connectivity of a ticket's mask.

The 512-bit Ed25519 payload is Reed–Solomon encoded and whitened with a keyed stream
(signatures/payload.py). A keyed generator chooses distinct entries of the eligible layers'
channel-connectivity matrices; bit 1 means the connection must exist, bit 0 that it must not. Each
layer's count of surviving weights is then restored exactly outside the embedded positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ticketguard.errors import EmbeddingError
from ticketguard.signatures.payload import EccParams, KeyedStream
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.tickets.mask import Mask

SCHEME = "W2"
PAYLOAD_BYTES = 64
#: At most this fraction of a connectivity matrix carries bits, so the count can be restored.
MAX_LAYER_FRACTION = 0.25
_MAX_NAME = 300
_WHITENING = "ChaCha20 keystream, key HKDF-SHA256(seed)"
_POSITIONS = "keyed Fisher-Yates over the ChaCha20 keystream, key HKDF-SHA256(seed)"
#: Bound on a credential's connectivity shapes (VGG's 25088x4096 classifier has about 2^27).
MAX_CONNECTIVITY_ENTRIES = 2**28


@dataclass(frozen=True)
class EmbeddingLayer:
    """One layer that carries bits: its connectivity shape, bit count and surviving weights."""

    name: str
    shape: tuple[int, int]
    bits: int
    surviving: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "bits": self.bits,
            "surviving": self.surviving,
        }


@dataclass(frozen=True)
class W2Params:
    """Everything besides the seed that fixes where and how the bits are written."""

    layers: tuple[EmbeddingLayer, ...]
    ecc: EccParams

    @property
    def num_bits(self) -> int:
        return sum(layer.bits for layer in self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": SCHEME,
            "payload_bits": 8 * PAYLOAD_BYTES,
            "bits": self.num_bits,
            "ecc": self.ecc.to_dict(),
            "whitening": _WHITENING,
            "positions": _POSITIONS,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Any) -> W2Params:
        """Read embedding parameters from an (untrusted) credential, validating every field."""

        def bad(what: str) -> EmbeddingError:
            return EmbeddingError(f"the credential's embedding parameters are malformed ({what})")

        if not isinstance(data, dict) or data.get("scheme") != SCHEME:
            raise bad(f"scheme is not {SCHEME}")
        for field_name, expected in (("positions", _POSITIONS), ("whitening", _WHITENING)):
            if data.get(field_name) != expected:
                raise bad(
                    f"{field_name} {data.get(field_name)!r} is not the method this version "
                    f"reads ({expected!r})"
                )
        ecc = EccParams.from_dict(data.get("ecc"))
        raw_layers = data.get("layers")
        if not isinstance(raw_layers, list) or not raw_layers:
            raise bad("no layers")
        layers = []
        for item in raw_layers:
            if not isinstance(item, dict):
                raise bad("a layer is not an object")
            name, shape = item.get("name"), item.get("shape")
            bits, surviving = item.get("bits"), item.get("surviving")
            if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
                raise bad("layer name")
            if not (
                isinstance(shape, list)
                and len(shape) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
            ):
                raise bad(f"shape of {name}")
            if not (isinstance(bits, int) and not isinstance(bits, bool)):
                raise bad(f"bits of {name}")
            if shape[0] * shape[1] > MAX_CONNECTIVITY_ENTRIES:
                raise bad(f"shape of {name} is larger than any layer ticketguard reads")
            if not 0 < bits <= shape[0] * shape[1]:
                raise bad(f"bits of {name}")
            if not (
                isinstance(surviving, int) and not isinstance(surviving, bool) and surviving >= 0
            ):
                raise bad(f"surviving count of {name}")
            layers.append(EmbeddingLayer(name, (shape[0], shape[1]), bits, surviving))
        if len({layer.name for layer in layers}) != len(layers):
            raise bad("a layer is named twice")
        params = cls(tuple(layers), ecc)
        expected = 8 * (PAYLOAD_BYTES + ecc.nsym)
        if params.num_bits != expected or data.get("bits") != expected:
            raise bad(f"{params.num_bits} bits for a {expected}-bit codeword")
        return params


def eligible_layers(mask: Mask, excluded: Sequence[str], chosen: Sequence[str] | None) -> list[str]:
    """Return the layers that may carry bits: masked conv/linear weights, never first or last."""
    names = [n for n in mask if mask[n].dim() >= 2 and n not in excluded]
    if chosen is not None:
        missing = [n for n in chosen if n not in mask]
        if missing:
            raise EmbeddingError(f"layer {missing[0]!r} is not part of the ticket's mask")
        refused = [n for n in chosen if n in excluded]
        if refused:
            raise EmbeddingError(
                f"layer {refused[0]!r} is the first conv or the classifier, which never carry bits"
            )
        names = [n for n in names if n in chosen]
    if not names:
        raise EmbeddingError("the ticket has no layer that can carry a signature")
    return names


def plan_embedding(mask: Mask, layers: Sequence[str], ecc: EccParams) -> W2Params:
    """Spread the codeword's bits over `layers` in proportion to what each layer can hold."""
    n_bits = 8 * (PAYLOAD_BYTES + ecc.nsym)
    shapes, capacity, surviving = [], [], []
    for name in layers:
        m = mask[name]
        conn = channel_connectivity(m)
        count = int(m.sum())
        kernel = m.numel() // conn.numel()
        shapes.append((int(conn.shape[0]), int(conn.shape[1])))
        # Worst cases of the count restoration: every bit 1 adds a weight that a survivor outside
        # the positions must make up for; every bit 0 prunes a whole kernel that pruned entries
        # outside the positions (which hold at most bits * kernel entries) must make up for.
        capacity.append(
            min(
                int(conn.numel() * MAX_LAYER_FRACTION),
                count // (kernel + 1),
                (m.numel() - count) // (2 * kernel),
            )
        )
        surviving.append(count)
    total = sum(capacity)
    if total < n_bits:
        raise EmbeddingError(
            f"the chosen layers can hold {total} bits, the signature needs {n_bits} "
            "(choose more or larger layers, or fewer --ecc-symbols)"
        )
    share = np.array(capacity, dtype=np.float64) * n_bits / total
    bits = np.floor(share).astype(int)
    for i in np.argsort(-(share - bits), kind="stable")[: n_bits - int(bits.sum())]:
        bits[i] += 1
    layers_out = tuple(
        EmbeddingLayer(name, shape, int(b), s)
        for name, shape, b, s in zip(layers, shapes, bits, surviving, strict=True)
        if b > 0
    )
    return W2Params(layers_out, ecc)


def keyed_positions(seed: bytes, params: W2Params) -> list[np.ndarray]:
    """Return, per layer, the flat connectivity indices that carry its bits (keyed, distinct)."""
    stream = KeyedStream(seed, "W2 positions")
    return [stream.sample(layer.shape[0] * layer.shape[1], layer.bits) for layer in params.layers]


def position_matrices(params: W2Params, positions: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """Return, per layer, a bool connectivity-shaped matrix marking the embedded positions."""
    result = {}
    for layer, pos in zip(params.layers, positions, strict=True):
        flat = torch.zeros(layer.shape[0] * layer.shape[1], dtype=torch.bool)
        flat[torch.as_tensor(pos)] = True
        result[layer.name] = flat.view(layer.shape)
    return result


def _split(bits: np.ndarray, params: W2Params) -> list[np.ndarray]:
    bounds = np.cumsum([0, *(layer.bits for layer in params.layers)])
    return [bits[bounds[i] : bounds[i + 1]] for i in range(len(params.layers))]


def write_bits(
    mask: Mask,
    trained: Mapping[str, torch.Tensor],
    rewind: Mapping[str, torch.Tensor],
    params: W2Params,
    positions: Sequence[np.ndarray],
    bits: np.ndarray,
) -> Mask:
    """Return a new mask carrying `bits` at `positions`, each layer's weight count unchanged.

    Bit 1 switches on the kernel entry with the largest rewind magnitude (when the connection
    is absent); bit 0 prunes the whole kernel. The count is then restored outside the positions
    by pruning the smallest trained survivors or reviving the largest rewind entries.
    """
    if len(bits) != params.num_bits:
        raise EmbeddingError(f"{len(bits)} bits given for {params.num_bits} positions")
    new = dict(mask)
    for layer, pos, layer_bits in zip(params.layers, positions, _split(bits, params), strict=True):
        m = mask[layer.name]
        out, inp = layer.shape
        if m.shape[0] != out or m.shape[1] != inp:
            raise EmbeddingError(
                f"{layer.name}: mask shape {tuple(m.shape)} does not fit {layer.shape}"
            )
        kernels = m.reshape(out * inp, -1).clone()
        size = kernels.shape[1]
        magnitude_rewind = (
            rewind.get(layer.name, trained[layer.name]).abs().reshape(out * inp, size)
        )
        magnitude_trained = trained[layer.name].abs().reshape(out * inp, size)
        pos_t = torch.as_tensor(pos, dtype=torch.long)
        ones = torch.as_tensor(layer_bits == 1)
        rows = kernels[pos_t]
        need_on = ones & ~rows.any(dim=1)
        best = magnitude_rewind[pos_t].argmax(dim=1)
        rows[need_on, best[need_on]] = True
        rows[~ones] = False
        kernels[pos_t] = rows

        inside = torch.zeros(out * inp, dtype=torch.bool)
        inside[pos_t] = True
        delta = int(kernels.sum()) - int(m.sum())
        flat = kernels.view(-1)
        outside = (~inside).repeat_interleave(size)
        if delta > 0:
            candidates = torch.nonzero(flat & outside).squeeze(1)
            scores = magnitude_trained.reshape(-1)[candidates]
            order = torch.sort(scores, stable=True).indices
            if len(candidates) < delta:
                raise EmbeddingError(
                    f"{layer.name}: too few weights outside the positions to prune"
                )
            flat[candidates[order[:delta]]] = False
        elif delta < 0:
            candidates = torch.nonzero(~flat & outside).squeeze(1)
            scores = magnitude_rewind.reshape(-1)[candidates]
            order = torch.sort(scores, descending=True, stable=True).indices
            if len(candidates) < -delta:
                raise EmbeddingError(f"{layer.name}: too few pruned weights outside the positions")
            flat[candidates[order[:-delta]]] = True
        new[layer.name] = kernels.view(m.shape)
    return Mask(new)


def read_bits(
    mask: Mapping[str, torch.Tensor], params: W2Params, positions: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Read the bits at the positions; return (bits, readable) — a missing layer is unreadable."""
    bits, readable = [], []
    for layer, pos in zip(params.layers, positions, strict=True):
        m = mask.get(layer.name)
        if m is None or m.dim() < 2 or (int(m.shape[0]), int(m.shape[1])) != layer.shape:
            bits.append(np.zeros(layer.bits, dtype=np.uint8))
            readable.append(np.zeros(layer.bits, dtype=bool))
            continue
        conn = channel_connectivity(m.bool().cpu()).reshape(-1)
        bits.append(conn[torch.as_tensor(pos)].numpy().astype(np.uint8))
        readable.append(np.ones(layer.bits, dtype=bool))
    return np.concatenate(bits), np.concatenate(readable)
