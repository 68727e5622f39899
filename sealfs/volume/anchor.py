"""The freshness anchor: the volume root held outside the disk, at the KMS.

The host can hand back an older copy of the whole backing directory, or a clone that has
lived on separately; everything in it is authentic, so only a record kept elsewhere can tell.
The KMS keeps, per attested app and volume, the last anchored ``(epoch, head)``: ``epoch`` is
the metadata commit sequence number and ``head`` the running digest of all commit records
(docs/format.md, "Volume root").

Rules (docs/threat-model.md): on mount the disk's history must contain the anchored commit —
same sequence number *and* same head — or the mount is refused as a rollback (disk behind) or a
fork (same number, other history). After mount, and periodically, the anchor advances to the
last durable commit (:attr:`sealfs.fs.metalog.MetaLog.root`, an atomic snapshot), from a
background task: never inside the commit lock, so a KMS out of reach never stalls an fsync.
Checkpoints keep the heads back to the last commit known anchored, so the anchored commit is
always within the verifiable range, whoever wrote the checkpoints (a recovery-credential mount
too).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from sealfs.crypto import ct_equal
from sealfs.errors import IntegrityError
from sealfs.kms.client import EpochStore

log = logging.getLogger("sealfs.anchor")


class RollbackError(IntegrityError):
    """The disk is older than (or diverged from) the volume root anchored at the KMS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "rolled back" or "forked"


class KmsAnchor:
    """Reads and advances one volume's anchor through a KMS client."""

    def __init__(self, client: EpochStore, volume_id: bytes) -> None:
        self.client = client
        self.volume_id = volume_id
        self.anchored: tuple[int, bytes] = (0, b"")
        self._lock = threading.Lock()  # one exchange at a time: ``anchored`` stays the KMS's

    def __repr__(self) -> str:
        return f"<KmsAnchor {self.client!r}>"

    def fetch(self) -> tuple[int, bytes]:
        with self._lock:
            self.anchored = self.client.get_epoch(self.volume_id)
            return self.anchored

    def advance(self, epoch: int, head: bytes) -> None:
        """Anchor the durable commit ``(epoch, head)``. Raises RollbackError if it is not a
        successor of what the KMS holds: an older commit, or the same number with another
        head (a fork: a copy of the volume went on elsewhere), and KmsError if unreachable."""
        with self._lock:
            held_epoch, held_head = self.anchored
            if epoch < held_epoch:
                raise RollbackError(
                    "rolled back",
                    f"volume rolled back: commit {epoch} is "
                    f"older than the anchored commit {held_epoch}",
                )
            if epoch == held_epoch:  # already anchored (no head: the never-anchored 0)
                if held_head and not ct_equal(head, held_head):
                    raise RollbackError(
                        "forked",
                        f"volume forked: commit {epoch} differs from the one anchored at the KMS",
                    )
                return
            self.anchored = self.client.advance_epoch(self.volume_id, epoch, head)
            log.debug("anchored epoch %d", epoch)


class KnownHeads(Protocol):
    """The heads a replayed disk knows: of commits ``first`` up to its last one (the metadata
    log's :class:`sealfs.fs.metalog.Heads`). The anchor sees only these plain values, so it
    stands below the filesystem core that replays them."""

    @property
    def first(self) -> int: ...

    def get(self, seq: int) -> bytes | None: ...


def verify_fresh(last_seq: int, heads: KnownHeads, anchored: tuple[int, bytes]) -> None:
    """Raise RollbackError unless the replayed history, which ends at commit ``last_seq`` and
    knows ``heads``, contains the anchored commit."""
    epoch, head = anchored
    if epoch == 0 and not head:
        return  # never anchored (a new volume, or its first mount with a KMS)
    if epoch > last_seq:
        raise RollbackError(
            "rolled back",
            f"volume is stale: the disk ends at commit {last_seq} but the KMS anchored commit "
            f"{epoch}; this copy was rolled back, or is an old copy left behind (a fork) when "
            "the volume moved on, e.g. after a migration: do not use it",
        )
    ours = heads.get(epoch)
    if ours is None:
        raise RollbackError(
            "rolled back",
            f"cannot verify freshness: anchored commit {epoch} "
            f"predates the oldest commit the checkpoint keeps "
            f"({heads.first})",
        )
    if not ct_equal(ours, head):
        raise RollbackError(
            "forked",
            f"volume forked: commit {epoch} on disk differs from "
            "the one anchored at the KMS (a copy of this volume has been "
            "used elsewhere)",
        )
