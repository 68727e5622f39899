"""The host attacker's toolkit: rewrite a real LUKS2 header the way a malicious host would.

Written independently of sealfs.luks.header on purpose (from the LUKS2 on-disk format spec), so
the tests do not validate sealfs's parser with sealfs's own parser. Every helper edits an image
file in place: change the JSON metadata, then recompute both copies' SHA-256 checksums, which
is all it takes for cryptsetup to accept the result.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

HDR_SIZE = 16384
BIN_SIZE = 4096
REGION = 16 * 1024 * 1024
CSUM_OFF, CSUM_LEN = 448, 64
SEQID_OFF = 16


def read_region(path: Path) -> bytearray:
    with open(path, "rb") as f:
        return bytearray(f.read(REGION))


def write_region(path: Path, region: bytes | bytearray) -> None:
    with open(path, "r+b") as f:
        f.write(region)


def metadata(path: Path, copy: int = 0) -> dict[str, Any]:
    raw = read_region(path)[copy * HDR_SIZE + BIN_SIZE : (copy + 1) * HDR_SIZE]
    return json.loads(raw.split(b"\0", 1)[0])


def checksum(copy: bytes | bytearray) -> bytes:
    buf = bytearray(copy)
    buf[CSUM_OFF : CSUM_OFF + CSUM_LEN] = bytes(CSUM_LEN)
    return hashlib.sha256(buf).digest().ljust(CSUM_LEN, b"\0")


def reseal(region: bytearray, copies: tuple[int, ...] = (0, 1)) -> None:
    """Recompute the checksum of the given header copies (0 = primary, 1 = secondary)."""
    for c in copies:
        off = c * HDR_SIZE
        region[off + CSUM_OFF : off + CSUM_OFF + CSUM_LEN] = checksum(region[off : off + HDR_SIZE])


def set_json_text(region: bytearray, text: bytes, copies: tuple[int, ...] = (0, 1)) -> None:
    area = HDR_SIZE - BIN_SIZE
    assert len(text) < area, "JSON too large for the area"
    for c in copies:
        off = c * HDR_SIZE + BIN_SIZE
        region[off : off + area] = text + bytes(area - len(text))
    reseal(region, copies)


def edit_json(
    path: Path,
    mutate: Callable[[dict[str, Any]], None],
    *,
    copies: tuple[int, ...] = (0, 1),
    seqid_bump: int = 0,
) -> None:
    """Load the primary copy's JSON, mutate it, write it into ``copies``, fix checksums."""
    region = read_region(path)
    meta = metadata(path)
    mutate(meta)
    text = json.dumps(meta, separators=(",", ":")).encode()
    for c in copies:
        if seqid_bump:
            off = c * HDR_SIZE + SEQID_OFF
            (seq,) = struct.unpack_from(">Q", region, off)
            struct.pack_into(">Q", region, off, seq + seqid_bump)
    set_json_text(region, text, copies)
    write_region(path, region)


def edit_binary(path: Path, offset: int, data: bytes, copies: tuple[int, ...] = (0, 1)) -> None:
    region = read_region(path)
    for c in copies:
        region[c * HDR_SIZE + offset : c * HDR_SIZE + offset + len(data)] = data
    reseal(region, copies)
    write_region(path, region)


def cryptsetup(*args: str, key: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["cryptsetup", *args], input=key or b"", capture_output=True, check=False)


def cryptsetup_accepts(path: Path) -> bool:
    """cryptsetup parses the header (both binary copies, checksums, JSON, its own checks)."""
    return cryptsetup("luksDump", str(path)).returncode == 0


def cryptsetup_unlocks(path: Path, key: bytes, keyslot: int = 0) -> bool:
    """The key opens the key slot and matches the digest: cryptsetup would activate it."""
    res = cryptsetup(
        "open",
        "--test-passphrase",
        "--key-file=-",
        "--key-slot",
        str(keyslot),
        str(path),
        key=key,
    )
    return res.returncode == 0


def cryptsetup_json(path: Path) -> dict[str, Any]:
    """The metadata as cryptsetup itself reads it (after its choice between the copies)."""
    res = cryptsetup("luksDump", "--dump-json-metadata", str(path))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
