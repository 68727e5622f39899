"""The freshness anchor races the commits: it may only ever name a durable (commit, head) pair.

A real KMS on 127.0.0.1 and the filesystem core in-process (fast enough for thousands of
commit/anchor races): commits run while the anchor task advances the anchor as fast as it
can, then the "machine crashes" (the filesystem is dropped without a clean close) and the next
mount checks the disk against the anchor. An anchor that paired commit N with commit N-1's
head would refuse that honest disk as forked.
"""

from __future__ import annotations

import errno
import http.server
import inspect
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from sealfs.fs.core import Filesystem
from sealfs.fs.errors import FsError
from sealfs.fs.freshness import Freshness
from sealfs.kms import protocol as P
from sealfs.kms.client import KmsClient
from sealfs.volume.anchor import KmsAnchor, RollbackError
from tests.core.harness import open_fs

from .conftest import APP_A, KmsProcess, attester

LIVES = 1000  # crash + KMS-checked remount this many times
ADVANCES_PER_LIFE = 2  # the crash comes right after the last one, with commits in flight
DATA = os.urandom(64 << 10)  # carried in the commit: hashing its frame takes a while
#: checkpoints every few commits: short replays, and checkpoints race the anchor too
SMALL_JOURNAL = {
    "checkpoint_min_journal": 256 << 10,
    "carried_in_memory": 128 << 10,
    "journal_max": 1 << 20,
}


def kms_client(kms: KmsProcess) -> KmsClient:
    return KmsClient(kms.url, APP_A, attester(), trusted_keys=[kms.public_key], deadline_s=30)


