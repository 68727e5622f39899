"""Fuzz targets: every parser of bytes a hostile host, disk or network peer controls.

Each target takes one input (bytes) and feeds it to one parser the way sealfs itself does.
The property every target checks: the parser returns, or raises the project's own error type
(:class:`sealfs.errors.SealfsError`; for the KMS server also its :class:`ProtocolError`, which
becomes an HTTP error). Anything else - RecursionError, OverflowError, struct.error,
MemoryError, KeyError, IndexError... - escapes as an "internal error" and is a finding.

Where a parser sits behind authentication (journal records, inode records, lz4 payloads), the
target seals its input with a fixed test key first, so that the fuzzer reaches the code that
runs on authenticated bytes (a key holder's bug, or a future writer, must not crash a reader).
The first input byte selects a variant of a target where there are several.

Used by tests/fuzz/test_fuzz.py (seed corpus replay, short fuzz runs) and tools/fuzz.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sealfs.attest import dcap, quote, simulated
from sealfs.attest.eventlog import identity_from_log, replay
from sealfs.crypto import Secret, VolumeKeys
from sealfs.errors import SealfsError
from sealfs.fs.metalog import MetaLog
from sealfs.kms import protocol
from sealfs.kms.service import KmsService
from sealfs.kms.store import KmsStore
from sealfs.luks import header as luks
from sealfs.luks import profile as P
from sealfs.sealed import codec
from sealfs.sealed.inode import Inode
from sealfs.sealed.objects import SealedObjects
from sealfs.store import CHECKPOINT_NAME, ObjectStore, journal_name
from sealfs.volume.header import Header, KeyFileCredential

KEY = Secret(hashlib.sha256(b"sealfs fuzz master key").digest())
VOLUME_ID = bytes(range(16))
KEYS = VolumeKeys(KEY, VOLUME_ID)
BLOCK_SIZE = 1 << 17


@dataclass(frozen=True)
class Target:
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...] = (SealfsError,)


def _mode(data: bytes, n: int) -> tuple[int, bytes]:
    return (data[0] % n, data[1:]) if data else (0, b"")


def _sections(data: bytes) -> tuple[list[bytes], bytes]:
    """Split ``count (u8) ‖ count × (u16 length ‖ bytes) ‖ tail``; what does not fit is tail."""
    if not data:
        return [], b""
    out, pos = [], 1
    for _ in range(data[0] % 8):
        if pos + 2 > len(data):
            break
        (n,) = struct.unpack_from(">H", data, pos)
        out.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return out, data[pos:]


# --- volume header ---------------------------------------------------------------------------

_KEYFILE = KeyFileCredential(Secret(bytes(64)))


def volume_header(data: bytes) -> None:
    """What ``load_header`` + unlock with a key file do with the header bytes."""
    header = Header.from_bytes(data)
    header.public_info()
    header.to_bytes()
    header.unlock(_KEYFILE)


# --- journal, checkpoint and commit records --------------------------------------------------


class _Scratch:
    """One real backing directory per process, rewritten for every input."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sealfs-fuzz-"))
        (self.root / "objects").mkdir()
        self.store = ObjectStore(self.root)

    def write(self, checkpoint: bytes, gen: int, journal: bytes) -> None:
        for old in self.root.glob("journal.*"):
            old.unlink()
        (self.root / CHECKPOINT_NAME).write_bytes(checkpoint)
        (self.root / journal_name(gen)).write_bytes(journal)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_scratch: _Scratch | None = None


def _store() -> _Scratch:
    global _scratch
    if _scratch is None:
        _scratch = _Scratch()
        atexit.register(_scratch.close)
    return _scratch


def _sealed_checkpoint(body: bytes) -> bytes:
    return (
        codec.CHECKPOINT_MAGIC
        + bytes([codec.CHECKPOINT_VERSION])
        + KEYS.journal.seal(body, codec.checkpoint_ad(VOLUME_ID))
    )


_DEFAULT_CP = codec.Checkpoint(1, 0, 2, bytes(32), {1: 7})


def journal(data: bytes) -> None:
    """Replay of a checkpoint and its journal (``MetaLog.load``), in three variants:
    0: raw journal bytes after a valid checkpoint (framing, torn tails, the damage search);
    1: sections = checkpoint body, then commit records, sealed here, then a raw tail;
    2: raw checkpoint file bytes."""
    mode, rest = _mode(data, 3)
    scratch = _store()
    if mode == 0:
        scratch.write(_sealed_checkpoint(_DEFAULT_CP.encode()), 1, rest)
    elif mode == 1:
        parts, tail = _sections(rest)
        body = parts[0] if parts else _DEFAULT_CP.encode()
        try:
            cp = codec.Checkpoint.decode(body)
            gen, seq = cp.gen, cp.seq
        except codec.CodecError:
            gen, seq = 1, 0
        frames = [
            codec.frame(KEYS.journal.seal(record, codec.journal_ad(VOLUME_ID, gen, s)))
            for s, record in enumerate(parts[1:], seq + 1)
        ]
        scratch.write(_sealed_checkpoint(body), gen, b"".join(frames) + tail)
    else:
        scratch.write(rest, 1, b"")
    MetaLog(scratch.store, SealedObjects(KEYS, BLOCK_SIZE)).load()


# --- inode records and data blocks -----------------------------------------------------------


def record(data: bytes) -> None:
    """An authenticated inode record (first byte: the inode number), parsed and re-encoded."""
    ino, rest = (data[0] or 1, data[1:]) if data else (1, b"")
    node = Inode.from_record(ino, rest)
    Inode.from_record(ino, node.to_record())


