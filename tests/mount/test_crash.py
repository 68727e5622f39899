"""Crash consistency: SIGKILL the FUSE daemon during heavy writes, many times, at random points.

Promise (docs/threat-model.md): after kill -9 at any point the volume mounts cleanly, every
file is at least at its last fsync'd state, no directory or subtree becomes unreadable, and no
false tamper alarm is raised.

A writer process works on the mounted volume: it creates files, atomically replaces them
(write temp, fsync, rename, fsync dir), overwrites ranges in place, deletes files, and keeps
appending to a large file it never fsyncs. Before each operation it records its intent, and
after the fsyncs return it records the result (path and SHA-256), in a log file OUTSIDE the
volume. The test kills the daemon at a random moment, detaches the dead mount, remounts, and
checks the volume against that log:

* a file whose last operation completed has exactly the recorded content (or is absent if
  it was deleted);
* a file with an operation in flight is in one of the states the operation allows (rename:
  old or new content, nothing in between);
* every file and directory in the volume reads without error;
* the daemon log of the recovery mount has no verification failure and no error.

Limitation (for the report): the daemon is killed but the backing filesystem is not, so this
checks the ordering of sealfs's own writes, not power loss of the backing disk. And the
checkpoint rollover (at 4 MiB of journal at the least) is not reached: there is no mount option to lower
that threshold.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.backing import force_unmount, is_mounted, process_gone, unmount
from tests.conftest import new_volume

pytestmark = [pytest.mark.mount, pytest.mark.slow]

ITERATIONS = int(os.environ.get("SEALFS_CRASH_ITERATIONS", "12"))
BS = 16384

WRITER = r"""
import hashlib, json, os, random, sys
mnt, logpath, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
log = open(logpath, "a", buffering=1)
def note(**kw):
    log.write(json.dumps(kw) + "\n")
    log.flush()
def sha(b):
    return hashlib.sha256(b).hexdigest()
def fsync_path(p, flags=os.O_RDONLY):
    fd = os.open(p, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
def write_file(p, data):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:  # random chunk sizes: partial blocks, block-crossing writes
            n = os.write(fd, view[:rng.choice([100, 4096, 10000, 65536, 200000])])
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
def payload():
    n = rng.choice([0, 1, 500, 16383, 16384, 16385, 40000, 100000, 250000])
    return rng.randbytes(n)
dirs = ["d0", "d1", "d1/e", "d2"]
for d in dirs:
    os.makedirs(os.path.join(mnt, d), exist_ok=True)
fsync_path(mnt, os.O_RDONLY | os.O_DIRECTORY)
noise = os.open(os.path.join(mnt, "d2", f"noise-{seed}"), os.O_WRONLY | os.O_CREAT, 0o644)
def existing():
    out = []
    for d in dirs:
        for n in os.listdir(os.path.join(mnt, d)):
            if n.startswith("f"):
                out.append(f"{d}/{n}")
    return out
counter = 0
while True:
    counter += 1
    os.write(noise, rng.randbytes(rng.choice([1000, 70000, 300000])))  # never fsync'd
    have = existing()
    op = rng.choice(["new", "new", "replace", "overwrite", "unlink"]) if have else "new"
    if op == "new":
        name = f"{rng.choice(dirs)}/f{seed}-{counter}"
        data = payload()
        note(ev="intent", op="new", name=name)
        write_file(os.path.join(mnt, name), data)
        fsync_path(os.path.dirname(os.path.join(mnt, name)), os.O_RDONLY | os.O_DIRECTORY)
        note(ev="done", name=name, sha=sha(data))
    elif op == "replace":
        name = rng.choice(have)
        p = os.path.join(mnt, name)
        tmp = os.path.join(os.path.dirname(p), f"tmp{seed}-{counter}")
        data = payload()
        write_file(tmp, data)
        note(ev="intent", op="replace", name=name, new=sha(data))
        os.rename(tmp, p)
        fsync_path(os.path.dirname(p), os.O_RDONLY | os.O_DIRECTORY)
        note(ev="done", name=name, sha=sha(data))
    elif op == "overwrite":
        name = rng.choice(have)
        p = os.path.join(mnt, name)
        with open(p, "rb") as f:
            old = bytearray(f.read())
        off = rng.randrange(0, len(old) + 1)
        chunk = rng.randbytes(rng.choice([1, 3000, 16384, 50000]))
        note(ev="intent", op="overwrite", name=name)
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, chunk, off)
            os.fsync(fd)
        finally:
            os.close(fd)
        new = old[:off] + chunk + old[off + len(chunk):]
        note(ev="done", name=name, sha=sha(bytes(new)))
    else:
        name = rng.choice(have)
        p = os.path.join(mnt, name)
        note(ev="intent", op="unlink", name=name)
        os.unlink(p)
        fsync_path(os.path.dirname(p), os.O_RDONLY | os.O_DIRECTORY)
        note(ev="done", name=name, sha=None)
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read()


