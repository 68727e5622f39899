"""Re-keying a volume: every object sealed again under a new random master key.

Re-wrapping a slot (``sealfs key``) leaves the master key as it was, so an old copy of the
header and a credential it held still open everything. A re-key revokes them: it replaces the
master key, re-seals every object, record, the checkpoint and the journal under the new one and
wraps the new key in every slot it keeps. Offline only (it holds the volume lock, as a mount
does). The phases, each safe to interrupt (docs/format.md, "Re-key"):

1. A new header whose slots wrap the new master key and whose ``rekey`` field holds the
   previous one wrapped under it; from then on every reader opens an object under the new key
   first and the previous one second, and every writer seals under the new key.
2. A checkpoint under the new key (carried objects written out as files, a new journal).
3. Every object file: a referenced one the new key does not open yet is opened under the
   previous key, sealed under the new one with the same id, staged beside it, made durable
   (one ``syncfs`` per batch) and renamed over it; an orphan is deleted.
4. A checkpoint without the re-key mark (from which on no reader accepts the previous key,
   even from a replayed header that still has the ``rekey`` field), one commit under the new
   key (anchored at the KMS when unlocked through it, so a copy of the disk from before the
   re-key or from its middle counts as rolled back), then the final header without the
   ``rekey`` field: the previous key is gone.

Run again after an interruption, it finds the ``rekey`` field and continues with phase 2
(objects the new key already opens are skipped).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealfs import failpoints
from sealfs.crypto import AuthError, Secret
from sealfs.errors import BusyError, IntegrityError, UsageError
from sealfs.fs.lifecycle import volume_objects
from sealfs.fs.metalog import MetaLog
from sealfs.meter import Meter
from sealfs.sealed.codec import (
    CHECKPOINT_MAX,
    RECORD_OBJECT_MAX,
    CodecError,
    Commit,
    block_object_max,
)
from sealfs.sealed.inode import Inode, RecordError
from sealfs.sealed.objects import SealedObjects
from sealfs.store import CHECKPOINT_NAME, DamagedFile, MissingObject, ObjectStore
from sealfs.volume.anchor import KmsAnchor, verify_fresh
from sealfs.volume.header import Credential, Header, KmsCredential, Slot, load_header
from sealfs.volume.slots import change_slots

log = logging.getLogger("sealfs.rekey")

#: Objects staged before one ``syncfs`` makes them durable and they are renamed into place.
BATCH_OBJECTS = 256
#: The phase boundaries a test can crash the re-key at (``SEALFS_FAILPOINT=rekey:<point>``,
#: :mod:`sealfs.failpoints`).
CRASH_POINTS = (
    "header-begun",
    "checkpoint-written",
    "objects-resealed",
    "final-checkpoint-written",
    "committed",
)


@dataclass
class RekeyResult:
    """What a re-key did (the ``--json`` summary)."""

    resumed: bool = False
    resealed: int = 0  # objects sealed again under the new key by this run
    resealed_bytes: int = 0
    current: int = 0  # objects the new key already opened (an earlier, interrupted run)
    orphans_removed: int = 0
    seconds: float = 0.0
    anchor: tuple[int, bytes] | None = None  # the commit anchored at the KMS, if one was
    slots: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)


def plan_slots(
    header: Header, creds: list[Credential], drop_others: bool
) -> tuple[list[tuple[Slot, Credential]], list[Slot]]:
    """Which slot each credential opens (kept, re-wrapped) and which no credential opens
    (dropped: only with ``drop_others``, else refused naming them)."""
    kept: dict[int, tuple[Slot, Credential]] = {}
    for cred in creds:
        opened = header.slots_opened_by(cred)
        if not opened:  # the unlocking credential opened one: this is a --keep-* one
            kind = cred.slot_type.replace("keyfile", "key file")
            raise UsageError(f"a {kind} given to keep opens no slot of this volume")
        for slot in opened:
            kept.setdefault(slot.id, (slot, cred))
    dropped = [s for s in header.slots if s.id not in kept]
    if dropped and not drop_others:
        names = ", ".join(_slot_name(s) for s in dropped)
        raise UsageError(
            f"the re-key must wrap the new master key in every slot, and no credential given "
            f"opens {names}: give its secret (--keep-key-file, --keep-passphrase-file; a kms "
            f"slot: unlock with --kms) or drop it with --drop-other-slots"
        )
    return [kept[s.id] for s in header.slots if s.id in kept], dropped


def _slot_name(slot: Slot) -> str:
    return f"slot {slot.id} ({slot.type})"


def rekey_volume(
    backing: Path,
    cred: Credential,
    keep: list[Credential],
    drop_others: bool,
    progress: Meter,
    threads: int | None = None,
    batch: int = BATCH_OBJECTS,
) -> RekeyResult:
    """Re-key the volume in ``backing`` (unmounted), or finish an interrupted re-key.
    ``batch``: objects staged per ``syncfs`` (tests use 1 to interrupt between objects)."""
    t0 = time.monotonic()
    result = RekeyResult()
    store = ObjectStore(Path(backing))
    try:
        store.lock()
    except BusyError:
        raise BusyError(
            f"volume {backing} is mounted or in use by another sealfs process: sealfs rekey "
            "works on an unmounted volume only (unmount it first)"
        ) from None
    try:
        anchor = _fresh_anchor(store, cred)  # before anything is written
        header, master = _begin(store, cred, keep, drop_others, result)
        failpoints.reached("rekey:header-begun")
        objects = volume_objects(header, master)
        metalog = MetaLog(store, objects)
        try:
            progress.note("writing a checkpoint under the new key")
            state = metalog.load()
            metalog.anchorable = anchor is not None or header.kms_slot() is not None
            metalog.open_for_append(state)
            metalog.write_checkpoint(state.table, state.next_ino)
            failpoints.reached("rekey:checkpoint-written")
            _reseal_objects(store, objects, state.table, result, progress, threads, batch)
            failpoints.reached("rekey:objects-resealed")
            # From this checkpoint on (sealed without the re-key mark) no reader accepts the
            # previous key, whatever header it is handed; the commit after it, anchored, makes
            # the metadata from before it count as rolled back.
            objects.keys.retire_previous()
            metalog.write_checkpoint(state.table, state.next_ino)
            failpoints.reached("rekey:final-checkpoint-written")
            metalog.append(Commit(metalog.seq + 1, state.next_ino))
            if anchor is not None:
                anchor.advance(*metalog.root)
                metalog.anchored(metalog.seq)
                result.anchor = metalog.root
            elif header.kms_slot() is not None:
                log.warning(
                    "the KMS anchor was not advanced (unlocked without the KMS): a mount "
                    "with --kms advances it"
                )
        finally:
            metalog.close()
        failpoints.reached("rekey:committed")
        _finish(Path(backing), cred, master)
    finally:
        store.unlock()
        store.close()
    result.seconds = time.monotonic() - t0
    return result


def _begin(
    store: ObjectStore,
    cred: Credential,
    keep: list[Credential],
    drop_others: bool,
    result: RekeyResult,
) -> tuple[Header, Secret]:
    """Phase 1 (or, when a re-key is in progress, nothing): the header that wraps a new
    master key in the slots kept and the previous one in its ``rekey`` field."""
    unlocked: dict[str, Any] = {}

    def begin(header: Header, master: Secret) -> Header:
        unlocked["master"] = master
        if header.rekey_in_progress:
            result.resumed = True
            return header
        kept, dropped = plan_slots(header, [cred, *keep], drop_others)
        new_master = Secret.generate()
        slots = [header.rewrapped_slot(new_master, slot, c) for slot, c in kept]
        began = hashlib.sha256(store.read_file(CHECKPOINT_NAME, CHECKPOINT_MAX)).digest()
        header.begin_rekey(master, new_master, slots, began)
        unlocked["master"] = new_master
        result.dropped = [s.public_info() for s in dropped]
        return header

    header = change_slots(store.root, cred, begin)
    if result.resumed:
        log.info("continuing the re-key in progress (the slots were re-wrapped when it began)")
    result.slots = [s.public_info() for s in header.slots]
    master: Secret = unlocked["master"]
    return header, master


def _fresh_anchor(store: ObjectStore, cred: Credential) -> KmsAnchor | None:
    """Unlocked through the KMS: the volume's anchor, once the disk was verified against it
    (a re-key must not adopt a rolled-back disk, and its final commit advances the anchor)."""
    if not isinstance(cred, KmsCredential):
        return None
    header = load_header(store.root)
    state = MetaLog(store, volume_objects(header, header.unlock(cred))).load()
    anchor = KmsAnchor(cred.client, header.volume_id)
    verify_fresh(state.seq, state.heads, anchor.fetch())
    return anchor


def _finish(backing: Path, cred: Credential, master: Secret) -> None:
    """Phase 4's last step: the header without the previous key."""

    def finish(header: Header, unlocked: Secret) -> None:
        if not header.rekey_in_progress or unlocked != master:
            raise BusyError("the volume header changed during the re-key; run it again")
        header.end_rekey(master)

    change_slots(backing, cred, finish)


