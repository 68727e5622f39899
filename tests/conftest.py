"""Shared fixtures: volumes in temporary backing directories, mounted for real with FUSE.

Collected for every test, so it imports nothing that needs pyfuse3 at module level: the unit
and core tests run where pyfuse3 is not installed (tests/unit/test_without_pyfuse3.py proves it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

REPO = Path(__file__).resolve().parents[1]
SEALFS = [sys.executable, "-m", "sealfs"]


def sealfs(
    *args: str, check: bool = True, input: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real command line; returns the completed process (text output)."""
    res = subprocess.run(
        [*SEALFS, *args],
        input=input.decode() if input else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"sealfs {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}"
        )
    return res


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    max_rss_mib: float  # peak resident memory of the process (and the children it reaped)


#: Runs argv[2:] and writes its peak RSS (KiB, from wait4) to the file argv[1]. A child's
#: ru_maxrss counts the memory of the process it was forked from, so the command is forked by
#: this small interpreter rather than by the (possibly large) test process.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def sealfs_measured(
    *args: str, timeout: float = 120, stdin: IO[bytes] | int = subprocess.DEVNULL
) -> Measured:
    """Run the real command line (its standard input from ``stdin``) and measure its peak
    memory (wait4's ru_maxrss, which takes in the children it reaped): a bound on what it
    allocated, whatever the machine's speed. A command still running after ``timeout`` (hung
    on a FIFO, say) is killed and fails."""
    with tempfile.TemporaryDirectory() as tmp:
        rss = Path(tmp) / "maxrss"
        proc = subprocess.Popen(
            [sys.executable, "-c", _MEASURE, str(rss), *SEALFS, *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"sealfs {' '.join(args)} did not finish (hung?)") from None
        return Measured(proc.returncode, out, err, int(rss.read_text()) / 1024)


@dataclass
class Volume:
    backing: Path
    key: Path
    mnt: Path
    log: Path

    def mount(self, *extra: str) -> Path:
        sealfs(
            "mount",
            str(self.backing),
            str(self.mnt),
            "--key-file",
            str(self.key),
            "--log-file",
            str(self.log),
            *extra,
        )
        return self.mnt

    def umount(self) -> None:
        sealfs("umount", str(self.mnt))

    def force_unmount(self) -> None:
        """Detach a mount whose daemon died (after SIGKILL) or clean up after a failure."""
        from sealfs.fuse.mount import is_mounted

        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            for _ in range(100):
                if not is_mounted(self.mnt):
                    break
                time.sleep(0.05)

    def unmount_after_test(self) -> None:
        """Fixture teardown: unmount (the final commit must succeed); if that fails, detach
        the mount anyway and re-raise."""
        if os.path.ismount(self.mnt):
            try:
                self.umount()
            except AssertionError:
                self.force_unmount()
                raise

    def daemon_pid(self) -> int:
        from sealfs.fuse.mount import runtime_file

        return int(json.loads(runtime_file(self.mnt.absolute()).read_text())["pid"])

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def new_volume(tmp_path: Path, *create_args: str, name: str = "vol") -> Volume:
    base = tmp_path / name
    base.mkdir()
    vol = Volume(base / "backing", base / "key", base / "mnt", base / "sealfs.log")
    vol.mnt.mkdir()
    vol.key.write_bytes(os.urandom(64))
    vol.key.chmod(0o600)
    sealfs("create", str(vol.backing), "--key-file", str(vol.key), *create_args)
    return vol


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    from sealfs.fuse.mount import is_mounted

    vol = new_volume(tmp_path)
    yield vol
    if is_mounted(vol.mnt):
        res = sealfs("umount", str(vol.mnt), check=False)
        if res.returncode != 0:
            vol.force_unmount()


@pytest.fixture
def mounted(volume: Volume) -> Iterator[Volume]:
    volume.mount()
    yield volume
