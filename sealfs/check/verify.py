"""Full mode: read every data object once and verify its tag and its identity binding.

Opening a block under ``block_ad(volume, inode, index, object id)`` proves in one step that it
is authentic, belongs to this file at this position, and is the current version (the block
map, itself authenticated, names the object id). The work is split into chunks of a few MiB
handed to worker *processes* forked from the checker: AES-GCM in ``cryptography`` holds the
GIL (measured: two threads decrypt no faster than one), so threads would cap the check at one
core. Forked workers inherit the derived keys in memory; nothing secret is pickled or passed
on a command line. Only failures and byte counts come back.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass

from sealfs.crypto import AuthError
from sealfs.errors import StorageError
from sealfs.sealed.codec import CodecError, block_object_max
from sealfs.sealed.objects import SealedObjects
from sealfs.store import DamagedFile, MissingObject, ObjectStore

#: (inode, block index, object id, expected plaintext length at that position)
Job = tuple[int, int, int, int]

CHUNK_BYTES = 8 << 20
CHUNK_OBJECTS = 256
INLINE_BYTES = 16 << 20  # below this, forking workers costs more than it saves


@dataclass
class BlockFailure:
    ino: int
    index: int
    oid: int
    expected: int
    reason: str  # "missing", "damaged" (not a plausible file), "auth", "decode", "io"
    size: int | None
    codec: int | None
    message: str


# Set in the parent just before the pool forks; workers read it. Never pickled.
_CONTEXT: tuple[ObjectStore, SealedObjects] | None = None


def _verify_chunk(jobs: list[Job]) -> tuple[int, int, list[BlockFailure]]:
    """(Worker.) Verify one chunk; return (bytes read, objects, failures)."""
    assert _CONTEXT is not None
    store, objects = _CONTEXT
    limit = block_object_max(objects.block_size)
    nbytes = 0
    failures = []
    for ino, idx, oid, expected in jobs:
        try:
            blob = store.get(oid, limit)
        except MissingObject:
            failures.append(
                BlockFailure(
                    ino, idx, oid, expected, "missing", None, None, "the block object is missing"
                )
            )
            continue
        except DamagedFile as e:
            failures.append(BlockFailure(ino, idx, oid, expected, "damaged", None, None, str(e)))
            continue
        except StorageError as e:
            failures.append(BlockFailure(ino, idx, oid, expected, "io", None, None, str(e)))
            continue
        nbytes += len(blob)
        try:
            objects.open_block(ino, idx, oid, blob)
        except AuthError as e:
            failures.append(
                BlockFailure(
                    ino, idx, oid, expected, "auth", len(blob), blob[0] if blob else None, str(e)
                )
            )
        except CodecError as e:
            failures.append(
                BlockFailure(ino, idx, oid, expected, "decode", len(blob), blob[0], str(e))
            )
    return nbytes, len(jobs), failures


def chunks(jobs: list[Job], block_size: int) -> Iterator[list[Job]]:
    cur: list[Job] = []
    size = 0
    for job in jobs:
        cur.append(job)
        size += job[3] or block_size
        if size >= CHUNK_BYTES or len(cur) >= CHUNK_OBJECTS:
            yield cur
            cur, size = [], 0
    if cur:
        yield cur


def verify_blocks(
    store: ObjectStore,
    objects: SealedObjects,
    jobs: list[Job],
    workers: int | None,
    on_progress: Callable[[int, int], None],
) -> list[BlockFailure]:
    """Verify all ``jobs``; calls ``on_progress(bytes, objects)`` as chunks complete."""
    global _CONTEXT
    jobs = sorted(jobs, key=lambda j: j[2])  # object id order = backing directory order
    estimate = sum(j[3] for j in jobs)
    workers = workers or os.cpu_count() or 1
    _CONTEXT = (store, objects)
    block_size = objects.block_size
    failures: list[BlockFailure] = []
    try:
        if workers <= 1 or estimate < INLINE_BYTES:
            for chunk in chunks(jobs, block_size):
                nbytes, nobj, fails = _verify_chunk(chunk)
                failures += fails
                on_progress(nbytes, nobj)
            return failures
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            _run_pool(ex, chunks(jobs, block_size), workers, failures, on_progress)
        return failures
    finally:
        _CONTEXT = None


def _run_pool(
    ex: Executor,
    work: Iterator[list[Job]],
    workers: int,
    failures: list[BlockFailure],
    on_progress: Callable[[int, int], None],
) -> None:
    """Keep a bounded number of chunks in flight (memory stays flat on huge volumes)."""
    pending: set[Future[tuple[int, int, list[BlockFailure]]]] = set()
    for chunk in work:
        pending.add(ex.submit(_verify_chunk, chunk))
        if len(pending) >= 4 * workers:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                nbytes, nobj, fails = f.result()
                failures += fails
                on_progress(nbytes, nobj)
    for f in pending:
        nbytes, nobj, fails = f.result()
        failures += fails
        on_progress(nbytes, nobj)
