"""Shared fixtures: small, deterministic DigitsCNN tickets built in memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticketguard.signatures.keys import OwnerKey
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import DigitsCNN
from ticketguard.tickets.ticket import Ticket

#: Layers the ticket fixtures prune (the registry's default choice for digits_cnn).
TICKET_LAYERS = ("conv2.weight", "conv3.weight", "fc1.weight")


def _build_ticket(
    *, seed: int = 0, width: int = 4, layers: Sequence[str] = TICKET_LAYERS, keep: float = 0.5
) -> Ticket:
    """A DigitsCNN ticket: exactly `round(keep * numel)` entries survive in each named layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rewind_model = DigitsCNN(width=width)
    rewind = {k: v.detach().clone() for k, v in rewind_model.state_dict().items()}
    trained = {
        k: (v * 1.5 + 0.01 * torch.randn(v.shape, generator=gen))
        if v.is_floating_point()
        else v.clone()
        for k, v in rewind.items()
    }
    masks = {}
    for name in layers:
        numel = trained[name].numel()
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=gen)[: round(keep * numel)]] = True
        masks[name] = flat.view(trained[name].shape)
        trained[name] = trained[name] * masks[name]
    metadata = {
        "architecture": {"name": "digits_cnn", "kwargs": {"width": width}},
        "num_classes": 10,
    }
    return Ticket(Mask(masks), trained, rewind, metadata)


@pytest.fixture(scope="session")
def make_ticket() -> Callable[..., Ticket]:
    """Return a builder of small DigitsCNN tickets (keywords: seed, width, layers, keep)."""
    return _build_ticket


#: Finding seeds of the tickets found independently of the owner's (seed 0).
INDEPENDENT_SEEDS = range(1, 11)


def find_digits_ticket(out: Path, seed: int, rounds: int, epochs: int) -> Path:
    """Find a digits ticket on the CPU (pruning rate 0.3) and return its final ticket file."""
    from ticketguard.tickets.finding import FindConfig, find_ticket
    from ticketguard.tickets.pruning import PruneConfig
    from ticketguard.tickets.training import TrainConfig

    config = FindConfig(
        rounds=rounds, prune=PruneConfig(rate=0.3), train=TrainConfig(epochs=epochs), seed=seed
    )
    find_ticket(config, out)
    return out / "final.ticket"


@pytest.fixture(scope="session")
def owner_ticket(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The owner's digits ticket (seed 0, 4 rounds of 12 epochs), shared by the acceptance tests."""
    return find_digits_ticket(tmp_path_factory.mktemp("owner-run"), seed=0, rounds=4, epochs=12)


@pytest.fixture(scope="session")
def independent_tickets(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Ten digits tickets found independently of the owner's (seeds 1..10, 2 rounds of 4 epochs)."""
    root = tmp_path_factory.mktemp("independent")
    return [
        find_digits_ticket(root / f"seed{seed}", seed=seed, rounds=2, epochs=4)
        for seed in INDEPENDENT_SEEDS
    ]


#: A fixed owner key, so the embedded positions and the generated trigger set are reproducible.
OWNER = OwnerKey("alice@example.org", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
#: A fixed creation time fixes the payload, so the whole signing is reproducible.
SIGN_ENV = {"COLUMNS": "300", "SOURCE_DATE_EPOCH": "1795000000"}


@pytest.fixture(scope="session")
def signed_owner(tmp_path_factory: pytest.TempPathFactory, owner_ticket: Path) -> dict[str, Path]:
    """Sign the owner's digits ticket (W2 and a generated trigger set) through the CLI, once."""
    from cli_helpers import invoke

    from ticketguard.signatures.keys import write_keypair

    root = tmp_path_factory.mktemp("owner-signed")
    write_keypair(OWNER, root / "alice")
    result = invoke(
        [
            "sign",
            owner_ticket,
            "--key",
            root / "alice.key",
            "--out",
            root / "signed.ticket",
            "--trigger",
            "generate",
            "--device",
            "cpu",
        ],
        env=SIGN_ENV,
    )
    assert result.exit_code == 0, result.output
    print("\n" + result.output)
    return {
        "unsigned": owner_ticket,
        "signed": root / "signed.ticket",
        "cred": root / "signed.cred.json",
        "secret": root / "signed.secret.json",
        "key": root / "alice.key",
        "pub": root / "alice.pub",
    }


@pytest.fixture(scope="session")
def small_signed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Alice's small signed digits ticket (width 8, W2, two recovery epochs) and her files.

    Shared, read-only: the ticket, its credential and secret, and Alice's key pair.
    """
    from ticketguard.signatures.keys import write_keypair
    from ticketguard.signatures.signing import SignConfig, sign_ticket, write_signed
    from ticketguard.tickets.retrain import RetrainConfig

    root = tmp_path_factory.mktemp("small-signed")
    ticket = _build_ticket(width=8, keep=0.3, seed=0)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    result = sign_ticket(
        ticket,
        OWNER,
        SignConfig(retrain=RetrainConfig(epochs=2)),
        device=torch.device("cpu"),
        created="2026-01-01T00:00:00Z",
    )
    write_signed(result, root / "alice.ticket")
    write_keypair(OWNER, root / "alice")
    return {
        "ticket": root / "alice.ticket",
        "cred": root / "alice.cred.json",
        "secret": root / "alice.secret.json",
        "key": root / "alice.key",
    }
