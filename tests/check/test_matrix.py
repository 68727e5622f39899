"""The tamper matrix: one attack from the threat model per test, applied to the backing
directory of a real populated volume; `check` must name the right path and kind, and nothing
else. Plus the no-false-alarm cases: untouched, and garbage after the journal (a torn tail).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from sealfs.sealed.codec import split_frames
from tests.backing import extend, flip_bit, swap_files, truncate
from tests.conftest import Volume

from .conftest import REPLAY, Template, assert_only, rebase, run_check

pytestmark = [pytest.mark.mount]


def test_untouched_volume_is_clean(victim: Volume) -> None:
    result = run_check(victim)
    assert result.report.clean, result.report.human()
    assert not result.report.findings, result.report.human()
    assert result.report.stats.blocks >= 15


def test_quick_mode_is_clean_and_reads_no_data(victim: Volume) -> None:
    result = run_check(victim, full=False)
    assert result.report.clean and result.report.stats.block_bytes == 0


@pytest.mark.parametrize("full", [True, False], ids=["full", "quick"])
def test_deleted_block(template: Template, victim: Volume, full: bool) -> None:
    p = rebase(victim, template, template.layout["/dir/sub/deep.txt"].blocks[0])
    p.unlink()
    result = run_check(victim, full=full)
    assert_only(result, {("/dir/sub/deep.txt", "missing")})
    (f,) = result.report.problems
    assert f.what == "block 0" and f.object == str(p.relative_to(victim.backing))
    assert "repair" in f.advice


def test_bitflip_in_block(template: Template, victim: Volume) -> None:
    flip_bit(rebase(victim, template, template.layout["/a.txt"].blocks[1]))
    assert_only(run_check(victim), {("/a.txt", "tampered")})


def test_bitflip_is_invisible_to_quick_mode(template: Template, victim: Volume) -> None:
    flip_bit(rebase(victim, template, template.layout["/a.txt"].blocks[1]))
    assert run_check(victim, full=False).report.clean


def test_truncated_block(template: Template, victim: Volume) -> None:
    p = rebase(victim, template, template.layout["/dir/x.txt"].blocks[1])
    truncate(p, p.stat().st_size // 2)
    assert_only(run_check(victim), {("/dir/x.txt", "truncated")})


def test_block_truncated_to_zero(template: Template, victim: Volume) -> None:
    truncate(rebase(victim, template, template.layout["/b.txt"].blocks[0]), 0)
    assert_only(run_check(victim), {("/b.txt", "truncated")})


def test_extended_block(template: Template, victim: Volume) -> None:
    extend(rebase(victim, template, template.layout["/b.txt"].blocks[2]), os.urandom(32))
    result = run_check(victim)
    assert_only(result, {("/b.txt", "tampered")})
    assert "extended" in result.report.problems[0].detail


def test_swap_blocks_within_file(template: Template, victim: Volume) -> None:
    e = template.layout["/a.txt"]
    swap_files(rebase(victim, template, e.blocks[0]), rebase(victim, template, e.blocks[2]))
    result = run_check(victim)
    assert_only(result, {("/a.txt", "swapped")})
    assert sorted(f.index for f in result.report.problems) == [0, 2]
    assert {f.belongs_to for f in result.report.problems} == {"/a.txt block 0", "/a.txt block 2"}


def test_swap_blocks_between_files(template: Template, victim: Volume) -> None:
    a, b = template.layout["/a.txt"], template.layout["/b.txt"]
    swap_files(rebase(victim, template, a.blocks[1]), rebase(victim, template, b.blocks[1]))
    result = run_check(victim)
    assert_only(result, {("/a.txt", "swapped"), ("/b.txt", "swapped")})
    assert "/b.txt" in next(f for f in result.report.problems if f.path == "/a.txt").detail


def test_replayed_old_block(template: Template, victim: Volume) -> None:
    """The old version of the block is put in place of the current one, and also restored
    under its old name (as a host restoring an old snapshot of the objects would)."""
    cur = rebase(victim, template, template.layout[REPLAY].blocks[0])
    old = rebase(victim, template, template.old_paths["0"])
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(template.old["0"])
    cur.write_bytes(template.old["0"])
    assert_only(run_check(victim), {(REPLAY, "rolled-back")})


def test_replayed_old_block_without_its_old_name_is_tampered(
    template: Template, victim: Volume
) -> None:
    rebase(victim, template, template.layout[REPLAY].blocks[0]).write_bytes(template.old["0"])
    assert_only(run_check(victim), {(REPLAY, "tampered")})


def test_block_from_another_volume(template: Template, victim: Volume) -> None:
    shutil.copyfile(
        template.other_layout["/a.txt"].blocks[0],
        rebase(victim, template, template.layout["/a.txt"].blocks[0]),
    )
    assert_only(run_check(victim), {("/a.txt", "tampered")})


@pytest.mark.parametrize("target", ["/c.txt", "/dir", "/link"])
def test_bitflip_in_record(template: Template, victim: Volume, target: str) -> None:
    flip_bit(rebase(victim, template, template.layout[target].record), offset=40)
    result = run_check(victim)
    found = {(f.path, f.kind) for f in result.report.problems}
    assert (target, "tampered") in found, result.report.human()
    if target == "/dir":  # what sat below it is reported as unreachable, never as fine
        assert {k for p, k in found if p != target} <= {"unreadable"}
        assert any(k == "unreadable" for _, k in found)
    else:
        assert found == {(target, "tampered")}, result.report.human()


def test_deleted_record(template: Template, victim: Volume) -> None:
    rebase(victim, template, template.layout["/dir/y.txt"].record).unlink()
    assert_only(run_check(victim), {("/dir/y.txt", "missing")})


def test_truncated_record(template: Template, victim: Volume) -> None:
    truncate(rebase(victim, template, template.layout["/b.txt"].record), 0)
    assert_only(run_check(victim), {("/b.txt", "truncated")})


def test_swapped_records(template: Template, victim: Volume) -> None:
    a, b = template.layout["/a.txt"], template.layout["/b.txt"]
    swap_files(rebase(victim, template, a.record), rebase(victim, template, b.record))
    result = run_check(victim)
    assert_only(result, {("/a.txt", "swapped"), ("/b.txt", "swapped")})
    assert set(result.heal_records) == {a.ino, b.ino}


def test_replayed_old_record(template: Template, victim: Volume) -> None:
    cur = rebase(victim, template, template.layout[REPLAY].record)
    old = rebase(victim, template, template.old_paths["record"])
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(template.old["record"])
    cur.write_bytes(template.old["record"])
    assert_only(run_check(victim), {(REPLAY, "rolled-back")})


def test_record_from_another_volume(template: Template, victim: Volume) -> None:
    shutil.copyfile(
        template.other_layout["/dir2/z.txt"].record,
        rebase(victim, template, template.layout["/dir2/z.txt"].record),
    )
    assert_only(run_check(victim), {("/dir2/z.txt", "tampered")})


# --- volume-level metadata ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "attack,kind",
    [
        ("bitflip", "tampered"),
        ("truncate", "truncated"),
        ("delete", "missing"),
        ("other", "tampered"),
    ],
)
def test_checkpoint(template: Template, victim: Volume, attack: str, kind: str) -> None:
    cp = rebase(victim, template, template.layout.checkpoint)
    if attack == "bitflip":
        flip_bit(cp)
    elif attack == "truncate":
        truncate(cp, 20)
    elif attack == "delete":
        cp.unlink()
    else:
        shutil.copyfile(template.other_layout.checkpoint, cp)
    result = run_check(victim)
    assert_only(result, {(None, kind)})
    assert result.report.problems[0].object == "checkpoint"


def test_bitflip_in_middle_journal_record(template: Template, victim: Volume) -> None:
    journal = rebase(victim, template, template.layout.journal)
    frames = split_frames(journal.read_bytes())[0]
    assert len(frames) >= 3
    off, sealed = frames[1]
    flip_bit(journal, off + 8 + len(sealed) // 2)
    result = run_check(victim)
    assert_only(result, {(None, "tampered")})
    second = template.layout.seq - len(frames) + 2  # commit number of frames[1]
    assert f"journal record {second} " in result.report.problems[0].detail


def test_deleted_journal(template: Template, victim: Volume) -> None:
    rebase(victim, template, template.layout.journal).unlink()
    assert_only(run_check(victim), {(None, "missing")})


def test_zeros_after_journal_are_a_torn_tail_not_an_alarm(
    template: Template, victim: Volume
) -> None:
    """What a crash leaves when the journal grew before its data reached the disk."""
    extend(rebase(victim, template, template.layout.journal), bytes(90))
    result = run_check(victim)
    assert result.report.clean and any("torn" in n for n in result.report.notes)


def test_header_edit_is_tampering(victim: Volume) -> None:
    p = victim.backing / "sealfs.header"
    doc = json.loads(p.read_text())
    doc["block_size"] *= 2
    p.write_text(json.dumps(doc))
    result = run_check(victim)
    assert_only(result, {(None, "tampered")})
    assert result.report.problems[0].object == "sealfs.header"


def test_rollback_against_anchor(template: Template, victim: Volume) -> None:
    """The hook the KMS anchor uses: an anchor at a later epoch proves the copy is old."""
    seq = template.layout.seq
    result = run_check(victim, anchor=(seq + 3, bytes(32)))
    assert_only(result, {(None, "rolled-back")})
    clean = run_check(victim, anchor=(seq, bytes.fromhex(result.report.head or "")))
    assert clean.report.clean
    forged = run_check(victim, anchor=(seq, bytes(32)))
    assert_only(forged, {(None, "tampered")})
    # an anchored commit the disk no longer shows (before its checkpoint's heads): a mount
    # refuses it, and so does check (it used to call such a volume clean)
    predates = run_check(victim, anchor=(1, bytes(32)))
    assert_only(predates, {(None, "rolled-back")})
    assert "predates" in predates.report.problems[0].detail


def test_orphans_are_noted_not_alarmed(template: Template, victim: Volume) -> None:
    stray = (
        rebase(victim, template, template.layout["/a.txt"].blocks[0]).parent / "00000000deadbeef"
    )
    stray.write_bytes(b"x" * 100)
    result = run_check(victim)
    assert result.report.clean
    assert [(f.kind, f.oid) for f in result.report.findings] == [("orphaned", 0xDEADBEEF)]


def test_subtree_check_sees_only_its_subtree(template: Template, victim: Volume) -> None:
    flip_bit(rebase(victim, template, template.layout["/a.txt"].blocks[1]))
    flip_bit(rebase(victim, template, template.layout["/dir/sub/deep.txt"].blocks[0]))
    result = run_check(victim, path="/dir")
    assert_only(result, {("/dir/sub/deep.txt", "tampered")})
    assert result.report.stats.blocks < template_blocks(template)


def template_blocks(template: Template) -> int:
    return sum(len(e.blocks) for e in template.layout.entries.values())
