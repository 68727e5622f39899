"""The worker threads that do the core's blocking work (docs/concurrency.md).

Sealing, opening and every file-system call on the backing store run in threads under one
``CapacityLimiter``, so the trio thread never blocks and the number of threads stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")
U = TypeVar("U")


class Workers:
    """Runs blocking functions in worker threads, at most ``threads`` at a time."""

    def __init__(self, threads: int) -> None:
        self.limiter = trio.CapacityLimiter(threads)
        #: the mount's nursery, for background jobs (write-back, read-ahead, deletions) while
        #: mounted; without one (repair, tests) they run inline
        self.nursery: trio.Nursery | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def halves(self, fn: Callable[[list[U]], list[T]], items: list[U]) -> list[T]:
        """``fn`` over two halves of ``items`` in two worker threads (file system calls and
        sealing overlap); results in order, and the first error raised as itself."""
        if len(items) < 8:
            return await self.run(fn, items) if items else []
        half = len(items) // 2
        parts: list[list[T]] = [[], []]
        errors: list[Exception] = []

        async def run(i: int, part: list[U]) -> None:
            try:
                parts[i] = await self.run(fn, part)
            except Exception as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, 0, items[:half])
            nursery.start_soon(run, 1, items[half:])
        if errors:
            raise errors[0]
        return parts[0] + parts[1]
