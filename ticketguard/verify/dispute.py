"""Disputes: several parties claim one model family; decide which claim came first.

Every claim (credential, revealed secret, the model its party released) is verified against
every claimed model. A copy carries the mark of the model it was taken from as well as its
thief's; the original carries only its owner's. So the original is the claim whose own model
carries no other claim's mark while every other claimed model carries its mark.

Only evidence that cannot be made after the fact decides precedence: marks written into the
weights at positions fixed by the committed seed (W2, W3) and trigger sets generated from that
seed (their labels are drawn by the generator). An *imported* trigger set can be picked after
a model is released, from inputs the model already labels consistently, so it is shown but
never counts for precedence. Creation times in credentials are self-asserted and not used.

Each verification judges statistical evidence at the security level (p <= 2^-128/m by default):
a claimant may retry keys, seeds and texts until its mark matches another model by chance, and
a mark ground that way (p around 1e-7) must not count as being in that model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ticketguard.errors import ConfigError
from ticketguard.verify.stats import SECURITY_BITS, format_p
from ticketguard.verify.verification import VerificationReport, VerifyConfig, rule_note, verify

#: Evidence names whose verdict can establish precedence (besides generated trigger sets).
EMBEDDED = ("W2 bits", "W2 payload", "W3 QR")
TRIGGERS = "B1 triggers"


@dataclass(frozen=True)
class Claim:
    """One party's claim: their credential, their revealed secret and the model they released."""

    credential: Path
    secret: Path
    model: Path
    label: str | None = None


@dataclass
class DisputeResult:
    """The cross-verification matrix, the decision (index of the original claim) and why."""

    claims: list[dict[str, Any]]
    matrix: list[list[dict[str, Any]]]
    winner: int | None
    reasoning: list[str]
    alpha: float
    notes: list[str] = field(default_factory=list)
    #: One line: which claim came first, or why none can be named.
    decision: str = ""
    #: The security level every verification judged statistical evidence at (0: alpha/m).
    security_bits: int = SECURITY_BITS

    def to_dict(self) -> dict[str, Any]:
        """Return the whole result as JSON-safe data."""
        return {
            "claims": self.claims,
            "matrix": self.matrix,
            "winner": self.winner,
            "winner_owner": None if self.winner is None else self.claims[self.winner]["owner"],
            "decision": self.decision,
            "reasoning": self.reasoning,
            "alpha": self.alpha,
            "security_bits": self.security_bits,
            "notes": self.notes,
        }


def _claim_info(index: int, claim: Claim) -> dict[str, Any]:
    from ticketguard.signatures.credential import read_credential

    cred = read_credential(claim.credential)
    doc = cred.document or {}
    trigger = doc.get("trigger_set") if isinstance(doc.get("trigger_set"), dict) else None
    return {
        "index": index,
        "label": claim.label or f"claim {index + 1}",
        "owner": doc.get("owner"),
        "key_id": cred.public_key.key_id() if cred.public_key else None,
        "created": doc.get("created"),
        "credential": str(claim.credential),
        "secret": str(claim.secret),
        "model": str(claim.model),
        "valid": cred.valid,
        "problems": list(cred.problems),
        "trigger_source": None if trigger is None else trigger.get("source"),
        "architecture": doc.get("architecture"),
        "sha256": cred.sha256,
    }


def _queried(loaded: Any, info: dict[str, Any], device: torch.device) -> Any:
    """Build a model file's network to query it (its recorded architecture, else the claim's)."""
    from ticketguard.tickets.loading import load_model
    from ticketguard.tickets.models import is_import_path
    from ticketguard.verify.blackbox import ModelSuspect

    arch = None
    if not loaded.architecture:
        claimed = info.get("architecture") or {}
        name = claimed.get("name") if isinstance(claimed, dict) else None
        if isinstance(name, str) and not is_import_path(name):
            arch = name
    model = load_model(loaded, arch)
    return ModelSuspect(model, device, str(loaded.path))


