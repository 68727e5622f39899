"""One error hierarchy for sealfs.

Every error a user can cause or meet carries a process exit code and a one-line message.
The CLI (``sealfs.cli``) is the only place that turns these into exit codes and output; library
code raises them and never prints. Messages must never contain key material.
"""

from __future__ import annotations


class SealfsError(Exception):
    """Base class: a failure with a stable exit code and a one-line, secret-free message."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(SealfsError):
    """The caller asked for something malformed or impossible (bad path, bad option)."""

    exit_code = 2
    kind = "usage"


class UnlockError(SealfsError):
    """No key slot could be opened with the credentials given (wrong key or passphrase)."""

    exit_code = 3
    kind = "unlock"


class FormatError(SealfsError):
    """The volume header is missing, corrupt, or of a format this version cannot read."""

    exit_code = 4
    kind = "format"


class IntegrityError(SealfsError):
    """Authenticated data failed verification: tampering, rollback, swap, or loss."""

    exit_code = 5
    kind = "integrity"


class BusyError(SealfsError):
    """The volume or mountpoint is in use (already mounted, locked by another process)."""

    exit_code = 6
    kind = "busy"


class StorageError(SealfsError):
    """The backing store failed (I/O error, out of space); never a sign of tampering."""

    exit_code = 7
    kind = "storage"


class KmsError(SealfsError):
    """The key management service refused, was unreachable, or answered wrongly."""

    exit_code = 8
    kind = "kms"


class AttestationError(SealfsError):
    """A quote or its collateral failed verification, or policy denied it."""

    exit_code = 9
    kind = "attestation"


class LuksError(SealfsError):
    """A LUKS operation failed or a LUKS header was refused by validation."""

    exit_code = 10
    kind = "luks"
