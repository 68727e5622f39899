"""Telling *swapped* and *rolled back* apart from plain *tampered*, cheaply.

Every object is sealed with associated data naming its identity (volume, inode, block index,
object id), so an object that fails under its own identity but opens under another one is
provably authentic data in the wrong place: a swap (another file, position or record) or a
replay (an older object of the same identity, still lying around as an orphan). Probing runs
only for objects that already failed, tries a bounded number of likely candidates (siblings
first) and stops at a global budget, so a volume the host has thoroughly trashed cannot turn
the check quadratic.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from sealfs.crypto import AuthError
from sealfs.sealed.codec import CodecError
from sealfs.sealed.inode import RecordError
from sealfs.sealed.objects import SealedObjects


class Prober:
    """Tries a failed object's bytes under candidate identities, within a budget."""

    def __init__(
        self, objects: SealedObjects, max_attempts: int = 20000, max_seconds: float = 5.0
    ) -> None:
        self.objects = objects
        self.block_size = objects.block_size
        self.attempts_left = max_attempts
        self.deadline = time.monotonic() + max_seconds
        self.exhausted = False

    def _spend(self) -> bool:
        if self.attempts_left <= 0 or time.monotonic() > self.deadline:
            self.exhausted = True
            return False
        self.attempts_left -= 1
        return True

    def record(self, blob: bytes, candidates: Iterable[tuple[int, int]]) -> tuple[int, int] | None:
        """The first ``(ino, oid)`` whose record identity ``blob`` opens under."""
        for ino, oid in candidates:
            if not self._spend():
                return None
            try:
                self.objects.open_record(ino, oid, blob)
            except AuthError:
                continue
            except RecordError:
                pass  # authentic under this identity, whatever it holds
            return ino, oid
        return None

    def block(
        self, blob: bytes, candidates: Iterable[tuple[int, int, int]]
    ) -> tuple[int, int, int] | None:
        """The first ``(ino, index, oid)`` whose block identity ``blob`` opens under."""
        for ino, idx, oid in candidates:
            if not self._spend():
                return None
            try:
                self.objects.open_block(ino, idx, oid, blob)
            except (AuthError, CodecError):
                continue
            return ino, idx, oid
        return None
