"""Collapsed stacks ("frame;frame;frame count" lines, as py-spy --format raw writes them) to a
self-contained SVG flame graph and a plain-text summary of the hottest functions."""

from __future__ import annotations

import html
import zlib
from collections import Counter
from pathlib import Path


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _short(frame: str) -> str:
    """'func (pkg/mod.py:123)' -> 'func (pkg/mod.py)': functions, not lines."""
    name, sep, loc = frame.partition(" (")
    if not sep or frame.startswith(("process ", "thread (")):
        return frame
    return f"{name} ({loc.rstrip(')').rsplit(':', 1)[0]})"


# Frames where a thread waits rather than works (py-spy's idle detection misses some of them).
WAITS = (
    "WorkerThread._work (trio/_core/_thread_cache.py)",
    "EpollIOManager.get_events",
    "EpollIOManager._epoll_wait",
    "Condition.wait",
    "Event.wait",
    "Thread.join",
)


def _code_frames(frames: list[str]) -> list[str]:
    """Drop py-spy's process and thread pseudo-frames; shorten the rest."""
    return [_short(f) for f in frames if not f.startswith(("process ", "thread ("))]


def summary(
    stacks: list[tuple[list[str], int]], top: int = 30, expected_per_thread: float | None = None
) -> str:
    """Hottest functions. ``expected_per_thread`` (seconds sampled x rate) lets it say how busy
    each thread was."""
    total = sum(c for _, c in stacks) or 1
    threads: Counter[str] = Counter()
    for frames, count in stacks:
        name = next((f for f in frames if f.startswith("thread (")), "?")
        code = _code_frames(frames)
        if code and not code[-1].startswith(WAITS):
            threads[name] += count
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, count in stacks:
        code = _code_frames(frames)
        if not code:
            continue
        own[code[-1]] += count
        for f in set(code):
            incl[f] += count
    waiting = sum(c for f, c in own.items() if f.startswith(WAITS))
    busy = [(f, c) for f, c in own.most_common() if not f.startswith(WAITS)]
    ours = [(f, c) for f, c in incl.most_common() if "(sealfs/" in f]
    lines = [
        f"{total} samples; {100 * waiting / total:.1f}% in known waits (trio's epoll wait, idle "
        "worker threads), left out below",
        "",
    ]
    if expected_per_thread:
        lines.append("busy samples per thread (share of the sampled time):")
        lines += [f"{100 * c / expected_per_thread:6.1f}%  {t}" for t, c in threads.most_common()]
        lines.append("")
    lines += [
        f"top {top} by own time (the frame that was running):",
        *(f"{100 * c / total:6.1f}%  {f}" for f, c in busy[:top]),
        "",
        f"top {top} sealfs functions by inclusive time (on the stack):",
        *(f"{100 * c / total:6.1f}%  {f}" for f, c in ours[:top]),
    ]
    return "\n".join(lines) + "\n"


def svg(stacks: list[tuple[list[str], int]], title: str, width: int = 1600) -> str:
    tree: dict = {"n": 0, "kids": {}}
    depth_max = 0
    for frames, count in stacks:
        node = tree
        node["n"] += count
        # Keep the thread pseudo-frame (one tower per thread), drop the process one.
        frames = [_short(f) for f in frames if not f.startswith("process ")]
        for f in frames:
            node = node["kids"].setdefault(f, {"n": 0, "kids": {}})
            node["n"] += count
        depth_max = max(depth_max, len(frames))
    total = tree["n"] or 1
    row, pad_top = 17, 40
    height = pad_top + row * (depth_max + 1) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="11">',
        '<rect width="100%" height="100%" fill="#fdfdf6"/>',
        f'<text x="10" y="20" font-size="15">{html.escape(title)} ({total} samples)</text>',
    ]

    def draw(node: dict, name: str, x: float, depth: int) -> None:
        w = node["n"] / total * (width - 20)
        if w < 0.5:
            return
        y = height - 10 - row * (depth + 1)
        if depth >= 0:
            hue = zlib.crc32(name.split(" (")[0].encode()) % 60
            label = name
            pct = 100 * node["n"] / total
            out.append(
                f"<g><title>{html.escape(label)}: {node['n']} samples ({pct:.1f}%)</title>"
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" '
                f'fill="hsl({hue},80%,{60 + hue % 15}%)" rx="2"/>'
            )
            chars = int(w / 6.6)
            if chars >= 3:
                text = label if len(label) <= chars else label[: chars - 2] + ".."
                out.append(f'<text x="{x + 3:.1f}" y="{y + row - 5}">{html.escape(text)}</text>')
            out.append("</g>")
        for kid_name, kid in sorted(node["kids"].items()):
            draw(kid, kid_name, x, depth + 1)
            x += kid["n"] / total * (width - 20)

    draw(tree, "all", 10, -1)
    out.append("</svg>")
    return "\n".join(out) + "\n"
