"""Verify a suspect model against a credential (W2, B1) and/or a reference ticket (W1).

White-box evidence (W1, W2) reads the suspect's weights; black-box evidence (B1) queries the
suspect with the owner's trigger set. Each piece of evidence is reported with its statistic, its
p-value and the null it was computed against; the verdict (verify/stats.py) applies Bonferroni
over all the statistical evidences tried, white-box and black-box together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ticketguard.errors import ArchitectureError, ConfigError, EmbeddingError, TriggerSetError
from ticketguard.signatures.credential import Credential, message_of, payload_of, read_credential
from ticketguard.signatures.keys import OwnerKey, PublicKey
from ticketguard.signatures.payload import embedded_bits, recover_payload
from ticketguard.signatures.structure import ChannelStructure
from ticketguard.signatures.triggers import (
    MAX_TRIGGERS,
    SOURCES,
    TriggerSet,
    generate_triggers,
)
from ticketguard.signatures.w2 import (
    W2Params,
    keyed_positions,
    observed_magnitudes,
    position_matrices,
    read_groups,
)
from ticketguard.signatures.w3 import SCHEME as W3_SCHEME
from ticketguard.signatures.w3 import W3Params, keyed_window, read_qr, window_positions
from ticketguard.tickets.loading import LoadedCheckpoint, load_checkpoint
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.ticket import Ticket, load_ticket
from ticketguard.verify.alignment import Alignment, align_masks, mask_overlap
from ticketguard.verify.blackbox import Suspect, query_labels
from ticketguard.verify.recovery import recover_mask
from ticketguard.verify.stats import (
    SECURITY_BITS,
    Evidence,
    Verdict,
    binomial_log10_tail,
    check_security_bits,
    empirical_p,
    judge,
    normal_log10_tail,
    prediction_log10_tail,
)


@dataclass(frozen=True)
class VerifyConfig:
    """Verification settings: security level and significance level, W1 null, alignment, batching.

    Statistical evidence decides at p <= 2^-security_bits / m (a claimant who retries needs
    about 2^security_bits tries to forge it); `security_bits=0` restores p < alpha / m, which
    holds only for a claim proven to predate the suspect.
    """

    alpha: float = 1e-6
    null_samples: int = 50
    seed: int = 0
    align: bool = True
    batch_size: int = 64
    security_bits: int = SECURITY_BITS

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        check_security_bits(self.security_bits)
        if self.null_samples < 2:
            raise ConfigError(f"the W1 null needs at least 2 samples, got {self.null_samples}")
        if self.batch_size < 1:
            raise ConfigError(f"the query batch size must be >= 1, got {self.batch_size}")


@dataclass
class VerificationReport:
    """Everything `verify` found: the inputs, each evidence, and the verdict."""

    suspect: dict[str, Any]
    evidences: list[Evidence]
    verdict: Verdict
    credential: dict[str, Any] | None = None
    mask_sources: dict[str, str] = field(default_factory=dict)
    alignment: dict[str, Any] | None = None
    w1: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    blackbox: dict[str, Any] | None = None

    @property
    def verified(self) -> bool:
        return self.verdict.verified

    def to_dict(self) -> dict[str, Any]:
        return {
            "suspect": self.suspect,
            "credential": self.credential,
            "mask_sources": self.mask_sources,
            "alignment": self.alignment,
            "w1": self.w1,
            "blackbox": self.blackbox,
            "problems": self.problems,
            "notes": self.notes,
            "evidence": [e.to_dict() for e in self.evidences],
            "verdict": self.verdict.to_dict(),
        }


def _structure_of(ticket: Ticket) -> ChannelStructure:
    from ticketguard.signatures.topology import ticket_structure

    if ticket.architecture is None or ticket.num_classes is None:
        raise ArchitectureError("the reference ticket records no architecture")
    return ticket_structure(
        ticket.architecture,
        ticket.num_classes,
        ticket.metadata.get("input_shape"),
        ticket.architecture_kwargs,
    )


def _random_mask(
    counts: Mapping[str, int], shapes: Mapping[str, torch.Size], gen: torch.Generator
) -> Mask:
    masks = {}
    for name, count in counts.items():
        numel = int(np.prod(shapes[name]))
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=gen)[:count]] = True
        masks[name] = flat.view(shapes[name])
    return Mask(masks)


@dataclass
class _Credential:
    credential: Credential
    params: W2Params | W3Params | None
    seed: bytes | None
    problems: list[str]


def _check_credential(
    path: str | Path,
    key: OwnerKey | None,
    reveal: str | Path | None,
    public_key: PublicKey | None,
) -> _Credential:
    from ticketguard.signatures.credential import seed_for

    cred = read_credential(path)
    problems = [f"credential invalid: {p}" for p in cred.problems]
    params = seed = None
    if cred.valid:
        if public_key is not None:
            problem = cred.check_public_key(public_key)
            if problem:
                problems.append(problem)
        seed, problem = seed_for(cred, key=key, secret_path=reveal)
        if problem:
            problems.append(problem)
            seed = None
        try:
            params = embedding_params(cred.document["embedding"])  # type: ignore[index]
        except (EmbeddingError, ConfigError) as exc:
            problems.append(str(exc))
        if isinstance(params, W3Params) and seed is not None:
            # The window is public in the credential, but it must be where the seed puts it.
            if keyed_window(seed, params.layer.shape, params.size) != (params.row, params.col):
                problems.append(
                    "the credential's QR window is not where the embedding seed places it"
                )
    return _Credential(cred, params, seed, problems)


def embedding_params(embedding: Any) -> W2Params | W3Params:
    """Read a credential's embedding parameters for its scheme (W2 or W3), validating them."""
    if isinstance(embedding, dict) and embedding.get("scheme") == W3_SCHEME:
        return W3Params.from_dict(embedding)
    return W2Params.from_dict(embedding)


