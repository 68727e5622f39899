"""Where a LUKS passphrase comes from.

A key source has two calls: ``new_key(binding) -> LuksKey`` (the key a volume gets when it is
formatted, with the KMS key version it came from) and ``existing_key(binding, key_version) ->
Secret`` (the key of a formatted volume whose *validated* header records ``key_version``). The
binding names the purpose, the app id and the volume id; the KMS derives a different key for
every binding and version (HKDF of its root key under a label holding all of them).

* :class:`KmsKeySource`: the key comes from the KMS (``get_key("luks-passphrase", volume_id,
  key_version)``) after this CVM proved itself with a quote. The passphrase is the lowercase
  hex of the 32-byte key (64 ASCII characters, like the reference platform's).
* :class:`KeyFileSource`: the passphrase is a private file's bytes, verbatim; the binding and
  the recorded version are ignored (a file holds one key).

The app id and volume id are trusted configuration (command line, the CVM's measured volume
list), never read from the disk; only the key version is, and it can only select which version
of this very volume's key the KMS derives (see docs/luks.md, "Keys"). Passphrases are held as
:class:`sealfs.crypto.Secret`, which never shows its bytes in ``repr``/``str``; they leave this
process only on cryptsetup's stdin or through an anonymous pipe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sealfs import strict
from sealfs.crypto import Secret
from sealfs.errors import LuksError, UsageError

if TYPE_CHECKING:
    from sealfs.kms.client import KmsClient

#: A passphrase longer than this is refused: KMS keys are 32 bytes, recovery passphrases are
#: typed by people, and cryptsetup itself caps key files.
MAX_PASSPHRASE = 4096
PURPOSE_LUKS = "luks-passphrase"
#: The KMS takes volume ids of 1-64 bytes (sealfs.kms.protocol.MAX_ID_BYTES).
MAX_KMS_VOLUME_ID = 64
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class KeyBinding:
    """What a LUKS key is for; a KMS derives a different key for every distinct binding."""

    app_id: str
    volume_id: str
    #: The KMS purpose name for LUKS passphrases (sealfs.kms.protocol.PURPOSE_LUKS_PASSPHRASE).
    purpose: str = PURPOSE_LUKS

    def __post_init__(self) -> None:
        for name in ("app_id", "volume_id", "purpose"):
            if not _ID.fullmatch(getattr(self, name)):
                raise UsageError(
                    f"{name.replace('_', ' ')} must be 1-128 characters of A-Z a-z 0-9 . _ : -"
                )


@dataclass(frozen=True)
class LuksKey:
    """A passphrase for key slot 0 and the KMS key version it is (None: not from the KMS)."""

    passphrase: Secret
    key_version: int | None = None


class KeySource(Protocol):
    """A source of LUKS passphrases: a key file or the KMS."""

    def new_key(self, binding: KeyBinding) -> LuksKey:
        """The key a volume gets when it is formatted now."""
        ...

    def existing_key(self, binding: KeyBinding, key_version: int | None) -> Secret:
        """The key of a volume whose validated header records ``key_version``."""
        ...


@dataclass(frozen=True)
class KeyFileSource:
    """Reads the passphrase verbatim (every byte, newlines included) from a private file.

    The binding and the recorded key version are accepted and ignored, since a file holds one
    key (it may hold a KMS passphrase fetched elsewhere, so KMS-formatted volumes open too).
    """

    path: str

    def luks_passphrase(self, binding: KeyBinding) -> Secret:
        return read_key_file(self.path)

    def new_key(self, binding: KeyBinding) -> LuksKey:
        return LuksKey(read_key_file(self.path))

    def existing_key(self, binding: KeyBinding, key_version: int | None) -> Secret:
        return read_key_file(self.path)


class KmsKeySource:
    """Passphrases from the KMS, for the app id the client attests as.

    Keys fetched are kept for this object's lifetime (one command), so that formatting and
    then opening a volume on first boot asks the KMS once.
    """

    def __init__(self, client: KmsClient) -> None:
        self.client = client
        self._keys: dict[tuple[str, str, int], Secret] = {}

    def __repr__(self) -> str:
        return f"<KmsKeySource {self.client!r}>"

    def binding(self, volume_id: str) -> KeyBinding:
        """The binding of ``volume_id`` for the app id this client requests keys for."""
        return KeyBinding(app_id=self.client.app_id.hex(), volume_id=volume_id)

    def new_key(self, binding: KeyBinding) -> LuksKey:
        return self._fetch(binding, None)

    def existing_key(self, binding: KeyBinding, key_version: int | None) -> Secret:
        if key_version is None:
            raise LuksError(
                "the LUKS header records no KMS key version (sealfs records one in the "
                "subsystem field when it formats from the KMS): this volume was formatted "
                "with a key file, or the field was removed"
            )
        return self._fetch(binding, key_version).passphrase

    def _fetch(self, binding: KeyBinding, key_version: int | None) -> LuksKey:
        from sealfs.kms.protocol import PURPOSE_LUKS_PASSPHRASE

        if binding.purpose != PURPOSE_LUKS_PASSPHRASE:
            raise UsageError(f"key purpose {binding.purpose!r} is not a LUKS passphrase")
        if binding.app_id.lower() != self.client.app_id.hex():
            raise UsageError(
                f"key binding is for app {binding.app_id}, the KMS client for "
                f"app {self.client.app_id.hex()}"
            )
        volume = binding.volume_id.encode("ascii")
        if len(volume) > MAX_KMS_VOLUME_ID:
            raise UsageError(
                f"volume id must be at most {MAX_KMS_VOLUME_ID} characters for the KMS"
            )
        if key_version is not None:
            cached = self._keys.get((binding.app_id.lower(), binding.volume_id, key_version))
            if cached is not None:
                return LuksKey(cached, key_version)
        key, version = self.client.get_key(binding.purpose, volume, key_version)
        passphrase = Secret(key.reveal().hex().encode("ascii"))
        self._keys[(binding.app_id.lower(), binding.volume_id, version)] = passphrase
        return LuksKey(passphrase, version)


def read_key_file(path: str) -> Secret:
    """Load a key file, refusing files that other users could read or replace."""
    return Secret(strict.read_secret_file(path, "key file", MAX_PASSPHRASE))
