"""The inode table: which record is current for each inode, and the inodes held in memory.

``table`` maps every inode number to the object id of its current sealed record (what the
metadata log commits); ``nodes`` holds the inodes loaded or created since, and ``dirty`` the
numbers the next commit must write (or, for an inode gone from ``nodes``, remove). Runs on the
trio thread only (docs/concurrency.md); records are read and opened in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import stat
import time
from collections.abc import Callable

from sealfs.crypto import AuthError
from sealfs.fs.errors import Damaged, FsError
from sealfs.fs.workers import Workers
from sealfs.sealed.codec import MAX_INODES, RECORD_OBJECT_MAX
from sealfs.sealed.inode import ROOT_INO, Inode, RecordError
from sealfs.sealed.objects import SealedObjects
from sealfs.store import DamagedFile, MissingObject, ObjectStore

log = logging.getLogger("sealfs.fs")


class InodeTable:
    """The table, the node cache and the set of inodes the next commit writes."""

    def __init__(
        self, store: ObjectStore, objects: SealedObjects, workers: Workers, cache_size: int
    ) -> None:
        self.store = store
        self.objects = objects
        self.workers = workers
        self.cache_size = cache_size  # clean, unreferenced inodes kept in memory
        self.table: dict[int, int] = {}
        self.next_ino = ROOT_INO + 1
        self.nodes: dict[int, Inode] = {}
        self.dirty: set[int] = set()
        self.doomed: list[int] = []  # object ids of destroyed inodes' blocks
        self.on_damage: Callable[[Damaged], None] = lambda d: log.error("%s", d)

    def install(self, table: dict[int, int], next_ino: int) -> None:
        """Start from a replayed (or repaired) state of the metadata log."""
        self.table = table
        self.next_ino = next_ino

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

    def child_path(self, parent: int, name: bytes) -> str:
        base = self.path_of(parent).rstrip("/")
        return f"{base}/{name.decode('utf-8', 'backslashreplace')}"

    # --- loading -------------------------------------------------------------------------

    async def node(self, ino: int, hint: tuple[int, bytes] | None = None) -> Inode:
        """The inode ``ino`` (loaded on first use); ``hint`` is the (parent, name) it was
        reached by, for messages. Raises FsError(ENOENT) or Damaged."""
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
            loaded = await self.workers.run(load)
        except (AuthError, RecordError, MissingObject, DamagedFile) as e:
            path = self.child_path(*hint) if hint else self.path_of(ino)
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
        wanted = [
            (ino, self.table[ino]) for ino in inos if ino not in self.nodes and ino in self.table
        ]
        if not wanted:
            return

        def load(batch: list[tuple[int, int]]) -> list[Inode]:
            out = []
            for ino, oid in batch:
                with contextlib.suppress(AuthError, RecordError, MissingObject, DamagedFile):
                    out.append(
                        self.objects.open_record(ino, oid, self.store.get(oid, RECORD_OBJECT_MAX))
                    )
            return out

        for node in await self.workers.halves(load, wanted):
            if node.ino not in self.nodes and self.table.get(node.ino) is not None:
                self.nodes[node.ino] = node

    # --- changes -------------------------------------------------------------------------

    def mark(self, node: Inode) -> None:
        """Include ``node`` in the next commit."""
        node.meta_dirty = True
        self.dirty.add(node.ino)

    def drop(self, ino: int) -> None:
        """Remove ``ino`` from the table at the next commit without reading its record (for
        repair of an unreadable record; its blocks become orphans)."""
        self.nodes.pop(ino, None)
        self.dirty.add(ino)

    def allocate(
        self, mode: int, uid: int, gid: int, parent: Inode, name: bytes, rdev: int = 0
    ) -> Inode:
        """A new inode named ``name`` in ``parent`` (set-group-ID directories pass on their
        group); ENOSPC once a checkpoint could not hold one more."""
        if len(self.table) + len(self.dirty) >= MAX_INODES - 1:
            raise FsError(errno.ENOSPC)  # a checkpoint holds at most MAX_INODES
        ino = self.next_ino
        self.next_ino += 1
        now = time.time_ns()
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        node = Inode(
            ino,
            mode,
            uid,
            gid,
            2 if stat.S_ISDIR(mode) else 1,
            0,
            now,
            now,
            now,
            rdev,
            parent.ino if stat.S_ISDIR(mode) else 0,
        )
        node.name_hint = (parent.ino, name)
        self.nodes[ino] = node
        self.mark(node)
        return node

    def evict_if_clean(self, node: Inode) -> None:
        """Drop an unreferenced node from memory once the cache is full, unless it holds
        changes or data in use."""
        if (
            not node.meta_dirty
            and not node.dirty_blocks
            and len(self.nodes) > self.cache_size
            and (node.lock is None or not node.lock.locked())
        ):
            del self.nodes[node.ino]

    def destroy(self, node: Inode) -> None:
        """Forget an unlinked, unreferenced inode: the next commit removes it from the table
        and deletes its blocks."""
        self.doomed.extend(node.blocks.values())
        node.blocks.clear()
        self.nodes.pop(node.ino, None)
        self.mark(node)
