"""The Python API, mirroring the command line: keygen, sign, thin, verify (paths in, results out)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ticketguard.errors import ConfigError, RunStateError
from ticketguard.signatures.keys import (
    OwnerKey,
    PublicKey,
    generate_key,
    read_private_key,
    read_public_key,
    write_keypair,
)
from ticketguard.signatures.signing import SignConfig, SignResult, sign_ticket, write_signed
from ticketguard.signatures.thinning import ThinResult, thin_ticket
from ticketguard.tickets.retrain import RetrainConfig
from ticketguard.tickets.ticket import load_ticket
from ticketguard.tickets.training import resolve_device
from ticketguard.verify.verification import VerificationReport, VerifyConfig
from ticketguard.verify.verification import verify as _verify


def keygen(owner: str, out: str | Path, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Make an Ed25519 key pair: OUT.key (private, 0600) and OUT.pub."""
    return write_keypair(generate_key(owner), out, passphrase)


def _key(key: OwnerKey | str | Path, passphrase: bytes | None) -> OwnerKey:
    return key if isinstance(key, OwnerKey) else read_private_key(key, passphrase)


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    blocked = [p for p in paths if p.exists() and not p.is_file()]
    if blocked:
        raise RunStateError(f"{blocked[0]} exists and is not a file; nothing was written")
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise RunStateError(f"{existing[0]} already exists; pass --force to replace it")


