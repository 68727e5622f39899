"""Parse and strictly validate a LUKS2 header region before cryptsetup ever sees it.

LUKS2 metadata is checksummed but not authenticated: anyone who can write the disk can edit
the JSON and recompute both checksums, and cryptsetup will accept the result. A malicious host
can thereby set the data cipher to ``cipher_null`` (the CVM then writes plaintext), add a
plaintext ``linear`` segment, add tokens (which make cryptsetup load plugins), or add
``requirements`` (which trigger reencryption recovery). So sealfs never asks "is this a LUKS
header?" but "is this *exactly* a header sealfs would have written, for this profile?".

Everything here works on bytes in memory, so the caller can validate the very copy it then
passes to cryptsetup (see :mod:`sealfs.luks.snapshot`). On-disk layout (LUKS2 spec): two copies
of a 4096-byte binary header, each followed by its JSON area, the second copy at ``hdr_size``;
then the keyslot area; then the data segment. All binary integers are big-endian.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from sealfs import strict
from sealfs.errors import LuksError

from . import profile as P

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
BINARY_HEADER_SIZE = 4096
#: Where cryptsetup looks for a secondary header when the primary one is damaged.
SECONDARY_OFFSETS = tuple(0x4000 << i for i in range(9))  # 16 KiB .. 4 MiB

# Field offsets inside the binary header.
_OFF_CSUM_ALG = 72
_OFF_SALT = 104
_OFF_UUID = 168
_OFF_SUBSYSTEM = 208
_OFF_HDR_OFFSET = 256
_OFF_CSUM = 448
_CSUM_LEN = 64

_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
#: The only non-empty subsystem field sealfs writes: the KMS key version of key slot 0.
_KMS_SUBSYSTEM = re.compile(rb"sealfs-kms-v([1-9][0-9]{0,9})")

# Bounds that only stop a crafted header from making the CVM burn memory or time; they are
# wide enough for any cost cryptsetup benchmarks on real hardware.
_ARGON2_TIME = (4, 10_000)
_ARGON2_MEMORY_KIB = (32, 4 * 1024 * 1024)
_ARGON2_THREADS = (1, 16)
_DIGEST_ITERATIONS = (1000, 10_000_000)


class HeaderRefused(LuksError):
    """The header is not one sealfs would have written; it is never handed to cryptsetup."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"LUKS header refused: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class BinaryHeader:
    """One decoded copy of the 4096-byte LUKS2 binary header."""

    magic: bytes
    version: int
    hdr_size: int
    seqid: int
    label: bytes
    checksum_alg: bytes
    uuid: bytes
    subsystem: bytes
    hdr_offset: int
    checksum: bytes
    padding_zero: bool


@dataclass(frozen=True)
class HeaderInfo:
    """What validation established about an accepted header (no secrets in here)."""

    uuid: str
    seqid: int
    keyslots: tuple[int, ...]
    cipher: str
    sector_size: int
    integrity: str | None
    data_offset: int
    data_size: int
    #: KMS key version of key slot 0, recorded in the subsystem field at format time (None:
    #: formatted from a key file). Untrusted input: it only selects which version of *this*
    #: volume's key (bound to the configured app id and volume id) the KMS derives.
    kms_key_version: int | None = None


def kms_subsystem(key_version: int) -> str:
    """The subsystem field that records the KMS key version of a volume's key slot 0."""
    text = f"sealfs-kms-v{key_version}"
    if not _KMS_SUBSYSTEM.fullmatch(text.encode()) or key_version > 2**31 - 1:
        raise LuksError(f"KMS key version {key_version} out of range")
    return text


def parse_binary_header(area: bytes, offset: int) -> BinaryHeader:
    """Decode the binary header at ``offset`` of ``area`` (no validation beyond length)."""
    raw = area[offset : offset + BINARY_HEADER_SIZE]
    if len(raw) < BINARY_HEADER_SIZE:
        raise HeaderRefused(f"header at offset {offset} is truncated")
    version, hdr_size, seqid = struct.unpack_from(">HQQ", raw, 6)
    (hdr_offset,) = struct.unpack_from(">Q", raw, _OFF_HDR_OFFSET)
    padding = raw[_OFF_HDR_OFFSET + 8 : _OFF_CSUM] + raw[_OFF_CSUM + _CSUM_LEN :]
    return BinaryHeader(
        magic=raw[:6],
        version=version,
        hdr_size=hdr_size,
        seqid=seqid,
        label=raw[24:_OFF_CSUM_ALG],
        checksum_alg=raw[_OFF_CSUM_ALG:_OFF_SALT],
        uuid=raw[_OFF_UUID:_OFF_SUBSYSTEM],
        subsystem=raw[_OFF_SUBSYSTEM:_OFF_HDR_OFFSET],
        hdr_offset=hdr_offset,
        checksum=raw[_OFF_CSUM : _OFF_CSUM + _CSUM_LEN],
        padding_zero=not any(padding),
    )


