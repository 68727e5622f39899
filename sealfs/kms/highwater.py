"""A KMS replica's own record of the highest state version it has served.

The state (a SQLite file or a PostgreSQL database) can be put back to an older copy by
whoever administers it; an older copy is internally consistent, so nothing *in* it shows it
is old. Each replica therefore keeps, in a small file on its own host, the highest table
version it has answered from, MACed under the root key (:meth:`StoreMac.served`): at start,
a state older than that is refused, and while it runs the store refuses any state that went
back (:class:`sealfs.kms.store.StateRolledBack`).

The file is written (temporary file, fsync, rename, fsync of the directory) after a new
version commits and before the answer that rests on it leaves the KMS, so nothing was ever
answered from a version the file does not cover. Keep it on the replica's host, never on the
database's storage or in its backups: a restore that rolls back the database must not roll
back this file with it (docs/operations.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from sealfs import strict
from sealfs.crypto import ct_equal
from sealfs.errors import IntegrityError, UsageError
from sealfs.kms.derivation import StoreMac

MAGIC = b"sealfs-kms-high-water 1"
MAX_BYTES = 256


class HighWater:
    """The high-water file at ``path`` (created at the first version served)."""

    def __init__(self, path: str | os.PathLike[str], macs: StoreMac) -> None:
        self.path = Path(path)
        self._macs = macs

    def __repr__(self) -> str:
        return f"<HighWater {self.path}>"

    def load(self) -> int:
        """The recorded version (0 when there is no file yet); a file that fails its MAC was
        written for another root key, or edited, and is refused rather than ignored."""
        if not os.path.lexists(self.path):
            return 0
        raw = strict.read_secret_file(self.path, "high-water file", MAX_BYTES)
        magic, _, rest = raw.partition(b"\n")
        fields = rest.split()
        try:
            if magic != MAGIC or len(fields) != 2:
                raise ValueError
            version, tag = int(fields[0]), bytes.fromhex(fields[1].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise UsageError(f"high-water file {self.path} is not one sealfs wrote") from None
        if not ct_equal(self._macs.served(version), tag):
            raise IntegrityError(
                f"high-water file {self.path} fails its MAC (written for another KMS root "
                "key, or edited)"
            )
        return version

    def store(self, version: int) -> None:
        """Record ``version`` durably (atomic replace; a crash leaves the old or the new)."""
        data = b"%s\n%d %s\n" % (MAGIC, version, self._macs.served(version).hex().encode())
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise IntegrityError(
                f"cannot record the served version in {self.path}: {e.strerror}"
            ) from None
