"""The filesystem core in-process (no kernel): a volume opened with the library itself.

Tests here are trio tests (pytest-trio, ``trio_mode``): ``async def test_...`` runs in a trio
run of its own, and the ``fs`` fixture (conftest.py) hands it a loaded core.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sealfs.crypto import Secret
from sealfs.fs.core import Filesystem
from sealfs.fs.lifecycle import create_volume, unlock_volume
from sealfs.fs.limits import Limits
from sealfs.volume.header import KeyFileCredential

CRED = KeyFileCredential(Secret(os.urandom(64)))


def open_fs(backing: Path, commit_interval: float = 3600, **limits: int) -> Filesystem:
    """The volume in ``backing`` (created on first use), with periodic commits off unless
    ``commit_interval`` is given, and any other Limits overridden."""
    if not backing.exists():
        create_volume(backing, [(CRED, None)])
    store, header, master = unlock_volume(backing, CRED)
    return Filesystem(store, header, master, Limits(commit_interval=commit_interval, **limits))


@asynccontextmanager
async def loaded(backing: Path, writable: bool = True, **limits: int) -> AsyncIterator[Filesystem]:
    """The core over ``backing`` (see :func:`open_fs`), loaded; closed when the block ends,
    as a clean unmount would."""
    fs = open_fs(backing, **limits)
    await fs.load(writable=writable)
    try:
        yield fs
    finally:
        await fs.close()


def object_files(fs: Filesystem) -> set[int]:
    """Ids of the objects that exist as files in the backing directory."""
    return set(fs.store.list_objects())