def _cell(report: VerificationReport, info: dict[str, Any]) -> dict[str, Any]:
    generated = info.get("trigger_source") == "generated"
    counted = [
        name
        for name in report.verdict.decisive
        if name in EMBEDDED or (name == TRIGGERS and generated)
    ]
    evidence = [
        {
            "name": e.name,
            "kind": e.kind,
            "summary": e.summary,
            "log10_p": e.log10_p,
            "p": e.p_text,
            "work_log2": e.work_log2,
            "work": e.work_text,
            "valid": e.valid,
            "judged": e.judged,
            "not_judged_reason": e.not_judged_reason,
        }
        for e in report.evidences
    ]
    return {
        "verified": report.verified,
        "decisive": list(report.verdict.decisive),
        "precedence": bool(counted) and not report.problems,
        "precedence_evidence": counted,
        "reason": report.verdict.reason,
        "problems": list(report.problems),
        "evidence": evidence,
        "security_bits": report.verdict.security_bits,
        "threshold_log10": report.verdict.threshold_log10,
        "tests": report.verdict.tests,
    }


def _level(cell: dict[str, Any]) -> str:
    """Return the threshold a cell's statistical evidence was judged at, as text."""
    bits, m = cell["security_bits"], cell["tests"]
    shown = format_p(cell["threshold_log10"])
    if bits:
        return f"the {bits}-bit security level 2^-{bits}/m = {shown} (m={m})"
    return f"alpha/m = {shown} (m={m})"


def _strongest(cell: dict[str, Any]) -> str:
    """Return the counted evidence of a cell with its p-values and why each counts, as text."""
    parts = []
    for e in cell["evidence"]:
        if e["name"] not in cell["precedence_evidence"]:
            continue
        if e["p"] is not None:
            parts.append(f"{e['name']} p = {e['p']}, within {_level(cell)}")
        else:
            parts.append(f"{e['name']} valid (a signature: it cannot be ground)")
    return ", ".join(parts) or "no evidence"


def _absent(cell: dict[str, Any], claimant: str, model: str) -> str:
    """Say, evidence by evidence, why a cell carries no mark of `claimant` that counts in `model`.

    `model` names the model read ("alice's model", "its own model")."""
    parts = []
    for e in cell["evidence"]:
        what = f"{claimant}'s {e['name']}"
        if not e["judged"]:
            shown = f" p = {e['p']}" if e["p"] is not None else ""
            parts.append(f"{what}{shown} in {model} does not count: {e['not_judged_reason']}")
        elif e["p"] is not None:
            if e["name"] in cell["decisive"]:
                parts.append(
                    f"{what} p = {e['p']} in {model} verifies but does not count for precedence"
                )
            elif _within(e["log10_p"], cell):
                parts.append(f"{what} p = {e['p']} in {model} is within {_level(cell)}")
            elif cell["security_bits"]:
                parts.append(
                    f"{what} p = {e['p']} in {model} does not count: above {_level(cell)}; a "
                    f"claimant who can retry reaches it in about {e['work']}"
                )
            else:
                parts.append(
                    f"{what} p = {e['p']} in {model} does not count: not below {_level(cell)}"
                )
        elif e["valid"] is not None:
            parts.append(f"{what} in {model}: {'valid' if e['valid'] else 'invalid'}")
    if cell["problems"]:
        parts.append("the claim does not count: " + "; ".join(cell["problems"]))
    return "; ".join(parts) or f"no evidence of {claimant} read from {model}"


def _within(log10_p: float, cell: dict[str, Any]) -> bool:
    """Return whether a p-value reaches the cell's threshold under its rule."""
    if cell["security_bits"]:
        return log10_p <= cell["threshold_log10"]
    return log10_p < cell["threshold_log10"]


