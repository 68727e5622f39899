"""How long work reports its progress upward, without knowing who shows it.

The check, a migration and a LUKS bundle copy call a :class:`Meter` as work completes; the
command line passes one that draws a progress line on a terminal
(:class:`sealfs.cli.progress.Progress`), everything else :class:`NoMeter`. Nothing below
sealfs/cli prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class Meter(Protocol):
    """Call :meth:`start` with what a phase will take, :meth:`advance` as it completes, then
    :meth:`finish`. ``total_bytes`` is None when only the number of items is known up front
    (files to copy whose sizes are not read beforehand, to keep the work itself fast)."""

    def start(self, phase: str, total_bytes: int | None, total_items: int) -> None: ...
    def advance(self, nbytes: int, nitems: int) -> None: ...
    def note(self, phase: str) -> None:
        """A phase without a measurable total (reading metadata)."""

    def finish(self) -> None: ...


class NoMeter:
    """Progress nobody watches."""

    def start(self, phase: str, total_bytes: int | None, total_items: int) -> None:
        pass

    def advance(self, nbytes: int, nitems: int) -> None:
        pass

    def note(self, phase: str) -> None:
        pass

    def finish(self) -> None:
        pass


def each(
    meter: Meter,
    phase: str,
    items: Iterable[T],
    total_items: int,
    total_bytes: int | None,
    done: Callable[[], int],
) -> Iterator[T]:
    """Yield ``items`` as the phase ``phase`` of ``meter``, reporting each one finished with
    the growth of ``done()`` (the byte count the work keeps anyway), so a copy loop reports
    its progress without a line of its own."""
    meter.start(phase, total_bytes, total_items)
    last = done()
    for item in items:
        yield item
        now = done()
        meter.advance(now - last, 1)
        last = now
    meter.finish()