@dataclass
class _Job:
    oid: int
    ino: int
    index: int  # -1: the inode's record


def _reseal_objects(
    store: ObjectStore,
    objects: SealedObjects,
    table: dict[int, int],
    result: RekeyResult,
    progress: Meter,
    threads: int | None,
    batch: int,
) -> None:
    """Phase 3: every referenced object under the new key, orphans deleted."""
    store.remove_staged()
    present = set(store.list_objects())
    records = [_Job(oid, ino, -1) for ino, oid in table.items()]
    blocks: list[_Job] = []
    sizes: dict[int, int] = {}
    with ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1)) as pool:
        progress.note(f"re-keying {len(records)} inode records")
        for jobs in _batches(records, batch):
            nodes = list(pool.map(lambda job: _reseal_record(store, objects, job), jobs))
            _commit_batch(store, jobs, nodes, result, progress)
            for node, _, _ in nodes:
                sizes[node.ino] = node.size
                blocks += [_Job(oid, node.ino, index) for index, oid in node.blocks.items()]
        missing = [job for job in blocks if job.oid not in present]
        if missing:
            raise IntegrityError(
                f"block {missing[0].index} of inode {missing[0].ino} (object "
                f"{missing[0].oid:016x}) is missing: the volume is damaged; run `sealfs check "
                "--repair`, then sealfs rekey again"
            )
        total = sum(
            min(objects.block_size, node_size - job.index * objects.block_size)
            for job, node_size in ((j, sizes[j.ino]) for j in blocks)
        )
        progress.start("re-keying data", total, len(blocks))
        for jobs in _batches(blocks, batch):
            sealed = list(pool.map(lambda job: _reseal_block(store, objects, job), jobs))
            _commit_batch(store, jobs, sealed, result, progress)
        progress.finish()
    referenced = {job.oid for job in records} | {job.oid for job in blocks}
    for oid in present - referenced:
        store.delete(oid)
        result.orphans_removed += 1
    store.sync()


