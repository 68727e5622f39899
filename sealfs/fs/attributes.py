"""Attributes and extended attributes of inodes (what stat, chmod, utimens and xattrs change)."""

from __future__ import annotations

import errno
import stat
import time

from sealfs.fs.errors import FsError
from sealfs.fs.nodes import InodeTable
from sealfs.sealed.inode import XATTR_OVERHEAD, Inode

XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
# Writers stay inside what readers accept (docs/format.md, "Size limits"): an inode's xattrs
# take at most 16 MiB of its record.
XATTR_RECORD_MAX = 16 << 20


def _clamp_time(ns: int) -> int:
    """Times are stored as signed 64-bit nanoseconds (years 1677-2262); like ext4 with its own
    range, clamp what lies outside instead of failing later at commit."""
    return max(-(1 << 63), min(ns, (1 << 63) - 1))


class Attributes:
    """Changes the attributes and xattrs of inodes; each change goes into the next commit."""

    def __init__(self, nodes: InodeTable) -> None:
        self.nodes = nodes

    def change(
        self,
        node: Inode,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Inode:
        """Set the given attributes (times clamped to what a record holds); ctime is now
        unless given."""
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
        node.ctime_ns = _clamp_time(ctime_ns) if ctime_ns is not None else time.time_ns()
        self.nodes.mark(node)
        return node

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if len(name) > 255 or not name:
            raise FsError(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        node = await self.nodes.node(ino)
        total = sum(len(k) + 1 for k in node.xattrs) + len(name) + 1
        if total > XATTR_LIST_MAX:
            raise FsError(errno.ENOSPC)
        others = sum(XATTR_OVERHEAD + len(k) + len(v) for k, v in node.xattrs.items() if k != name)
        if others + XATTR_OVERHEAD + len(name) + len(value) > XATTR_RECORD_MAX:
            raise FsError(errno.ENOSPC)
        node.xattrs[name] = bytes(value)
        node.ctime_ns = time.time_ns()
        self.nodes.mark(node)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        node = await self.nodes.node(ino)
        try:
            return node.xattrs[name]
        except KeyError:
            raise FsError(errno.ENODATA) from None

    async def removexattr(self, ino: int, name: bytes) -> None:
        node = await self.nodes.node(ino)
        if node.xattrs.pop(name, None) is None:
            raise FsError(errno.ENODATA)
        node.ctime_ns = time.time_ns()
        self.nodes.mark(node)
