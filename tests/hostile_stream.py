"""Hostile byte streams for ``import -`` tests, made lazily: a stream claiming hundreds of MiB
is produced by a feeder process as it is read, never held in memory by the test."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from sealfs.tarstream import BLOCK, ustar_header

#: Writes the hex header argv[1], then argv[2] zero bytes, to stdout; stops when the reader
#: goes away (the broken pipe is the expected end).
_FEED = """
import os, sys
out = sys.stdout.buffer
left = int(sys.argv[2])
try:
    out.write(bytes.fromhex(sys.argv[1]))
    zeros = bytes(1 << 20)
    while left > 0:
        out.write(zeros[:left])
        left -= len(zeros)
    out.flush()
except BrokenPipeError:
    os._exit(0)
"""


def header_block(kind: bytes, size: int = 0, name: str = "sealfs.header") -> bytes:
    """A ustar header block with a right checksum, of any member type and size."""
    block = bytearray(ustar_header(name, 0))
    block[124:136] = b"%011o\0" % size
    block[156:157] = kind
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax_header_block(claimed: int) -> bytes:
    """A valid header block of a pax extended header of ``claimed`` bytes."""
    return header_block(b"x", claimed, "PaxHeaders.0/sealfs.header")


_END = bytes(2 * BLOCK)
_REGULAR = header_block(b"0")

#: Streams every ``import -`` must refuse from their first member, and a word of the message.
HOSTILE = [
    (header_block(b"2") + _END, "symbolic link"),
    (header_block(b"1") + _END, "hard link"),
    (header_block(b"3") + _END, "character device"),
    (header_block(b"4") + _END, "block device"),
    (header_block(b"L", 200) + bytes(BLOCK) + _END, "GNU long name"),
    (_REGULAR[:148] + b"0001234\0" + _REGULAR[156:] + _END, "checksum"),
    (header_block(b"0", 4000)[:300], "cut short"),
    (b"", "cut short"),
]


@contextlib.contextmanager
def pax_bomb(claimed: int) -> Iterator[IO[bytes]]:
    """A pipe carrying a stream whose first member is a pax header of ``claimed`` bytes,
    followed by that many bytes of content, fed as the reader takes them."""
    feeder = subprocess.Popen(
        [sys.executable, "-c", _FEED, pax_header_block(claimed).hex(), str(claimed)],
        stdout=subprocess.PIPE,
    )
    assert feeder.stdout is not None
    try:
        yield feeder.stdout
    finally:
        feeder.stdout.close()  # the feeder's next write fails: it ends
        feeder.wait(timeout=60)


def relay(
    export: list[str], import_: list[str], limit: int | None, cwd: Path
) -> tuple[int, str, int]:
    """Pipe the command ``export`` into ``import_`` through this process, forwarding at most
    ``limit`` bytes (all if None) and then closing the import's input: a pipe cut after
    ``limit`` bytes. Returns the import's exit code and stderr, and the bytes forwarded."""
    exporter = subprocess.Popen(export, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd)
    importer = subprocess.Popen(
        import_, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd
    )
    assert exporter.stdout is not None and importer.stdin is not None
    assert importer.stderr is not None
    sent = 0
    try:
        while limit is None or sent < limit:
            want = 64 * 1024 if limit is None else min(64 * 1024, limit - sent)
            piece = exporter.stdout.read1(want)
            if not piece:
                break
            importer.stdin.write(piece)
            sent += len(piece)
    except BrokenPipeError:
        pass  # the importer stopped reading (it refused the stream)
    finally:
        for pipe in (importer.stdin, exporter.stdout):
            with contextlib.suppress(BrokenPipeError):
                pipe.close()
    err = importer.stderr.read().decode()
    exporter.wait(timeout=120)
    return importer.wait(timeout=120), err, sent


def assert_refused(argv: list[str], stream: bytes, message: str, cwd: Path) -> None:
    """``argv`` (an ``import -``) refuses ``stream`` with exit 5 and one line naming
    ``message``."""
    res = subprocess.run(argv, input=stream, capture_output=True, cwd=cwd, timeout=120)
    err = res.stderr.decode()
    assert res.returncode == 5 and err.count("\n") == 1 and message in err, err
