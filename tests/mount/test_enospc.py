"""A full backing disk surfaces as ENOSPC, never as corruption, and loses nothing committed.

The backing directory lives on a small tmpfs. The test commits some files, fills the tmpfs
from outside the volume (another tenant of the host disk), and checks that writes, fsyncs and
metadata commits fail with ENOSPC (never EIO), that committed files still read correctly, that
the volume unmounts and mounts again while the disk is full, and that after space is freed
everything committed before is intact, no tamper alarm was raised and writing works again.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from sealfs.fuse.mount import runtime_file
from tests.backing import force_unmount, is_mounted, process_gone, unmount
from tests.conftest import Volume, sealfs

pytestmark = [pytest.mark.mount]

BS = 16384


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def make_volume(tmp_path: Path, disk: Path, compression: str) -> Volume:
    """Backing directory on the small disk; key, mountpoint and log outside it."""
    vol = Volume(disk / "backing", tmp_path / "key", tmp_path / "mnt", tmp_path / "sealfs.log")
    vol.mnt.mkdir()
    vol.key.write_bytes(os.urandom(64))
    vol.key.chmod(0o600)
    sealfs(
        "create",
        str(vol.backing),
        "--key-file",
        str(vol.key),
        "--block-size",
        str(BS),
        "--compression",
        compression,
    )
    return vol


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte with a file outside the volume."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            buf = b"\xa5" * size
            try:
                while True:
                    os.write(fd, buf)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def fsync_path(p: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(p, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def expect_enospc(what: str, fn: Callable[[], object], errors: list[str]) -> bool:
    """Run ``fn``; True if it failed with ENOSPC. Any other errno is recorded as a failure
    (EIO here would mean a full disk was mistaken for corruption)."""
    try:
        fn()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return True
        errors.append(f"{what}: {e!r} (expected ENOSPC)")
    return False


def write_big(p: Path, n_blocks: int) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for i in range(n_blocks):
            os.write(fd, os.urandom(BS - 1) + bytes([i % 256]))
        os.fsync(fd)
    finally:
        os.close(fd)


def mkdirs_until_full(mnt: Path) -> None:
    """mkdir + fsync of the parent until it fails. A small commit may still fit in the slack
    of the journal's last page of the full disk; a page holds at most a few dozen such
    commits, so 256 tries must end in an error."""
    for i in range(256):
        (mnt / f"newdir{i}").mkdir()
        fsync_path(mnt, os.O_RDONLY | os.O_DIRECTORY)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_full_disk_is_enospc_and_loses_nothing_committed(
    tmp_path: Path, small_disk: Path, compression: str
) -> None:
    vol = make_volume(tmp_path, small_disk, compression)
    committed = {f"d/f{i}": os.urandom(i * 5000 + 1) for i in range(8)}
    committed["small"] = b"hello"
    try:
        mnt = vol.mount("--commit-interval", "0.3")
        (mnt / "d").mkdir()
        for name, data in committed.items():
            (mnt / name).write_bytes(data)
            fsync_path(mnt / name)
        fsync_path(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)

        filler = fill(small_disk)
        errors: list[str] = []
        hits = [
            expect_enospc(
                "write+fsync of a new multi-block file", lambda: write_big(mnt / "big", 64), errors
            ),
            expect_enospc(
                "append+fsync to a committed file", lambda: write_big(mnt / "d" / "f1", 4), errors
            ),
            expect_enospc("mkdir+fsync of the parent", lambda: mkdirs_until_full(mnt), errors),
        ]
        assert not errors, "\n".join(errors)
        assert all(hits), f"expected ENOSPC from every step, got {hits}"
        # While full: committed data still reads (fsync'd before), nothing reads as EIO.
        for name, data in committed.items():
            if name != "d/f1":
                assert (mnt / name).read_bytes() == data, name
        # Unmount while full (the final commit may fail: only unsynced work may be lost).
        pid = vol.daemon_pid()
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        for _ in range(600):
            if process_gone(pid):
                break
            time.sleep(0.05)
        assert process_gone(pid)

        # Mount again while the disk is still full: must work, committed data intact.
        vol.mount()
        for name, data in committed.items():
            if name != "d/f1":
                assert (mnt / name).read_bytes() == data, name
        unmount(vol)

        filler.unlink()
        vol.mount()
        for name, data in committed.items():
            got = (mnt / name).read_bytes()
            if name == "d/f1":  # its append failed: old content, or a prefix of the append
                assert got[: len(data)] == data, name
            else:
                assert got == data, name
        for p in mnt.rglob("*"):  # whatever the failed operations left reads cleanly
            if p.is_file():
                p.read_bytes()
        write_big(mnt / "after", 8)  # and the volume is writable again
        unmount(vol)
        vol.mount()
        assert (mnt / "after").stat().st_size == 8 * BS
        unmount(vol)
        log = vol.log_text()
        assert "verification" not in log, log
        assert "Traceback" not in log, log
    finally:
        force_unmount(vol)
        assert not is_mounted(vol.mnt)


def test_failed_final_commit_on_full_disk_is_logged(tmp_path: Path, small_disk: Path) -> None:
    """Unmounting while the disk is full: the final commit cannot be written, so the unsynced
    work is lost (allowed). But the daemon log must say so; the administrator must not be
    left with a log whose last words are a successful mount."""
    vol = make_volume(tmp_path, small_disk, "none")
    try:
        mnt = vol.mount()
        (mnt / "kept").write_bytes(b"committed")
        fsync_path(mnt / "kept")
        filler = fill(small_disk)
        (mnt / "lost").write_bytes(os.urandom(3 * BS))  # never fsync'd
        pid = vol.daemon_pid()
        time.sleep(0.3)  # separate the write errors in the log from what follows
        unmounted_at = datetime.now()
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        for _ in range(200):
            if process_gone(pid):
                break
            time.sleep(0.05)
        log = vol.log_text()
        filler.unlink()
        vol.mount()
        assert (mnt / "kept").read_bytes() == b"committed"
        unmount(vol)
        # Write-back errors of single blocks ("writing /lost failed") are logged as the kernel
        # flushes at unmount; what must follow is a word about the unmount itself.
        at_exit = [
            ln
            for ln in log.splitlines()
            if datetime.strptime(ln[:23], "%Y-%m-%d %H:%M:%S,%f") >= unmounted_at
            and " writing /" not in ln
        ]
        assert at_exit, (
            "the daemon exited after a failed final commit without a word about "
            "it in its log:\n" + log[-1500:]
        )
        assert any("ERROR" in ln for ln in at_exit), "\n".join(at_exit)
    finally:
        force_unmount(vol)
        # the daemon that died in its final commit leaves its runtime record behind
        runtime_file(vol.mnt.absolute()).unlink(missing_ok=True)
