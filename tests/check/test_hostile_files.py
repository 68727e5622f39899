"""The backing directory is hostile as a file system too: a symlink, FIFO, directory or 1 GiB
sparse file planted where sealfs expects its header, checkpoint, journal or an object. The
checker never follows, never blocks, never reads more than the format allows there (memory
stays flat), reports each as damage naming the file (and the plaintext path for objects), and
a repair never writes through a planted symlink. Run through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from sealfs.store import CHECKPOINT_NAME, HEADER_NAME, journal_name
from tests.backing import PLANTED_KINDS, flip_bit, plant
from tests.conftest import Volume, sealfs_measured

from .conftest import Template, rebase

pytestmark = [pytest.mark.mount]

MAX_RSS_MIB = 300  # a 1 GiB file read whole would take more than three times this

TARGETS: dict[str, Callable[[Template, Volume], Path]] = {
    "header": lambda t, v: v.backing / HEADER_NAME,
    "checkpoint": lambda t, v: v.backing / CHECKPOINT_NAME,
    "journal": lambda t, v: v.backing / journal_name(t.layout.gen),
    "block": lambda t, v: rebase(v, t, t.layout["/a.txt"].blocks[1]),
    "record": lambda t, v: rebase(v, t, t.layout["/dir/x.txt"].record),
}
#: what the report says for each target: (plaintext path, what)
EXPECTED = {
    "checkpoint": (None, "checkpoint"),
    "journal": (None, "journal"),
    "block": ("/a.txt", "block 1"),
    "record": ("/dir/x.txt", "record"),
}


def check_json(vol: Volume, *args: str) -> tuple[int, dict, str, float]:
    """(exit code, the JSON report, all output, peak MiB) of ``sealfs check --json``."""
    res = sealfs_measured("check", str(vol.backing), "--key-file", str(vol.key), "--json", *args)
    out = json.loads(res.stdout) if res.stdout.strip() else {}
    return res.returncode, out, res.stdout + res.stderr, res.max_rss_mib


@pytest.mark.parametrize("kind", PLANTED_KINDS)
@pytest.mark.parametrize("target", list(TARGETS))
def test_planted_file_is_reported_not_followed(
    template: Template, victim: Volume, tmp_path: Path, target: str, kind: str
) -> None:
    path = TARGETS[target](template, victim)
    # the symlink points at a byte-exact copy of the genuine file: a checker that followed it
    # would find nothing wrong
    outside = tmp_path / "outside" / path.name
    outside.parent.mkdir()
    shutil.copyfile(path, outside)
    genuine = outside.read_bytes()
    plant(path, kind, outside)
    code, out, stderr, rss = check_json(victim)
    assert rss < MAX_RSS_MIB, f"check peaked at {rss:.0f} MiB"
    assert outside.read_bytes() == genuine
    if target == "header":
        assert code == 4, (code, stderr)
        assert HEADER_NAME in stderr and "Traceback" not in stderr, stderr
        return
    assert code == 5, (code, out, stderr)
    want_path, want_what = EXPECTED[target]
    found = [(f["kind"], f["path"], f["what"], f["object"]) for f in out["findings"]]
    rel = str(path.relative_to(victim.backing))
    assert ("tampered", want_path, want_what, rel) in found, found


@pytest.mark.parametrize(
    "name",
    [f".{CHECKPOINT_NAME}.tmp", "next-journal", "stale-journal", "orphan", "lock", "objects/*"],
)
def test_repair_never_writes_through_a_planted_symlink(
    template: Template, victim: Volume, tmp_path: Path, name: str
) -> None:
    """Repair commits (so it writes a checkpoint, a new journal and objects) and deletes
    leftovers: a symlink at any of those names is replaced or unlinked, never written
    through; the canary it points at keeps its bytes."""
    canary, canary_dir = tmp_path / "canary", tmp_path / "canary-dir"
    canary.write_bytes(b"canary: never to be written\n")
    canary_dir.mkdir()
    gen = template.layout.gen
    fanout = template.layout["/a.txt"].blocks[0].parent.name
    names = {
        "next-journal": journal_name(gen + 1),
        "stale-journal": journal_name(gen - 1),
        "orphan": f"objects/{fanout}/{fanout}00000000dead00",
    }
    if name == "objects/*":  # every fan-out directory not there yet: new objects go there
        for i in range(256):
            sub = victim.backing / "objects" / f"{i:02x}"
            if not sub.exists():
                sub.symlink_to(canary_dir)
    else:
        plant(victim.backing / names.get(name, name), "symlink", canary)
    flip_bit(rebase(victim, template, template.layout["/a.txt"].blocks[1]))  # repair commits
    code, out, stderr, _ = check_json(victim, "--repair")
    assert canary.read_bytes() == b"canary: never to be written\n"
    assert os.listdir(canary_dir) == []
    if name in ("lock", "objects/*"):  # refused: the repair cannot lock, or write objects
        assert code == 5 and name.split("/")[0] in stderr and "Traceback" not in stderr, stderr
        return
    assert code == 5 and out["repair"]["clean_after"], (out, stderr)
    if name != "next-journal":  # leftovers: the symlink itself is unlinked
        assert not (victim.backing / names.get(name, name)).is_symlink()
