"""The filesystem core: one volume's inodes, names, file data and crash-safe commits.

:class:`Filesystem` puts the parts together and is what the FUSE adapter, the checker's repair
and the tests call:

* :class:`~sealfs.fs.nodes.InodeTable` (``fs/nodes.py``): the table of current records, the
  node cache, and the inodes the next commit writes;
* :class:`~sealfs.fs.references.References`: the kernel's lookups and open files, which decide
  when an inode leaves memory or, unlinked, is destroyed;
* :class:`~sealfs.fs.namespace.Namespace` and :class:`~sealfs.fs.attributes.Attributes`: names,
  attributes and xattrs, with POSIX's rules;
* :class:`~sealfs.fs.blocks.BlockCache`: reading file blocks, the clean cache, read-ahead;
* :class:`~sealfs.fs.data.DataPath`: writing file contents, truncation, write-back;
* :class:`~sealfs.fs.commits.CommitPipeline`: commits, checkpoints and deferred deletes, over
  :class:`~sealfs.fs.metalog.MetaLog`;
* :class:`~sealfs.fs.freshness.Freshness`: the disk against its anchor at the KMS, verified
  at load and advanced from a task of its own.

Concurrency contract (docs/concurrency.md): every method runs on the trio thread, so the
in-memory state needs no locks. Blocking work (sealing, opening, file I/O) goes to worker
threads (:class:`~sealfs.fs.workers.Workers`) and only ever touches immutable inputs and the
store; sealing of at most 128 KiB that an fsync waits for is done inline, being cheaper than
the hand-off. A node's data (read/write/truncate/flush) is serialised by its own
``trio.Lock``; metadata changes are synchronous and therefore atomic. Commits are serialised
by the commit pipeline's lock; whatever changes while a commit is in flight goes into the next. The KMS is
never called with that lock held: the freshness anchor advances from its own task
(:meth:`Freshness.loop`), and checkpoints need no KMS (they keep the heads back to the
last anchored commit), so a KMS out of reach never stalls a commit.

Errors: POSIX failures raise :class:`FsError` (an errno); authentication failures raise
:class:`Damaged` naming the plaintext path and the backing object; storage failures raise
:class:`sealfs.errors.StorageError` (with ``errno``), never Damaged.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator

import trio

from sealfs.crypto import Secret
from sealfs.errors import BusyError, StorageError
from sealfs.fs.attributes import Attributes
from sealfs.fs.blocks import BlockCache
from sealfs.fs.commits import CommitPipeline
from sealfs.fs.data import DataPath
from sealfs.fs.errors import FsError
from sealfs.fs.freshness import Freshness
from sealfs.fs.lifecycle import volume_objects
from sealfs.fs.limits import Limits
from sealfs.fs.metalog import MetaLog, MetaState
from sealfs.fs.namespace import Namespace
from sealfs.fs.nodes import InodeTable
from sealfs.fs.references import References
from sealfs.fs.workers import Workers
from sealfs.sealed.inode import Inode
from sealfs.store import ObjectStore
from sealfs.volume.anchor import KmsAnchor
from sealfs.volume.header import Header, header_change

log = logging.getLogger("sealfs.fs")


class Filesystem:
    """One mounted (or repaired) volume. :meth:`load` it first, finish with :meth:`close`."""

    def __init__(
        self, store: ObjectStore, header: Header, master: Secret, limits: Limits | None = None
    ) -> None:
        self.store = store
        self.header = header
        self.objects = volume_objects(header, master)
        self.vid = header.volume_id
        self.block_size = header.block_size
        self.limits = limits = limits or Limits()
        self.workers = Workers(limits.io_threads)
        self.metalog = MetaLog(store, self.objects)
        self.inodes = InodeTable(store, self.objects, self.workers, limits.node_cache)
        self.cache = BlockCache(store, self.objects, self.workers, self.inodes, limits)
        self.data = DataPath(store, self.objects, self.workers, self.inodes, self.cache, limits)
        self.refs = References(self.inodes, self.data)
        self.namespace = Namespace(self.inodes, self.refs)
        self.attributes = Attributes(self.inodes)
        self.commits = CommitPipeline(
            store,
            self.objects,
            self.metalog,
            self.inodes,
            self.data,
            self.refs,
            self.workers,
            limits,
        )
        self.freshness = Freshness(self.metalog, self.workers, limits.anchor_interval)
        self.state: MetaState | None = None

    @property
    def anchor(self) -> KmsAnchor | None:
        """The volume's freshness anchor at the KMS (set before :meth:`load`), or None."""
        return self.freshness.anchor

    @anchor.setter
    def anchor(self, anchor: KmsAnchor | None) -> None:
        self.freshness.anchor = anchor

    # --- life cycle and the freshness anchor ---------------------------------------------

    def _upgrade_format_1(self) -> None:
        """Make the format-1 header format 2 under the header lock: a `sealfs key` change at
        the same moment must neither be lost nor undo the upgrade."""
        with header_change(self.store.root) as change:
            if change.header.document() != self.header.document():
                raise BusyError(
                    "the volume header changed while the volume was being opened; try again"
                )
            self.header.upgrade_format_1(self.objects.keys)
            change.replace(self.header)

    async def load(self, writable: bool = True, allow_rollback: bool = False) -> MetaState:
        """Verify and replay the metadata; with an anchor, refuse a stale or forked disk
        (unless ``allow_rollback``, which is logged) and advance the anchor to this disk."""
        state = await self.workers.run(self.metalog.load)
        self.metalog.anchorable = self.anchor is not None or self.header.kms_slot() is not None
        for note in state.notes:
            log.warning("recovery: %s", note)
        overridden = await self.freshness.verify(state, allow_rollback and writable)
        if writable:
            if self.header.format_version == 1:  # before the first format-2 object
                await self.workers.run(self._upgrade_format_1)
            await self.workers.run(self.metalog.open_for_append, state)
            if overridden is not None:
                await self.workers.run(
                    self.metalog.skip_to,
                    state.table,
                    state.next_ino,
                    max(overridden, state.seq) + 1,
                )
            if self.anchor is not None:
                await trio.to_thread.run_sync(self.freshness.anchor_root)
        self.inodes.install(state.table, state.next_ino)
        self.state = state
        return state

    async def close(self) -> None:
        """Write everything back, commit, and anchor the final state (clean unmount)."""
        await self.sync()
        await self.freshness.advance()
        self.metalog.close()

    async def commit_loop(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write back and commit periodically, so a crash loses at most a few seconds; the
        anchor advances beside it (:meth:`Freshness.loop`), so a slow KMS delays neither."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.freshness.loop)
            task_status.started()
            while True:
                await trio.sleep(self.limits.commit_interval)
                if self.dirty:
                    try:
                        await self.sync()
                    except StorageError as e:
                        log.error("periodic commit failed, will retry: %s", e)
                    except Exception:
                        log.exception("periodic commit failed, will retry")

    # --- inodes, names and references ----------------------------------------------------

    async def node(self, ino: int, hint: tuple[int, bytes] | None = None) -> Inode:
        return await self.inodes.node(ino, hint)

    async def preload(self, inos: list[int]) -> None:
        await self.inodes.preload(inos)

    def mark(self, node: Inode) -> None:
        """Include ``node`` in the next commit."""
        self.inodes.mark(node)

    async def lookup(self, parent: int, name: bytes) -> Inode:
        return await self.namespace.lookup(parent, name)

    async def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes = b"",
    ) -> Inode:
        return await self.namespace.create(parent, name, mode, uid, gid, rdev, target)

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        return await self.namespace.link(ino, new_parent, new_name)

    async def unlink(self, parent: int, name: bytes, want_dir: bool) -> None:
        await self.namespace.unlink(parent, name, want_dir)

    async def rename(
        self,
        old_parent: int,
        old_name: bytes,
        new_parent: int,
        new_name: bytes,
        noreplace: bool = False,
        exchange: bool = False,
    ) -> None:
        await self.namespace.rename(old_parent, old_name, new_parent, new_name, noreplace, exchange)

    def entries_after(self, node: Inode, cookie: int) -> Iterator[tuple[int, bytes, int]]:
        return self.namespace.entries_after(node, cookie)

    def remember(self, node: Inode) -> None:
        """The kernel now holds one more reference (a lookup reply)."""
        self.refs.remember(node)

    def forget(self, ino: int, count: int) -> None:
        self.refs.forget(ino, count)

    # --- attributes ----------------------------------------------------------------------

    async def setattr(
        self,
        ino: int,
        *,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Inode:
        node = await self.inodes.node(ino)
        if size is not None:
            if not node.is_file:
                raise FsError(errno.EISDIR if node.is_dir else errno.EINVAL)
            await self.truncate(node, size)
        return self.attributes.change(
            node,
            mode=mode,
            uid=uid,
            gid=gid,
            atime_ns=atime_ns,
            mtime_ns=mtime_ns,
            ctime_ns=ctime_ns,
        )

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        await self.attributes.setxattr(ino, name, value)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        return await self.attributes.getxattr(ino, name)

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self.attributes.removexattr(ino, name)

    # --- open files and their data -------------------------------------------------------

    async def open(self, ino: int, flags: int) -> Inode:
        """Open a file (not a directory); ``O_TRUNC`` empties it."""
        node = await self.inodes.node(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self.refs.opened(node)
        if flags & os.O_TRUNC and node.size:
            await self.truncate(node, 0)
        return node

    async def create_open(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        """Create a file and open it (open(2) with ``O_CREAT``)."""
        node = await self.namespace.create(parent, name, mode, uid, gid)
        self.refs.opened(node)
        return node

    async def release(self, ino: int) -> None:
        """One open of ``ino`` ended: after the last, its data is written back (without
        waiting), and an unlinked file is destroyed once the kernel forgets it too."""
        node = self.inodes.nodes.get(ino)
        if node is None:
            return
        try:
            if self.refs.closed(node) and node.nlink:
                await self.flush_file(node, wait=False)
        finally:
            self.refs.forget(ino, 0)

    async def read(self, node: Inode, off: int, size: int) -> bytes:
        return await self.cache.read(node, off, size)

    async def write(self, node: Inode, off: int, buf: bytes) -> int:
        n = await self.data.write(node, off, buf)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return n

    async def truncate(self, node: Inode, size: int) -> None:
        await self.data.truncate(node, size)
        node.mtime_ns = node.ctime_ns = time.time_ns()

    async def fallocate(self, node: Inode, mode: int, off: int, length: int) -> None:
        await self.data.fallocate(node, mode, off, length)
        node.ctime_ns = time.time_ns()

    async def flush_file(self, node: Inode, wait: bool = True) -> None:
        await self.data.flush(node, wait)

    # --- commits -------------------------------------------------------------------------

    async def write_back(self) -> None:
        """Write back the data of every file that holds some in memory."""
        for n in [n for n in self.inodes.nodes.values() if n.dirty_blocks or n.flushing]:
            await self.flush_file(n)

    async def sync(self, node: Inode | None = None) -> None:
        """Make ``node``'s data (or, with None, everything) and all metadata durable."""
        if node is not None:
            await self.flush_file(node)
        else:
            await self.write_back()
        await self.commit()

    async def fsync(self, node: Inode | None = None) -> None:
        """fsync(2) and syncfs(2): :meth:`sync`, then (anchor-on-fsync) wait until the
        commit is anchored at the KMS."""
        await self.sync(node)
        await self.freshness.anchored_through(self.metalog.seq)

    async def fsyncdir(self) -> None:
        """fsync(2) of a directory: commit the metadata; anchored like :meth:`fsync`."""
        await self.commit()
        await self.freshness.anchored_through(self.metalog.seq)

    @property
    def dirty(self) -> bool:
        return self.commits.pending or bool(self.data.dirty_count)

    async def commit(self) -> None:
        await self.commits.commit()

    async def deletions_done(self) -> None:
        """Wait until superseded objects of past commits are deleted (before unmounting)."""
        await self.commits.deletions_done()

    # --- repair (sealfs check --repair) ---------------------------------------------------

    def has_inode(self, ino: int) -> bool:
        """Whether ``ino`` is in the table or was created since the last commit."""
        return ino in self.inodes.table or ino in self.inodes.nodes

    def heal_record(self, ino: int, blob: bytes) -> Inode:
        """Install the record of ``ino`` found in another object: ``blob`` must open under
        the identity of the inode's current record, which it then replaces."""
        node = self.objects.open_record(ino, self.inodes.table[ino], blob)
        self.inodes.nodes[ino] = node
        self.inodes.mark(node)
        return node

    def drop_inode(self, ino: int) -> None:
        """Remove ``ino`` from the table at the next commit without reading its record (its
        record is lost; its blocks become orphans)."""
        self.inodes.drop(ino)

    def renumber_past_known(self) -> None:
        """Allocate new inodes above every number the table or memory knows (a damaged
        counter must not hand out a number in use)."""
        known = [*self.inodes.table, *self.inodes.nodes]
        if self.inodes.table:
            self.inodes.next_ino = max(self.inodes.next_ino, max(known) + 1)

    # --- statistics ----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Sizes of everything the daemon keeps in memory (logged on SIGUSR1)."""
        inodes, data = self.inodes, self.data
        return {
            "nodes": len(inodes.nodes),
            "table": len(inodes.table),
            "dirty_nodes": len(inodes.dirty),
            "dirty_blocks": data.dirty_count,
            "clean_blocks": self.cache.clean_blocks,
            "superseded": len(data.superseded),
            "doomed": len(inodes.doomed),
            "carried": len(self.store.carried),
            "carried_bytes": self.store.carried_bytes,
            "journal_bytes": self.metalog.journal_length,
            "seq": self.metalog.seq,
        }

    def statfs(self) -> os.statvfs_result:
        return self.store.statvfs()
