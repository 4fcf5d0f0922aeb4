"""Scheme W2: a keyed signature written into the channel connectivity of a ticket's mask.

The 512-bit Ed25519 payload is Reed–Solomon encoded and whitened with a keyed stream
(signatures/payload.py). Each whitened codeword bit is written into a *group* of `repetition`
distinct, keyed entries of one layer's channel-connectivity matrix: for a 1 the even replicas
are connected and the odd ones are not, for a 0 the other way round. Half of every group is
connected whatever the bit, and the connected half is kept strong (`carrier` weights whose
magnitude signing holds at or above a quantile of the layer's surviving magnitudes).

The design follows the channel an attacker has. Pruning only removes connections, so a
connection read as present was written present: any surviving replica decides its bit. A group
whose connected replicas were all removed is an *erasure*, which Reed–Solomon corrects twice as
cheaply as an error. Regrowth and dense fine-tuning add connections with small magnitudes, so a
group is read by comparing magnitudes (the stronger side wins), never by presence alone.

Each layer's count of surviving weights is restored exactly outside the written positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ticketguard.errors import EmbeddingError
from ticketguard.signatures.payload import CONSTANT_BITS, EccParams, KeyedStream
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.tickets.mask import Mask

SCHEME = "W2"
PAYLOAD_BYTES = 64
#: At most this fraction of a connectivity matrix is written, so the count can be restored.
MAX_LAYER_FRACTION = 0.25
#: Automatic repetition keeps the carriers (connected replicas) to this share of a layer's weights.
CARRIER_SHARE = 0.25
MIN_REPETITION, MAX_REPETITION = 2, 16
#: A group whose stronger side is weaker than this fraction of its layer's typical surviving
#: magnitude is an erasure (a regrown or noise-level connection is no evidence of a bit).
ERASE_BELOW = 0.1
_MAX_NAME = 300
_WHITENING = "ChaCha20 keystream, key HKDF-SHA256(seed), one bit per codeword bit"
_POSITIONS = (
    "per layer, bits x repetition distinct entries by keyed Fisher-Yates over the ChaCha20 "
    "keystream, key HKDF-SHA256(seed); consecutive runs of `repetition` form a bit's group"
)
_READING = (
    "even replicas connected for a whitened 1, odd replicas for a 0; read by the stronger side "
    f"(kernel max |w|), erased below {ERASE_BELOW} of the layer's median top-`surviving` magnitude"
)
#: The position method of ticketguard 0.1, which wrote one position per bit.
_LAYOUT_1_POSITIONS = "keyed Fisher-Yates over the ChaCha20 keystream, key HKDF-SHA256(seed)"
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
    repetition: int = MIN_REPETITION

    @property
    def num_bits(self) -> int:
        return sum(layer.bits for layer in self.layers)

    @property
    def num_positions(self) -> int:
        return self.num_bits * self.repetition

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": SCHEME,
            "payload_bits": 8 * PAYLOAD_BYTES,
            "bits": self.num_bits,
            "repetition": self.repetition,
            "ecc": self.ecc.to_dict(),
            "whitening": _WHITENING,
            "positions": _POSITIONS,
            "reading": _READING,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Any) -> W2Params:
        """Read embedding parameters from an (untrusted) credential, validating every field."""

        def bad(what: str) -> EmbeddingError:
            return EmbeddingError(f"the credential's embedding parameters are malformed ({what})")

        if not isinstance(data, dict) or data.get("scheme") != SCHEME:
            raise bad(f"scheme is not {SCHEME}")
        if data.get("positions") == _LAYOUT_1_POSITIONS and "repetition" not in data:
            raise EmbeddingError(
                "the credential was issued by ticketguard 0.1, whose W2 layout (one mask "
                "position per bit) this version no longer reads; sign the ticket again"
            )
        for field_name, expected in (
            ("positions", _POSITIONS),
            ("whitening", _WHITENING),
            ("reading", _READING),
        ):
            if data.get(field_name) != expected:
                raise bad(
                    f"{field_name} {data.get(field_name)!r} is not the method this version "
                    f"reads ({expected!r})"
                )
        repetition = data.get("repetition")
        if not _is_int(repetition) or not MIN_REPETITION <= repetition <= MAX_REPETITION:
            raise bad(f"repetition is not an integer in {MIN_REPETITION}..{MAX_REPETITION}")
        if repetition % 2:
            raise bad("repetition is odd (half of each group is connected)")
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
                and all(_is_int(d) and d > 0 for d in shape)
            ):
                raise bad(f"shape of {name}")
            if not _is_int(bits):
                raise bad(f"bits of {name}")
            if shape[0] * shape[1] > MAX_CONNECTIVITY_ENTRIES:
                raise bad(f"shape of {name} is larger than any layer ticketguard reads")
            if not 0 < bits * repetition <= shape[0] * shape[1]:
                raise bad(f"bits of {name}")
            if not (_is_int(surviving) and surviving >= 0):
                raise bad(f"surviving count of {name}")
            layers.append(EmbeddingLayer(name, (shape[0], shape[1]), bits, surviving))
        if len({layer.name for layer in layers}) != len(layers):
            raise bad("a layer is named twice")
        params = cls(tuple(layers), ecc, repetition)
        expected = 8 * (PAYLOAD_BYTES + ecc.nsym)
        if params.num_bits != expected or data.get("bits") != expected:
            raise bad(f"{params.num_bits} bits for a {expected}-bit codeword")
        return params


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def layer_capacity(mask: torch.Tensor) -> int:
    """Return how many connectivity entries of a layer can be written, half of them connected.

    The worst cases of the count restoration, over every choice of entries: the connected half
    keeps or switches on weights that survivors outside the entries must make up for (at most
    the P/2 largest kernel counts, a kernel counting at least 1), and every entry's kernel may
    need its pruned weights revived elsewhere (at most P whole kernels). Never more than
    MAX_LAYER_FRACTION of the matrix.
    """
    out, inp = int(mask.shape[0]), int(mask.shape[1])
    entries = out * inp
    kernel = mask.numel() // entries
    count = int(mask.sum())
    per_kernel = mask.reshape(entries, -1).sum(dim=1).clamp(min=1)
    largest = torch.sort(per_kernel, descending=True).values.cumsum(0)
    # The most connected entries whose kernels the survivors can always make up for.
    half = int((largest <= count).sum())
    limit = min(int(entries * MAX_LAYER_FRACTION), 2 * half, (mask.numel() - count) // kernel)
    return max(0, limit - limit % 2)


def plan_embedding(
    mask: Mask, layers: Sequence[str], ecc: EccParams, repetition: int | None = None
) -> W2Params:
    """Spread the codeword's groups over `layers` in proportion to what each layer can hold.

    Without `repetition`, it is the largest even number (at most MAX_REPETITION) that keeps the
    carriers within CARRIER_SHARE of the layers' surviving weights, and at least 2 — larger
    tickets get more replicas per bit.
    """
    n_bits = 8 * (PAYLOAD_BYTES + ecc.nsym)
    shapes, capacity, surviving = [], [], []
    for name in layers:
        m = mask[name]
        conn = channel_connectivity(m)
        shapes.append((int(conn.shape[0]), int(conn.shape[1])))
        capacity.append(layer_capacity(m))
        surviving.append(int(m.sum()))
    if repetition is None:
        budget = min(sum(capacity), 2 * int(CARRIER_SHARE * sum(surviving)))
        repetition = max(MIN_REPETITION, min(MAX_REPETITION, budget // n_bits // 2 * 2))
    elif (
        not _is_int(repetition)
        or not MIN_REPETITION <= repetition <= MAX_REPETITION
        or repetition % 2
    ):
        raise EmbeddingError(
            f"the repetition must be an even number in {MIN_REPETITION}..{MAX_REPETITION}, "
            f"got {repetition!r}"
        )
    groups = [cap // repetition for cap in capacity]
    total = sum(groups)
    if total < n_bits:
        raise EmbeddingError(
            f"the chosen layers can hold {total} bits at {repetition} mask positions per bit, "
            f"the signature needs {n_bits} (choose more or larger layers, or fewer --ecc-symbols)"
        )
    share = np.array(groups, dtype=np.float64) * n_bits / total
    bits = np.floor(share).astype(int)
    for i in np.argsort(-(share - bits), kind="stable")[: n_bits - int(bits.sum())]:
        bits[i] += 1
    layers_out = tuple(
        EmbeddingLayer(name, shape, int(b), s)
        for name, shape, b, s in zip(layers, shapes, bits, surviving, strict=True)
        if b > 0
    )
    return W2Params(layers_out, ecc, repetition)


def keyed_positions(seed: bytes, params: W2Params) -> list[np.ndarray]:
    """Return, per layer, the flat connectivity indices of its groups (keyed, distinct).

    Layer by layer, `bits * repetition` entries are drawn; entries `g*r .. g*r + r - 1` are the
    replicas of the layer's g-th bit.
    """
    stream = KeyedStream(seed, "W2 positions")
    return [
        stream.sample(layer.shape[0] * layer.shape[1], layer.bits * params.repetition)
        for layer in params.layers
    ]


def position_matrices(
    layers: Sequence[EmbeddingLayer], positions: Sequence[np.ndarray]
) -> dict[str, torch.Tensor]:
    """Return, per layer, a bool connectivity-shaped matrix marking the written positions."""
    result = {}
    for layer, pos in zip(layers, positions, strict=True):
        flat = torch.zeros(layer.shape[0] * layer.shape[1], dtype=torch.bool)
        flat[torch.as_tensor(pos)] = True
        result[layer.name] = flat.view(layer.shape)
    return result


def split_bits(bits: np.ndarray, params: W2Params) -> list[np.ndarray]:
    """Split codeword-long data into the layers' shares, in the credential's layer order."""
    bounds = np.cumsum([0, *(layer.bits for layer in params.layers)])
    return [bits[bounds[i] : bounds[i + 1]] for i in range(len(params.layers))]


def replica_states(bits: np.ndarray, repetition: int) -> np.ndarray:
    """Return the connection state of every replica: even ones carry the bit, odd its complement."""
    parity = np.tile(np.arange(repetition, dtype=np.uint8) % 2, len(bits))
    return (np.repeat(np.asarray(bits, dtype=np.uint8), repetition) ^ parity).astype(bool)


@dataclass(frozen=True)
class Written:
    """A mask with connectivity entries written, and the carriers: per layer, the flat weight
    index of the entry that holds each connected written entry (to be kept strong)."""

    mask: Mask
    carriers: dict[str, torch.Tensor]


def write_connectivity(
    mask: Mask,
    trained: Mapping[str, torch.Tensor],
    rewind: Mapping[str, torch.Tensor],
    targets: Sequence[tuple[str, tuple[int, int], np.ndarray, np.ndarray]],
) -> Written:
    """Return a new mask with each target entry connected or not, each layer's count unchanged.

    `targets` holds, per layer, its name, connectivity shape, flat entries and their wanted
    states. A connected entry keeps its kernel when it has survivors (its carrier is the
    largest trained survivor) and otherwise switches on its largest rewind entry (the carrier);
    an unconnected entry prunes its whole kernel. The count is then restored outside the
    entries by pruning the smallest trained survivors or reviving the largest rewind entries.
    """
    new = dict(mask)
    carriers: dict[str, torch.Tensor] = {}
    for name, shape, pos, states in targets:
        m = mask[name]
        out, inp = shape
        if m.shape[0] != out or m.shape[1] != inp:
            raise EmbeddingError(f"{name}: mask shape {tuple(m.shape)} does not fit {shape}")
        if len(pos) != len(states):
            raise EmbeddingError(f"{name}: {len(states)} states given for {len(pos)} positions")
        kernels = m.reshape(out * inp, -1).clone()
        size = kernels.shape[1]
        magnitude_rewind = rewind.get(name, trained[name]).abs().reshape(out * inp, size)
        magnitude_trained = trained[name].abs().reshape(out * inp, size)
        pos_t = torch.as_tensor(pos, dtype=torch.long)
        on = torch.as_tensor(np.asarray(states, dtype=bool))
        rows = kernels[pos_t]
        present = rows.any(dim=1)
        best_rewind = magnitude_rewind[pos_t].argmax(dim=1)
        best_trained = torch.where(rows, magnitude_trained[pos_t], -1.0).argmax(dim=1)
        carrier = torch.where(present, best_trained, best_rewind)
        need_on = on & ~present
        rows[need_on, best_rewind[need_on]] = True
        rows[~on] = False
        kernels[pos_t] = rows
        carriers[name] = (pos_t[on] * size + carrier[on]).sort().values

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
                raise EmbeddingError(f"{name}: too few weights outside the positions to prune")
            flat[candidates[order[:delta]]] = False
        elif delta < 0:
            candidates = torch.nonzero(~flat & outside).squeeze(1)
            scores = magnitude_rewind.reshape(-1)[candidates]
            order = torch.sort(scores, descending=True, stable=True).indices
            if len(candidates) < -delta:
                raise EmbeddingError(f"{name}: too few pruned weights outside the positions")
            flat[candidates[order[:-delta]]] = True
        new[name] = kernels.view(m.shape)
    return Written(Mask(new), carriers)


def write_bits(
    mask: Mask,
    trained: Mapping[str, torch.Tensor],
    rewind: Mapping[str, torch.Tensor],
    params: W2Params,
    positions: Sequence[np.ndarray],
    bits: np.ndarray,
) -> Written:
    """Return the mask with the whitened codeword `bits` written into their groups."""
    if len(bits) != params.num_bits:
        raise EmbeddingError(f"{len(bits)} bits given for {params.num_bits} groups")
    targets = [
        (layer.name, layer.shape, pos, replica_states(layer_bits, params.repetition))
        for layer, pos, layer_bits in zip(
            params.layers, positions, split_bits(bits, params), strict=True
        )
    ]
    return write_connectivity(mask, trained, rewind, targets)


def carrier_floors(
    weights: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor],
    carriers: Mapping[str, torch.Tensor],
    quantile: float,
) -> dict[str, torch.Tensor]:
    """Return, per layer, the least magnitude each carrier keeps (0 elsewhere).

    The floor is the `quantile` of the layer's surviving magnitudes in `weights` under `mask`
    (the ticket before signing), so written connections outlast magnitude pruning: pruning
    removes the weakest first.
    """
    if not 0.0 <= quantile < 1.0:
        raise EmbeddingError(f"the carrier quantile must be in [0, 1), got {quantile}")
    floors = {}
    for name, index in carriers.items():
        weight = weights[name]
        alive = weight[mask[name].bool() & (weight != 0)].abs().float()
        level = float(torch.quantile(alive, quantile)) if alive.numel() and quantile > 0 else 0.0
        floor = torch.zeros(weight.numel(), dtype=torch.float32)
        if level > 0:
            floor[index] = level
        floors[name] = floor.view(weight.shape)
    return floors


# --- reading ----------------------------------------------------------------------------------


def kernel_strengths(magnitude: torch.Tensor) -> torch.Tensor:
    """Return the [out, in] connection strengths of a layer: the largest |w| in each kernel."""
    m = magnitude.detach().abs().float().nan_to_num(nan=0.0, posinf=0.0)
    return m.reshape(m.shape[0], m.shape[1], -1).amax(dim=2)


def typical_magnitude(magnitude: torch.Tensor, surviving: int) -> float:
    """Return the median of a layer's `surviving` largest magnitudes (0.0 if it keeps none)."""
    values = magnitude.detach().abs().float().nan_to_num(nan=0.0, posinf=0.0).reshape(-1)
    values = values[values > 0]
    if values.numel() == 0:
        return 0.0
    count = max(1, min(int(surviving), values.numel()))
    top = torch.topk(values, count).values
    return float(top.median())


