"""The filesystem core in-process (no kernel): background write-back racing with deletion."""

from __future__ import annotations

from pathlib import Path

import trio

from sealfs.sealed.inode import ROOT_INO
from tests.core.harness import open_fs


def test_deleting_a_file_while_it_is_written_back_does_not_stall_commits(tmp_path: Path) -> None:
    """A write-back job finishing after its file was deleted once left a 'flushing' entry
    behind; a sync() that had picked up the file then waited on it forever, and periodic
    commits stopped for good (unbounded memory, nothing durable without fsync)."""
    fs = open_fs(tmp_path / "b", commit_interval=0.05)
    synced: list[int] = []

    async def sync() -> None:
        with trio.fail_after(10):
            await fs.sync()
        synced.append(fs.metalog.seq)

    async def main() -> None:
        await fs.load()
        async with trio.open_nursery() as nursery:
            fs.workers.nursery = nursery
            for i in range(50):
                name = b"f%d" % i
                node = await fs.create(ROOT_INO, name, 0o100644, 0, 0)
                fs.remember(node)
                await fs.write(node, 0, b"x" * 5000)
                await fs.flush_file(node, wait=False)  # like release(): in the background
                nursery.start_soon(sync)  # picks the file up while its block is in flight
                await trio.sleep(0)
                await fs.unlink(ROOT_INO, name, want_dir=False)
                fs.forget(node.ino, 1)  # destroyed before its write-back finished
            keep = await fs.create(ROOT_INO, b"kept", 0o100644, 0, 0)
            await fs.write(keep, 0, b"committed")
            await sync()
            with trio.fail_after(10):  # every background sync finishes too
                while len(synced) < 51:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        fs.workers.nursery = None
        await fs.close()

    trio.run(main)
    assert len(synced) == 51
    again = open_fs(tmp_path / "b")

    async def check() -> None:
        await again.load(writable=False)
        node = await again.lookup(ROOT_INO, b"kept")
        assert await again.read(node, 0, 100) == b"committed"
        root = await again.node(ROOT_INO)
        assert root.entries is not None and list(root.entries.names) == [b"kept"]

    trio.run(check)
