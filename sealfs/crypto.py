"""All cryptography of sealfs, and the only module that handles raw key bytes.

Everything else holds opaque objects (:class:`Secret`, :class:`Sealer`, :class:`VolumeKeys`)
whose ``repr`` never shows key material. Primitives:

* AES-256-GCM with random 96-bit nonces (``nonce || ciphertext || tag``) under one key, for
  key wraps and format-1 objects; and, for everything a volume stores, AES-256-GCM under a
  fresh key per message derived from a 192-bit random value (:class:`ObjectSealer`), so no
  key ever seals more than one message and the 2**32 random-nonce bound cannot be reached.
* HKDF-SHA256 with unambiguous, versioned labels: every label part is length-prefixed, so
  ``("ab", "c")`` and ``("a", "bc")`` can never derive the same key.
* Passphrase KDFs: argon2id (preferred) and scrypt, parameters stored by the caller.
* An HPKE-style "seal to a public key" (X25519 + HKDF + AES-GCM) for key release by the KMS.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from sealfs import strict
from sealfs.errors import IntegrityError, UsageError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
#: Bytes a :class:`Sealer` blob (key wraps, format-1 objects) adds to its plaintext.
AEAD_OVERHEAD = NONCE_SIZE + TAG_SIZE
#: The random value that starts an :class:`ObjectSealer` blob (key derivation, then nonce).
MESSAGE_RANDOM_SIZE = 24
#: Bytes an :class:`ObjectSealer` blob adds to its plaintext: the most any sealed object adds.
SEAL_OVERHEAD = MESSAGE_RANDOM_SIZE + TAG_SIZE
LABEL_PREFIX = b"sealfs/v1"


class AuthError(IntegrityError):
    """A sealed blob failed authentication: modified, truncated, swapped or from elsewhere."""


class Secret:
    """Secret bytes (a key, a passphrase) that never show up in a repr, str or traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def __repr__(self) -> str:
        return f"<Secret {len(self._value)} bytes>"

    __str__ = __repr__

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:  # pragma: no cover - secrets are not dict keys
        raise TypeError("Secret is unhashable")

    def reveal(self) -> bytes:
        """The raw bytes. Call only to hand them to a consumer that needs them (cryptsetup's
        stdin, a KDF); never to log or store them."""
        return self._value

    @classmethod
    def generate(cls, size: int = KEY_SIZE) -> Secret:
        return cls(os.urandom(size))


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def ct_equal(a: bytes, b: bytes) -> bool:
    """Constant-time equality for MACs, tags and digests."""
    return hmac.compare_digest(a, b)


def label(*parts: bytes | str | int) -> bytes:
    """An unambiguous HKDF info string: a version prefix, then each part length-prefixed.

    Integers are encoded as 8-byte big-endian, strings as UTF-8.
    """
    out = [struct.pack(">H", len(LABEL_PREFIX)), LABEL_PREFIX]
    for part in parts:
        if isinstance(part, int):
            raw = struct.pack(">Q", part)
        elif isinstance(part, str):
            raw = part.encode()
        else:
            raw = bytes(part)
        out.append(struct.pack(">H", len(raw)))
        out.append(raw)
    return b"".join(out)


def hkdf(
    key: Secret, *parts: bytes | str | int, salt: bytes | None = None, length: int = KEY_SIZE
) -> Secret:
    """Derive a subkey of ``key`` for the purpose named by ``parts``."""
    kdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=label(*parts))
    return Secret(kdf.derive(key.reveal()))


def mac(key: Secret, *parts: bytes | str | int) -> bytes:
    """HMAC-SHA256 over an unambiguous encoding of ``parts``."""
    return hmac.new(key.reveal(), label(*parts), "sha256").digest()


class Sealer:
    """AES-256-GCM under one key: ``seal`` gives ``nonce || ciphertext || tag``."""

    __slots__ = ("_aead",)

    def __init__(self, key: Secret) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._aead = AESGCM(key.reveal())

    def __repr__(self) -> str:
        return "<Sealer AES-256-GCM>"

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, ad)

    def open(self, blob: bytes | memoryview, ad: bytes) -> bytes:
        if len(blob) < AEAD_OVERHEAD:
            raise AuthError("sealed object too short")
        view = memoryview(blob)
        try:
            return self._aead.decrypt(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], ad)
        except InvalidTag:
            raise AuthError("authentication failed") from None


#: ``label("message")`` followed by the length prefix of the 24-byte random value: the info
#: of a message key is this, the random value, then HKDF-Expand's block counter 1.
_MESSAGE_INFO = label("message") + struct.pack(">H", MESSAGE_RANDOM_SIZE)


