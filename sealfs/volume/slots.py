"""Changing a volume's key slots in place: add, remove, re-wrap under a rotated KMS key.

Each change takes the header lock, unlocks the header read under it with a credential that
opens it, edits the slots, seals the header again under the same master key and writes it
with one atomic replace (temporary file, fsync, rename, fsync of the directory); concurrent
changes wait for each other instead of losing one. No object is touched, so it is safe while the
volume is mounted, and a crash leaves either the old or the new header, both of which open.

Re-wrapping does not revoke: a copy of the old header and an old credential still yield the
same master key, which still opens every object. Revoking needs a re-key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sealfs.crypto import Secret
from sealfs.volume.header import Credential, Header, header_change

T = TypeVar("T")


def change_slots(backing: Path, cred: Credential, change: Callable[[Header, Secret], T]) -> T:
    """Under the header lock: unlock ``backing``'s header with ``cred``, apply ``change``
    (which seals it again) and replace the header atomically; return what ``change``
    returned."""
    with header_change(backing) as hc:
        result = change(hc.header, hc.header.unlock(cred))
        hc.replace(hc.header)
    return result
