"""The committed state a bundle carries: the replayed metadata and the objects it refers to."""

from __future__ import annotations

from sealfs.crypto import Secret
from sealfs.fs.lifecycle import volume_objects
from sealfs.fs.metalog import MetaLog, MetaState
from sealfs.sealed.codec import RECORD_OBJECT_MAX
from sealfs.store import CHECKPOINT_NAME, HEADER_NAME, ObjectStore, journal_name
from sealfs.volume.header import Header


def object_name(oid: int) -> str:
    """An object's path relative to the backing directory (as in the manifest)."""
    name = f"{oid:016x}"
    return f"objects/{name[:2]}/{name}"


def metadata_names(state: MetaState) -> list[str]:
    """The files besides objects that hold the volume: header, checkpoint, current journal."""
    return [HEADER_NAME, CHECKPOINT_NAME, journal_name(state.gen)]


def committed_state(
    store: ObjectStore, header: Header, master: Secret
) -> tuple[MetaState, set[int]]:
    """Replay checkpoint + journal (as a mount does) and return the state with the ids of the
    object files it refers to: every inode record and block, except those carried inside the
    journal. Raises IntegrityError if the metadata or a record does not verify."""
    objects = volume_objects(header, master)
    state = MetaLog(store, objects).load()
    referenced: set[int] = set()
    for ino, oid in state.table.items():
        referenced.add(oid)
        node = objects.open_record(ino, oid, store.get(oid, RECORD_OBJECT_MAX))
        referenced.update(node.blocks.values())
    return state, referenced - set(store.carried)