def sign(
    ticket: str | Path,
    key: OwnerKey | str | Path,
    out: str | Path,
    *,
    passphrase: bytes | None = None,
    config: SignConfig | None = None,
    device: str = "auto",
    data_dir: str | Path | None = None,
    download: bool = False,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SignResult:
    """Sign a ticket file; write the signed ticket, its credential and the owner's secret."""
    from ticketguard.files import hold_outputs
    from ticketguard.signatures.signing import output_paths

    outputs = output_paths(out)
    if Path(ticket).resolve() in {p.resolve() for p in outputs}:
        raise RunStateError(f"{ticket}: --out would overwrite the input ticket")
    # The set's lock is held from the check to the commit: a concurrent run on the same
    # outputs refuses, and a file made meanwhile is not replaced without `force`.
    with hold_outputs(outputs[0], outputs, label=str(outputs[0])):
        _refuse_existing(outputs, force)
        owner_key = _key(key, passphrase)
        result = sign_ticket(
            load_ticket(ticket),
            owner_key,
            config or SignConfig(),
            device=resolve_device(device),
            data_dir=data_dir,
            download=download,
            progress=progress,
        )
        write_signed(result, out, inputs=[ticket], force=force)
    return result


def thin(
    ticket: str | Path,
    paths: int,
    out: str | Path,
    *,
    config: RetrainConfig | None = None,
    seed: int = 0,
    device: str = "auto",
    data_dir: str | Path | None = None,
    download: bool = False,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ThinResult:
    """Thin a ticket by removing `paths` magnitude-weighted paths, retrain it, write it to OUT."""
    source = load_ticket(ticket)
    out = Path(out)
    if out.resolve() == Path(ticket).resolve():
        raise RunStateError(f"{ticket}: --out would overwrite the input ticket")
    _refuse_existing([out], force)
    config = config or default_thin_config(source)
    result = thin_ticket(
        source,
        paths,
        config,
        device=resolve_device(device),
        seed=seed,
        data_dir=data_dir,
        download=download,
        progress=progress,
    )
    result.ticket.save(out)
    return result


def default_thin_config(ticket: object) -> RetrainConfig:
    """Retrain a thinned ticket like an IMP round: from the rewind point, the recorded schedule."""
    meta = getattr(ticket, "metadata", {}) or {}
    train = ((meta.get("finding") or {}).get("config") or {}).get("train") or {}
    try:
        epochs = int(train.get("epochs", 30))
        lr = float(train.get("lr", 0.05))
    except (TypeError, ValueError):
        epochs, lr = 30, 0.05
    return RetrainConfig(epochs=epochs, lr=lr, start="rewind")


#: `package.module:function`: a Python callable that answers queries (a black-box suspect).
CALLABLE_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class QueryConfig:
    """How a black-box suspect is queried: HTTP payload, timeout and retries, local device."""

    send: str = "tensor"
    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5
    device: str = "auto"
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None


def is_callable_spec(suspect: str | Path) -> bool:
    """Return whether `suspect` names a Python callable rather than an existing file."""
    text = str(suspect)
    return not Path(text).exists() and CALLABLE_SPEC.fullmatch(text) is not None


def verify(
    suspect: str | Path | None,
    *,
    credential: str | Path | None = None,
    key: OwnerKey | str | Path | None = None,
    passphrase: bytes | None = None,
    reveal: str | Path | None = None,
    reference: str | Path | None = None,
    public_key: PublicKey | str | Path | None = None,
    null_tickets: Sequence[str | Path] = (),
    config: VerifyConfig | None = None,
    blackbox: bool = False,
    endpoint: str | None = None,
    query: QueryConfig | None = None,
) -> VerificationReport:
    """Verify a suspect against a credential and/or a reference ticket.

    `suspect` is a model file (white-box evidence; with `blackbox` it is also queried with the
    trigger set), or `package.module:function` (queried only); `endpoint` is the URL of a
    prediction server to query instead of a file.
    """
    if credential is not None and key is None and reveal is None:
        raise ConfigError(
            "a credential needs the owner's key (--key) or the revealed seed (--reveal)"
        )
    query = query or QueryConfig()
    if endpoint is not None and suspect is not None:
        raise ConfigError("give either a suspect or --endpoint, not both")
    if endpoint is None and suspect is None:
        raise ConfigError("give a suspect model file, a package.module:function, or --endpoint")
    owner_key = _key(key, passphrase) if key is not None else None
    pinned = (
        public_key
        if isinstance(public_key, PublicKey) or public_key is None
        else read_public_key(public_key)
    )
    from ticketguard.tickets.loading import load_checkpoint
    from ticketguard.verify.blackbox import CallableSuspect, HttpSuspect, Suspect

    loaded = None
    queried: Suspect | None = None
    if endpoint is not None:
        queried = HttpSuspect(
            endpoint,
            send=query.send,
            timeout=query.timeout,
            retries=query.retries,
            backoff=query.backoff,
        )
    elif suspect is not None and is_callable_spec(suspect):
        queried = CallableSuspect.from_spec(str(suspect))
    elif suspect is not None:
        loaded = load_checkpoint(suspect)
        if blackbox:
            queried = _local_suspect(loaded, credential, query)
    return _verify(
        loaded,
        credential=credential,
        key=owner_key,
        reveal=reveal,
        reference=reference,
        public_key=pinned,
        null_tickets=null_tickets,
        config=config,
        blackbox=queried,
    )


def _local_suspect(loaded: Any, credential: str | Path | None, query: QueryConfig) -> Any:
    """Build a local model file's network to query it (architecture: given, recorded, claimed)."""
    from ticketguard.signatures.credential import read_credential
    from ticketguard.tickets.loading import load_model
    from ticketguard.tickets.models import is_import_path
    from ticketguard.verify.blackbox import ModelSuspect

    arch, kwargs, num_classes = query.arch, query.arch_kwargs, None
    if arch is None and not (loaded.metadata.get("architecture") or {}).get("name"):
        # A bare state dict: build the architecture the owner's credential names.
        document = read_credential(credential).document if credential is not None else None
        claimed = (document or {}).get("architecture")
        if isinstance(claimed, dict) and isinstance(claimed.get("name"), str):
            if is_import_path(claimed["name"]):
                raise ConfigError(
                    f"the credential names the architecture {claimed['name']!r}, which imports "
                    "code; pass --arch to allow it"
                )
            arch = claimed["name"]
            kwargs = kwargs if kwargs is not None else dict(claimed.get("kwargs") or {})
            trigger = (document or {}).get("trigger_set")
            if isinstance(trigger, dict) and isinstance(trigger.get("num_classes"), int):
                num_classes = trigger["num_classes"]
    model = load_model(
        loaded,
        arch,
        arch_kwargs=kwargs,
        num_classes=num_classes,
        allow_import=query.arch is not None,
    )
    return ModelSuspect(model, resolve_device(query.device), str(loaded.path))