class ObjectSealer:
    """AES-256-GCM under a fresh key for every message (volume format 2).

    ``seal`` gives ``r || ciphertext || tag`` for 24 random bytes ``r``; the message key is
    ``HKDF-Expand(base, label("message", r))`` and the GCM nonce is ``r[12:]``. Two messages
    share a key only if their ``r`` collide (2**-192 per pair), so the number of messages
    under one base key is unlimited. HKDF-Expand for one 32-byte block is a single HMAC, which
    keeps the per-message cost to about two microseconds (measured in docs/format.md).

    Older key generations a volume may still hold objects under are tried in order when the
    newest fails, and only ever to open: ``legacy`` is the single-key sealer of format 1 under
    the same master key (a format-1 volume), ``previous`` the sealer of the same object under
    the master key a re-key is replacing (with its own ``legacy``, if that volume was format
    1). :meth:`seal` always uses the newest.
    """

    __slots__ = ("_expand", "_legacy", "_previous")

    def __init__(
        self, base: Secret, legacy: Sealer | None = None, previous: ObjectSealer | None = None
    ) -> None:
        if len(base) != KEY_SIZE:
            raise ValueError("a message base key is 32 bytes")
        # HMAC keyed once with the base key; each message copies it (saves the key setup)
        self._expand = hmac.new(base.reveal(), _MESSAGE_INFO, "sha256")
        self._legacy = legacy
        self._previous = previous

    def __repr__(self) -> str:
        return "<ObjectSealer AES-256-GCM, one key per message>"

    def _aead(self, r: bytes) -> AESGCM:
        expand = self._expand.copy()
        expand.update(r + b"\x01")
        return AESGCM(expand.digest())

    def newest_only(self) -> ObjectSealer:
        """This sealer without the replaced master key's generation (a finished re-key)."""
        sealer = ObjectSealer.__new__(ObjectSealer)
        sealer._expand, sealer._legacy, sealer._previous = self._expand, self._legacy, None
        return sealer

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        r = os.urandom(MESSAGE_RANDOM_SIZE)
        return r + self._aead(r).encrypt(r[NONCE_SIZE:], plaintext, ad)

    def open(self, blob: bytes | memoryview, ad: bytes) -> bytes:
        """Open a blob of either format under any key generation the volume may hold."""
        return self.open_aged(blob, ad)[0]

    def open_aged(self, blob: bytes | memoryview, ad: bytes) -> tuple[bytes, bool]:
        """Open as :meth:`open` does; also say whether the newest key opened it (a re-key
        re-seals only what it did not)."""
        try:
            return self._open(blob, ad), True
        except AuthError:
            if self._legacy is None and self._previous is None:
                raise
        if self._legacy is not None:
            try:
                return self._legacy.open(blob, ad), False
            except AuthError:
                if self._previous is None:
                    raise
        assert self._previous is not None
        return self._previous.open(blob, ad), False

    def open_legacy(self, blob: bytes | memoryview, ad: bytes) -> bytes:
        """Open a blob marked as format 1 (single key): refused unless a key generation of
        the volume was format 1."""
        if self._legacy is not None:
            try:
                return self._legacy.open(blob, ad)
            except AuthError:
                if self._previous is None:
                    raise
        if self._previous is None:
            raise AuthError("a format-1 object in a format-2 volume")
        return self._previous.open_legacy(blob, ad)

    def _open(self, blob: bytes | memoryview, ad: bytes) -> bytes:
        if len(blob) < SEAL_OVERHEAD:
            raise AuthError("sealed object too short")
        view = memoryview(blob)
        r = bytes(view[:MESSAGE_RANDOM_SIZE])
        try:
            return self._aead(r).decrypt(r[NONCE_SIZE:], view[MESSAGE_RANDOM_SIZE:], ad)
        except InvalidTag:
            raise AuthError("authentication failed") from None


# --- passphrase KDFs -------------------------------------------------------------------------


