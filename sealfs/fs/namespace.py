"""Names: lookup, create, link, unlink and rename, with POSIX's rules.

Every operation checks all it needs first and then changes the directories and inodes without
an ``await`` in between, so it is atomic on the trio thread (docs/concurrency.md); the changed
inodes go into the next commit through :meth:`InodeTable.mark`.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator

from sealfs.fs.attributes import XATTR_RECORD_MAX
from sealfs.fs.errors import FsError
from sealfs.fs.nodes import InodeTable
from sealfs.fs.references import References
from sealfs.sealed.codec import RECORD_OBJECT_MAX
from sealfs.sealed.inode import ENTRY_OVERHEAD, ROOT_INO, Inode

NAME_MAX = 255
# Writers stay inside what readers accept (docs/format.md, "Size limits"): a directory's
# entries take at most its record but the xattrs' share and 1 MiB (attributes).
DIR_ENTRIES_MAX = RECORD_OBJECT_MAX - XATTR_RECORD_MAX - (1 << 20)


class Namespace:
    """The directory tree of one volume."""

    def __init__(self, nodes: InodeTable, refs: References) -> None:
        self.nodes = nodes
        self.refs = refs

    async def _dir(self, ino: int) -> Inode:
        node = await self.nodes.node(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not name or b"/" in name or name in (b".", b".."):
            raise FsError(errno.EINVAL)

    async def lookup(self, parent: int, name: bytes) -> Inode:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        pnode = await self._dir(parent)
        if name == b".":
            return pnode
        if name == b"..":
            return await self.nodes.node(pnode.parent or ROOT_INO)
        ino = pnode.entries.get(name)  # type: ignore[union-attr]
        if ino is None:
            raise FsError(errno.ENOENT)
        return await self.nodes.node(ino, (parent, name))

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
        self._check_name(name)
        pnode = await self._dir(parent)
        assert pnode.entries is not None
        if name in pnode.entries:
            raise FsError(errno.EEXIST)
        if pnode.nlink == 0:
            raise FsError(errno.ENOENT)
        _check_room(pnode, name)
        node = self.nodes.allocate(mode, uid, gid, pnode, name, rdev)
        if node.is_symlink:
            node.target = target
            node.size = len(target)
        pnode.entries.add(name, node.ino)
        if node.is_dir:
            pnode.nlink += 1
        pnode.mtime_ns = pnode.ctime_ns = node.ctime_ns
        self.nodes.mark(pnode)
        return node

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        self._check_name(new_name)
        node = await self.nodes.node(ino)
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
        node.ctime_ns = pnode.mtime_ns = pnode.ctime_ns = time.time_ns()
        self.nodes.mark(node)
        self.nodes.mark(pnode)
        return node

    async def unlink(self, parent: int, name: bytes, want_dir: bool) -> None:
        pnode = await self._dir(parent)
        assert pnode.entries is not None
        ino = pnode.entries.get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        node = await self.nodes.node(ino, (parent, name))
        _check_removable(node, want_dir)
        pnode.entries.remove(name)
        self._drop_link(pnode, node)

    def _drop_link(self, pnode: Inode, node: Inode) -> None:
        now = time.time_ns()
        if node.is_dir:
            node.nlink = 0
            pnode.nlink -= 1
        else:
            node.nlink -= 1
        node.ctime_ns = pnode.mtime_ns = pnode.ctime_ns = now
        self.nodes.mark(node)
        self.nodes.mark(pnode)
        self.refs.release_if_unused(node)

    async def rename(
        self,
        old_parent: int,
        old_name: bytes,
        new_parent: int,
        new_name: bytes,
        noreplace: bool = False,
        exchange: bool = False,
    ) -> None:
        self._check_name(new_name)
        src = await self._dir(old_parent)
        dst = await self._dir(new_parent)
        assert src.entries is not None and dst.entries is not None
        ino = src.entries.get(old_name)
        if ino is None:
            raise FsError(errno.ENOENT)
        node = await self.nodes.node(ino, (old_parent, old_name))
        target_ino = dst.entries.get(new_name)
        if exchange:
            if target_ino is None:
                raise FsError(errno.ENOENT)
            other = await self.nodes.node(target_ino, (new_parent, new_name))
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
            target = await self.nodes.node(target_ino, (new_parent, new_name))
            _check_removable(target, node.is_dir)
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
        now = time.time_ns()
        if node.is_dir and src is not dst:
            node.parent = dst.ino
            src.nlink -= 1
            dst.nlink += 1
        node.name_hint = (dst.ino, name)
        node.ctime_ns = src.mtime_ns = src.ctime_ns = dst.mtime_ns = dst.ctime_ns = now
        self.nodes.mark(node)
        self.nodes.mark(src)
        self.nodes.mark(dst)

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
            cur = await self.nodes.node(cur.parent or ROOT_INO)

    def entries_after(self, node: Inode, cookie: int) -> Iterator[tuple[int, bytes, int]]:
        assert node.entries is not None
        return node.entries.after(cookie)


def _check_removable(node: Inode, as_dir: bool) -> None:
    """Whether ``node`` may lose its name as a directory (rmdir, or replaced by a directory)
    or as anything else: ENOTDIR, ENOTEMPTY or EISDIR if not."""
    if as_dir:
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if node.entries:
            raise FsError(errno.ENOTEMPTY)
    elif node.is_dir:
        raise FsError(errno.EISDIR)


def _check_room(directory: Inode, name: bytes) -> None:
    """ENOSPC if one more entry would make the directory's record larger than readers
    accept."""
    assert directory.entries is not None
    if directory.entries.record_bytes + ENTRY_OVERHEAD + len(name) > DIR_ENTRIES_MAX:
        raise FsError(errno.ENOSPC)
