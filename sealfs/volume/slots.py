"""Changing a volume's key slots in place: add, remove, re-wrap under a rotated KMS key.

Each change unlocks the header with a credential that opens it, edits the slots, seals the
header again under the same master key and writes it with one atomic replace (temporary
file, fsync, rename, fsync of the directory). No object is touched, so it is safe while the
volume is mounted, and a crash leaves either the old or the new header, both of which open.

Re-wrapping does not revoke: a copy of the old header and an old credential still yield the
same master key, which still opens every object. Revoking needs a re-key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sealfs.crypto import Secret
from sealfs.errors import BusyError
from sealfs.store import HEADER_NAME, ObjectStore
from sealfs.volume.header import Credential, Header, load_header

T = TypeVar("T")


def change_slots(backing: Path, cred: Credential, change: Callable[[Header, Secret], T]) -> T:
    """Unlock ``backing``'s header with ``cred``, apply ``change`` (which seals it again) and
    replace the header atomically; return what ``change`` returned."""
    header = load_header(backing)
    before = header.to_bytes()
    result = change(header, header.unlock(cred))
    store = ObjectStore(Path(backing))
    try:
        # Another slot change in between would be lost silently by the replace below.
        if load_header(backing).to_bytes() != before:
            raise BusyError("the volume header changed meanwhile; run the command again")
        store.replace_file(HEADER_NAME, header.to_bytes())
    finally:
        store.close()
    return result
