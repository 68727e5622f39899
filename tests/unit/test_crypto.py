"""Pure tests of the crypto module: labels, sealing, wrapping, KDFs, sealing to a key."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from sealfs.crypto import (
    AuthError,
    EphemeralKeyPair,
    KdfParams,
    ObjectSealer,
    Sealer,
    Secret,
    VolumeKeys,
    derive_from_passphrase,
    hkdf,
    label,
    seal_to_public,
    unwrap_key,
    wrap_key,
)
from sealfs.errors import UsageError
from sealfs.sealed.codec import inode_ad


def test_labels_are_unambiguous() -> None:
    assert label("ab", "c") != label("a", "bc")
    assert label("a") != label("a", "")


def test_secret_never_shows_its_bytes() -> None:
    s = Secret(b"topsecret-key-material-0123456789")
    assert "topsecret" not in repr(s) and "topsecret" not in str(s)
    assert "topsecret" not in repr(VolumeKeys(Secret.generate(), b"v" * 16))
    assert "topsecret" not in repr(ObjectSealer(Secret(s.reveal()[:32])))
    assert s == Secret(b"topsecret-key-material-0123456789")
    assert s != Secret(b"other")


def test_seal_open_roundtrip_and_binding() -> None:
    sealer = Sealer(Secret.generate())
    blob = sealer.seal(b"payload", b"ad-1")
    assert sealer.open(blob, b"ad-1") == b"payload"
    with pytest.raises(AuthError):
        sealer.open(blob, b"ad-2")
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 0x01
        with pytest.raises(AuthError):
            sealer.open(bytes(flipped), b"ad-1")
    with pytest.raises(AuthError):
        sealer.open(blob[:-1], b"ad-1")
    with pytest.raises(AuthError):
        Sealer(Secret.generate()).open(blob, b"ad-1")


def test_nonces_are_fresh() -> None:
    sealer = Sealer(Secret.generate())
    assert sealer.seal(b"same", b"") != sealer.seal(b"same", b"")


def test_hkdf_separates_purposes() -> None:
    root = Secret.generate()
    assert hkdf(root, "a") != hkdf(root, "b")
    assert hkdf(root, "a") == hkdf(root, "a")


def test_key_wrap_binds_ad() -> None:
    kek, key = Secret.generate(), Secret.generate()
    wrapped = wrap_key(kek, key, b"slot0")
    assert unwrap_key(kek, wrapped, b"slot0") == key
    with pytest.raises(AuthError):
        unwrap_key(kek, wrapped, b"slot1")


@pytest.mark.parametrize("name", ["argon2id", "scrypt"])
def test_passphrase_kdf(name: str) -> None:
    params = KdfParams.default(name, memory_kib=1024, iterations=1, lanes=1)
    a = derive_from_passphrase(Secret(b"correct horse"), params)
    assert a == derive_from_passphrase(Secret(b"correct horse"), params)
    assert a != derive_from_passphrase(Secret(b"wrong horse"), params)
    again = KdfParams.from_dict(params.to_dict())
    assert derive_from_passphrase(Secret(b"correct horse"), again) == a


def test_hostile_kdf_parameters_refused() -> None:
    params = KdfParams.default("argon2id", memory_kib=1024, iterations=1, lanes=1).to_dict()
    for field, value in [
        ("memory_kib", 1 << 40),
        ("iterations", 10**6),
        ("name", "md5"),
        ("salt", "00"),
    ]:
        with pytest.raises(UsageError):
            KdfParams.from_dict({**params, field: value})


def test_seal_to_public_key() -> None:
    pair = EphemeralKeyPair()
    secret = Secret.generate()
    enc, ct = seal_to_public(pair.public_bytes, secret, b"ctx")
    assert pair.open_sealed(enc, ct, b"ctx") == secret
    with pytest.raises(AuthError):
        pair.open_sealed(enc, ct, b"other-ctx")
    with pytest.raises(AuthError):
        EphemeralKeyPair().open_sealed(enc, ct, b"ctx")


def test_inode_keys_differ_per_inode() -> None:
    keys = VolumeKeys(Secret.generate(), b"v" * 16)
    blob = keys.inode(2).seal(b"data", b"ad")
    with pytest.raises(AuthError):
        keys.inode(3).open(blob, b"ad")
    assert keys.inode(2).open(blob, b"ad") == b"data"


def _reference_open(base: Secret, blob: bytes, ad: bytes) -> bytes:
    """docs/format.md's format-2 seal, written from the text with cryptography's own
    HKDF-Expand: ``r = blob[:24]``, key = HKDF-Expand(base, label("message", r)), GCM nonce
    ``r[12:]``."""
    r = blob[:24]
    key = HKDFExpand(hashes.SHA256(), 32, label("message", r)).derive(base.reveal())
    return AESGCM(key).decrypt(r[12:], blob[24:], ad)


def test_volume_keys_follow_the_documented_hierarchy() -> None:
    master, vid = Secret.generate(), b"v" * 16
    keys = VolumeKeys(master, vid)
    inode_base = hkdf(hkdf(master, "object", vid), "inode-base", 5)
    blob = keys.inode(5).seal(b"record", b"ad")
    assert len(blob) == len(b"record") + 40
    assert _reference_open(inode_base, blob, b"ad") == b"record"
    frame = keys.journal.seal(b"commit", b"jad")
    assert _reference_open(hkdf(master, "journal-base", vid), frame, b"jad") == b"commit"


def test_every_object_of_an_inode_has_its_own_key() -> None:
    """Two objects of one inode are sealed under different keys: one object's ciphertext
    does not open under the other's key, nor under the inode's base key used directly, nor
    with the other's object id; so no AES-GCM key ever seals more than one message."""
    master, vid = Secret.generate(), b"v" * 16
    sealer = VolumeKeys(master, vid).inode(2)
    base = hkdf(hkdf(master, "object", vid), "inode-base", 2)
    one = sealer.seal(b"same plaintext", inode_ad(vid, 2, 101))
    two = sealer.seal(b"same plaintext", inode_ad(vid, 2, 102))
    key_of = [
        HKDFExpand(hashes.SHA256(), 32, label("message", b[:24])).derive(base.reveal())
        for b in (one, two)
    ]
    assert key_of[0] != key_of[1]
    with pytest.raises(AuthError):  # object 1's ciphertext under object 2's key
        sealer.open(two[:24] + one[24:], inode_ad(vid, 2, 101))
    with pytest.raises(AuthError):
        sealer.open(one, inode_ad(vid, 2, 102))
    with pytest.raises(AuthError):
        Sealer(base).open(one[12:], inode_ad(vid, 2, 101))
    assert sealer.open(one, inode_ad(vid, 2, 101)) == b"same plaintext"


