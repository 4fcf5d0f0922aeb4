"""Sign a ticket: embed the owner's W2 signature, retrain, and issue the credential."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ticketguard.errors import ConfigError, EmbeddingError, TicketFormatError
from ticketguard.files import sha256_hex
from ticketguard.signatures.credential import (
    credential_bytes,
    make_credential,
    payload_message,
    payload_of,
    write_secret,
)
from ticketguard.signatures.keys import OwnerKey
from ticketguard.signatures.payload import EccParams, embedded_bits
from ticketguard.signatures.triggers import TriggerSet
from ticketguard.signatures.w2 import (
    W2Params,
    Written,
    carrier_floors,
    eligible_layers,
    keyed_positions,
    plan_embedding,
    write_bits,
)
from ticketguard.signatures.w3 import W3Params, choose_layer, make_symbol, plan_qr, write_qr
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.retrain import (
    MixedTraining,
    RetrainConfig,
    RetrainResult,
    dataset_of,
    retrain,
    starting_state,
)
from ticketguard.tickets.ticket import Ticket
from ticketguard.tickets.training import ExtraSamples
from ticketguard.version import __version__


@dataclass(frozen=True)
class TriggerConfig:
    """The trigger set (B1) a ticket learns while it is signed, and when it has learnt it.

    `source` is "generate" (abstract images drawn from the embedding seed) or the path of a
    folder in the format of Adi et al. (`pics/` and a labels file). Training mixes `per_batch`
    trigger samples into every batch, in cosine cycles of the recovery epochs starting at `lr`,
    until trigger accuracy reaches `target` with clean validation accuracy at most `tolerance`
    below the unsigned ticket's, or `max_epochs`.
    """

    source: str = "generate"
    size: int = 100
    order: str = "lexicographic"
    labels_file: str | None = None
    per_batch: int = 16
    target: float = 0.95
    tolerance: float = 0.01
    max_epochs: int = 30
    lr: float = 0.05

    def __post_init__(self) -> None:
        from ticketguard.signatures.triggers import MAX_TRIGGERS, ORDERS

        if not 1 <= self.size <= MAX_TRIGGERS:
            raise ConfigError(f"the trigger set size must be in 1..{MAX_TRIGGERS}, got {self.size}")
        if self.order not in ORDERS:
            raise ConfigError(f"the file order must be one of {', '.join(ORDERS)}")
        if self.per_batch < 1:
            raise ConfigError(f"trigger samples per batch must be >= 1, got {self.per_batch}")
        if not 0 < self.target <= 1:
            raise ConfigError(f"the trigger accuracy target must be in (0, 1], got {self.target}")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"the accuracy tolerance must be in [0, 1), got {self.tolerance}")
        if self.max_epochs < 1:
            raise ConfigError(f"the trigger epoch limit must be >= 1, got {self.max_epochs}")
        if not self.lr > 0:
            raise ConfigError(f"the trigger learning rate must be > 0, got {self.lr}")

    @property
    def generated(self) -> bool:
        return self.source == "generate"


SCHEMES = ("W2", "W3")
#: Written connections keep at least this quantile of their layer's surviving magnitudes.
CARRIER_QUANTILE = 0.9


@dataclass(frozen=True)
class SignConfig:
    """How a ticket is signed: the scheme and its layers, the code strength, the retraining.

    W2 (default) writes the owner's signature into keyed groups of `repetition` positions of
    `layers` (None: as many as the layers hold, see `w2.plan_embedding`); W3 writes a QR code of
    `qr_text` into a keyed window of one layer (`qr_layer`, else the roomiest). Either way the
    written connections keep at least the `carrier_quantile` of their layer's surviving
    magnitudes through retraining, so magnitude pruning does not take them first.
    """

    layers: tuple[str, ...] | None = None
    ecc_symbols: int = 64
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    random_seed: bool = False
    triggers: TriggerConfig | None = None
    scheme: str = "W2"
    qr_text: str | None = None
    qr_layer: str | None = None
    repetition: int | None = None
    carrier_quantile: float = CARRIER_QUANTILE

    def __post_init__(self) -> None:
        if not 0.0 <= self.carrier_quantile < 1.0:
            raise ConfigError(
                f"the carrier strength must be a quantile in [0, 1), got {self.carrier_quantile}"
            )
        if self.repetition is not None and self.scheme == "W3":
            raise ConfigError("--repetition belongs to the W2 scheme, not the QR scheme")
        if self.repetition is not None and (
            isinstance(self.repetition, bool)
            or not isinstance(self.repetition, int)
            or not 2 <= self.repetition <= 16
            or self.repetition % 2
        ):
            raise ConfigError(
                f"the repetition must be an even number in 2..16, got {self.repetition!r}"
            )
        if self.scheme not in SCHEMES:
            raise ConfigError(
                f"the scheme must be one of {', '.join(SCHEMES)}, not {self.scheme!r}"
            )
        if self.scheme == "W3" and not self.qr_text:
            raise ConfigError("the QR scheme needs the text to encode (--qr-text)")
        if self.scheme != "W3" and (self.qr_text is not None or self.qr_layer is not None):
            raise ConfigError("--qr-text and --layer belong to the QR scheme (--scheme qr)")
        if self.scheme == "W3" and self.layers:
            raise ConfigError("the QR scheme writes into one layer: give --layer, not --layers")


@dataclass
class SignResult:
    """A signed ticket with its credential, its secret seed and what signing cost."""

    ticket: Ticket
    credential: dict[str, Any]
    seed: bytes
    params: W2Params | W3Params
    accuracy_before: float | None
    accuracy_after: float | None
    changed_connections: int
    dataset: str | None = None
    triggers: TriggerSet | None = None
    trigger_accuracy: float | None = None
    trigger_epochs: int | None = None
    trigger_reached: bool | None = None
    trigger_kept_epoch: int | None = None


def excluded_layers(ticket: Ticket) -> list[str]:
    """Return the first conv and the classifier of the ticket's architecture (never signed)."""
    from ticketguard.tickets.models import classifier_name, prunable_parameters

    model = ticket.build_model()
    convs = [n for n in prunable_parameters(model) if model.get_parameter(n).dim() > 2]
    classifier = classifier_name(model)
    return convs[:1] + ([classifier] if classifier else [])


