"""The tar stream of ``sealfs migrate export -`` and ``sealfs luks export -``: written and read
here, by exactly one small format, because the stream arrives from a hostile host.

CPython's ``tarfile`` reads pax and GNU extended headers without any bound (a header that
claims 300 MiB is read into memory), follows a dozen member types and two legacy formats. The
streams sealfs writes need none of that: every member is a regular file with a short ASCII
name. So the writer emits POSIX ustar headers only (any ``tar -t`` lists the stream), and the
reader accepts exactly that, plus a pax extended header of at most :data:`MAX_PAX_BYTES`
carrying only ``path`` and ``size`` (what another POSIX writer may emit for a long name or
a large file); everything else is refused before its content is read. docs/format.md
("Migration bundle") specifies the format for a second implementation.

Every read is bounded: a header is 512 bytes, a member's content is handed out in the
caller's pieces up to the size its header declares, and memory never depends on what a
header claims.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from typing import IO

from sealfs.errors import IntegrityError, StorageError

BLOCK = 512
#: tar's usual blocking: the end-of-archive marker is padded to a multiple of this.
RECORD = 20 * BLOCK
#: A pax extended header larger than this is refused unread.
MAX_PAX_BYTES = 64 * 1024
#: The largest size a ustar header's 11 octal digits can state.
MAX_USTAR_SIZE = 8**11 - 1
MAX_NAME = 100
#: A pax ``path`` longer than this is refused: no name of a bundle comes near it, and errors
#: that name a member stay one short line.
MAX_PAX_PATH = 255
_MAGIC = b"ustar\x0000"
_PAX_KEYS = frozenset({"path", "size"})
_TYPE_NAMES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"g": "a pax global header",
    b"L": "a GNU long name",
    b"K": "a GNU long link name",
    b"S": "a GNU sparse file",
}

Read = Callable[[int], bytes]


class StreamCutShort(IntegrityError):
    """The stream ended before the end-of-archive marker (a dropped pipe, a killed sender)."""

    kind = "stream-cut-short"


class StreamMalformed(IntegrityError):
    """The stream is not the tar format sealfs writes (damaged, or crafted by the host)."""

    kind = "stream-malformed"


# -- writing -------------------------------------------------------------------------------------


class TarWriter:
    """Writes regular-file members, then the end marker (:meth:`close`), to ``out``."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._written = 0

    def add(self, name: str, size: int, read: Read) -> None:
        """One member ``name`` of ``size`` bytes, read through ``read`` (a file that yields
        fewer, because it shrank since its size was taken, is a StorageError)."""
        self._emit(ustar_header(name, size))
        left = size
        while left:
            piece = read(min(left, 1 << 20))
            if not piece:
                raise StorageError(f"{name} shrank while it was being sent")
            self._emit(piece)
            left -= len(piece)
        self._emit(bytes(-size % BLOCK))

    def add_bytes(self, name: str, data: bytes) -> None:
        """One member ``name`` holding ``data``."""
        self.add(name, len(data), io.BytesIO(data).read)

    def close(self) -> None:
        """The end-of-archive marker: two zero blocks, padded to a whole record; flushed."""
        self._emit(bytes(2 * BLOCK))
        self._emit(bytes(-self._written % RECORD))
        with _reader_gone():
            self._out.flush()

    def _emit(self, data: bytes) -> None:
        if data:
            with _reader_gone():
                self._out.write(data)
            self._written += len(data)