def header_checksum(copy: bytes) -> bytes:
    """SHA-256 over one header copy (binary header + JSON area) with the checksum zeroed."""
    buf = bytearray(copy)
    buf[_OFF_CSUM : _OFF_CSUM + _CSUM_LEN] = bytes(_CSUM_LEN)
    return hashlib.sha256(buf).digest()


def has_magic(area: bytes) -> bool:
    """True if any primary or secondary LUKS magic is present where cryptsetup would look."""
    if area[:6] == MAGIC_PRIMARY:
        return True
    return any(area[off : off + 6] == MAGIC_SECONDARY for off in SECONDARY_OFFSETS)


def load_json_area(raw: bytes, where: str) -> dict[str, Any]:
    """Parse a JSON area: ASCII JSON, then only NUL padding; no duplicate keys, no NaN.

    cryptsetup's parser (json-c) and Python's must not disagree about what the header says,
    so anything either might read differently (duplicates, trailing bytes after the first NUL,
    non-ASCII) is refused rather than interpreted.
    """
    end = raw.find(b"\0")
    if end < 0:
        raise HeaderRefused(f"{where}: JSON area is not NUL-terminated")
    text, padding = raw[:end], raw[end:]
    if any(padding):
        raise HeaderRefused(f"{where}: data after the JSON text in the JSON area")
    try:
        decoded = text.decode("ascii")
        obj = strict.loads(decoded)
    except (UnicodeDecodeError, ValueError) as e:
        raise HeaderRefused(f"{where}: JSON metadata does not parse ({_short(e)})") from None
    if not isinstance(obj, dict):
        raise HeaderRefused(f"{where}: JSON metadata is not an object")
    return obj


def validate_header_area(area: bytes, device_size: int, profile: P.LuksProfile) -> HeaderInfo:
    """Accept ``area`` (the first DATA_OFFSET bytes of a device) only if sealfs made it.

    Raises :class:`HeaderRefused` naming the first deviation found. ``device_size`` is the
    size of the data device the header will be opened with; the one data segment must cover
    it from DATA_OFFSET to the end.
    """
    if len(area) < P.DATA_OFFSET:
        raise HeaderRefused(f"header region is {len(area)} bytes, expected {P.DATA_OFFSET}")
    primary = _check_binary(area, 0, MAGIC_PRIMARY, "primary header")
    secondary = _check_binary(area, P.HDR_SIZE, MAGIC_SECONDARY, "secondary header")
    _check_copies_match(primary, secondary)
    json_primary = area[BINARY_HEADER_SIZE : P.HDR_SIZE]
    if area[P.HDR_SIZE + BINARY_HEADER_SIZE : 2 * P.HDR_SIZE] != json_primary:
        raise HeaderRefused("the two header copies carry different JSON metadata")
    meta = load_json_area(json_primary, "primary header")
    keyslots = _check_json(meta, profile)
    return _info(primary, keyslots, device_size, profile)


@dataclass(frozen=True)
class RekeyHeaderInfo:
    """An accepted header that may be part-way through ``sealfs luks rekey``."""

    info: HeaderInfo
    #: cryptsetup's reencryption is initialised and not finished (resume it).
    reencrypting: bool