def embed_signature(ticket: Ticket, payload: bytes, seed: bytes, params: W2Params) -> Written:
    """Return the ticket's mask with the whitened, error-corrected payload written in (pure)."""
    bits = embedded_bits(payload, seed, params.ecc)
    positions = keyed_positions(seed, params)
    return write_bits(ticket.mask, ticket.trained, ticket.rewind, params, positions, bits)


@dataclass(frozen=True)
class Embedding:
    """The owner's signature written into a ticket's mask, before any retraining."""

    mask: Mask
    payload: bytes
    seed: bytes
    params: W2Params | W3Params
    created: str
    changed_connections: int
    #: Per layer, the least magnitude each written connection's carrier keeps (0 elsewhere).
    floors: dict[str, torch.Tensor] = field(default_factory=dict)


def embed_owner_signature(
    ticket: Ticket, key: OwnerKey, config: SignConfig | None = None, *, created: str | None = None
) -> Embedding:
    """Choose the seed and layers, sign the payload message and write the mark into the mask.

    W2 writes the payload (the owner's signature) itself; W3 writes the QR code of the config's
    text, and the payload is only carried by the credential. Pure: no training, no files.
    """
    from ticketguard.tickets.finding import creation_time

    config = config or SignConfig()
    if ticket.architecture is None:
        raise TicketFormatError("the ticket records no architecture; it cannot be signed")
    created = created or creation_time()
    before = ticket.fingerprint
    seed = os.urandom(32) if config.random_seed else key.derive_seed(before)
    payload = key.sign(
        payload_message(
            owner=key.owner, created=created, fingerprint=before, toolkit_version=__version__
        )
    )
    params: W2Params | W3Params
    if config.scheme == "W3":
        symbol = make_symbol(config.qr_text or "")
        chosen = _resolve_layers(ticket, [config.qr_layer] if config.qr_layer else None)
        if chosen is not None and len(chosen) != 1:
            raise EmbeddingError(
                f"--layer {config.qr_layer!r} names {len(chosen)} layers; the QR code goes into one"
            )
        names = eligible_layers(ticket.mask, excluded_layers(ticket), chosen)
        layer = names[0] if config.qr_layer else choose_layer(ticket.mask, names, symbol.size)
        params = plan_qr(ticket.mask, layer, symbol, seed)
        written = write_qr(ticket.mask, ticket.trained, ticket.rewind, params)
    else:
        chosen = _resolve_layers(ticket, config.layers)
        names = eligible_layers(ticket.mask, excluded_layers(ticket), chosen)
        params = plan_embedding(
            ticket.mask, names, EccParams(config.ecc_symbols), config.repetition
        )
        written = embed_signature(ticket, payload, seed, params)
    mask = written.mask
    changed = sum(int((mask[n] != ticket.mask[n]).sum()) for n in mask)
    floors = carrier_floors(ticket.trained, ticket.mask, written.carriers, config.carrier_quantile)
    return Embedding(mask, payload, seed, params, created, changed, floors)