@pytest.fixture
def fine_switching() -> Iterator[None]:
    """Let the interpreter switch threads far more often than every 5 ms, so that the commit's
    worker thread and the trio thread interleave at (nearly) every bytecode."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


async def live_and_crash(fs: Filesystem, client: KmsClient, life: int) -> None:
    """Mount against the anchor (raises RollbackError on a false alarm), commit without pause
    while the anchor advances, and crash (drop everything without a clean close) right after
    an advance: what the KMS holds then is what the next mount checks."""
    fs.anchor = KmsAnchor(client, fs.vid)
    state = await fs.load()
    node = await (fs.lookup(1, b"f") if life else fs.create(1, b"f", 0o100644, 0, 0))

    async def committer() -> None:
        for i in range(1 << 30):
            await fs.write(node, (i % 64) * len(DATA), DATA)
            await fs.fsync(node)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer)
        while fs.metalog.seq == state.seq:  # commits are flowing
            await trio.sleep(0)
        for _ in range(ADVANCES_PER_LIFE):  # what anchor_loop does, without the pause
            await fs.freshness.advance()
        nursery.cancel_scope.cancel()
    fs.metalog.close()  # the crash: no final commit, no final anchor


@pytest.mark.slow
def test_anchor_never_pairs_a_commit_with_another_head(
    tmp_path: Path, kms: KmsProcess, fine_switching: None
) -> None:
    client = kms_client(kms)
    backing = tmp_path / "vol"
    for life in range(LIVES):
        try:
            trio.run(live_and_crash, open_fs(backing, **SMALL_JOURNAL), client, life)
        except RollbackError as e:
            raise AssertionError(f"false alarm at life {life}: {e}") from None
    fs = open_fs(backing)
    fs.anchor = KmsAnchor(client, fs.vid)
    state = trio.run(fs.load, False)  # the last crash, checked read-only
    assert state.seq >= fs.anchor.anchored[0] >= LIVES  # the anchor really moved each life


def test_advance_compares_heads_on_equal_epochs(kms: KmsProcess) -> None:
    """Same commit number, other head: a fork, refused locally and never skipped; an older
    commit than the anchored one: a rollback."""
    anchor = KmsAnchor(kms_client(kms), os.urandom(16))
    assert anchor.fetch() == (0, b"")
    head = os.urandom(32)
    anchor.advance(7, head)
    anchor.advance(7, head)  # the same commit again: nothing to do
    with pytest.raises(RollbackError) as e:
        anchor.advance(7, os.urandom(32))
    assert e.value.reason == "forked"
    with pytest.raises(RollbackError) as e:
        anchor.advance(6, os.urandom(32))
    assert e.value.reason == "rolled back"
    assert anchor.fetch() == (7, head)  # the KMS still holds the honest commit


def waits_in(thread: threading.Thread) -> str | None:
    """Where ``thread`` waits for a lock in an anchor advance: "anchor" (the root already
    read, the KMS exchange next), "root" (not read yet), or None (still on its way)."""
    frame = sys._current_frames().get(thread.ident or 0)
    if frame is None:
        return None
    if frame.f_code is KmsAnchor.advance.__code__:
        return "anchor"
    lines, first = inspect.getsourcelines(Freshness.anchor_root)
    before_root = [first + i for i, line in enumerate(lines) if "with self._advancing" in line]
    if frame.f_code is Freshness.anchor_root.__code__ and frame.f_lineno in before_root:
        return "root"
    return None


def test_an_older_root_never_fails_a_newer_advance(tmp_path: Path, kms: KmsProcess) -> None:
    """The periodic advance and a group round (anchor-on-fsync) run in threads of their own,
    both queued behind an exchange in flight, the second after another commit. Whichever
    goes first, neither may fail as a "rollback": that would be a false alarm, and EIO for
    fsyncs whose commits are anchored."""

    async def race() -> None:
        fs = open_fs(tmp_path / "vol")
        fs.anchor = KmsAnchor(kms_client(kms), fs.vid)
        await fs.load()
        node = await fs.create(1, b"f", 0o100644, 0, 0)
        errors: list[BaseException] = []

        def advance() -> None:
            try:
                fs.freshness.anchor_root()
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)

        for i in range(20):
            await fs.write(node, 0, b"%d" % i)
            await fs.fsync(node)
            with fs.anchor._lock:  # an exchange in flight: both advances queue behind it
                older = threading.Thread(target=advance)
                older.start()
                while waits_in(older) != "anchor":
                    await trio.sleep(0)
                await fs.write(node, 0, b"%d" % -i)
                await fs.fsync(node)
                newer = threading.Thread(target=advance)
                newer.start()
                while waits_in(newer) is None:
                    await trio.sleep(0)
                # it may not read the root before the older advance is done: it would then
                # go first or second by chance
                assert waits_in(newer) == "root"
            older.join()
            newer.join()
            assert not errors, errors
            assert fs.anchor.anchored[0] == fs.metalog.seq
        await fs.close()

    trio.run(race)


class ForgedRefusal(http.server.BaseHTTPRequestHandler):
    """The host's network in the KMS's place: hands out nonces, then answers every request
    with an unsigned "policy denied" (no KMS key needed to write one)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/nonce":
            status, body = 200, {"ok": True, "nonce": os.urandom(P.NONCE_SIZE).hex()}
        else:
            status, body = 403, {"ok": False, "error": "policy_denied", "message": "forged"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_a_forged_refusal_fails_fsyncs_but_never_the_filesystem(tmp_path: Path) -> None:
    """An unsigned attestation refusal is the network's to forge: it fails the fsyncs waiting
    for the anchor (EIO) and is logged by the periodic advance, but must not end the anchor
    task (and with it the mount)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ForgedRefusal)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    client = KmsClient(url, APP_A, attester(), trusted_keys=[bytes(32)], deadline_s=5)

    async def forged() -> None:
        fs = open_fs(tmp_path / "vol")
        await fs.load()
        fs.anchor = KmsAnchor(client, fs.vid)
        fs.freshness.on_fsync = True
        node = await fs.create(1, b"f", 0o100644, 0, 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.freshness.loop)
            for i in range(2):  # the round task lives on after the first refusal
                await fs.write(node, 0, b"%d" % i)
                with pytest.raises(FsError) as e:
                    await fs.fsync(node)
                assert e.value.errno == errno.EIO
            await fs.freshness.advance()  # logged, not raised
            nursery.cancel_scope.cancel()
        fs.anchor = None
        await fs.close()

    try:
        trio.run(forged)
    finally:
        server.shutdown()
        server.server_close()


def test_an_fsync_after_the_round_task_ended_fails_rather_than_hangs(
    tmp_path: Path, kms: KmsProcess
) -> None:
    """The round task ended between rounds (the mount is going away): an fsync that then
    waits for an anchor gets EIO, not a wait for a round that will never come."""

    async def late() -> None:
        fs = open_fs(tmp_path / "vol")
        fs.anchor = KmsAnchor(kms_client(kms), fs.vid)
        await fs.load()
        fs.freshness.on_fsync = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.freshness.loop)
            await trio.testing.wait_all_tasks_blocked()  # idle, between rounds
            nursery.cancel_scope.cancel()
        node = await fs.create(1, b"f", 0o100644, 0, 0)
        with trio.fail_after(60), pytest.raises(FsError) as e:  # a hang fails, not a speed
            await fs.fsync(node)
        assert e.value.errno == errno.EIO
        await fs.close()

    trio.run(late)
