"""The volume header: a self-describing, versioned JSON document with key slots.

The header holds the volume's public parameters (format version, volume id, cipher, block
size, compression) and one or more key slots, each wrapping the random volume master key under
a key-encryption key (KEK) from one credential: a key file, a recovery passphrase (argon2id or
scrypt, parameters in the slot) or the KMS (a key it releases to this attested CVM). A MAC
under a key derived from the master key covers the canonical form of the whole header, so a
host that edits any field (block size, compression, slots) is caught right after unlock, and a
header that is not exactly its canonical form's fields is refused when read. Exact layout and
canonical bytes: docs/format.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealfs import strict
from sealfs.crypto import (
    AuthError,
    KdfParams,
    Secret,
    VolumeKeys,
    ct_equal,
    derive_from_passphrase,
    hkdf,
    label,
    random_bytes,
    unwrap_key,
    wrap_key,
)
from sealfs.errors import FormatError, IntegrityError, SealfsError, UnlockError, UsageError
from sealfs.kms.client import VolumeKms
from sealfs.kms.protocol import MAX_ID_BYTES, MAX_KEY_VERSION
from sealfs.store import HEADER_NAME, MissingObject, ObjectStore

MAGIC = "sealfs-volume"
#: 2: every object sealed with a key per message. 1: single keys; still read, and made 2 with
#: ``format1_objects`` (its older objects need the single keys) before the first write.
FORMAT_VERSION = 2
CIPHER = "AES-256-GCM"
MIN_BLOCK, MAX_BLOCK = 4096, 4 * 1024 * 1024
MAX_HEADER_BYTES = 1 << 20
#: Unlocking tries every slot of the credential's type, each at the cost the header names
#: (argon2id up to 4 GiB): a hostile header may not multiply that without bound.
MAX_SLOTS = 16
KEYFILE_MIN_BYTES = 32
KEYFILE_MAX_BYTES = 1 << 20
MAX_SLOT_ID = 2**32 - 1
MAX_HEADER_INT = 2**63 - 1  # block size and creation time: what a u64 label part can carry
MAC_BYTES = 32  # HMAC-SHA256
MAX_CANONICAL_BODY = 0xFFFF  # the MAC takes the body as one label part (u16 length)
#: Version of the header's ``rekey`` field (a re-key in progress, docs/format.md).
REKEY_VERSION = 2
REKEY_PREVIOUS_BYTES = 32 + 28  # a wrapped master key: AEAD of 32 bytes
REKEY_CHECKPOINT_BYTES = 32  # SHA-256 of the checkpoint the re-key began from


# --- credentials -----------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class KeyFileCredential:
    """The contents of a key file; unlocks slots of type ``keyfile``.

    ``expected_volume`` (every credential has it): the volume id this credential is meant
    for, from trusted configuration; a header with another id is refused before unlocking.
    """

    secret: Secret
    expected_volume: bytes | None = None
    slot_type = "keyfile"

    def __repr__(self) -> str:
        return "<KeyFileCredential>"


@dataclass(frozen=True, repr=False)
class PassphraseCredential:
    """A recovery passphrase; unlocks slots of type ``passphrase``."""

    secret: Secret
    expected_volume: bytes | None = None
    slot_type = "passphrase"

    def __repr__(self) -> str:
        return "<PassphraseCredential>"


class KmsCredential:
    """Key release by the KMS; unlocks slots of type ``kms`` (see sealfs.kms.client).

    ``client`` speaks for this CVM's attested app (a :class:`sealfs.kms.client.KmsClient`);
    the mount also anchors the volume's freshness through it.
    """

    slot_type = "kms"

    def __init__(self, client: VolumeKms, expected_volume: bytes | None = None) -> None:
        self.client = client
        self.expected_volume = expected_volume

    def __repr__(self) -> str:
        return f"<KmsCredential {self.client!r}>"


Credential = KeyFileCredential | PassphraseCredential | KmsCredential
KMS_PURPOSE = "volume-wrap"
KMS_SLOT_FIELDS = {"url", "app_id", "key_version", "kms_public_key"}


def read_key_file(path: str | os.PathLike[str]) -> KeyFileCredential:
    """Read a key file, refusing one that group or others can read, or that is too short.

    ``-`` reads the key from standard input (how the mount daemon receives it).
    """
    if str(path) == "-":
        data = sys.stdin.buffer.read(KEYFILE_MAX_BYTES + 1)
        if len(data) > KEYFILE_MAX_BYTES:
            raise UsageError(f"standard input holds more than {KEYFILE_MAX_BYTES} bytes")
        return _checked_key(data, "standard input")
    return _checked_key(
        strict.read_secret_file(path, "key file", KEYFILE_MAX_BYTES), f"key file {path}"
    )


def _checked_key(data: bytes, source: str) -> KeyFileCredential:
    if len(data) < KEYFILE_MIN_BYTES:
        raise UsageError(
            f"{source} holds {len(data)} bytes; at least "
            f"{KEYFILE_MIN_BYTES} random bytes are required"
        )
    return KeyFileCredential(Secret(data))


def new_key_file(path: str | os.PathLike[str]) -> KeyFileCredential:
    """Create a fresh random 64-byte key file with mode 0600 (never overwriting one)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"key file {p} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise UsageError(f"cannot create key file {p}: {e.strerror}") from None
    secret = Secret(random_bytes(64))
    with os.fdopen(fd, "wb") as f:
        f.write(secret.reveal())
        f.flush()
        os.fsync(f.fileno())
    return KeyFileCredential(secret)