def validate_rekey_area(area: bytes, device_size: int, profile: P.LuksProfile) -> RekeyHeaderInfo:
    """Like :func:`validate_header_area`, but also accept the headers a rekey passes through.

    Only ``sealfs luks rekey`` calls this, to continue where an interrupted run stopped. On
    top of the final shape it accepts: luks2 key slots at numbers 0-7 (the rekey's staging
    and new slots, before the slots are put back at 0 and 1), one digest per volume key,
    and while cryptsetup re-encrypts, its ``online-reencrypt-v2`` requirement, one
    ``reencrypt`` key slot with checksum resilience, and crypt segments that tile the data
    area plus the two backup segments. Every segment still uses the one sealfs cipher, so
    no accepted state writes plaintext or uses a weaker cipher. It also accepts what a crash
    inside one of cryptsetup's header updates leaves (see below).
    """
    if len(area) < P.DATA_OFFSET:
        raise HeaderRefused(f"header region is {len(area)} bytes, expected {P.DATA_OFFSET}")
    if profile.integrity:
        raise HeaderRefused("a volume with dm-integrity cannot be re-encrypted by cryptsetup")
    # cryptsetup rewrites the two copies one after the other at every step of a rekey, so a
    # crash can leave one copy torn (its checksum wrong: cryptsetup ignores it too) or the two
    # one update apart (cryptsetup uses the newer). It then repairs the other copy itself.
    # That is harmless here only because every copy cryptsetup could use passes on its own.
    copies = [_rekey_copy(area, n) for n in (0, 1)]
    usable = [c for c in copies if c is not None]
    if not usable:
        raise HeaderRefused("neither header copy has a valid checksum")
    if copies[0] is None and any(
        area[off : off + 6] == MAGIC_SECONDARY for off in SECONDARY_OFFSETS if off != P.HDR_SIZE
    ):
        raise HeaderRefused("primary header torn and another secondary header present")
    if len(usable) == 2:
        (a, json_a), (b, json_b) = usable
        if a.uuid != b.uuid:
            raise HeaderRefused("header copies disagree: UUID")
        if (a.seqid, a.subsystem, json_a) == (b.seqid, b.subsystem, json_b):
            usable = usable[:1]
        elif abs(a.seqid - b.seqid) != 1:
            raise HeaderRefused(f"header copies disagree: seqid {a.seqid} vs {b.seqid}")
    results = []
    for binary, text in usable:
        where = "primary header" if binary.hdr_offset == 0 else "secondary header"
        keyslots, reencrypting = _check_rekey_json(load_json_area(text, where), profile)
        info = _info(binary, keyslots, device_size, profile)
        results.append((binary.seqid, RekeyHeaderInfo(info, reencrypting)))
    return max(results, key=lambda r: r[0])[1]


def _rekey_copy(area: bytes, n: int) -> tuple[BinaryHeader, bytes] | None:
    """Header copy ``n`` (0 primary, 1 secondary) and its JSON area, or None if it is torn.

    Torn means exactly what makes cryptsetup ignore a copy: a checksum that does not match.
    A copy with a good checksum that fails any other check is refused outright, since
    cryptsetup would use it.
    """
    offset = n * P.HDR_SIZE
    copy = area[offset : offset + P.HDR_SIZE]
    stored = parse_binary_header(area, offset).checksum
    if stored != header_checksum(copy).ljust(_CSUM_LEN, b"\0"):
        return None
    magic, where = (MAGIC_SECONDARY, "secondary header") if n else (MAGIC_PRIMARY, "primary header")
    return _check_binary(area, offset, magic, where), copy[BINARY_HEADER_SIZE:]


def _info(
    primary: BinaryHeader, keyslots: tuple[int, ...], device_size: int, profile: P.LuksProfile
) -> HeaderInfo:
    data_size = _check_device(device_size)
    return HeaderInfo(
        uuid=primary.uuid.rstrip(b"\0").decode("ascii"),
        kms_key_version=_kms_key_version(primary.subsystem, "primary header"),
        seqid=primary.seqid,
        keyslots=keyslots,
        cipher=P.CIPHER,
        sector_size=P.SECTOR_SIZE,
        integrity=profile.integrity,
        data_offset=P.DATA_OFFSET,
        data_size=data_size,
    )


# -- binary header ---------------------------------------------------------------------------


def _check_binary(area: bytes, offset: int, magic: bytes, where: str) -> BinaryHeader:
    hdr = parse_binary_header(area, offset)
    if hdr.magic != magic:
        raise HeaderRefused(f"{where}: bad magic")
    if hdr.version != 2:
        raise HeaderRefused(f"{where}: version {hdr.version}, only LUKS2 is accepted")
    if hdr.hdr_size != P.HDR_SIZE:
        raise HeaderRefused(f"{where}: header size {hdr.hdr_size}, expected {P.HDR_SIZE}")
    if hdr.hdr_offset != offset:
        raise HeaderRefused(f"{where}: claims offset {hdr.hdr_offset}, found at {offset}")
    if hdr.checksum_alg != b"sha256".ljust(32, b"\0"):
        raise HeaderRefused(f"{where}: checksum algorithm is not sha256")
    expected = header_checksum(area[offset : offset + P.HDR_SIZE])
    if hdr.checksum != expected.ljust(_CSUM_LEN, b"\0"):
        raise HeaderRefused(f"{where}: checksum mismatch")
    if any(hdr.label):
        raise HeaderRefused(f"{where}: label set (sealfs sets none)")
    _kms_key_version(hdr.subsystem, where)
    if not hdr.padding_zero:
        raise HeaderRefused(f"{where}: reserved bytes are not zero")
    _check_uuid(hdr.uuid, where)
    return hdr