def test_format_1_objects_open_only_on_a_format_1_volume() -> None:
    """A format-1 object (sealed directly under the inode key) opens through the fallback of a
    format-1 volume's keys, and is refused by a format-2 volume and by another inode."""
    master, vid = Secret.generate(), b"v" * 16
    old = Sealer(hkdf(hkdf(master, "object", vid), "inode", 2)).seal(b"old", b"ad")
    old_frame = Sealer(hkdf(master, "journal", vid)).seal(b"frame", b"jad")
    legacy = VolumeKeys(master, vid, legacy=True)
    assert legacy.inode(2).open(old, b"ad") == legacy.inode(2).open_legacy(old, b"ad") == b"old"
    assert legacy.journal.open(old_frame, b"jad") == b"frame"
    with pytest.raises(AuthError):
        legacy.inode(3).open(old, b"ad")
    current = VolumeKeys(master, vid)
    for sealer, blob, ad in ((current.inode(2), old, b"ad"), (current.journal, old_frame, b"jad")):
        with pytest.raises(AuthError):
            sealer.open(blob, ad)
        with pytest.raises(AuthError):
            sealer.open_legacy(blob, ad)
    new = legacy.inode(2).seal(b"new", b"ad")  # a format-1 volume writes format 2
    assert current.inode(2).open(new, b"ad") == b"new"
    with pytest.raises(AuthError):
        legacy.inode(2).open_legacy(new, b"ad")


def test_inode_sealer_cache_keeps_the_most_recently_used() -> None:
    keys = VolumeKeys(Secret.generate(), b"v" * 16, cache_size=2)
    first = keys.inode(1)
    keys.inode(2)
    assert keys.inode(1) is first  # a use makes inode 1 the most recent...
    keys.inode(3)  # ...so inode 2 is the one evicted
    assert keys.inode(1) is first


def test_inode_sealers_are_shared_safely_between_threads() -> None:
    """Worker threads call ``VolumeKeys.inode()`` (the data path's block loads, the checker's
    walk) while the trio thread does: every sealer handed out opens what any other sealed."""
    keys = VolumeKeys(Secret.generate(), b"v" * 16, cache_size=8)
    reference = {ino: keys.inode(ino).seal(b"data", b"ad") for ino in range(32)}

    def use(start: int) -> None:
        for n in range(2000):
            ino = (start + n) % 32
            assert keys.inode(ino).open(reference[ino], b"ad") == b"data"

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(use, range(4)))
