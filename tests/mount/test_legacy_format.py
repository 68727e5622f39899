"""A volume written by format-1 sealfs (single journal and inode keys) still mounts, reads and
checks clean; its first writable mount makes its header format 2, and everything written to it
from then on is format 2 (a key per message)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import trio

from sealfs.crypto import AuthError, ObjectSealer, VolumeKeys
from sealfs.fs.core import Filesystem
from sealfs.fs.lifecycle import unlock_volume
from sealfs.sealed.codec import CODEC_KEYED, RECORD_OBJECT_MAX, inode_ad, journal_ad, split_frames
from sealfs.store import CHECKPOINT_NAME, HEADER_NAME, journal_name
from sealfs.volume.header import read_key_file
from tests.backing import fold, fsync_path, layout, legacy_contents, legacy_volume, unmount
from tests.conftest import Volume, sealfs


def _check_clean(vol: Volume) -> None:
    res = sealfs("check", str(vol.backing), "--key-file", str(vol.key), "--json")
    report = json.loads(res.stdout)
    assert report["findings"] == [], report


def _read_all(vol: Volume, expected: dict[str, bytes]) -> None:
    for path, data in expected.items():
        assert (vol.mnt / path.lstrip("/")).read_bytes() == data, path
    assert os.readlink(vol.mnt / "link") == "dir/carried.bin"
    assert os.getxattr(vol.mnt / "dir", "user.legacy") == b"format-1 xattr"


def _formats(vol: Volume) -> tuple[dict[str, int], dict[str, list[int]], list[int]]:
    """Which format each object is in: records by whether format-2 keys alone open them,
    blocks by their codec byte, journal frames (in order) like records."""
    store, header, master = unlock_volume(vol.backing, read_key_file(vol.key))
    trio.run(lambda: Filesystem(store, header, master).load(writable=False))  # carried objects
    vid, current = header.volume_id, VolumeKeys(master, header.volume_id)  # format 2 only

    def fmt(sealer: ObjectSealer, blob: bytes, ad: bytes) -> int:
        try:
            sealer.open(blob, ad)
        except AuthError:
            return 1
        return 2

    lay = layout(vol.backing, vol.key)
    records = {
        p: fmt(
            current.inode(e.ino),
            store.get(e.record_oid, RECORD_OBJECT_MAX),
            inode_ad(vid, e.ino, e.record_oid),
        )
        for p, e in lay.entries.items()
    }
    blocks = {
        p: [
            2 if store.get(o, RECORD_OBJECT_MAX)[0] & CODEC_KEYED else 1
            for _, o in sorted(e.block_oids.items())
        ]
        for p, e in lay.entries.items()
        if e.block_oids
    }
    first = lay.seq - len(lay.journal_frames) + 1
    sealed, _, _ = split_frames((vol.backing / journal_name(lay.gen)).read_bytes())
    frames = [
        fmt(current.journal, s, journal_ad(vid, lay.gen, first + i))
        for i, (_, s) in enumerate(sealed)
    ]
    return records, blocks, frames


def test_format_1_volume_mounts_reads_checks_then_writes_format_2(tmp_path: Path) -> None:
    vol = legacy_volume(tmp_path)
    info = json.loads(sealfs("info", str(vol.backing), "--json").stdout)
    assert info["format_version"] == 1
    _check_clean(vol)
    expected = legacy_contents()
    vol.mount()
    try:
        _read_all(vol, expected)
        files = bytearray(expected["/dir/files.bin"])
        files[5000:5100] = b"x" * 100  # block 1 of 4096-byte blocks
        with open(vol.mnt / "dir/files.bin", "r+b") as f:
            f.seek(5000)
            f.write(b"x" * 100)
        expected["/dir/files.bin"] = bytes(files)
        expected["/dir/new.bin"] = os.urandom(9000)
        (vol.mnt / "dir/new.bin").write_bytes(expected["/dir/new.bin"])
        fsync_path(vol.mnt / "dir/new.bin")
    finally:
        unmount(vol)
    # The header became format 2 before the first format-2 object (so an older sealfs
    # refuses the volume), and says that it still holds format-1 objects.
    header = json.loads((vol.backing / HEADER_NAME).read_text())
    assert (header["format_version"], header["format1_objects"]) == (2, True)
    _check_clean(vol)
    records, blocks, frames = _formats(vol)
    assert records == {
        "/": 1,
        "/small.txt": 1,
        "/link": 1,
        "/dir/carried.bin": 1,
        "/dir": 2,
        "/dir/files.bin": 2,
        "/dir/new.bin": 2,
    }
    assert blocks == {
        "/dir/carried.bin": [1, 1, 1],
        "/dir/files.bin": [1, 2, 1, 1, 1, 1],
        "/dir/new.bin": [2, 2, 2],
    }
    assert frames[:2] == [1, 1] and set(frames[2:]) == {2}
    # A checkpoint of the mixed volume is format 2; the volume still reads and checks clean.
    fold(vol)
    assert (vol.backing / CHECKPOINT_NAME).read_bytes()[4] == 2
    _check_clean(vol)
    vol.mount()
    try:
        _read_all(vol, expected)
    finally:
        unmount(vol)
    _check_clean(vol)
