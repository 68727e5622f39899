"""The filesystem core: inodes, directories, block maps, caches and crash-safe commits.

Concurrency contract (docs/concurrency.md): every method runs on the trio thread, so the
in-memory state (inode table, nodes, caches) needs no locks. Blocking work (sealing, opening,
file I/O) goes to worker threads through :attr:`Filesystem.io_limiter` and only ever touches
immutable inputs and the store. A node's data (read/write/truncate/flush) is serialised by its
own ``trio.Lock``; metadata changes are synchronous and therefore atomic. Commits are
serialised by ``_commit_lock``; whatever changes while a commit is in flight goes into the next.

Errors: POSIX failures raise :class:`FsError` (an errno); authentication failures raise
:class:`Damaged` naming the plaintext path and the backing object; storage failures raise
:class:`sealfs.errors.StorageError` (with ``errno``), never Damaged.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import trio

from sealfs.codec import (
    CodecError,
    Commit,
    block_ad,
    inode_ad,
    new_object_id,
    open_block,
    seal_block,
)
from sealfs.crypto import AuthError, Secret, VolumeKeys
from sealfs.errors import IntegrityError, StorageError
from sealfs.fs.inode import ROOT_INO, Inode, RecordError
from sealfs.fs.metalog import MetaLog, MetaState
from sealfs.store import MissingObject, ObjectStore
from sealfs.volume.header import Header

log = logging.getLogger("sealfs.fs")
T = TypeVar("T")

NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
FALLOC_FL_KEEP_SIZE = 0x01


class FsError(Exception):
    """A POSIX error for one request."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


class Damaged(IntegrityError):
    """An object failed verification or is missing; ``path`` is the plaintext path."""

    def __init__(self, path: str, what: str, oid: int | None, reason: str) -> None:
        where = f" (object {oid:016x})" if oid is not None else ""
        super().__init__(f"{what} of {path} failed verification{where}: {reason}")
        self.path = path
        self.oid = oid
        self.reason = reason


@dataclass
class Limits:
    """Memory and timing knobs (defaults keep the daemon well under 200 MiB)."""

    dirty_blocks: int = 256  # blocks buffered before writers wait for a flush
    clean_cache_bytes: int = 32 << 20
    node_cache: int = 20000  # clean, unreferenced inodes kept in memory
    commit_interval: float = 5.0
    io_threads: int = 4
    checkpoint_min_journal: int = 4 << 20


def _now() -> int:
    return time.time_ns()