def _check_uuid(raw: bytes, where: str) -> None:
    text = raw.rstrip(b"\0")
    if any(raw[len(text) :]) or len(text) != 36:
        raise HeaderRefused(f"{where}: malformed UUID")
    try:
        if str(uuidlib.UUID(text.decode("ascii"))) != text.decode("ascii"):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise HeaderRefused(f"{where}: malformed UUID") from None


def _check_copies_match(a: BinaryHeader, b: BinaryHeader) -> None:
    # cryptsetup silently prefers the copy with the higher seqid and "repairs" the other; a
    # host could use that to have one copy validated and the other one used.
    if a.seqid != b.seqid:
        raise HeaderRefused(f"header copies disagree: seqid {a.seqid} vs {b.seqid}")
    if a.uuid != b.uuid:
        raise HeaderRefused("header copies disagree: UUID")
    if a.subsystem != b.subsystem:
        raise HeaderRefused("header copies disagree: subsystem (KMS key version)")


def _kms_key_version(raw: bytes, where: str) -> int | None:
    """The subsystem field is empty or exactly ``sealfs-kms-v<N>``, NUL-padded, 1 <= N < 2**31."""
    text = raw.rstrip(b"\0")
    if not text:
        return None
    m = _KMS_SUBSYSTEM.fullmatch(text)
    if m is None or int(m.group(1)) > 2**31 - 1:
        raise HeaderRefused(f"{where}: subsystem set to something sealfs does not write")
    return int(m.group(1))


# -- JSON metadata ---------------------------------------------------------------------------


def _check_json(meta: dict[str, Any], profile: P.LuksProfile) -> tuple[int, ...]:
    _exact_keys(meta, {"keyslots", "tokens", "segments", "digests", "config"}, "metadata")
    _check_config(_obj(meta, "config", "metadata"))
    tokens = _obj(meta, "tokens", "metadata")
    if tokens:
        raise HeaderRefused(f"tokens present ({len(tokens)}); sealfs uses none")
    _check_segments(_obj(meta, "segments", "metadata"), profile)
    keyslots = _check_keyslots(_obj(meta, "keyslots", "metadata"), profile)
    _check_digests(_obj(meta, "digests", "metadata"), keyslots)
    return keyslots


# -- JSON metadata during a rekey --------------------------------------------------------------

#: Key slot numbers a rekey may use: 0 and 1 (final), the staging slot and cryptsetup's picks.
_REKEY_SLOTS = frozenset(str(n) for n in range(8))
_REENCRYPT_REQUIREMENT = {"mandatory": ["online-reencrypt-v2"]}


def _check_rekey_json(meta: dict[str, Any], profile: P.LuksProfile) -> tuple[tuple[int, ...], bool]:
    _exact_keys(meta, {"keyslots", "tokens", "segments", "digests", "config"}, "metadata")
    config = dict(_obj(meta, "config", "metadata"))
    requirements = config.pop("requirements", None)
    reencrypting = requirements is not None
    if reencrypting and requirements != _REENCRYPT_REQUIREMENT:
        raise HeaderRefused("config.requirements is not cryptsetup's online-reencrypt-v2")
    _check_config(config)
    tokens = _obj(meta, "tokens", "metadata")
    if tokens:
        raise HeaderRefused(f"tokens present ({len(tokens)}); sealfs uses none")
    segments = _obj(meta, "segments", "metadata")
    if reencrypting:
        _check_reencrypt_segments(segments)
    else:
        _check_segments(segments, profile)
    luks2, areas, reencrypt_slot = _check_rekey_keyslots(
        _obj(meta, "keyslots", "metadata"), profile
    )
    if (reencrypt_slot is not None) != reencrypting:
        raise HeaderRefused("a reencrypt key slot without the reencrypt requirement, or vice versa")
    _check_areas_disjoint(areas)
    _check_rekey_digests(_obj(meta, "digests", "metadata"), luks2, reencrypt_slot, segments)
    return tuple(int(n) for n in luks2), reencrypting