# --- slots -----------------------------------------------------------------------------------


@dataclass
class Slot:
    id: int
    type: str
    wrapped: bytes
    salt: bytes = b""
    kdf: KdfParams | None = None
    # url, app_id, key_version, kms_public_key (hex; who answered at creation, never trusted)
    kms: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "type": self.type, "wrapped": self.wrapped.hex()}
        if self.salt:
            d["salt"] = self.salt.hex()
        if self.kdf is not None:
            d["kdf"] = self.kdf.to_dict()
        if self.kms is not None:
            d["kms"] = dict(self.kms)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Slot:
        """Parse one slot of an unauthenticated header: every field of the exact JSON type and
        range the format allows (ValueError otherwise), so that nothing odd reaches the key
        derivation (a slot id of -1 cannot be encoded into the slot's associated data)."""
        if not isinstance(d, dict) or not isinstance(d.get("type"), str):
            raise ValueError("malformed key slot")
        if not strict.integer_in(d.get("id"), 0, MAX_SLOT_ID):
            raise ValueError(f"key slot id must be an integer in [0, {MAX_SLOT_ID}]")
        kdf = KdfParams.from_dict(d["kdf"]) if "kdf" in d else None
        kms = d.get("kms")
        if kms is not None and not (
            isinstance(kms, dict)
            and kms.keys() == KMS_SLOT_FIELDS
            and isinstance(kms.get("url"), str)
            and isinstance(kms.get("app_id"), str)
            and strict.integer_in(kms.get("key_version"), 1, MAX_KEY_VERSION)
            and isinstance(kms.get("kms_public_key"), str)
        ):
            raise ValueError("malformed kms slot")
        if kms is not None:
            _hex_field(kms, "app_id", 1, MAX_ID_BYTES)
            _hex_field(kms, "kms_public_key", 0, 32)
        return cls(
            d["id"],
            d["type"],
            _hex_field(d, "wrapped"),
            _hex_field(d, "salt") if "salt" in d else b"",
            kdf,
            kms,
        )

    def public_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.kdf is not None:
            info["kdf"] = {k: v for k, v in self.kdf.to_dict().items() if k != "salt"}
        if self.kms is not None:
            info["kms"] = dict(self.kms)
        return info


def _hex_field(
    obj: dict[str, Any], name: str, min_len: int = 0, max_len: int | None = None
) -> bytes:
    """A hex field of the header (KeyError if absent, ValueError naming it if malformed)."""
    try:
        return strict.hex_bytes(obj[name], min_len, max_len)
    except ValueError as e:
        raise ValueError(f"{name} {e}") from None


def _slot_ad(volume_id: bytes, slot: Slot) -> bytes:
    return label("slot", volume_id, slot.id, slot.type)


def _kms_kek(app_key: Secret) -> Secret:
    return hkdf(app_key, "slot-kms")


def _kek(cred: Credential, slot: Slot, volume_id: bytes) -> Secret:
    if isinstance(cred, KeyFileCredential):
        return hkdf(cred.secret, "slot-keyfile", salt=slot.salt)
    if isinstance(cred, KmsCredential):
        assert slot.kms is not None
        # The slot's url and kms_public_key are informational: which KMS the client trusts
        # is the client's own configuration, never a value from the (unauthenticated) disk.
        key, _ = cred.client.get_key(KMS_PURPOSE, volume_id, slot.kms["key_version"])
        return _kms_kek(key)
    assert slot.kdf is not None
    return hkdf(derive_from_passphrase(cred.secret, slot.kdf), "slot-passphrase")


