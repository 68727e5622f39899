"""Small inode records, and blocks written back for an fsync, ride inside their commit frame
and become files at the next checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from sealfs.sealed.inode import ROOT_INO
from tests.core.harness import object_files, open_fs


def test_small_records_live_in_the_journal_until_a_checkpoint(tmp_path: Path) -> None:
    fs = open_fs(tmp_path / "b")
    syncs: list[int] = []

    async def main() -> None:
        await fs.load()
        real_sync = fs.store.sync

        def counting_sync(only_if_written: bool = False) -> None:
            if not only_if_written or fs.store.unsynced:
                syncs.append(1)
            real_sync(only_if_written)

        fs.store.sync = counting_sync  # type: ignore[method-assign]
        for i in range(20):
            node = await fs.create(ROOT_INO, b"f%d" % i, 0o100644, 0, 0)
            await fs.write(node, 0, b"small %d" % i)
            await fs.fsync(node)
        assert object_files(fs) == set(), "small records were written as files"
        assert syncs == [], "a commit without object files needs no syncfs"
        big = await fs.create(ROOT_INO, b"big", 0o100644, 0, 0)
        await fs.write(big, 0, os.urandom(300_000))
        await fs.fsync(big)
        # The two full blocks were written back as files when they filled up (so the commit
        # needs a syncfs); the partial third block, written back for the fsync, is carried.
        assert syncs == [1] and set(big.blocks.values()) - object_files(fs) == {big.blocks[2]}
        await fs.close()

    trio.run(main)
    again = open_fs(tmp_path / "b", checkpoint_min_journal=0, journal_max=0)

    async def reread() -> None:
        await again.load()
        big = await again.lookup(ROOT_INO, b"big")
        assert set(again.store.carried) <= set(again.inodes.table.values()) | {big.blocks[2]}
        assert len(again.store.carried) == 23  # root, 20 files, the big file's record+block
        for i in range(20):
            node = await again.lookup(ROOT_INO, b"f%d" % i)
            assert await again.read(node, 0, 100) == b"small %d" % i
        # The next commit finds the journal long enough for a checkpoint, which writes
        # them out; the next journal starts empty.
        gen = again.metalog.gen
        await again.create(ROOT_INO, b"one-more", 0o100644, 0, 0)
        await again.sync()
        assert again.metalog.gen == gen + 1 and again.store.carried == {}
        assert set(again.inodes.table.values()) <= object_files(again)
        await again.close()

    trio.run(reread)
    third = open_fs(tmp_path / "b")

    async def after_checkpoint() -> None:
        await third.load(writable=False)
        assert third.store.carried == {}
        node = await third.lookup(ROOT_INO, b"f7")
        assert await third.read(node, 0, 100) == b"small 7"

    trio.run(after_checkpoint)


def test_large_records_are_still_files(tmp_path: Path) -> None:
    fs = open_fs(tmp_path / "b", carried_record_max=1024)

    async def main() -> None:
        await fs.load()
        d = await fs.create(ROOT_INO, b"d", 0o40755, 0, 0)
        for i in range(100):
            await fs.create(d.ino, b"entry-with-a-long-name-%03d" % i, 0o100644, 0, 0)
        await fs.sync()
        assert (
            fs.inodes.table[d.ino] in object_files(fs)
            and fs.inodes.table[d.ino] not in fs.store.carried
        )
        await fs.close()

    trio.run(main)


def test_replay_keeps_only_carried_objects_still_in_use(tmp_path: Path) -> None:
    """Appends with fsync carry the growing tail block in each commit; each supersedes the
    previous one, also when a later version is a file. Replay must keep exactly the current
    ones, so a checkpoint writes out no orphans."""
    fs = open_fs(tmp_path / "b")
    chunk = os.urandom(40_000)

    async def main() -> None:
        await fs.load()
        node = await fs.create(ROOT_INO, b"log", 0o100644, 0, 0)
        for i in range(8):  # 320,000 bytes: blocks 0 and 1 fill up and become files
            await fs.write(node, i * len(chunk), chunk)
            await fs.fsync(node)
        await fs.close()

    trio.run(main)
    again = open_fs(tmp_path / "b", checkpoint_min_journal=0, journal_max=0)

    async def reread() -> None:
        await again.load()
        node = await again.lookup(ROOT_INO, b"log")
        current = set(again.inodes.table.values()) | set(node.blocks.values())
        assert set(again.store.carried) <= current
        assert node.blocks[2] in again.store.carried  # the tail, only ever carried
        assert await again.read(node, 0, 400_000) == chunk * 8
        await again.create(ROOT_INO, b"x", 0o100644, 0, 0)
        await again.sync()  # a checkpoint: everything carried becomes a file
        assert again.store.carried == {}
        nodes = [await again.node(ino) for ino in again.inodes.table]
        live = set(again.inodes.table.values()) | {o for n in nodes for o in n.blocks.values()}
        assert object_files(again) == live, "orphans or missing objects after the checkpoint"
        await again.close()

    trio.run(reread)


def test_checkpoints_come_when_carried_objects_pile_up_not_when_they_replace_each_other(
    tmp_path: Path,
) -> None:
    """An fsync'ed append log carries its growing tail in every commit, each replacing the
    last: the journal may grow to journal_max. Many live carried records force a checkpoint
    as soon as the journal is past its minimum, bounding what is held in memory."""
    fs = open_fs(
        tmp_path / "b",
        checkpoint_min_journal=64 << 10,
        journal_max=16 << 20,
        carried_in_memory=300 << 10,
    )

    async def main() -> None:
        await fs.load()
        log = await fs.create(ROOT_INO, b"log", 0o100644, 0, 0)
        gen, checkpoints_at = fs.metalog.gen, []
        for i in range(60):  # tails of up to 128 KiB: ~4 MiB of journal, under journal_max
            await fs.write(log, i * 4096, os.urandom(4096))
            await fs.fsync(log)
            if fs.metalog.gen != gen:
                gen = fs.metalog.gen
                checkpoints_at.append(i)
        assert checkpoints_at == [] and fs.metalog.journal_length > 64 << 10
        assert fs.store.carried_bytes < 300 << 10  # the live tails and records only
        for i in range(400):  # small files: their records stay live and pile up
            node = await fs.create(ROOT_INO, b"s%d" % i, 0o100644, 0, 0)
            await fs.write(node, 0, os.urandom(900))
            await fs.fsync(node)
            if fs.metalog.gen != gen:
                gen = fs.metalog.gen
                checkpoints_at.append(i)
        assert checkpoints_at, "live carried records never forced a checkpoint"
        assert fs.store.carried_bytes <= (300 << 10) + (64 << 10)
        await fs.close()

    trio.run(main)


def test_superseded_carried_objects_that_may_be_files_are_deleted_as_files(tmp_path: Path) -> None:
    """Only an object carried by this process since the last checkpoint is known never to
    have been a file; one replayed from a journal or written out by a checkpoint may be, and
    must go through ObjectStore.delete (else its file would be left behind)."""
    fs = open_fs(tmp_path / "b")
    store = fs.store
    store.set_carried({1: b"replayed"})
    store.carry(2, b"fresh")
    assert store.drop_fileless([1, 2, 3]) == [1, 3]  # 3: not carried at all
    assert set(store.carried) == {1} and store.carried_bytes == len(b"replayed")
    store.carry(4, b"written out")
    assert store.materialize() == [1, 4]
    assert store.drop_fileless([4]) == [4] and 4 in object_files(fs)
    store.delete(4)
    assert 4 not in object_files(fs) and 4 not in store.carried
