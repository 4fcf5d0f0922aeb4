"""ticketguard: find lottery tickets and prove who owns them."""

from __future__ import annotations

from ticketguard.tickets.mask import Mask
from ticketguard.tickets.ticket import Ticket, load_ticket
from ticketguard.version import __version__

__all__ = [
    "Mask",
    "Ticket",
    "__version__",
    "find_ticket",
    "keygen",
    "load_checkpoint",
    "load_ticket",
    "sign",
    "thin",
    "verify",
]
_API = ("keygen", "sign", "thin", "verify")


def __getattr__(name: str):
    # Entry points that pull in data loading and training are imported on first use.
    if name == "find_ticket":
        from ticketguard.tickets.finding import find_ticket

        return find_ticket
    if name == "load_checkpoint":
        from ticketguard.tickets.loading import load_checkpoint

        return load_checkpoint
    if name == "verify":
        # The sub-package of that name is callable (see ticketguard/verify/__init__.py).
        import ticketguard.verify as verify_package

        return verify_package
    if name in _API:
        from ticketguard import api

        return getattr(api, name)
    raise AttributeError(f"module 'ticketguard' has no attribute {name!r}")
