"""Attacks on files: read the model under attack, run one attack, write what it produced.

What is written depends on what the attack makes: an attacked model is a ticket file (its mask is
the pattern of weights the model keeps); an ambiguity attack that makes a claim of its own (forge,
fake triggers) writes the attacker's signed ticket, credential and secret like `sign`; a
measurement (key search) writes a JSON report. What one run writes is committed at once (a crash
leaves the old files or the new ones, docs/outputs.md) and never replaces an input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ticketguard.attacks.base import (
    AttackContext,
    AttackResult,
    get_attack,
    run_attack,
)
from ticketguard.errors import ArchitectureError, RunStateError
from ticketguard.files import hold_outputs, writing
from ticketguard.tickets.ticket import Ticket


@dataclass
class AttackRun:
    """One attack run on a file: the attack's result and the paths written."""

    name: str
    params: dict[str, Any]
    seed: int
    result: AttackResult
    written: list[Path]


def load_target(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    dataset: str | None = None,
) -> Ticket:
    """Read the model under attack as a ticket, without executing code from the file.

    A ticket file is used as it is. Any other model file (a state dict, a checkpoint) becomes a
    ticket whose mask is its zero pattern over the architecture's default pruned layers; its
    architecture is the recorded one or `arch`, its dataset the recorded one or `dataset`.
    """
    from ticketguard.tickets.loading import load_checkpoint, load_model
    from ticketguard.tickets.mask import Mask
    from ticketguard.tickets.models import classifier_width, default_pruned_parameters

    loaded = load_checkpoint(path)
    if loaded.ticket is not None and arch is None:
        ticket = loaded.ticket
        if dataset is not None:
            meta = dict(ticket.metadata)
            meta["dataset"] = dict(meta.get("dataset") or {}, name=dataset)
            ticket = Ticket(ticket.mask, ticket.trained, ticket.rewind, meta)
        return ticket
    if arch is None and loaded.architecture is None:
        raise ArchitectureError(f"{path}: the file records no architecture; pass --arch")
    model = load_model(loaded, arch, arch_kwargs=arch_kwargs)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = default_pruned_parameters(model)
    if loaded.mask is not None and set(names) <= set(loaded.mask):
        mask = Mask({n: loaded.mask[n] & (state[n] != 0) for n in names})
    else:
        mask = Mask.from_weights(state, names)
    metadata: dict[str, Any] = {
        "architecture": {
            "name": arch or loaded.architecture,
            "kwargs": dict(
                arch_kwargs or (loaded.metadata.get("architecture") or {}).get("kwargs") or {}
            ),
        },
        "num_classes": classifier_width(model) or loaded.metadata.get("num_classes"),
        "pruned_layers": names,
    }
    for key in ("input_shape", "dataset"):
        if key in loaded.metadata:
            metadata[key] = loaded.metadata[key]
    if dataset is not None:
        metadata["dataset"] = dict(metadata.get("dataset") or {}, name=dataset)
    rewind = None
    if loaded.rewind is not None and set(state) <= set(loaded.rewind):
        rewind = {k: loaded.rewind[k].detach().clone() for k in state}
    return Ticket(mask, state, rewind or {}, metadata)


#: Attacks that measure (their `--out` is a JSON report); `grind` also writes the claim it found.
MEASUREMENTS = ("key-search", "grind")


def output_paths(name: str, out: str | Path) -> list[Path]:
    """Return the files `attack NAME --out OUT` writes (a measurement's claim aside)."""
    from ticketguard.tickets import paths

    out = Path(out)
    if get_attack(name).makes_claim:
        return list(paths.signed_outputs(out))
    return [out]


def claim_paths(out: str | Path) -> list[Path]:
    """Return where a measurement writes a claim it found: beside OUT, named OUT's stem + .claim.

    `grind.json` gives `grind.claim.ticket`, `grind.claim.cred.json` and
    `grind.claim.secret.json`.
    """
    from ticketguard.tickets import paths

    out = Path(out)
    return list(paths.signed_outputs(out.with_name(f"{out.stem}.claim{paths.TICKET_SUFFIX}")))


