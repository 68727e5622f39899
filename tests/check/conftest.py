"""A populated template volume (built once per session through real FUSE mounts) and cheap
byte-exact copies of it for each attack, plus helpers to run the checker on them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealfs.check import CheckOptions, CheckResult, Finding, open_and_check
from sealfs.volume.header import read_key_file
from tests.backing import (
    JOURNAL_FILLER,
    Layout,
    committed_version,
    copy_tree,
    fold_and_fill,
    force_unmount,
    fsync_path,
    layout,
    make_content,
    unmount,
)
from tests.conftest import Volume, new_volume

BS = 4096
FILES: dict[str, int] = {
    "/a.txt": 3 * BS + 100,
    "/b.txt": 2 * BS + 10,
    "/c.txt": 300,
    "/dir/x.txt": BS + BS // 2,
    "/dir/y.txt": 50,
    "/dir/sub/deep.txt": BS + 1,
    "/dir2/z.txt": 2 * BS,
}
REPLAY = "/r.txt"


@dataclass
class Template:
    vol: Volume
    layout: Layout
    old: dict[str, bytes]  # REPLAY's version-1 objects: "record" / block index -> bytes
    old_paths: dict[str, Path]
    other: Volume
    other_layout: Layout


def _populate(mnt: Path) -> None:
    for path, n in FILES.items():
        p = mnt / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(make_content(path, n))
        fsync_path(p)
    os.link(mnt / "c.txt", mnt / "dir" / "c-link.txt")
    os.symlink("target", mnt / "link")
    (mnt / JOURNAL_FILLER.lstrip("/")).write_bytes(b"")


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    base = tmp_path_factory.mktemp("check-template")
    vol = new_volume(base, "--block-size", str(BS))
    other = new_volume(base, "--block-size", str(BS), name="other")
    try:
        old, old_paths = committed_version(vol, REPLAY, make_content(REPLAY + ":v1", 2 * BS + 7))
        vol.mount()
        r = vol.mnt / REPLAY.lstrip("/")
        r.write_bytes(make_content(REPLAY + ":v2", 2 * BS + 7))
        fsync_path(r)
        _populate(vol.mnt)
        unmount(vol)
        fold_and_fill(vol)
        other.mount()
        _populate(other.mnt)
        unmount(other)
        fold_and_fill(other)
    finally:
        force_unmount(vol)
        force_unmount(other)
    return Template(
        vol, layout(vol.backing, vol.key), old, old_paths, other, layout(other.backing, other.key)
    )


@pytest.fixture
def victim(template: Template, tmp_path: Path) -> Volume:
    """An unmounted byte-exact copy of the template."""
    vol = Volume(tmp_path / "backing", template.vol.key, tmp_path / "mnt", tmp_path / "log")
    copy_tree(template.vol.backing, vol.backing)
    vol.mnt.mkdir()
    return vol


def rebase(vol: Volume, template: Template, p: Path) -> Path:
    return vol.backing / p.relative_to(template.vol.backing)


@pytest.fixture
def at(template: Template, victim: Volume) -> Callable[[Path], Path]:
    """Template backing file -> the same file in the victim copy."""
    return lambda p: rebase(victim, template, p)


def run_check(vol: Volume, **opts: object) -> CheckResult:
    result, store, _, _ = open_and_check(vol.backing, read_key_file(vol.key), CheckOptions(**opts))  # type: ignore[arg-type]
    store.unlock()
    return result


def problems(result: CheckResult) -> list[Finding]:
    return result.report.problems


def assert_only(result: CheckResult, expected: set[tuple[str | None, str]]) -> None:
    """The problems found are exactly ``expected`` as (path, kind) pairs, nothing more."""
    got = {(f.path, f.kind) for f in problems(result)}
    assert got == expected, "\n" + result.report.human()
