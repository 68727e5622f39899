"""Raw access to the untrusted device: size, reads, state probe, crash-safe header commit.

The header is committed with its two magic values written *last*: the body of both copies goes
down with zeroed magics, is flushed, and only then are the magics written and flushed. A crash
at any point therefore leaves one of three recognisable states (see :func:`probe`): nothing
(blank), a complete body waiting for its magics (pending; finishing it is safe because the body
validates), or a complete header. It never leaves a half header that later boots would either
trust or "repair" by reformatting.
"""

from __future__ import annotations

import enum
import os
import stat

from sealfs import failpoints
from sealfs.errors import LuksError, StorageError, UsageError

from . import header as H
from . import profile as P


class DeviceState(enum.Enum):
    BLANK = "blank"  # first 32 KiB zero, no LUKS magic anywhere: safe to format
    PENDING = "pending"  # a sealfs header body whose magics were never written: finish it
    LUKS = "luks"  # a primary LUKS magic: must pass validation before anything else
    FOREIGN = "foreign"  # anything else: never formatted over automatically


def check_device_path(device: str) -> None:
    """A block device or a regular image file; anything else is a usage error."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise UsageError(f"{device}: no such device or image file") from None
    except OSError as e:
        raise StorageError(f"{device}: {e.strerror}") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UsageError(f"{device}: not a block device or regular image file")


def is_block_device(device: str) -> bool:
    return stat.S_ISBLK(os.stat(device).st_mode)


def device_size(device: str) -> int:
    check_device_path(device)
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StorageError(f"{device}: cannot open: {e.strerror}") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def read_exact(device: str, offset: int, length: int) -> bytes:
    """Read ``length`` bytes at ``offset``; short reads and I/O errors are StorageErrors."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StorageError(f"{device}: cannot open: {e.strerror}") from None
    try:
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(fd, min(length - done, 1 << 20), offset + done)
            if not chunk:
                raise StorageError(f"{device}: unexpected end of device at {offset + done}")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise StorageError(f"{device}: read failed at {offset}: {e.strerror}") from None
    finally:
        os.close(fd)


def probe(device: str, profile: P.LuksProfile) -> DeviceState:
    """Classify the device by its first DATA_OFFSET bytes (reads only)."""
    size = device_size(device)
    if size <= P.DATA_OFFSET:
        raise UsageError(f"{device}: {size} bytes is too small for a sealfs LUKS volume")
    return classify(read_exact(device, 0, P.DATA_OFFSET), size, profile)


def classify(area: bytes, size: int, profile: P.LuksProfile) -> DeviceState:
    if area[:6] == H.MAGIC_PRIMARY:
        return DeviceState.LUKS
    if not any(area[: 2 * P.HDR_SIZE]) and not H.has_magic(area):
        return DeviceState.BLANK
    try:
        H.validate_header_area(with_magics(area), size, profile)
    except H.HeaderRefused:
        return DeviceState.FOREIGN
    return DeviceState.PENDING


def with_magics(area: bytes) -> bytes:
    buf = bytearray(area)
    buf[:6] = H.MAGIC_PRIMARY
    buf[P.HDR_SIZE : P.HDR_SIZE + 6] = H.MAGIC_SECONDARY
    return bytes(buf)


def without_magics(area: bytes) -> bytes:
    buf = bytearray(area)
    buf[:6] = bytes(6)
    buf[P.HDR_SIZE : P.HDR_SIZE + 6] = bytes(6)
    return bytes(buf)


def commit_header(device: str, area: bytes) -> None:
    """Write a validated header region to ``device`` so that a crash leaves no half header.

    ``area`` must already have passed validation. Order: body with zeroed magics, flush,
    secondary magic, primary magic, flush.
    """
    if len(area) != P.DATA_OFFSET:
        raise LuksError("internal: header region has the wrong size")
    flags = os.O_WRONLY | os.O_CLOEXEC
    if is_block_device(device):
        flags |= os.O_EXCL  # refuse a device that is mounted or mapped
    try:
        fd = os.open(device, flags)
    except OSError as e:
        raise StorageError(f"{device}: cannot open for writing: {e.strerror}") from None
    try:
        pwrite_all(fd, without_magics(area), 0)
        os.fsync(fd)
        failpoints.reached("luks:header-body-written")
        pwrite_all(fd, H.MAGIC_SECONDARY, P.HDR_SIZE)
        failpoints.reached("luks:header-secondary-magic-written")
        pwrite_all(fd, H.MAGIC_PRIMARY, 0)
        os.fsync(fd)
    except OSError as e:
        raise StorageError(f"{device}: header write failed: {e.strerror}") from None
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less); OSError to the caller."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
