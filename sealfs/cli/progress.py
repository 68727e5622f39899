"""A progress line on a terminal (bytes and items, rate, ETA) for long commands; silent
otherwise.

Work below the command line reports through the :class:`sealfs.meter.Meter` protocol; this is
the one that draws. It writes to standard error, so ``--json`` output and a bundle stream on
standard output stay clean, and by default only when standard error is a terminal and not with
``--json``, so logs and pipes never fill with carriage returns. The line is redrawn at most
four times a second and ended with a newline when the phase finishes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

import click

#: ``--progress/--no-progress``: None when neither is given (then the terminal decides)
progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress line on standard error (default: only when it is a terminal, "
    "and not with --json).",
)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(s: float) -> str:
    s = int(s)
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def render(
    phase: str,
    done_bytes: int,
    total_bytes: int | None,
    done_items: int,
    total_items: int,
    elapsed: float,
    unit: str = "objects",
) -> str:
    """One progress line (pure, so it is testable without a terminal). The share done, and
    from it the ETA, is of the bytes when their total is known, else of the items."""
    if total_bytes is not None:
        frac = done_bytes / total_bytes if total_bytes else 1.0
        amount = f"{_size(done_bytes)} / {_size(total_bytes)}"
    else:
        frac = done_items / total_items if total_items else 1.0
        amount = _size(done_bytes)
    frac = min(frac, 1.0)
    rate = done_bytes / elapsed if elapsed > 0 else 0.0
    eta = _duration(elapsed * (1 - frac) / frac) if 0 < frac < 1 else "--:--"
    return (
        f"{phase}: {100 * frac:5.1f}%  {amount}  {done_items}/{total_items} {unit}  "
        f"{_size(rate)}/s  ETA {eta}"
    )


class Progress:
    """A :class:`sealfs.meter.Meter` drawing one line on ``stream`` (standard error). Used as
    a context manager, it ends a line left open by work that failed, so the error message
    that follows starts on a line of its own."""

    def __init__(
        self,
        enabled: bool,
        stream: TextIO | None = None,
        unit: str = "objects",
        interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.unit = unit
        self.interval = interval
        self.clock = clock
        self.phase = ""
        self.total_bytes: int | None = 0
        self.total_items = self.done_bytes = self.done_items = 0
        self._t0 = self._last = 0.0
        self._width = 0

    @classmethod
    def on_stderr(cls, requested: bool | None, as_json: bool, unit: str = "objects") -> Progress:
        """As ``--progress/--no-progress`` asked, else only on a terminal and not with
        ``--json`` (a script reading the JSON wants nothing else). Within a command, the
        line is ended when the command ends, however it ends."""
        enabled = requested if requested is not None else not as_json and sys.stderr.isatty()
        meter = cls(enabled, unit=unit)
        ctx = click.get_current_context(silent=True)
        return ctx.with_resource(meter) if ctx is not None else meter

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.end()

    def start(self, phase: str, total_bytes: int | None, total_items: int) -> None:
        self.phase, self.total_bytes, self.total_items = phase, total_bytes, total_items
        self.done_bytes = self.done_items = 0
        self._t0 = self._last = self.clock()
        self._draw(force=True)

    def advance(self, nbytes: int, nitems: int) -> None:
        self.done_bytes += nbytes
        self.done_items += nitems
        self._draw()

    def note(self, phase: str) -> None:
        if self.enabled:
            self._write(f"{phase}...")

    def finish(self) -> None:
        if self.enabled and self._width:
            self._draw(force=True)
        self.end()

    def end(self) -> None:
        """End the line if one is open (a note, or a phase cut short), so what the command
        prints next starts on a line of its own."""
        if self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self._write(
            render(
                self.phase,
                self.done_bytes,
                self.total_bytes,
                self.done_items,
                self.total_items,
                now - self._t0,
                self.unit,
            )
        )

    def _write(self, line: str) -> None:
        pad = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)