def embedded_positions(seed: bytes, params: W2Params | W3Params) -> list[np.ndarray]:
    """Return, per layer of the embedding, the flat connectivity indices that carry the mark."""
    if isinstance(params, W3Params):
        return [window_positions(params)]
    return keyed_positions(seed, params)


def verify(
    suspect: str | Path | LoadedCheckpoint | None,
    *,
    credential: str | Path | None = None,
    key: OwnerKey | None = None,
    reveal: str | Path | None = None,
    reference: str | Path | Ticket | None = None,
    public_key: PublicKey | None = None,
    null_tickets: Sequence[str | Path] = (),
    config: VerifyConfig | None = None,
    blackbox: Suspect | None = None,
) -> VerificationReport:
    """Read the owner's evidence back from a suspect model and judge it.

    `suspect` is the model file whose weights are read (white-box evidence), or None when only
    `blackbox` is at hand: a suspect that answers queries (a model, an endpoint, a function),
    which is sent the credential's trigger set (B1). With both, both are judged together.
    """
    config = config or VerifyConfig()
    if suspect is None and blackbox is None:
        raise ConfigError("give a suspect model file, a queryable suspect, or both")
    if blackbox is not None and credential is None:
        raise ConfigError("black-box verification needs the credential (with --key or --reveal)")
    if suspect is None and reference is not None:
        raise ConfigError("a reference ticket is compared with the suspect's weights: give them")
    if credential is None and reference is None:
        raise ConfigError("give a credential (with --key or --reveal), a reference ticket, or both")
    if credential is not None and key is None and reveal is None:
        raise ConfigError(
            "a credential needs the owner's key (--key) or the revealed seed (--reveal)"
        )
    if null_tickets and reference is None:
        raise ConfigError("null tickets are compared with a reference ticket: give one")
    if len(null_tickets) == 1:
        raise ConfigError("the null of independently found tickets needs at least 2 of them")
    loaded = (
        suspect
        if isinstance(suspect, LoadedCheckpoint) or suspect is None
        else load_checkpoint(suspect)
    )
    ref = (
        reference if isinstance(reference, Ticket) or reference is None else load_ticket(reference)
    )

    problems: list[str] = []
    notes: list[str] = []
    cred_info = None
    checked: _Credential | None = None
    if credential is not None:
        checked = _check_credential(credential, key, reveal, public_key)
        problems += checked.problems
        doc = checked.credential.document or {}
        cred_info = {
            "path": str(credential),
            "valid": checked.credential.valid,
            "owner": doc.get("owner"),
            "key_id": (
                checked.credential.public_key.key_id() if checked.credential.public_key else None
            ),
            "fingerprint_after": doc.get("fingerprint_after"),
            "problems": checked.problems,
        }
        if (
            ref is not None
            and checked.credential.valid
            and doc.get("fingerprint_after") != ref.fingerprint
        ):
            notes.append("the reference ticket is not the ticket this credential was issued for")
        if key is None and public_key is None and checked.credential.valid:
            notes.append(
                "the signer is only the credential's own key (key id "
                f"{cred_info['key_id']}, claimed owner {doc.get('owner')!r}); give --public-key "
                "OWNER.pub to check that it is the owner's"
            )

    usable = checked is not None and not checked.problems and checked.params is not None
    params = checked.params if usable and checked else None
    seed = checked.seed if usable and checked else None

    black: list[Evidence] = []
    blackbox_info = None
    if blackbox is not None and checked is not None:
        if checked.credential.valid and checked.seed is not None:
            try:
                b1_evidence, blackbox_info = _b1(
                    checked.credential, checked.seed, reveal, blackbox, config
                )
            except TriggerSetError as exc:
                problems.append(str(exc))
            else:
                black.append(b1_evidence)
                if blackbox_info and blackbox_info.get("warning"):
                    notes.append(blackbox_info["warning"])
        elif not problems:
            problems.append("the trigger set cannot be checked without a valid credential and seed")

    if loaded is None:
        return _report(
            None, black, config, problems, notes, cred_info, {}, None, None, blackbox_info
        )

    # Counts steer top-magnitude recovery; the owner's reference is trusted over a credential.
    counts: dict[str, int] = {}
    if params is not None:
        counts.update({layer.name: layer.surviving for layer in params.layers})
    if ref is not None:
        counts.update({n: int(m.sum()) for n, m in ref.mask.items()})
    mask, sources = recover_mask(loaded, list(counts), counts)

    positions = (
        embedded_positions(seed, params) if params is not None and seed is not None else None
    )
    exclude = None
    if positions is not None and params is not None and ref is not None:
        exclude = _reference_positions(params, positions, ref.mask)

    evidences: list[Evidence] = []
    alignment_info = None
    w1_info = None
    read_mask: Mapping[str, torch.Tensor] = mask
    # W2 reads the suspect's magnitudes (soft information), not only its mask.
    magnitudes = (
        observed_magnitudes(loaded.state, loaded.mask, params.layer_names)
        if isinstance(params, W2Params)
        else {}
    )
    if ref is not None:
        check_layers(loaded.path, mask, ref.mask, list(ref.mask))
        structure = _structure_of(ref)
        names = list(ref.mask)
        if config.align:
            read_mask, alignment = aligned_to(ref, mask, exclude, structure)
            magnitudes = alignment.apply(structure, magnitudes)
            alignment_info = {"moved_channels": alignment.moved, "sweeps": alignment.sweeps}
        w1_evidence, w1_info = _w1(
            structure, ref, read_mask, names, exclude, null_tickets, counts, config
        )
        evidences.append(w1_evidence)

    if params is not None and seed is not None and checked is not None:
        if isinstance(params, W3Params):
            evidences.append(_w3(params, read_mask))
        else:
            pinned = key is not None or public_key is not None
            evidences += _w2(checked.credential, params, seed, positions or [], magnitudes, pinned)
    return _report(
        loaded,
        evidences + black,
        config,
        problems,
        notes,
        cred_info,
        sources,
        alignment_info,
        w1_info,
        blackbox_info,
    )