@dataclass(frozen=True)
class GroupReading:
    """The suspect's reading of every group: the whitened bit, erasures, and how sure each is.

    `bits` are the read whitened codeword bits (arbitrary where erased); `margin` is the
    difference between the two sides' strengths relative to the layer's typical magnitude.
    """

    bits: np.ndarray
    erased: np.ndarray
    margin: np.ndarray
    unreadable_layers: tuple[str, ...] = ()

    @property
    def decided(self) -> int:
        return int((~self.erased).sum())

    @property
    def counted(self) -> np.ndarray:
        """Return which groups the W2 bits statistic counts: decided, and not a codeword bit
        that is the same in every signature (`payload.CONSTANT_BITS`)."""
        counted = ~self.erased
        counted[CONSTANT_BITS[CONSTANT_BITS < counted.size]] = False
        return counted

    def matches(self, expected: np.ndarray) -> tuple[int, int]:
        """Return (k, n): of the n counted groups, how many read the `expected` whitened bit."""
        counted = self.counted
        return int(((self.bits == expected) & counted).sum()), int(counted.sum())


@dataclass(frozen=True)
class LayerStrengths:
    """A suspect layer ready to read: flat connection strengths and its typical magnitude."""

    strength: np.ndarray
    scale: float


def layer_strengths(
    magnitudes: Mapping[str, torch.Tensor], params: W2Params
) -> dict[str, LayerStrengths]:
    """Return the strengths of every layer of `params` the suspect has in the recorded shape."""
    result = {}
    for layer in params.layers:
        weight = magnitudes.get(layer.name)
        if weight is None or weight.dim() < 2:
            continue
        if (int(weight.shape[0]), int(weight.shape[1])) != layer.shape:
            continue
        weight = weight.detach().cpu()
        result[layer.name] = LayerStrengths(
            kernel_strengths(weight).reshape(-1).double().numpy(),
            typical_magnitude(weight, layer.surviving),
        )
    return result