@dataclass(frozen=True)
class KdfParams:
    """Parameters of a passphrase KDF, stored in the clear next to the slot they protect."""

    name: str  # "argon2id" or "scrypt"
    salt: bytes
    memory_kib: int  # argon2id memory cost; for scrypt, n = memory_kib * 1024 // (128 * r)
    iterations: int  # argon2id passes; unused by scrypt
    lanes: int  # argon2id parallelism; scrypt p

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "salt": self.salt.hex(),
            "memory_kib": self.memory_kib,
            "iterations": self.iterations,
            "lanes": self.lanes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> KdfParams:
        try:
            costs = {k: d[k] for k in ("memory_kib", "iterations", "lanes")}
            if any(type(v) is not int for v in costs.values()):  # 1e400, "8", true: refused
                raise ValueError("costs must be integers")
            params = cls(name=str(d["name"]), salt=strict.hex_bytes(d["salt"]), **costs)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"malformed KDF parameters: {e}") from None
        params.validate()
        return params

    def validate(self) -> None:
        """Refuse parameters that are unknown, or so large that a hostile header could use
        them to exhaust memory, or so small they offer no protection."""
        if self.name not in ("argon2id", "scrypt"):
            raise UsageError(f"unknown passphrase KDF {self.name!r}")
        if not (8 <= self.memory_kib <= 4 * 1024 * 1024):
            raise UsageError("KDF memory cost out of range")
        if not (1 <= self.iterations <= 64 and 1 <= self.lanes <= 16):
            raise UsageError("KDF time or parallelism cost out of range")
        if len(self.salt) < 16:
            raise UsageError("KDF salt too short")

    @classmethod
    def default(
        cls, name: str = "argon2id", memory_kib: int = 65536, iterations: int = 3, lanes: int = 4
    ) -> KdfParams:
        params = cls(name, os.urandom(16), memory_kib, iterations, lanes)
        params.validate()
        return params