class Model:
    """What the volume must hold, from the writer's log: settled files and pending ops."""

    def __init__(self) -> None:
        self.settled: dict[str, str | None] = {}  # name -> sha, None = must not exist
        self.pending: dict[str, dict[str, object]] = {}

    def apply(self, lines: list[str]) -> None:
        for line in lines:
            if not line.endswith("\n"):
                break  # the writer died mid-line
            ev = json.loads(line)
            if ev["ev"] == "intent":
                self.pending[ev["name"]] = ev
            else:
                self.pending.pop(ev["name"], None)
                self.settled[ev["name"]] = ev["sha"]

    def verify(self, mnt: Path) -> list[str]:
        """Problems found (empty = fine); afterwards the observed state is the baseline."""
        problems = []
        for name, want in self.settled.items():
            if name in self.pending:
                continue
            p = mnt / name
            if want is None:
                if p.exists():
                    problems.append(f"{name}: deleted (fsync'd) but exists")
            elif not p.exists():
                problems.append(f"{name}: fsync'd but missing")
            elif sha(read_all(p)) != want:
                problems.append(f"{name}: content differs from its fsync'd state")
        for name, ev in self.pending.items():
            p = mnt / name
            have = sha(read_all(p)) if p.exists() else None
            if ev["op"] == "replace" and have not in (self.settled.get(name), ev["new"]):
                problems.append(f"{name}: torn rename (neither old nor new content)")
            if ev["op"] == "unlink" and have not in (self.settled.get(name), None):
                problems.append(f"{name}: unlink in flight, content changed")
            self.settled[name] = have
        self.pending.clear()
        return problems


def read_everything(mnt: Path) -> list[str]:
    """Walk the whole tree and read every file; return the failures."""
    failures = []
    for root, dirs, files in os.walk(mnt, onerror=lambda e: failures.append(f"walk: {e}")):
        for name in files:
            p = Path(root) / name
            try:
                read_all(p)
            except OSError as e:
                failures.append(f"{p.relative_to(mnt)}: {e}")
        for name in dirs:
            try:
                os.stat(Path(root) / name)
            except OSError as e:
                failures.append(f"{name}: {e}")
    return failures


def bad_log_lines(text: str) -> list[str]:
    return [
        ln
        for ln in text.splitlines()
        if " ERROR " in ln or "verification" in ln or "Traceback" in ln
    ]


def test_sigkill_during_heavy_writes(tmp_path: Path) -> None:
    vol = new_volume(tmp_path, "--block-size", str(BS))
    wlog = tmp_path / "writer.jsonl"  # outside the volume
    wlog.touch()
    model = Model()
    rng = random.Random(int(os.environ.get("SEALFS_CRASH_SEED", str(time.time_ns()))))
    seed_note = f"(set SEALFS_CRASH_SEED to reproduce; iterations={ITERATIONS})"
    writer: subprocess.Popen[bytes] | None = None
    done_ops = 0
    try:
        vol.mount("--commit-interval", "0.5")
        for it in range(ITERATIONS):
            log_start = len(vol.log_text())
            wlog_start = wlog.stat().st_size
            writer = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WRITER,
                    str(vol.mnt),
                    str(wlog),
                    str(rng.randrange(1 << 30)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(rng.uniform(0.4, 2.5))
            pid = vol.daemon_pid()
            os.kill(pid, signal.SIGKILL)
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                writer.kill()
                writer.wait()
            assert writer.returncode != 0, "the writer should have died with the mount"
            deadline = time.monotonic() + 10
            while not process_gone(pid):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            force_unmount(vol)
            assert not is_mounted(vol.mnt)
            with open(wlog) as f:
                f.seek(wlog_start)
                lines = f.readlines()
            model.apply(lines)
            done_ops += sum('"done"' in ln for ln in lines)

            vol.mount("--commit-interval", "0.5")  # must mount cleanly: the daemon's report
            problems = model.verify(vol.mnt) + read_everything(vol.mnt)
            recovery_log = vol.log_text()[log_start:]
            problems += [f"log: {ln}" for ln in bad_log_lines(recovery_log)]
            assert not problems, f"iteration {it} {seed_note}:\n" + "\n".join(problems)
        print(f"crash test: {done_ops} completed operations, {len(model.settled)} files")
        assert done_ops >= ITERATIONS, f"the writer completed only {done_ops} operations"
        unmount(vol)
        vol.mount()  # and once more after a clean unmount
        problems = model.verify(vol.mnt) + read_everything(vol.mnt)
        assert not problems, "\n".join(problems)
        assert not bad_log_lines(vol.log_text()), vol.log_text()
        unmount(vol)
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        force_unmount(vol)