def _check_rekey_keyslots(
    keyslots: dict[str, Any], profile: P.LuksProfile
) -> tuple[list[str], list[tuple[int, int]], str | None]:
    """luks2 slots at numbers 0-7 (at least one) and at most one reencrypt slot."""
    if not keyslots or not set(keyslots) <= _REKEY_SLOTS:
        raise HeaderRefused(f"keyslots {sorted(keyslots)}: a rekey uses only slots 0-7")
    area_size = _round_up(profile.volume_key_bytes * P.AF_STRIPES, 4096)
    luks2: list[str] = []
    areas: list[tuple[int, int]] = []
    reencrypt: str | None = None
    for name in sorted(keyslots, key=int):
        ks = _obj(keyslots, name, "keyslots")
        if ks.get("type") == "reencrypt" and reencrypt is None:
            areas.append(_check_reencrypt_slot(ks, f"keyslot {name}"))
            reencrypt = name
            continue
        areas.append(_check_luks2_slot(ks, area_size, profile, f"keyslot {name}"))
        luks2.append(name)
    if not luks2:
        raise HeaderRefused("no luks2 key slot")
    return luks2, areas, reencrypt


def _check_reencrypt_slot(ks: dict[str, Any], where: str) -> tuple[int, int]:
    """cryptsetup's reencryption state: forward re-encryption, checksum resilience."""
    _exact_keys(ks, {"type", "key_size", "area", "mode", "direction", "priority"}, where)
    if ks.get("mode") != "reencrypt" or ks.get("direction") != "forward":
        raise HeaderRefused(f"{where}: not a forward re-encryption")
    if _int(ks, "key_size", where) != 1 or _int(ks, "priority", where) != 0:
        raise HeaderRefused(f"{where}: unexpected key size or priority")
    area = _obj(ks, "area", where)
    _exact_keys(area, {"type", "offset", "size", "hash", "sector_size"}, f"{where}.area")
    if area.get("type") != "checksum" or area.get("hash") != P.AF_HASH:
        raise HeaderRefused(f"{where}: resilience is not checksum with {P.AF_HASH}")
    if _int(area, "sector_size", f"{where}.area") != P.SECTOR_SIZE:
        raise HeaderRefused(f"{where}: checksum sector size is not {P.SECTOR_SIZE}")
    offset, length = _u64(area, "offset", f"{where}.area"), _u64(area, "size", f"{where}.area")
    lo, hi = 2 * P.HDR_SIZE, 2 * P.HDR_SIZE + P.KEYSLOTS_SIZE
    if offset % 4096 or length == 0 or offset < lo or offset + length > hi:
        raise HeaderRefused(f"{where}: area [{offset}, {offset + length}) is outside [{lo}, {hi})")
    return offset, length


#: The flags cryptsetup gives the segments of a re-encryption in progress.
_SEGMENT_FLAGS = (None, ["in-reencryption"], ["backup-previous"], ["backup-final"])


def _check_reencrypt_segments(segments: dict[str, Any]) -> None:
    """Segments that tile [DATA_OFFSET, end) plus one backup-previous and one backup-final.

    Each is a crypt segment with the sealfs cipher and sector size whose IV tweak matches
    its offset: no plaintext, no weaker cipher, no data moved anywhere else.
    """
    if sorted(segments) != sorted(str(n) for n in range(len(segments))) or not segments:
        raise HeaderRefused(f"segments {sorted(segments)} are not numbered 0..n-1")
    tiles: list[tuple[int, str]] = []
    backups: list[str] = []
    for name in segments:
        where = f"segment {name}"
        seg = _obj(segments, name, "segments")
        flags = seg.get("flags")
        if flags not in _SEGMENT_FLAGS:
            raise HeaderRefused(f"{where}: flags {flags!r} are not cryptsetup's reencrypt flags")
        keys = {"type", "offset", "size", "iv_tweak", "encryption", "sector_size"}
        _exact_keys(seg, keys | ({"flags"} if flags else set()), where)
        if seg.get("type") != "crypt":
            raise HeaderRefused(f"{where}: type {seg.get('type')!r} is not 'crypt'")
        _check_cipher(seg.get("encryption"), where, "would store data in plaintext")
        if _int(seg, "sector_size", where) != P.SECTOR_SIZE:
            raise HeaderRefused(f"{where}: sector size is not {P.SECTOR_SIZE}")
        offset = _u64(seg, "offset", where)
        if offset < P.DATA_OFFSET or (offset - P.DATA_OFFSET) % P.SECTOR_SIZE:
            raise HeaderRefused(f"{where}: offset {offset} is not a data sector")
        if _u64(seg, "iv_tweak", where) != (offset - P.DATA_OFFSET) // 512:
            raise HeaderRefused(f"{where}: IV tweak does not match its offset")
        size = seg.get("size")
        if size != "dynamic" and (_u64(seg, "size", where) % P.SECTOR_SIZE or size == "0"):
            raise HeaderRefused(f"{where}: size is not a positive multiple of {P.SECTOR_SIZE}")
        if flags in (["backup-previous"], ["backup-final"]):
            if offset != P.DATA_OFFSET or size != "dynamic":
                raise HeaderRefused(f"{where}: a backup segment must cover the whole data area")
            backups.append(flags[0])
        else:
            tiles.append((offset, name))
    if sorted(backups) != ["backup-final", "backup-previous"]:
        raise HeaderRefused("re-encryption without exactly one previous and one final backup")
    expected = P.DATA_OFFSET
    for i, (offset, name) in enumerate(sorted(tiles)):
        if offset != expected:
            raise HeaderRefused(f"segment {name}: data segments leave a gap or overlap")
        size = segments[name]["size"]
        if size == "dynamic":
            if i != len(tiles) - 1:
                raise HeaderRefused(f"segment {name}: only the last data segment is dynamic")
            break
        expected += int(size)
    else:
        raise HeaderRefused("the data segments do not reach the end of the device")


