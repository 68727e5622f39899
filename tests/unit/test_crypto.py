"""Pure tests of the crypto module: labels, sealing, wrapping, KDFs, sealing to a key."""

from __future__ import annotations

import pytest

from sealfs.crypto import (
    AuthError,
    EphemeralKeyPair,
    KdfParams,
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


def test_labels_are_unambiguous() -> None:
    assert label("ab", "c") != label("a", "bc")
    assert label("a") != label("a", "")


def test_secret_never_shows_its_bytes() -> None:
    s = Secret(b"topsecret-key-material-0123456789")
    assert "topsecret" not in repr(s) and "topsecret" not in str(s)
    assert "topsecret" not in repr(VolumeKeys(Secret.generate(), b"v" * 16))
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
    for field, value in [("memory_kib", 1 << 40), ("iterations", 10**6), ("name", "md5"),
                         ("salt", "00")]:
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