def check_outputs(outputs: Sequence[Path], inputs: Sequence[str | Path], force: bool) -> None:
    """Refuse outputs that are inputs, folders, or existing files without `force`."""
    resolved = {Path(p).resolve() for p in inputs}
    for path in outputs:
        if path.resolve() in resolved:
            raise RunStateError(f"{path}: is an input; refusing to overwrite it")
        if path.exists() and not path.is_file():
            raise RunStateError(f"{path}: exists and is not a file; nothing was written")
        if path.exists() and not force:
            raise RunStateError(f"{path} already exists; pass --force to replace it")
        if not path.parent.is_dir():
            raise RunStateError(f"{path.parent}: no such folder; nothing was written")


def attack_file(
    name: str,
    model: str | Path,
    out: str | Path,
    params: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    context: AttackContext | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    force: bool = False,
    notes: list[str] | None = None,
) -> AttackRun:
    """Run attack `name` on the model file `model` and write its output to `out`.

    The outputs' lock is held for the whole run (a second run on the same outputs refuses),
    and the outputs are checked again under it; they are written all at once (`write_result`).
    An interrupted earlier write of them is first finished or undone; `notes` gets a line each.
    """
    attack = get_attack(name)
    resolved = attack.resolve(params or {})
    outputs = output_paths(name, out)
    inputs: list[str | Path] = [model]
    inputs += [v for p, v in resolved.items() if attack.param(p).is_path and v]
    # A measurement's claim is checked before the run, so a long grind is never lost to it.
    every = outputs + (claim_paths(out) if name in MEASUREMENTS else [])
    check_outputs(every, inputs, force)
    with hold_outputs(set_key(name, out), every, label=str(out), notes=notes):
        check_outputs(every, inputs, force)
        context = context or AttackContext()
        ticket = load_target(model, arch=arch, arch_kwargs=arch_kwargs, dataset=context.dataset)
        result = run_attack(name, ticket, resolved, seed=seed, context=context)
        written = write_result(name, result, out, inputs=inputs)
    return AttackRun(name, resolved, seed, result, written)


def set_key(name: str, out: str | Path) -> Path:
    """The key of the output set `attack NAME --out OUT` writes (its lock and journal name)."""
    return output_paths(name, out)[0]


def write_result(
    name: str, result: AttackResult, out: str | Path, *, inputs: Sequence[str | Path] = ()
) -> list[Path]:
    """Write an attack's output: the signed claim, the attacked model, or the measurement (and
    the claim a measurement found, beside it); return the paths written.

    Everything one run writes is one output set, committed at once (ticketguard.files.writing):
    a crash leaves the old files or, once the next run on these outputs has finished the
    journal, the new ones.
    """
    from ticketguard.signatures.signing import write_signed

    key = set_key(name, out)
    if result.claim is not None and result.ticket is not None:
        members = output_paths(name, out)
        with writing(key, members, label=str(out)) as files:
            write_signed(result.claim, out, inputs=inputs, transaction=files)
        return members
    if result.ticket is not None:
        with writing(key, [Path(out)], label=str(out)) as files:
            result.ticket.save(files.stage(out))
        return [Path(out)]
    from ticketguard.verify.stats import _json_safe

    document = {
        "attack": name,
        "seconds": result.seconds,
        "details": _json_safe(result.details),
    }
    found = claim_paths(out) if result.claim is not None else []
    with writing(key, [Path(out), *found], label=str(out)) as files:
        staged = files.stage(out)
        staged.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        if result.claim is not None:
            write_signed(result.claim, found[0], inputs=inputs, transaction=files)
    return [Path(out), *found]


def describe(run: AttackRun) -> list[str]:
    """Return the lines that tell a person what an attack run did."""
    lines = [f"attack: {run.name}  seed {run.seed}  ({run.result.seconds:.1f} s)"]
    if run.params:
        lines.append("parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(run.params.items())))
    summary = run.result.details.get("summary")
    if isinstance(summary, list):
        # An attack that sums itself up in lines is shown by them; its report has the rest.
        return lines + [f"  {line}" for line in summary] + [f"wrote {p}" for p in run.written]
    ticket = run.result.ticket
    if ticket is not None:
        lines.append(
            f"attacked model: density {100 * ticket.mask.density:.2f}% "
            f"({ticket.mask.num_surviving:,} of {ticket.mask.num_weights:,} weights in the "
            "stolen ticket's pruned layers)"
        )
    for key, value in sorted(run.result.details.items()):
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True)
            if len(value) > 160:
                value = value[:157] + "..."
        lines.append(f"  {key}: {value}")
    lines += [f"wrote {p}" for p in run.written]
    return lines