@contextlib.contextmanager
def _reader_gone() -> Iterator[None]:
    """A closed pipe (the importer refused the stream, or the connection dropped) is the
    export's one-line error, not a crash."""
    try:
        yield
    except BrokenPipeError:
        raise StorageError(
            "the stream's reader went away (broken pipe): see the importing side's error"
        ) from None


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file (mode 0600, owner 0, time 0)."""
    raw = name.encode("ascii")
    if not 0 < len(raw) <= MAX_NAME or b"\0" in raw or not 0 <= size <= MAX_USTAR_SIZE:
        raise ValueError(f"{name!r} ({size} bytes) does not fit a ustar header")
    block = bytearray(BLOCK)
    block[0 : len(raw)] = raw
    block[100:108] = b"0000600\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = b"0"
    block[257:265] = _MAGIC
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


# -- reading -------------------------------------------------------------------------------------


class Member:
    """One regular file of the stream: its ``name``, ``size``, and its content through
    :meth:`read` (at most ``size`` bytes in all; the stream ending earlier is StreamCutShort)."""

    def __init__(self, reader: TarReader, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.left = size
        self._reader = reader

    def read(self, n: int) -> bytes:
        """Up to ``n`` more bytes of the content; b"" once all of it was read."""
        if n <= 0 or not self.left:
            return b""
        piece = self._reader.read_some(min(n, self.left), f"inside {self.name}")
        self.left -= len(piece)
        return piece

    def read_all(self) -> bytes:
        """The whole (remaining) content: only for members the caller has bounded by size."""
        data = self._reader.read_exact(self.left, f"inside {self.name}")
        self.left = 0
        return data


class TarReader:
    """The members of a stream, in order (:meth:`next`), from ``read`` (a file's read)."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self._current: Member | None = None
        self._ended = False

    def next(self) -> Member | None:
        """The next member, or None at the end-of-archive marker (after checking that only
        zero padding follows it). The previous member must have been read to its end."""
        if self._current is not None:
            if self._current.left:
                raise ValueError(f"{self._current.name} was not read to its end")
            self._pad(self._current.size)
            self._current = None
        if self._ended:
            return None
        pax: dict[str, str] = {}
        block = self._block("a member header")
        if block is None:
            return None
        kind = block[156:157]
        if kind == b"x":
            size = self._size(block)
            if size > MAX_PAX_BYTES:
                raise StreamMalformed(
                    f"the stream has a pax header of {size} bytes (at most {MAX_PAX_BYTES})"
                )
            pax = _pax_records(self.read_exact(size, "inside a pax header"))
            self._pad(size)
            block = self._block("the header a pax header belongs to")
            if block is None:
                raise StreamMalformed("the stream ends right after a pax header")
            kind = block[156:157]
        if kind != b"0":
            what = _TYPE_NAMES.get(kind, f"a member of type {kind!r}")
            raise StreamMalformed(f"the stream holds {what}: only regular files belong in it")
        if _field(block[157:257]):
            raise StreamMalformed("the stream holds a regular file with a link name")
        name = pax.get("path") or _name(block)
        size = int(pax["size"]) if "size" in pax else self._size(block)
        self._current = Member(self, name, size)
        return self._current

    def read_exact(self, n: int, where: str) -> bytes:
        """Exactly ``n`` bytes (StreamCutShort if the stream ends first)."""
        parts = []
        while n:
            piece = self.read_some(n, where)
            parts.append(piece)
            n -= len(piece)
        return b"".join(parts)

    def read_some(self, n: int, where: str) -> bytes:
        """Between 1 and ``n`` bytes (StreamCutShort if the stream has ended)."""
        piece = self._read(n)
        if not piece:
            raise StreamCutShort(f"the stream is cut short ({where})")
        return piece

    def _block(self, what: str) -> bytes | None:
        """The next header block, checked; None (and the stream's end checked) if it is
        the first block of the end marker."""
        block = self.read_exact(BLOCK, f"in {what}")
        if not any(block):
            self._end()
            return None
        if block[257:265] != _MAGIC:
            raise StreamMalformed("the stream is not a POSIX ustar archive (bad magic)")
        stated = _octal(block[148:156], "checksum")
        if stated != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise StreamMalformed("a header of the stream fails its checksum (damaged)")
        return block

    def _end(self) -> None:
        """After the first zero block: a second one, then at most a record of zero padding
        and the end of the stream."""
        self._ended = True
        if any(self.read_exact(BLOCK, "in its end marker")):
            raise StreamMalformed("the stream's end marker is broken (a lone zero block)")
        padding = 0
        while piece := self._read(BLOCK):
            padding += len(piece)
            if any(piece) or padding > RECORD:
                raise StreamMalformed("the stream goes on after its end marker")

    def _pad(self, size: int) -> None:
        if any(self.read_exact(-size % BLOCK, "in a member's padding")):
            raise StreamMalformed("a member's padding is not zero")

    def _size(self, block: bytes) -> int:
        return _octal(block[124:136], "size")


def _field(raw: bytes) -> bytes:
    """A NUL-terminated header field: its text, which only NULs may follow."""
    text, _, rest = raw.partition(b"\0")
    if any(rest):
        raise StreamMalformed("a header field of the stream has data after its end")
    return text


def _octal(raw: bytes, what: str) -> int:
    """A numeric header field: octal digits, maybe space-padded, ended by NUL or space."""
    text = raw.replace(b"\0", b" ").strip(b" ")
    if not text or any(c not in b"01234567" for c in text):
        raise StreamMalformed(f"a header of the stream has a bad {what} field")
    return int(text, 8)


def _name(block: bytes) -> str:
    name, prefix = _field(block[0:100]), _field(block[345:500])
    full = prefix + b"/" + name if prefix else name
    try:
        return full.decode("ascii")
    except UnicodeDecodeError:
        raise StreamMalformed("a member name of the stream is not ASCII") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """The records ``LEN KEY=VALUE\\n`` of a pax header: only ``path`` and ``size``, once
    each, with a size of decimal digits."""
    records: dict[str, str] = {}
    while data:
        length_text, space, _ = data[:20].partition(b" ")
        if not space or not length_text.isdigit() or length_text.startswith(b"0"):
            raise StreamMalformed("a pax header of the stream is malformed")
        length = int(length_text)
        record, data = data[:length], data[length:]
        key, equals, value = record[len(length_text) + 1 :].partition(b"=")
        if len(record) != length or not equals or not value.endswith(b"\n"):
            raise StreamMalformed("a pax header of the stream is malformed")
        try:
            key_text, value_text = key.decode("ascii"), value[:-1].decode("ascii")
        except UnicodeDecodeError:
            raise StreamMalformed("a pax header of the stream is not ASCII") from None
        if key_text not in _PAX_KEYS or key_text in records:
            raise StreamMalformed(f"the stream's pax header holds {key_text[:40]!r}")
        if key_text == "size" and not (value_text.isdigit() and len(value_text) <= 20):
            raise StreamMalformed("the stream's pax header has a bad size")
        if key_text == "path" and not 0 < len(value_text) <= MAX_PAX_PATH:
            raise StreamMalformed(
                f"the stream's pax header has a path that is empty or longer than "
                f"{MAX_PAX_PATH} bytes"
            )
        records[key_text] = value_text
    return records
