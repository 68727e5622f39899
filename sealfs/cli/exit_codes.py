"""The one table of process exit codes, and the only code that picks one.

Library code raises :mod:`sealfs.errors` types and never decides how a process ends; every
command ends through :class:`sealfs.cli.output.SealfsGroup` (an error) or :func:`fail_with`
(a result already printed that is still a failure, e.g. a check that found corruption). Both
look the code up here, so ``sealfs --help``, the docs and the tests have one list to agree with.
"""

from __future__ import annotations

import click

from sealfs.errors import (
    AttestationError,
    BusyError,
    FormatError,
    IntegrityError,
    KmsError,
    LuksError,
    SealfsError,
    StorageError,
    UnlockError,
    UsageError,
)

#: Error type -> exit code. A subclass takes the code of its nearest listed ancestor;
#: SealfsError itself (and any unlisted subclass) is 1, like an internal error.
EXIT_CODES: dict[type[SealfsError], int] = {
    SealfsError: 1,
    UsageError: 2,
    UnlockError: 3,
    FormatError: 4,
    IntegrityError: 5,
    BusyError: 6,
    StorageError: 7,
    KmsError: 8,
    AttestationError: 9,
    LuksError: 10,
}
INTERNAL_ERROR = 1  # a bug: any exception that is not a SealfsError
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def exit_code(error: SealfsError | type[SealfsError]) -> int:
    """The exit code for an error (or an error type)."""
    kind = error if isinstance(error, type) else type(error)
    return next(EXIT_CODES[k] for k in kind.__mro__ if k in EXIT_CODES)


def fail_with(error: type[SealfsError]) -> None:
    """End the current command with ``error``'s exit code, its output already printed."""
    click.get_current_context().exit(exit_code(error))
