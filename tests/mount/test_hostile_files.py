"""The backing directory is hostile as a file system: symlinks, FIFOs, directories and sparse
giant files planted where sealfs creates or opens its own files, on real mounts.

* A symlink at any name sealfs creates or opens, planted before ``create`` or while mounted
  (before a checkpoint rollover, a new journal, new objects), never makes sealfs write
  through it: the canary it points at keeps its bytes, a canary directory stays empty.
* A FIFO, directory, symlink or 1 GiB sparse file in place of an object, the checkpoint, the
  journal or the header is damage: EIO for the object's reads (logged with its path), a
  refused mount or ``info``, never a hang, and memory stays flat (the file is never read).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealfs.sealed.codec import MAX_FILE_BLOCKS
from sealfs.store import CHECKPOINT_NAME, HEADER_NAME, LOCK_NAME, journal_name
from tests.backing import (
    PLANTED_KINDS,
    copy_tree,
    fold,
    force_unmount,
    layout,
    make_content,
    plant,
    unmount,
)
from tests.conftest import REPO, Volume, new_volume, sealfs, sealfs_measured

pytestmark = [pytest.mark.mount]

BS = 4096
CANARY = b"canary: sealfs must never write this file\n"
MAX_RSS_MIB = 300  # a 1 GiB file read whole would take more than three times this
FILE, SIZE = "/a.txt", 3 * BS + 100


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A file and a directory outside the backing directory, for planted symlinks."""
    f, d = tmp_path / "canary-file", tmp_path / "canary-dir"
    f.write_bytes(CANARY)
    d.mkdir()
    yield f, d
    assert f.read_bytes() == CANARY, "sealfs wrote through a planted symlink"
    assert os.listdir(d) == [], "sealfs created files through a planted symlink"


def plant_symlinks(backing: Path, name: str, canary: tuple[Path, Path]) -> None:
    """A symlink at ``name``; ``objects/*``: every fan-out directory not yet there."""
    f, d = canary
    if name == "objects/*":
        (backing / "objects").mkdir(exist_ok=True)
        for i in range(256):
            sub = backing / "objects" / f"{i:02x}"
            if not sub.exists():
                sub.symlink_to(d)
    else:
        plant(backing / name, "symlink", d if name == "objects" else f)


CREATE_NAMES = [
    HEADER_NAME,
    f".{HEADER_NAME}.tmp",
    LOCK_NAME,
    CHECKPOINT_NAME,
    f".{CHECKPOINT_NAME}.tmp",
    journal_name(1),
    "objects",
    "objects/*",
]


@pytest.mark.parametrize("name", CREATE_NAMES)
def test_create_never_writes_through_a_planted_symlink(
    tmp_path: Path, name: str, canary: tuple[Path, Path]
) -> None:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(64))
    key.chmod(0o600)
    backing = tmp_path / "backing"
    backing.mkdir()
    plant_symlinks(backing, name, canary)
    res = sealfs("create", str(backing), "--key-file", str(key), check=False)
    assert "Traceback" not in res.stderr, res.stderr
    if res.returncode == 0:  # the planted name was replaced, not followed: a sound volume
        sealfs("check", str(backing), "--key-file", str(key))
    else:
        assert res.returncode in (2, 5), res.stderr


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """An unmounted volume holding FILE, every object a file of its own."""
    vol = new_volume(tmp_path_factory.mktemp("hostile"), "--block-size", str(BS))
    try:
        vol.mount()
        (vol.mnt / FILE.lstrip("/")).write_bytes(make_content(FILE, SIZE))
        unmount(vol)
        fold(vol)
    finally:
        force_unmount(vol)
    return vol


@pytest.fixture
def victim(template: Volume, tmp_path: Path) -> Iterator[Volume]:
    vol = Volume(tmp_path / "backing", template.key, tmp_path / "mnt", tmp_path / "log")
    copy_tree(template.backing, vol.backing)
    vol.mnt.mkdir()
    yield vol
    force_unmount(vol)


ROLLOVER_NAMES = [f".{CHECKPOINT_NAME}.tmp", "next-journal", "objects/*"]


@pytest.mark.parametrize("name", ROLLOVER_NAMES)
def test_mounted_volume_never_writes_through_a_planted_symlink(
    tmp_path: Path, canary: tuple[Path, Path], name: str
) -> None:
    """Planted while mounted, before new objects and a checkpoint rollover (which writes the
    temporary checkpoint and the next journal): fsync'ed partial blocks are carried in the
    journal until a commit folds them into a checkpoint (past 8 MiB of them)."""
    vol = new_volume(tmp_path)  # 128 KiB blocks: a 100 KiB file is one partial block
    vol.mount()
    try:
        plant_symlinks(vol.backing, journal_name(2) if name == "next-journal" else name, canary)
        failures = 0
        for i in range(96):  # 96 x 100 KiB carried
            path = vol.mnt / f"f{i}"
            try:
                with open(path, "wb") as f:  # fsync before close: the block is carried
                    f.write(make_content(f"f{i}", 100 << 10))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                assert e.errno == errno.EIO, e
                failures += 1
        res = sealfs("umount", str(vol.mnt), check=False)
    finally:
        vol.force_unmount()
    if name == "objects/*":  # the checkpoint cannot write out the carried objects
        assert failures > 0
        return
    assert failures == 0 and res.returncode == 0, res.stderr
    assert not (vol.backing / journal_name(1)).exists(), "no checkpoint was written"
    assert (vol.backing / journal_name(2)).is_file()
    sealfs("check", str(vol.backing), "--key-file", str(vol.key))


