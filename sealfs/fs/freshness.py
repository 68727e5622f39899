"""Freshness: the disk checked against, and kept in step with, its anchor at the KMS.

The rules are in :mod:`sealfs.volume.anchor`. At load the replayed history must contain the
anchored commit; after that the anchor advances to the last durable commit from a task of its
own (and once after load and at unmount), never under the commit lock, so a KMS out of reach
never stalls a commit: checkpoints keep the heads back to the last anchored commit meanwhile.
"""

from __future__ import annotations

import logging

import trio

from sealfs.errors import KmsError
from sealfs.fs.metalog import MetaLog, MetaState
from sealfs.fs.workers import Workers
from sealfs.volume.anchor import KmsAnchor, RollbackError, verify_fresh

log = logging.getLogger("sealfs.fs")


class Freshness:
    """Verifies a loaded disk against ``anchor`` (if any) and advances the anchor."""

    def __init__(self, metalog: MetaLog, workers: Workers, interval: float) -> None:
        self.metalog = metalog
        self.workers = workers
        self.interval = interval  # seconds between advances while mounted
        self.anchor: KmsAnchor | None = None

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
        except KmsError as e:
            log.error("could not advance the freshness anchor: %s", e)
        except RollbackError as e:
            log.error("the KMS refused to advance the freshness anchor: %s", e)

    async def loop(self) -> None:
        """Advance the anchor every ``interval`` seconds, outside the commit lock: commits go
        on while the KMS is slow or away."""
        while self.anchor is not None:
            await trio.sleep(self.interval)
            await self.advance()
