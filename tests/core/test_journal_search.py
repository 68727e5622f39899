"""The search behind a bad journal frame header is linear (issue 10, item 6).

After a frame header with a wrong checksum, replay looks for a genuine later commit to tell
stale bytes (a crash) from damage. Crafted frame-shaped garbage used to make that search
decrypt every candidate up to the end of the file: quadratic, hours for a 32 MiB journal.
These tests craft such journals on a real volume and count the bytes actually decrypted.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from sealfs.crypto import Sealer, VolumeKeys
from sealfs.errors import IntegrityError
from sealfs.fs.lifecycle import create_volume, unlock_volume
from sealfs.fs.metalog import TORN_SEARCH_FACTOR, MetaLog, MetaState
from sealfs.sealed.codec import Commit, _length_check, frame, journal_ad
from sealfs.sealed.objects import SealedObjects
from sealfs.store import ObjectStore, journal_name
from tests.core.harness import CRED

GARBAGE = 4 << 20
BAD_HEADER = b"\xff" * 8  # a length of 2^32 - 1 whose checksum is wrong


class CountingSealer:
    """The volume's real journal sealer, counting what it is asked to decrypt."""

    def __init__(self, real: Sealer) -> None:
        self.real, self.calls, self.bytes = real, 0, 0

    def open(self, blob: bytes | memoryview, ad: bytes) -> bytes:
        self.calls += 1
        self.bytes += len(blob)
        return self.real.open(blob, ad)

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        return self.real.seal(plaintext, ad)


def _volume(tmp_path: Path, commits: int = 3) -> tuple[ObjectStore, VolumeKeys, Path]:
    """A real volume whose journal holds ``commits`` genuine commits."""
    backing = tmp_path / "backing"
    create_volume(backing, [(CRED, None)])
    store, header, master = unlock_volume(backing, CRED)
    keys = VolumeKeys(master, header.volume_id)
    log = MetaLog(store, SealedObjects(keys, header.block_size))
    state = log.load()
    log.open_for_append(state)
    for _ in range(commits):
        log.append(Commit(log.seq + 1, state.next_ino))
    log.close()
    return store, keys, backing / journal_name(state.gen)


def _load(store: ObjectStore, keys: VolumeKeys) -> tuple[MetaState | IntegrityError, int]:
    """Replay with a counting sealer: the outcome, and the bytes decrypted."""
    counter = CountingSealer(keys.journal)
    keys.journal = counter  # type: ignore[assignment]
    try:
        return MetaLog(store, SealedObjects(keys, 4096)).load(), counter.bytes
    except IntegrityError as e:
        return e, counter.bytes
    finally:
        keys.journal = counter.real


def _header(n: int) -> bytes:
    return struct.pack(">II", n, _length_check(n))


def _to_the_end(size: int) -> bytes:
    """A well-formed header every 8 bytes, each one's frame running to the end of the file."""
    return b"".join(_header(size - pos - 8) for pos in range(0, size, 8))


def _short_overlapping(size: int) -> bytes:
    """A well-formed header every 8 bytes, each one's 64-byte frame covering the next eight."""
    return _header(64) * (size // 8)


@pytest.mark.parametrize("craft", [_to_the_end, _short_overlapping])
def test_crafted_frame_headers_cost_linear_work(tmp_path: Path, craft) -> None:  # type: ignore[no-untyped-def]
    store, keys, journal = _volume(tmp_path)
    _, honest = _load(store, keys)  # checkpoint and genuine commits
    with journal.open("ab") as f:
        f.write(BAD_HEADER + craft(GARBAGE))
    outcome, decrypted = _load(store, keys)
    assert isinstance(outcome, IntegrityError), outcome
    assert "overlapping frame headers" in str(outcome)
    # The replay of the genuine prefix, then at most the search budget, nothing quadratic.
    assert decrypted - honest <= TORN_SEARCH_FACTOR * (GARBAGE + len(BAD_HEADER)), decrypted


def test_stale_frames_after_a_bad_header_are_searched_once_and_discarded(tmp_path: Path) -> None:
    """What a crash can leave (old frames of another generation, not overlapping) is still a
    harmless torn tail: searched once, discarded, no damage reported."""
    store, keys, journal = _volume(tmp_path)
    _, honest = _load(store, keys)
    stale = b"".join(
        frame(keys.journal.seal(os.urandom(64 << 10), journal_ad(keys.volume_id, 99, seq)))
        for seq in range(GARBAGE // (64 << 10))
    )
    with journal.open("ab") as f:
        f.write(BAD_HEADER + stale)
    state, decrypted = _load(store, keys)
    assert isinstance(state, MetaState), state
    assert state.replayed == 3 and any("discarded unreadable bytes" in n for n in state.notes)
    assert decrypted - honest <= len(stale)


def test_damaged_header_with_a_genuine_commit_behind_it_is_still_damage(tmp_path: Path) -> None:
    store, keys, journal = _volume(tmp_path)
    data = bytearray(journal.read_bytes())
    first = struct.unpack_from(">I", data, 0)[0] + 8
    data[first + 1] ^= 0x01  # the length of commit 2: its checksum no longer matches
    journal.write_bytes(bytes(data))
    outcome, _ = _load(store, keys)
    assert isinstance(outcome, IntegrityError)
    assert "commit 3 follows" in str(outcome), outcome