def _daemon_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("kind", PLANTED_KINDS)
@pytest.mark.parametrize("what", ["block", "record"])
def test_planted_object_reads_eio_without_hang_or_memory(
    victim: Volume, tmp_path: Path, what: str, kind: str
) -> None:
    entry = layout(victim.backing, victim.key)[FILE]
    path = entry.block(1) if what == "block" else entry.record
    copy = tmp_path / "genuine-copy"  # a symlink to the right bytes is still refused
    shutil.copyfile(path, copy)
    plant(path, kind, copy)
    victim.mount()
    with pytest.raises(OSError) as err:
        (victim.mnt / FILE.lstrip("/")).read_bytes()
    assert err.value.errno == errno.EIO
    hwm = _daemon_hwm_mib(victim.daemon_pid())
    assert hwm < MAX_RSS_MIB, f"the daemon peaked at {hwm:.0f} MiB"
    unmount(victim)
    log = victim.log_text()
    assert FILE in log and path.name in log, log
    assert "Traceback" not in log


@pytest.mark.parametrize("kind", PLANTED_KINDS)
@pytest.mark.parametrize("name", [HEADER_NAME, CHECKPOINT_NAME, "journal"])
def test_planted_metadata_file_refuses_mount_without_hang_or_memory(
    victim: Volume, tmp_path: Path, name: str, kind: str
) -> None:
    gen = layout(victim.backing, victim.key).gen
    path = victim.backing / (journal_name(gen) if name == "journal" else name)
    copy = tmp_path / "genuine-copy"
    shutil.copyfile(path, copy)
    plant(path, kind, copy)
    args = [str(victim.backing), "--key-file", str(victim.key)]
    runs = [sealfs_measured("mount", "-f", args[0], str(victim.mnt), *args[1:])]
    if name == HEADER_NAME:
        runs.append(sealfs_measured("info", args[0]))
    for res in runs:
        assert res.max_rss_mib < MAX_RSS_MIB, f"peaked at {res.max_rss_mib:.0f} MiB"
        assert res.returncode == (4 if name == HEADER_NAME else 5), res.stderr
        assert path.name in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not os.path.ismount(victim.mnt)


def test_daemon_log_is_private_and_keys_stay_out_of_core_dumps(
    victim: Volume, tmp_path: Path
) -> None:
    """The log names plaintext paths: a directory sealfs creates for it is 0700, the file
    0600. Processes holding keys cannot dump core (RLIMIT_CORE 0, not dumpable)."""
    log = tmp_path / "logs" / "sealfs" / "daemon.log"
    sealfs(
        "mount",
        str(victim.backing),
        str(victim.mnt),
        "--key-file",
        str(victim.key),
        "--log-file",
        str(log),
    )
    try:
        assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        limits = Path(f"/proc/{victim.daemon_pid()}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core"))
        assert core.split()[4:6] == ["0", "0"], core  # soft and hard limit
    finally:
        unmount(victim)
    # the dumpable flag can only be read by the process itself: run the CLI entry point in one
    probe = (
        "import ctypes, sys\nfrom sealfs.cli import main\n"
        "main(['info', sys.argv[1]], standalone_mode=False)\n"
        "print('dumpable', ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    )  # PR_GET_DUMPABLE
    res = subprocess.run(
        [sys.executable, "-c", probe, str(victim.backing)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.stdout.strip().endswith("dumpable 0"), res.stdout + res.stderr


def test_writes_stay_within_the_record_limit_readers_accept(victim: Volume) -> None:
    """A file's block map lives in its record, which a reader refuses beyond 256 MiB: a write
    past the last block a record can name fails with EFBIG instead of making the file
    unreadable; the last block itself is written and read back."""
    victim.mount()
    try:
        limit = MAX_FILE_BLOCKS * BS
        with open(victim.mnt / "big", "wb") as f:
            os.pwrite(f.fileno(), b"end", limit - 3)
            with pytest.raises(OSError) as err:
                os.pwrite(f.fileno(), b"x", limit)
            assert err.value.errno == errno.EFBIG
        with open(victim.mnt / "big", "rb") as f:
            assert os.pread(f.fileno(), 3, limit - 3) == b"end"
    finally:
        unmount(victim)
