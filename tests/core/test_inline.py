"""Small files keep their data in their inode record: no block object until they grow."""

from __future__ import annotations

import os
from pathlib import Path

from sealfs.fs.data import INLINE_MAX
from sealfs.sealed.inode import ROOT_INO
from tests.core.harness import loaded, object_files


async def test_small_files_live_in_their_record_and_move_out_when_they_grow(tmp_path: Path) -> None:
    small = os.urandom(1000)
    grown = small + os.urandom(200_000)

    async with loaded(tmp_path / "b") as fs:
        node = await fs.create(ROOT_INO, b"f", 0o100644, 0, 0)
        fs.remember(node)
        await fs.write(node, 0, small)
        await fs.fsync(node)
        assert node.inline == small and node.blocks == {}
        assert object_files(fs) <= set(fs.inodes.table.values()), (
            "a small file wrote a block object"
        )
        # Overwrite inside, extend up to the limit: still inline.
        await fs.write(node, 10, b"XY")
        await fs.fsync(node)
        assert node.inline == small[:10] + b"XY" + small[12:]
        await fs.truncate(node, INLINE_MAX)
        await fs.write(node, INLINE_MAX - 1, b"Z")
        await fs.fsync(node)
        assert node.inline is not None and len(node.inline) == INLINE_MAX
        # Grow past it: the data moves to block objects, the record drops it.
        await fs.write(node, 0, grown)
        await fs.fsync(node)
        assert node.inline is None and sorted(node.blocks) == [0, 1]
        assert await fs.read(node, 0, len(grown)) == grown
        # Shrink again: a block-mapped file stays block-mapped (no churn back and forth).
        await fs.truncate(node, 100)
        await fs.fsync(node)
        assert await fs.read(node, 0, 1000) == grown[:100]
        other = await fs.create(ROOT_INO, b"g", 0o100644, 0, 0)
        fs.remember(other)
        await fs.write(other, 0, b"hello")
        await fs.truncate(other, 3)
        await fs.fsync(other)
        assert other.inline == b"hel"
        await fs.truncate(other, 0)
        await fs.fsync(other)
        assert other.inline is None and await fs.read(other, 0, 10) == b""
        await fs.truncate(other, 50)  # a hole: zeros, still nothing stored
        await fs.fsync(other)
        assert await fs.read(other, 0, 100) == bytes(50)

    async with loaded(tmp_path / "b", writable=False) as again:
        f = await again.lookup(ROOT_INO, b"f")
        assert await again.read(f, 0, 1000) == grown[:100]
        g = await again.lookup(ROOT_INO, b"g")
        assert await again.read(g, 0, 100) == bytes(50)


async def test_inline_data_survives_a_remount_and_sparse_tails_read_as_zeros(
    tmp_path: Path,
) -> None:
    async with loaded(tmp_path / "b") as fs:
        node = await fs.create(ROOT_INO, b"s", 0o100644, 0, 0)
        fs.remember(node)
        await fs.write(node, 0, b"head")
        await fs.truncate(node, 3000)

    async with loaded(tmp_path / "b") as again:
        node = await again.lookup(ROOT_INO, b"s")
        assert node.inline == b"head" and node.size == 3000
        assert await again.read(node, 0, 4000) == b"head" + bytes(2996)
        assert object_files(again) <= set(again.inodes.table.values())
