"""Pure tests of the record formats: inode records, commit records, checkpoints, blocks."""

from __future__ import annotations

import json
import os
import stat

import lz4.block
import pytest

from sealfs.crypto import (
    SEAL_OVERHEAD,
    AuthError,
    ObjectSealer,
    Sealer,
    Secret,
    VolumeKeys,
    hkdf,
)
from sealfs.errors import FormatError, IntegrityError
from sealfs.sealed.codec import (
    CHECKPOINT_MAGIC,
    CODEC_KEYED,
    CODEC_LZ4,
    Checkpoint,
    CodecError,
    Commit,
    block_ad,
    checkpoint_ad,
    frame,
    frames_after,
    open_block,
    open_checkpoint,
    seal_block,
    seal_checkpoint,
    split_frames,
)
from sealfs.sealed.inode import Entries, Inode, RecordError
from sealfs.volume.header import Header, KeyFileCredential, new_header


def test_file_record_roundtrip() -> None:
    node = Inode(7, stat.S_IFREG | 0o640, 1, 2, 3, 1 << 33, 1, 2, 3, 0, 0)
    node.blocks = {0: 11, 5: 12, 70000: 13}
    node.xattrs = {b"user.a": b"\x00\xff", b"security.selinux": b"x" * 300}
    back = Inode.from_record(7, node.to_record())
    assert (back.mode, back.uid, back.gid, back.nlink, back.size) == (node.mode, 1, 2, 3, 1 << 33)
    assert back.blocks == node.blocks and back.xattrs == node.xattrs


def test_dir_and_symlink_records() -> None:
    d = Inode(1, stat.S_IFDIR | 0o755, parent=1)
    assert d.entries is not None
    for i in range(100):
        d.entries.add(os.urandom(8) + b"\xff", 100 + i)
    back = Inode.from_record(1, d.to_record())
    assert back.entries is not None and back.entries.names == d.entries.names
    s = Inode(9, stat.S_IFLNK | 0o777)
    s.target = b"../somewhere/\xfe"
    assert Inode.from_record(9, s.to_record()).target == s.target


def test_inline_file_record_roundtrip() -> None:
    node = Inode(7, stat.S_IFREG | 0o640, size=4000)
    node.inline = os.urandom(3000)  # shorter than the size: the rest reads as zeros
    back = Inode.from_record(7, node.to_record())
    assert back.inline == node.inline and back.blocks == {} and back.size == 4000


def test_version_1_records_are_still_read() -> None:
    node = Inode(7, stat.S_IFREG | 0o600, size=5)
    node.blocks = {0: 99}
    v2 = node.to_record()
    assert v2[-4:] == bytes(4)  # no inline data
    back = Inode.from_record(7, b"\x01" + v2[1:-4])
    assert back.blocks == {0: 99} and back.inline is None


def test_bad_records_raise_record_error() -> None:
    rec = Inode(7, stat.S_IFREG | 0o600).to_record()
    small = Inode(7, stat.S_IFREG | 0o600, size=3)
    small.inline = b"abc"
    both = Inode(7, stat.S_IFREG | 0o600, size=3)
    both.inline, both.blocks = b"abc", {0: 5}
    rec3 = small.to_record()
    too_long = rec3[:17] + (2).to_bytes(8, "big") + rec3[25:]  # size 2, 3 inline bytes
    assert Inode.from_record(7, rec3[:17] + (3).to_bytes(8, "big") + rec3[25:]).inline
    for bad in (
        rec[:-1],
        rec + b"x",
        b"\x03" + rec[1:],
        b"\x00" + rec[1:],
        b"",
        small.to_record()[:-1],
        both.to_record(),
        too_long,
    ):
        with pytest.raises(RecordError):
            Inode.from_record(7, bad)


def test_entries_cookies_survive_concurrent_changes() -> None:
    e = Entries()
    for i in range(1000):
        e.add(b"f%d" % i, i + 10)
    seen: list[bytes] = []
    cookie = 0
    while True:
        batch = list(e.after(cookie))[:37]
        if not batch:
            break
        for c, name, _ in batch:
            seen.append(name)
            cookie = c
        # churn: remove entries already listed and not yet listed, add new ones
        e.remove(seen[-1])
        if cookie < 1000:
            e.add(b"new%d" % cookie, 1)
    stable = {b"f%d" % i for i in range(1000)}
    listed = [n for n in seen if n in stable]
    assert len(listed) == len(set(listed))  # never twice
    removed_unlisted = stable - set(seen)
    assert not removed_unlisted  # only already-listed entries were removed


