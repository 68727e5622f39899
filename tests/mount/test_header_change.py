"""Changing the volume header (`sealfs key add`) is crash-safe and serialised.

A real crash at each step of the atomic replace (the process SIGKILLs itself at a failpoint,
sealfs/failpoints.py) leaves the old header or the new one, each opening with the credentials
it holds and checking clean, on an idle volume and on a mounted one; concurrent header changes
wait for each other under the header lock instead of losing a slot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sealfs.failpoints import ENV, REPLACE_STEPS
from sealfs.store import HEADER_LOCK_NAME, HEADER_NAME
from tests.conftest import REPO, SEALFS, Volume, new_volume, sealfs

#: Steps after which the new header is in place (the rename is the commit point).
LANDED = {"after-rename", "after-dir-fsync"}
TMP = f".{HEADER_NAME}.tmp"


def key_file(path: Path) -> Path:
    path.write_bytes(os.urandom(64))
    path.chmod(0o600)
    return path


def crashed_add(vol: Volume, new_key: Path, step: str) -> None:
    """`sealfs key add` of ``new_key``, killed by its own failpoint at ``step`` of the
    header replace."""
    res = subprocess.run(
        [*SEALFS, "key", "add", str(vol.backing), "--key-file", str(vol.key),
         "--new-key-file", str(new_key)],
        env={**os.environ, ENV: f"{HEADER_NAME}:{step}"},
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == -signal.SIGKILL, res.stderr


def opens(vol: Volume, key: Path) -> bool:
    """Whether ``key`` opens the volume and the whole check is clean (exit 0)."""
    return sealfs("check", str(vol.backing), "--key-file", str(key), check=False).returncode == 0


def slot_ids(vol: Volume) -> list[int]:
    listed = json.loads(sealfs("key", "list", str(vol.backing), "--json").stdout)
    return [s["id"] for s in listed["slots"]]


def assert_old_or_new(vol: Volume, old: bytes, new_key: Path, step: str) -> None:
    """The header is exactly the old one before the rename, the new one after; the old
    credential opens it either way and the new one exactly when it landed."""
    landed = step in LANDED
    assert ((vol.backing / HEADER_NAME).read_bytes() != old) == landed
    assert opens(vol, vol.key)
    assert opens(vol, new_key) == landed


@pytest.mark.parametrize("step", REPLACE_STEPS)
def test_crash_at_each_step_of_the_header_replace(tmp_path: Path, step: str) -> None:
    vol = new_volume(tmp_path)
    old = (vol.backing / HEADER_NAME).read_bytes()
    key2 = key_file(tmp_path / "key2")
    crashed_add(vol, key2, step)
    assert_old_or_new(vol, old, key2, step)
    assert slot_ids(vol) == ([0, 1] if step in LANDED else [0])
    # whatever the crash left (an empty or a full temporary header) the next change replaces
    key3 = key_file(tmp_path / "key3")
    sealfs("key", "add", str(vol.backing), "--key-file", str(vol.key), "--new-key-file", str(key3))
    assert not (vol.backing / TMP).exists()
    assert opens(vol, key3) and opens(vol, vol.key)
    assert len(slot_ids(vol)) == (3 if step in LANDED else 2)


@pytest.mark.mount
def test_crash_at_each_step_while_mounted(tmp_path: Path) -> None:
    """One mount lives through a crashed `key add` at every step: it keeps reading and
    writing, and a remount with each credential that landed opens the data."""
    vol = new_volume(tmp_path)
    vol.mount()
    landed: list[Path] = []
    try:
        for step in REPLACE_STEPS:
            old = (vol.backing / HEADER_NAME).read_bytes()
            new_key = key_file(tmp_path / f"key-{step}")
            crashed_add(vol, new_key, step)
            assert ((vol.backing / HEADER_NAME).read_bytes() != old) == (step in LANDED)
            (vol.mnt / step).write_text(f"written after a crash {step}")
            os.sync()
            assert (vol.mnt / step).read_text() == f"written after a crash {step}"
            if step in LANDED:
                landed.append(new_key)
    finally:
        vol.umount()
    assert len(slot_ids(vol)) == 1 + len(LANDED)
    for key in (vol.key, *landed):
        assert opens(vol, key)
        sealfs("mount", str(vol.backing), str(vol.mnt), "--key-file", str(key))
        try:
            assert sorted(p.name for p in vol.mnt.iterdir()) == sorted(REPLACE_STEPS)
        finally:
            vol.umount()


#: Runs `python -m sealfs argv[1:]` once its standard input (a pipe shared by every such
#: process) reaches end of file: all of them start their header change at the same moment.
_AT_BARRIER = (
    "import os, sys; sys.stdin.buffer.read(); "
    "os.execv(sys.executable, [sys.executable, '-m', 'sealfs', *sys.argv[1:]])"
)


def test_concurrent_key_adds_lose_no_slot(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    keys = [key_file(tmp_path / f"key{i}") for i in range(6)]
    barrier_r, barrier_w = os.pipe()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _AT_BARRIER,
                "key",
                "add",
                str(vol.backing),
                "--key-file",
                str(vol.key),
                "--new-key-file",
                str(key),
            ],
            stdin=barrier_r,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )  # fmt: skip
        for key in keys
    ]
    os.close(barrier_r)
    os.close(barrier_w)  # end of file for all at once: go
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert slot_ids(vol) == list(range(len(keys) + 1))
    for key in (vol.key, *keys):
        assert opens(vol, key)


def test_a_planted_header_lock_is_refused(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    target = tmp_path / "target"
    target.write_bytes(b"")
    (vol.backing / HEADER_LOCK_NAME).symlink_to(target)
    old = (vol.backing / HEADER_NAME).read_bytes()
    res = sealfs(
        "key", "add", str(vol.backing), "--key-file", str(vol.key),
        "--new-key-file", str(key_file(tmp_path / "key2")), check=False,
    )  # fmt: skip
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "header.lock is not a regular file" in res.stderr and len(res.stderr.splitlines()) == 1
    assert (vol.backing / HEADER_NAME).read_bytes() == old
