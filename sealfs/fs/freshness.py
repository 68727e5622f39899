"""Freshness: the disk checked against, and kept in step with, its anchor at the KMS.

The rules are in :mod:`sealfs.volume.anchor`. At load the replayed history must contain the
anchored commit; after that the anchor advances to the last durable commit from a task of its
own (and once after load and at unmount), never under the commit lock, so a KMS out of reach
never stalls a commit: checkpoints keep the heads back to the last anchored commit meanwhile.

With anchor-on-fsync (``sealfs mount --anchor-on-fsync``) an fsync also waits until its commit
is anchored, group-committed: a task of its own, woken by the first waiter, anchors the newest
durable commit (which covers every fsync waiting by then) in one advance and releases them all;
fsyncs arriving during that advance go in the next one. A KMS that refuses or is out of reach
fails every waiting fsync with EIO (the commits stay durable on disk, only not anchored) within
one client deadline; the next fsync tries again.
"""

from __future__ import annotations

import errno
import logging
import threading

import trio

from sealfs.errors import AttestationError, KmsError
from sealfs.fs.errors import FsError
from sealfs.fs.metalog import MetaLog, MetaState
from sealfs.fs.workers import Workers
from sealfs.volume.anchor import KmsAnchor, RollbackError, verify_fresh

log = logging.getLogger("sealfs.fs")


class _Round:
    """One group advance: the fsyncs that wait for it, and how it ended."""

    def __init__(self) -> None:
        self.wanted = trio.Event()  # an fsync waits for this round
        self.done = trio.Event()
        self.waiters = 0
        self.error: Exception | None = None

    def finish(self, error: Exception | None) -> None:
        self.error = error
        self.done.set()


class Freshness:
    """Verifies a loaded disk against ``anchor`` (if any) and advances the anchor."""

    def __init__(self, metalog: MetaLog, workers: Workers, interval: float) -> None:
        self.metalog = metalog
        self.workers = workers
        self.interval = interval  # seconds between advances while mounted
        self.anchor: KmsAnchor | None = None
        #: anchor-on-fsync: an fsync returns only once its commit is anchored (set by the
        #: mount, with an anchor)
        self.on_fsync = False
        self._next = _Round()
        self._advancing = threading.Lock()

    async def verify(self, state: MetaState, override: bool) -> int | None:
        """Raise RollbackError unless the replayed ``state`` contains the anchored commit.
        With ``override`` (the operator's --allow-rollback, logged) return the anchored
        commit number instead: the volume's history must then continue past it."""
        if self.anchor is None:
            return None
        anchored = await self.workers.run(self.anchor.fetch)
        try:
            verify_fresh(state.seq, state.heads, anchored)
        except RollbackError as e:
            if not override:
                raise
            log.warning("OVERRIDE: mounting despite a failed freshness check (%s)", e)
            return anchored[0]
        return None

    def anchor_root(self) -> None:
        """Anchor the last durable commit (one snapshot of the root, never a number with
        another commit's head); its older heads need not be kept after that. Runs in a
        thread of its own, not an I/O thread: a KMS call can take the whole client deadline."""
        assert self.anchor is not None
        # One at a time, each reading the root under the lock: otherwise the periodic advance
        # and a group round could each read a root, the newer go first, and the older then
        # fail as a "rollback" (a false alarm, and EIO for fsyncs already anchored).
        with self._advancing:
            seq, head = self.metalog.root
            self.anchor.advance(seq, head)
            self.metalog.anchored(seq)

    async def advance(self) -> None:
        """Anchor the last durable commit at the KMS; a failure is logged (the heads since
        the last anchored commit are kept meanwhile, so nothing depends on it succeeding)."""
        if self.anchor is None:
            return
        try:
            await trio.to_thread.run_sync(self.anchor_root)
        except (KmsError, AttestationError) as e:  # the network's to forge: never fatal
            log.error("could not advance the freshness anchor: %s", e)
        except RollbackError as e:
            log.error("the KMS refused to advance the freshness anchor: %s", e)

    async def loop(self) -> None:
        """Advance the anchor every ``interval`` seconds, outside the commit lock: commits go
        on while the KMS is slow or away; with anchor-on-fsync, run the group advances too."""
        async with trio.open_nursery() as nursery:
            if self.on_fsync:
                nursery.start_soon(self._rounds)
            while self.anchor is not None:
                await trio.sleep(self.interval)
                await self.advance()

    async def anchored_through(self, seq: int) -> None:
        """With anchor-on-fsync, return once the durable commit ``seq`` is anchored at the KMS
        (at once without the mode); raise FsError(EIO) if the KMS refused or was out of reach
        (the commit stays durable on disk; the next fsync tries again)."""
        if not self.on_fsync or self.anchor is None:
            return
        while self.anchor.anchored[0] < seq:
            joined = self._next
            joined.waiters += 1
            log.debug("fsync of commit %d waits for the KMS anchor", seq)
            joined.wanted.set()
            await joined.done.wait()
            if joined.error is not None:
                raise FsError(errno.EIO)

    async def _rounds(self) -> None:
        """Group advances: each anchors the newest durable commit, read as one pair when the
        round starts (after every waiting fsync's commit was durable), and releases every
        fsync that waited for it. A failure fails the fsyncs that arrived meanwhile too: the
        KMS has just failed within its deadline, so each fsync fails within one deadline."""
        try:
            await self._serve_rounds()
        finally:  # ended (unmount, or a bug) between rounds: an fsync after it may not hang
            if not self._next.done.is_set():
                self._next.finish(FsError(errno.EIO))

    async def _serve_rounds(self) -> None:
        while True:
            await self._next.wanted.wait()
            current, self._next = self._next, _Round()
            try:
                await trio.to_thread.run_sync(self.anchor_root)
            except (KmsError, AttestationError, RollbackError) as e:
                log.error(
                    "fsync failed with EIO: commits up to %d are durable on disk but NOT "
                    "anchored at the KMS (%s); until an anchor succeeds the host could roll "
                    "them back unseen",
                    self.metalog.seq,
                    e,
                )
                failed, self._next = self._next, _Round()
                failed.finish(e)
                current.finish(e)
            except BaseException:  # cancelled (unmounting) or a bug: no waiter may hang
                current.finish(FsError(errno.EIO))  # and the next round's: see _rounds
                raise
            else:
                assert self.anchor is not None
                log.debug(
                    "anchored commit %d for %d waiting fsync(s)",
                    self.anchor.anchored[0],
                    current.waiters,
                )
                current.finish(None)
