"""Count the FUSE requests a command causes on one mount, per request type, with their latency,
from the kernel's ``fuse:fuse_request_send`` / ``fuse:fuse_request_end`` tracepoints.

Latency is from the kernel queueing a request to the daemon's reply arriving, so it includes
waiting behind other requests; "busy" is the sum over requests. Works for any FUSE filesystem
(gocryptfs too), so the request mix of two filesystems can be compared. Uses a private tracefs
instance, so other tracing on the machine is left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .system import run

TRACEFS = Path("/sys/kernel/tracing")
_EVENT = re.compile(
    r"\s(\d+\.\d+): fuse_request_(send|end): connection \d+ req (\d+) "
    r"(?:opcode \d+ \((\w+)\) len (\d+)|len \d+ error (-?\d+))"
)


@dataclass
class OpStats:
    count: int = 0
    busy: float = 0.0  # seconds, summed over requests
    errors: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # request length -> count (writes)


def _connection(mountpoint: Path) -> int:
    """The kernel dev_t of the mount's FUSE connection (the tracepoint's ``connection``)."""
    dev = os.stat(mountpoint).st_dev
    return (os.major(dev) << 20) | os.minor(dev)


@contextlib.contextmanager
def traced(mountpoint: Path, buffer_kib: int = 131072) -> Iterator[dict[str, OpStats]]:
    """Trace the mount's requests inside the block; the dict is filled when it exits."""
    if not (TRACEFS / "events").is_dir():
        run(["mount", "-t", "tracefs", "nodev", TRACEFS], timeout=30)
    inst = TRACEFS / "instances" / f"sealfs-fuse-{os.getpid()}"
    inst.mkdir()
    stats: dict[str, OpStats] = {}
    try:
        (inst / "buffer_size_kb").write_text(str(buffer_kib))
        (inst / "trace_clock").write_text("mono")
        for ev in ("fuse_request_send", "fuse_request_end"):
            d = inst / "events" / "fuse" / ev
            (d / "filter").write_text(f"connection == {_connection(mountpoint)}")
            (d / "enable").write_text("1")
        (inst / "tracing_on").write_text("1")
        yield stats
        (inst / "tracing_on").write_text("0")
        _parse((inst / "trace").read_text(), stats)
    finally:
        for ev in ("fuse_request_send", "fuse_request_end"):
            with contextlib.suppress(OSError):
                (inst / "events" / "fuse" / ev / "enable").write_text("0")
        inst.rmdir()


def _parse(text: str, stats: dict[str, OpStats]) -> None:
    pending: dict[str, tuple[str, float, int]] = {}
    for m in _EVENT.finditer(text):
        ts, kind, req = float(m[1]), m[2], m[3]
        if kind == "send":
            pending[req] = (m[4].removeprefix("FUSE_").lower(), ts, int(m[5]))
            continue
        if req not in pending:
            continue
        op, t0, length = pending.pop(req)
        s = stats.setdefault(op, OpStats())
        s.count += 1
        s.busy += ts - t0
        s.errors += int(m[6]) != 0
        if op == "write":
            s.sizes[length] = s.sizes.get(length, 0) + 1


def table(stats: dict[str, OpStats], wall: float) -> str:
    """A Markdown table, busiest request type first."""
    total = sum(s.count for s in stats.values())
    lines = [
        f"{total:,} requests in {wall:.2f} s",
        "",
        "| request | count | errors | mean latency (ms) | sum of latencies (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for op, s in sorted(stats.items(), key=lambda kv: -kv[1].busy):
        mean = s.busy / s.count * 1000 if s.count else 0.0
        lines.append(f"| {op} | {s.count:,} | {s.errors:,} | {mean:.3f} | {s.busy:.2f} |")
    writes = stats.get("write")
    if writes and writes.sizes:
        common = sorted(writes.sizes.items(), key=lambda kv: -kv[1])[:3]
        sizes = ", ".join(f"{n:,} × {length:,} B" for length, n in common)
        lines += ["", f"Most common write request lengths (with header): {sizes}"]
    return "\n".join(lines)