def _check_rekey_digests(
    digests: dict[str, Any],
    luks2: list[str],
    reencrypt_slot: str | None,
    segments: dict[str, Any],
) -> None:
    """One digest per volume key: every luks2 slot in exactly one, segments that exist."""
    covered: list[str] = []
    limit = 2 if reencrypt_slot is None else 3
    if not 1 <= len(digests) <= limit or not set(digests) <= {"0", "1", "2"}:
        raise HeaderRefused(f"digests {sorted(digests)}: more than a rekey creates")
    for name in digests:
        where = f"digest {name}"
        dg = _check_pbkdf2_digest(_obj(digests, name, "digests"), where)
        slots, segs = dg.get("keyslots"), dg.get("segments")
        if not _str_list(slots) or not _str_list(segs):
            raise HeaderRefused(f"{where}: keyslots or segments is not a list of names")
        if slots == [reencrypt_slot]:
            if segs:
                raise HeaderRefused(f"{where}: the reencrypt digest covers segments")
            continue
        if not slots or not set(slots) <= set(luks2) or not segs or not set(segs) <= set(segments):
            raise HeaderRefused(f"{where}: refers to key slots or segments that do not exist")
        covered += slots
    if sorted(covered) != sorted(luks2):
        raise HeaderRefused("a luks2 key slot is bound to no digest, or to two")
    if reencrypt_slot is None and len(digests) != 1:
        raise HeaderRefused("two volume keys outside a re-encryption")


def _check_config(config: dict[str, Any]) -> None:
    if "requirements" in config:
        raise HeaderRefused(
            "config.requirements present: a re-encryption in progress (if 'sealfs luks rekey' "
            "was interrupted, rerun it to finish) or a forged header"
        )
    if "flags" in config:
        raise HeaderRefused("config.flags present; sealfs sets no persistent flags")
    _exact_keys(config, {"json_size", "keyslots_size"}, "config")
    if _u64(config, "json_size", "config") != P.JSON_SIZE:
        raise HeaderRefused(f"config.json_size is not {P.JSON_SIZE}")
    if _u64(config, "keyslots_size", "config") != P.KEYSLOTS_SIZE:
        raise HeaderRefused(f"config.keyslots_size is not {P.KEYSLOTS_SIZE}")


