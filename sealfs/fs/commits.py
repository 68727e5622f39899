"""The commit pipeline: dirty inodes into one durable journal commit, then the clean-up.

A commit (under its lock, one at a time) takes, without awaiting, a snapshot of the dirty
inodes' records, the superseded and doomed objects and the blocks an fsync wrote back; seals
and appends it in worker threads; then points the table at the new records and deletes what
the commit made unreachable (in the background while mounted). Anything that changes while a
commit is in flight goes into the next one; a commit that fails puts its snapshot back. When
the journal has grown long enough (:meth:`CommitPipeline.checkpoint_due`) the commit folds it
into a checkpoint, which needs no KMS (docs/concurrency.md, "Commits").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from sealfs.errors import StorageError
from sealfs.fs.data import DataPath
from sealfs.fs.limits import Limits
from sealfs.fs.metalog import MetaLog
from sealfs.fs.nodes import InodeTable
from sealfs.fs.references import References
from sealfs.fs.workers import Workers
from sealfs.sealed.codec import Commit, new_object_id
from sealfs.sealed.objects import SealedObjects
from sealfs.store import JOURNAL_MAX, ObjectStore

log = logging.getLogger("sealfs.fs")


@dataclass
class _Snapshot:
    """What one commit took from the in-memory state (put back if it fails)."""

    dirty: set[int]
    updates: dict[int, tuple[int, bytes]]  # ino -> (new record object id, encoded record)
    deletes: list[int]
    garbage: list[int]  # objects to delete once the commit is durable
    blocks: dict[int, tuple[int, bytes]]  # sealed blocks the commit carries


class CommitPipeline:
    """Commits the inode table's changes through the metadata log."""

    def __init__(
        self,
        store: ObjectStore,
        objects: SealedObjects,
        metalog: MetaLog,
        nodes: InodeTable,
        data: DataPath,
        refs: References,
        workers: Workers,
        limits: Limits,
    ) -> None:
        self.store = store
        self.objects = objects
        self.metalog = metalog
        self.nodes = nodes
        self.data = data
        self.refs = refs
        self.workers = workers
        self.limits = limits
        self._lock = trio.Lock()
        self._deleting: set[trio.Event] = set()  # background deletions of superseded objects

    @property
    def pending(self) -> bool:
        """Whether a commit has anything to write (data still to write back aside)."""
        return bool(self.nodes.dirty or self.data.superseded or self.nodes.doomed)

    async def commit(self) -> None:
        async with self._lock:
            if not self.pending:
                return
            snap = self._take()
            try:
                await self._write(snap)
            except BaseException:
                await self._put_back(snap)
                raise
            self._apply(snap)
            # superseded carried objects (an fsync'ed tail replaced by the next) are only
            # dropped from memory: no thread hop for them
            garbage = self.store.drop_fileless(snap.garbage)
            nursery = self.workers.nursery
            if nursery is not None and garbage:  # fsync need not wait for the clean-up
                done = trio.Event()
                self._deleting.add(done)
                nursery.start_soon(self._delete_later, garbage, done)
            elif garbage:
                await self.workers.halves(self._delete_all, garbage)
            for ino in snap.updates:
                node = self.nodes.nodes.get(ino)
                if node is not None:
                    self.refs.release_if_unused(node)
            if self.checkpoint_due():  # needs no KMS: it keeps the unanchored heads
                await self.deletions_done()  # none may race with writing carried records out
                await self.workers.run(
                    self.metalog.write_checkpoint, dict(self.nodes.table), self.nodes.next_ino
                )

    def _take(self) -> _Snapshot:
        """Take the commit's snapshot, on the trio thread without awaiting. Records are
        encoded first: if one cannot be, nothing has been taken yet."""
        nodes = self.nodes
        updates: dict[int, tuple[int, bytes]] = {}
        deletes: list[int] = []
        for ino in nodes.dirty:
            node = nodes.nodes.get(ino)
            if node is None or node.nlink == 0:
                if ino in nodes.table:
                    deletes.append(ino)
                continue
            updates[ino] = (new_object_id(), node.to_record())
        dirty, nodes.dirty = nodes.dirty, set()
        for ino in updates:
            nodes.nodes[ino].meta_dirty = False
        garbage = self.data.superseded + nodes.doomed
        self.data.superseded, nodes.doomed = [], []
        return _Snapshot(dirty, updates, deletes, garbage, self.data.take_carried())

    async def _write(self, snap: _Snapshot) -> None:
        """Seal the records (small ones ride in the commit, large ones become files), make
        the files durable, and append the commit to the journal."""
        commit = Commit(
            self.metalog.seq + 1,
            self.nodes.next_ino,
            {ino: oid for ino, (oid, _) in snap.updates.items()},
            snap.deletes,
        )
        sealed = [(oid, ino, rec) for ino, (oid, rec) in snap.updates.items()]
        limit = self.limits.carried_record_max

        def seal(batch: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
            return [(oid, ino, self.objects.seal_record(ino, oid, rec)) for oid, ino, rec in batch]

        def store(blobs: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes | None]]:
            """Large records become files; small ones are returned to ride in the commit."""
            out: list[tuple[int, int, bytes | None]] = []
            for oid, ino, blob in blobs:
                if len(blob) > limit:
                    self.store.put(oid, blob)
                    out.append((oid, ino, None))
                else:
                    out.append((oid, ino, blob))
            return out

        def append(blobs: list[tuple[int, int, bytes | None]]) -> None:
            commit.carried = dict(snap.blocks)
            commit.carried.update((oid, (ino, blob)) for oid, ino, blob in blobs if blob)
            self.store.sync(only_if_written=True)  # data and large records first
            self.metalog.append(commit)

        if len(sealed) < 8 and sum(len(r) for _, _, r in sealed) <= self.limits.inline_seal_bytes:
            # The common fsync: records sealed here (microseconds), one thread hop to store
            # and append.
            blobs = seal(sealed)
            await self.workers.run(lambda: append(store(blobs)))
        else:
            await self.workers.run(
                append, await self.workers.halves(lambda b: store(seal(b)), sealed)
            )

    async def _put_back(self, snap: _Snapshot) -> None:
        """Nothing was committed: retry all of it next time, and delete record files the
        failed attempt may have written."""
        for ino in snap.dirty:
            node = self.nodes.nodes.get(ino)
            if node is not None:
                node.meta_dirty = True
        self.nodes.dirty |= snap.dirty
        self.data.superseded[:0] = snap.garbage
        self.data.untake_carried(snap.blocks)
        await trio.to_thread.run_sync(self._delete_all, [oid for oid, _ in snap.updates.values()])

    def _apply(self, snap: _Snapshot) -> None:
        """The commit is durable: point the table at the new records; what they replace
        becomes garbage."""
        table = self.nodes.table
        for ino in snap.deletes:
            snap.garbage.append(table.pop(ino))
        for ino, (oid, _) in snap.updates.items():
            old = table.get(ino)
            if old is not None:
                snap.garbage.append(old)
            table[ino] = oid

    def checkpoint_due(self) -> bool:
        """Fold the journal into a checkpoint once it is long, relative to the checkpoint,
        and either its live carried objects (held in memory) or the journal itself (replayed
        at mount) have grown large. Superseded carried objects cost nothing: a journal of
        fsync'ed appends, whose carried tails replace each other, can grow to ``journal_max``."""
        limits, journal = self.limits, self.metalog.journal_length
        relative = min(4 * self.metalog.checkpoint_size, JOURNAL_MAX // 2)  # the reader's cap
        if journal <= max(limits.checkpoint_min_journal, relative):
            return False
        return self.store.carried_bytes > limits.carried_in_memory or journal > limits.journal_max

    async def _delete_later(self, garbage: list[int], done: trio.Event) -> None:
        try:
            await self.workers.halves(self._delete_all, garbage)
        finally:
            self._deleting.discard(done)
            done.set()

    async def deletions_done(self) -> None:
        """Wait until superseded objects of past commits are deleted (before unmounting)."""
        while self._deleting:
            await next(iter(self._deleting)).wait()

    def _delete_all(self, oids: list[int]) -> list[None]:
        for oid in oids:
            try:
                self.store.delete(oid)
            except StorageError as e:  # an orphan is harmless; check --repair removes it
                log.warning("could not delete superseded object: %s", e)
        return []
