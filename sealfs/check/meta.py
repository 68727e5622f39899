"""Volume-level checks: header and key slots, checkpoint + journal replay, freshness anchor.

These are the objects without a plaintext path. A failure here is reported as one volume-level
finding; the table cannot be trusted after it, so the walk stops (there is nothing sound to
walk). Loading reuses :class:`sealfs.fs.metalog.MetaLog` itself (the exact replay a mount
does), preceded by a few cheap probes that tell *missing* from *truncated* from *tampered*.
"""

from __future__ import annotations

from sealfs.crypto import AEAD_OVERHEAD, SEAL_OVERHEAD, AuthError
from sealfs.errors import IntegrityError
from sealfs.fs.metalog import MetaLog, MetaState
from sealfs.sealed.codec import CHECKPOINT_MAX, CodecError
from sealfs.sealed.objects import SealedObjects
from sealfs.store import (
    CHECKPOINT_NAME,
    HEADER_NAME,
    DamagedFile,
    MissingObject,
    ObjectStore,
    journal_name,
)
from sealfs.volume.anchor import RollbackError, verify_fresh
from sealfs.volume.header import Header

from .report import ADVICE, Finding, Report

#: Slot types this version knows; others are reported as a note (a newer sealfs wrote them).
KNOWN_SLOT_TYPES = {"keyfile", "passphrase", "kms"}
_WRAPPED_LEN = 32 + AEAD_OVERHEAD
_CHECKPOINT_MIN = 5 + SEAL_OVERHEAD + 64
REKEY_NOTE = (
    "rekey in progress: objects open under the new master key or the previous one; run "
    "`sealfs rekey` again to finish it (until then the previous key is not revoked)"
)


def check_header(header: Header, report: Report) -> None:
    """Key-slot sanity beyond what unlocking proved (the MAC over the header was verified by
    :meth:`Header.unlock`, so every field here is authentic; this catches our own bugs and
    slots from a newer version)."""
    if header.rekey_in_progress:
        report.notes.append(REKEY_NOTE)
    ids = [s.id for s in header.slots]
    if len(set(ids)) != len(ids):
        report.add(
            Finding(
                "inconsistent",
                None,
                "header",
                HEADER_NAME,
                f"duplicate key slot ids {sorted(ids)}",
                ADVICE["volume"],
            )
        )
    for s in header.slots:
        if s.type not in KNOWN_SLOT_TYPES:
            report.notes.append(
                f"key slot {s.id} has unknown type {s.type!r} (written by a "
                "newer sealfs?); it was not checked"
            )
        elif s.type in ("keyfile", "passphrase") and len(s.wrapped) != _WRAPPED_LEN:
            report.add(
                Finding(
                    "inconsistent",
                    None,
                    "header",
                    HEADER_NAME,
                    f"key slot {s.id} holds a wrapped key of {len(s.wrapped)} "
                    f"bytes, expected {_WRAPPED_LEN}",
                    ADVICE["volume"],
                )
            )
        elif s.type == "keyfile" and len(s.salt) < 16:
            report.add(
                Finding(
                    "inconsistent",
                    None,
                    "header",
                    HEADER_NAME,
                    f"key-file slot {s.id} has no salt",
                    ADVICE["volume"],
                )
            )


def load_metadata(store: ObjectStore, objects: SealedObjects, report: Report) -> MetaState | None:
    """Replay checkpoint + journal read-only; on failure add one finding and return None."""
    try:
        blob = store.read_file(CHECKPOINT_NAME, CHECKPOINT_MAX)
    except MissingObject:
        report.add(
            Finding(
                "missing",
                None,
                "checkpoint",
                CHECKPOINT_NAME,
                "the metadata checkpoint is missing",
                ADVICE["volume"],
            )
        )
        return None
    except DamagedFile as e:
        report.add(
            Finding("tampered", None, "checkpoint", CHECKPOINT_NAME, str(e), ADVICE["volume"])
        )
        return None
    try:
        cp = objects.open_checkpoint(blob)
    except (AuthError, CodecError) as e:
        kind = "truncated" if len(blob) < _CHECKPOINT_MIN else "tampered"
        report.add(
            Finding(
                kind,
                None,
                "checkpoint",
                CHECKPOINT_NAME,
                f"the metadata checkpoint ({len(blob)} bytes) failed verification: {e}",
                ADVICE["volume"],
            )
        )
        return None
    jname = journal_name(cp.gen)
    if not store.exists(jname):
        report.add(
            Finding(
                "missing",
                None,
                "journal",
                jname,
                f"the metadata journal of generation {cp.gen} is missing",
                ADVICE["volume"],
            )
        )
        return None
    try:
        state = MetaLog(store, objects).load()
    except IntegrityError as e:
        report.add(Finding("tampered", None, "journal", jname, str(e), ADVICE["volume"]))
        return None
    for note in state.notes:  # a torn last append: what a crash leaves, never an alarm
        report.notes.append(
            f"{jname}: {note} (left by a crash; cut off at the next mount or repair)"
        )
    report.epoch, report.head = state.seq, state.head.hex()
    return state


def check_anchor(state: MetaState, anchor: tuple[int, bytes] | None, report: Report) -> None:
    """Compare the replayed volume root ``(epoch, head)`` with the external anchor (the KMS's
    monotonic per-volume counter) by the very rule a mount applies
    (:func:`sealfs.volume.anchor.verify_fresh`), so check and mount always agree. Without an
    anchor, a whole-volume rollback is undetectable and the report says so."""
    if anchor is None:
        report.notes.append(
            "no freshness anchor given: a rollback of the whole volume to an "
            "older copy cannot be detected (use a KMS-anchored volume)"
        )
        return
    if anchor == (0, b""):
        report.notes.append(
            "the KMS has not anchored this volume yet (never mounted with "
            "--kms): a rollback of the whole volume cannot be detected"
        )
        return
    try:
        verify_fresh(state.seq, state.heads, anchor)
    except RollbackError as e:
        kind = "rolled-back" if e.reason == "rolled back" else "tampered"
        report.add(
            Finding(kind, None, "volume", journal_name(state.gen), str(e), ADVICE["rollback"])
        )
        return
    if state.seq > anchor[0]:
        report.notes.append(
            f"the volume is {state.seq - anchor[0]} commit(s) ahead of its "
            "anchor (a crash between commit and anchor update, or a mount "
            "without the KMS); the next KMS mount advances the anchor"
        )


def stale_files(store: ObjectStore, gen: int) -> list[str]:
    """Leftovers of an interrupted checkpoint rollover: older journal generations and a
    temporary checkpoint (or anything planted under those names but a directory, which repair
    could not unlink). Harmless; repair deletes them."""
    out = []
    for name in store.names(dirs=False):
        old_journal = name.startswith("journal.") and name != journal_name(gen)
        if old_journal or name == f".{CHECKPOINT_NAME}.tmp":
            out.append(name)
    return out
