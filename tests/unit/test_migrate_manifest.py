"""The migration manifest: authenticated under its own key, and strict about what it names."""

from __future__ import annotations

import json

import pytest

from sealfs.crypto import Secret, VolumeKeys
from sealfs.migrate.manifest import (
    BundleTampered,
    FileEntry,
    Manifest,
    ledger_bytes,
    parse_ledger,
    parse_manifest,
)

VOL = bytes(range(16))


def _manifest(name: str = "objects/ab/ab00000000000001") -> Manifest:
    return Manifest(VOL, 7, b"h" * 32, 1, 0, (FileEntry(name, 3, b"s" * 32),))


def test_round_trip_and_key_separation() -> None:
    keys = VolumeKeys(Secret(b"k" * 32), VOL)
    m = _manifest()
    assert parse_manifest(m.to_bytes(keys), keys) == m
    assert keys.manifest_mac(m.body()) != keys.header_mac(m.body())
    other = VolumeKeys(Secret(b"o" * 32), VOL)
    with pytest.raises(BundleTampered, match="authentication"):
        parse_manifest(m.to_bytes(keys), other)


def test_an_edited_field_fails_authentication() -> None:
    keys = VolumeKeys(Secret(b"k" * 32), VOL)
    doc = json.loads(_manifest().to_bytes(keys))
    doc["manifest"]["files"][0][1] = 4
    with pytest.raises(BundleTampered, match="authentication"):
        parse_manifest(json.dumps(doc).encode(), keys)


@pytest.mark.parametrize("name", ["../x", "objects/ab/cd00000000000001", "lock", "objects/ab"])
def test_names_outside_the_layout_are_refused(name: str) -> None:
    keys = VolumeKeys(Secret(b"k" * 32), VOL)
    with pytest.raises(BundleTampered, match="never writes"):
        parse_manifest(_manifest(name).to_bytes(keys), keys)


def test_a_manifest_and_ledger_of_a_large_volume_authenticate() -> None:
    """A volume of 100,000 objects: the bodies are megabytes, far past a label part's 64 KiB."""
    keys = VolumeKeys(Secret(b"k" * 32), VOL)
    files = tuple(
        FileEntry(f"objects/{i & 0xFF:02x}/{i & 0xFF:02x}{i:014x}", i, b"s" * 32)
        for i in range(1, 100_001)
    )
    m = Manifest(VOL, 7, b"h" * 32, 1, 0, files)
    data = m.to_bytes(keys)
    assert len(data) > 1 << 20 and parse_manifest(data, keys) == m
    ledger = {f.name: f for f in files}
    assert parse_ledger(ledger_bytes(VOL, ledger, keys), VOL, keys) == ledger
    assert parse_ledger(ledger_bytes(VOL, ledger, keys), bytes(16), keys) == {}