def issue_signed(
    ticket: Ticket,
    key: OwnerKey,
    embedding: Embedding,
    trained: dict[str, torch.Tensor],
    retrain_config: RetrainConfig,
    *,
    accuracy_before: float | None = None,
    accuracy_after: float | None = None,
    dataset: str | None = None,
    triggers: TriggerSet | None = None,
    trigger_record: dict[str, Any] | None = None,
) -> SignResult:
    """Assemble the signed ticket from its (retrained) weights and issue its credential.

    With a trigger set, `trigger_record` is the credential's `trigger_set` field (it commits to
    the set; see `trigger_record`).
    """
    metadata = dict(ticket.metadata)
    accuracy = dict(metadata.get("accuracy") or {})
    unsigned = accuracy_before if accuracy_before is not None else accuracy.get("test")
    # A signed ticket that was not measured records no accuracy of its own.
    accuracy.update({"test": accuracy_after, "unsigned_test": unsigned})
    accuracy.pop("val", None)
    trained = _nonzero_inside(trained, embedding.mask)
    metadata["accuracy"] = accuracy
    metadata["created"] = embedding.created
    signed = Ticket(embedding.mask, trained, dict(ticket.rewind), metadata)
    credential = make_credential(
        key,
        created=embedding.created,
        fingerprint_before=ticket.fingerprint,
        fingerprint_after=signed.fingerprint,
        architecture={"name": ticket.architecture, "kwargs": ticket.architecture_kwargs},
        embedding={
            **embedding.params.to_dict(),
            "retrain": retrain_config.to_dict(),
            "carriers": _carrier_record(embedding.floors),
        },
        seed=embedding.seed,
        trigger_set=trigger_record,
    )
    if payload_of(credential) != embedding.payload:
        raise EmbeddingError("the credential's payload differs from the embedded one")
    signed.metadata["signature"] = {
        "scheme": embedding.params.to_dict()["scheme"],
        "owner": key.owner,
        "key_id": key.public_key.key_id(),
        "fingerprint_before": ticket.fingerprint,
        "credential_sha256": sha256_hex(credential_bytes(credential)),
    }
    if trigger_record is not None:
        signed.metadata["signature"]["trigger_set"] = trigger_record["commitment"]
    return SignResult(
        signed,
        credential,
        embedding.seed,
        embedding.params,
        accuracy_before,
        accuracy_after,
        embedding.changed_connections,
        dataset,
        triggers,
        trigger_record["accuracy"] if trigger_record is not None else None,
    )


