"""The filesystem core: inodes, directories, block maps, caches and crash-safe commits.

Concurrency contract (docs/concurrency.md): every method runs on the trio thread, so the
in-memory state (inode table, nodes, caches) needs no locks. Blocking work (sealing, opening,
file I/O) goes to worker threads through :attr:`Filesystem.io_limiter` and only ever touches
immutable inputs and the store. A node's data (read/write/truncate/flush) is serialised by its
own ``trio.Lock``; metadata changes are synchronous and therefore atomic. Commits are
serialised by ``_commit_lock``; whatever changes while a commit is in flight goes into the next.
The KMS is never called with ``_commit_lock`` held: the freshness anchor advances from its own
task (:meth:`Filesystem.anchor_loop`), and checkpoints need no KMS (they keep the heads back to
the last anchored commit), so a KMS out of reach never stalls a commit.

Errors: POSIX failures raise :class:`FsError` (an errno); authentication failures raise
:class:`Damaged` naming the plaintext path and the backing object; storage failures raise
:class:`sealfs.errors.StorageError` (with ``errno``), never Damaged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import trio

from sealfs.crypto import AuthError, Secret
from sealfs.errors import KmsError, StorageError
from sealfs.fs.data import Damaged, DataPath, FsError
from sealfs.fs.lifecycle import volume_objects
from sealfs.fs.metalog import MetaLog, MetaState
from sealfs.sealed.codec import MAX_INODES, RECORD_OBJECT_MAX, Commit, new_object_id
from sealfs.sealed.inode import ENTRY_OVERHEAD, ROOT_INO, XATTR_OVERHEAD, Inode, RecordError
from sealfs.store import HEADER_NAME, JOURNAL_MAX, DamagedFile, MissingObject, ObjectStore
from sealfs.volume.anchor import KmsAnchor, RollbackError, verify_fresh
from sealfs.volume.header import Header

log = logging.getLogger("sealfs.fs")
T = TypeVar("T")
U = TypeVar("U")

NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
# Writers stay inside what readers accept (docs/format.md, "Size limits"): an inode's xattrs
# take at most 16 MiB of its record, a directory's entries the rest but 1 MiB (attributes).
XATTR_RECORD_MAX = 16 << 20
DIR_ENTRIES_MAX = RECORD_OBJECT_MAX - XATTR_RECORD_MAX - (1 << 20)
FALLOC_FL_KEEP_SIZE = 0x01


@dataclass
class Limits:
    """Memory and timing knobs (defaults keep the daemon well under 200 MiB)."""

    dirty_blocks: int = 256  # partly written blocks buffered before a forced flush
    inflight_batches: int = 4  # write-back jobs (up to one FUSE write each) in flight
    clean_cache_bytes: int = 64 << 20
    readahead: int = 8 << 20  # sequential reads: bytes loaded ahead of the reader
    node_cache: int = 20000  # clean, unreferenced inodes kept in memory
    commit_interval: float = 5.0
    anchor_interval: float = 30.0  # seconds between freshness-anchor advances at the KMS
    io_threads: int = 4
    # A commit writes a checkpoint once the journal is longer than checkpoint_min_journal
    # (and 4x the checkpoint) and either carried_in_memory bytes of live carried objects are
    # held or the journal is longer than journal_max (see _checkpoint_due).
    checkpoint_min_journal: int = 4 << 20
    carried_in_memory: int = 8 << 20
    journal_max: int = 32 << 20
    carried_record_max: int = 16 << 10  # sealed records up to this size ride in the journal
    carried_blocks: int = 512 << 10  # bytes of fsync'ed blocks one commit may carry


def _clamp_time(ns: int) -> int:
    """Times are stored as signed 64-bit nanoseconds (years 1677-2262); like ext4 with its own
    range, clamp what lies outside instead of failing later at commit."""
    return max(-(1 << 63), min(ns, (1 << 63) - 1))


def _now() -> int:
    return time.time_ns()


class Filesystem:
    """One mounted (or checked) volume. Create with :meth:`open`, finish with :meth:`close`."""

    def __init__(self, store: ObjectStore, header: Header, master: Secret,
                 limits: Limits | None = None) -> None:
        self.store = store
        self.header = header
        self.objects = volume_objects(header, master)
        self.vid = header.volume_id
        self.block_size = header.block_size
        self.limits = limits or Limits()
        self.io_limiter = trio.CapacityLimiter(self.limits.io_threads)
        self.metalog = MetaLog(store, self.objects)
        self.table: dict[int, int] = {}
        self.next_ino = ROOT_INO + 1
        self.nodes: dict[int, Inode] = {}
        self._dirty_nodes: set[int] = set()
        self._doomed: list[int] = []  # object ids of destroyed inodes
        self._commit_lock = trio.Lock()
        self._deleting: set[trio.Event] = set()  # background deletions of superseded objects
        self.state: MetaState | None = None
        self.on_damage: Callable[[Damaged], None] = lambda d: log.error("%s", d)
        self.anchor: KmsAnchor | None = None
        self.data = DataPath(store, self.objects, dirty_limit=self.limits.dirty_blocks,
                             clean_bytes=self.limits.clean_cache_bytes,
                             inflight_batches=self.limits.inflight_batches,
                             readahead=self.limits.readahead,
                             carry_max=self.limits.carried_blocks, io=self._io,
                             io_halves=self._io_halves, mark=self.mark,
                             path_of=self.path_of, on_damage=lambda d: self.on_damage(d))

    # --- life cycle ----------------------------------------------------------------------

    async def load(self, writable: bool = True, allow_rollback: bool = False) -> MetaState:
        """Verify and replay the metadata; with an anchor, refuse a stale or forked disk
        (unless ``allow_rollback``, which is logged) and advance the anchor to this disk."""
        state = await self._io(self.metalog.load)
        self.metalog.anchorable = self.anchor is not None or self.header.kms_slot() is not None
        for note in state.notes:
            log.warning("recovery: %s", note)
        overridden = None
        if self.anchor is not None:
            anchored = await self._io(self.anchor.fetch)
            try:
                verify_fresh(state.seq, state.heads, anchored)
            except RollbackError as e:
                if not allow_rollback or not writable:
                    raise
                log.warning("OVERRIDE: mounting despite a failed freshness check (%s)", e)
                overridden = anchored[0]
        if writable:
            if self.header.format_version == 1:  # before the first format-2 object
                self.header.upgrade_format_1(self.objects.keys)
                await self._io(self.store.replace_file, HEADER_NAME, self.header.to_bytes())
            await self._io(self.metalog.open_for_append, state)
            if overridden is not None:
                await self._io(self.metalog.skip_to, state.table, state.next_ino,
                               max(overridden, state.seq) + 1)
            if self.anchor is not None:
                await trio.to_thread.run_sync(self._anchor_root)
        self.table = state.table
        self.next_ino = state.next_ino
        self.state = state
        return state

    async def close(self) -> None:
        """Write everything back, commit, and anchor the final state (clean unmount)."""
        await self.sync()
        await self._advance_anchor()
        self.metalog.close()

    def _anchor_root(self) -> None:
        """Anchor the last durable commit (one snapshot of the root, never a number with
        another commit's head); its older heads need not be kept after that. Runs in a
        thread of its own, not an I/O thread: a KMS call can take the whole client deadline."""
        assert self.anchor is not None
        seq, head = self.metalog.root
        self.anchor.advance(seq, head)
        self.metalog.anchored(seq)

    async def _advance_anchor(self) -> None:
        """Anchor the last durable commit at the KMS; a failure is logged (the heads since
        the last anchored commit are kept meanwhile, so nothing depends on it succeeding)."""
        if self.anchor is None:
            return
        try:
            await trio.to_thread.run_sync(self._anchor_root)
        except KmsError as e:
            log.error("could not advance the freshness anchor: %s", e)
        except RollbackError as e:
            log.error("the KMS refused to advance the freshness anchor: %s", e)

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.io_limiter)

    async def _io_halves(self, fn: Callable[[list[U]], list[T]], items: list[U]) -> list[T]:
        """``fn`` over two halves of ``items`` in two worker threads (file system calls and
        sealing overlap); results in order, and the first error raised as itself."""
        if len(items) < 8:
            return await self._io(fn, items) if items else []
        half = len(items) // 2
        parts: list[list[T]] = [[], []]
        errors: list[Exception] = []

        async def run(i: int, part: list[U]) -> None:
            try:
                parts[i] = await self._io(fn, part)
            except Exception as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, 0, items[:half])
            nursery.start_soon(run, 1, items[half:])
        if errors:
            raise errors[0]
        return parts[0] + parts[1]

    # --- paths (for messages only) -------------------------------------------------------

    def path_of(self, ino: int) -> str:
        parts: list[bytes] = []
        seen = 0
        while ino != ROOT_INO and seen < 4096:
            node = self.nodes.get(ino)
            if node is None or node.name_hint is None:
                parts.append(f"<inode {ino}>".encode())
                break
            ino, name = node.name_hint
            parts.append(name)
            seen += 1
        return "/" + "/".join(p.decode("utf-8", "backslashreplace") for p in reversed(parts))

    def _child_path(self, parent: int, name: bytes) -> str:
        base = self.path_of(parent).rstrip("/")
        return f"{base}/{name.decode('utf-8', 'backslashreplace')}"

    # --- inode access --------------------------------------------------------------------

    async def node(self, ino: int, hint: tuple[int, bytes] | None = None) -> Inode:
        node = self.nodes.get(ino)
        if node is not None:
            if hint is not None:
                node.name_hint = hint
            return node
        oid = self.table.get(ino)
        if oid is None:
            raise FsError(errno.ENOENT)

        def load() -> Inode:
            return self.objects.open_record(ino, oid, self.store.get(oid, RECORD_OBJECT_MAX))

        try:
            loaded = await self._io(load)
        except (AuthError, RecordError, MissingObject, DamagedFile) as e:
            path = self._child_path(*hint) if hint else self.path_of(ino)
            reason = "missing" if isinstance(e, MissingObject) else str(e)
            damage = Damaged(path, "metadata", oid, reason)
            self.on_damage(damage)
            raise damage from None
        node = self.nodes.get(ino)  # another task may have loaded it meanwhile
        if node is None:
            node = self.nodes[ino] = loaded
        if hint is not None:
            node.name_hint = hint
        return node

    async def preload(self, inos: list[int]) -> None:
        """Load the records of many inodes (a directory listing's children) with one
        worker-thread hop per half, instead of one per inode. Failures are left for
        :meth:`node` to report."""
        wanted = [(ino, self.table[ino]) for ino in inos
                  if ino not in self.nodes and ino in self.table]
        if not wanted:
            return

        def load(batch: list[tuple[int, int]]) -> list[Inode]:
            out = []
            for ino, oid in batch:
                with contextlib.suppress(AuthError, RecordError, MissingObject, DamagedFile):
                    out.append(self.objects.open_record(
                        ino, oid, self.store.get(oid, RECORD_OBJECT_MAX)))
            return out

        for node in await self._io_halves(load, wanted):
            if node.ino not in self.nodes and self.table.get(node.ino) is not None:
                self.nodes[node.ino] = node

    def mark(self, node: Inode) -> None:
        """Include ``node`` in the next commit."""
        node.meta_dirty = True
        self._dirty_nodes.add(node.ino)

    def drop_inode(self, ino: int) -> None:
        """Remove ``ino`` from the table at the next commit without reading its record (for
        repair of an unreadable record; its blocks become orphans)."""
        self.nodes.pop(ino, None)
        self._dirty_nodes.add(ino)

    def _new_node(self, mode: int, uid: int, gid: int, parent: Inode, name: bytes,
                  rdev: int = 0) -> Inode:
        if len(self.table) + len(self._dirty_nodes) >= MAX_INODES - 1:
            raise FsError(errno.ENOSPC)  # a checkpoint holds at most MAX_INODES
        ino = self.next_ino
        self.next_ino += 1
        now = _now()
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        node = Inode(ino, mode, uid, gid, 2 if stat.S_ISDIR(mode) else 1, 0, now, now, now,
                     rdev, parent.ino if stat.S_ISDIR(mode) else 0)
        node.name_hint = (parent.ino, name)
        self.nodes[ino] = node
        self.mark(node)
        return node

    async def _dir(self, ino: int) -> Inode:
        node = await self.node(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not name or b"/" in name or name in (b".", b".."):
            raise FsError(errno.EINVAL)

    # --- lookups and the kernel's reference counts ----------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Inode:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        pnode = await self._dir(parent)
        if name == b".":
            return pnode
        if name == b"..":
            return await self.node(pnode.parent or ROOT_INO)
        ino = pnode.entries.get(name)  # type: ignore[union-attr]
        if ino is None:
            raise FsError(errno.ENOENT)
        return await self.node(ino, (parent, name))

    def remember(self, node: Inode) -> None:
        """The kernel now holds one more reference (a lookup reply)."""
        node.lookups += 1

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_release(node)

    def _maybe_release(self, node: Inode) -> None:
        """Destroy an unlinked inode nobody uses, or drop a clean unused one from memory."""
        if node.lookups or node.opens or node.ino == ROOT_INO:
            return
        if node.nlink == 0:
            self._destroy(node)
        elif (not node.meta_dirty and not node.dirty_blocks
              and len(self.nodes) > self.limits.node_cache
              and (node.lock is None or not node.lock.locked())):
            del self.nodes[node.ino]

    def _destroy(self, node: Inode) -> None:
        self._doomed.extend(node.blocks.values())
        self.data.drop(node)
        node.blocks.clear()
        self.nodes.pop(node.ino, None)
        self.mark(node)  # so the commit drops it from the table

    # --- attributes ----------------------------------------------------------------------

    async def setattr(self, ino: int, *, size: int | None = None, mode: int | None = None,
                      uid: int | None = None, gid: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      ctime_ns: int | None = None) -> Inode:
        node = await self.node(ino)
        if size is not None:
            if not node.is_file:
                raise FsError(errno.EISDIR if node.is_dir else errno.EINVAL)
            await self.truncate(node, size)
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        if atime_ns is not None:
            node.atime_ns = _clamp_time(atime_ns)
        if mtime_ns is not None:
            node.mtime_ns = _clamp_time(mtime_ns)
        node.ctime_ns = _clamp_time(ctime_ns) if ctime_ns is not None else _now()
        self.mark(node)
        return node

    # --- namespace -----------------------------------------------------------------------

    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                     rdev: int = 0, target: bytes = b"") -> Inode:
        self._check_name(name)
        pnode = await self._dir(parent)
        assert pnode.entries is not None
        if name in pnode.entries:
            raise FsError(errno.EEXIST)
        if pnode.nlink == 0:
            raise FsError(errno.ENOENT)
        _check_room(pnode, name)
        node = self._new_node(mode, uid, gid, pnode, name, rdev)
        if node.is_symlink:
            node.target = target
            node.size = len(target)
        pnode.entries.add(name, node.ino)
        if node.is_dir:
            pnode.nlink += 1
        pnode.mtime_ns = pnode.ctime_ns = node.ctime_ns
        self.mark(pnode)
        return node

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        self._check_name(new_name)
        node = await self.node(ino)
        pnode = await self._dir(new_parent)
        assert pnode.entries is not None
        if node.is_dir:
            raise FsError(errno.EPERM)
        if new_name in pnode.entries:
            raise FsError(errno.EEXIST)
        if node.nlink == 0:
            raise FsError(errno.ENOENT)
        _check_room(pnode, new_name)
        pnode.entries.add(new_name, ino)
        node.nlink += 1
        node.ctime_ns = pnode.mtime_ns = pnode.ctime_ns = _now()
        self.mark(node)
        self.mark(pnode)
        return node

    async def unlink(self, parent: int, name: bytes, want_dir: bool) -> None:
        pnode = await self._dir(parent)
        assert pnode.entries is not None
        ino = pnode.entries.get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        node = await self.node(ino, (parent, name))
        if want_dir:
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if node.entries:
                raise FsError(errno.ENOTEMPTY)
        elif node.is_dir:
            raise FsError(errno.EISDIR)
        pnode.entries.remove(name)
        self._drop_link(pnode, node)

    def _drop_link(self, pnode: Inode, node: Inode) -> None:
        now = _now()
        if node.is_dir:
            node.nlink = 0
            pnode.nlink -= 1
        else:
            node.nlink -= 1
        node.ctime_ns = pnode.mtime_ns = pnode.ctime_ns = now
        self.mark(node)
        self.mark(pnode)
        self._maybe_release(node)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     noreplace: bool = False, exchange: bool = False) -> None:
        self._check_name(new_name)
        src = await self._dir(old_parent)
        dst = await self._dir(new_parent)
        assert src.entries is not None and dst.entries is not None
        ino = src.entries.get(old_name)
        if ino is None:
            raise FsError(errno.ENOENT)
        node = await self.node(ino, (old_parent, old_name))
        target_ino = dst.entries.get(new_name)
        if exchange:
            if target_ino is None:
                raise FsError(errno.ENOENT)
            other = await self.node(target_ino, (new_parent, new_name))
            await self._check_not_ancestor(node, dst)
            await self._check_not_ancestor(other, src)
            src.entries.add(old_name, target_ino)
            dst.entries.add(new_name, ino)
            self._reparent(node, src, dst, new_name)
            self._reparent(other, dst, src, old_name)
            return
        if target_ino is not None:
            if noreplace:
                raise FsError(errno.EEXIST)
            if target_ino == ino:
                return
            target = await self.node(target_ino, (new_parent, new_name))
            if node.is_dir:
                if not target.is_dir:
                    raise FsError(errno.ENOTDIR)
                if target.entries:
                    raise FsError(errno.ENOTEMPTY)
            elif target.is_dir:
                raise FsError(errno.EISDIR)
        if node.is_dir:
            await self._check_not_ancestor(node, dst)
        if target_ino is None:
            _check_room(dst, new_name)
        if target_ino is not None:
            dst.entries.remove(new_name)
            self._drop_link(dst, target)
        src.entries.remove(old_name)
        dst.entries.add(new_name, ino)
        self._reparent(node, src, dst, new_name)

    def _reparent(self, node: Inode, src: Inode, dst: Inode, name: bytes) -> None:
        now = _now()
        if node.is_dir and src is not dst:
            node.parent = dst.ino
            src.nlink -= 1
            dst.nlink += 1
        node.name_hint = (dst.ino, name)
        node.ctime_ns = src.mtime_ns = src.ctime_ns = dst.mtime_ns = dst.ctime_ns = now
        self.mark(node)
        self.mark(src)
        self.mark(dst)

    async def _check_not_ancestor(self, node: Inode, dst: Inode) -> None:
        """Refuse to move a directory into its own subtree."""
        if not node.is_dir:
            return
        cur = dst
        for _ in range(65536):
            if cur.ino == node.ino:
                raise FsError(errno.EINVAL)
            if cur.ino == ROOT_INO:
                return
            cur = await self.node(cur.parent or ROOT_INO)

    def entries_after(self, node: Inode, cookie: int) -> Iterator[tuple[int, bytes, int]]:
        assert node.entries is not None
        return node.entries.after(cookie)

    # --- xattrs --------------------------------------------------------------------------

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if len(name) > 255 or not name:
            raise FsError(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        node = await self.node(ino)
        total = sum(len(k) + 1 for k in node.xattrs) + len(name) + 1
        if total > XATTR_LIST_MAX:
            raise FsError(errno.ENOSPC)
        others = sum(XATTR_OVERHEAD + len(k) + len(v) for k, v in node.xattrs.items()
                     if k != name)
        if others + XATTR_OVERHEAD + len(name) + len(value) > XATTR_RECORD_MAX:
            raise FsError(errno.ENOSPC)
        node.xattrs[name] = bytes(value)
        node.ctime_ns = _now()
        self.mark(node)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        node = await self.node(ino)
        try:
            return node.xattrs[name]
        except KeyError:
            raise FsError(errno.ENODATA) from None

    async def removexattr(self, ino: int, name: bytes) -> None:
        node = await self.node(ino)
        if node.xattrs.pop(name, None) is None:
            raise FsError(errno.ENODATA)
        node.ctime_ns = _now()
        self.mark(node)

    # --- file data -----------------------------------------------------------------------

    async def read(self, node: Inode, off: int, size: int) -> bytes:
        return await self.data.read(node, off, size)

    async def write(self, node: Inode, off: int, buf: bytes) -> int:
        n = await self.data.write(node, off, buf)
        node.mtime_ns = node.ctime_ns = _now()
        return n

    async def truncate(self, node: Inode, size: int) -> None:
        await self.data.truncate(node, size)
        node.mtime_ns = node.ctime_ns = _now()

    async def fallocate(self, node: Inode, mode: int, off: int, length: int) -> None:
        await self.data.fallocate(node, mode, off, length)
        node.ctime_ns = _now()

    async def flush_file(self, node: Inode, wait: bool = True) -> None:
        await self.data.flush(node, wait)

    # --- commits -------------------------------------------------------------------------

    async def fsync(self, node: Inode | None = None) -> None:
        """Make ``node``'s data (or, with None, everything) and all metadata durable."""
        if node is not None:
            await self.flush_file(node)
        else:
            for n in [n for n in self.nodes.values() if n.dirty_blocks or n.flushing]:
                await self.flush_file(n)
        await self.commit()

    sync = fsync

    @property
    def dirty(self) -> bool:
        return bool(self._dirty_nodes or self.data.superseded or self._doomed
                    or self.data.dirty_count)

    async def commit(self) -> None:
        async with self._commit_lock:
            if not (self._dirty_nodes or self.data.superseded or self._doomed):
                return
            updates: dict[int, tuple[int, bytes]] = {}
            deletes: list[int] = []
            # Serialise first: if a record cannot be encoded, nothing has been taken yet.
            for ino in self._dirty_nodes:
                node = self.nodes.get(ino)
                if node is None or node.nlink == 0:
                    if ino in self.table:
                        deletes.append(ino)
                    continue
                updates[ino] = (new_object_id(), node.to_record())
            dirty, self._dirty_nodes = self._dirty_nodes, set()
            for ino in updates:
                self.nodes[ino].meta_dirty = False
            garbage = self.data.superseded + self._doomed
            self.data.superseded, self._doomed = [], []
            commit = Commit(self.metalog.seq + 1, self.next_ino,
                            {ino: oid for ino, (oid, _) in updates.items()}, deletes)
            sealed = [(oid, ino, rec) for ino, (oid, rec) in updates.items()]
            blocks = self.data.take_carried()
            limit = self.limits.carried_record_max

            def seal(batch: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes | None]]:
                """Seal records: small ones ride in the commit, large ones become files."""
                out: list[tuple[int, int, bytes | None]] = []
                for oid, ino, rec in batch:
                    blob = self.objects.seal_record(ino, oid, rec)
                    if len(blob) > limit:
                        self.store.put(oid, blob)
                        out.append((oid, ino, None))
                    else:
                        out.append((oid, ino, blob))
                return out

            def append(blobs: list[tuple[int, int, bytes | None]]) -> None:
                commit.carried = dict(blocks)
                commit.carried.update((oid, (ino, blob)) for oid, ino, blob in blobs if blob)
                self.store.sync(only_if_written=True)  # data and large records first
                self.metalog.append(commit)

            try:
                if len(sealed) < 8:  # the common fsync: one thread hop
                    await self._io(lambda: append(seal(sealed)))
                else:
                    await self._io(append, await self._io_halves(seal, sealed))
            except BaseException:
                for ino in dirty:  # nothing was committed: retry all of it next time
                    node = self.nodes.get(ino)
                    if node is not None:
                        node.meta_dirty = True
                self._dirty_nodes |= dirty
                self.data.superseded[:0] = garbage
                self.data.untake_carried(blocks)
                await trio.to_thread.run_sync(self._delete_all,
                                              [oid for oid, *_ in sealed])
                raise
            for ino in deletes:
                garbage.append(self.table.pop(ino))
            for ino, (oid, _) in updates.items():
                old = self.table.get(ino)
                if old is not None:
                    garbage.append(old)
                self.table[ino] = oid
            if self.data.nursery is not None:  # fsync need not wait for the clean-up
                done = trio.Event()
                self._deleting.add(done)
                self.data.nursery.start_soon(self._delete_later, garbage, done)
            else:
                await self._io_halves(self._delete_all, garbage)
            for ino in updates:
                node = self.nodes.get(ino)
                if node is not None:
                    self._maybe_release(node)
            if self._checkpoint_due():  # needs no KMS: it keeps the unanchored heads
                await self.deletions_done()  # none may race with writing carried records out
                await self._io(self.metalog.write_checkpoint, dict(self.table),
                               self.next_ino)

    def _checkpoint_due(self) -> bool:
        """Fold the journal into a checkpoint once it is long, relative to the checkpoint,
        and either its live carried objects (held in memory) or the journal itself (replayed
        at mount) have grown large. Superseded carried objects cost nothing: a journal of
        fsync'ed appends, whose carried tails replace each other, can grow to ``journal_max``."""
        limits, journal = self.limits, self.metalog.journal_length
        relative = min(4 * self.metalog.checkpoint_size, JOURNAL_MAX // 2)  # the reader's cap
        if journal <= max(limits.checkpoint_min_journal, relative):
            return False
        return self.store.carried_bytes > limits.carried_in_memory or \
            journal > limits.journal_max

    async def _delete_later(self, garbage: list[int], done: trio.Event) -> None:
        try:
            await self._io_halves(self._delete_all, garbage)
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

    async def commit_loop(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        """Write back and commit periodically, so a crash loses at most a few seconds; the
        anchor advances beside it (:meth:`anchor_loop`), so a slow KMS delays neither."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.anchor_loop)
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

    async def anchor_loop(self) -> None:
        """Advance the freshness anchor to the last durable commit every ``anchor_interval``
        seconds, outside the commit lock: commits go on while the KMS is slow or away."""
        while self.anchor is not None:
            await trio.sleep(self.limits.anchor_interval)
            await self._advance_anchor()

    # --- statistics ----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Sizes of everything the daemon keeps in memory (logged on SIGUSR1)."""
        return {"nodes": len(self.nodes), "table": len(self.table),
                "dirty_nodes": len(self._dirty_nodes), "dirty_blocks": self.data.dirty_count,
                "clean_blocks": len(self.data._clean), "superseded": len(self.data.superseded),
                "doomed": len(self._doomed), "carried": len(self.store.carried),
                "carried_bytes": self.store.carried_bytes,
                "journal_bytes": self.metalog.journal_length, "seq": self.metalog.seq}

    def statfs(self) -> os.statvfs_result:
        return self.store.statvfs()


def _check_room(directory: Inode, name: bytes) -> None:
    """ENOSPC if one more entry would make the directory's record larger than readers
    accept."""
    assert directory.entries is not None
    if directory.entries.record_bytes + ENTRY_OVERHEAD + len(name) > DIR_ENTRIES_MAX:
        raise FsError(errno.ENOSPC)

