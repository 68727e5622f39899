"""Key generations during a re-key: the header's ``rekey`` field (parsed strictly, under the
MAC) and the sealers that open under the new master key first and the previous one second,
while sealing only under the new one (docs/format.md, "Re-key")."""

from __future__ import annotations

import hashlib
import json

import pytest

from sealfs.crypto import AuthError, Secret, VolumeKeys
from sealfs.errors import FormatError, IntegrityError
from sealfs.sealed.codec import (
    Checkpoint,
    block_ad,
    inode_ad,
    open_checkpoint_aged,
    reseal_block,
    seal_block,
)
from sealfs.sealed.objects import SealedObjects
from sealfs.volume.header import Header, KeyFileCredential, new_header

VID = b"v" * 16


def test_previous_generation_opens_but_never_seals() -> None:
    old_master, new_master = Secret.generate(), Secret.generate()
    old = VolumeKeys(old_master, VID, legacy=True)
    keys = VolumeKeys(new_master, VID, previous=old)
    ad = inode_ad(VID, 2, 7)
    before = old.inode(2).seal(b"record", ad)
    assert keys.inode(2).open(before, ad) == b"record"
    assert keys.inode(2).open_aged(before, ad) == (b"record", False)
    after = keys.inode(2).seal(b"record", ad)
    assert keys.inode(2).open_aged(after, ad) == (b"record", True)
    with pytest.raises(AuthError):
        old.inode(2).open(after, ad)  # sealed under the new key only
    with pytest.raises(AuthError):
        VolumeKeys(new_master, VID).inode(2).open(before, ad)  # no fallback: refused
    frame = old.journal.seal(b"frame", b"jad")
    assert keys.journal.open_aged(frame, b"jad") == (b"frame", False)


def test_reseal_block_keeps_payload_and_skips_current_blocks() -> None:
    old = VolumeKeys(Secret.generate(), VID)
    keys = VolumeKeys(Secret.generate(), VID, previous=old)
    ad = block_ad(VID, 2, 0, 9)
    data = b"compressible " * 500
    blob = seal_block(old.inode(2), ad, data, compress=True)
    new = reseal_block(keys.inode(2), ad, blob)
    assert new is not None and new[:1] == blob[:1] and len(new) == len(blob)
    assert reseal_block(keys.inode(2), ad, new) is None
    with pytest.raises(AuthError):
        reseal_block(keys.inode(2), block_ad(VID, 2, 1, 9), blob)  # another position


def _rekeyed() -> tuple[Header, KeyFileCredential, Secret, Secret]:
    header, old_master = new_header(65536, "none")
    cred = KeyFileCredential(Secret.generate(64))
    header.add_slot(old_master, cred)
    new_master = Secret.generate()
    slots = [header.rewrapped_slot(new_master, s, cred) for s in header.slots]
    header.begin_rekey(old_master, new_master, slots, bytes(range(32)))
    return header, cred, old_master, new_master


def test_header_rekey_field_round_trips_under_the_mac() -> None:
    header, cred, old_master, new_master = _rekeyed()
    stored = header.to_bytes()
    doc = json.loads(stored)
    assert doc["rekey"]["version"] == 2 and len(bytes.fromhex(doc["rekey"]["previous"])) == 60
    assert doc["rekey"]["checkpoint"] == bytes(range(32)).hex()
    again = Header.from_bytes(stored)
    assert again.rekey_in_progress and again.unlock(cred) == new_master
    blob = VolumeKeys(old_master, again.volume_id).inode(5).seal(b"x", b"ad")
    assert again.volume_keys(new_master).inode(5).open(blob, b"ad") == b"x"
    with pytest.raises(AuthError):
        again.volume_keys(new_master, older=False).inode(5).open(blob, b"ad")
    again.end_rekey(new_master)
    assert "rekey" not in json.loads(again.to_bytes())
    assert Header.from_bytes(again.to_bytes()).unlock(cred) == new_master


@pytest.mark.parametrize(
    "field",
    [
        {"version": 1, "previous": "00" * 60, "checkpoint": "00" * 32},
        {"version": 2, "previous": "00" * 60},
        {"version": 2, "previous": "00" * 59, "checkpoint": "00" * 32},
        {"version": 2, "previous": "00" * 60, "checkpoint": "00" * 31},
        {"version": 2, "previous": "00" * 60, "checkpoint": "00" * 32, "extra": 1},
        {"previous": "00" * 60, "checkpoint": "00" * 32},
        "00" * 60,
    ],
)
def test_malformed_rekey_field_is_refused(field: object) -> None:
    header, _, _, _ = _rekeyed()
    doc = json.loads(header.to_bytes())
    doc["rekey"] = field
    with pytest.raises(FormatError):
        Header.from_bytes(json.dumps(doc).encode())


def test_edited_rekey_field_fails_the_mac() -> None:
    header, cred, _, _ = _rekeyed()
    doc = json.loads(header.to_bytes())
    doc["rekey"]["previous"] = "00" * 60
    with pytest.raises(IntegrityError):
        Header.from_bytes(json.dumps(doc).encode()).unlock(cred)


def test_the_checkpoint_decides_whether_the_previous_key_still_opens() -> None:
    """A header's ``rekey`` field can be replayed; the checkpoint cannot be without a rollback.
    Marked under the new key: in progress. Unmarked under the new key: finished, the previous
    key is retired. Under the previous key: only the checkpoint the re-key began from."""
    old_master, new_master = Secret.generate(), Secret.generate()
    began = Checkpoint(3, 9, 5, bytes(32), {1: 2})
    began_blob = SealedObjects(VolumeKeys(old_master, VID), 4096).seal_checkpoint(began)

    def rekeying() -> SealedObjects:
        keys = VolumeKeys(new_master, VID, previous=VolumeKeys(old_master, VID))
        return SealedObjects(keys, 4096, rekey_checkpoint=hashlib.sha256(began_blob).digest())

    objects = rekeying()
    assert objects.open_checkpoint(began_blob) == began and objects.keys.previous is not None
    forged = Checkpoint(3, 9, 5, bytes(32), {1: 666})  # whoever holds the old key
    forged_blob = SealedObjects(VolumeKeys(old_master, VID), 4096).seal_checkpoint(forged)
    with pytest.raises(AuthError, match="not the one the re-key began from"):
        rekeying().open_checkpoint(forged_blob)
    marked = objects.seal_checkpoint(Checkpoint(4, 10, 5, bytes(32), {1: 2}))
    fresh = rekeying()
    assert fresh.open_checkpoint(marked).gen == 4 and fresh.keys.previous is not None
    old_block = VolumeKeys(old_master, VID).inode(1).seal(b"x", b"ad")
    assert fresh.keys.inode(1).open(old_block, b"ad") == b"x"
    fresh.keys.retire_previous()
    unmarked = fresh.seal_checkpoint(Checkpoint(5, 11, 5, bytes(32), {1: 2}))
    replayed = rekeying()  # a header still in mid re-key, handed back after it finished
    assert replayed.open_checkpoint(unmarked).gen == 5 and replayed.keys.previous is None
    with pytest.raises(AuthError):
        replayed.keys.inode(1).open(old_block, b"ad")
    with pytest.raises(AuthError):  # the mark is bound: an unmarked one never passes as marked
        open_checkpoint_aged(fresh.keys.journal, VID, unmarked, rekeying=True)
