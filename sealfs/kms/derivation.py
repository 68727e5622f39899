"""Deterministic key derivation from the KMS root key.

Every key the KMS hands out or uses is HKDF-SHA256 of the root key with an unambiguous label
(:func:`sealfs.crypto.label`: a version prefix, then every part length-prefixed, integers as
8-byte big-endian). Nothing depends on the machine, so every replica that holds the same root
key derives the same keys, and a volume can move to any host. The labels are listed in
docs/kms-protocol.md; changing one changes every key, so they are frozen.

    app key       = HKDF(root, label("kms-app-key", purpose, app_id, key_version, volume_id))
    identity seed = HKDF(root, label("kms-identity", 1))       -> Ed25519 response-signing key
    store MAC key = HKDF(root, label("kms-store-mac", 1))      -> MACs on rows, buckets, head

``key_version`` lets an operator rotate an app's keys (``sealfs kms policy rotate``) while the
old versions stay derivable, so volumes can be re-wrapped from version N to N+1.
"""

from __future__ import annotations

from collections.abc import Iterable

from sealfs.crypto import Secret, SigningKey, hkdf, mac
from sealfs.kms.protocol import MAX_ID_BYTES, MAX_KEY_VERSION, PURPOSES

IDENTITY_KEY_VERSION = 1
STORE_MAC_VERSION = 1


def app_key(
    root: Secret, purpose: str, app_id: bytes, key_version: int, volume_id: bytes
) -> Secret:
    """The key released to ``app_id`` for ``purpose`` on ``volume_id`` at ``key_version``."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown key purpose {purpose!r}")
    if not 1 <= key_version <= MAX_KEY_VERSION:
        raise ValueError("key version out of range")
    if not (1 <= len(app_id) <= MAX_ID_BYTES and 1 <= len(volume_id) <= MAX_ID_BYTES):
        raise ValueError("app id and volume id must be 1-64 bytes")
    return hkdf(root, "kms-app-key", purpose, app_id, key_version, volume_id)


def identity_key(root: Secret) -> SigningKey:
    """The KMS's Ed25519 identity: signs every response; clients pin its public key."""
    return SigningKey(hkdf(root, "kms-identity", IDENTITY_KEY_VERSION))


class StoreMac:
    """MACs over the KMS state store's rows, so that editing the database file (policies,
    epochs) without the operator secret is detected. Holds its key privately."""

    __slots__ = ("_key",)

    def __init__(self, root: Secret) -> None:
        self._key = hkdf(root, "kms-store-mac", STORE_MAC_VERSION)

    def __repr__(self) -> str:
        return "<StoreMac>"

    def policy(self, app_id: bytes, body: bytes) -> bytes:
        return mac(self._key, "policy", app_id, body)

    def epoch(self, app_id: bytes, volume_id: bytes, epoch: int, root_digest: bytes) -> bytes:
        return mac(self._key, "epoch", app_id, volume_id, epoch, root_digest)

    def bucket_of(self, table: str, *key: bytes) -> int:
        """The bucket (0-255) of a row's key: keyed, so nobody can crowd one bucket."""
        return mac(self._key, "bucket-of", table, *key)[0]

    def bucket(self, table: str, bucket: int, row_macs: Iterable[bytes]) -> bytes:
        """Commits to exactly the set of rows (by their MACs) in one bucket."""
        return mac(self._key, "bucket", table, bucket, *sorted(row_macs))

    def head(self, version: int, bucket_digests: Iterable[bytes]) -> bytes:
        """Binds the table version to every bucket digest: the one MAC over the state."""
        return mac(self._key, "state", version, *bucket_digests)

    def served(self, version: int) -> bytes:
        """A replica's record of the highest table version it served (its high-water file):
        only a holder of this root can write one another replica or restart believes."""
        return mac(self._key, "served-version", version)
