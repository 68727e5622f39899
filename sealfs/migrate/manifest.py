"""The manifest of a migration bundle: which files, how long, their SHA-256, and which commit.

It is authenticated under ``VolumeKeys.manifest_mac`` (a key derived from the volume master key
for this one purpose), so whoever carries the bundle can neither alter, add, drop nor swap a
file, nor pass off the manifest of another volume, without the import noticing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from sealfs import strict
from sealfs.crypto import VolumeKeys, ct_equal
from sealfs.errors import FormatError, IntegrityError
from sealfs.volume.header import canonical_json

MANIFEST_NAME = "sealfs-migrate.manifest"
FORMAT = "sealfs-migrate-1"
#: The hashes live passes took of the objects they copied, so the final pass (the app's
#: downtime) hashes only what is new. Same key as the manifest, another format name.
LEDGER_NAME = "sealfs-migrate.precopy"
LEDGER_FORMAT = "sealfs-migrate-precopy-1"
#: a manifest names at most a few million files; anything larger is refused unread
MANIFEST_MAX = 1 << 30
#: the only names a bundle may hold (no path can leave the bundle or the new backing dir)
_NAME = re.compile(
    r"sealfs\.header|checkpoint|journal\.[0-9a-f]{16}|objects/([0-9a-f]{2})/\1[0-9a-f]{14}"
)


class BundleTampered(IntegrityError):
    """The bundle does not match its manifest, or the manifest fails authentication."""

    kind = "bundle-tampered"


class BundleIncomplete(IntegrityError):
    """A file the manifest (or the volume's metadata) needs is not in the bundle."""

    kind = "bundle-incomplete"


@dataclass(frozen=True)
class FileEntry:
    name: str  # relative to the bundle / backing directory
    size: int
    sha256: bytes


@dataclass(frozen=True)
class Manifest:
    volume_id: bytes
    commit: int  # the sequence number of the last commit in the bundle
    head: bytes  # the volume root after it: what the KMS anchors
    gen: int  # journal generation
    created: int
    files: tuple[FileEntry, ...]

    def body(self) -> bytes:
        return canonical_json(
            {
                "format": FORMAT,
                "volume_id": self.volume_id.hex(),
                "commit": self.commit,
                "head": self.head.hex(),
                "gen": self.gen,
                "created": self.created,
                "files": [[f.name, f.size, f.sha256.hex()] for f in self.files],
            }
        )

    def to_bytes(self, keys: VolumeKeys) -> bytes:
        body = self.body()
        return canonical_json({"manifest": json.loads(body), "mac": keys.manifest_mac(body).hex()})

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def parse_manifest(data: bytes, keys: VolumeKeys) -> Manifest:
    """The manifest in ``data``, after checking its MAC under ``keys`` (the unlocked volume's)
    and then its fields. Raises BundleTampered."""
    try:
        doc = strict.loads(data)
        body = canonical_json(doc["manifest"])
        tag = strict.hex_bytes(doc["mac"], 32, 32)
    except (ValueError, KeyError, TypeError):
        raise BundleTampered("the bundle manifest is not readable: it was damaged") from None
    if not ct_equal(keys.manifest_mac(body), tag):
        raise BundleTampered(
            "the bundle manifest fails authentication: it was modified, or belongs to "
            "another volume than the header in the bundle"
        )
    m = doc["manifest"]
    try:
        if m["format"] != FORMAT:
            raise FormatError(f"unsupported bundle format {m['format']!r}")
        files = tuple(
            FileEntry(str(n), int(s), strict.hex_bytes(h, 32, 32)) for n, s, h in m["files"]
        )
        manifest = Manifest(
            strict.hex_bytes(m["volume_id"], 16, 16),
            int(m["commit"]),
            strict.hex_bytes(m["head"], 32, 32),
            int(m["gen"]),
            int(m["created"]),
            files,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise BundleTampered(f"the bundle manifest is malformed ({e})") from None
    bad = [f.name for f in files if not valid_name(f.name)]
    if bad or len({f.name for f in files}) != len(files):
        raise BundleTampered(f"the bundle manifest names files sealfs never writes: {bad[:3]}")
    return manifest


def ledger_bytes(volume_id: bytes, files: dict[str, FileEntry], keys: VolumeKeys) -> bytes:
    """The pre-copy ledger: the entries of the objects live passes copied, authenticated."""
    body = canonical_json(
        {
            "format": LEDGER_FORMAT,
            "volume_id": volume_id.hex(),
            "files": [[f.name, f.size, f.sha256.hex()] for f in sorted(files.values(), key=_name)],
        }
    )
    return canonical_json({"ledger": json.loads(body), "mac": keys.manifest_mac(body).hex()})


def parse_ledger(data: bytes, volume_id: bytes, keys: VolumeKeys) -> dict[str, FileEntry]:
    """The entries of a ledger written for this volume, or none if it does not authenticate
    (it only saves hashing: a final pass without it hashes everything)."""
    try:
        doc = strict.loads(data)
        body = canonical_json(doc["ledger"])
        if not ct_equal(keys.manifest_mac(body), strict.hex_bytes(doc["mac"], 32, 32)):
            return {}
        led = doc["ledger"]
        if led["format"] != LEDGER_FORMAT or led["volume_id"] != volume_id.hex():
            return {}
        entries = [FileEntry(n, s, strict.hex_bytes(h, 32, 32)) for n, s, h in led["files"]]
    except (ValueError, KeyError, TypeError):
        return {}
    return {e.name: e for e in entries if valid_name(e.name) and isinstance(e.size, int)}


def _name(entry: FileEntry) -> str:
    return entry.name
