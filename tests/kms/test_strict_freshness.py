"""``sealfs mount --anchor-on-fsync``: an fsync returns only once its commit is anchored at the
KMS, so a host that drops fsync'd commits is caught (real FUSE mounts, a real KMS on 127.0.0.1).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sealfs.volume.header import load_header
from tests.backing import fsync_path, layout, process_gone, truncate
from tests.conftest import Volume, sealfs

from .conftest import APP_A, KmsProcess, KmsState, start_kms
from .test_volume_anchor import kmount, kms_args, kvol  # noqa: F401 - fixture

pytestmark = pytest.mark.mount

STRICT = ("--anchor-on-fsync", "--commit-interval", "3600")  # only fsyncs commit


def write_and_fsync(mnt: Path, names: list[str]) -> None:
    for name in names:
        (mnt / name).write_text(f"fsync'd {name}")
        fsync_path(mnt / name)


def kill_daemon(vol: Volume) -> None:
    """SIGKILL the daemon (no final commit, no final anchor) and detach its mount."""
    pid = vol.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not process_gone(pid):
        assert time.monotonic() < deadline, f"daemon {pid} did not die"
        time.sleep(0.02)
    vol.force_unmount()


def journal_start(vol: Volume) -> int:
    """Commit a file (its record and the root's ride in the journal frame, so the commits
    that follow supersede no object file a truncation would need) and return the number of
    journal frames so far."""
    write_and_fsync(vol.mnt, ["base"])
    return len(layout(vol.backing, vol.key).journal_frames)


def drop_tail_commits(vol: Volume, keep: int) -> int:
    """Cut the journal after its first ``keep`` frames, at a frame boundary, as a host that
    drops the last writes would (it looks like a crash before them); returns the number of
    frames dropped."""
    lay = layout(vol.backing, vol.key)
    frames = lay.journal_frames
    assert len(frames) > keep, "nothing to drop"
    truncate(lay.journal, frames[keep][0])
    return len(frames) - keep


def anchored_epoch(state: KmsState, vol: Volume) -> int:
    rec = state.store.get_epoch(state.macs, APP_A, load_header(vol.backing).volume_id)
    assert rec is not None
    return rec.epoch


@contextmanager
def stopped(server: KmsProcess) -> Iterator[None]:
    """The KMS process frozen (SIGSTOP): connections wait, nothing is answered."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_strict_mode_catches_dropped_fsyncd_commits(
    kvol: Volume,  # noqa: F811 - the fixture
    kms: KmsProcess,
) -> None:
    kmount(kvol, kms, *STRICT)
    before = journal_start(kvol)
    write_and_fsync(kvol.mnt, ["a", "b", "c"])
    kill_daemon(kvol)
    assert drop_tail_commits(kvol, before + 1) >= 2  # "b" and "c" were fsync'd
    res = kmount(kvol, kms, check=False)
    assert res.returncode == 5, res.stderr
    assert "rolled back" in res.stderr and "Traceback" not in res.stderr
    assert not os.path.ismount(kvol.mnt)


def test_default_mode_leaves_the_window_open(
    kvol: Volume,  # noqa: F811 - the fixture
    kms: KmsProcess,
) -> None:
    """Without the flag the anchor lags the fsyncs (here: the KMS is frozen while they run, so
    the periodic advance cannot happen either): the same attack goes unseen."""
    kmount(kvol, kms, "--commit-interval", "3600")
    before = journal_start(kvol)
    with stopped(kms):  # fsyncs need no KMS by default
        write_and_fsync(kvol.mnt, ["a", "b", "c"])
        kill_daemon(kvol)  # an advance blocked in its nonce request dies with the daemon
    drop_tail_commits(kvol, before)
    kmount(kvol, kms)  # accepted: the host rolled back fsync'd data unseen
    assert (kvol.mnt / "base").exists()
    assert not any((kvol.mnt / n).exists() for n in ("a", "b", "c"))
    kvol.umount()


def test_concurrent_fsyncs_share_one_advance(
    kvol: Volume,  # noqa: F811 - the fixture
    kms: KmsProcess,
    state: KmsState,
) -> None:
    """N fsyncs wait while the KMS is frozen; once it answers they are released by at most
    two advances (the one in flight and one for all the others), and each is anchored."""
    n = 8
    args = [*kms_args(kms, deadline=300), "--kms-timeout", "300"]
    sealfs(
        "mount", str(kvol.backing), str(kvol.mnt), *args, "--log-file", str(kvol.log),
        *STRICT, "--debug",
    )  # fmt: skip
    advances_before = kms.log().count(" is now ")
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            write_and_fsync(kvol.mnt, [f"t{i}"])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    with stopped(kms):
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120  # an event, not a rate: every fsync is waiting
        while kvol.log_text().count("waits for the KMS anchor") < n:
            assert time.monotonic() < deadline, kvol.log_text()[-2000:]
            time.sleep(0.02)
    for t in threads:
        t.join()
    assert not errors, errors
    advances = kms.log().count(" is now ") - advances_before
    assert 1 <= advances <= 3 < n  # the round in flight, one for the rest, maybe a periodic one
    rounds = [int(k) for k in re.findall(r"anchored commit \d+ for (\d+) waiting", kvol.log_text())]
    assert sum(rounds) == n and len(rounds) <= 2, rounds
    kill_daemon(kvol)  # every fsync returned: the last commit on disk is anchored
    assert anchored_epoch(state, kvol) >= layout(kvol.backing, kvol.key).seq


def test_kms_down_fails_fsync_with_eio_then_anchors(
    kvol: Volume,  # noqa: F811 - the fixture
    state: KmsState,
) -> None:
    server = start_kms(state, "--allow-simulated", log_name="kms-strict-outage.log")
    deadline = 3.0
    args = kms_args(server, deadline=deadline)
    try:
        sealfs(
            "mount", str(kvol.backing), str(kvol.mnt), *args, "--log-file", str(kvol.log),
            *STRICT,
        )  # fmt: skip
        write_and_fsync(kvol.mnt, ["before"])
        server.stop()
        (kvol.mnt / "during").write_text("durable, not anchored")
        start = time.monotonic()
        with pytest.raises(OSError) as raised:
            fsync_path(kvol.mnt / "during")
        # an upper bound for the error path (the client deadline plus generous slack), not a
        # rate: without the deadline this would wait forever
        assert time.monotonic() - start < deadline + 30
        assert raised.value.errno == errno.EIO
        assert "durable on disk but NOT anchored" in kvol.log_text()
        assert (kvol.mnt / "during").read_text() == "durable, not anchored"
        server = start_kms(state, "--allow-simulated", log_name="kms-back.log", port=server.port)
        fsync_path(kvol.mnt / "during")  # nothing new to commit: only the anchor was missing
        kill_daemon(kvol)
        assert anchored_epoch(state, kvol) >= layout(kvol.backing, kvol.key).seq
        sealfs("mount", str(kvol.backing), str(kvol.mnt), *args, "--log-file", str(kvol.log))
        assert (kvol.mnt / "during").read_text() == "durable, not anchored"
        kvol.umount()
    finally:
        server.stop()


def test_strict_mode_needs_a_kms_unlock(
    kvol: Volume,  # noqa: F811 - the fixture
) -> None:
    res = sealfs(
        "mount", str(kvol.backing), str(kvol.mnt), "--key-file", str(kvol.key),
        "--anchor-on-fsync", check=False,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "--anchor-on-fsync needs a KMS unlock" in res.stderr and "Traceback" not in res.stderr
    assert not os.path.ismount(kvol.mnt)
