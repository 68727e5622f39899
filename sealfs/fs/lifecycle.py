"""Creating and opening volumes: the steps around the header, the store and the metadata.

Creation writes the root inode's record and the first checkpoint, so it stands with the
filesystem core, above ``sealfs.volume`` (header, key slots, anchor), which knows no inodes."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from sealfs.crypto import KdfParams, Secret
from sealfs.errors import UsageError
from sealfs.fs.metalog import MetaLog
from sealfs.sealed.codec import new_object_id
from sealfs.sealed.inode import ROOT_INO, Inode
from sealfs.sealed.objects import SealedObjects
from sealfs.store import CHECKPOINT_NAME, HEADER_NAME, LOCK_NAME, OBJECTS_DIR, ObjectStore
from sealfs.volume.header import Credential, Header, load_header, new_header

DEFAULT_BLOCK_SIZE = 128 * 1024
#: What an interrupted ``create`` leaves (besides journals); the store replaces each of them
#: without following or reusing what is there.
_CREATE_LEFTOVERS = (
    OBJECTS_DIR,
    LOCK_NAME,
    CHECKPOINT_NAME,
    f".{CHECKPOINT_NAME}.tmp",
    f".{HEADER_NAME}.tmp",
)


def create_volume(
    backing: Path,
    creds: list[tuple[Credential, KdfParams | None]],
    block_size: int = DEFAULT_BLOCK_SIZE,
    compression: str = "none",
    uid: int | None = None,
    gid: int | None = None,
    step: Callable[[str], None] = lambda name: None,
) -> Header:
    """Initialise an empty backing directory as a new volume.

    The header is written last: until it exists the directory is not a volume, so a crash
    during creation leaves something ``create`` can simply be run on again. ``step`` is told
    each durable step before the header (``root-written``, ``checkpoint-written``): CVM init
    names its crash points after them.
    """
    backing = Path(backing)
    if not creds:
        raise UsageError("a volume needs at least one key slot (--key-file or --passphrase)")
    if backing.exists() and not backing.is_dir():
        raise UsageError(f"{backing} exists and is not a directory")
    store = ObjectStore(backing)
    if backing.is_dir():
        if store.exists(HEADER_NAME):
            raise UsageError(f"{backing} already holds a sealfs volume")
        leftovers = [
            name
            for name in store.names()
            if name not in _CREATE_LEFTOVERS and not name.startswith("journal.")
        ]
        if leftovers:
            raise UsageError(
                f"{backing} is not empty (found {leftovers[0]!r}); use an empty directory"
            )
    header, master = new_header(block_size, compression)
    for cred, kdf in creds:  # first: a credential that fails (a KMS refusal) leaves no trace
        header.add_slot(master, cred, kdf)
    backing.mkdir(parents=True, exist_ok=True)
    store.lock()
    try:
        for name in store.names():  # an interrupted earlier create
            if name.startswith("journal."):
                store.remove_file(name)
        objects = volume_objects(header, master)
        now = time.time_ns()
        root = Inode(
            ROOT_INO,
            stat.S_IFDIR | 0o755,
            os.getuid() if uid is None else uid,
            os.getgid() if gid is None else gid,
            2,
            0,
            now,
            now,
            now,
            0,
            ROOT_INO,
        )
        oid = new_object_id()
        store.put(oid, objects.seal_record(ROOT_INO, oid, root.to_record()))
        store.sync()
        step("root-written")
        MetaLog.initialize(store, objects, {ROOT_INO: oid}, ROOT_INO + 1)
        step("checkpoint-written")
        store.replace_file(HEADER_NAME, header.to_bytes())
    finally:
        store.unlock()
        store.close()
    return header


def volume_objects(header: Header, master: Secret) -> SealedObjects:
    """The sealed objects of the volume ``header`` describes, under its unlocked master."""
    return SealedObjects(
        header.volume_keys(master),
        header.block_size,
        header.compression == "lz4",
        header.rekey_checkpoint,
    )


def unlock_volume(backing: Path, cred: Credential) -> tuple[ObjectStore, Header, Secret]:
    header = load_header(backing)
    master = header.unlock(cred)
    return ObjectStore(Path(backing)), header, master
