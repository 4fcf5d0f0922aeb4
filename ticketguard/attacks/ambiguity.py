"""Ambiguity attacks: the thief wants a claim of their own, or to make the owner's look weak.

`forge` signs the stolen ticket with the attacker's key; `fake-triggers` claims inputs the stolen
model already labels consistently, with those labels chosen after the fact; `overwrite` flips
mask entries to erase the owner's mark and retrains; `key-search` tries many random keys against
one model and counts how many "verify". Disputes (`verify.dispute`) settle forged claims.
"""

from __future__ import annotations

import hashlib
import itertools
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticketguard.attacks.base import (
    AMBIGUITY,
    KEPT_METADATA,
    Attack,
    AttackContext,
    AttackError,
    AttackResult,
    Param,
    attack_seed,
    attacked_ticket,
    generator,
    register,
)
from ticketguard.attacks.removal import FRACTION, fine_tune_state, kept_mask
from ticketguard.errors import EmbeddingError
from ticketguard.files import canonical_json
from ticketguard.signatures.keys import OwnerKey
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.ticket import Ticket
from ticketguard.version import __version__

#: The attacker's owner id when no key file is given.
ATTACKER = "mallory@example.org"


def _seed_bytes(seed: int, *tags: object) -> bytes:
    return hashlib.sha256(canonical_json(["ticketguard/attacker", seed, *tags]).encode()).digest()


def attacker_key(owner: str, key_file: str, seed: int) -> OwnerKey:
    """Return the attacker's key: read from `key_file`, or derived from `seed` (reproducible)."""
    if key_file:
        from ticketguard.signatures.keys import passphrase_from, read_private_key

        return read_private_key(key_file, passphrase_from(None))
    return OwnerKey(owner, Ed25519PrivateKey.from_private_bytes(_seed_bytes(seed, "key")))


def claimed_time(text: str) -> str | None:
    """Return the creation time a claim asserts, normalised (UTC, ISO 8601); None for "now"."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AttackError(
            f"attack parameter 'created' must be an ISO 8601 time such as "
            f"2020-01-01T00:00:00Z, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


#: Shared by the claim-making attacks: a credential's time is whatever its maker writes.
CREATED = Param(
    "created",
    str,
    "",
    "The creation time the claim asserts, e.g. 2020-01-01T00:00:00Z, backdated at will "
    "(default: now, or SOURCE_DATE_EPOCH).",
)


# --- forge ---------------------------------------------------------------------------------------


def _sign_claim(
    ticket: Ticket,
    key: OwnerKey,
    *,
    recover_epochs: int,
    triggers: Any,
    seed: int,
    context: AttackContext,
    created: str | None = None,
) -> Any:
    from ticketguard.signatures.signing import SignConfig, sign_ticket
    from ticketguard.tickets.retrain import RetrainConfig

    config = SignConfig(
        retrain=RetrainConfig(
            epochs=recover_epochs, dataset=context.dataset, seed=attack_seed(seed, "sign")
        ),
        triggers=triggers,
    )
    # A thief strips the owner's records (signature, finding history, accuracies) before
    # claiming the model; only what is needed to rebuild and retrain it is kept.
    meta = {k: ticket.metadata[k] for k in KEPT_METADATA if k in ticket.metadata}
    stolen = Ticket(ticket.mask, ticket.trained, ticket.rewind, meta)
    return sign_ticket(
        stolen,
        key,
        config,
        device=context.device,
        created=created,
        data_dir=context.data_dir,
        download=context.download,
        progress=context.progress,
    )


def _claim_details(signed: Any) -> dict[str, Any]:
    doc = signed.credential
    return {
        "owner": doc["owner"],
        "key_id": signed.ticket.metadata["signature"]["key_id"],
        "created": doc["created"],
        "accuracy_before": signed.accuracy_before,
        "accuracy_after": signed.accuracy_after,
        "trigger_accuracy": signed.trigger_accuracy,
    }


def forge(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Sign the stolen ticket with the attacker's own key (W2, and a generated trigger set)."""
    from ticketguard.signatures.signing import TriggerConfig

    key = attacker_key(p["owner"], p["key"], seed)
    triggers = TriggerConfig(source="generate") if p["trigger"] == "generate" else None
    signed = _sign_claim(
        ticket,
        key,
        recover_epochs=p["recover_epochs"],
        triggers=triggers,
        seed=seed,
        context=context,
        created=claimed_time(p["created"]),
    )
    return AttackResult(signed.ticket, _claim_details(signed), claim=signed)