def _report(
    loaded: LoadedCheckpoint | None,
    evidences: list[Evidence],
    config: VerifyConfig,
    problems: list[str],
    notes: list[str],
    cred_info: dict[str, Any] | None,
    sources: dict[str, str],
    alignment_info: dict[str, Any] | None,
    w1_info: dict[str, Any] | None,
    blackbox_info: dict[str, Any] | None,
) -> VerificationReport:
    verdict = judge(evidences, config.alpha, config.security_bits)
    if problems:
        # A credential that fails its own checks discredits the claim made with it, whatever
        # else the suspect shows; the other evidence is still reported.
        verdict = Verdict(
            verified=False,
            alpha=config.alpha,
            threshold_log10=verdict.threshold_log10,
            tests=verdict.tests,
            decisive=[],
            reason="not verified: " + "; ".join(problems),
            security_bits=verdict.security_bits,
            not_judged=list(verdict.not_judged),
        )
    notes = [*notes, rule_note(config)]
    if loaded is not None:
        suspect_info = {
            "path": str(loaded.path),
            "format": loaded.source_format,
            "notes": list(loaded.notes),
        }
    else:
        described = (blackbox_info or {}).get("suspect", "a queryable suspect")
        suspect_info = {"path": described, "format": "black box (queried)", "notes": []}
    return VerificationReport(
        suspect_info,
        evidences,
        verdict,
        cred_info,
        sources,
        alignment_info,
        w1_info,
        problems,
        notes,
        blackbox_info,
    )


