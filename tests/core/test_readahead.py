"""Sequential-read prefetching in the core (no kernel): it loads ahead, and it never lets an
old block it loaded win over a newer write."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from sealfs.fs.core import Filesystem
from sealfs.sealed.inode import ROOT_INO, Inode
from tests.core.harness import loaded

MiB = 1 << 20


async def prefetches_done(fs: Filesystem) -> None:
    """Wait for the prefetches in flight (and what they put in the cache): the test then does
    not depend on how fast this machine loads blocks."""
    for pending in list(fs.cache._loading.values()):
        await pending.wait()


async def write_file(fs: Filesystem, name: bytes, data: bytes) -> Inode:
    node = await fs.create(ROOT_INO, name, 0o100644, 0, 0)
    fs.remember(node)
    for off in range(0, len(data), MiB):
        await fs.write(node, off, data[off : off + MiB])
    await fs.fsync(node)
    return node


async def test_sequential_reads_load_ahead_and_return_the_right_bytes(tmp_path: Path) -> None:
    data = os.urandom(12 * MiB + 777)
    loads: list[int] = []

    async with loaded(tmp_path / "b", readahead=2 * MiB) as fs, trio.open_nursery() as nursery:
        fs.workers.nursery = nursery
        node = await write_file(fs, b"f", data)
        fs.cache._clean.clear()
        fs.cache._clean_bytes = 0
        real_load = fs.cache._load

        def counting_load(ino: int, wanted: list[tuple[int, int]]) -> list:
            loads.append(len(wanted))
            return real_load(ino, wanted)

        fs.cache._load = counting_load  # type: ignore[method-assign]
        out = bytearray()
        ahead_seen = False
        for off in range(0, len(data), MiB):
            out += await fs.read(node, off, MiB)
            await prefetches_done(fs)
            nxt = (off + MiB) // fs.block_size + 1
            ahead_seen |= (node.ino, nxt + 4) in fs.cache._clean
        assert bytes(out) == data
        assert ahead_seen, "blocks ahead of the reader were never loaded"
        nursery.cancel_scope.cancel()
        fs.workers.nursery = None
    blocks = -(-len(data) // (128 << 10))
    assert sum(loads) <= blocks + 8, "blocks were loaded twice"
    assert max(loads) >= 8, "prefetch jobs should load many blocks per thread hop"


async def test_a_write_during_a_prefetch_is_not_overwritten_by_the_old_block(
    tmp_path: Path,
) -> None:
    data = os.urandom(6 * MiB)

    async with loaded(tmp_path / "b", readahead=4 * MiB) as fs, trio.open_nursery() as nursery:
        fs.workers.nursery = nursery
        node = await write_file(fs, b"f", data)
        for _ in range(3):
            fs.cache._clean.clear()
            fs.cache._clean_bytes = 0
            await fs.read(node, 0, MiB)
            await fs.read(node, MiB, MiB)  # sequential: starts loading 2 MiB.. ahead
            # Overwrite blocks that are being prefetched, before the loads finish.
            await fs.write(node, 3 * MiB, b"N" * MiB)
            await fs.flush_file(node)
            await prefetches_done(fs)
            assert await fs.read(node, 3 * MiB, MiB) == b"N" * MiB
            assert await fs.read(node, 2 * MiB, MiB) == data[2 * MiB : 3 * MiB]
            await fs.write(node, 3 * MiB, data[3 * MiB : 4 * MiB])
            await fs.flush_file(node)
        nursery.cancel_scope.cancel()
        fs.workers.nursery = None


async def test_a_streaming_overwrite_of_a_cached_block_never_reads_back_the_old_version(
    tmp_path: Path,
) -> None:
    """Blocks a streaming writer fills are not put into the clean cache; an older cached
    version of such a block must not be served afterwards."""
    old, new = os.urandom(2 * MiB), os.urandom(2 * MiB)

    async with loaded(tmp_path / "b") as fs, trio.open_nursery() as nursery:
        fs.workers.nursery = nursery
        node = await write_file(fs, b"f", old)
        assert await fs.read(node, 0, 2 * MiB) == old  # cached now
        for off in range(0, 2 * MiB, 64 << 10):
            await fs.write(node, off, new[off : off + (64 << 10)])
        await fs.flush_file(node)
        assert not node.dirty_blocks and not node.flushing
        assert await fs.read(node, 0, 2 * MiB) == new
        nursery.cancel_scope.cancel()
        fs.workers.nursery = None


async def test_random_small_writes_to_one_block_are_written_back_once(tmp_path: Path) -> None:
    data = bytearray(os.urandom(MiB))
    async with loaded(tmp_path / "b") as fs:
        node = await write_file(fs, b"f", bytes(data))
        puts = []
        real_put = fs.store.put
        fs.store.put = lambda oid, blob: (puts.append(oid), real_put(oid, blob))[1]  # type: ignore[method-assign]
        for off in (4096, 40_000, 9000, 70_000):  # inside block 0, never reaching its end
            await fs.write(node, off, b"Z" * 100)
            data[off : off + 100] = b"Z" * 100
        assert puts == [] and list(node.dirty_blocks) == [0]
        assert await fs.read(node, 0, MiB) == bytes(data)

    async with loaded(tmp_path / "b", writable=False) as again:
        node = await again.lookup(ROOT_INO, b"f")
        assert await again.read(node, 0, MiB) == bytes(data)
