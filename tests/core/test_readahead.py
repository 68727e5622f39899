"""Sequential-read prefetching in the core (no kernel): it loads ahead, and it never lets an
old block it loaded win over a newer write."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from sealfs.crypto import Secret
from sealfs.fs.core import Filesystem, Limits
from sealfs.fs.inode import ROOT_INO, Inode
from sealfs.volume.header import KeyFileCredential
from sealfs.volume.lifecycle import create_volume, unlock_volume

CRED = KeyFileCredential(Secret(os.urandom(64)))
MiB = 1 << 20


def open_fs(backing: Path, **limits: int) -> Filesystem:
    if not backing.exists():
        create_volume(backing, [(CRED, None)])
    store, header, master = unlock_volume(backing, CRED)
    return Filesystem(store, header, master, Limits(commit_interval=3600, **limits))


async def write_file(fs: Filesystem, name: bytes, data: bytes) -> Inode:
    node = await fs.create(ROOT_INO, name, 0o100644, 0, 0)
    fs.remember(node)
    for off in range(0, len(data), MiB):
        await fs.write(node, off, data[off:off + MiB])
    await fs.fsync(node)
    return node


def test_sequential_reads_load_ahead_and_return_the_right_bytes(tmp_path: Path) -> None:
    fs = open_fs(tmp_path / "b", readahead=2 * MiB)
    data = os.urandom(12 * MiB + 777)
    loads: list[int] = []

    async def main() -> None:
        await fs.load()
        async with trio.open_nursery() as nursery:
            fs.data.nursery = nursery
            node = await write_file(fs, b"f", data)
            fs.data._clean.clear()
            fs.data._clean_bytes = 0
            real_load = fs.data._load

            def counting_load(ino: int, wanted: list[tuple[int, int]]) -> list:
                loads.append(len(wanted))
                return real_load(ino, wanted)

            fs.data._load = counting_load  # type: ignore[method-assign]
            out = bytearray()
            ahead_seen = False
            for off in range(0, len(data), MiB):
                out += await fs.read(node, off, MiB)
                await trio.sleep(0.01)  # let the background loads run
                nxt = (off + MiB) // fs.block_size + 1
                ahead_seen |= (node.ino, nxt + 4) in fs.data._clean
            assert bytes(out) == data
            assert ahead_seen, "blocks ahead of the reader were never loaded"
            nursery.cancel_scope.cancel()
        fs.data.nursery = None
        await fs.close()

    trio.run(main)
    blocks = -(-len(data) // (128 << 10))
    assert sum(loads) <= blocks + 8, "blocks were loaded twice"
    assert max(loads) >= 8, "prefetch jobs should load many blocks per thread hop"


def test_a_write_during_a_prefetch_is_not_overwritten_by_the_old_block(
        tmp_path: Path) -> None:
    fs = open_fs(tmp_path / "b", readahead=4 * MiB)
    data = os.urandom(6 * MiB)

    async def main() -> None:
        await fs.load()
        async with trio.open_nursery() as nursery:
            fs.data.nursery = nursery
            node = await write_file(fs, b"f", data)
            for _ in range(3):
                fs.data._clean.clear()
                fs.data._clean_bytes = 0
                await fs.read(node, 0, MiB)
                await fs.read(node, MiB, MiB)  # sequential: starts loading 2 MiB.. ahead
                # Overwrite blocks that are being prefetched, before the loads finish.
                await fs.write(node, 3 * MiB, b"N" * MiB)
                await fs.flush_file(node)
                await trio.sleep(0.2)
                assert await fs.read(node, 3 * MiB, MiB) == b"N" * MiB
                assert await fs.read(node, 2 * MiB, MiB) == data[2 * MiB:3 * MiB]
                await fs.write(node, 3 * MiB, data[3 * MiB:4 * MiB])
                await fs.flush_file(node)
            nursery.cancel_scope.cancel()
        fs.data.nursery = None
        await fs.close()

    trio.run(main)
