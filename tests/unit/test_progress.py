"""The progress line of long commands (sealfs/cli/progress.py), fed events on a fake clock:
what a line says, how often it is redrawn, that it ends with a newline, and that a disabled
meter writes nothing; and :func:`sealfs.meter.each`, which reports a copy loop's progress."""

from __future__ import annotations

import io

from sealfs.cli.progress import Progress, render
from sealfs.meter import each


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def meter(enabled: bool = True) -> tuple[Progress, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    return Progress(enabled, stream=out, unit="files", clock=clock), out, clock


def test_line_with_a_byte_total_says_share_rate_and_eta() -> None:
    line = render("verifying", 512 << 20, 2 << 30, 100, 400, 2.0)
    assert "25.0%" in line and "512.0 MiB / 2.0 GiB" in line and "100/400 objects" in line
    assert "256.0 MiB/s" in line and "ETA 0:06" in line


def test_line_without_a_byte_total_estimates_from_the_items() -> None:
    line = render("pre-copy", 3 << 20, None, 30, 120, 10.0, unit="files")
    assert line.startswith("pre-copy:  25.0%  3.0 MiB  30/120 files")
    assert "307.2 KiB/s" in line and "ETA 0:30" in line  # 3/4 left at 10 s a quarter


def test_line_at_the_start_and_for_an_empty_phase() -> None:
    assert "ETA --:--" in render("copying", 0, 10 << 30, 0, 5, 0.0)
    assert "100.0%" in render("copying", 0, 0, 0, 0, 0.0)
    assert "ETA 1:00:00" in render("copying", 1 << 20, 2 << 20, 1, 2, 3600.0)


def test_redrawn_at_most_four_times_a_second_and_ended_with_a_newline() -> None:
    m, out, clock = meter()
    m.start("copying", 1000, 10)
    assert out.getvalue().count("\r") == 1  # drawn at once
    for _ in range(5):
        clock.now += 0.0625  # exact in binary
        m.advance(10, 1)
    assert out.getvalue().count("\r") == 2  # after 0.25 s: one redraw, not five
    clock.now += 0.0625
    m.advance(500, 4)
    m.finish()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    last = text.rsplit("\r", 1)[1]
    assert "55.0%" in last and "9/10 files" in last  # the final state, not the throttled one
    m.finish()
    assert out.getvalue() == text  # a phase ends once


def test_a_shorter_line_blanks_the_rest_of_the_longer_one() -> None:
    m, out, clock = meter()
    m.note("reading metadata of a long name")
    m.start("x", 1, 1)
    line = out.getvalue().rsplit("\r", 1)[1]
    assert len(line) >= len("reading metadata of a long name...")


def test_a_failing_command_leaves_no_open_line() -> None:
    m, out, clock = meter()
    try:
        with m:
            m.start("copying", 1000, 10)
            raise RuntimeError
    except RuntimeError:
        pass
    assert out.getvalue().endswith("\n")


def test_a_note_left_open_is_ended_before_the_command_prints() -> None:
    m, out, clock = meter()
    m.note("checking metadata")
    m.end()
    m.end()
    assert out.getvalue() == "\rchecking metadata...\n"


def test_disabled_writes_nothing() -> None:
    m, out, clock = meter(enabled=False)
    with m:
        m.note("reading")
        m.start("copying", 1000, 10)
        clock.now += 5
        m.advance(1000, 10)
        m.finish()
    assert out.getvalue() == ""


def test_each_reports_every_item_with_the_bytes_it_added() -> None:
    m, out, clock = meter()
    copied = [0]
    seen = []
    for size in each(m, "copying", [100, 0, 300], 3, 400, lambda: copied[0]):
        seen.append((m.done_items, m.done_bytes))
        copied[0] += size
    assert seen == [(0, 0), (1, 100), (2, 100)]
    assert (m.done_items, m.done_bytes) == (3, 400)
    assert out.getvalue().endswith("\n") and "100.0%" in out.getvalue()