def derive_from_passphrase(passphrase: Secret, params: KdfParams) -> Secret:
    """Stretch a passphrase into a 32-byte key-encryption key."""
    params.validate()
    if params.name == "argon2id":
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        argon = Argon2id(
            salt=params.salt,
            length=KEY_SIZE,
            iterations=params.iterations,
            lanes=params.lanes,
            memory_cost=params.memory_kib,
        )
        return Secret(argon.derive(passphrase.reveal()))
    r = 8
    n = max(2, params.memory_kib * 1024 // (128 * r))
    n = 1 << (n.bit_length() - 1)  # scrypt needs a power of two
    scrypt = Scrypt(salt=params.salt, length=KEY_SIZE, n=n, r=r, p=params.lanes)
    return Secret(scrypt.derive(passphrase.reveal()))


# --- key wrapping ----------------------------------------------------------------------------


def wrap_key(kek: Secret, key: Secret, ad: bytes) -> bytes:
    """Encrypt ``key`` under ``kek``; ``ad`` binds the wrap to its slot and volume."""
    return Sealer(kek).seal(key.reveal(), ad)


def unwrap_key(kek: Secret, wrapped: bytes, ad: bytes) -> Secret:
    return Secret(Sealer(kek).open(wrapped, ad))


# --- sealing to a public key (KMS key release) -----------------------------------------------


class EphemeralKeyPair:
    """An X25519 key pair that lives only in memory for one key-release exchange."""

    __slots__ = ("_private",)

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()

    def __repr__(self) -> str:
        return "<EphemeralKeyPair X25519>"

    @property
    def public_bytes(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def open_sealed(self, enc: bytes, ciphertext: bytes, info: bytes) -> Secret:
        """Open what :func:`seal_to_public` sealed to this key pair's public key."""
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(enc))
        except ValueError:
            raise AuthError("invalid ephemeral public key") from None
        key = _hpke_key(shared, enc, self.public_bytes, info)
        return Secret(Sealer(key).open(ciphertext, info))


def seal_to_public(recipient_public: bytes, secret: Secret, info: bytes) -> tuple[bytes, bytes]:
    """Encrypt ``secret`` so only the holder of ``recipient_public``'s private key can read it.

    Returns ``(enc, ciphertext)`` where ``enc`` is the sender's ephemeral public key. ``info``
    binds the context (protocol version, app id, purpose, nonce) into both key and AD.
    """
    try:
        peer = X25519PublicKey.from_public_bytes(recipient_public)
    except ValueError:
        raise UsageError("recipient public key is not a valid X25519 key") from None
    eph = X25519PrivateKey.generate()
    enc = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = eph.exchange(peer)
    key = _hpke_key(shared, enc, recipient_public, info)
    return enc, Sealer(key).seal(secret.reveal(), info)


def _hpke_key(shared: bytes, enc: bytes, recipient_public: bytes, info: bytes) -> Secret:
    if shared == bytes(len(shared)):
        raise AuthError("degenerate X25519 shared secret")
    return hkdf(Secret(shared), "hpke", enc, recipient_public, info)


# --- the volume key hierarchy ----------------------------------------------------------------


class VolumeKeys:
    """Subkeys of one volume's master key, derived once per mount.

    ``master -> HKDF("header")``        authenticates the volume header;
    ``master -> HKDF("journal-base")``  seals commit records and checkpoints;
    ``master -> HKDF("object") -> HKDF("inode-base", ino)`` seals an inode's metadata and
    data blocks. Both sealers derive a fresh key per message (:class:`ObjectSealer`);
    ``master -> HKDF("migrate-manifest")`` authenticates the manifest of a migration bundle;
    ``master -> HKDF("rekey-previous")`` wraps the master key a re-key replaces.

    ``legacy`` (a format-1 volume) adds the single keys format 1 sealed with directly,
    ``HKDF("journal")`` and ``HKDF("object") -> HKDF("inode", ino)``, to open older objects.
    ``previous`` (a re-key in progress) is the replaced master's keys: objects not re-sealed
    yet open under them; nothing is sealed under them.
    """

    def __init__(
        self,
        master: Secret,
        volume_id: bytes,
        legacy: bool = False,
        cache_size: int = 4096,
        previous: VolumeKeys | None = None,
    ) -> None:
        self.volume_id = volume_id
        self.previous = previous
        self._header_key = hkdf(master, "header", volume_id)
        self._manifest_key = hkdf(master, "migrate-manifest", volume_id)
        self._rekey_key = hkdf(master, "rekey-previous", volume_id)
        self.journal: ObjectSealer = ObjectSealer(
            hkdf(master, "journal-base", volume_id),
            Sealer(hkdf(master, "journal", volume_id)) if legacy else None,
            None if previous is None else previous.journal,
        )
        self._object_key = hkdf(master, "object", volume_id)
        self._legacy = legacy
        self._inode_sealers: OrderedDict[int, ObjectSealer] = OrderedDict()
        self._inode_lock = threading.Lock()
        self._cache_size = cache_size

    def __repr__(self) -> str:
        return f"<VolumeKeys volume={self.volume_id.hex()}>"

    def header_mac(self, body: bytes) -> bytes:
        return mac(self._header_key, "header-mac", body)

    def manifest_mac(self, body: bytes) -> bytes:
        """The MAC of a migration bundle's manifest or pre-copy ledger (docs/format.md,
        "Migration bundle"), over the body's SHA-256: a label part holds at most 64 KiB, and a
        manifest lists every object of the volume."""
        return mac(self._manifest_key, "manifest-mac", hashlib.sha256(body).digest())

    def wrap_previous(self, previous: Secret) -> bytes:
        """The master key a re-key replaces, wrapped under this (the new) master key for the
        header's ``rekey`` field (docs/format.md)."""
        return wrap_key(self._rekey_key, previous, label("rekey-previous", self.volume_id))

    def unwrap_previous(self, wrapped: bytes) -> Secret:
        """The replaced master key from the header's ``rekey`` field (AuthError if the field
        is not one this master key wrapped)."""
        return unwrap_key(self._rekey_key, wrapped, label("rekey-previous", self.volume_id))

    def retire_previous(self) -> None:
        """Stop opening anything under the replaced master key: the metadata shows that the
        re-key finished, whatever a (replayed) header says (docs/format.md, "Re-key")."""
        if self.previous is None:
            return
        self.previous = None
        self.journal = self.journal.newest_only()
        with self._inode_lock:
            self._inode_sealers.clear()

    def inode(self, ino: int) -> ObjectSealer:
        """The sealer for everything stored about inode ``ino``, from a cache of the
        ``cache_size`` most recently used. Called from the trio thread and from worker threads
        (the data path opens blocks in workers, the checker walks in a thread pool), so the
        cache is locked; the keys are derived outside the lock (a race derives one twice)."""
        with self._inode_lock:
            sealer = self._inode_sealers.get(ino)
            if sealer is not None:
                self._inode_sealers.move_to_end(ino)
                return sealer
        sealer = ObjectSealer(
            hkdf(self._object_key, "inode-base", ino),
            Sealer(hkdf(self._object_key, "inode", ino)) if self._legacy else None,
            self.previous.inode(ino) if self.previous is not None else None,
        )
        with self._inode_lock:
            self._inode_sealers[ino] = sealer
            self._inode_sealers.move_to_end(ino)
            if len(self._inode_sealers) > self._cache_size:
                self._inode_sealers.popitem(last=False)
        return sealer


# --- signatures (KMS response signing, simulated quotes) -------------------------------------
# Added for the KMS: Ed25519 only. The KMS identity key is derived from the KMS root key, so
# every replica sharing the root signs with the same key and clients can pin one public key.


class SigningKey:
    """An Ed25519 private key held in memory; its repr never shows key material."""

    __slots__ = ("_private",)

    def __init__(self, seed: Secret) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if len(seed) != KEY_SIZE:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._private = Ed25519PrivateKey.from_private_bytes(seed.reveal())

    def __repr__(self) -> str:
        return "<SigningKey Ed25519>"

    @property
    def public_bytes(self) -> bytes:
        """The 32-byte raw public key."""
        return self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature over ``message``."""
        return self._private.sign(message)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True only if ``signature`` is a valid Ed25519 signature of ``message`` by
    ``public_key``; malformed keys or signatures are simply invalid, never an exception."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
