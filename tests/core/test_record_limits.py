"""Writers stay inside what readers accept: a directory, an inode's xattrs and the inode table
never grow past the size limits of docs/format.md; the write that would is ENOSPC, and what
was committed before it reopens."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from sealfs.fs import attributes, namespace, nodes
from sealfs.fs.errors import FsError
from sealfs.sealed.inode import ENTRY_OVERHEAD, ROOT_INO
from tests.core.harness import open_fs


def _enospc(excinfo: pytest.ExceptionInfo[FsError]) -> None:
    assert excinfo.value.errno == errno.ENOSPC


def test_xattrs_stop_at_their_share_of_the_record(tmp_path: Path) -> None:
    """The real limit: 64 KiB values until 16 MiB, then ENOSPC; replacing one still works."""
    fs = open_fs(tmp_path / "b")
    value = b"v" * attributes.XATTR_SIZE_MAX

    async def main() -> int:
        await fs.load()
        node = await fs.create(ROOT_INO, b"f", 0o100644, 0, 0)
        fs.remember(node)
        n = 0
        with pytest.raises(FsError) as e:
            while True:
                await fs.setxattr(node.ino, b"user.%d" % n, value)
                n += 1
        _enospc(e)
        await fs.setxattr(node.ino, b"user.0", value[:-1] + b"w")  # same size: fits
        assert len(node.to_record()) < attributes.XATTR_RECORD_MAX + (1 << 20)
        await fs.fsync(node)
        await fs.close()
        return n

    n = trio.run(main)
    assert n == attributes.XATTR_RECORD_MAX // (6 + len(b"user.0") + attributes.XATTR_SIZE_MAX)
    again = open_fs(tmp_path / "b")

    async def reopen() -> None:
        await again.load(writable=False)
        node = await again.lookup(ROOT_INO, b"f")
        assert len(node.xattrs) == n and node.xattrs[b"user.0"].endswith(b"w")

    trio.run(reopen)


def test_a_directory_stops_at_the_record_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the limit lowered to 4 KiB (the real one needs ~1 Mi long names): create, link and
    rename into the full directory are ENOSPC; removing an entry makes room again."""
    monkeypatch.setattr(namespace, "DIR_ENTRIES_MAX", 4096)
    fs = open_fs(tmp_path / "b")
    name = b"n" * 100

    async def main() -> None:
        await fs.load()
        d = await fs.create(ROOT_INO, b"d", 0o040755, 0, 0)
        other = await fs.create(ROOT_INO, b"other", 0o100644, 0, 0)
        fs.remember(d)
        fs.remember(other)
        made = 0
        with pytest.raises(FsError) as e:
            while True:
                await fs.create(d.ino, name + b"%03d" % made, 0o100644, 0, 0)
                made += 1
        _enospc(e)
        assert made == 4096 // (ENTRY_OVERHEAD + len(name) + 3)
        assert d.entries is not None and d.entries.record_bytes <= 4096
        for attempt in (
            fs.link(other.ino, d.ino, b"x" * 103),
            fs.rename(ROOT_INO, b"other", d.ino, b"x" * 103),
        ):
            with pytest.raises(FsError) as e:
                await attempt
            _enospc(e)
        await fs.rename(d.ino, name + b"000", d.ino, name + b"001")  # replaces: no growth
        await fs.unlink(d.ino, name + b"002", want_dir=False)
        await fs.rename(ROOT_INO, b"other", d.ino, name + b"002")  # room again
        await fs.close()

    trio.run(main)


def test_no_more_inodes_than_a_checkpoint_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodes, "MAX_INODES", 10)
    fs = open_fs(tmp_path / "b")

    async def main() -> None:
        await fs.load()
        with pytest.raises(FsError) as e:
            for i in range(20):
                fs.remember(await fs.create(ROOT_INO, b"f%d" % i, 0o100644, 0, 0))
        _enospc(e)
        assert len(fs.inodes.table) + len(fs.inodes.dirty) <= 10
        await fs.close()

    trio.run(main)
