"""One error hierarchy for sealfs.

Every error a user can cause or meet is one of these types, with a one-line message. The CLI
is the only place that turns them into exit codes (the table in ``sealfs.cli.exit_codes``) and
output; library code raises them and never prints. Messages must never contain key material.
"""

from __future__ import annotations


class SealfsError(Exception):
    """Base class: a failure with a stable kind (its exit code is the CLI's to choose) and a
    one-line, secret-free message."""

    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(SealfsError):
    """The caller asked for something malformed or impossible (bad path, bad option)."""

    kind = "usage"


class UnlockError(SealfsError):
    """No key slot could be opened with the credentials given (wrong key or passphrase)."""

    kind = "unlock"


class FormatError(SealfsError):
    """The volume header is missing, corrupt, or of a format this version cannot read."""

    kind = "format"


class IntegrityError(SealfsError):
    """Authenticated data failed verification: tampering, rollback, swap, or loss."""

    kind = "integrity"


class BusyError(SealfsError):
    """The volume or mountpoint is in use (already mounted, locked by another process)."""

    kind = "busy"


class StorageError(SealfsError):
    """The backing store failed (I/O error, out of space); never a sign of tampering."""

    kind = "storage"


class KmsError(SealfsError):
    """The key management service refused, was unreachable, or answered wrongly."""

    kind = "kms"


class AttestationError(SealfsError):
    """A quote or its collateral failed verification, or policy denied it."""

    kind = "attestation"


class LuksError(SealfsError):
    """A LUKS operation failed or a LUKS header was refused by validation."""

    kind = "luks"
