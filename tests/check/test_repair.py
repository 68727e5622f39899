"""Repair: heals swaps, quarantines what it cannot heal (keeping intact blocks readable),
drops orphans, and is crash-safe (a SIGKILL at each named point leaves a volume that checks
and repairs again). Run through the real CLI; results read back through a real mount."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.backing import flip_bit, force_unmount, make_content, swap_files, unmount
from tests.conftest import REPO, SEALFS, Volume, sealfs

from .conftest import BS, FILES, Template, rebase, run_check

pytestmark = [pytest.mark.mount]


def cli_check(vol: Volume, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    import subprocess

    res = subprocess.run(
        [*SEALFS, "check", str(vol.backing), "--key-file", str(vol.key), "--json", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    try:
        return res.returncode, json.loads(res.stdout) if res.stdout else {}
    except ValueError:
        raise AssertionError(res.stdout + res.stderr) from None


def snapshot(backing: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(backing)): p.read_bytes()
        for p in backing.rglob("*")
        if p.is_file() and p.name != "lock"
    }


def test_dry_run_changes_nothing(template: Template, victim: Volume) -> None:
    flip_bit(rebase(victim, template, template.layout["/a.txt"].blocks[1]))
    before = snapshot(victim.backing)
    code, out = cli_check(victim, "--repair", "--dry-run")
    assert code == 5 and out["repair"]["dry_run"]
    assert any("quarantine /a.txt" in a for a in out["repair"]["actions"])
    assert snapshot(victim.backing) == before


def test_swaps_are_healed(template: Template, victim: Volume) -> None:
    a, b = template.layout["/a.txt"], template.layout["/b.txt"]
    swap_files(rebase(victim, template, a.blocks[1]), rebase(victim, template, b.blocks[1]))
    swap_files(rebase(victim, template, a.record), rebase(victim, template, b.record))
    code, out = cli_check(victim, "--repair")
    assert code == 5 and out["repair"]["clean_after"], out
    assert run_check(victim).report.clean
    mnt = victim.mount()
    try:
        for p in ("/a.txt", "/b.txt"):
            assert (mnt / p.lstrip("/")).read_bytes() == make_content(p, FILES[p])
        assert not (mnt / "lost+found").exists() or not os.listdir(mnt / "lost+found")
    finally:
        unmount(victim)
        force_unmount(victim)


def test_quarantine_keeps_intact_blocks_and_says_why(template: Template, victim: Volume) -> None:
    flip_bit(rebase(victim, template, template.layout["/a.txt"].blocks[1]))
    rebase(victim, template, template.layout["/dir/y.txt"].record).unlink()
    code, out = cli_check(victim, "--repair")
    assert code == 5 and out["repair"]["clean_after"], out
    assert run_check(victim).report.clean
    mnt = victim.mount()
    try:
        ino = template.layout["/a.txt"].ino
        q = mnt / "lost+found" / f"{ino}-a.txt"
        data, want = q.read_bytes(), make_content("/a.txt", FILES["/a.txt"])
        assert data[:BS] == want[:BS] and data[BS : 2 * BS] == bytes(BS)
        assert data[2 * BS :] == want[2 * BS :]
        why = json.loads(os.getxattr(q, "user.sealfs.damage"))
        assert why["path"] == "/a.txt" and why["dropped_blocks"][0]["block"] == 1
        assert not (mnt / "a.txt").exists() and not (mnt / "dir" / "y.txt").exists()
        report = (mnt / "lost+found" / "REPORT").read_text()
        assert "/a.txt" in report and "/dir/y.txt" in report
        assert (mnt / "dir" / "x.txt").read_bytes() == make_content(
            "/dir/x.txt", FILES["/dir/x.txt"]
        )
    finally:
        unmount(victim)
        force_unmount(victim)


def test_damaged_directory_contents_are_reattached(template: Template, victim: Volume) -> None:
    flip_bit(rebase(victim, template, template.layout["/dir/sub"].record), offset=40)
    code, out = cli_check(victim, "--repair")
    assert code == 5 and out["repair"]["clean_after"], out
    mnt = victim.mount()
    try:
        ino = template.layout["/dir/sub/deep.txt"].ino
        lost = mnt / "lost+found" / f"#{ino}"
        assert lost.read_bytes() == make_content("/dir/sub/deep.txt", FILES["/dir/sub/deep.txt"])
        assert not (mnt / "dir" / "sub").exists()
    finally:
        unmount(victim)
        force_unmount(victim)


def test_orphans_are_deleted(template: Template, victim: Volume) -> None:
    stray = victim.backing / "objects" / "00" / "00000000000000aa"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"junk")
    code, out = cli_check(victim, "--repair")
    assert code == 0 and out["ok"], out
    assert not stray.exists()


@pytest.mark.parametrize("point", ["before-commit", "after-commit", "mid-orphans"])
def test_killed_repair_leaves_a_repairable_volume(
    template: Template, victim: Volume, point: str
) -> None:
    flip_bit(rebase(victim, template, template.layout["/a.txt"].blocks[1]))
    e = template.layout["/b.txt"]
    swap_files(rebase(victim, template, e.blocks[0]), rebase(victim, template, e.blocks[1]))
    for i in range(6):
        (victim.backing / "objects" / "00").mkdir(exist_ok=True)
        (victim.backing / "objects" / "00" / f"00000000000000{i:02x}").write_bytes(b"x")
    code, _ = cli_check(victim, "--repair", env={"SEALFS_REPAIR_KILL_AT": point})
    assert code == -9
    after = run_check(victim)  # mounts no state in between: the on-disk state is consistent
    assert {f.kind for f in after.report.problems} <= {"tampered", "swapped"}
    code, out = cli_check(victim, "--repair")
    assert out["repair"]["clean_after"], out
    code, out = cli_check(victim)
    assert code == 0 and out["ok"] and not out["findings"], out
    sealfs("check", str(victim.backing), "--key-file", str(victim.key))