class Filesystem:
    """One mounted (or checked) volume. Create with :meth:`open`, finish with :meth:`close`."""

    def __init__(self, store: ObjectStore, header: Header, master: Secret,
                 limits: Limits | None = None) -> None:
        self.store = store
        self.header = header
        self.keys = VolumeKeys(master, header.volume_id)
        self.vid = header.volume_id
        self.block_size = header.block_size
        self.compress = header.compression == "lz4"
        self.limits = limits or Limits()
        self.io_limiter = trio.CapacityLimiter(self.limits.io_threads)
        self.metalog = MetaLog(store, self.keys)
        self.table: dict[int, int] = {}
        self.next_ino = ROOT_INO + 1
        self.nodes: dict[int, Inode] = {}
        self._dirty_nodes: set[int] = set()
        self._dirty_block_count = 0
        self._superseded: list[int] = []  # object ids no longer referenced in memory
        self._doomed: list[int] = []  # object ids of destroyed inodes
        self._clean: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._clean_bytes = 0
        self._commit_lock = trio.Lock()
        self.state: MetaState | None = None
        self.on_damage: Callable[[Damaged], None] = lambda d: log.error("%s", d)

    # --- life cycle ----------------------------------------------------------------------

    async def load(self, writable: bool = True) -> MetaState:
        state = await self._io(self.metalog.load)
        for note in state.notes:
            log.warning("recovery: %s", note)
        if writable:
            await self._io(self.metalog.open_for_append, state)
        self.table = state.table
        self.next_ino = state.next_ino
        self.state = state
        return state

    async def close(self) -> None:
        """Write everything back and commit (clean unmount)."""
        await self.sync()
        self.metalog.close()

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.io_limiter)

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
        sealer = self.keys.inode(ino)
        ad = inode_ad(self.vid, ino, oid)

        def load() -> Inode:
            return Inode.from_record(ino, sealer.open(self.store.get(oid), ad))

        try:
            loaded = await self._io(load)
        except (AuthError, RecordError, MissingObject) as e:
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

    def _mark(self, node: Inode) -> None:
        node.meta_dirty = True
        self._dirty_nodes.add(node.ino)

    def _new_node(self, mode: int, uid: int, gid: int, parent: Inode, name: bytes,
                  rdev: int = 0) -> Inode:
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
        self._mark(node)
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
        self._dirty_block_count -= len(node.dirty_blocks)
        node.dirty_blocks.clear()
        for idx in node.blocks:
            self._drop_clean(node.ino, idx)
        node.blocks.clear()
        self.nodes.pop(node.ino, None)
        self._mark(node)  # so the commit drops it from the table

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
            node.atime_ns = atime_ns
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
        node.ctime_ns = ctime_ns if ctime_ns is not None else _now()
        self._mark(node)
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
        node = self._new_node(mode, uid, gid, pnode, name, rdev)
        if node.is_symlink:
            node.target = target
            node.size = len(target)
        pnode.entries.add(name, node.ino)
        if node.is_dir:
            pnode.nlink += 1
        pnode.mtime_ns = pnode.ctime_ns = node.ctime_ns
        self._mark(pnode)
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
        pnode.entries.add(new_name, ino)
        node.nlink += 1
        node.ctime_ns = pnode.mtime_ns = pnode.ctime_ns = _now()
        self._mark(node)
        self._mark(pnode)
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
        self._mark(node)
        self._mark(pnode)
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
        self._mark(node)
        self._mark(src)
        self._mark(dst)

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
        node.xattrs[name] = bytes(value)
        node.ctime_ns = _now()
        self._mark(node)

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
        self._mark(node)

    # --- file data -----------------------------------------------------------------------

    def data_lock(self, node: Inode) -> trio.Lock:
        if node.lock is None:
            node.lock = trio.Lock()
        return node.lock  # type: ignore[return-value]

    def _drop_clean(self, ino: int, idx: int) -> None:
        data = self._clean.pop((ino, idx), None)
        if data is not None:
            self._clean_bytes -= len(data)

    def _keep_clean(self, ino: int, idx: int, data: bytes) -> None:
        self._drop_clean(ino, idx)
        self._clean[(ino, idx)] = data
        self._clean_bytes += len(data)
        while self._clean_bytes > self.limits.clean_cache_bytes and self._clean:
            _, old = self._clean.popitem(last=False)
            self._clean_bytes -= len(old)

    async def _blocks(self, node: Inode, indexes: list[int]) -> dict[int, bytes]:
        """Current plaintext of the given blocks (dirty, cached or loaded; b"" for holes)."""
        out: dict[int, bytes] = {}
        missing: list[tuple[int, int]] = []
        for idx in indexes:
            buf = node.dirty_blocks.get(idx)
            if buf is not None:
                out[idx] = bytes(buf)
                continue
            cached = self._clean.get((node.ino, idx))
            if cached is not None:
                self._clean.move_to_end((node.ino, idx))
                out[idx] = cached
                continue
            oid = node.blocks.get(idx)
            if oid is None:
                out[idx] = b""
            else:
                missing.append((idx, oid))
        if missing:
            sealer, vid, ino, bs = self.keys.inode(node.ino), self.vid, node.ino, self.block_size

            def load() -> list[tuple[int, bytes | Exception]]:
                res: list[tuple[int, bytes | Exception]] = []
                for idx, oid in missing:
                    try:
                        res.append((idx, open_block(sealer, block_ad(vid, ino, idx, oid),
                                                    self.store.get(oid), bs)))
                    except (AuthError, CodecError, MissingObject) as e:
                        res.append((idx, e))
                return res

            for idx, result in await self._io(load):
                if isinstance(result, Exception):
                    reason = "missing" if isinstance(result, MissingObject) else str(result)
                    node.damaged.add(idx)
                    damage = Damaged(self.path_of(node.ino), f"block {idx}",
                                     node.blocks.get(idx), reason)
                    self.on_damage(damage)
                    raise damage
                node.damaged.discard(idx)
                out[idx] = result
                self._keep_clean(node.ino, idx, result)
        return out

    async def read(self, node: Inode, off: int, size: int) -> bytes:
        async with self.data_lock(node):
            end = min(off + size, node.size)
            if off >= end:
                return b""
            bs = self.block_size
            first, last = off // bs, (end - 1) // bs
            blocks = await self._blocks(node, list(range(first, last + 1)))
            parts = []
            for idx in range(first, last + 1):
                base = idx * bs
                lo, hi = max(off, base) - base, min(end, base + bs) - base
                chunk = blocks[idx][lo:hi]
                parts.append(chunk)
                if len(chunk) < hi - lo:
                    parts.append(bytes(hi - lo - len(chunk)))
            return b"".join(parts)

    async def write(self, node: Inode, off: int, buf: bytes) -> int:
        if not buf:
            return 0
        async with self.data_lock(node):
            bs = self.block_size
            end = off + len(buf)
            first, last = off // bs, (end - 1) // bs
            # Blocks only partly overwritten need their current content first.
            partial = [idx for idx in {first, last}
                       if idx not in node.dirty_blocks and idx in node.blocks
                       and not (off <= idx * bs and end >= min((idx + 1) * bs, node.size))]
            current = await self._blocks(node, partial) if partial else {}
            view = memoryview(buf)
            for idx in range(first, last + 1):
                block = node.dirty_blocks.get(idx)
                if block is None:
                    block = bytearray(current.get(idx, b""))
                    node.dirty_blocks[idx] = block
                    self._dirty_block_count += 1
                base = idx * bs
                lo, hi = max(off, base) - base, min(end, base + bs) - base
                if len(block) < lo:
                    block.extend(bytes(lo - len(block)))
                block[lo:hi] = view[base + lo - off:base + hi - off]
            node.size = max(node.size, end)
            node.mtime_ns = node.ctime_ns = _now()
            self._mark(node)
            full = [idx for idx in range(first, last + 1)
                    if len(node.dirty_blocks.get(idx, b"")) == bs]
            if self._dirty_block_count > self.limits.dirty_blocks:
                await self._flush_locked(node, list(node.dirty_blocks))
            elif full:
                await self._flush_locked(node, full)
        return len(buf)

    async def truncate(self, node: Inode, size: int) -> None:
        async with self.data_lock(node):
            bs = self.block_size
            if size < node.size:
                keep = -(-size // bs)  # blocks [0, keep) survive
                for idx in [i for i in node.blocks if i >= keep]:
                    self._superseded.append(node.blocks.pop(idx))
                    self._drop_clean(node.ino, idx)
                for idx in [i for i in node.dirty_blocks if i >= keep]:
                    del node.dirty_blocks[idx]
                    self._dirty_block_count -= 1
                cut = size % bs
                if cut:
                    idx = size // bs
                    block = (await self._blocks(node, [idx]))[idx]
                    if len(block) > cut:
                        if idx not in node.dirty_blocks:
                            self._dirty_block_count += 1
                        node.dirty_blocks[idx] = bytearray(block[:cut])
                        self._drop_clean(node.ino, idx)
            node.size = size
            node.mtime_ns = node.ctime_ns = _now()
            self._mark(node)

    async def fallocate(self, node: Inode, mode: int, off: int, length: int) -> None:
        """Mode 0 extends the size (holes read as zeros); KEEP_SIZE changes nothing visible.
        Space is not reserved on the backing store (see docs/format.md)."""
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise FsError(errno.EOPNOTSUPP)
        if off < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        if not node.is_file:
            raise FsError(errno.ENODEV)
        if not mode & FALLOC_FL_KEEP_SIZE and off + length > node.size:
            async with self.data_lock(node):
                node.size = off + length
                node.ctime_ns = _now()
                self._mark(node)

    async def flush_file(self, node: Inode) -> None:
        if node.dirty_blocks:
            async with self.data_lock(node):
                await self._flush_locked(node, list(node.dirty_blocks))

    async def _flush_locked(self, node: Inode, indexes: list[int]) -> None:
        """Seal and write the given dirty blocks (caller holds the node's data lock)."""
        jobs = [(idx, new_object_id(), bytes(node.dirty_blocks[idx])) for idx in indexes
                if idx in node.dirty_blocks]
        if not jobs:
            return
        sealer, vid, ino, compress = self.keys.inode(node.ino), self.vid, node.ino, self.compress

        def put(batch: list[tuple[int, int, bytes]]) -> None:
            for idx, oid, data in batch:
                self.store.put(oid, seal_block(sealer, block_ad(vid, ino, idx, oid), data,
                                               compress))

        try:
            if len(jobs) >= 4:  # two threads: AES-GCM and write(2) release the GIL
                half = len(jobs) // 2
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._io, put, jobs[:half])
                    nursery.start_soon(self._io, put, jobs[half:])
            else:
                await self._io(put, jobs)
        except BaseException as e:
            for _, oid, _ in jobs:  # leave no orphan behind; the blocks stay dirty
                await trio.to_thread.run_sync(self.store.delete, oid)
            if isinstance(e, BaseExceptionGroup):
                storage = e.subgroup(StorageError)
                if storage is not None:
                    raise storage.exceptions[0] from None
            raise
        for idx, oid, data in jobs:
            old = node.blocks.get(idx)
            if old is not None:
                self._superseded.append(old)
            node.blocks[idx] = oid
            del node.dirty_blocks[idx]
            self._dirty_block_count -= 1
            self._keep_clean(node.ino, idx, data)
        self._mark(node)

    # --- commits -------------------------------------------------------------------------

    async def fsync(self, node: Inode | None = None) -> None:
        """Make ``node``'s data (or, with None, everything) and all metadata durable."""
        if node is not None:
            await self.flush_file(node)
        else:
            for n in [n for n in self.nodes.values() if n.dirty_blocks]:
                await self.flush_file(n)
        await self.commit()

    sync = fsync

    @property
    def dirty(self) -> bool:
        return bool(self._dirty_nodes or self._superseded or self._doomed
                    or self._dirty_block_count)

    async def commit(self) -> None:
        async with self._commit_lock:
            if not (self._dirty_nodes or self._superseded or self._doomed):
                return
            updates: dict[int, tuple[int, bytes]] = {}
            deletes: list[int] = []
            dirty, self._dirty_nodes = self._dirty_nodes, set()
            for ino in dirty:
                node = self.nodes.get(ino)
                if node is None or node.nlink == 0:
                    if ino in self.table:
                        deletes.append(ino)
                    continue
                node.meta_dirty = False
                updates[ino] = (new_object_id(), node.to_record())
            garbage = self._superseded + self._doomed
            self._superseded, self._doomed = [], []
            commit = Commit(self.metalog.seq + 1, self.next_ino,
                            {ino: oid for ino, (oid, _) in updates.items()}, deletes)
            sealed = [(oid, self.keys.inode(ino), inode_ad(self.vid, ino, oid), rec)
                      for ino, (oid, rec) in updates.items()]

            def write() -> None:
                for oid, sealer, ad, rec in sealed:
                    self.store.put(oid, sealer.seal(rec, ad))
                self.store.sync()
                self.metalog.append(commit)

            try:
                await self._io(write)
            except BaseException:
                for ino in dirty:  # nothing was committed: retry all of it next time
                    node = self.nodes.get(ino)
                    if node is not None:
                        node.meta_dirty = True
                self._dirty_nodes |= dirty
                self._superseded[:0] = garbage
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
            await self._io(self._delete_all, garbage)
            for ino in updates:
                node = self.nodes.get(ino)
                if node is not None:
                    self._maybe_release(node)
            if self.metalog.journal_length > max(self.limits.checkpoint_min_journal,
                                                 4 * self.metalog.checkpoint_size):
                await self._io(self.metalog.write_checkpoint, dict(self.table),
                               self.next_ino)

    def _delete_all(self, oids: list[int]) -> None:
        for oid in oids:
            try:
                self.store.delete(oid)
            except StorageError as e:  # an orphan is harmless; check --repair removes it
                log.warning("could not delete superseded object: %s", e)

    async def commit_loop(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        """Write back and commit periodically, so a crash loses at most a few seconds."""
        task_status.started()
        while True:
            await trio.sleep(self.limits.commit_interval)
            if self.dirty:
                try:
                    await self.sync()
                except StorageError as e:
                    log.error("periodic commit failed, will retry: %s", e)

    # --- statistics ----------------------------------------------------------------------

    def statfs(self) -> os.statvfs_result:
        return self.store.statvfs()

    @property
    def root_commitment(self) -> tuple[int, bytes]:
        """(epoch, digest) of the last durable commit: what a freshness anchor stores."""
        return self.metalog.seq, self.metalog.head