def rule_note(config: VerifyConfig) -> str:
    """Say which rule judged the statistical evidence and what alpha means (one line)."""
    if config.security_bits:
        return (
            f"alpha ({config.alpha:g}) applies only to a claim proven to predate the suspect; "
            "ticketguard has no proof of time yet, so statistical evidence is judged at the "
            f"{config.security_bits}-bit security level (p <= 2^-{config.security_bits}/m: a "
            f"claimant who retries needs about 2^{config.security_bits} tries to forge it)"
        )
    return (
        f"statistical evidence is judged at alpha/m (alpha = {config.alpha:g}, security level "
        "off): valid only for a claim proven to predate the suspect, which ticketguard cannot "
        "prove yet; a claimant who can retry reaches a p-value p in about 1/p tries"
    )


B1_NAME = "B1 triggers"
#: Why an imported trigger set is reported but never judged.
IMPORTED_NOT_JUDGED = (
    "an imported trigger set may have been chosen from the suspect's own behaviour, and nothing "
    "proves it was committed before the suspect existed: reported, never decisive"
)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def trigger_field(document: Mapping[str, Any]) -> dict[str, Any]:
    """Return a credential's `trigger_set` field, checked; raise an error naming what is wrong."""
    record = document.get("trigger_set")
    if record is None:
        raise ConfigError(
            "the credential has no trigger set (the ticket was signed without --trigger)"
        )

    def bad(what: str) -> TriggerSetError:
        return TriggerSetError(f"the credential's trigger_set field {what}")

    if not isinstance(record, dict):
        raise bad("is not an object")
    if record.get("scheme") != "B1" or record.get("source") not in SOURCES:
        raise bad("names no known scheme and source")
    size, classes, shape = record.get("size"), record.get("num_classes"), record.get("input_shape")
    if not _is_int(size) or not 1 <= size <= MAX_TRIGGERS:
        raise bad(f"has no size in 1..{MAX_TRIGGERS}")
    if not _is_int(classes) or classes < 2:
        raise bad("has no class count >= 2")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(_is_int(v) and 1 <= v <= 4096 for v in shape)
    ):
        raise bad("has no input shape [C, H, W]")
    norm = record.get("normalization")
    if not isinstance(norm, dict):
        raise bad("has no normalization")
    for name in ("mean", "std"):
        values = norm.get(name)
        if (
            not isinstance(values, list)
            or len(values) != shape[0]
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
            or not all(np.isfinite(values))
        ):
            raise bad(f"has no {name} per input channel")
    if not all(v > 0 for v in norm["std"]):
        raise bad("has a std that is not positive")
    if not isinstance(record.get("commitment"), str) or not _SHA256_HEX.fullmatch(
        record["commitment"]
    ):
        raise bad("has no commitment of 64 lowercase hex digits")
    return record


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_triggers(
    document: Mapping[str, Any], seed: bytes, reveal: str | Path | None
) -> TriggerSet:
    """Return the trigger set a credential commits to, from the seed or the secret file.

    A generated set is always re-drawn from the (checked) embedding seed, so its labels are
    known to be random; a copy in a revealed secret file must equal it. An imported set comes
    from the revealed secret file only. Either way the set must match the credential's
    commitment. A missing secret file is a usage error (ConfigError); a set that does not
    match is a TriggerSetError, which the report names as a problem.
    """
    from ticketguard.signatures.credential import read_secret_document

    record = trigger_field(document)
    stored = read_secret_document(reveal).get("trigger_set") if reveal is not None else None
    if record["source"] == "generated":
        triggers = generate_triggers(
            seed, record["size"], tuple(record["input_shape"]), record["num_classes"]
        )
        revealed = None if stored is None else TriggerSet.from_dict(stored, what=f"{reveal}")
        if revealed is not None and revealed != triggers:
            raise TriggerSetError(
                "the revealed trigger set is not the one drawn from the seed, yet the credential "
                "calls it generated"
            )
    elif stored is not None:
        triggers = TriggerSet.from_dict(stored, what=f"{reveal}: trigger set")
    else:
        raise ConfigError(
            "the trigger set was imported from a folder, so only the owner's secret file holds "
            "it: give --reveal OUT.secret.json"
            + ("" if reveal is None else f" ({reveal} holds no trigger set)")
        )
    if triggers.commitment() != record["commitment"]:
        raise TriggerSetError(
            "the trigger set does not match the credential's commitment (a different set, or one "
            "chosen after the credential was issued)"
        )
    return triggers


