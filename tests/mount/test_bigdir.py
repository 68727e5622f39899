"""Directories of 100,000 entries on a real mount: every entry listed exactly once, also while
other entries are added and removed during the listing, and after a remount."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Volume, new_volume

pytestmark = [pytest.mark.mount, pytest.mark.slow]

N = 100_000
LISTING_PACE = 2000  # entries listed between waits for the churn thread
CHANGES_PER_PACE = 10  # changes the churn thread makes (at least) during each of those waits


def name_of(i: int) -> str:
    return f"entry-{i:06d}"


def list_names(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return [e.name for e in it]


@pytest.fixture(scope="module")
def bigdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Volume, Path]]:
    vol = new_volume(tmp_path_factory.mktemp("bigdir"))
    vol.mount()
    big = vol.mnt / "big"
    big.mkdir()
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(N):
            os.mknod(name_of(i), 0o644 | stat.S_IFREG, dir_fd=fd)
    finally:
        os.close(fd)
    yield vol, big
    vol.unmount_after_test()


def assert_exactly_once(names: list[str], expected: set[str]) -> None:
    counts = Counter(names)
    twice = [n for n, c in counts.items() if c > 1]
    assert not twice, f"{len(twice)} entries listed more than once, e.g. {sorted(twice)[:5]}"
    missing = expected - counts.keys()
    assert not missing, f"{len(missing)} entries missing, e.g. {sorted(missing)[:5]}"


def test_100k_entries_listed_exactly_once(bigdir: tuple[Volume, Path]) -> None:
    _vol, big = bigdir
    t0 = time.monotonic()
    names = list_names(big)
    elapsed = time.monotonic() - t0
    assert len(names) == N
    assert_exactly_once(names, {name_of(i) for i in range(N)})
    assert os.stat(big / name_of(N - 1)).st_size == 0
    assert (big / name_of(54321)).is_file()
    # generous: a linear readdir lists 100,000 entries in a few seconds even on 2 slow cores
    assert elapsed < 30, f"listing {N} entries took {elapsed:.0f}s (quadratic readdir?)"


def test_listing_while_entries_added_and_removed(bigdir: tuple[Volume, Path]) -> None:
    """Another thread adds and removes entries during the listing; the listing waits for a
    number of those changes every LISTING_PACE entries, so the amount of churn it sees is set
    by work done, however fast or loaded the machine."""
    _vol, big = bigdir
    stable = {name_of(i) for i in range(N)}
    stop = threading.Event()
    changes = threading.Semaphore(0)  # released once per change the churn thread made
    errors: list[BaseException] = []
    churned: set[str] = set()

    def churn() -> None:
        fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
        try:
            k = 0
            live: list[str] = []
            while not stop.is_set():
                name = f"churn-{k:07d}"
                k += 1
                os.mknod(name, 0o644 | stat.S_IFREG, dir_fd=fd)
                churned.add(name)
                live.append(name)
                if len(live) > 50:
                    os.unlink(live.pop(0), dir_fd=fd)
                changes.release()
            for name in live:
                os.unlink(name, dir_fd=fd)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            changes.release(CHANGES_PER_PACE)  # never leave the listing waiting
        finally:
            os.close(fd)

    t = threading.Thread(target=churn)
    t.start()
    names: list[str] = []
    try:
        with os.scandir(big) as it:
            for j, entry in enumerate(it):
                names.append(entry.name)
                if j % LISTING_PACE == 0:
                    for _ in range(CHANGES_PER_PACE):
                        assert changes.acquire(timeout=120), "the churn thread is stuck"
    finally:
        stop.set()
        t.join(120)
    assert not errors, errors
    assert len(churned) >= CHANGES_PER_PACE * (N // LISTING_PACE)  # by construction
    assert_exactly_once(names, stable)
    unknown = set(names) - stable - churned
    assert not unknown, f"names never created: {sorted(unknown)[:5]}"
    assert set(list_names(big)) == stable


def test_remove_while_listing_and_after_remount(bigdir: tuple[Volume, Path]) -> None:
    """Remove every tenth stable entry during a listing: survivors still appear once."""
    vol, big = bigdir
    doomed = [name_of(i) for i in range(0, N, 10)]
    survivors = {name_of(i) for i in range(N) if i % 10}
    seen: list[str] = []
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(big) as it:
            for j, entry in enumerate(it):
                seen.append(entry.name)
                if j == 1000:  # mid-listing, remove half of the entries
                    for name in doomed:
                        os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    assert_exactly_once(seen, survivors)
    vol.umount()
    vol.mount()
    names = list_names(big)
    assert len(names) == len(survivors)
    assert_exactly_once(names, survivors)
