"""Inodes: the in-memory form of every file, directory and symlink, and their record format.

An inode record is what gets sealed into one object of the store; its exact byte layout is
specified in docs/format.md ("Inode record"). The record holds everything about the inode:
attributes, xattrs, and, by type, the block map (file), the entries (directory) or the target
(symlink). Directory entry names and xattrs are therefore encrypted with the record.

The class lives in the sealed-object layer because its record is a sealed format
(:meth:`sealfs.sealed.objects.SealedObjects.open_record` returns one); the runtime fields it
also carries (caches, locks, reference counts) belong to the filesystem core and are never
stored.
"""

from __future__ import annotations

import stat
import struct
from bisect import bisect_right
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sealfs.errors import IntegrityError

if TYPE_CHECKING:
    import trio

INODE_RECORD_VERSION = 2  # 2 added inline data; version 1 records are still read
ROOT_INO = 1
#: Bytes a directory entry adds to its directory's record besides its name (u16 + u64).
ENTRY_OVERHEAD = 10
#: Bytes an xattr adds to its inode's record besides its name and value (u16 + u32).
XATTR_OVERHEAD = 6

_ATTRS = struct.Struct(">BIIIIQqqqQQ")  # version mode uid gid nlink size a/m/ctime rdev parent
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_PAIR = struct.Struct(">QQ")


class RecordError(IntegrityError, ValueError):
    """An authenticated record that does not parse: a bug or an unsupported version."""


class Entries:
    """A directory's name -> inode map with stable readdir cookies.

    Each entry gets a cookie from a per-directory counter when it is added. readdir resumes
    "after cookie N", so a listing returns every entry that exists throughout it exactly once,
    even while other entries are added or removed. Cookies are runtime-only (not stored).
    """

    __slots__ = ("names", "record_bytes", "_cookie_of", "_name_of", "_cookies", "_next", "_dead")

    def __init__(self) -> None:
        self.names: dict[bytes, int] = {}
        #: what the entries take in the directory's record (docs/format.md, "Inode records")
        self.record_bytes = 0
        self._cookie_of: dict[bytes, int] = {}
        self._name_of: dict[int, bytes] = {}
        self._cookies: list[int] = []  # ascending; may hold dead cookies
        self._next = 1
        self._dead = 0

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: bytes) -> bool:
        return name in self.names

    def get(self, name: bytes) -> int | None:
        return self.names.get(name)

    def add(self, name: bytes, ino: int) -> None:
        if name in self.names:
            self.names[name] = ino  # replace target, keep position
            return
        cookie = self._next
        self._next += 1
        self.names[name] = ino
        self.record_bytes += ENTRY_OVERHEAD + len(name)
        self._cookie_of[name] = cookie
        self._name_of[cookie] = name
        self._cookies.append(cookie)

    def remove(self, name: bytes) -> int:
        ino = self.names.pop(name)
        self.record_bytes -= ENTRY_OVERHEAD + len(name)
        cookie = self._cookie_of.pop(name)
        del self._name_of[cookie]
        self._dead += 1
        if self._dead > 64 and self._dead > len(self._cookies) // 2:
            self._cookies = [c for c in self._cookies if c in self._name_of]
            self._dead = 0
        return ino

    def after(self, cookie: int) -> Iterator[tuple[int, bytes, int]]:
        """Entries with a cookie greater than ``cookie``: (cookie, name, ino), in order."""
        i = bisect_right(self._cookies, cookie)
        cookies = self._cookies
        while i < len(cookies):
            c = cookies[i]
            i += 1
            name = self._name_of.get(c)
            if name is not None:
                yield c, name, self.names[name]