def _png_normalization_warning(suspect: Suspect, norm: Mapping[str, Any]) -> str | None:
    """Warn when an endpoint sent PNGs normalises them otherwise than the owner's model did.

    Pixels sent as images are normalised by the server; a server started on a bare weights file
    with another dataset or split than the owner's would query the model with shifted inputs.
    """
    if getattr(suspect, "send", None) != "png" or not hasattr(suspect, "server_info"):
        return None
    info = suspect.server_info()
    served = (info or {}).get("normalization")
    if not isinstance(served, dict):
        return None
    try:
        same = np.allclose(served["mean"], norm["mean"], atol=1e-6) and np.allclose(
            served["std"], norm["std"], atol=1e-6
        )
    except (KeyError, TypeError, ValueError):
        return None
    if same:
        return None
    return (
        f"the endpoint normalises PNG inputs with mean {served['mean']} and std {served['std']}, "
        f"the owner's model with mean {norm['mean']} and std {norm['std']}: its answers may be "
        "off; prefer --send tensor"
    )


def _b1(
    credential: Credential,
    seed: bytes,
    reveal: str | Path | None,
    suspect: Suspect,
    config: VerifyConfig,
) -> tuple[Evidence, dict[str, Any]]:
    """Query the suspect with the committed trigger set; count hits against a conservative null."""
    document = credential.document or {}
    triggers = resolve_triggers(document, seed, reveal)
    norm = trigger_field(document)["normalization"]
    inputs = triggers.inputs(norm["mean"], norm["std"])
    warning = _png_normalization_warning(suspect, norm)
    try:
        result = query_labels(suspect, inputs, triggers.images, batch_size=config.batch_size)
    finally:
        close = getattr(suspect, "close", None)
        if callable(close):
            close()
    hits = int((torch.as_tensor(result.labels) == triggers.labels).sum())
    size = triggers.size
    p0 = triggers.max_label_frequency()
    log10_p = binomial_log10_tail(size, hits, p0)
    info = {
        "suspect": getattr(suspect, "description", type(suspect).__name__),
        "source": triggers.source,
        "hits": hits,
        "size": size,
        "null_hit_rate": p0,
        "requests": result.requests,
        "batch_size": config.batch_size,
        "seconds": result.seconds,
        "queries_per_second": result.queries_per_second,
        "warning": warning,
    }
    evidence = Evidence(
        name=B1_NAME,
        kind="statistical",
        summary=f"{hits}/{size} trigger labels match (null hit rate {p0:.2f})",
        log10_p=log10_p,
        null=(
            f"Binomial({size}, {p0:.2f}): a model that never saw the set is taken to hit no more "
            "often than a constant predictor of the most frequent trigger label"
            + (
                " (labels drawn independently of the images)"
                if triggers.source == "generated"
                else " (an assumption for an imported set: its labels may follow its images)"
            )
        ),
        details=info,
        judged=triggers.source == "generated",
        not_judged_reason="" if triggers.source == "generated" else IMPORTED_NOT_JUDGED,
    )
    return evidence, info