def test_commit_and_checkpoint_roundtrip() -> None:
    c = Commit(5, 99, {2: 3, 4: 5}, [6, 7])
    assert Commit.decode(c.encode()) == c
    with pytest.raises(CodecError):
        Commit.decode(c.encode()[:-3])
    cp = Checkpoint(3, 10, 42, b"h" * 32, {1: 2, 3: 4})
    assert Checkpoint.decode(cp.encode()) == cp


def test_checkpoint_keeps_a_chain_of_heads_and_version_1_is_still_read() -> None:
    cp = Checkpoint(3, 10, 42, b"h" * 32, {1: 2, 3: 4}, b"a" * 32 + b"b" * 32)
    assert Checkpoint.decode(cp.encode()) == cp
    enc = cp.encode()
    for bad in (
        enc[:-1],
        enc + b"\0",  # a chain cut short or extended
        Checkpoint(3, 1, 42, b"h" * 32, {}, b"a" * 64).encode(),
    ):  # longer than seq
        with pytest.raises(CodecError):
            Checkpoint.decode(bad)
    v1 = Checkpoint(3, 10, 42, b"h" * 32, {1: 2}).encode()[:-8]  # no chain count
    assert Checkpoint.decode(v1, 1) == Checkpoint(3, 10, 42, b"h" * 32, {1: 2})
    master, vid = Secret.generate(), os.urandom(16)
    keys = VolumeKeys(master, vid, legacy=True)  # version 1 is sealed under the format-1 key
    old = (
        CHECKPOINT_MAGIC
        + b"\x01"
        + Sealer(hkdf(master, "journal", vid)).seal(v1, checkpoint_ad(vid, 1))
    )
    assert open_checkpoint(keys.journal, vid, old).table == {1: 2}
    with pytest.raises(AuthError):  # the version is authenticated: no downgrade by relabelling
        open_checkpoint(keys.journal, vid, CHECKPOINT_MAGIC + b"\x02" + old[5:])


def test_commit_records_carry_objects_and_version_1_is_still_read() -> None:
    c = Commit(5, 99, {2: 3, 4: 5}, [6], {3: (2, b"sealed record"), 8: (4, b"x" * 70000)})
    assert Commit.decode(c.encode()) == c
    enc = c.encode()
    for bad in (
        enc[:-1],
        enc + b"\0",
        Commit(5, 99, {}, [], {3: (2, b"")}).encode(),
    ):  # an empty carried object
        with pytest.raises(CodecError):
            Commit.decode(bad)
    v1 = b"\x01" + Commit(5, 99, {2: 3}, [6]).encode()[1:-4]  # no carried section
    assert Commit.decode(v1) == Commit(5, 99, {2: 3}, [6])


def test_split_frames_stops_at_torn_tail() -> None:
    data = frame(b"a" * 40) + frame(b"b" * 40)
    frames, complete, bad = split_frames(data + frame(b"c" * 40)[:20])
    assert [f for _, f in frames] == [b"a" * 40, b"b" * 40] and complete == len(data)
    assert not bad
    frames, complete, bad = split_frames(data + bytes(64))  # zeros: a crash artefact
    assert len(frames) == 2 and complete == len(data) and not bad
    damaged = bytearray(data)
    damaged[2] ^= 0x01  # a corrupted length is flagged, and the frame behind it is found
    frames, complete, bad = split_frames(bytes(damaged))
    assert frames == [] and complete == 0 and bad
    assert [f for _, f in frames_after(bytes(damaged), 0)] == [b"b" * 40]


@pytest.mark.parametrize("compress", [False, True])
def test_block_binding(compress: bool) -> None:
    sealer = ObjectSealer(Secret.generate())
    vid = b"v" * 16
    data = b"hello world " * 1000
    blob = seal_block(sealer, block_ad(vid, 2, 0, 77), data, compress)
    if compress:
        assert len(blob) < len(data)
    assert open_block(sealer, block_ad(vid, 2, 0, 77), blob, 1 << 17) == data
    for ad in (
        block_ad(vid, 3, 0, 77),
        block_ad(vid, 2, 1, 77),
        block_ad(vid, 2, 0, 78),
        block_ad(b"w" * 16, 2, 0, 77),
    ):
        with pytest.raises(AuthError):
            open_block(sealer, ad, blob, 1 << 17)


