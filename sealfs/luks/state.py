"""The first-boot state record: one block at the end of the *decrypted* volume.

Why here: "a LUKS header exists" cannot mean "ready" (a crash between format and mkfs would
leave a volume every later boot trusts), and "no file system found" cannot mean "reformat" (a
torn superblock would wipe live data). So readiness is recorded explicitly, in a place that
is encrypted (and, with --integrity, authenticated) by the volume key, that the file system
never touches (it is created one block short), and that is written exactly once, at the very
end of first boot. A crash before that write leaves no record, so the next boot redoes the
file-system step (no application has seen the volume yet); after it, the record says ready and
sealfs never formats or runs mkfs on that volume again.

Layout (4096 bytes): magic ``sealfs-luks-st1\\n``, u32 big-endian length, that many bytes of
JSON, SHA-256 over everything before it, zero padding. Without integrity the host can scramble
the block (XTS makes that garbage, never a forged record), which reads as "no record": the same
power as wiping the disk, which it has anyway.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import time
from dataclasses import asdict, dataclass
from typing import Any

from sealfs import strict
from sealfs.errors import IntegrityError, LuksError, StorageError

STATE_BLOCK = 4096
MAGIC = b"sealfs-luks-st1\n"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StateRecord:
    """What first boot completed, for which volume."""

    state: str
    app_id: str
    volume_id: str
    fs: str
    initialized_at: int
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        head = MAGIC + struct.pack(">I", len(body)) + body
        block = head + hashlib.sha256(head).digest()
        if len(block) > STATE_BLOCK:
            raise LuksError("state record too large")
        return block.ljust(STATE_BLOCK, b"\0")

    @classmethod
    def decode(cls, block: bytes) -> StateRecord | None:
        """The record, or None if the block holds none (never written, torn, or scrambled)."""
        if block[: len(MAGIC)] != MAGIC:
            return None
        (length,) = struct.unpack_from(">I", block, len(MAGIC))
        end = len(MAGIC) + 4 + length
        if end + 32 > len(block):
            return None
        if hashlib.sha256(block[:end]).digest() != block[end : end + 32]:
            return None
        try:
            data: dict[str, Any] = strict.loads(block[len(MAGIC) + 4 : end])
            return cls(**data)
        except (ValueError, TypeError):
            return None

    @classmethod
    def ready(cls, app_id: str, volume_id: str, fs: str) -> StateRecord:
        return cls("ready", app_id, volume_id, fs, int(time.time()))


def data_size(device: str) -> int:
    """Bytes of the decrypted device available to the file system."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size < 2 * STATE_BLOCK:
        raise StorageError(f"{device}: too small for a file system")
    return size - STATE_BLOCK


def read_record(device: str) -> StateRecord | None:
    """Read the record; an I/O error here (dm-integrity's answer to tampering) is fatal."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        block = os.pread(fd, STATE_BLOCK, size - STATE_BLOCK)
    except OSError as e:
        if e.errno in (errno.EIO, errno.EILSEQ):
            raise IntegrityError(
                f"{device}: the first-boot state block fails to read (I/O error): with "
                "--integrity this means the ciphertext was modified"
            ) from None
        raise StorageError(f"{device}: cannot read the state block: {e.strerror}") from None
    finally:
        os.close(fd)
    return StateRecord.decode(block)


def write_record(device: str, record: StateRecord) -> None:
    """Write the record and flush it to the device before returning."""
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        data = record.encode()
        if os.pwrite(fd, data, size - STATE_BLOCK) != len(data):
            raise StorageError(f"{device}: short write of the state block")
        os.fsync(fd)
    except OSError as e:
        raise StorageError(f"{device}: cannot write the state block: {e.strerror}") from None
    finally:
        os.close(fd)
