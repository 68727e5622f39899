"""The thin pyfuse3 adapter: translate requests, call the core, map errors to errno.

Every handler is wrapped by :func:`_guard`: a POSIX error becomes its errno, a verification
failure becomes EIO (logged with the plaintext path by the core), a storage failure keeps its
errno (ENOSPC stays ENOSPC), and any unexpected exception becomes EIO plus a logged traceback
so that one bad request can never take the mount down.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from sealfs.errors import IntegrityError, StorageError
from sealfs.fs.core import Filesystem
from sealfs.fs.errors import FsError
from sealfs.sealed.inode import Inode

log = logging.getLogger("sealfs.fuse")
P = ParamSpec("P")
R = TypeVar("R")

ENTRY_TIMEOUT = 60.0  # we are the only writer, so the kernel may cache names and attributes
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
READDIR_BATCH = 64  # children whose records are loaded together


def _guard(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except IntegrityError:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except StorageError as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(getattr(e, "errno", errno.EIO)) from None
        except Exception:
            log.exception("unexpected error in %s; returning EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _file_info(ino: int) -> pyfuse3.FileInfo:
    """The reply to open and create. ``noflush``: close(2) sends no FLUSH request (one request
    fewer per file in untar and small-file creation), since flush has nothing to do here: data
    is written back on release and fsync, and locks are the kernel's."""
    return pyfuse3.FileInfo(fh=ino, keep_cache=True, noflush=True)


class SealfsOperations(pyfuse3.Operations):
    """pyfuse3 Operations over a :class:`Filesystem`. File handles are inode numbers."""

    supports_dot_lookup = True

    def __init__(self, fs: Filesystem, writeback_cache: bool = False) -> None:
        super().__init__()
        self.fs = fs
        # Off by default: measured here, the kernel's writeback cache makes streaming writes
        # and untar slower (its dirty throttling for FUSE) and only helps tiny writes.
        self.enable_writeback_cache = writeback_cache

    # --- helpers -------------------------------------------------------------------------

    def _attrs(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = self.fs.block_size
        a.st_blocks = -(-node.size // 512) if node.is_file else 0
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ENTRY_TIMEOUT
        return a

    def _entry(self, node: Inode) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a new reference."""
        self.fs.remember(node)
        return self._attrs(node)

    # --- namespace -----------------------------------------------------------------------

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            node = await self.fs.lookup(parent_inode, name)
        except FsError as e:
            if e.errno == errno.ENOENT:  # cache the negative answer
                a = pyfuse3.EntryAttributes()
                a.st_ino = 0
                a.entry_timeout = ENTRY_TIMEOUT
                return a
            raise
        return self._entry(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                self.fs.forget(ino, count)
            except Exception:
                log.exception("unexpected error in forget")

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.fs.node(inode))

    @_guard
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = await self.fs.setattr(
            inode,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return self._attrs(node)

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = await self.fs.node(inode)
        if not node.is_symlink:
            raise FsError(errno.EINVAL)
        return node.target

    async def _make(
        self,
        parent: int,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
        rdev: int = 0,
        target: bytes = b"",
    ) -> pyfuse3.EntryAttributes:
        node = await self.fs.create(parent, name, mode, ctx.uid, ctx.gid, rdev, target)
        return self._entry(node)

    @_guard
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, mode, ctx, rdev)

    @_guard
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, (mode & 0o7777) | 0o040000, ctx)

    @_guard
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if len(target) > 4095:
            raise FsError(errno.ENAMETOOLONG)
        return await self._make(parent_inode, name, 0o120777, ctx, target=target)

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, name, want_dir=False)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, name, want_dir=True)

    @_guard
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise FsError(errno.EINVAL)
        await self.fs.rename(
            parent_inode_old,
            name_old,
            parent_inode_new,
            name_new,
            noreplace=bool(flags & RENAME_NOREPLACE),
            exchange=bool(flags & RENAME_EXCHANGE),
        )

    @_guard
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.link(inode, new_parent_inode, new_name))

    # --- files ---------------------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        await self.fs.open(inode, flags)
        return _file_info(inode)

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = await self.fs.create_open(parent_inode, name, mode, ctx.uid, ctx.gid)
        return _file_info(node.ino), self._entry(node)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(await self.fs.node(fh), off, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(await self.fs.node(fh), off, buf)

    @_guard
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        await self.fs.fallocate(await self.fs.node(fh), mode, off, length)

    @_guard
    async def flush(self, fh: int) -> None:
        pass  # not sent (noflush, see _file_info); data is written back on release and fsync

    @_guard
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(await self.fs.node(fh))

    # --- directories ---------------------------------------------------------------------

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = await self.fs.node(inode)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return inode

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory = await self.fs.node(fh)
        entries = self.fs.entries_after(directory, start_id)  # lazy: a reply holds a few
        while True:  # dozen entries, the directory may hold millions
            batch = list(itertools.islice(entries, READDIR_BATCH))
            if not batch:
                return
            await self.fs.preload([ino for _, _, ino in batch])
            for cookie, name, ino in batch:
                try:
                    child = await self.fs.node(ino, (fh, name))
                    attrs = self._attrs(child)
                except (IntegrityError, FsError):
                    # A damaged entry stays visible; stat/open on it fail with EIO.
                    child = None
                    attrs = pyfuse3.EntryAttributes()
                    attrs.st_ino = ino
                    attrs.entry_timeout = attrs.attr_timeout = 0
                if not pyfuse3.readdir_reply(token, name, attrs, cookie):
                    return
                if child is not None:
                    self.fs.remember(child)

    @_guard
    async def releasedir(self, fh: int) -> None:
        pass

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.fsyncdir()

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = 255
        return out

    # --- xattrs --------------------------------------------------------------------------

    @_guard
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.setxattr(inode, name, value)

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.getxattr(inode, name)

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list((await self.fs.node(inode)).xattrs)

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.removexattr(inode, name)

    @_guard
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks

    def stacktrace(self) -> Any:  # pragma: no cover - pyfuse3 debug hook, disabled
        raise pyfuse3.FUSEError(errno.EPERM)