def read_groups(
    magnitudes: Mapping[str, torch.Tensor] | Mapping[str, LayerStrengths],
    params: W2Params,
    positions: Sequence[np.ndarray],
) -> GroupReading:
    """Read every group from a suspect's weight magnitudes (zero where a weight is absent).

    A group reads 1 when its even replicas' strongest connection is stronger than its odd
    replicas', 0 the other way round; it is erased when both sides are equal or its stronger
    side is below ERASE_BELOW of the layer's typical magnitude. Which side is even depends on the
    whitening alone, so for a model that never carried the codeword each decided group matches
    with probability 1/2, independently (the null of the W2 bits). `magnitudes` may also be
    `layer_strengths` computed once (for many readings of one model).
    """
    strengths = (
        magnitudes
        if all(isinstance(v, LayerStrengths) for v in magnitudes.values())
        else layer_strengths(magnitudes, params)  # type: ignore[arg-type]
    )
    r = params.repetition
    bits, erased, margin, missing = [], [], [], []
    for layer, pos in zip(params.layers, positions, strict=True):
        found = strengths.get(layer.name)
        if not isinstance(found, LayerStrengths):
            bits.append(np.zeros(layer.bits, dtype=np.uint8))
            erased.append(np.ones(layer.bits, dtype=bool))
            margin.append(np.zeros(layer.bits))
            missing.append(layer.name)
            continue
        groups = found.strength[pos].reshape(layer.bits, r)
        even, odd = groups[:, 0::2].max(axis=1), groups[:, 1::2].max(axis=1)
        scale = found.scale
        if scale > 0:
            weak = np.maximum(even, odd) < ERASE_BELOW * scale
            margin.append(np.abs(even - odd) / scale)
        else:
            weak = np.ones(layer.bits, dtype=bool)
            margin.append(np.zeros(layer.bits))
        bits.append((even > odd).astype(np.uint8))
        erased.append((even == odd) | weak)
    return GroupReading(
        np.concatenate(bits), np.concatenate(erased), np.concatenate(margin), tuple(missing)
    )


def observed_magnitudes(
    state: Mapping[str, torch.Tensor],
    explicit: Mapping[str, torch.Tensor] | None,
    names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Return |w| of each named weight, zero where the weight is zero or an explicit mask hides it.

    Integer (quantised) weights are read as their integer magnitudes: the reading compares
    magnitudes within one layer only, so a per-tensor scale does not matter.
    """
    result = {}
    for name in names:
        weight = state.get(name)
        if weight is None or weight.dim() < 2 or weight.dtype == torch.bool:
            continue
        magnitude = weight.detach().cpu().float().abs().nan_to_num(nan=0.0, posinf=0.0)
        if explicit is not None and name in explicit:
            hidden = explicit[name].cpu()
            if hidden.shape == magnitude.shape:
                magnitude = magnitude * hidden.bool()
        result[name] = magnitude
    return result


def bits_from_mask(
    mask: Mapping[str, torch.Tensor], params: W2Params, positions: Sequence[np.ndarray]
) -> GroupReading:
    """Read the groups from a bool mask alone (every present connection equally strong)."""
    return read_groups({n: m.float() for n, m in mask.items()}, params, positions)