def _batches(jobs: list[_Job], size: int) -> Iterator[list[_Job]]:
    for i in range(0, len(jobs), size):
        yield jobs[i : i + size]


def _commit_batch(
    store: ObjectStore,
    batch: list[_Job],
    outcome: list[tuple[Any, int, bool]],
    result: RekeyResult,
    progress: Meter,
) -> None:
    """The staged objects of one batch made durable, then renamed into place: a crash leaves
    each object whole, under one key or the other."""
    store.sync(only_if_written=True)
    for job, (_, size, staged) in zip(batch, outcome, strict=True):
        if staged:
            store.commit_staged(job.oid)
            result.resealed += 1
            result.resealed_bytes += size
        else:
            result.current += 1
        progress.advance(size, 1)


def _damaged(job: _Job, e: Exception) -> IntegrityError:
    what = "the record" if job.index < 0 else f"block {job.index}"
    return IntegrityError(
        f"{what} of inode {job.ino} (object {job.oid:016x}) cannot be read ({e}): the volume "
        "is damaged; run `sealfs check --repair`, then sealfs rekey again"
    )


def _reseal_record(
    store: ObjectStore, objects: SealedObjects, job: _Job
) -> tuple[Inode, int, bool]:
    """Stage the record under the new key unless that opens it already; return the inode, the
    object's size and whether it was staged."""
    try:
        blob = store.get(job.oid, RECORD_OBJECT_MAX)
        node, sealed = objects.reseal_record(job.ino, job.oid, blob)
    except (AuthError, RecordError, CodecError, MissingObject, DamagedFile) as e:
        raise _damaged(job, e) from None
    if sealed is not None:
        store.stage_object(job.oid, sealed)
    return node, len(blob), sealed is not None


def _reseal_block(store: ObjectStore, objects: SealedObjects, job: _Job) -> tuple[None, int, bool]:
    try:
        blob = store.get(job.oid, block_object_max(objects.block_size))
        sealed = objects.reseal_block(job.ino, job.index, job.oid, blob)
    except (AuthError, CodecError, MissingObject, DamagedFile) as e:
        raise _damaged(job, e) from None
    if sealed is not None:
        store.stage_object(job.oid, sealed)
    return None, len(blob), sealed is not None