def _check_segments(segments: dict[str, Any], profile: P.LuksProfile) -> None:
    if list(segments) != ["0"]:
        raise HeaderRefused(f"expected exactly one segment '0', found {sorted(segments)}")
    seg = _obj(segments, "0", "segments")
    where = "segment 0"
    kind = seg.get("type")
    if kind != "crypt":
        raise HeaderRefused(f"{where}: type {kind!r} is not 'crypt'")
    if "flags" in seg:
        raise HeaderRefused(f"{where}: segment flags present")
    _check_cipher(seg.get("encryption"), where, "would store data in plaintext")
    keys = {"type", "offset", "size", "iv_tweak", "encryption", "sector_size"}
    if profile.integrity:
        keys.add("integrity")
    elif "integrity" in seg:
        raise HeaderRefused(f"{where}: has integrity, but this volume is configured without")
    if profile.integrity and "integrity" not in seg:
        raise HeaderRefused(f"{where}: no integrity, but this volume is configured with it")
    _exact_keys(seg, keys, where)
    if _u64(seg, "offset", where) != P.DATA_OFFSET:
        raise HeaderRefused(f"{where}: data offset is not {P.DATA_OFFSET}")
    if seg.get("size") != "dynamic":
        raise HeaderRefused(f"{where}: size is fixed; it must cover the whole device")
    if _u64(seg, "iv_tweak", where) != 0:
        raise HeaderRefused(f"{where}: non-zero iv_tweak")
    if _int(seg, "sector_size", where) != P.SECTOR_SIZE:
        raise HeaderRefused(f"{where}: sector size is not {P.SECTOR_SIZE}")
    if profile.integrity:
        integ = _obj(seg, "integrity", where)
        _exact_keys(
            integ, {"type", "journal_encryption", "journal_integrity"}, f"{where}.integrity"
        )
        if integ.get("type") != profile.integrity_json_name:
            raise HeaderRefused(
                f"{where}: integrity {integ.get('type')!r}, expected {profile.integrity_json_name}"
            )
        if integ.get("journal_encryption") != "none" or integ.get("journal_integrity") != "none":
            raise HeaderRefused(f"{where}: unexpected integrity journal settings")


def _check_keyslots(keyslots: dict[str, Any], profile: P.LuksProfile) -> tuple[int, ...]:
    expected = [str(n) for n in profile.keyslots]
    if sorted(keyslots) != expected:
        raise HeaderRefused(
            f"keyslots {sorted(keyslots)}, expected exactly {expected} (an interrupted "
            "'sealfs luks rekey' leaves others: rerun it to finish)"
        )
    area_size = _round_up(profile.volume_key_bytes * P.AF_STRIPES, 4096)
    areas = [
        _check_luks2_slot(_obj(keyslots, name, "keyslots"), area_size, profile, f"keyslot {name}")
        for name in expected
    ]
    _check_areas_disjoint(areas)
    return tuple(int(n) for n in expected)


def _check_luks2_slot(
    ks: dict[str, Any], area_size: int, profile: P.LuksProfile, where: str
) -> tuple[int, int]:
    """One luks2 key slot as cryptsetup writes it for the sealfs profile; returns its area."""
    _exact_keys(ks, {"type", "key_size", "af", "area", "kdf"}, where)
    if ks.get("type") != "luks2":
        raise HeaderRefused(f"{where}: type {ks.get('type')!r} is not 'luks2'")
    if _int(ks, "key_size", where) != profile.volume_key_bytes:
        raise HeaderRefused(f"{where}: key size is not {profile.volume_key_bytes} bytes")
    af = _obj(ks, "af", where)
    _exact_keys(af, {"type", "stripes", "hash"}, f"{where}.af")
    if af.get("type") != "luks1" or af.get("hash") != P.AF_HASH:
        raise HeaderRefused(f"{where}: unexpected anti-forensic splitter")
    if _int(af, "stripes", f"{where}.af") != P.AF_STRIPES:
        raise HeaderRefused(f"{where}: AF stripes is not {P.AF_STRIPES}")
    _check_kdf(_obj(ks, "kdf", where), where)
    return _check_area(_obj(ks, "area", where), area_size, where)


def _check_cipher(cipher: Any, where: str, null_means: str) -> None:
    """The one accepted cipher; cipher_null is named for what it would do."""
    if isinstance(cipher, str) and "cipher_null" in cipher:
        raise HeaderRefused(f"{where}: cipher_null {null_means}")
    if cipher != P.CIPHER:
        raise HeaderRefused(f"{where}: cipher {cipher!r}, expected {P.CIPHER}")


def _check_area(area: dict[str, Any], size: int, where: str) -> tuple[int, int]:
    where = f"{where}.area"
    _exact_keys(area, {"type", "offset", "size", "encryption", "key_size"}, where)
    if area.get("type") != "raw":
        raise HeaderRefused(f"{where}: type {area.get('type')!r} is not 'raw'")
    _check_cipher(area.get("encryption"), where, "keyslot would open with any passphrase")
    if _int(area, "key_size", where) != P.CIPHER_KEY_BYTES:
        raise HeaderRefused(f"{where}: key size is not {P.CIPHER_KEY_BYTES} bytes")
    offset, length = _u64(area, "offset", where), _u64(area, "size", where)
    if length != size:
        raise HeaderRefused(f"{where}: size {length}, expected {size}")
    lo, hi = 2 * P.HDR_SIZE, 2 * P.HDR_SIZE + P.KEYSLOTS_SIZE
    if offset % 4096 or offset < lo or offset + length > hi:
        raise HeaderRefused(f"{where}: [{offset}, {offset + length}) is outside [{lo}, {hi})")
    return offset, length


