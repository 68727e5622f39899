"""Where a LUKS passphrase comes from.

A key source is anything with ``luks_passphrase(binding) -> Secret``. The binding names the
purpose, the app id and the volume id, so that a KMS source (the KMS derives the key from its
root key under exactly that label) and the key-file source are interchangeable. Passphrases
are held as :class:`sealfs.crypto.Secret`, which never shows its bytes in ``repr``/``str``;
they leave this process only on cryptsetup's stdin or through an anonymous pipe.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Protocol

from sealfs.crypto import Secret
from sealfs.errors import StorageError, UsageError

#: A passphrase longer than this is refused: KMS keys are 32 bytes, recovery passphrases are
#: typed by people, and cryptsetup itself caps key files.
MAX_PASSPHRASE = 4096
PURPOSE_LUKS = "luks-passphrase"
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


class KeySource(Protocol):
    """A source of LUKS passphrases (key file now, the KMS later)."""

    def luks_passphrase(self, binding: KeyBinding) -> Secret: ...


@dataclass(frozen=True)
class KeyFileSource:
    """Reads the passphrase verbatim (every byte, newlines included) from a private file.

    Stand-in for the KMS: the binding is accepted and ignored, since a file holds one key.
    """

    path: str

    def luks_passphrase(self, binding: KeyBinding) -> Secret:
        return read_key_file(self.path)


def read_key_file(path: str) -> Secret:
    """Load a key file, refusing files that other users could read or replace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise UsageError(f"key file {path}: not found") from None
    except OSError as e:
        raise StorageError(f"key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"key file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(
                f"key file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others "
                "access it; chmod 600 it"
            )
        if st.st_uid not in (0, os.geteuid()):
            raise UsageError(f"key file {path}: owned by another user")
        if st.st_size == 0:
            raise UsageError(f"key file {path}: empty")
        if st.st_size > MAX_PASSPHRASE:
            raise UsageError(f"key file {path}: larger than {MAX_PASSPHRASE} bytes")
        buf = bytearray()
        while len(buf) <= MAX_PASSPHRASE:
            chunk = os.read(fd, MAX_PASSPHRASE + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
        if not buf or len(buf) > MAX_PASSPHRASE:
            raise UsageError(f"key file {path}: changed size while being read")
        secret = Secret(bytes(buf))
        buf[:] = bytes(len(buf))
        return secret
    finally:
        os.close(fd)