def lz4_block(data: bytes) -> None:
    """An authenticated data block of codec lz4 (the payload is the fuzz input), opened as
    reads and the checker open it."""
    ad = codec.block_ad(VOLUME_ID, 5, 0, 9)
    sealer = KEYS.inode(5)
    blob = codec._LZ4 + sealer.seal(data, ad + codec._LZ4)
    codec.open_block(sealer, ad, blob, BLOCK_SIZE)


# --- LUKS2 header ----------------------------------------------------------------------------

_AREA = bytearray(P.DATA_OFFSET)
_PROFILES = (P.LuksProfile(), P.LuksProfile(integrity="hmac-sha256", recovery_slot=True))
_UUID = str(uuid.UUID(int=0x5EA1F5)).encode()


def _binary_header(magic: bytes, offset: int, json_area: bytes, subsystem: bytes) -> bytes:
    head = bytearray(luks.BINARY_HEADER_SIZE)
    struct.pack_into(">6sHQQ", head, 0, magic, 2, P.HDR_SIZE, 7)
    head[72 : 72 + 6] = b"sha256"
    head[104 : 104 + 64] = bytes(range(64))
    head[168 : 168 + len(_UUID)] = _UUID
    head[208 : 208 + len(subsystem)] = subsystem
    struct.pack_into(">Q", head, 256, offset)
    copy = bytes(head) + json_area
    head[448 : 448 + 32] = luks.header_checksum(copy)
    return bytes(head)


def luks_header(data: bytes) -> None:
    """``validate_header_area`` and ``validate_rekey_area`` on a header region whose checksums
    are right (so the JSON and field checks run), in two variants: 0: the input is the JSON
    area text; 1: the input is the start of the raw region (binary headers included,
    checksums as given)."""
    mode, rest = _mode(data, 2)
    _AREA[: 2 * P.HDR_SIZE] = bytes(2 * P.HDR_SIZE)
    if mode == 0:
        json_area = rest[: P.JSON_SIZE].ljust(P.JSON_SIZE, b"\0")
        subsystem = b"sealfs-kms-v1" if len(rest) % 2 else b""
        for magic, offset in ((luks.MAGIC_PRIMARY, 0), (luks.MAGIC_SECONDARY, P.HDR_SIZE)):
            _AREA[offset : offset + P.HDR_SIZE] = (
                _binary_header(magic, offset, json_area, subsystem) + json_area
            )
    else:
        _AREA[: len(rest[: 2 * P.HDR_SIZE])] = rest[: 2 * P.HDR_SIZE]
    for profile in _PROFILES:
        with contextlib.suppress(luks.HeaderRefused):
            luks.validate_header_area(_AREA, P.DATA_OFFSET + (1 << 20), profile)
        with contextlib.suppress(luks.HeaderRefused):
            luks.validate_rekey_area(_AREA, P.DATA_OFFSET + (1 << 20), profile)


# --- KMS requests ----------------------------------------------------------------------------

_service: KmsService | None = None


def _kms() -> KmsService:
    global _service
    if _service is None:
        tmp = tempfile.mkdtemp(prefix="sealfs-fuzz-kms-")
        atexit.register(shutil.rmtree, tmp, True)
        store, root = KmsStore.initialize(Path(tmp) / "kms.db", Secret(b"fuzz operator secret"))
        _service = KmsService(store, root)
    return _service


_OPS = tuple(protocol.OP_PATHS)


def kms_request(data: bytes) -> None:
    """A request body as the KMS server parses it (first byte: the operation), then what the
    KMS reads from a parsed request before any key is released: the event log's identity
    and replay, and a simulated quote."""
    mode, body = _mode(data, len(_OPS))
    obj = protocol.parse_json_object(body)
    params, (tee, nonce, public_key, quote_bytes, _, collateral, events) = _kms()._parse(
        _OPS[mode], obj
    )
    replay(events)
    identity = identity_from_log(events)
    if identity.key_provider is not None:
        protocol.parse_key_provider(identity.key_provider)
    protocol.report_data_for(nonce, public_key, params)
    if tee == "simulated":
        simulated.verify_quote(quote_bytes, collateral, 1.7e9)


# --- DCAP quote and collateral ---------------------------------------------------------------


def dcap_quote(data: bytes) -> None:
    """A quote file (binary or hex text) as ``sealfs attest verify`` and the KMS read it."""
    parsed = quote.parse_quote(quote.decode_quote_input(data))
    parsed.report.measurements()


def dcap_collateral(data: bytes) -> None:
    """0: a collateral file; 1: TCB info text; 2: QE identity text; 3: the DER of a PCK
    certificate's SGX extension."""
    mode, rest = _mode(data, 4)
    if mode == 0:
        dcap.parse_collateral(rest)
    elif mode == 1:
        dcap.parse_tcb_info(rest.decode("utf-8", "surrogateescape"))
    elif mode == 2:
        dcap.parse_qe_identity(rest.decode("utf-8", "surrogateescape"))
    else:
        dcap._der_fields(rest, "PCK SGX extension")


TARGETS: dict[str, Target] = {
    "volume_header": Target(volume_header),
    "journal": Target(journal),
    "record": Target(record),
    "lz4_block": Target(lz4_block),
    "luks_header": Target(luks_header),
    "kms_request": Target(kms_request, (SealfsError, protocol.ProtocolError)),
    "dcap_quote": Target(dcap_quote),
    "dcap_collateral": Target(dcap_collateral),
}


def check(name: str, data: bytes) -> None:
    """Run one input; anything but an allowed error propagates (a finding)."""
    target = TARGETS[name]
    with contextlib.suppress(target.allowed):
        target.run(data)