# --- header ----------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """The canonical serialisation of docs/format.md ("Canonical body"): sorted keys, no
    whitespace, ASCII only (every other character a ``\\uXXXX`` escape, lower-case hex)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


@dataclass
class Header:
    volume_id: bytes
    block_size: int
    compression: str
    created: int
    slots: list[Slot] = field(default_factory=list)
    mac: bytes = b""
    format_version: int = FORMAT_VERSION
    format1_objects: bool = False  # a format-1 volume made format 2: holds format-1 objects
    #: during a re-key: the replaced master key, wrapped under the new one (docs/format.md)
    rekey_previous: bytes | None = None
    #: during a re-key: the SHA-256 of the checkpoint file it began from (docs/format.md)
    rekey_checkpoint: bytes | None = None

    def body(self) -> dict[str, Any]:
        return {
            **({"format1_objects": True} if self.format1_objects else {}),
            **(
                {
                    "rekey": {
                        "version": REKEY_VERSION,
                        "previous": self.rekey_previous.hex(),
                        "checkpoint": (self.rekey_checkpoint or b"").hex(),
                    }
                }
                if self.rekey_previous is not None
                else {}
            ),
            "magic": MAGIC,
            "format_version": self.format_version,
            "volume_id": self.volume_id.hex(),
            "cipher": CIPHER,
            "kdf": "HKDF-SHA256",
            "block_size": self.block_size,
            "compression": self.compression,
            "created": self.created,
            "slots": [s.to_dict() for s in self.slots],
        }

    def canonical_body(self) -> bytes:
        """The bytes the MAC covers."""
        return canonical_json(self.body())

    def document(self) -> dict[str, Any]:
        """The header as stored: the body and its MAC."""
        return {**self.body(), "mac": self.mac.hex()}

    def to_bytes(self) -> bytes:
        return (json.dumps(self.document(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Header:
        if len(data) > MAX_HEADER_BYTES:
            raise FormatError("volume header is implausibly large")
        try:
            doc = strict.loads(data)
        except ValueError:  # UnicodeDecodeError, duplicate keys, too deep: all ValueError
            raise FormatError(
                "volume header is not valid JSON (corrupt or not a sealfs volume)"
            ) from None
        if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
            raise FormatError("not a sealfs volume header")
        version = doc.get("format_version")
        if type(version) is not int:  # not a bool either
            raise FormatError("volume header has no format version")
        if version > FORMAT_VERSION:
            raise FormatError(
                f"volume format version {version} is newer than this sealfs "
                f"supports ({FORMAT_VERSION}); upgrade sealfs"
            )
        if version < 1:
            raise FormatError(f"volume format version {version} is not valid")
        format1_objects = doc.get("format1_objects", False)
        if not isinstance(format1_objects, bool) or (format1_objects and version != 2):
            raise FormatError("volume header has an invalid format1_objects field")
        rekey_previous, rekey_checkpoint = _rekey_field(doc.get("rekey"), version)
        try:
            if doc["cipher"] != CIPHER or doc["kdf"] != "HKDF-SHA256":
                raise FormatError(f"unsupported cipher {doc['cipher']!r}")
            for name in ("block_size", "created"):
                if not strict.integer_in(doc[name], 0, MAX_HEADER_INT):
                    raise FormatError(
                        f"volume header field {name} is not an integer in [0, {MAX_HEADER_INT}]"
                    )
            if not isinstance(doc["slots"], list) or len(doc["slots"]) > MAX_SLOTS:
                raise FormatError(f"volume header slots are not a list of at most {MAX_SLOTS}")
            slots = [Slot.from_dict(s) for s in doc["slots"]]
            if len({s.id for s in slots}) != len(slots):
                raise FormatError("volume header has two key slots with the same id")
            header = cls(
                volume_id=_hex_field(doc, "volume_id", 16, 16),
                block_size=doc["block_size"],
                compression=str(doc["compression"]),
                created=doc["created"],
                slots=slots,
                mac=_hex_field(doc, "mac", MAC_BYTES, MAC_BYTES),
                format_version=version,
                format1_objects=format1_objects,
                rekey_previous=rekey_previous,
                rekey_checkpoint=rekey_checkpoint,
            )
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, UsageError) as e:
            raise FormatError(f"volume header is malformed ({e})") from None
        header.validate()
        # The MAC covers the canonical form of the stored document (docs/format.md); the
        # fields kept must be exactly that document, or an unknown field, a "salt": "" or an
        # upper-case hex digit would pass unauthenticated.
        if canonical_json(doc) != canonical_json(header.document()):
            raise FormatError(
                "volume header holds a field or spelling sealfs does not write "
                "(edited outside sealfs)"
            )
        if len(header.canonical_body()) > MAX_CANONICAL_BODY:
            raise FormatError("volume header is too large to authenticate")
        return header

    def validate(self) -> None:
        if len(self.volume_id) != 16:
            raise FormatError("volume id must be 16 bytes")
        bs = self.block_size
        if not (MIN_BLOCK <= bs <= MAX_BLOCK) or bs & (bs - 1):
            raise FormatError(
                f"block size {bs} is not a power of two in [{MIN_BLOCK}, {MAX_BLOCK}]"
            )
        if self.compression not in ("none", "lz4"):
            raise FormatError(f"unknown compression {self.compression!r}")

    # --- keys ----------------------------------------------------------------------------

    def unlock(self, cred: Credential) -> Secret:
        """Return the master key, after checking the header MAC under it."""
        self._check_expected(cred.expected_volume)
        candidates = [s for s in self.slots if s.type == cred.slot_type]
        if not candidates:
            raise UnlockError(f"volume has no {cred.slot_type} key slot")
        for slot in candidates:
            try:
                master = unwrap_key(
                    _kek(cred, slot, self.volume_id), slot.wrapped, _slot_ad(self.volume_id, slot)
                )
            except AuthError:
                continue
            if not ct_equal(
                VolumeKeys(master, self.volume_id).header_mac(self.canonical_body()), self.mac
            ):
                raise IntegrityError(
                    "volume header failed authentication: it was modified outside sealfs"
                )
            return master
        if isinstance(cred, KmsCredential):
            raise UnlockError(
                "the key released by the KMS does not open the kms slot (wrong "
                "app id, or the slot belongs to another KMS root)"
            )
        raise UnlockError(
            f"wrong {cred.slot_type.replace('keyfile', 'key file')}: no "
            f"{cred.slot_type} slot opens with it"
        )

    def _check_expected(self, expected: bytes | None) -> None:
        """Refuse a swapped-in volume: one with valid slots for the same credential (e.g.
        another volume of the same app) is authentic, but not the volume that was asked for."""
        if expected is not None and not ct_equal(expected, self.volume_id):
            raise IntegrityError(
                f"the backing directory holds volume "
                f"{uuid.UUID(bytes=self.volume_id)}, not the expected "
                f"{format_volume_id(expected)}: refusing a swapped-in volume"
            )

    def kms_slot(self) -> Slot | None:
        return next((s for s in self.slots if s.type == "kms"), None)

    def add_slot(self, master: Secret, cred: Credential, kdf: KdfParams | None = None) -> Slot:
        if len(self.slots) >= MAX_SLOTS:
            raise UsageError(f"a volume holds at most {MAX_SLOTS} key slots")
        if isinstance(cred, KmsCredential) and self.kms_slot() is not None:
            raise UsageError(
                "the volume already has a kms slot (one KMS anchors a volume): rotate it, "
                "or remove it first"
            )
        slot = self._wrapped_slot(
            master, max((s.id for s in self.slots), default=-1) + 1, cred, kdf
        )
        self.slots.append(slot)
        self.seal(master)
        return slot

    def remove_slot(self, master: Secret, slot_id: int) -> Slot:
        """Drop one slot and seal again; the last slot never goes (nothing would open)."""
        slot = next((s for s in self.slots if s.id == slot_id), None)
        if slot is None:
            raise UsageError(f"the volume has no key slot {slot_id}")
        if len(self.slots) == 1:
            raise UsageError(
                f"refusing to remove slot {slot_id}: it is the volume's last key slot, and "
                "without one nothing can ever open the volume again"
            )
        self.slots.remove(slot)
        self.seal(master)
        return slot

    def rewrap_kms_slot(self, master: Secret, cred: KmsCredential) -> tuple[Slot, Slot]:
        """Wrap the master key again under the app key's current version, in the kms slot's
        place (same id); return the old and the new slot."""
        old = self.kms_slot()
        if old is None:
            raise UsageError("the volume has no kms slot to rotate")
        new = self._wrapped_slot(master, old.id, cred, None)
        self.slots[self.slots.index(old)] = new
        self.seal(master)
        return old, new

    def _wrapped_slot(
        self, master: Secret, slot_id: int, cred: Credential, kdf: KdfParams | None
    ) -> Slot:
        """A new slot ``slot_id`` wrapping ``master`` under ``cred`` (a KMS: its current
        key version)."""
        if isinstance(cred, PassphraseCredential):
            slot = Slot(slot_id, "passphrase", b"", kdf=kdf or KdfParams.default())
            kek = _kek(cred, slot, self.volume_id)
        elif isinstance(cred, KmsCredential):
            client = cred.client
            key, version = client.get_key(KMS_PURPOSE, self.volume_id)  # current version
            slot = Slot(
                slot_id,
                "kms",
                b"",
                kms={
                    "url": client.url,
                    "app_id": client.app_id.hex(),
                    "key_version": version,
                    "kms_public_key": (client.answering_key or b"").hex(),
                },
            )
            kek = _kms_kek(key)
        else:
            slot = Slot(slot_id, "keyfile", b"", salt=random_bytes(16))
            kek = _kek(cred, slot, self.volume_id)
        slot.wrapped = wrap_key(kek, master, _slot_ad(self.volume_id, slot))
        return slot

    def seal(self, master: Secret) -> None:
        self.mac = VolumeKeys(master, self.volume_id).header_mac(self.canonical_body())

    def volume_keys(self, master: Secret, older: bool = True) -> VolumeKeys:
        """The keys of this volume's objects under the unlocked ``master``: a volume that was
        format 1 may hold objects sealed with format 1's single keys, and a volume being
        re-keyed objects sealed under the replaced master key (and, if that volume was format
        1, its single keys), so those open too. ``older=False``: the newest keys only (what a
        re-key tells apart from the rest)."""
        legacy = self.format_version < 2 or self.format1_objects
        if self.rekey_previous is None:
            return VolumeKeys(master, self.volume_id, legacy=legacy and older)
        newest = VolumeKeys(master, self.volume_id)
        if not older:
            return newest
        try:
            previous = newest.unwrap_previous(self.rekey_previous)
        except AuthError:
            raise IntegrityError(
                "the volume header's re-key field does not open under its master key"
            ) from None
        return VolumeKeys(
            master,
            self.volume_id,
            previous=VolumeKeys(previous, self.volume_id, legacy=legacy),
        )

    @property
    def rekey_in_progress(self) -> bool:
        return self.rekey_previous is not None

    def begin_rekey(
        self, previous: Secret, master: Secret, slots: list[Slot], checkpoint: bytes
    ) -> None:
        """Make this header the first of a re-key: ``slots`` wrap the new ``master``, which
        also wraps the ``previous`` one (objects not yet re-sealed open under it); a format-1
        header becomes format 2 on the way (the new master seals only format 2).
        ``checkpoint``: the SHA-256 of the checkpoint file the re-key begins from, the only
        checkpoint under the previous key that readers accept from then on."""
        if self.format_version < 2:
            self.format_version, self.format1_objects = 2, True
        self.slots = slots
        self.rekey_previous = VolumeKeys(master, self.volume_id).wrap_previous(previous)
        self.rekey_checkpoint = checkpoint
        self.seal(master)

    def end_rekey(self, master: Secret) -> None:
        """Every object is sealed under ``master`` now: forget the previous master key (and
        format-1 objects, which a re-key replaced too)."""
        self.rekey_previous, self.rekey_checkpoint, self.format1_objects = None, None, False
        self.seal(master)

    def rewrapped_slot(self, master: Secret, slot: Slot, cred: Credential) -> Slot:
        """A copy of ``slot`` (same id and type; a fresh salt, a passphrase's KDF costs, a
        KMS's current key version) wrapping ``master`` under ``cred``."""
        kdf = None
        if slot.kdf is not None:
            kdf = KdfParams.default(
                slot.kdf.name, slot.kdf.memory_kib, slot.kdf.iterations, slot.kdf.lanes
            )
        return self._wrapped_slot(master, slot.id, cred, kdf)

    def slots_opened_by(self, cred: Credential) -> list[Slot]:
        """The slots ``cred`` opens (wrapping this header's master key)."""
        opened = []
        for slot in self.slots:
            if slot.type != cred.slot_type:
                continue
            try:
                unwrap_key(
                    _kek(cred, slot, self.volume_id), slot.wrapped, _slot_ad(self.volume_id, slot)
                )
            except AuthError:
                continue
            opened.append(slot)
        return opened

    def upgrade_format_1(self, keys: VolumeKeys) -> None:
        """Make a format-1 header format 2 (to be written before anything format 2 is): its
        older objects still open with the format-1 keys, and older sealfs versions refuse
        the volume instead of taking its format-2 objects for damage."""
        self.format_version, self.format1_objects = 2, True
        self.mac = keys.header_mac(self.canonical_body())

    def public_info(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "volume_id": self.volume_id.hex(),
            "uuid": str(uuid.UUID(bytes=self.volume_id)),
            "cipher": CIPHER,
            "block_size": self.block_size,
            "compression": self.compression,
            "created": self.created,
            "slots": [s.public_info() for s in self.slots],
            "rekey_in_progress": self.rekey_in_progress,
        }


def _rekey_field(value: Any, version: int) -> tuple[bytes | None, bytes | None]:
    """The wrapped previous master key of a ``rekey`` field and the digest of the checkpoint
    the re-key began from (None, None: no re-key in progress)."""
    if value is None:
        return None, None
    if (
        version != 2
        or not isinstance(value, dict)
        or value.keys() != {"version", "previous", "checkpoint"}
        or not strict.integer_in(value["version"], REKEY_VERSION, REKEY_VERSION)
    ):
        raise FormatError("volume header has an invalid rekey field")
    try:
        return (
            strict.hex_bytes(value["previous"], REKEY_PREVIOUS_BYTES, REKEY_PREVIOUS_BYTES),
            strict.hex_bytes(value["checkpoint"], REKEY_CHECKPOINT_BYTES, REKEY_CHECKPOINT_BYTES),
        )
    except ValueError:
        raise FormatError("volume header has an invalid rekey field") from None


def parse_volume_id(text: str) -> bytes:
    """A volume id as `sealfs info` shows it: a UUID, or 32 hex digits."""
    try:
        return uuid.UUID(text.strip()).bytes
    except ValueError:
        raise UsageError(
            f"not a volume id: {text!r} (a UUID or 32 hex digits, as `sealfs info` shows it)"
        ) from None


def format_volume_id(volume_id: bytes) -> str:
    return str(uuid.UUID(bytes=volume_id)) if len(volume_id) == 16 else volume_id.hex()


def new_header(block_size: int, compression: str) -> tuple[Header, Secret]:
    header = Header(
        volume_id=random_bytes(16),
        block_size=block_size,
        compression=compression,
        created=int(time.time()),
    )
    header.validate()
    return header, Secret.generate()


def load_header(backing: Path) -> Header:
    """Read the header through the store: never through a symlink, never from a FIFO, and
    never more than :data:`MAX_HEADER_BYTES` (a larger file is refused unread)."""
    return load_header_bytes(backing)[0]


def load_header_bytes(backing: Path) -> tuple[Header, bytes]:
    """:func:`load_header`, with the bytes it parsed: what a copy of the header must carry
    (a second read may find another header, replaced meanwhile by ``sealfs key``)."""
    if not Path(backing).is_dir():
        raise UsageError(f"{backing} is not a directory")
    store = ObjectStore(Path(backing))
    try:
        data = store.read_file(HEADER_NAME, MAX_HEADER_BYTES)
    except MissingObject:
        raise FormatError(f"{backing} is not a sealfs volume (no {HEADER_NAME})") from None
    except SealfsError as e:
        raise FormatError(f"cannot read the volume header of {backing}: {e}") from None
    finally:
        store.close()
    return Header.from_bytes(data), data


@dataclass
class HeaderChange:
    """The header as read under the header lock, and the way to replace it while the lock
    is held (see :func:`header_change`)."""

    header: Header
    store: ObjectStore

    def replace(self, header: Header) -> None:
        """Write ``header`` in place of the old one with one atomic replace (temporary file,
        fsync, rename, fsync of the directory): a crash leaves the old or the new header."""
        self.store.replace_file(HEADER_NAME, header.to_bytes())


@contextlib.contextmanager
def header_change(backing: Path) -> Iterator[HeaderChange]:
    """Hold the volume's header lock and yield the header read under it: every change of an
    existing header (read, change, replace) goes through here, so that two of them at once
    (two ``sealfs key add``, a slot change during a re-key) never lose one. The lock is not
    the volume lock, so this works while the volume is mounted."""
    load_header(backing)  # a volume at all: no lock file is created anywhere else
    store = ObjectStore(Path(backing))
    try:
        with store.header_lock():
            yield HeaderChange(load_header(backing), store)
    finally:
        store.close()
