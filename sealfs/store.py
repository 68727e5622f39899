"""The untrusted backing store: ciphertext objects in, ciphertext objects out.

The store knows no keys and interprets nothing; it names files, writes them without ever
overwriting a live object in place, and reports I/O failures as :class:`StorageError` (so a
full disk is never mistaken for tampering). Layout of a backing directory::

    sealfs.header            volume header (JSON, see docs/format.md)
    lock                     flock(2) target that keeps a second mount out
    header.lock              flock(2) target that serialises changes of the header
    checkpoint               sealed metadata table snapshot (replaced by rename)
    journal.<gen:016x>       append-only sealed commit records after that checkpoint
    objects/<xx>/<id:016x>   sealed inode records and data blocks, xx = first id byte

Some objects (small inode records, and blocks written back for an fsync) have no file of their
own while their commit is in the current journal: they travel inside the commit frame, and :attr:`ObjectStore.carried` holds
them so that :meth:`ObjectStore.get` finds them like any other object. They become files when
the journal is folded into a new checkpoint (docs/format.md, "Objects carried in the journal").

All methods are blocking; the filesystem core calls them from worker threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from sealfs import failpoints
from sealfs.errors import BusyError, IntegrityError, SealfsError, StorageError

HEADER_NAME = "sealfs.header"
CHECKPOINT_NAME = "checkpoint"
OBJECTS_DIR = "objects"
LOCK_NAME = "lock"
HEADER_LOCK_NAME = "header.lock"
#: The largest journal file a reader accepts and a writer appends to (docs/format.md, "Size
#: limits"); the writer folds the journal into a checkpoint long before.
JOURNAL_MAX = 256 << 20

_libc = ctypes.CDLL(None, use_errno=True)
# Every name under the backing directory is the host's: never follow a symlink there, and never
# block on a FIFO or device planted in place of a file (fstat tells what was opened).
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def journal_name(gen: int) -> str:
    return f"journal.{gen:016x}"


def _storage_error(what: str, e: OSError) -> StorageError:
    err = StorageError(f"{what}: {os.strerror(e.errno) if e.errno else e}")
    err.errno = e.errno or errno.EIO  # type: ignore[attr-defined]
    return err


class MissingObject(StorageError):
    """An object the metadata refers to is not in the store (deleted by the host)."""


class DamagedFile(IntegrityError):
    """A backing file sealfs cannot have written: a symlink, FIFO, device or directory in
    place of a file or a directory of the store, or a file larger than the format allows."""


def _kind_error(what: str, e: OSError) -> SealfsError:
    """``ELOOP``, ``ENOTDIR``, ``EISDIR``, ``ENXIO`` (a FIFO or socket opened for writing) and
    ``EEXIST`` (after an unlink: a race) from an O_NOFOLLOW / O_DIRECTORY / O_EXCL open mean
    that something other than sealfs's own file sits at that name; anything else is I/O."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO, errno.EEXIST):
        return DamagedFile(
            f"{what} is not a regular file or directory (a symbolic link or "
            "special file was planted in the backing directory)"
        )
    if e.errno == errno.ENOENT:
        return MissingObject(f"{what} is missing")
    return _storage_error(f"cannot open {what}", e)


