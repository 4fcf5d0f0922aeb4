"""Exception types. Every error a user can cause is one of these, so the CLI can turn it into one line."""

from __future__ import annotations


class TicketGuardError(Exception):
    """Base class of every error ticketguard raises on purpose."""


class TicketFormatError(TicketGuardError):
    """A file cannot be read as a ticket, checkpoint or state dict."""


class UnsafeFileError(TicketFormatError):
    """A file would need arbitrary code execution (a pickle with code) to load."""


class MaskError(TicketGuardError):
    """A mask is malformed."""


class MaskShapeError(MaskError):
    """A mask does not match its weight tensor."""


class MaskViolationError(MaskError):
    """Weights are non-zero where the mask is off."""


class ArchitectureError(TicketGuardError):
    """An architecture is unknown, cannot be built, or does not fit a state dict."""


class DatasetError(TicketGuardError):
    """A dataset is unknown, missing or malformed."""


class ConfigError(TicketGuardError):
    """A configuration value is invalid."""


class RunStateError(TicketGuardError):
    """A run directory is in a state that forbids the requested action."""


class TrainingDivergedError(TicketGuardError):
    """Training produced a non-finite loss."""


class KeyFileError(TicketGuardError):
    """A key file is missing, malformed, or needs a (different) passphrase."""


class CredentialError(TicketGuardError):
    """A credential or secret file cannot be read."""


class EmbeddingError(TicketGuardError):
    """A signature cannot be embedded into (or read from) a ticket as asked."""


class TopologyError(TicketGuardError):
    """A model's channel structure cannot be traced into a topology graph."""


class TriggerSetError(DatasetError):
    """A trigger set (a folder, a generated set or a secret file's copy) is malformed."""


class EndpointError(TicketGuardError):
    """A suspect's prediction endpoint is down, too slow, or answers something unreadable."""
