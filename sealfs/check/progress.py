"""A progress line on a terminal (bytes and objects, rate, ETA); silent otherwise.

Written to standard error so ``--json`` output on standard output stays clean, and only when
standard error is a terminal, so logs and pipes never fill with carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _duration(s: float) -> str:
    s = int(s)
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def render(
    phase: str,
    done_bytes: int,
    total_bytes: int,
    done_objects: int,
    total_objects: int,
    elapsed: float,
) -> str:
    """One progress line (pure, so it is testable without a terminal)."""
    rate = done_bytes / elapsed if elapsed > 0 else 0.0
    left = total_bytes - done_bytes
    eta = _duration(left / rate) if rate > 0 and left > 0 else "--:--"
    pct = 100.0 * done_bytes / total_bytes if total_bytes else 100.0
    return (
        f"{phase}: {pct:5.1f}%  {_size(done_bytes)} / {_size(total_bytes)}  "
        f"{done_objects}/{total_objects} objects  {_size(rate)}/s  ETA {eta}"
    )


class Progress:
    """Call :meth:`start`, then :meth:`advance` as work completes, then :meth:`finish`."""

    def __init__(
        self, stream: TextIO | None = None, enabled: bool | None = None, interval: float = 0.2
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.phase = ""
        self.total_bytes = self.total_objects = 0
        self.done_bytes = self.done_objects = 0
        self._t0 = self._last = 0.0
        self._width = 0

    def start(self, phase: str, total_bytes: int, total_objects: int) -> None:
        self.phase, self.total_bytes, self.total_objects = phase, total_bytes, total_objects
        self.done_bytes = self.done_objects = 0
        self._t0 = self._last = time.monotonic()
        self._draw(force=True)

    def advance(self, nbytes: int, nobjects: int) -> None:
        self.done_bytes += nbytes
        self.done_objects += nobjects
        self._draw()

    def note(self, phase: str) -> None:
        """A phase without a measurable total (reading metadata)."""
        if self.enabled:
            self._write(f"{phase}...")

    def finish(self) -> None:
        if self.enabled and self._width:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self._write(
            render(
                self.phase,
                self.done_bytes,
                self.total_bytes,
                self.done_objects,
                self.total_objects,
                now - self._t0,
            )
        )

    def _write(self, line: str) -> None:
        pad = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)
