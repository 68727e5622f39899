"""Codec: compress-then-seal, and verify-then-decompress, of everything the store holds.

Each object is sealed with associated data (AD) naming exactly what it is: the volume, the
inode, the block index and the object's own id. An object moved to another name, another file,
another position or another volume therefore fails authentication, and the metadata's record
of which object id is current makes an older copy of the same block or record fail too.

Pure functions of their inputs (byte layouts, associated data, compress + seal); safe to call
from worker threads. Callers go through :class:`sealfs.sealed.objects.SealedObjects`, which picks
the key and the identity of each object.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import lz4.block

from sealfs.crypto import AEAD_OVERHEAD, SEAL_OVERHEAD, ObjectSealer, label, random_bytes
from sealfs.errors import IntegrityError

CODEC_RAW = 0
CODEC_LZ4 = 1
#: Set in a block's codec byte when it was sealed with a key per message (format 2); a
#: block without it is format 1, sealed directly under its inode's key.
CODEC_KEYED = 2
_RAW = bytes([CODEC_RAW | CODEC_KEYED])
_LZ4 = bytes([CODEC_LZ4 | CODEC_KEYED])
CHECKPOINT_MAGIC = b"SFCK"
#: 2: sealed with a key per message, and keeps the heads back to the last anchored commit;
#: 1 (format-1 volumes: the journal key, no chain of heads) is still read.
CHECKPOINT_VERSION = 2
COMMIT_RECORD_VERSION = 2  # 2 carries inode record objects in the frame; 1 is still read

_FRAME_HEAD = struct.Struct(">II")  # length, crc32 of the length
FRAME_HEADER = _FRAME_HEAD.size
_REC_HEAD = struct.Struct(">BQQQI")  # version, seq, next_ino, reserved, n_updates
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_PAIR = struct.Struct(">QQ")
#: Largest commit number, journal generation and inode counter a reader accepts: one more must
#: still fit the u64 of an associated data label, and KMS epochs are at most 2^63 - 1.
MAX_COUNTER = 2**63 - 1

# Size limits (docs/format.md, "Size limits"): a stored object, checkpoint or declared length
# beyond them is damage, refused before anything of that size is read or allocated.
#: A sealed inode record (its block map is 16 bytes a block, a directory entry <= 265 bytes).
RECORD_OBJECT_MAX = 256 << 20
#: Blocks a file's block map may name (16 bytes each), leaving 1 MiB of its record for the rest:
#: writers refuse a write beyond ``MAX_FILE_BLOCKS * block_size`` with EFBIG.
MAX_FILE_BLOCKS = (RECORD_OBJECT_MAX - (1 << 20)) // 16
#: Inodes a checkpoint table may hold, and so the largest checkpoint file.
MAX_INODES = 1 << 24
#: Heads a checkpoint's chain may hold (commits since the last one known anchored): 4 Mi
#: commits made without reaching the KMS; a writer never keeps more (docs/format.md).
MAX_CHAIN = 1 << 22
CHECKPOINT_MAX = 5 + SEAL_OVERHEAD + 64 + 16 * MAX_INODES + 8 + 32 * MAX_CHAIN
_LZ4_SIZE = struct.Struct("<I")  # lz4.block's store_size prefix: the decompressed length


def block_object_max(block_size: int) -> int:
    """The largest block object: a codec byte and a sealed full block (lz4 only when
    smaller)."""
    return 1 + SEAL_OVERHEAD + block_size


def new_object_id() -> int:
    """A fresh random 64-bit object id (never 0). Random ids are never reused, not even after
    a crash, so an orphan left by an interrupted write can never pose as a live object."""
    return int.from_bytes(random_bytes(8), "big") or 1


class CodecError(IntegrityError, ValueError):
    """Authenticated data that does not decode (unknown codec, bad framing, a counter out of
    range)."""


def _check_counters(what: str, *values: int) -> None:
    if max(values) > MAX_COUNTER:
        raise CodecError(f"{what} counter out of range")


# --- data blocks -----------------------------------------------------------------------------


def block_ad(volume_id: bytes, ino: int, index: int, oid: int) -> bytes:
    return label("block", volume_id, ino, index, oid)


def block_overhead(codec: int | None) -> int:
    """Bytes a block object with this codec byte adds to its payload (an empty object,
    ``None``, counts as format 2)."""
    return 1 + (AEAD_OVERHEAD if codec is not None and not codec & CODEC_KEYED else SEAL_OVERHEAD)


def seal_block(sealer: ObjectSealer, ad: bytes, data: bytes, compress: bool) -> bytes:
    """Compress (when it helps) and seal one block: ``codec byte || sealed``.

    The codec byte is in the clear (the size already shows compressibility) and bound into
    the associated data, so the plaintext is never copied just to prefix it.
    """
    if compress and data:
        packed = lz4.block.compress(data, store_size=True)
        if len(packed) < len(data):
            return _LZ4 + sealer.seal(packed, ad + _LZ4)
    return _RAW + sealer.seal(data, ad + _RAW)


def open_block(sealer: ObjectSealer, ad: bytes, blob: bytes, block_size: int) -> bytes:
    codec = blob[:1]
    if codec and codec[0] & CODEC_KEYED:
        body = sealer.open(memoryview(blob)[1:], ad + codec)  # AuthError for unknown codecs
    else:
        body = sealer.open_legacy(memoryview(blob)[1:], ad + codec)
    if codec[0] & CODEC_LZ4:
        if len(body) < _LZ4_SIZE.size or _LZ4_SIZE.unpack_from(body)[0] > block_size:
            raise CodecError("lz4 block declares more than the volume block size")
        try:
            data: bytes = lz4.block.decompress(body)
        except Exception as e:  # lz4 raises its own LZ4BlockError
            raise CodecError(f"lz4 block does not decompress: {e}") from None
    else:
        data = body
    if len(data) > block_size:
        raise CodecError("block larger than the volume block size")
    return data


def reseal_block(sealer: ObjectSealer, ad: bytes, blob: bytes) -> bytes | None:
    """The block object ``blob`` sealed again under the newest key of ``sealer``, with the
    same payload (an lz4 block stays compressed; a format-1 block becomes format 2), or None
    if the newest key already opens it (a re-key skips it)."""
    codec = blob[:1]
    if codec and codec[0] & CODEC_KEYED:
        body, newest = sealer.open_aged(memoryview(blob)[1:], ad + codec)
        if newest:
            return None
    else:
        body = sealer.open_legacy(memoryview(blob)[1:], ad + codec)
    keyed = _LZ4 if codec[0] & CODEC_LZ4 else _RAW  # authentic: no other bits are set
    return keyed + sealer.seal(body, ad + keyed)


# --- inode records ---------------------------------------------------------------------------


def inode_ad(volume_id: bytes, ino: int, oid: int) -> bytes:
    return label("inode", volume_id, ino, oid)


# --- journal commit records ------------------------------------------------------------------


@dataclass
class Commit:
    """One atomic metadata commit: new record object ids for some inodes, removal of others.

    ``seq`` is volume-global and strictly increasing (it doubles as the volume epoch);
    ``next_ino`` is the inode counter after the commit. ``carried`` holds, by object id, the
    inode and the sealed bytes of objects (records and blocks) that travel inside this commit
    instead of as files of their own (docs/format.md, "Objects carried in the journal").
    """

    seq: int
    next_ino: int
    updates: dict[int, int] = field(default_factory=dict)
    deletes: list[int] = field(default_factory=list)
    carried: dict[int, tuple[int, bytes]] = field(default_factory=dict)

    def encode(self) -> bytes:
        out = [_REC_HEAD.pack(COMMIT_RECORD_VERSION, self.seq, self.next_ino, 0, len(self.updates))]
        out += [_PAIR.pack(ino, oid) for ino, oid in self.updates.items()]
        out.append(_U32.pack(len(self.deletes)))
        out += [_U64.pack(ino) for ino in self.deletes]
        out.append(_U32.pack(len(self.carried)))
        for oid, (ino, blob) in self.carried.items():
            out += [_PAIR.pack(oid, ino), _U32.pack(len(blob)), blob]
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> Commit:
        try:
            version, seq, next_ino, _, n = _REC_HEAD.unpack_from(data, 0)
            if version not in (1, COMMIT_RECORD_VERSION):
                raise CodecError(f"commit record version {version} is not supported")
            pos = _REC_HEAD.size
            updates, carried = {}, {}
            for _ in range(n):
                ino, oid = _PAIR.unpack_from(data, pos)
                updates[ino] = oid
                pos += _PAIR.size
            (nd,) = _U32.unpack_from(data, pos)
            pos += 4
            deletes = [_U64.unpack_from(data, pos + 8 * i)[0] for i in range(nd)]
            pos += 8 * nd
            if version >= 2:
                (nc,) = _U32.unpack_from(data, pos)
                pos += 4
                for _ in range(nc):
                    (oid, ino), (size,) = (
                        _PAIR.unpack_from(data, pos),
                        _U32.unpack_from(data, pos + 16),
                    )
                    pos += 20
                    if not size or pos + size > len(data) or oid in carried:
                        raise CodecError("malformed carried object")
                    carried[oid] = (ino, data[pos : pos + size])
                    pos += size
            if pos != len(data):
                raise CodecError("trailing bytes in commit record")
            _check_counters("commit record", seq, next_ino)
        except struct.error as e:
            raise CodecError(f"malformed commit record: {e}") from None
        return cls(seq, next_ino, updates, deletes, carried)


def journal_ad(volume_id: bytes, gen: int, seq: int) -> bytes:
    return label("journal", volume_id, gen, seq)


def _length_check(n: int) -> int:
    return zlib.crc32(b"sealfs-frame" + n.to_bytes(4, "big"))


def frame(sealed: bytes) -> bytes:
    """``u32 length ‖ u32 crc32("sealfs-frame" ‖ length) ‖ sealed``. The checksum lets a reader
    tell a torn append (a length that runs past the end of the file) from a corrupted length
    in the middle of the journal."""
    return _FRAME_HEAD.pack(len(sealed), _length_check(len(sealed))) + sealed


def split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], int, bool]:
    """Split a journal file into complete frames ``(offset, sealed)``; also return where they
    end, and whether what follows starts with a header whose checksum is wrong.

    What a crash can leave after the last complete frame: a partial header, a correct header
    whose data runs past the end of the file, zeros (the file grew before its data reached the
    disk), or, on file systems that do not order data before size, stale bytes. Only the last
    case has a bad checksum, and so does a damaged length in the middle of the journal; the
    caller tells them apart with :func:`frames_after`.
    """
    frames: list[tuple[int, bytes]] = []
    pos = 0
    while pos + FRAME_HEADER <= len(data):
        n, check = _FRAME_HEAD.unpack_from(data, pos)
        if n == 0 and check == 0:
            break
        if check != _length_check(n):
            return frames, pos, True
        if pos + FRAME_HEADER + n > len(data):
            break
        frames.append((pos, data[pos + FRAME_HEADER : pos + FRAME_HEADER + n]))
        pos += FRAME_HEADER + n
    return frames, pos, False


def frames_after(data: bytes, start: int) -> Iterator[tuple[int, memoryview]]:
    """Every position after ``start`` holding a well-formed frame (checked header, data within
    the file), in order: candidates for "is there a real commit behind this damage?".

    Linear in the bytes scanned: a C-level search skips every position whose first length byte
    already runs past the end of the file, or that starts an all-zero header (together, all
    but about 1 in 256 positions of random bytes). Frames are views into ``data``, not copies.
    """
    view, end = memoryview(data), len(data) - FRAME_HEADER
    top = min(255, max(0, end - start) >> 24)  # the largest first byte of a fitting length
    plausible = re.compile(rb"(?=[\x00-" + re.escape(bytes([top])) + rb"])(?!\x00{4})")
    for match in plausible.finditer(data, start + 1, end + 1):
        pos = match.start()
        n, check = _FRAME_HEAD.unpack_from(data, pos)
        if n and pos + FRAME_HEADER + n <= len(data) and check == _length_check(n):
            yield pos, view[pos + FRAME_HEADER : pos + FRAME_HEADER + n]


# --- checkpoints -----------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """The whole inode table at one commit, plus where the journal continues."""

    gen: int  # journal file generation that follows this checkpoint
    seq: int  # last commit sequence number included
    next_ino: int
    head: bytes  # running digest of all commits (the volume root, see docs/format.md)
    table: dict[int, int]
    #: heads of commits ``seq - k .. seq - 1`` (32 bytes each): back to the oldest commit the
    #: KMS may hold as the anchor, so a freshness check still finds it (docs/format.md)
    chain: bytes = b""

    def encode(self) -> bytes:
        out = [
            struct.pack(">QQQ", self.gen, self.seq, self.next_ino),
            self.head,
            _U64.pack(len(self.table)),
        ]
        out += [_PAIR.pack(ino, oid) for ino, oid in self.table.items()]
        out += [_U64.pack(len(self.chain) // 32), self.chain]
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes, version: int = CHECKPOINT_VERSION) -> Checkpoint:
        try:
            gen, seq, next_ino = struct.unpack_from(">QQQ", data, 0)
            head = data[24:56]
            (n,) = _U64.unpack_from(data, 56)
            end = 64 + 16 * n
            if end > len(data):
                raise CodecError("checkpoint table length mismatch")
            k = _U64.unpack_from(data, end)[0] if version > 1 else 0  # version 1: no chain
            chain_at = end + 8 if version > 1 else end
            if chain_at + 32 * k != len(data) or k > min(seq, MAX_CHAIN):
                raise CodecError("checkpoint length mismatch")
            table = dict(_PAIR.iter_unpack(data[64:end]))
            _check_counters("checkpoint", gen, seq, next_ino)
        except struct.error as e:
            raise CodecError(f"malformed checkpoint: {e}") from None
        return cls(gen, seq, next_ino, head, table, data[chain_at:])


def checkpoint_ad(
    volume_id: bytes, version: int = CHECKPOINT_VERSION, rekeying: bool = False
) -> bytes:
    """The checkpoint's associated data; one written while a re-key is in progress says so
    (docs/format.md, "Re-key"), so that it cannot pass for one written after it finished."""
    if rekeying:
        return label("checkpoint", volume_id, version, "rekey")
    return label("checkpoint", volume_id, version)


def seal_checkpoint(
    sealer: ObjectSealer, volume_id: bytes, cp: Checkpoint, rekeying: bool = False
) -> bytes:
    return (
        CHECKPOINT_MAGIC
        + bytes([CHECKPOINT_VERSION])
        + sealer.seal(cp.encode(), checkpoint_ad(volume_id, rekeying=rekeying))
    )


def open_checkpoint(sealer: ObjectSealer, volume_id: bytes, blob: bytes) -> Checkpoint:
    version = _checkpoint_version(blob, rekeying=False)
    if version == 1:
        body = sealer.open_legacy(blob[5:], checkpoint_ad(volume_id, 1))
    else:
        body = sealer.open(blob[5:], checkpoint_ad(volume_id))
    return Checkpoint.decode(body, version)


def open_checkpoint_aged(
    sealer: ObjectSealer, volume_id: bytes, blob: bytes, rekeying: bool = False
) -> tuple[Checkpoint, bool]:
    """The checkpoint (with the re-key mark if ``rekeying``), and whether the newest key
    generation of ``sealer`` opened it (a format-1 checkpoint never counts as newest)."""
    version = _checkpoint_version(blob, rekeying)
    if version == 1:
        body, newest = sealer.open_legacy(blob[5:], checkpoint_ad(volume_id, 1)), False
    else:
        body, newest = sealer.open_aged(blob[5:], checkpoint_ad(volume_id, rekeying=rekeying))
    return Checkpoint.decode(body, version), newest


def _checkpoint_version(blob: bytes, rekeying: bool) -> int:
    """The format version of a checkpoint file (1 never carries the re-key mark)."""
    if blob[:4] != CHECKPOINT_MAGIC:
        raise CodecError("not a sealfs checkpoint")
    version = blob[4] if len(blob) > 4 else 0
    if version == CHECKPOINT_VERSION or (version == 1 and not rekeying):
        return version
    raise CodecError(f"checkpoint version {blob[4:5].hex()} is not supported")