def aligned_to(
    reference: Ticket,
    mask: Mask,
    exclude: Mapping[str, torch.Tensor] | None = None,
    structure: ChannelStructure | None = None,
) -> tuple[Mask, Alignment]:
    """Put a suspect mask's channels into the reference ticket's order (function-preserving).

    The mask must have every reference layer in its shape (`check_layers`); `exclude` marks
    embedded positions left out of the alignment cost.
    """
    structure = structure or _structure_of(reference)
    names = list(reference.mask)
    alignment = align_masks(structure, reference.mask, mask, exclude=exclude)
    moved = alignment.apply(structure, {n: mask[n] for n in names})
    return Mask({**dict(mask), **moved}), alignment


def _reference_positions(
    params: W2Params | W3Params,
    positions: Sequence[np.ndarray],
    reference: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Return the embedded positions as channel matrices, for the reference's matching layers.

    Only layers the reference has in the credential's shape are expanded, so a credential
    cannot make verification allocate matrices no real layer has.
    """
    kept = [
        (layer, pos)
        for layer, pos in zip(params.layers, positions, strict=True)
        if layer.name in reference
        and reference[layer.name].dim() >= 2
        and tuple(reference[layer.name].shape[:2]) == layer.shape
    ]
    if not kept:
        return {}
    return position_matrices([layer for layer, _ in kept], [pos for _, pos in kept])


def _w2(
    credential: Credential,
    params: W2Params,
    seed: bytes,
    positions: Sequence[np.ndarray],
    magnitudes: Mapping[str, torch.Tensor],
    pinned: bool,
) -> list[Evidence]:
    doc = credential.document or {}
    payload = payload_of(doc)
    expected = embedded_bits(payload, seed, params.ecc)
    reading = read_groups(magnitudes, params, positions)
    k, n = reading.matches(expected)
    log10_p = binomial_log10_tail(n, k, 0.5) if n else 0.0
    erased = len(expected) - reading.decided
    summary = (
        f"{k}/{n} read bits match ({erased} of {len(expected)} erased; "
        f"{params.repetition} replicas per bit)"
    )
    bits_evidence = Evidence(
        name="W2 bits",
        kind="statistical",
        summary=summary,
        log10_p=log10_p,
        null=(
            "Binomial(n, 1/2) over the n groups read: which replicas a bit connects is set by the "
            "keyed whitening alone, so each group read from an unrelated model matches by chance "
            "(the 4 codeword bits every signature shares are not counted)"
        ),
        details={
            "matched": k,
            "bits": n,
            "erased": erased,
            "repetition": params.repetition,
            "missing_layers": list(reading.unreadable_layers),
        },
    )
    public = credential.public_key
    message = message_of(doc)

    def signed(found: bytes) -> bool:
        return public is not None and public.verify(found, message)

    decoded = recover_payload(
        reading.bits,
        seed,
        params.ecc,
        erasures=reading.erased,
        reliability=reading.margin,
        accept=signed,
    )
    valid = decoded is not None
    if decoded is None:
        summary = (
            "the bits do not decode to a valid signature of the credential's message "
            "(too many errors and erasures for the Reed-Solomon code)"
        )
    elif pinned:
        summary = f"the decoded payload is {doc.get('owner')}'s valid Ed25519 signature"
    else:
        summary = (
            "the decoded payload is a valid Ed25519 signature by the credential's key "
            f"(claimed owner {doc.get('owner')!r}, identity not checked)"
        )
    payload_evidence = Evidence(
        name="W2 payload",
        kind="cryptographic",
        summary=summary,
        valid=valid,
        details={"decoded": decoded is not None},
    )
    return [bits_evidence, payload_evidence]


def _w3(params: W3Params, mask: Mapping[str, torch.Tensor]) -> Evidence:
    """Read the QR window: data-module agreement against its chance level, and a QR reader."""
    where = f"QR window in {params.layer.name} at ({params.row}, {params.col})"
    null = (
        "Binomial(n, c), c = max(w, 1 - w) with w the light fraction of the code's data modules: "
        "the most a window placed independently of the code agrees on, whatever its density"
    )
    reading = read_qr(mask, params)
    if reading is None:
        return Evidence(
            name="W3 QR",
            kind="statistical",
            summary=f"{where}: the suspect has no such layer of that shape",
            log10_p=0.0,
            null=null,
            details={"readable": False},
        )
    agree = reading.modules - reading.mismatches
    if reading.decoded == params.symbol.text:
        decoded = f"a QR reader decodes {params.symbol.text!r}"
    elif reading.decoded is not None:
        decoded = f"a QR reader decodes other text {reading.decoded[:60]!r}"
    else:
        decoded = "a QR reader does not decode it"
    others = reading.others
    compared = (
        f"; the best of {others.count} other windows of the layer agrees on {others.best}"
        if others is not None
        else ""
    )
    return Evidence(
        name="W3 QR",
        kind="statistical",
        summary=(
            f"{where}: {reading.mismatches}/{reading.modules} data modules differ "
            f"(chance agreement {100 * reading.chance:.1f}%){compared}; {decoded}"
        ),
        log10_p=binomial_log10_tail(reading.modules, agree, reading.chance),
        null=null,
        details={
            "readable": True,
            "layer": params.layer.name,
            "window": {"row": params.row, "col": params.col, "size": params.size},
            "modules": reading.modules,
            "mismatches": reading.mismatches,
            "chance": reading.chance,
            "density": reading.density,
            "decoded": reading.decoded,
            "expected": params.symbol.text,
            "decodes_expected": reading.decoded == params.symbol.text,
            "other_windows": None
            if others is None
            else {
                "count": others.count,
                "mean_agreement": others.mean,
                "std": others.std,
                "best": others.best,
                "at_least_as_good": others.exceeding,
                "empirical_p": others.empirical_p,
            },
        },
    )


def _w1(
    structure: ChannelStructure,
    ref: Ticket,
    suspect_mask: Mapping[str, torch.Tensor],
    names: list[str],
    exclude: Mapping[str, torch.Tensor] | None,
    null_tickets: Sequence[str | Path],
    counts: Mapping[str, int],
    config: VerifyConfig,
) -> tuple[Evidence, dict[str, Any]]:
    score = mask_overlap(ref.mask, suspect_mask, names, exclude)
    suspect_counts = {n: int(suspect_mask[n].sum()) for n in names}
    shapes = {n: ref.mask[n].shape for n in names}
    gen = torch.Generator().manual_seed(config.seed)
    random_scores = []
    for _ in range(config.null_samples):
        null = _random_mask(suspect_counts, shapes, gen)
        al = align_masks(structure, ref.mask, null, exclude=exclude) if config.align else None
        aligned = al.apply(structure, dict(null)) if al is not None else null
        random_scores.append(mask_overlap(ref.mask, aligned, names, exclude))
    ticket_scores = []
    for path in null_tickets:
        other_loaded = load_checkpoint(path)
        _check_same_initialisation(path, other_loaded, ref)
        other, _ = recover_mask(other_loaded, names, counts)
        check_layers(path, other, ref.mask, names)
        al = align_masks(structure, ref.mask, other, exclude=exclude) if config.align else None
        aligned = al.apply(structure, dict(other)) if al is not None else other
        ticket_scores.append(mask_overlap(ref.mask, aligned, names, exclude))

    def summarise(scores: list[float], label: str) -> dict[str, Any]:
        mean, std = float(np.mean(scores)), float(np.std(scores, ddof=1))
        return {
            "null": label,
            "samples": len(scores),
            "mean": mean,
            "std": std,
            "z": (score - mean) / std if std > 0 else None,
            "log10_p_normal_fit": normal_log10_tail(score, mean, std) if std > 0 else None,
            "p_empirical": empirical_p(score, scores),
        }

    aligned_text = ", aligned the same way" if config.align else ""
    random_null = summarise(random_scores, f"random masks of equal per-layer density{aligned_text}")
    nulls = [random_null]
    if ticket_scores:
        tickets_null = summarise(ticket_scores, f"independently found tickets{aligned_text}")
        nulls.append(tickets_null)
        if tickets_null["std"] > 0:
            log10_p = prediction_log10_tail(score, ticket_scores)
            how = f"Student-t prediction bound, {len(ticket_scores) - 1} degrees of freedom"
        else:
            log10_p = float(np.log10(tickets_null["p_empirical"]))
            how = "empirical"
        chosen, null_text = tickets_null, f"{len(ticket_scores)} {tickets_null['null']} ({how})"
    else:
        # Tickets found from the same initialisation share much of their masks, far beyond what
        # random masks do, so the random-mask null is reported but never judged.
        log10_p = None
        chosen = random_null
        null_text = (
            f"{random_null['samples']} {random_null['null']} (not judged: this null cannot tell "
            "tickets found from the same initialisation apart; give --null-ticket)"
        )
    info = {
        "score": score,
        "z": chosen["z"],
        "nulls": nulls,
        "layers": names,
        "per_layer": {n: mask_overlap(ref.mask, suspect_mask, [n], exclude) for n in names},
        "invariant": invariant_statistics(structure, ref.mask, suspect_mask, names),
    }
    z = chosen["z"]
    evidence = Evidence(
        name="W1 topology",
        kind="statistical",
        summary=(
            f"mask overlap {score:.4f} vs null {chosen['mean']:.4f} ± {chosen['std']:.4f}"
            + (f" (z = {z:.1f})" if z is not None else "")
        ),
        log10_p=log10_p,
        null=null_text,
        details=info,
    )
    return evidence, info


def _recorded_seed(metadata: Mapping[str, Any]) -> Any:
    return ((metadata.get("finding") or {}).get("config") or {}).get("seed")


def _check_same_initialisation(path: object, loaded: LoadedCheckpoint, ref: Ticket) -> None:
    """Refuse a null ticket found from other initial weights than the reference.

    IMP from one initialisation gives similar masks, so the null must start where the
    reference started (same --seed, another --split-seed); tickets from other initial weights
    overlap it no more than random masks and would make an innocent same-init ticket look
    stolen. Tickets recording their finding seed are checked; others are trusted.
    """
    theirs, ours = _recorded_seed(loaded.metadata), _recorded_seed(ref.metadata)
    if theirs is not None and ours is not None and theirs != ours:
        raise ConfigError(
            f"{path}: was found from other initial weights (seed {theirs}, the reference's is "
            f"{ours}); null tickets must start from the reference's (same --seed, another "
            "--split-seed)"
        )


def check_layers(
    path: object,
    mask: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    names: Sequence[str],
) -> None:
    """Raise ArchitectureError unless `mask` has every reference layer, in the same shape."""
    missing = [n for n in names if n not in mask]
    if missing:
        raise ArchitectureError(
            f"{path}: has no weight {missing[0]!r} of the reference ticket "
            f"({len(missing)} layer(s) missing)"
        )
    for n in names:
        if tuple(mask[n].shape) != tuple(reference[n].shape):
            raise ArchitectureError(
                f"{path}: {n!r} has shape {tuple(mask[n].shape)}, the reference "
                f"{tuple(reference[n].shape)}"
            )


def _degree_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Return the L1 distance of two sorted degree sequences, relative to their total mass."""
    sa = torch.sort(a.double()).values
    sb = torch.sort(b.double()).values
    total = float(sa.sum() + sb.sum())
    return float((sa - sb).abs().sum()) / total if total else 0.0


def invariant_statistics(
    structure: ChannelStructure,
    reference: Mapping[str, torch.Tensor],
    suspect: Mapping[str, torch.Tensor],
    names: Sequence[str],
) -> dict[str, Any]:
    """Compare topology statistics no channel permutation changes (no alignment needed).

    Per layer: the relative L1 distance between sorted in- and out-degree sequences of the
    channel-connectivity matrices (0 = identical). For the whole graph: log10 of the number of
    input-to-logit paths of each. Reported beside W1, not judged: they have no null here.
    """
    from ticketguard.signatures.graphstats import path_counts
    from ticketguard.signatures.topology import channel_connectivity, topology_graph

    layers = {}
    for n in names:
        groups = structure.layers[n].groups if n in structure.layers else 1
        a = channel_connectivity(reference[n].bool().cpu(), groups)
        b = channel_connectivity(suspect[n].bool().cpu(), groups)
        layers[n] = {
            "out_degree_distance": _degree_distance(a.sum(1), b.sum(1)),
            "in_degree_distance": _degree_distance(a.sum(0), b.sum(0)),
        }
    paths = {}
    for label, mask in (("reference", reference), ("suspect", suspect)):
        graph = topology_graph(structure, {n: mask[n] for n in names})
        total = path_counts(graph.adjacency, graph.sources, graph.targets).log10_total
        paths[label] = float(total) if np.isfinite(total) else None
    return {"layers": layers, "log10_paths": paths}