def _check_areas_disjoint(areas: list[tuple[int, int]]) -> None:
    spans = sorted(areas)
    for (a_off, a_len), (b_off, _) in zip(spans, spans[1:], strict=False):
        if a_off + a_len > b_off:
            raise HeaderRefused("keyslot areas overlap")


def _check_kdf(kdf: dict[str, Any], where: str) -> None:
    where = f"{where}.kdf"
    if kdf.get("type") != "argon2id":
        raise HeaderRefused(f"{where}: type {kdf.get('type')!r} is not argon2id")
    _exact_keys(kdf, {"type", "time", "memory", "cpus", "salt"}, where)
    for key, (lo, hi) in (
        ("time", _ARGON2_TIME),
        ("memory", _ARGON2_MEMORY_KIB),
        ("cpus", _ARGON2_THREADS),
    ):
        if not lo <= _int(kdf, key, where) <= hi:
            raise HeaderRefused(f"{where}: {key} outside [{lo}, {hi}]")
    if len(_b64(kdf, "salt", where)) != 32:
        raise HeaderRefused(f"{where}: salt is not 32 bytes")


def _check_digests(digests: dict[str, Any], keyslots: tuple[int, ...]) -> None:
    # cryptsetup gives a new volume key the first free digest id, so after each
    # `sealfs luks rekey` the one digest alternates between ids 0 and 1.
    if len(digests) != 1 or not set(digests) <= {"0", "1"}:
        raise HeaderRefused(f"expected exactly one digest '0' or '1', found {sorted(digests)}")
    (name,) = digests
    where = f"digest {name}"
    dg = _check_pbkdf2_digest(_obj(digests, name, "digests"), where)
    if dg.get("keyslots") != [str(k) for k in keyslots]:
        raise HeaderRefused(f"{where}: does not cover exactly keyslots {list(keyslots)}")
    if dg.get("segments") != ["0"]:
        raise HeaderRefused(f"{where}: does not cover exactly segment 0")


def _check_pbkdf2_digest(dg: dict[str, Any], where: str) -> dict[str, Any]:
    _exact_keys(dg, {"type", "keyslots", "segments", "hash", "iterations", "salt", "digest"}, where)
    if dg.get("type") != "pbkdf2" or dg.get("hash") != P.DIGEST_HASH:
        raise HeaderRefused(f"{where}: not a pbkdf2-{P.DIGEST_HASH} digest")
    lo, hi = _DIGEST_ITERATIONS
    if not lo <= _int(dg, "iterations", where) <= hi:
        raise HeaderRefused(f"{where}: iterations outside [{lo}, {hi}]")
    if len(_b64(dg, "salt", where)) != 32 or len(_b64(dg, "digest", where)) != 32:
        raise HeaderRefused(f"{where}: salt or digest is not 32 bytes")
    return dg


def _check_device(device_size: int) -> int:
    data = device_size - P.DATA_OFFSET
    if data <= 0:
        raise HeaderRefused(f"device of {device_size} bytes has no room after the header")
    if data % P.SECTOR_SIZE:
        raise HeaderRefused(f"data area of {data} bytes is not a multiple of {P.SECTOR_SIZE}")
    return data


# -- strict JSON accessors -------------------------------------------------------------------


def _exact_keys(obj: dict[str, Any], keys: set[str], where: str) -> None:
    extra, missing = set(obj) - keys, keys - set(obj)
    if extra:
        raise HeaderRefused(f"{where}: unexpected field(s) {', '.join(sorted(extra))}")
    if missing:
        raise HeaderRefused(f"{where}: missing field(s) {', '.join(sorted(missing))}")


def _obj(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise HeaderRefused(f"{where}.{key} is not an object")
    return value


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if type(value) is not int:  # bool is an int subclass; refuse it too
        raise HeaderRefused(f"{where}.{key} is not an integer")
    return value


def _u64(obj: dict[str, Any], key: str, where: str) -> int:
    """LUKS2 stores 64-bit numbers as decimal strings."""
    value = obj.get(key)
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value) or int(value) >= 2**64:
        raise HeaderRefused(f"{where}.{key} is not a decimal u64 string")
    return int(value)


def _b64(obj: dict[str, Any], key: str, where: str) -> bytes:
    value = obj.get(key)
    try:
        if not isinstance(value, str):
            raise ValueError
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise HeaderRefused(f"{where}.{key} is not base64") from None


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:120]
