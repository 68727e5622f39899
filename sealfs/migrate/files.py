"""Copying bundle files: never through a symlink, hashed while copied, made visible by rename.

A bundle directory (and the backing directory it comes from) is the host's: every name in it
is opened component by component with O_NOFOLLOW and must be a regular file. A file is written
under a temporary name and renamed into place when complete, so a name that exists in a bundle
or staging directory always holds a whole copy (an interrupted run leaves at most a ``.part``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from sealfs.crypto import ct_equal
from sealfs.errors import StorageError
from sealfs.store import MissingObject

CHUNK = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@contextlib.contextmanager
def open_under(root: Path, name: str) -> Iterator[int]:
    """An fd of the regular file ``root/name``; MissingObject if there is none."""
    parts = name.split("/")
    fds: list[int] = []
    try:
        fds.append(os.open(root, _DIR))
        for part in parts[:-1]:
            fds.append(os.open(part, _DIR, dir_fd=fds[-1]))
        fd = os.open(parts[-1], _READ, dir_fd=fds[-1])
    except FileNotFoundError:
        raise MissingObject(f"{name} is missing") from None
    except OSError as e:
        raise StorageError(f"cannot open {root / name}: {os.strerror(e.errno or 0)}") from None
    finally:
        for d in fds:
            os.close(d)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MissingObject(f"{name} is not a regular file")
        yield fd
    finally:
        os.close(fd)


def size_under(root: Path, name: str) -> int | None:
    """The size of ``root/name``, or None if it is not a regular file there."""
    try:
        with open_under(root, name) as fd:
            return os.fstat(fd).st_size
    except MissingObject:
        return None


def copy_hashed(src_root: Path, dst_root: Path, name: str, write: bool = True) -> tuple[int, bytes]:
    """Copy ``src_root/name`` to ``dst_root/name`` (creating its directories), returning the
    length and SHA-256 of the bytes copied. Without ``write`` only hash the source."""
    with open_under(src_root, name) as src:
        return write_hashed(lambda n: os.read(src, n), dst_root if write else None, name)


def write_hashed(
    read: Callable[[int], bytes], dst_root: Path | None, name: str
) -> tuple[int, bytes]:
    """Write what ``read`` yields until it returns nothing to ``dst_root/name`` (through a
    ``.part`` file renamed when complete; not at all if ``dst_root`` is None), returning the
    length and SHA-256 of those bytes. Whatever sits at the ``.part`` name (a leftover, or a
    FIFO the host planted there, whose open for writing would block) is unlinked first and
    the file created anew (O_EXCL)."""
    digest = hashlib.sha256()
    size = 0
    out = parent = None
    *dirs, base = name.split("/")
    part = f".{base}.part"
    try:
        if dst_root is not None:
            parent = _make_dirs_under(dst_root, dirs)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part, dir_fd=parent)
            out = os.open(part, _WRITE, 0o600, dir_fd=parent)
        while chunk := read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if out is not None:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
        if out is not None and parent is not None:
            os.fsync(out)
            os.rename(part, base, src_dir_fd=parent, dst_dir_fd=parent)
    except OSError as e:
        if out is not None and parent is not None:  # give back the space (a full disk)
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=parent)
        raise StorageError(f"cannot copy {name}: {failure(e)}") from None
    finally:
        for fd in (out, parent):
            if fd is not None:
                os.close(fd)
    return size, digest.digest()


def failure(e: OSError) -> str:
    """Why a copy failed, in words; for a full disk also what to do (nothing is lost)."""
    reason = os.strerror(e.errno or 0)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (make room and run again: the copies made so far are kept)"
    return reason


def _make_dirs_under(root: Path, dirs: list[str]) -> int:
    """An fd of the directory ``root/dirs...``, creating what is missing; a component that
    is a symlink (planted by the host, perhaps between two passes) is refused (ENOTDIR)."""
    fd = os.open(root, _DIR)
    try:
        for part in dirs:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
            fd, parent = os.open(part, _DIR, dir_fd=fd), fd
            os.close(parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def hash_under(root: Path, name: str) -> tuple[int, bytes]:
    """Length and SHA-256 of ``root/name``."""
    return copy_hashed(root, root, name, write=False)


def holds_copy(root: Path, name: str, size: int, sha256: bytes) -> bool:
    """Whether ``root/name`` is a regular file of exactly ``size`` bytes hashing to
    ``sha256``: a copy an earlier, interrupted run left, re-read now because ``root`` is the
    host's and nothing it holds is trusted unverified."""
    try:
        with open_under(root, name) as fd:
            if os.fstat(fd).st_size != size:
                return False
            got, digest = write_hashed(lambda n: os.read(fd, n), None, name)
    except MissingObject:
        return False
    return got == size and ct_equal(digest, sha256)


def is_partial(name: str) -> bool:
    """Whether ``name`` is the temporary name of a copy in progress (see :func:`write_hashed`)."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(".part")


def remove_under(root: Path, doomed: Callable[[str, int], bool]) -> int:
    """Remove every entry of the tree ``root`` for which ``doomed(name, st_mode)`` holds
    (``name`` relative to ``root``; a doomed directory only once it is empty), never
    following a symlink; returns how many entries went. Used to clear what an interrupted
    run left: ``.part`` files, and in a staging directory anything no manifest lists."""
    removed = 0
    try:
        for dirpath, dirnames, filenames, dirfd in os.fwalk(
            root, topdown=False, follow_symlinks=False
        ):
            rel = os.path.relpath(dirpath, root)
            for entry in (*filenames, *dirnames):
                name = entry if rel == "." else f"{rel}/{entry}"
                try:
                    mode = os.stat(entry, dir_fd=dirfd, follow_symlinks=False).st_mode
                    if not doomed(name, mode):
                        continue
                    if stat.S_ISDIR(mode):
                        os.rmdir(entry, dir_fd=dirfd)
                    else:
                        os.unlink(entry, dir_fd=dirfd)
                    removed += 1
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                        raise
    except OSError as e:
        raise StorageError(f"cannot clean {root}: {os.strerror(e.errno or 0)}") from None
    return removed


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
