"""The untrusted backing store: ciphertext objects in, ciphertext objects out.

The store knows no keys and interprets nothing; it names files, writes them without ever
overwriting a live object in place, and reports I/O failures as :class:`StorageError` (so a
full disk is never mistaken for tampering). Layout of a backing directory::

    sealfs.header            volume header (JSON, see docs/format.md)
    lock                     flock(2) target that keeps a second mount out
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
import threading
from collections.abc import Iterator
from pathlib import Path

from sealfs.errors import BusyError, StorageError

HEADER_NAME = "sealfs.header"
CHECKPOINT_NAME = "checkpoint"
OBJECTS_DIR = "objects"
LOCK_NAME = "lock"

_libc = ctypes.CDLL(None, use_errno=True)


def journal_name(gen: int) -> str:
    return f"journal.{gen:016x}"


def _storage_error(what: str, e: OSError) -> StorageError:
    err = StorageError(f"{what}: {os.strerror(e.errno) if e.errno else e}")
    err.errno = e.errno or errno.EIO  # type: ignore[attr-defined]
    return err


class MissingObject(StorageError):
    """An object the metadata refers to is not in the store (deleted by the host)."""


class ObjectStore:
    """Files in one backing directory. Object ids are 64-bit integers chosen at random."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / OBJECTS_DIR
        self._lock_fd: int | None = None
        #: objects whose only durable copy is inside a commit of the current journal (read
        #: freely; changed only through carry/uncarry/set_carried, which keep the byte count)
        self.carried: dict[int, bytes] = {}
        self.carried_bytes = 0
        self._carried_lock = threading.Lock()
        #: an object file was written since the last :meth:`sync`
        self.unsynced = False

    # --- locking -------------------------------------------------------------------------

    def lock(self, shared: bool = False) -> None:
        """Take the volume lock, or fail with BusyError if another process holds it."""
        path = self.root / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _storage_error(f"cannot open lock file {path}", e) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BusyError(f"volume {self.root} is in use (mounted or being checked by "
                            "another process)") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def is_locked(self) -> bool:
        """True if some other process holds the volume lock."""
        try:
            fd = os.open(self.root / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # --- objects -------------------------------------------------------------------------

    def object_path(self, oid: int) -> Path:
        name = f"{oid:016x}"
        return self.objects / name[:2] / name

    def put(self, oid: int, data: bytes) -> None:
        """Write a new object. Ids are fresh, so this never overwrites a live object; an
        orphan left by a crash under the same id is simply replaced."""
        path = self.object_path(oid)
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
                self.unsynced = True
        except OSError as e:
            with contextlib.suppress(OSError):
                path.unlink()
            raise _storage_error(f"cannot write object {path.name}", e) from None

    def get(self, oid: int) -> bytes:
        blob = self.carried.get(oid)
        if blob is not None:
            return blob
        path = self.object_path(oid)
        try:
            with open(path, "rb", buffering=0) as f:
                return f.read()
        except FileNotFoundError:
            raise MissingObject(f"object {path.name} is missing") from None
        except OSError as e:
            raise _storage_error(f"cannot read object {path.name}", e) from None

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

    def set_carried(self, objects: dict[int, bytes]) -> None:
        with self._carried_lock:
            self.carried = dict(objects)
            self.carried_bytes = sum(map(len, objects.values()))

    def delete(self, oid: int) -> None:
        self.uncarry(oid)  # a file may exist as well (see materialize)
        try:
            self.object_path(oid).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _storage_error(f"cannot delete object {oid:016x}", e) from None

    def list_objects(self) -> Iterator[int]:
        """Every object id present (for checks and garbage collection)."""
        if not self.objects.is_dir():
            return
        for sub in sorted(self.objects.iterdir()):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                try:
                    yield int(entry.name, 16)
                except ValueError:
                    continue

    # --- small whole files (header, checkpoint) ------------------------------------------

    def read_file(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"{name} is missing") from None
        except OSError as e:
            raise _storage_error(f"cannot read {name}", e) from None

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def replace_file(self, name: str, data: bytes) -> None:
        """Atomically replace ``name``: write a temporary file, fsync, rename, fsync the
        directory. A crash leaves either the old or the new content, never a mix."""
        tmp = self.root / f".{name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.root / name)
            self.fsync_dir()
        except OSError as e:
            raise _storage_error(f"cannot write {name}", e) from None

    def remove_file(self, name: str) -> None:
        try:
            (self.root / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _storage_error(f"cannot remove {name}", e) from None

    def fsync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def materialize(self) -> list[int]:
        """Write every carried object as a file (before the journal that holds it goes);
        return their ids."""
        with self._carried_lock:
            items = list(self.carried.items())
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
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc.syncfs(fd) != 0:
                e = ctypes.get_errno()
                raise _storage_error("syncfs failed", OSError(e, os.strerror(e)))
        finally:
            os.close(fd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root)


class JournalFile:
    """One append-only journal file. Frames are ``u32 length || sealed record``."""

    def __init__(self, store: ObjectStore, gen: int) -> None:
        self.path = store.root / journal_name(gen)
        self._fd: int | None = None

    def read_all(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"{self.path.name} is missing") from None
        except OSError as e:
            raise _storage_error(f"cannot read {self.path.name}", e) from None

    def create(self) -> None:
        """Create the empty file durably (before the checkpoint that names it)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.fsync(fd)
            os.close(fd)
        except OSError as e:
            raise _storage_error(f"cannot create {self.path.name}", e) from None

    def open_for_append(self, valid_length: int) -> None:
        """Open for appending, cutting off a torn tail beyond ``valid_length``."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            if os.fstat(fd).st_size != valid_length:
                os.ftruncate(fd, valid_length)
                os.fsync(fd)
            os.lseek(fd, valid_length, os.SEEK_SET)
        except OSError as e:
            raise _storage_error(f"cannot open {self.path.name}", e) from None
        self._fd = fd
        self.length = valid_length

    def append(self, frame: bytes) -> None:
        """Append one frame durably. On failure (e.g. ENOSPC) the file is cut back so that no
        partial frame stays behind."""
        assert self._fd is not None
        try:
            view = memoryview(frame)
            while view:
                view = view[os.write(self._fd, view):]
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
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
