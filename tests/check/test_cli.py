"""The command line: exit codes, --json, --help, progress, and a mounted volume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.backing import flip_bit, force_unmount, object_store, process_gone
from tests.conftest import Volume, new_volume, sealfs

from .conftest import Template, rebase, run_check

pytestmark = [pytest.mark.mount]


def check(vol: Volume, *args: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
    return sealfs("check", str(vol.backing), "--key-file", str(key or vol.key), *args, check=False)


def test_help_documents_kinds_and_exit_codes() -> None:
    out = sealfs("check", "--help").stdout
    for word in (
        "tampered",
        "rolled-back",
        "swapped",
        "orphaned",
        "--repair",
        "--quick",
        "--path",
        "--read-only",
        "Exit codes",
        "5  corruption found",
    ):
        assert word in out, word


def test_exit_codes(template: Template, victim: Volume, tmp_path: Path) -> None:
    res = check(victim)
    assert res.returncode == 0 and "clean" in res.stdout, res.stderr
    assert "\r" not in res.stderr  # no progress bar when not a terminal
    wrong = tmp_path / "wrong"
    wrong.write_bytes(os.urandom(64))
    wrong.chmod(0o600)
    assert check(victim, key=wrong).returncode == 3
    assert check(victim, "--dry-run").returncode == 2
    assert (
        sealfs("check", str(tmp_path), "--key-file", str(victim.key), check=False).returncode == 4
    )
    flip_bit(rebase(victim, template, template.layout["/a.txt"].blocks[0]))
    res = check(victim, "--json")
    assert res.returncode == 5
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 5
    (f,) = [f for f in doc["findings"] if f["path"] == "/a.txt"]
    assert f["kind"] == "tampered" and f["object"].startswith("objects/") and f["advice"]
    assert check(victim, "--path", "/dir").returncode == 0
    assert check(victim, "--path", "/nope").returncode == 2


def test_mounted_volume_is_refused_unless_read_only(template: Template, victim: Volume) -> None:
    victim.mount()
    try:
        res = check(victim)
        assert res.returncode == 6 and "--read-only" in res.stderr
        assert check(victim, "--repair").returncode == 6
        (victim.mnt / "new.txt").write_bytes(b"hello" * 1000)
        res = check(victim, "--read-only", "--json")
        assert res.returncode == 0, res.stdout
        assert any("live volume" in n for n in json.loads(res.stdout)["notes"])
    finally:
        sealfs("umount", str(victim.mnt))
    assert run_check(victim).report.clean


@pytest.mark.parametrize("full", [True, False], ids=["full", "quick"])
def test_objects_carried_in_the_journal_check_clean(tmp_path: Path, full: bool) -> None:
    """After fsyncs, records and the blocks written back for them live inside journal frames
    (docs/format.md) and have no files: neither mode may call them missing or orphaned."""
    vol = new_volume(tmp_path, "--block-size", "16384")
    vol.mount()
    try:
        for i, size in enumerate((100, 5000, 20000, 50000)):
            with open(vol.mnt / f"f{i}", "wb") as f:
                f.write(os.urandom(size))
                f.flush()
                os.fsync(f.fileno())
    finally:
        vol.umount()
    result = run_check(vol, full=full)
    assert result.report.clean and not result.report.findings, result.report.human()
    assert result.tree is not None
    blocks = {o for n in result.tree.nodes.values() if n.is_file for o in n.blocks.values()}
    assert blocks - set(object_store(vol.backing).list_objects()), (
        "no block is carried in the journal: this test would check nothing"
    )


@pytest.mark.slow
def test_sigkill_during_writes_checks_clean(tmp_path: Path) -> None:
    """No false alarm after a crash: kill -9 the daemon mid-write, several times; the check
    reports at most orphans and a torn journal tail, and exits 0."""
    vol = new_volume(tmp_path, "--block-size", "16384")
    writer = (
        "import os,sys\nm=sys.argv[1]\ni=0\nwhile True:\n"
        " p=os.path.join(m,'f%d'%(i%7))\n"
        " with open(p,'wb') as f:\n  f.write(os.urandom(40000+i*313%90000))\n"
        "  f.flush()\n  os.fsync(f.fileno()) if i%2 else None\n"
        " os.makedirs(os.path.join(m,'d%d'%(i%3)),exist_ok=True)\n"
        " os.replace(p,os.path.join(m,'d%d'%(i%3),'g%d'%(i%5))) if i%3==0 else None\n"
        " i+=1\n"
    )
    try:
        for round_ in range(3):
            vol.mount()
            w = subprocess.Popen(["python3", "-c", writer, str(vol.mnt)], stderr=subprocess.DEVNULL)
            time.sleep(0.6 + 0.3 * round_)
            pid = vol.daemon_pid()
            os.kill(pid, signal.SIGKILL)
            while not process_gone(pid):
                time.sleep(0.02)
            w.kill()
            w.wait()
            force_unmount(vol)
            res = check(vol, "--json")
            doc = json.loads(res.stdout)
            assert res.returncode == 0 and doc["ok"], res.stdout
            assert {f["kind"] for f in doc["findings"]} <= {"orphaned"}, res.stdout
    finally:
        force_unmount(vol)
