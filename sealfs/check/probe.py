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

from sealfs.codec import CodecError, block_ad, inode_ad, open_block
from sealfs.crypto import AuthError, VolumeKeys


class Prober:
    """Tries a failed object's bytes under candidate identities, within a budget."""

    def __init__(self, keys: VolumeKeys, block_size: int, max_attempts: int = 20000,
                 max_seconds: float = 5.0) -> None:
        self.keys = keys
        self.vid = keys.volume_id
        self.block_size = block_size
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
                self.keys.inode(ino).open(blob, inode_ad(self.vid, ino, oid))
            except AuthError:
                continue
            return ino, oid
        return None

    def block(self, blob: bytes, candidates: Iterable[tuple[int, int, int]]
              ) -> tuple[int, int, int] | None:
        """The first ``(ino, index, oid)`` whose block identity ``blob`` opens under."""
        for ino, idx, oid in candidates:
            if not self._spend():
                return None
            try:
                open_block(self.keys.inode(ino), block_ad(self.vid, ino, idx, oid), blob,
                           self.block_size)
            except (AuthError, CodecError):
                continue
            return ino, idx, oid
        return None
