"""One volume's sealed objects: which key and which associated data belong to each.

Every object a volume stores is opened only under the identity it must have (docs/format.md):
a block under ``(volume, inode, index, object id)``, an inode record under ``(volume, inode,
object id)``, a commit record under ``(volume, journal generation, commit number)``, the
checkpoint under the volume. Callers name the identity; this class picks the key and builds the
associated data, so no caller writes a label or chooses a sealer itself.

Safe to call from worker threads: it holds no state but the volume's keys and constants
(:meth:`sealfs.crypto.VolumeKeys.inode` tolerates concurrent callers).
"""

from __future__ import annotations

import contextlib
import hashlib

from sealfs.crypto import AuthError, VolumeKeys, ct_equal
from sealfs.sealed import codec
from sealfs.sealed.codec import Checkpoint, Commit
from sealfs.sealed.inode import Inode


class SealedObjects:
    """Seals and opens the blocks, inode records, commit records and checkpoint of one
    volume. Opening raises :class:`sealfs.crypto.AuthError` for an object that is not the one
    named, and :class:`sealfs.sealed.codec.CodecError` or
    :class:`sealfs.sealed.inode.RecordError` for an authentic one that does not decode."""

    def __init__(
        self,
        keys: VolumeKeys,
        block_size: int,
        compress: bool = False,
        rekey_checkpoint: bytes | None = None,
    ) -> None:
        self.keys = keys
        #: during a re-key (``keys.previous``): the SHA-256 of the checkpoint it began from
        self.rekey_checkpoint = rekey_checkpoint
        self.volume_id = keys.volume_id
        self.block_size = block_size
        self.compress = compress

    def __repr__(self) -> str:
        return f"<SealedObjects volume={self.volume_id.hex()}>"

    # --- data blocks ---------------------------------------------------------------------

    def seal_block(self, ino: int, index: int, oid: int, data: bytes) -> bytes:
        return codec.seal_block(
            self.keys.inode(ino),
            codec.block_ad(self.volume_id, ino, index, oid),
            data,
            self.compress,
        )

    def open_block(self, ino: int, index: int, oid: int, blob: bytes) -> bytes:
        return codec.open_block(
            self.keys.inode(ino),
            codec.block_ad(self.volume_id, ino, index, oid),
            blob,
            self.block_size,
        )

    def reseal_block(self, ino: int, index: int, oid: int, blob: bytes) -> bytes | None:
        """The block under the newest key (same id and contents), or None if it is already
        (a re-key, docs/format.md)."""
        return codec.reseal_block(
            self.keys.inode(ino), codec.block_ad(self.volume_id, ino, index, oid), blob
        )

    # --- inode records -------------------------------------------------------------------

    def seal_record(self, ino: int, oid: int, record: bytes) -> bytes:
        """Seal ``record`` (:meth:`Inode.to_record`, encoded by whoever owns the node, on its
        own thread: the core encodes on the trio thread and seals in a worker)."""
        return self.keys.inode(ino).seal(record, codec.inode_ad(self.volume_id, ino, oid))

    def open_record(self, ino: int, oid: int, blob: bytes) -> Inode:
        return Inode.from_record(
            ino, self.keys.inode(ino).open(blob, codec.inode_ad(self.volume_id, ino, oid))
        )

    def reseal_record(self, ino: int, oid: int, blob: bytes) -> tuple[Inode, bytes | None]:
        """The record and, unless the newest key already opens it, the same record sealed
        under the newest key (same id: the associated data names it)."""
        sealer, ad = self.keys.inode(ino), codec.inode_ad(self.volume_id, ino, oid)
        record, newest = sealer.open_aged(blob, ad)
        return Inode.from_record(ino, record), None if newest else sealer.seal(record, ad)

    # --- journal commit records ----------------------------------------------------------

    def seal_commit(self, gen: int, commit: Commit) -> bytes:
        """The sealed commit record: what a journal frame holds and the head digests."""
        return self.keys.journal.seal(
            commit.encode(), codec.journal_ad(self.volume_id, gen, commit.seq)
        )

    def open_commit(self, gen: int, seq: int, sealed: bytes | memoryview) -> Commit:
        """Open the sealed record of commit ``seq`` of journal generation ``gen``; a record of
        another number fails (authentication, or the decoded number)."""
        commit = Commit.decode(
            self.keys.journal.open(sealed, codec.journal_ad(self.volume_id, gen, seq))
        )
        if commit.seq != seq:
            raise codec.CodecError("sequence number mismatch")
        return commit

    # --- checkpoint ----------------------------------------------------------------------

    def seal_checkpoint(self, cp: Checkpoint) -> bytes:
        """Under the newest key; marked as written during a re-key while one is going on."""
        rekeying = self.keys.previous is not None
        return codec.seal_checkpoint(self.keys.journal, self.volume_id, cp, rekeying)

    def open_checkpoint(self, blob: bytes) -> Checkpoint:
        """The checkpoint. While the header says a re-key is in progress, the checkpoint
        decides whether it really is (docs/format.md, "Re-key"): one the new key sealed as
        written during the re-key, or the very checkpoint it began from (under the previous
        key), and objects go on opening under the previous key too; one the new key sealed
        without that mark was written after the re-key finished, so the header is a replay
        and the previous key is retired here (a holder of it could forge anything it opens).
        Anything else under the previous key is refused."""
        journal = self.keys.journal
        if self.keys.previous is None:
            return codec.open_checkpoint(journal, self.volume_id, blob)
        with contextlib.suppress(AuthError, codec.CodecError):
            cp, newest = codec.open_checkpoint_aged(journal, self.volume_id, blob, rekeying=True)
            if newest:
                return cp
        cp, newest = codec.open_checkpoint_aged(journal, self.volume_id, blob)
        if newest:
            self.keys.retire_previous()
        elif self.rekey_checkpoint is None or not ct_equal(
            hashlib.sha256(blob).digest(), self.rekey_checkpoint
        ):
            raise AuthError(
                "a checkpoint under the replaced master key that is not the one the re-key "
                "began from"
            )
        return cp