def _check_regular(fd: int, what: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise DamagedFile(
            f"{what} is not a regular file (a special file was planted in the backing directory)"
        )
    return st


def read_bounded(fd: int, what: str, limit: int) -> bytes:
    """The whole regular file open at ``fd``, refused unread when it is larger than ``limit``
    (the most the format allows there): a sparse multi-GiB file is never read, and a file
    that grows after the fstat is read no further than ``limit + 1`` bytes."""
    st = _check_regular(fd, what)
    if st.st_size > limit:
        raise DamagedFile(f"{what} is {st.st_size} bytes, more than the {limit} the format allows")
    parts: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(max(st.st_size - total, 0), limit - total) + 1)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
        if total > limit:
            raise DamagedFile(f"{what} grew past the {limit} bytes the format allows")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ObjectStore:
    """Files in one backing directory. Object ids are 64-bit integers chosen at random.

    The backing directory itself is the caller's choice and may be reached through a symlink;
    everything below it is the host's. So the directory is opened once and every file and
    subdirectory is opened relative to it (or to ``objects``, also held open, or to a fan-out
    directory) with O_NOFOLLOW, checked by fstat to be a regular file or a real directory, and
    renamed or unlinked relative to it: no name under the backing directory is ever resolved
    through a symlink, and nothing is created where something already is (O_EXCL).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / OBJECTS_DIR
        self._lock_fd: int | None = None
        #: open directory fds: "" the backing directory, and OBJECTS_DIR
        self._dirs: dict[str, int] = {}
        #: objects whose only durable copy is inside a commit of the current journal (read
        #: freely; changed only through carry/uncarry/set_carried/drop_fileless, which keep
        #: the byte count)
        self.carried: dict[int, bytes] = {}
        self.carried_bytes = 0
        #: carried objects that may also exist as files: replayed from a journal (a crash
        #: after a checkpoint wrote them out) or written out by :meth:`materialize`
        self._filed: set[int] = set()
        self._carried_lock = threading.Lock()
        #: an object file was written since the last :meth:`sync`
        self.unsynced = False

    # --- directories ---------------------------------------------------------------------

    def root_fd(self) -> int:
        """The backing directory, opened once (following a symlink the caller chose)."""
        fd = self._dirs.get("")
        if fd is None:
            try:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise _storage_error(f"cannot open the backing directory {self.root}", e) from None
            fd = self._keep("", fd)
        return fd

    def _keep(self, key: str, fd: int) -> int:
        """Cache ``fd`` under ``key``; if another thread got there first, use its fd."""
        kept = self._dirs.setdefault(key, fd)
        if kept != fd:
            os.close(fd)
        return kept

    def _objects_fd(self, create: bool = False) -> int:
        fd = self._dirs.get(OBJECTS_DIR)
        if fd is None:
            fd = self._keep(
                OBJECTS_DIR, _open_dir(self.root_fd(), OBJECTS_DIR, create, OBJECTS_DIR)
            )
        return fd

    @contextlib.contextmanager
    def _fanout(self, name: str, create: bool = False) -> Iterator[int]:
        """The fan-out directory of object ``name``, open for the duration (not cached: a
        volume uses up to 256 of them)."""
        fd = _open_dir(self._objects_fd(create), name[:2], create, f"{OBJECTS_DIR}/{name[:2]}")
        try:
            yield fd
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the directory fds (the store opens them again if used later)."""
        dirs, self._dirs = self._dirs, {}
        for fd in dirs.values():
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # --- locking -------------------------------------------------------------------------

    def _open_lock_file(self, name: str) -> int:
        """Open the lock file ``name``, created if absent: never through a symlink, and only
        if it is a regular file."""
        what = f"lock file {self.root / name}"
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                0o600,
                dir_fd=self.root_fd(),
            )
        except OSError as e:
            raise _kind_error(what, e) from None
        try:
            _check_regular(fd, what)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def lock(self, shared: bool = False) -> None:
        """Take the volume lock, or fail with BusyError if another process holds it."""
        fd = self._open_lock_file(LOCK_NAME)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BusyError(
                f"volume {self.root} is in use (mounted or being checked by another process)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    @contextlib.contextmanager
    def header_lock(self) -> Iterator[None]:
        """Hold the header lock for the duration, waiting while another process holds it, so
        that header changes (read, change, replace) happen one at a time and none is lost.
        It is not the volume lock: a mount holds that for its whole life, and the header of
        a mounted volume may change too."""
        fd = self._open_lock_file(HEADER_LOCK_NAME)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def is_locked(self) -> bool:
        """True if some other process holds the volume lock (a lock file that is not a
        regular file is held by nobody)."""
        try:
            fd = os.open(LOCK_NAME, _READ, dir_fd=self.root_fd())
        except OSError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # --- objects -------------------------------------------------------------------------

    def object_path(self, oid: int) -> Path:
        """Where the object lives (for messages; files are opened through directory fds)."""
        name = f"{oid:016x}"
        return self.objects / name[:2] / name

    def put(self, oid: int, data: bytes) -> None:
        """Write a new object. Ids are fresh, so this never overwrites a live object; whatever
        sits under the same id (an orphan left by a crash, or something planted) is unlinked
        first and the object is created anew (O_EXCL)."""
        self._write_new(oid, f"{oid:016x}", data)

    def _write_new(self, oid: int, filename: str, data: bytes) -> None:
        """Create ``filename`` anew in ``oid``'s fan-out directory and write ``data`` to it
        (removed again if the write fails)."""
        name = f"{oid:016x}"
        with self._fanout(name, create=True) as sub:
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(filename, dir_fd=sub)
                fd = os.open(filename, _NEW, 0o600, dir_fd=sub)
            except OSError as e:
                raise _kind_error(f"object {name}", e) from None
            try:
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
                    self.unsynced = True
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(filename, dir_fd=sub)
                raise _storage_error(f"cannot write object {name}", e) from None

    def get(self, oid: int, limit: int) -> bytes:
        """The object's bytes; ``limit`` is the largest such object the format allows (a
        larger file is :class:`DamagedFile`, refused without being read)."""
        blob = self.carried.get(oid)
        if blob is not None:
            return blob
        name = f"{oid:016x}"
        what = f"object {name}"
        try:
            with self._fanout(name) as sub:
                fd = os.open(name, _READ, dir_fd=sub)
        except MissingObject:
            raise MissingObject(f"{what} is missing") from None
        except OSError as e:
            raise _kind_error(what, e) from None
        try:
            return read_bounded(fd, what, limit)
        except OSError as e:
            raise _storage_error(f"cannot read {what}", e) from None
        finally:
            os.close(fd)

    def carry(self, oid: int, blob: bytes) -> None:
        with self._carried_lock:
            old = self.carried.get(oid)
            self.carried[oid] = blob
            self.carried_bytes += len(blob) - (len(old) if old is not None else 0)

    def uncarry(self, oid: int) -> None:
        with self._carried_lock:
            blob = self.carried.pop(oid, None)
            if blob is not None:
                self.carried_bytes -= len(blob)
            self._filed.discard(oid)

    def set_carried(self, objects: dict[int, bytes]) -> None:
        with self._carried_lock:
            self.carried = dict(objects)
            self.carried_bytes = sum(map(len, objects.values()))
            self._filed = set(objects)

    def drop_fileless(self, oids: list[int]) -> list[int]:
        """Delete the carried objects among ``oids`` that were never written as files (a
        dictionary operation, no system call); return the others, for :meth:`delete`."""
        rest = []
        with self._carried_lock:
            for oid in oids:
                blob = None if oid in self._filed else self.carried.pop(oid, None)
                if blob is None:
                    rest.append(oid)
                else:
                    self.carried_bytes -= len(blob)
        return rest

    def delete(self, oid: int) -> None:
        self.uncarry(oid)  # a file may exist as well (see materialize)
        name = f"{oid:016x}"
        try:
            with self._fanout(name) as sub:
                os.unlink(name, dir_fd=sub)
        except (FileNotFoundError, MissingObject):
            pass
        except DamagedFile as e:  # a planted fan-out: no object of ours can be in it
            raise StorageError(f"cannot delete object {name}: {e}") from None
        except OSError as e:
            raise _storage_error(f"cannot delete object {name}", e) from None

    # --- re-sealing objects in place (sealfs rekey) ---------------------------------------

    def stage_object(self, oid: int, data: bytes) -> None:
        """Write the next version of object ``oid`` beside it, as ``.<id>.new`` (created anew,
        O_EXCL); :meth:`commit_staged` moves it over the object once it is durable (a
        :meth:`sync`). Only a re-key does this: the new version has the same id and the same
        contents, sealed under another key, so a reader sees one whole version or the other."""
        self._write_new(oid, f".{oid:016x}.new", data)

    def commit_staged(self, oid: int) -> None:
        """Rename the staged version of ``oid`` over the object (atomic; durable at the next
        :meth:`sync`)."""
        name = f"{oid:016x}"
        with self._fanout(name) as sub:
            try:
                os.rename(f".{name}.new", name, src_dir_fd=sub, dst_dir_fd=sub)
            except OSError as e:
                raise _storage_error(f"cannot replace object {name}", e) from None
            self.unsynced = True

    def remove_staged(self) -> int:
        """Unlink staged versions an interrupted re-key left behind; return how many."""
        removed = 0
        with contextlib.suppress(MissingObject):
            top = self._objects_fd()
            for sub in _entries(top):
                if not sub.is_dir(follow_symlinks=False) or len(sub.name) != 2:
                    continue
                with self._fanout(sub.name) as fd:
                    for entry in _entries(fd):
                        if entry.name.startswith(".") and entry.name.endswith(".new"):
                            try:
                                os.unlink(entry.name, dir_fd=fd)
                                removed += 1
                            except FileNotFoundError:
                                pass
                            except IsADirectoryError:
                                raise DamagedFile(
                                    f"objects/{sub.name}/{entry.name} is a directory (planted "
                                    "at the name of a staged object): remove it and run again"
                                ) from None
                            except OSError as e:
                                raise _storage_error(
                                    f"cannot remove objects/{sub.name}/{entry.name}", e
                                ) from None
        return removed

    def list_objects(self) -> Iterator[int]:
        """Every object id present (for checks and garbage collection): the names in the
        real fan-out directories; a symlinked ``objects`` or fan-out directory is not
        entered."""
        try:
            top = self._objects_fd()
        except MissingObject:
            return
        for sub in sorted(_entries(top), key=lambda e: e.name):
            if not sub.is_dir(follow_symlinks=False) or len(sub.name) != 2:
                continue
            with self._fanout(sub.name) as fd:
                names = [entry.name for entry in _entries(fd)]
            for name in names:
                with contextlib.suppress(ValueError):
                    yield int(name, 16)

    # --- small whole files (header, checkpoint, journals) --------------------------------

    def names(self, dirs: bool = True) -> list[str]:
        """The names in the backing directory (without ``dirs``: but real directories)."""
        return sorted(
            e.name for e in _entries(self.root_fd()) if dirs or not e.is_dir(follow_symlinks=False)
        )

    def read_file(self, name: str, limit: int) -> bytes:
        """The file ``name`` of the backing directory, at most ``limit`` bytes (see
        :func:`read_bounded`)."""
        try:
            fd = os.open(name, _READ, dir_fd=self.root_fd())
        except OSError as e:
            raise _kind_error(name, e) from None
        try:
            return read_bounded(fd, name, limit)
        except OSError as e:
            raise _storage_error(f"cannot read {name}", e) from None
        finally:
            os.close(fd)

    def exists(self, name: str) -> bool:
        """Whether anything at all (a symlink too) sits at ``name``."""
        try:
            os.stat(name, dir_fd=self.root_fd(), follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def create_file(self, name: str) -> int:
        """Create ``name`` anew for writing and return its fd: whatever sits there (a leftover
        of a crash, or something planted) is unlinked first, then O_EXCL guarantees the file
        written is the one just created."""
        root = self.root_fd()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=root)
            return os.open(name, _NEW, 0o600, dir_fd=root)
        except OSError as e:
            raise _kind_error(name, e) from None

    def replace_file(self, name: str, data: bytes) -> None:
        """Atomically replace ``name``: write a temporary file, fsync, rename, fsync the
        directory. A crash leaves either the old or the new content, never a mix."""
        tmp = f".{name}.tmp"
        fd = self.create_file(tmp)
        failpoints.reached(f"{name}:after-create")
        try:
            try:
                _write_all(fd, data)
                failpoints.reached(f"{name}:after-write")
                os.fsync(fd)
                failpoints.reached(f"{name}:after-fsync")
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self.root_fd(), dst_dir_fd=self.root_fd())
            failpoints.reached(f"{name}:after-rename")
            self.fsync_dir()
            failpoints.reached(f"{name}:after-dir-fsync")
        except OSError as e:
            raise _storage_error(f"cannot write {name}", e) from None

    def remove_file(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.root_fd())
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _storage_error(f"cannot remove {name}", e) from None

    def fsync_dir(self) -> None:
        os.fsync(self.root_fd())

    def materialize(self) -> list[int]:
        """Write every carried object as a file (before the journal that holds it goes);
        return their ids."""
        with self._carried_lock:
            items = list(self.carried.items())
            self._filed.update(self.carried)
        for oid, blob in items:
            self.put(oid, blob)
        return [oid for oid, _ in items]

    def sync(self, only_if_written: bool = False) -> None:
        """Make every object written so far durable (one syncfs(2) for the whole backing
        filesystem instead of an fsync per object); with ``only_if_written``, skip it when no
        object file was written since the last sync."""
        if only_if_written and not self.unsynced:
            return
        self.unsynced = False  # before syncfs: a put racing with it sets it again
        if _libc.syncfs(self.root_fd()) != 0:
            e = ctypes.get_errno()
            raise _storage_error("syncfs failed", OSError(e, os.strerror(e)))

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.root_fd())


