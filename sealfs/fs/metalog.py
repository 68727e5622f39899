"""The metadata log: which sealed inode record is current, made atomic and fresh.

The volume's whole metadata state is one table ``inode number -> object id of its current
record``. It is persisted as a sealed checkpoint plus an append-only journal of sealed commit
records (docs/format.md, "Checkpoint" and "Journal"). Every commit record carries a
volume-global sequence number in its associated data, so records cannot be reordered, dropped
from the middle, or moved between volumes or journal generations. A running SHA-256 over the
sealed records (the *head*) commits to the whole history; ``(seq, head)`` is the volume root
that the KMS can anchor against whole-volume rollback. :attr:`MetaLog.root` is that pair for
the last *durable* commit, replaced in one assignment, so a reader on another thread (the
anchor task) never sees a number with another commit's head. The heads since the oldest commit
the KMS may hold (:attr:`MetaLog.floor`) are kept, in memory and in each checkpoint, so that a
checkpoint written while the KMS was out of reach (a recovery-credential mount, a KMS outage)
never makes the anchored commit unverifiable.

Small inode records, and the blocks an fsync writes back, travel inside the commit frame that
introduces them instead of as files (they are *carried*, see
:attr:`sealfs.store.ObjectStore.carried`), so a small commit is one journal append and one
fdatasync. Replay hands the still-referenced carried objects of the current journal back to the
store; a new checkpoint first writes them out as files, since the journal that holds them goes.

Crash rules: a commit is durable once its frame is fdatasync'ed; every object file it references
was made durable before (syncfs). A torn last frame is a crash artefact and is cut off on mount.
All methods block; the core calls them from a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from sealfs.crypto import AuthError
from sealfs.errors import IntegrityError
from sealfs.sealed.codec import (
    CHECKPOINT_MAX,
    FRAME_HEADER,
    MAX_CHAIN,
    RECORD_OBJECT_MAX,
    Checkpoint,
    CodecError,
    Commit,
    frame,
    frames_after,
    split_frames,
)
from sealfs.sealed.inode import RecordError
from sealfs.sealed.objects import SealedObjects
from sealfs.store import CHECKPOINT_NAME, DamagedFile, JournalFile, MissingObject, ObjectStore

log = logging.getLogger(__name__)

ZERO_HEAD = bytes(32)
#: After a bad frame header, the search for a later commit decrypts at most this many times
#: the bytes that follow it (docs/format.md, crash rule 5).
TORN_SEARCH_FACTOR = 2
#: heads older than the floor are dropped in batches of this many commits (and at checkpoints)
HEADS_SLACK = 4096


class Heads:
    """The heads of consecutive commits ``first .. last``, 32 bytes each (a chain of a million
    commits is 32 MiB, not a dict of a million entries)."""

    def __init__(self, first: int, data: bytes) -> None:
        self.first = first
        self._data = bytearray(data)

    @property
    def last(self) -> int:
        return self.first + len(self._data) // 32 - 1

    def get(self, seq: int) -> bytes | None:
        if not self.first <= seq <= self.last:
            return None
        i = (seq - self.first) * 32
        return bytes(self._data[i : i + 32])

    def append(self, head: bytes) -> None:
        self._data += head

    def between(self, start: int, end: int) -> bytes:
        """The heads of commits ``start .. end - 1``, concatenated."""
        return bytes(self._data[(start - self.first) * 32 : (end - self.first) * 32])

    def drop_before(self, seq: int) -> None:
        if seq > self.first:
            del self._data[: (seq - self.first) * 32]
            self.first = seq


@dataclass
class MetaState:
    """The table and counters after replaying checkpoint + journal."""

    table: dict[int, int]
    next_ino: int
    seq: int
    head: bytes
    gen: int
    journal_length: int
    torn_bytes: int = 0
    replayed: int = 0
    notes: list[str] = field(default_factory=list)
    #: the volume root after each commit from the checkpoint's chain on: what an anchor is
    #: checked against (a fork shares a sequence number but not the head)
    heads: Heads = field(default_factory=lambda: Heads(0, ZERO_HEAD))


def _advance(head: bytes, sealed: bytes) -> bytes:
    return hashlib.sha256(head + sealed).digest()


class MetaLog:
    """Reads and extends one volume's checkpoint and journal."""

    def __init__(self, store: ObjectStore, objects: SealedObjects) -> None:
        self.store = store
        self.objects = objects
        #: whether a KMS may hold an anchor of this volume (it has a KMS key slot, or is
        #: mounted with one); if not, checkpoints keep no heads before their own
        self.anchorable = True
        self.journal: JournalFile | None = None
        self.gen = 0
        #: ``(seq, head)`` of the last durable commit: one immutable tuple, replaced at once
        self.root: tuple[int, bytes] = (0, ZERO_HEAD)
        self.heads = Heads(0, ZERO_HEAD)  # of commits floor .. root
        #: the oldest commit the KMS may hold as this volume's anchor (see :meth:`anchored`)
        self.floor = 0
        self.checkpoint_size = 0

    @property
    def seq(self) -> int:
        return self.root[0]

    @property
    def head(self) -> bytes:
        return self.root[1]

    # --- reading -------------------------------------------------------------------------

    def load(self) -> MetaState:
        """Verify and replay the checkpoint and its journal.

        Raises IntegrityError if either fails authentication anywhere but in a torn tail.
        """
        try:
            blob = self.store.read_file(CHECKPOINT_NAME, CHECKPOINT_MAX)
        except MissingObject:
            raise IntegrityError(
                "the metadata checkpoint is missing from the backing directory"
            ) from None
        try:
            cp = self.objects.open_checkpoint(blob)
        except (AuthError, CodecError) as e:
            raise IntegrityError(f"the metadata checkpoint failed verification ({e})") from None
        self.checkpoint_size = len(blob)
        state = MetaState(
            dict(cp.table),
            cp.next_ino,
            cp.seq,
            cp.head,
            cp.gen,
            0,
            heads=Heads(cp.seq - len(cp.chain) // 32, cp.chain + cp.head),
        )
        try:
            data = JournalFile(self.store, cp.gen).read_all()
        except MissingObject:
            raise IntegrityError(
                f"the metadata journal of generation {cp.gen} is missing"
            ) from None
        frames, end, bad_header = split_frames(data)
        carried: dict[int, tuple[int, bytes]] = {}
        valid = 0
        for i, (offset, sealed) in enumerate(frames):
            expected = state.seq + 1
            try:
                commit = self.objects.open_commit(cp.gen, expected, sealed)
            except (AuthError, CodecError) as e:
                if i == len(frames) - 1:
                    # The last frame: an append cut short by a crash (the length was written,
                    # the bytes were not). Anything after a bad frame would be tampering.
                    state.notes.append(f"discarded a torn journal record at offset {offset}")
                    break
                raise IntegrityError(
                    f"metadata journal record {expected} failed verification ({e})"
                ) from None
            state.table.update(commit.updates)
            carried.update(commit.carried)
            for ino in commit.deletes:
                state.table.pop(ino, None)
            state.next_ino = commit.next_ino
            state.seq = commit.seq
            state.head = _advance(state.head, sealed)
            state.heads.append(state.head)
            state.replayed += 1
            valid = offset + FRAME_HEADER + len(sealed)
        if bad_header:
            self._check_torn(data, end, state)
        state.journal_length = valid
        state.torn_bytes = len(data) - valid
        if state.torn_bytes and not state.notes:
            state.notes.append(f"discarded {state.torn_bytes} bytes of a torn journal append")
        self.gen, self.root = cp.gen, (state.seq, state.head)
        self.heads, self.floor = state.heads, state.heads.first
        self.store.set_carried(self._referenced(carried, state.table))
        return state

    def _referenced(
        self, carried: dict[int, tuple[int, bytes]], table: dict[int, int]
    ) -> dict[int, bytes]:
        """The carried objects the replayed state still uses: current records, and blocks in
        the current block map of their inode. A carried object is superseded when a later
        commit replaced it (possibly by an object file, which the journal does not show), so
        the records of inodes with other carried objects are opened to see their block maps;
        if one cannot be read, its carried objects are all kept (the check reports it)."""
        live = set(table.values())
        owners = {ino for oid, (ino, _) in carried.items() if oid not in live and ino in table}
        for ino in owners:
            oid = table[ino]
            try:
                blob = carried[oid][1] if oid in carried else self.store.get(oid, RECORD_OBJECT_MAX)
                node = self.objects.open_record(ino, oid, blob)
            except (AuthError, RecordError, MissingObject, DamagedFile):
                live.update(o for o, (i, _) in carried.items() if i == ino)
                continue
            live.update(node.blocks.values())
        return {oid: blob for oid, (_, blob) in carried.items() if oid in live}

    def _check_torn(self, data: bytes, offset: int, state: MetaState) -> None:
        """A frame header with a wrong checksum at ``offset``: stale bytes after a crash are
        harmless, but if a genuine later commit follows, the journal was damaged.

        Every well-formed candidate frame is decrypted, so the search is bounded in bytes:
        what a crash or a damaged journal leaves are frames that do not overlap (old frames,
        ciphertext), whose lengths add up to at most the bytes after ``offset``. Candidates
        that together need more than :data:`TORN_SEARCH_FACTOR` times that overlap, which only
        crafted bytes do (to make the check quadratic); they count as damage.
        """
        later = state.seq + 2
        budget = TORN_SEARCH_FACTOR * (len(data) - offset)
        for pos, sealed in frames_after(data, offset):
            budget -= len(sealed)
            if budget < 0:
                raise IntegrityError(
                    f"metadata journal record {state.seq + 1} is damaged (bad "
                    f"frame header at offset {offset}, followed by "
                    "overlapping frame headers)"
                )
            try:
                self.objects.open_commit(state.gen, later, sealed)
            except AuthError:
                continue
            except CodecError:
                pass  # authentic as commit ``later``: a genuine commit, whatever it says
            raise IntegrityError(
                f"metadata journal record {state.seq + 1} is damaged (bad "
                f"frame header at offset {offset}; commit {later} follows "
                f"at {pos})"
            )
        state.notes.append(
            f"discarded unreadable bytes after the last journal record at offset {offset}"
        )

    # --- writing -------------------------------------------------------------------------

    def open_for_append(self, state: MetaState) -> None:
        self.journal = JournalFile(self.store, state.gen)
        self.journal.open_for_append(state.journal_length)

    def append(self, commit: Commit) -> None:
        """Seal and durably append one commit (its ``seq`` must be ``self.seq + 1``); its
        carried objects are readable from the store from then on."""
        assert self.journal is not None and commit.seq == self.seq + 1
        sealed = self.objects.seal_commit(self.gen, commit)
        self.journal.append(frame(sealed))
        for oid, (_, blob) in commit.carried.items():
            self.store.carry(oid, blob)
        head = _advance(self.head, sealed)
        if self.floor - self.heads.first >= HEADS_SLACK:  # anchored since: not needed any more
            self.heads.drop_before(self.floor)
        self.heads.append(head)
        self.root = (commit.seq, head)  # durable: now the anchor may name it

    def anchored(self, seq: int) -> None:
        """The KMS now holds commit ``seq`` (or later: its anchor never goes back), so older
        heads need not be kept; commits and checkpoints drop them (under the commit lock, so
        this may be called from any thread)."""
        self.floor = max(self.floor, seq)

    @property
    def journal_length(self) -> int:
        return self.journal.length if self.journal else 0

    def write_checkpoint(self, table: dict[int, int], next_ino: int) -> None:
        """Seal the whole table into a new checkpoint and start a new journal generation.

        The checkpoint keeps the heads back to :attr:`floor`: without a KMS (or with the KMS
        out of reach) that is the floor of the checkpoint this mount loaded, so the commit the
        KMS holds stays verifiable however many checkpoints a recovery mount writes.

        Order: carried objects written as files (durable) -> new empty journal (durable) ->
        checkpoint replaced by rename (durable) -> old journal removed. A crash anywhere leaves
        a checkpoint whose journal exists, and every object the state names readable.
        """
        written = self.store.materialize()
        self.store.sync(only_if_written=True)
        new_gen = self.gen + 1
        new_journal = JournalFile(self.store, new_gen)
        new_journal.create()
        seq, head = self.root
        floor = self.floor if self.anchorable else seq
        if seq - floor > MAX_CHAIN:
            log.warning(
                "%d commits since the last one known anchored at the KMS: the "
                "checkpoint keeps the last %d; the next KMS mount cannot verify an "
                "older anchor (mount with --allow-rollback after checking this is "
                "the newest copy)",
                seq - floor,
                MAX_CHAIN,
            )
            floor = self.floor = seq - MAX_CHAIN
        cp = Checkpoint(new_gen, seq, next_ino, head, table, self.heads.between(floor, seq))
        blob = self.objects.seal_checkpoint(cp)
        self.store.replace_file(CHECKPOINT_NAME, blob)
        old = self.journal
        self.gen = new_gen
        self.journal = new_journal
        new_journal.open_for_append(0)
        self.checkpoint_size = len(blob)
        self.heads.drop_before(floor)
        if old is not None:
            old.remove()
        for oid in written:  # files now; objects carried since then stay carried
            self.store.uncarry(oid)

    def skip_to(self, table: dict[int, int], next_ino: int, epoch: int) -> None:
        """Continue this volume's history at ``epoch`` (after an operator's rollback override:
        the anchor cannot go back, so the accepted old state is re-issued as a new commit
        number). Done as a checkpoint, so the journal stays gap-free."""
        head = hashlib.sha256(
            self.head + b"sealfs rollback override" + epoch.to_bytes(8, "big")
        ).digest()
        self.root, self.heads, self.floor = (epoch, head), Heads(epoch, head), epoch
        self.write_checkpoint(table, next_ino)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    @classmethod
    def initialize(
        cls, store: ObjectStore, objects: SealedObjects, table: dict[int, int], next_ino: int
    ) -> None:
        """Write generation 1 of a brand new volume."""
        JournalFile(store, 1).create()
        cp = Checkpoint(1, 0, next_ino, ZERO_HEAD, table)
        store.replace_file(CHECKPOINT_NAME, objects.seal_checkpoint(cp))