def test_incompressible_blocks_stored_raw() -> None:
    sealer = ObjectSealer(Secret.generate())
    data = os.urandom(4096)
    blob = seal_block(sealer, b"ad", data, True)
    assert len(blob) == len(data) + 1 + SEAL_OVERHEAD


def test_format_1_blocks_and_checkpoints_open_only_on_format_1_volumes() -> None:
    """Format-1 blocks (codec byte 0/1) and checkpoints (version 1) were sealed directly under
    the inode and journal keys: they open with a format-1 volume's keys, a format-2 volume
    refuses them, and every block and checkpoint written now is format 2."""
    master, vid, data = Secret.generate(), b"v" * 16, b"old block " * 300
    old_inode = Sealer(hkdf(hkdf(master, "object", vid), "inode", 2))
    ad = block_ad(vid, 2, 0, 77)
    old_blocks = [
        b"\x00" + old_inode.seal(data, ad + b"\x00"),
        b"\x01" + old_inode.seal(lz4.block.compress(data, store_size=True), ad + b"\x01"),
    ]
    cp = Checkpoint(1, 3, 9, b"h" * 32, {1: 2})
    old_cp = b"SFCK\x01" + Sealer(hkdf(master, "journal", vid)).seal(
        cp.encode()[:-8], checkpoint_ad(vid, 1)
    )  # version 1 has no chain count
    legacy, current = VolumeKeys(master, vid, legacy=True), VolumeKeys(master, vid)
    for blob in old_blocks:
        assert open_block(legacy.inode(2), ad, blob, 4096) == data
        with pytest.raises(AuthError):
            open_block(current.inode(2), ad, blob, 4096)
    assert open_checkpoint(legacy.journal, vid, old_cp) == cp
    with pytest.raises(AuthError):
        open_checkpoint(current.journal, vid, old_cp)
    new_cp = seal_checkpoint(legacy.journal, vid, cp)
    assert new_cp[4] == 2 and open_checkpoint(current.journal, vid, new_cp) == cp
    for compress in (False, True):
        new = seal_block(legacy.inode(2), ad, data, compress)
        assert new[0] & 2 and open_block(current.inode(2), ad, new, 4096) == data


def test_the_header_format_fields_are_authenticated() -> None:
    """A host cannot switch a volume between formats: ``format_version`` and
    ``format1_objects`` are under the header MAC, and a malformed flag is refused."""
    cred = KeyFileCredential(Secret.generate(64))
    header, master = new_header(4096, "none")
    header.add_slot(master, cred)
    assert Header.from_bytes(header.to_bytes()).unlock(cred) == master
    upgraded, _ = new_header(4096, "none")
    upgraded.format_version = 1
    upgraded.add_slot(master, cred)
    upgraded.upgrade_format_1(upgraded.volume_keys(master))
    assert Header.from_bytes(upgraded.to_bytes()).unlock(cred) == master
    for doc, edit in (
        (header, {"format_version": 1}),
        (header, {"format1_objects": True}),
        (upgraded, {"format_version": 1, "format1_objects": False}),
    ):
        forged = json.loads(doc.to_bytes())
        forged.update(edit)
        if forged.get("format1_objects") is False:
            del forged["format1_objects"]  # how a format-1 header looks
        with pytest.raises(IntegrityError):
            Header.from_bytes(json.dumps(forged).encode()).unlock(cred)
    for bad in ("yes", 1):
        forged = json.loads(upgraded.to_bytes())
        forged["format1_objects"] = bad
        with pytest.raises(FormatError):
            Header.from_bytes(json.dumps(forged).encode())


def test_lz4_declared_size_is_bounded_before_decompressing() -> None:
    """An authentic lz4 payload (the key holder's bug, or a fuzzed one) that declares 256 MiB
    is refused from its 4-byte size prefix: nothing near that size is ever allocated."""
    import struct
    import tracemalloc

    sealer = ObjectSealer(Secret.generate())
    body = struct.pack("<I", 256 << 20) + lz4.block.compress(b"x" * 4096, store_size=False)
    codec = bytes([CODEC_LZ4 | CODEC_KEYED])
    blob = codec + sealer.seal(body, b"ad" + codec)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="declares more than the volume block size"):
            open_block(sealer, b"ad", blob, 1 << 17)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated"