def dispute(
    claims: Sequence[Claim],
    *,
    config: VerifyConfig | None = None,
    blackbox: bool = True,
    device: torch.device | None = None,
) -> DisputeResult:
    """Verify every claim against every claimed model and decide which claim came first."""
    from ticketguard.tickets.loading import load_checkpoint

    config = config or VerifyConfig()
    device = device or torch.device("cpu")
    if len(claims) < 2:
        raise ConfigError("a dispute needs at least two claims")
    infos = [_claim_info(i, c) for i, c in enumerate(claims)]
    seen: dict[object, int] = {}
    for i, (claim, info) in enumerate(zip(claims, infos, strict=True)):
        # A copy of a credential file is the same claim as the file itself.
        for key in (Path(claim.credential).resolve(), info["sha256"]):
            if key in seen:
                raise ConfigError(
                    f"{claim.credential}: the same credential is given in claims "
                    f"{seen[key] + 1} and {i + 1}"
                )
        seen[Path(claim.credential).resolve()] = seen[info["sha256"]] = i
    loaded = [load_checkpoint(c.model) for c in claims]
    notes = [
        "owners and creation times are self-asserted: anyone can write any name and time into "
        "their own credential, so neither decides precedence"
    ]
    models = [Path(c.model).resolve() for c in claims]
    for j, model in enumerate(models):
        first = models.index(model)
        if first < j:
            notes.append(
                f"claims {first + 1} and {j + 1} name the same model file: if it carries both "
                "marks, they cannot be ordered"
            )
    suspects: dict[int, Any] = {}
    matrix: list[list[dict[str, Any]]] = []
    for i, claim in enumerate(claims):
        row = []
        for j in range(len(claims)):
            queried = None
            if blackbox and infos[i]["trigger_source"] is not None:
                if j not in suspects:
                    suspects[j] = _queried(loaded[j], infos[i], device)
                queried = suspects[j]
            report = verify(
                loaded[j],
                credential=claim.credential,
                reveal=claim.secret,
                config=config,
                blackbox=queried,
            )
            row.append(_cell(report, infos[i]))
        matrix.append(row)
    notes.append(rule_note(config))
    winner, reasoning, decision = _decide(infos, matrix)
    return DisputeResult(
        infos, matrix, winner, reasoning, config.alpha, notes, decision, config.security_bits
    )


def _decide(
    infos: list[dict[str, Any]], matrix: list[list[dict[str, Any]]]
) -> tuple[int | None, list[str], str]:
    n = len(infos)
    name = [f"{c['label']} ({c['owner']})" for c in infos]
    marks = [[matrix[i][j]["precedence"] for j in range(n)] for i in range(n)]
    reasoning = []
    for i, info in enumerate(infos):
        if not info["valid"]:
            reasoning.append(
                f"{name[i]}: the credential is invalid ({'; '.join(info['problems'])}); "
                "it cannot win"
            )
            continue
        if info["trigger_source"] not in (None, "generated"):
            reasoning.append(
                f"{name[i]}: its trigger set is imported, so it could have been chosen after a "
                "model was released (from inputs the model already labels consistently) and the "
                "credential cannot prove when it was made; trigger evidence does not count for "
                "precedence"
            )
        if not marks[i][i]:
            reasoning.append(
                f"{name[i]}: its own model does not carry its mark by evidence that cannot be "
                f"made after the fact ({_absent(matrix[i][i], name[i], 'its own model')}); "
                "it cannot win"
            )
    eligible = [i for i in range(n) if infos[i]["valid"] and marks[i][i]]
    originals = [
        i
        for i in eligible
        if all(marks[i][j] for j in range(n) if j != i)
        and not any(marks[k][i] for k in range(n) if k != i)
    ]
    # Two originals cannot both qualify: each would need its mark in the other's model and none
    # in its own, so `originals` holds at most one claim.
    if originals:
        w = originals[0]
        reasoning.append(f"{name[w]}'s own model carries its mark ({_strongest(matrix[w][w])})")
        for j in range(n):
            if j != w:
                reasoning.append(
                    f"{name[w]}'s mark is in {name[j]}'s model ({_strongest(matrix[w][j])}): "
                    f"that model derives from {name[w]}'s"
                )
        for k in range(n):
            if k != w:
                reasoning.append(
                    f"{name[k]}'s mark is not in {name[w]}'s model: "
                    + _absent(matrix[k][w], name[k], f"{name[w]}'s model")
                )
        reasoning.append(
            f"no other claim's mark is in {name[w]}'s model: it carries only its owner's mark, "
            "so it is the original"
        )
        return w, reasoning, f"{name[w]} came first"
    off = [(i, j) for i in range(n) for j in range(n) if i != j and marks[i][j]]
    if not eligible:
        short = "no claim's own model carries its mark"
        why = f"{short} by evidence that decides precedence"
    elif not off and len(eligible) == n:
        short = "the models are independent"
        why = (
            f"no claimed model carries another claim's mark: {short}, and each claim stands "
            "for its own model only"
        )
    elif not off:
        short = "no claim that can win has its mark in another claimed model"
        why = f"{short}; the others cannot win (see above)"
    else:
        short = "the marks do not single out an original"
        why = (
            f"{short}: "
            + "; ".join(f"{name[i]}'s mark is in {name[j]}'s model" for i, j in off)
            + " (each model may carry both marks, or the claims derive from a third model)"
        )
    reasoning.append(why)
    return None, reasoning, f"undecided — {short}"
