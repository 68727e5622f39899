"""Group commit: fsyncs that wait while a commit is in flight share the next commit (one
journal append, one fdatasync), and none returns before the journal on disk holds its data."""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from sealfs.fs.core import Filesystem
from sealfs.fs.metalog import MetaLog
from sealfs.sealed.codec import RECORD_OBJECT_MAX
from sealfs.sealed.inode import ROOT_INO, Inode
from sealfs.store import ObjectStore
from tests.core.harness import loaded

FILES = 8


def durable_content(fs: Filesystem, ino: int) -> bytes | None:
    """What the journal and checkpoint on disk hold for ``ino`` (read by a second reader of
    the backing directory, as a remount after a crash would), or None if it is not there."""
    store = ObjectStore(fs.store.root)
    try:
        state = MetaLog(store, fs.objects).load()
        oid = state.table.get(ino)
        if oid is None:
            return None
        blob = store.carried.get(oid) or store.get(oid, RECORD_OBJECT_MAX)
        node = fs.objects.open_record(ino, oid, blob)
        if node.inline is not None:
            return node.inline
        out = b""
        for idx in sorted(node.blocks):
            boid = node.blocks[idx]
            sealed = store.carried.get(boid) or store.get(boid, RECORD_OBJECT_MAX)
            out += fs.objects.open_block(ino, idx, boid, sealed)
        return out[: node.size]
    finally:
        store.close()


async def test_fsyncs_waiting_for_a_commit_share_one_fdatasync(tmp_path: Path) -> None:
    async with loaded(tmp_path / "b") as fs:
        nodes: list[Inode] = []
        data = [os.urandom(5000 + i) for i in range(FILES)]  # past the inline size: a block
        for i in range(FILES):
            node = await fs.create(ROOT_INO, b"f%d" % i, 0o100644, 0, 0)
            await fs.write(node, 0, data[i])
            nodes.append(node)
        await fs.commit()  # the creations; the data is still dirty in memory
        assert all(durable_content(fs, n.ino) == b"" for n in nodes)
        appends = 0
        real_append = fs.metalog.journal.append  # type: ignore[union-attr]

        def counting_append(frame: bytes) -> None:
            nonlocal appends
            real_append(frame)  # write + fdatasync
            appends += 1

        fs.metalog.journal.append = counting_append  # type: ignore[method-assign,union-attr]
        seen: dict[int, bytes | None] = {}

        async def fsync(i: int) -> None:
            await fs.fsync(nodes[i])
            # the moment the fsync is acknowledged, the disk must already hold the data
            seen[i] = durable_content(fs, nodes[i].ino)

        seq = fs.metalog.seq
        lock = fs.commits._lock
        await lock.acquire()  # a commit in flight: every fsync below must wait for it
        async with trio.open_nursery() as nursery:
            for i in range(FILES):
                nursery.start_soon(fsync, i)
            await trio.testing.wait_all_tasks_blocked()
            assert seen == {} and appends == 0  # none acknowledged while nothing is durable
            lock.release()  # the in-flight commit ends
        assert seen == dict(enumerate(data))
        assert appends == 1 and fs.metalog.seq == seq + 1  # one fdatasync for all eight