def _open_dir(parent: int, name: str, create: bool, what: str) -> int:
    """A real directory ``name`` in ``parent`` (never a symlink), created if asked."""
    try:
        try:
            return os.open(name, _DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
            return os.open(name, _DIR, dir_fd=parent)
    except OSError as e:
        raise _kind_error(what, e) from None


def _entries(dir_fd: int) -> list[os.DirEntry[str]]:
    """The entries of an open directory (scandir on a duplicate of the fd)."""
    with os.scandir(dir_fd) as it:
        return list(it)


class JournalFile:
    """One append-only journal file. Frames are ``u32 length || sealed record``."""

    def __init__(self, store: ObjectStore, gen: int) -> None:
        self.store = store
        self.name = journal_name(gen)
        self._fd: int | None = None

    def read_all(self) -> bytes:
        return self.store.read_file(self.name, JOURNAL_MAX)

    def create(self) -> None:
        """Create the empty file durably (before the checkpoint that names it)."""
        fd = self.store.create_file(self.name)
        try:
            os.fsync(fd)
        except OSError as e:
            raise _storage_error(f"cannot create {self.name}", e) from None
        finally:
            os.close(fd)

    def open_for_append(self, valid_length: int) -> None:
        """Open for appending, cutting off a torn tail beyond ``valid_length``."""
        try:
            fd = os.open(
                self.name,
                os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self.store.root_fd(),
            )
        except OSError as e:
            raise _kind_error(self.name, e) from None
        try:
            if _check_regular(fd, self.name).st_size != valid_length:
                os.ftruncate(fd, valid_length)
                os.fsync(fd)
            os.lseek(fd, valid_length, os.SEEK_SET)
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError):
                raise _storage_error(f"cannot open {self.name}", e) from None
            raise
        self._fd = fd
        self.length = valid_length

    def append(self, frame: bytes) -> None:
        """Append one frame durably. On failure (e.g. ENOSPC) the file is cut back so that no
        partial frame stays behind. A journal never grows past :data:`JOURNAL_MAX`, the most
        a reader accepts (ENOSPC until a checkpoint starts a new one)."""
        assert self._fd is not None
        if self.length + len(frame) > JOURNAL_MAX:
            err = StorageError(
                f"cannot append to journal: it would exceed {JOURNAL_MAX} bytes "
                "(the most a reader accepts) before the next checkpoint"
            )
            err.errno = errno.ENOSPC  # type: ignore[attr-defined]
            raise err
        try:
            _write_all(self._fd, frame)
            os.fdatasync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, self.length)
                os.lseek(self._fd, self.length, os.SEEK_SET)
            except OSError:
                pass
            raise _storage_error("cannot append to journal", e) from None
        self.length += len(frame)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        self.store.remove_file(self.name)