class Inode:
    """One inode. Attributes follow struct stat; times are nanoseconds since the epoch."""

    __slots__ = (
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "size",
        "atime_ns",
        "mtime_ns",
        "ctime_ns",
        "rdev",
        "parent",
        "xattrs",
        "blocks",
        "entries",
        "target",
        "meta_dirty",
        "dirty_blocks",
        "flushing",
        "write_error",
        "dead",
        "lookups",
        "opens",
        "name_hint",
        "lock",
        "damaged",
        "read_next",
        "prefetched",
        "inline",
    )

    def __init__(
        self,
        ino: int,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        nlink: int = 1,
        size: int = 0,
        atime_ns: int = 0,
        mtime_ns: int = 0,
        ctime_ns: int = 0,
        rdev: int = 0,
        parent: int = 0,
    ) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = nlink
        self.size = size
        self.atime_ns = atime_ns
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.rdev = rdev
        self.parent = parent
        self.xattrs: dict[bytes, bytes] = {}
        self.blocks: dict[int, int] = {}  # file: block index -> object id
        self.inline: bytes | None = None  # small file: its data, kept in this record
        self.entries: Entries | None = Entries() if stat.S_ISDIR(mode) else None
        self.target = b""  # symlink
        # runtime state, never stored
        self.meta_dirty = False
        self.dirty_blocks: dict[int, bytearray] = {}
        self.flushing: dict[int, tuple[bytes, Any]] = {}  # idx -> (data, trio.Event)
        self.write_error = 0  # errno of a failed background write, reported by fsync
        self.dead = False  # destroyed: nothing may be written for it any more
        self.lookups = 0
        self.opens = 0
        self.name_hint: tuple[int, bytes] | None = None  # (parent ino, name) for messages
        self.lock: trio.Lock | None = None  # created on first data access
        self.damaged: set[int] = set()  # block indexes known to fail verification
        self.read_next = 0  # where a sequential read would continue (for prefetching)
        self.prefetched = 0  # block index up to which prefetching was started

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def __repr__(self) -> str:
        return f"<Inode {self.ino} mode={self.mode:o} size={self.size}>"

    # --- record format -------------------------------------------------------------------

    def to_record(self) -> bytes:
        out = [
            _ATTRS.pack(
                INODE_RECORD_VERSION,
                self.mode,
                self.uid,
                self.gid,
                self.nlink,
                self.size,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
                self.rdev,
                self.parent,
            ),
            _U32.pack(len(self.xattrs)),
        ]
        for name, value in self.xattrs.items():
            out += [_U16.pack(len(name)), name, _U32.pack(len(value)), value]
        if self.entries is not None:
            out.append(_U32.pack(len(self.entries)))
            for name, ino in self.entries.names.items():
                out += [_U16.pack(len(name)), name, _U64.pack(ino)]
        elif self.is_symlink:
            out += [_U32.pack(len(self.target)), self.target]
        else:
            out.append(_U32.pack(len(self.blocks)))
            out += [_PAIR.pack(idx, oid) for idx, oid in sorted(self.blocks.items())]
            inline = self.inline or b""
            out += [_U32.pack(len(inline)), inline]
        return b"".join(out)

    @classmethod
    def from_record(cls, ino: int, data: bytes) -> Inode:
        try:
            return cls._parse(ino, memoryview(data))
        except (struct.error, IndexError, ValueError) as e:
            raise RecordError(f"malformed inode record: {e}") from None

    @classmethod
    def _parse(cls, ino: int, buf: memoryview) -> Inode:
        (version, mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, parent) = (
            _ATTRS.unpack_from(buf, 0)
        )
        if version not in (1, INODE_RECORD_VERSION):
            raise RecordError(f"inode record version {version} is not supported")
        node = cls(ino, mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, parent)
        pos = _ATTRS.size
        (count,), pos = _U32.unpack_from(buf, pos), pos + 4
        for _ in range(count):
            (nlen,), pos = _U16.unpack_from(buf, pos), pos + 2
            name, pos = bytes(buf[pos : pos + nlen]), pos + nlen
            (vlen,), pos = _U32.unpack_from(buf, pos), pos + 4
            node.xattrs[name], pos = bytes(buf[pos : pos + vlen]), pos + vlen
        (count,), pos = _U32.unpack_from(buf, pos), pos + 4
        if node.entries is not None:
            for _ in range(count):
                (nlen,), pos = _U16.unpack_from(buf, pos), pos + 2
                name, pos = bytes(buf[pos : pos + nlen]), pos + nlen
                (child,), pos = _U64.unpack_from(buf, pos), pos + 8
                node.entries.add(name, child)
        elif node.is_symlink:
            node.target, pos = bytes(buf[pos : pos + count]), pos + count
        else:
            for _ in range(count):
                idx, oid = _PAIR.unpack_from(buf, pos)
                pos += 16
                node.blocks[idx] = oid
            if version >= 2:
                (n,), pos = _U32.unpack_from(buf, pos), pos + 4
                if n:
                    if count or n > size or pos + n > len(buf):
                        raise RecordError("inline data with a block map, or beyond the size")
                    node.inline, pos = bytes(buf[pos : pos + n]), pos + n
        if pos != len(buf):
            raise RecordError("trailing bytes in inode record")
        return node