register(
    Attack(
        "forge",
        AMBIGUITY,
        "Sign the stolen ticket with the attacker's own key (a forged claim of ownership).",
        (
            Param("owner", str, ATTACKER, "The attacker's owner id (when no --key is given)."),
            Param(
                "key",
                str,
                "",
                "The attacker's private key file (default: a key derived from --seed).",
                is_path=True,
            ),
            Param(
                "trigger",
                str,
                "generate",
                "Also claim a generated trigger set, or not.",
                ("generate", "none"),
            ),
            Param("recover_epochs", int, 3, "Recovery epochs after embedding.", minimum=0),
            CREATED,
        ),
        forge,
        needs_data=True,
        makes_claim=True,
    )
)


# --- fake trigger set ----------------------------------------------------------------------------


def _predict(
    model: torch.nn.Module, inputs: torch.Tensor, device: torch.device, batch: int = 512
) -> torch.Tensor:
    from ticketguard.tickets.training import logits_of

    labels = []
    with torch.inference_mode():
        for chunk in inputs.split(batch):
            labels.append(logits_of(model(chunk.to(device))).argmax(dim=1).cpu())
    return torch.cat(labels)


def consistent_inputs(
    ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return candidate images the model labels the same under noise, their labels, and how
    many candidates were tried."""
    from ticketguard.signatures.signing import input_normalization, input_shape_of
    from ticketguard.signatures.triggers import TriggerSet, generate_triggers

    if ticket.num_classes is None:
        raise AttackError("the model records no number of classes")
    shape = input_shape_of(ticket, context.dataset)
    mean, std = input_normalization(ticket, context.dataset)
    candidates = generate_triggers(
        _seed_bytes(seed, "candidates"), p["candidates"], shape, int(ticket.num_classes)
    )
    model = ticket.build_model().to(context.device).eval()
    labels = _predict(model, candidates.inputs(mean, std), context.device)
    stable = torch.ones(len(labels), dtype=torch.bool)
    gen = generator(seed, "fake-trigger noise")
    images = candidates.images.to(torch.float32)
    for _ in range(p["checks"]):
        noisy = (images + torch.randn(images.shape, generator=gen) * p["noise"]).clamp(0, 255)
        shifted = TriggerSet(noisy.round().to(torch.uint8), candidates.labels, "generated")
        stable &= _predict(model, shifted.inputs(mean, std), context.device) == labels
    # Take the labels in turn, so the claimed set is as balanced as the model allows: its null
    # hit rate (the largest label frequency) is then as low as it can be.
    by_label = [
        stable.logical_and(labels == k).nonzero().squeeze(1).tolist()
        for k in range(int(ticket.num_classes))
    ]
    order = [i for group in itertools.zip_longest(*by_label) for i in group if i is not None]
    keep = torch.tensor(sorted(order[: p["size"]]), dtype=torch.long)
    if len(keep) < p["size"]:
        raise AttackError(
            f"only {len(keep)} of {p['candidates']} candidates are labelled consistently; "
            f"raise --candidates or lower --size"
        )
    return candidates.images[keep], labels[keep], p["candidates"]


def _write_folder(folder: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write images and labels in the folder format of Adi et al. (pics/N.png, labels.txt)."""
    from PIL import Image

    if images.shape[1] not in (1, 3):
        raise AttackError(
            f"a trigger folder holds grey or RGB pictures, not {images.shape[1]}-channel inputs"
        )
    pics = folder / "pics"
    pics.mkdir(parents=True)
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        # A uint8 H x W array is saved as grey ("L"), H x W x 3 as RGB.
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(
            pics / f"{i + 1}.png"
        )
    (folder / "labels.txt").write_text("".join(f"{int(v)}\n" for v in labels), encoding="utf-8")


def fake_triggers(
    ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext
) -> AttackResult:
    """Claim inputs the stolen model already labels consistently, labelled after the fact."""
    from ticketguard.signatures.signing import TriggerConfig

    created = claimed_time(p["created"])
    key = attacker_key(p["owner"], p["key"], seed)
    images, labels, tried = consistent_inputs(ticket, p, seed, context)
    with tempfile.TemporaryDirectory(prefix="ticketguard-fake-triggers-") as tmp:
        folder = Path(tmp) / "set"
        _write_folder(folder, images, labels)
        signed = _sign_claim(
            ticket,
            key,
            recover_epochs=p["recover_epochs"],
            # The model labels the set already; training only recovers from the W2 write, so it
            # is bounded by the recovery epochs instead of running until the set is learnt.
            triggers=TriggerConfig(
                source=str(folder),
                size=len(labels),
                order="numeric",
                max_epochs=max(1, p["recover_epochs"]),
            ),
            seed=seed,
            context=context,
            created=created,
        )
    details = _claim_details(signed)
    details.update(
        {
            "candidates": tried,
            "kept": int(len(labels)),
            "label_counts": np.bincount(labels.numpy(), minlength=ticket.num_classes or 0).tolist(),
        }
    )
    return AttackResult(signed.ticket, details, claim=signed)


register(
    Attack(
        "fake-triggers",
        AMBIGUITY,
        "Claim inputs the stolen model already labels consistently, as an imported trigger set.",
        (
            Param("size", int, 100, "Trigger images claimed.", minimum=1, maximum=10_000),
            Param("candidates", int, 2000, "Candidate images tried.", minimum=1, maximum=100_000),
            Param("checks", int, 8, "Noisy copies a candidate's label must survive.", minimum=0),
            Param("noise", float, 8.0, "Std of that noise, in pixel levels (0..255).", minimum=0),
            Param("owner", str, ATTACKER, "The attacker's owner id (when no --key is given)."),
            Param("key", str, "", "The attacker's private key file.", is_path=True),
            Param("recover_epochs", int, 3, "Recovery epochs after embedding.", minimum=0),
            CREATED,
        ),
        fake_triggers,
        strength="size",
        needs_data=True,
        makes_claim=True,
    )
)


# --- overwrite -----------------------------------------------------------------------------------


def _overwrite_connectivity(
    ticket: Ticket, fraction: float, seed: int
) -> tuple[Mask, dict[str, int]]:
    """Flip connectivity entries of the layers W2 writes into, as W2 writes them (counts kept)."""
    from ticketguard.signatures.signing import excluded_layers
    from ticketguard.signatures.topology import channel_connectivity
    from ticketguard.signatures.w2 import eligible_layers, write_connectivity

    mask = kept_mask(ticket)
    names = eligible_layers(mask, excluded_layers(ticket), None)
    gen = generator(seed, "overwrite")
    targets, flipped, capped = [], {}, {}
    for name in names:
        m = mask[name]
        conn = channel_connectivity(m)
        kernel = m.numel() // conn.numel()
        surviving = int(m.sum())
        wanted = round(fraction * conn.numel())
        # The writer must make up for every flip inside the layer (see w2.plan_embedding): a
        # sparse layer cannot absorb more, so the flips are capped there and the cap reported.
        room = min(surviving // (kernel + 1), (m.numel() - surviving) // (2 * kernel))
        count = min(wanted, room)
        if count < wanted:
            capped[name] = wanted - count
        if count == 0:
            continue
        pos = torch.randperm(conn.numel(), generator=gen)[:count].numpy()
        shape = (int(conn.shape[0]), int(conn.shape[1]))
        targets.append((name, shape, pos, (~conn.reshape(-1)[torch.as_tensor(pos)]).numpy()))
        flipped[name] = count
    if capped:
        flipped["capped"] = sum(capped.values())
    if not targets:
        return mask, flipped
    try:
        new = write_connectivity(mask, ticket.trained, ticket.rewind, targets).mask
    except EmbeddingError as exc:
        raise AttackError(f"cannot overwrite that much: {exc}") from None
    return new, flipped


def _overwrite_random(ticket: Ticket, fraction: float, seed: int) -> tuple[Mask, dict[str, int]]:
    """Swap random survivors for random pruned entries in every masked layer (counts kept)."""
    mask = kept_mask(ticket)
    gen = generator(seed, "overwrite")
    new, flipped = {}, {}
    for name, m in mask.items():
        flat = m.reshape(-1).clone()
        alive = flat.nonzero().squeeze(1)
        dead = (~flat).nonzero().squeeze(1)
        count = min(round(fraction * len(alive)), len(dead))
        flat[alive[torch.randperm(len(alive), generator=gen)[:count]]] = False
        flat[dead[torch.randperm(len(dead), generator=gen)[:count]]] = True
        new[name] = flat.view(m.shape)
        flipped[name] = 2 * count
    return Mask(new), flipped


def overwrite(ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext) -> AttackResult:
    """Flip mask entries to erase the owner's mark, then fine-tune under the new mask."""
    from ticketguard.tickets.retrain import starting_state

    if p["target"] == "signature":
        mask, flipped = _overwrite_connectivity(ticket, p["fraction"], seed)
    else:
        mask, flipped = _overwrite_random(ticket, p["fraction"], seed)
    # Revived entries start from their rewind values, as in the owner's own retraining.
    source = Ticket(kept_mask(ticket), ticket.trained, ticket.rewind, ticket.metadata)
    state = starting_state(source, mask, "trained")
    trained, info = fine_tune_state(
        ticket,
        state,
        mask,
        epochs=p["epochs"],
        lr=p["lr"],
        fraction=p["data_fraction"],
        seed=seed,
        context=context,
    )
    out = attacked_ticket(ticket, trained, attack="overwrite", params=p, seed=seed)
    capped = flipped.pop("capped", 0)
    info.update(
        {"flipped": sum(flipped.values()), "flipped_per_layer": flipped, "not_flipped": capped}
    )
    return AttackResult(out, info)


register(
    Attack(
        "overwrite",
        AMBIGUITY,
        "Flip mask entries (as a signature would be written, or at random), then fine-tune.",
        (
            Param(
                "fraction",
                float,
                0.05,
                "signature: share of each signable layer's channel connections flipped; "
                "random: share of each layer's surviving weights swapped for pruned ones.",
                minimum=0.0,
                maximum=1.0,
            ),
            Param(
                "target",
                str,
                "signature",
                "Where to flip: the connectivity of the layers W2 signs, or random mask entries.",
                ("signature", "random"),
            ),
            Param("epochs", int, 3, "Fine-tuning epochs after the flips.", minimum=0),
            Param("lr", float, 0.01, "Learning rate of the fine-tune.", minimum=1e-8, maximum=10.0),
            Param(
                "data_fraction",
                float,
                FRACTION.default,
                FRACTION.help,
                minimum=FRACTION.minimum,
                maximum=FRACTION.maximum,
            ),
        ),
        overwrite,
        strength="fraction",
        needs_data=True,
    )
)


# --- key search ----------------------------------------------------------------------------------

#: Tries whose trigger sets are queried in one batch.
CHUNK = 25


def key_search(
    ticket: Ticket, p: dict[str, Any], seed: int, context: AttackContext
) -> AttackResult:
    """Try `tries` random keys and seeds against the model: how many would "verify"?

    Each try is a complete claim made after the fact: a fresh Ed25519 key signs the payload
    message for the model's fingerprint, a fresh 32-byte seed places the W2 bits the way `sign`
    would lay them out on this model, and (with `trigger`) a trigger set is generated from that
    seed. The bits are read from the model, the payload is decoded and checked, the set is
    queried, and the evidence is judged as `verify` judges it (Bonferroni over W2 and B1).

    By default every try is decoded (about 5 ms each on a laptop CPU). The decoder only
    accepts bounded-distance decodes (at most nsym/2 wrong bytes), so with `decode="reach"` a
    try whose bits are farther than that from its own codeword is not decoded: the decoder could
    only return some other payload, which is a valid signature of the message with negligible
    probability.
    """
    from ticketguard.attacks.grinding import Rule, expected_work_log2, log10_sum, work_text
    from ticketguard.signatures.credential import payload_message
    from ticketguard.signatures.payload import EccParams, embedded_bits, recover_payload
    from ticketguard.signatures.signing import excluded_layers, input_normalization, input_shape_of
    from ticketguard.signatures.triggers import generate_triggers
    from ticketguard.signatures.w2 import (
        eligible_layers,
        keyed_positions,
        layer_strengths,
        observed_magnitudes,
        plan_embedding,
        read_groups,
    )
    from ticketguard.verify.stats import Evidence, binomial_log10_tail, judge

    start = time.perf_counter()
    mask = kept_mask(ticket)
    params = plan_embedding(mask, eligible_layers(mask, excluded_layers(ticket), None), EccParams())
    strengths = layer_strengths(
        observed_magnitudes(ticket.trained, mask, params.layer_names), params
    )
    fingerprint = ticket.fingerprint
    model = inputs_mean = inputs_std = shape = None
    if p["trigger"]:
        # Channels-last convolutions are about twice as fast on a CPU; the search queries
        # 100,000 images for 1000 tries, far more than any verification.
        model = ticket.build_model().to(context.device, memory_format=torch.channels_last).eval()
        shape = input_shape_of(ticket, context.dataset)
        inputs_mean, inputs_std = input_normalization(ticket, context.dataset)
    tries, verified = p["tries"], 0
    # Per try, log10 of the chance that its W2 bits (and B1 set) reach the threshold under the
    # null: the expected tries to a verified claim follow, as in `grind`.
    rule = Rule(p["alpha"], p["security_bits"], 2 if p["trigger"] else 1)
    reaching: list[float] = []
    best = {"W2 bits": 0.0, "B1 triggers": 0.0}
    most_bits = decode_attempts = decoded = 0
    # A decode can only return the claimed signature if the bits are within the code's reach
    # of its codeword: even erasing every wrong or unread byte, at most nsym of them. Farther
    # off, decoding is skipped (exact).
    reach = params.ecc.nsym
    message = payload_message(
        owner=ATTACKER,
        created="1970-01-01T00:00:00Z",
        fingerprint=fingerprint,
        toolkit_version=__version__,
    )
    for first in range(0, tries, CHUNK):
        chunk = range(first, min(first + CHUNK, tries))
        claims = []
        for i in chunk:
            seed_i = _seed_bytes(seed, "try", i)
            key = OwnerKey(
                ATTACKER, Ed25519PrivateKey.from_private_bytes(_seed_bytes(seed, "key", i))
            )
            expected = embedded_bits(key.sign(message), seed_i, params.ecc)
            reading = read_groups(strengths, params, keyed_positions(seed_i, params))
            right = (reading.bits == expected) & ~reading.erased
            matched, n = reading.matches(expected)
            most_bits = max(most_bits, matched)
            reaching.append(rule.reach_log10(n, 0.5))
            log10_w2 = binomial_log10_tail(n, matched, 0.5)
            best["W2 bits"] = min(best["W2 bits"], log10_w2)
            differing = int((~right).reshape(-1, 8).any(axis=1).sum())
            valid = False
            if differing <= reach or p["decode"] == "always":
                decode_attempts += 1
                public = key.public_key
                # Erasing the least reliable bytes (soft decoding) can only help within reach.
                found = recover_payload(
                    reading.bits,
                    seed_i,
                    params.ecc,
                    erasures=reading.erased,
                    reliability=reading.margin if differing <= reach else None,
                    accept=lambda payload, public=public: public.verify(payload, message),
                )
                decoded += found is not None
                valid = found is not None
            claims.append(
                [
                    Evidence(
                        "W2 bits",
                        "statistical",
                        f"{matched}/{n} read bits match",
                        log10_w2,
                        null="Binomial(n, 1/2)",
                    ),
                    Evidence("W2 payload", "cryptographic", "checked", valid=bool(valid)),
                ]
            )
        if model is not None:
            sets = [
                generate_triggers(
                    _seed_bytes(seed, "try", i),
                    p["trigger_size"],
                    shape,
                    int(ticket.num_classes or 10),
                )
                for i in chunk
            ]
            inputs = torch.cat([s.inputs(inputs_mean, inputs_std) for s in sets])
            if inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            # One batch per chunk of tries: larger batches are markedly faster on a CPU.
            answers = _predict(model, inputs, context.device, len(inputs)).split(p["trigger_size"])
            for i, (evidences, triggers, answer) in enumerate(
                zip(claims, sets, answers, strict=True), start=len(reaching) - len(claims)
            ):
                hits = int((answer == triggers.labels).sum())
                p0 = triggers.max_label_frequency()
                log10_b1 = binomial_log10_tail(triggers.size, hits, p0)
                reaching[i] = log10_sum(reaching[i], rule.reach_log10(triggers.size, p0))
                best["B1 triggers"] = min(best["B1 triggers"], log10_b1)
                evidences.append(
                    Evidence(
                        "B1 triggers",
                        "statistical",
                        f"{hits}/{triggers.size} labels match",
                        log10_b1,
                        null="Binomial(T, p0)",
                    )
                )
        verified += sum(
            judge(evidences, p["alpha"], p["security_bits"]).verified for evidences in claims
        )
    return AttackResult(
        None,
        {
            "tries": tries,
            "verified": verified,
            "alpha": p["alpha"],
            "security_bits": p["security_bits"],
            "bound": tries * p["alpha"]
            if p["security_bits"] == 0
            else tries * 2.0 ** -p["security_bits"],
            "bits": params.num_bits,
            "most_bits_matched": most_bits,
            "decode_attempts": decode_attempts,
            "payloads_decoded": decoded,
            "smallest_log10_p": best if model is not None else {"W2 bits": best["W2 bits"]},
            "work_log2": expected_work_log2(reaching),
            "work": work_text(expected_work_log2(reaching)),
            "seconds": time.perf_counter() - start,
        },
    )


register(
    Attack(
        "key-search",
        AMBIGUITY,
        "Try many random keys and seeds against one model and count how many would verify.",
        (
            Param("tries", int, 1000, "Keys and seeds tried.", minimum=1, maximum=10_000_000),
            Param("trigger", bool, True, "Also try a generated trigger set per seed (B1)."),
            Param(
                "trigger_size",
                int,
                100,
                "Size of each generated trigger set.",
                minimum=1,
                maximum=10_000,
            ),
            Param(
                "alpha",
                float,
                1e-6,
                "Significance level of each try's verdict (only with security_bits 0).",
                minimum=1e-300,
                maximum=0.5,
            ),
            Param(
                "security_bits",
                int,
                128,
                "Each try's statistical evidence decides only at p <= 2^-bits/m (0: alpha/m).",
                minimum=0,
                maximum=4096,
            ),
            Param(
                "decode",
                str,
                "always",
                "Decode the payload on every try, or only when the bits are within the code's "
                "reach of the claimed codeword (faster; the rest cannot decode to it).",
                ("always", "reach"),
            ),
        ),
        key_search,
        strength="tries",
    )
)
