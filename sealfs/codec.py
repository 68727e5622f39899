"""Codec: compress-then-seal, and verify-then-decompress, of everything the store holds.

Each object is sealed with associated data (AD) naming exactly what it is: the volume, the
inode, the block index and the object's own id. An object moved to another name, another file,
another position or another volume therefore fails authentication, and the metadata's record
of which object id is current makes an older copy of the same block or record fail too.

Pure functions of their inputs; safe to call from worker threads.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import lz4.block

from sealfs.crypto import Sealer, label, random_bytes

CODEC_RAW = 0
CODEC_LZ4 = 1
_RAW = bytes([CODEC_RAW])
_LZ4 = bytes([CODEC_LZ4])
CHECKPOINT_MAGIC = b"SFCK"
CHECKPOINT_VERSION = 2  # 2 keeps the heads back to the last anchored commit; 1 is still read
RECORD_VERSION = 2  # 2 carries inode record objects in the frame; 1 is still read

_FRAME_HEAD = struct.Struct(">II")  # length, crc32 of the length
FRAME_HEADER = _FRAME_HEAD.size
_REC_HEAD = struct.Struct(">BQQQI")  # version, seq, next_ino, reserved, n_updates
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_PAIR = struct.Struct(">QQ")


def new_object_id() -> int:
    """A fresh random 64-bit object id (never 0). Random ids are never reused, not even after
    a crash, so an orphan left by an interrupted write can never pose as a live object."""
    return int.from_bytes(random_bytes(8), "big") or 1


class CodecError(ValueError):
    """Authenticated data that does not decode (unknown codec, bad framing)."""


# --- data blocks -----------------------------------------------------------------------------

def block_ad(volume_id: bytes, ino: int, index: int, oid: int) -> bytes:
    return label("block", volume_id, ino, index, oid)


def seal_block(sealer: Sealer, ad: bytes, data: bytes, compress: bool) -> bytes:
    """Compress (when it helps) and seal one block: ``codec byte || nonce || ct || tag``.

    The codec byte is in the clear (the size already shows compressibility) and bound into
    the associated data, so the plaintext is never copied just to prefix it.
    """
    if compress and data:
        packed = lz4.block.compress(data, store_size=True)
        if len(packed) < len(data):
            return _LZ4 + sealer.seal(packed, ad + _LZ4)
    return _RAW + sealer.seal(data, ad + _RAW)


def open_block(sealer: Sealer, ad: bytes, blob: bytes, block_size: int) -> bytes:
    codec = blob[:1]
    body = sealer.open(memoryview(blob)[1:], ad + codec)  # AuthError for unknown codecs too
    if codec == _LZ4:
        try:
            data = lz4.block.decompress(body)
        except Exception as e:  # lz4 raises its own LZ4BlockError
            raise CodecError(f"lz4 block does not decompress: {e}") from None
    else:
        data = body
    if len(data) > block_size:
        raise CodecError("block larger than the volume block size")
    return data


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
        out = [_REC_HEAD.pack(RECORD_VERSION, self.seq, self.next_ino, 0, len(self.updates))]
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
            if version not in (1, RECORD_VERSION):
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
                    (oid, ino), (size,) = _PAIR.unpack_from(data, pos), _U32.unpack_from(
                        data, pos + 16)
                    pos += 20
                    if not size or pos + size > len(data) or oid in carried:
                        raise CodecError("malformed carried object")
                    carried[oid] = (ino, data[pos:pos + size])
                    pos += size
            if pos != len(data):
                raise CodecError("trailing bytes in commit record")
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
    frames = []
    pos = 0
    while pos + FRAME_HEADER <= len(data):
        n, check = _FRAME_HEAD.unpack_from(data, pos)
        if n == 0 and check == 0:
            break
        if check != _length_check(n):
            return frames, pos, True
        if pos + FRAME_HEADER + n > len(data):
            break
        frames.append((pos, data[pos + FRAME_HEADER:pos + FRAME_HEADER + n]))
        pos += FRAME_HEADER + n
    return frames, pos, False


def frames_after(data: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    """Every position after ``start`` holding a well-formed frame (checked header, data within
    the file): candidates for "is there a real commit behind this damage?"."""
    for pos in range(start + 1, len(data) - FRAME_HEADER + 1):
        n, check = _FRAME_HEAD.unpack_from(data, pos)
        if n and check == _length_check(n) and pos + FRAME_HEADER + n <= len(data):
            yield pos, data[pos + FRAME_HEADER:pos + FRAME_HEADER + n]


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
        out = [struct.pack(">QQQ", self.gen, self.seq, self.next_ino), self.head,
               _U64.pack(len(self.table))]
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
            k = _U64.unpack_from(data, end)[0] if version > 1 else 0  # version 1: no chain
            chain_at = end + 8 if version > 1 else end
            if chain_at + 32 * k != len(data) or k > seq:
                raise CodecError("checkpoint length mismatch")
            table = dict(_PAIR.iter_unpack(data[64:end]))
        except struct.error as e:
            raise CodecError(f"malformed checkpoint: {e}") from None
        return cls(gen, seq, next_ino, head, table, data[chain_at:])


def checkpoint_ad(volume_id: bytes, version: int = CHECKPOINT_VERSION) -> bytes:
    return label("checkpoint", volume_id, version)


def seal_checkpoint(sealer: Sealer, volume_id: bytes, cp: Checkpoint) -> bytes:
    return CHECKPOINT_MAGIC + bytes([CHECKPOINT_VERSION]) + sealer.seal(
        cp.encode(), checkpoint_ad(volume_id))


def open_checkpoint(sealer: Sealer, volume_id: bytes, blob: bytes) -> Checkpoint:
    if blob[:4] != CHECKPOINT_MAGIC:
        raise CodecError("not a sealfs checkpoint")
    version = blob[4] if len(blob) > 4 else 0
    if version not in (1, CHECKPOINT_VERSION):
        raise CodecError(f"checkpoint version {blob[4:5].hex()} is not supported")
    return Checkpoint.decode(sealer.open(blob[5:], checkpoint_ad(volume_id, version)), version)
