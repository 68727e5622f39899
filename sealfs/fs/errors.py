"""The filesystem core's errors: a POSIX error for one request, and damage found on a read.

Both are the core's own, raised by every part of it (inode table, namespace, data path) and
mapped by the FUSE adapter: :class:`FsError` to its errno, :class:`Damaged` to EIO.
"""

from __future__ import annotations

import errno

from sealfs.errors import IntegrityError


class Damaged(IntegrityError):
    """An object failed verification or is missing; ``path`` is the plaintext path."""

    def __init__(self, path: str, what: str, oid: int | None, reason: str) -> None:
        where = f" (object {oid:016x})" if oid is not None else ""
        super().__init__(f"{what} of {path} failed verification{where}: {reason}")
        self.path = path
        self.what = what
        self.oid = oid
        self.reason = reason


class FsError(Exception):
    """A POSIX error for one request."""

    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.errno = err
