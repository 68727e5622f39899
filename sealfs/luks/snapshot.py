"""An in-memory, sealed copy of a LUKS2 header region, to validate and then open with.

The copy lives in a memfd: anonymous memory (never on the host's disk) that cryptsetup can still
open by path, ``/proc/self/fd/N``, when the descriptor is passed to it. Once filled the memfd
is sealed against writes and resizing, so the bytes the validator read are exactly the bytes
cryptsetup reads; nothing, not even this process, can change them in between.
"""

from __future__ import annotations

import fcntl
import os
from types import TracebackType

from sealfs.errors import LuksError

from . import profile as P
from .device import device_size, read_exact

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class HeaderSnapshot:
    """A memfd holding DATA_OFFSET bytes of header region, plus the data device's size."""

    def __init__(self, fd: int, device_size: int) -> None:
        self.fd = fd
        self.device_size = device_size
        self.sealed = False

    @classmethod
    def empty(cls, device_size: int) -> HeaderSnapshot:
        """A writable, zero-filled region for ``cryptsetup luksFormat --header`` to fill."""
        fd = os.memfd_create("sealfs-luks-header", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, P.DATA_OFFSET)
        return cls(fd, device_size)

    @classmethod
    def from_bytes(cls, data: bytes, device_size: int) -> HeaderSnapshot:
        if len(data) != P.DATA_OFFSET:
            raise LuksError(f"header region must be {P.DATA_OFFSET} bytes, got {len(data)}")
        snap = cls.empty(device_size)
        try:
            _write_all(snap.fd, data)
            snap.seal()
        except BaseException:
            snap.close()
            raise
        return snap

    @classmethod
    def capture(cls, device: str) -> HeaderSnapshot:
        """Copy the header region of ``device`` into sealed memory (one read, then frozen)."""
        size = device_size(device)
        if size <= P.DATA_OFFSET:
            raise LuksError(f"{device}: {size} bytes is too small for a sealfs LUKS volume")
        return cls.from_bytes(read_exact(device, 0, P.DATA_OFFSET), size)

    def seal(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
        self.sealed = True

    def read(self) -> bytes:
        """The region as cryptsetup will see it."""
        data = os.pread(self.fd, P.DATA_OFFSET, 0)
        if len(data) != P.DATA_OFFSET:
            raise LuksError("in-memory header copy has the wrong size")
        return data

    @property
    def child_path(self) -> str:
        """Path of this copy inside a child process that inherited :attr:`fd`."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> HeaderSnapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HeaderSnapshot(fd={self.fd}, device_size={self.device_size}, sealed={self.sealed})"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        offset += os.pwrite(fd, view[offset:], offset)
