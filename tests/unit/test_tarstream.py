"""The bounded tar of export/import streams: what the writer emits is standard tar (``tar -t``
and Python's ``tarfile`` read it), and the reader accepts exactly that and refuses every other
kind of member, damage, a cut, and oversized extended headers without reading them."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tarfile
from collections.abc import Callable

import pytest

from sealfs.errors import StorageError
from sealfs.tarstream import (
    BLOCK,
    MAX_PAX_BYTES,
    MAX_PAX_PATH,
    RECORD,
    StreamCutShort,
    StreamMalformed,
    TarReader,
    TarWriter,
    ustar_header,
)

FILES = [
    ("sealfs.header", b"h" * 700),
    ("sealfs-migrate.manifest", b""),
    ("objects/0a/0a00000000000001", bytes(range(256)) * 40),
]


def written(files: list[tuple[str, bytes]] = FILES) -> bytes:
    out = io.BytesIO()
    tar = TarWriter(out)
    for name, data in files:
        tar.add_bytes(name, data)
    tar.close()
    return out.getvalue()


def read_all(data: bytes, piece: int = 1 << 20) -> list[tuple[str, bytes]]:
    """Every member of ``data`` as the reader sees it, read in pieces of ``piece`` bytes."""
    tar = TarReader(io.BytesIO(data).read)
    members = []
    while (member := tar.next()) is not None:
        parts = []
        while chunk := member.read(piece):
            parts.append(chunk)
        members.append((member.name, b"".join(parts)))
    return members


def tarfile_stream(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.size, i.type, i.mode = size, kind, 0o600
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        i.linkname = "/etc/passwd"
    return i


def test_writer_output_is_standard_tar_and_reads_back() -> None:
    data = written()
    assert len(data) % RECORD == 0
    listing = subprocess.run(["tar", "-tvf", "-"], input=data, capture_output=True, check=True)
    assert [line.split()[-1] for line in listing.stdout.decode().splitlines()] == [
        n for n, _ in FILES
    ]
    assert listing.stderr == b""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        assert [(m.name, m.size, m.type) for m in tar] == [
            (n, len(d), tarfile.REGTYPE) for n, d in FILES
        ]
    # Byte for byte what tarfile's pax writer makes of the same files: the format is unchanged.
    assert data == tarfile_stream([(info(n, len(d)), d) for n, d in FILES], tarfile.PAX_FORMAT)
    assert read_all(data) == FILES
    assert read_all(data, piece=7) == FILES


def test_small_pax_path_and_size_accepted() -> None:
    """Another POSIX writer puts a long name into a pax header: that is read."""
    long = "objects/" + "x" * 150
    data = tarfile_stream([(info(long, 3), b"abc")], tarfile.PAX_FORMAT)
    assert b"path=" in data
    assert read_all(data) == [(long, b"abc")]


def test_long_pax_path_and_key_refused_in_one_short_line() -> None:
    """A pax header may hold 64 KiB: a member name or unknown key that long is refused before
    any error message could quote it whole."""
    path = "objects/" + "x" * MAX_PAX_PATH
    with pytest.raises(StreamMalformed, match="longer than") as long_path:
        read_all(tarfile_stream([(info(path, 1), b"z")], tarfile.PAX_FORMAT))
    extra = info("a", 1)
    extra.pax_headers = {"k" * 30000: "v"}
    with pytest.raises(StreamMalformed) as long_key:
        read_all(tarfile_stream([(extra, b"z")], tarfile.PAX_FORMAT))
    for refused in (long_path, long_key):
        assert len(str(refused.value)) < 120 and "\n" not in str(refused.value)


def test_writer_refuses_what_ustar_cannot_state() -> None:
    for name, size in (("x" * 101, 0), ("", 0), ("é", 0), ("a", 8**11)):
        with pytest.raises(ValueError):
            ustar_header(name, size)


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.DIRTYPE, "directory"),
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.CONTTYPE, "contiguous"),
        (tarfile.GNUTYPE_SPARSE, "sparse"),
    ],
)
def test_other_member_types_refused(kind: bytes, what: str) -> None:
    data = tarfile_stream([(info("sealfs.header", 0, kind), b"")], tarfile.USTAR_FORMAT)
    with pytest.raises(StreamMalformed, match=what):
        read_all(data)


def test_gnu_long_names_and_pax_extras_refused() -> None:
    long = tarfile_stream([(info("y" * 150, 1), b"z")], tarfile.GNU_FORMAT)
    with pytest.raises(StreamMalformed):  # GNU magic, and an 'L' member before it
        read_all(long)
    extra = info("a", 1)
    extra.pax_headers = {"mtime": "1.5"}
    with pytest.raises(StreamMalformed, match="mtime"):
        read_all(tarfile_stream([(extra, b"z")], tarfile.PAX_FORMAT))
    glob = io.BytesIO()
    with tarfile.open(fileobj=glob, mode="w|", format=tarfile.PAX_FORMAT, pax_headers={"k": "v"}):
        pass
    with pytest.raises(StreamMalformed, match="global"):
        read_all(glob.getvalue())


def _pax_block(size: int) -> bytes:
    block = bytearray(ustar_header("PaxHeaders/x", size))
    block[156] = ord("x")
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def test_oversized_pax_header_refused_unread() -> None:
    """A pax header that claims 300 MiB is refused from its 512-byte header alone: the
    reader is handed a source that fails if asked for anything after it."""
    header = _pax_block(300 << 20)
    handed = [header]

    def read(n: int) -> bytes:
        assert handed, "the reader asked for the pax header's content"
        return handed.pop()

    with pytest.raises(StreamMalformed, match="pax header of 314572800 bytes"):
        TarReader(read).next()
    fits = _pax_block(MAX_PAX_BYTES)
    with pytest.raises(StreamCutShort):  # within the bound it is read (and the source ends)
        TarReader(io.BytesIO(fits).read).next()


#: Where the end-of-archive marker of ``written()`` starts.
END = sum(BLOCK + -(-len(d) // BLOCK) * BLOCK for _, d in FILES)


def _edit(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def _edit_header(data: bytes, offset: int, value: bytes) -> bytes:
    """``data`` with the first header changed at ``offset`` and its checksum made right."""
    block = bytearray(_edit(data, offset, value)[:BLOCK])
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + data[BLOCK:]


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (lambda d: _edit(d, 5, b"X"), StreamMalformed, "checksum"),
        (lambda d: _edit(d, 257, b"gnutar"), StreamMalformed, "magic"),
        (lambda d: _edit_header(d, 124, b"0000000001x"), StreamMalformed, "size"),
        # GNU base-256 (first byte 0x80) states sizes beyond octal's: not in sealfs's format
        (lambda d: _edit_header(d, 124, b"\x80" + bytes(10) + b"\x01"), StreamMalformed, "size"),
        (lambda d: _edit_header(d, 157, b"target"), StreamMalformed, "link name"),
        (lambda d: _edit_header(d, 4, b"\0x"), StreamMalformed, "after its end"),
        (lambda d: _edit(d, BLOCK + 700, b"\1"), StreamMalformed, "padding"),
        (lambda d: d + b"\0" * RECORD, StreamMalformed, "after its end"),
        (lambda d: _edit(d, len(d) - 10, b"\1"), StreamMalformed, "after its end"),
        (lambda d: _edit(d, END + BLOCK + 3, b"\1"), StreamMalformed, "lone zero block"),
        (lambda d: d[:300], StreamCutShort, "cut short"),
        (lambda d: d[: BLOCK + 100], StreamCutShort, "inside sealfs.header"),
        (lambda d: d[: 4 * BLOCK], StreamCutShort, "cut short"),
        (lambda d: d[:END], StreamCutShort, "cut short"),
        (lambda d: d[: END + BLOCK + 5], StreamCutShort, "end marker"),
        (lambda d: b"", StreamCutShort, "cut short"),
    ],
)
def test_damage_and_cuts_refused(
    damage: Callable[[bytes], bytes], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        read_all(damage(written()))


def test_writer_reports_a_reader_that_went_away() -> None:
    """The importer refused the stream or the connection dropped: a one-line StorageError
    for the exporter, not a BrokenPipeError."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "wb") as out:
        tar = TarWriter(out)
        with pytest.raises(StorageError, match="went away"):
            tar.add_bytes("sealfs.header", bytes(1 << 20))
        with contextlib.suppress(BrokenPipeError):
            out.close()