def sign_ticket(
    ticket: Ticket,
    key: OwnerKey,
    config: SignConfig | None = None,
    *,
    device: torch.device,
    created: str | None = None,
    data_dir: str | Path | None = None,
    download: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SignResult:
    """Embed `key`'s signature into `ticket`, retrain with the new mask fixed, make the credential."""
    config = config or SignConfig()
    embedding = embed_owner_signature(ticket, key, config, created=created)
    triggers = mixed = None
    retrain_config = config.retrain
    if config.triggers is not None:
        retrain_config = replace(retrain_config, lr=config.triggers.lr)
        triggers = make_trigger_set(ticket, embedding.seed, config.triggers, config.retrain.dataset)
        check_secret_size(triggers)
        mean, std = input_normalization(ticket, config.retrain.dataset)
        mixed = MixedTraining(
            ExtraSamples(triggers.inputs(mean, std), triggers.labels, config.triggers.per_batch),
            target=config.triggers.target,
            tolerance=config.triggers.tolerance,
            max_epochs=config.triggers.max_epochs,
        )
    result = retrain(
        ticket,
        embedding.mask,
        retrain_config,
        device=device,
        data_dir=data_dir,
        download=download,
        progress=progress,
        mixed=mixed,
        floors=embedding.floors,
    )
    record = None
    if triggers is not None:
        record = trigger_record(ticket, triggers, result, config.retrain.dataset)
    signed = issue_signed(
        ticket,
        key,
        embedding,
        result.trained,
        retrain_config,
        accuracy_before=result.accuracy_before,
        accuracy_after=result.accuracy_after,
        dataset=result.dataset,
        triggers=triggers,
        trigger_record=record,
    )
    if triggers is not None:
        signed.trigger_epochs = result.epochs
        signed.trigger_reached = result.reached
        signed.trigger_kept_epoch = result.kept_epoch
    return signed


def check_secret_size(triggers: TriggerSet) -> None:
    """Refuse a trigger set too large for the secret file that must carry it (before training)."""
    import json

    from ticketguard.errors import TriggerSetError
    from ticketguard.signatures.credential import MAX_SECRET_BYTES

    size = len(json.dumps(triggers.to_dict()))
    if size > MAX_SECRET_BYTES - (1 << 16):
        raise TriggerSetError(
            f"the trigger set takes {size} bytes in the secret file, over its limit of "
            f"{MAX_SECRET_BYTES - (1 << 16)}; use fewer or smaller images"
        )


def input_normalization(
    ticket: Ticket, dataset: str | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the (mean, std) that turn pixels into the ticket's model inputs (its dataset's)."""
    from ticketguard.tickets.data import pixel_normalization

    name, split_seed = dataset_of(ticket, dataset)
    return pixel_normalization(name, split_seed=split_seed)


def input_shape_of(ticket: Ticket, dataset: str | None = None) -> tuple[int, int, int]:
    """Return the (C, H, W) input shape the ticket records, or its dataset's."""
    from ticketguard.tickets.data import dataset_info

    recorded = ticket.metadata.get("input_shape")
    if isinstance(recorded, list | tuple) and len(recorded) == 3:
        return (int(recorded[0]), int(recorded[1]), int(recorded[2]))
    name, _ = dataset_of(ticket, dataset)
    return dataset_info(name)[1]


def make_trigger_set(
    ticket: Ticket, seed: bytes, config: TriggerConfig, dataset: str | None = None
) -> TriggerSet:
    """Generate the trigger set from the embedding seed, or import it from a folder."""
    from ticketguard.signatures.triggers import generate_triggers, load_trigger_folder

    if ticket.num_classes is None:
        raise TicketFormatError("the ticket records no number of classes; it cannot learn triggers")
    shape = input_shape_of(ticket, dataset)
    if config.generated:
        return generate_triggers(seed, config.size, shape, int(ticket.num_classes))
    return load_trigger_folder(
        config.source,
        shape,
        int(ticket.num_classes),
        order=config.order,
        labels_file=config.labels_file,
    )


def trigger_record(
    ticket: Ticket, triggers: TriggerSet, result: RetrainResult, dataset: str | None = None
) -> dict[str, Any]:
    """Return the credential's `trigger_set` field: the commitment and how to query with it.

    It names the scheme, where the set came from, its size and input shape, the class count,
    the pixel normalisation a verifier applies before querying, the SHA-256 commitment to the
    images and labels, and the trigger accuracy reached; never the images or labels.
    """
    mean, std = input_normalization(ticket, dataset)
    return {
        "scheme": "B1",
        "source": triggers.source,
        "size": triggers.size,
        "input_shape": list(triggers.input_shape),
        "num_classes": int(ticket.num_classes or 0),
        "normalization": {"mean": list(mean), "std": list(std)},
        "commitment": triggers.commitment(),
        "accuracy": result.extra_accuracy,
    }


def sign_without_data(
    ticket: Ticket, key: OwnerKey, config: SignConfig | None = None, *, created: str | None = None
) -> SignResult:
    """Sign without retraining or data: switched-on entries take their rewind values.

    For benchmarks and tests on architectures whose data is not at hand; a real ticket should be
    signed with `sign_ticket`, whose recovery training keeps its accuracy.
    """
    embedding = embed_owner_signature(ticket, key, config, created=created)
    trained = starting_state(ticket, embedding.mask, "trained", embedding.floors)
    return issue_signed(ticket, key, embedding, trained, RetrainConfig(epochs=0))


def _carrier_record(floors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Return what the credential records of the carriers: how many, and each layer's floor."""
    return {
        "count": sum(int((f > 0).sum()) for f in floors.values()),
        "floor": {n: float(f.max()) for n, f in floors.items() if bool((f > 0).any())},
    }


def _nonzero_inside(trained: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    """Give every kept weight that is exactly zero a tiny value (1e-3 of the layer's RMS).

    A copy of the weights carries the mask only as its zero pattern, so a kept weight must not
    be zero (a switched-on entry with no rewind value, or one on a path training never moved);
    the nudge changes the function by far less than training noise.
    """
    result = dict(trained)
    for name, m in mask.items():
        weight = result[name]
        zeros = m & (weight == 0)
        if not zeros.any():
            continue
        alive = weight[m & (weight != 0)]
        scale = float(alive.float().pow(2).mean().sqrt()) if alive.numel() else 1.0
        weight = weight.clone()
        weight[zeros] = 1e-3 * (scale if scale > 0 else 1.0)
        result[name] = weight
    return result


def _resolve_layers(ticket: Ticket, patterns: Sequence[str] | None) -> list[str] | None:
    if not patterns:
        return None
    from ticketguard.tickets.models import select_parameters

    return select_parameters(ticket.build_model(), list(patterns))


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """Return the signed ticket, credential and secret paths for `--out`."""
    from ticketguard.tickets import paths

    return paths.signed_outputs(Path(out))


def write_signed(
    result: SignResult,
    out: str | Path,
    *,
    inputs: Sequence[str | Path] = (),
    force: bool = True,
    transaction: Any = None,
) -> None:
    """Write the signed ticket, its credential and the owner's secret; all three or none.

    The three files are one output set (ticketguard.files.writing): each is written in full
    under a staging name and synced, then a commit journal is written (the commit point) and
    they are renamed into place, so a crash at any instant leaves the old set or, once the next
    run on these outputs has finished the journal, the new one. The set's lock is held
    meanwhile: another run writing the same outputs refuses. With `force` false, outputs that
    exist by the time the lock is held are refused. With `transaction` (an open
    `files.OutputSet`), the files are staged into it and commit with it.
    """
    from ticketguard.files import writing
    from ticketguard.signatures.credential import write_credential

    ticket_path, cred_path, secret_path = output_paths(out)
    finals = (ticket_path, cred_path, secret_path)
    resolved_inputs = {Path(p).resolve() for p in inputs}
    for path in finals:
        if path.resolve() in resolved_inputs:
            raise EmbeddingError(f"{path}: is an input; refusing to overwrite it")

    def stage(files: Any) -> None:
        for path in finals:
            if os.path.lexists(path) and not path.is_file():
                raise EmbeddingError(f"{path}: exists and is not a file; nothing was written")
            if not force and os.path.lexists(path):
                raise EmbeddingError(f"{path} already exists; pass --force to replace it")
        # Renamed in this order: the secret, the credential, the ticket last.
        staged_secret = files.stage(secret_path)
        staged_cred = files.stage(cred_path)
        staged_ticket = files.stage(ticket_path)
        result.ticket.save(staged_ticket)
        write_credential(staged_cred, result.credential)
        write_secret(
            staged_secret,
            seed=result.seed,
            credential_sha256=sha256_hex(credential_bytes(result.credential)),
            fingerprint=result.ticket.fingerprint,
            trigger_set=result.triggers.to_dict() if result.triggers is not None else None,
        )

    if transaction is not None:
        stage(transaction)
        return
    try:
        with writing(
            ticket_path, finals, label=f"{ticket_path} (and its credential and secret)"
        ) as files:
            stage(files)
    except OSError as exc:
        raise EmbeddingError(f"{ticket_path}: cannot be written ({exc.strerror or exc})") from None
