"""One check from start to finish: metadata, walk, data, classification, orphans.

:func:`check_volume` works on an unlocked volume and never writes. :func:`open_and_check`
adds what the command line needs: the header, unlocking, and the volume lock (shared for a
check, so two checks may run together but a mount cannot start meanwhile).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from sealfs.crypto import Secret
from sealfs.errors import BusyError, IntegrityError
from sealfs.fs.lifecycle import volume_objects
from sealfs.fs.metalog import MetaState
from sealfs.meter import Meter, NoMeter
from sealfs.sealed.codec import CODEC_LZ4, RECORD_OBJECT_MAX, block_object_max, block_overhead
from sealfs.sealed.inode import ROOT_INO, Inode
from sealfs.store import HEADER_NAME, ObjectStore
from sealfs.volume.anchor import KmsAnchor
from sealfs.volume.header import Credential, Header, KmsCredential, load_header

from .meta import check_anchor, check_header, load_metadata, stale_files
from .probe import Prober
from .report import ADVICE, Finding, Report
from .verify import BlockFailure, Job, verify_blocks
from .walk import RecordFailure, Tree, Walker, record_finding, structure_findings

_PROBE_SIBLINGS = 64
_PROBE_OTHERS = 512


@dataclass
class CheckOptions:
    full: bool = True  # verify every data object (False: --quick)
    path: str = "/"
    anchor: tuple[int, bytes] | None = None  # (epoch, head) from the KMS, if configured
    live: bool = False  # the volume is mounted: check its last committed state
    workers: int | None = None
    progress: Meter | None = None


@dataclass
class CheckResult:
    """The report plus what repair needs to act on it."""

    report: Report
    state: MetaState | None = None
    tree: Tree | None = None
    block_failures: dict[tuple[int, int], BlockFailure] = field(default_factory=dict)
    heal_blocks: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)
    heal_records: dict[int, tuple[int, int]] = field(default_factory=dict)
    orphans: list[int] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


def _rel(store: ObjectStore, oid: int) -> str:
    return str(store.object_path(oid).relative_to(store.root))


def _expected(node: Inode, idx: int, bs: int) -> int:
    return max(0, min(bs, node.size - idx * bs))


def check_volume(
    store: ObjectStore, header: Header, master: Secret, opts: CheckOptions
) -> CheckResult:
    """Check the committed state of an unlocked volume. Read-only."""
    t0 = time.monotonic()
    progress = opts.progress or NoMeter()
    objects = volume_objects(header, master)
    report = Report(header.volume_id.hex(), "full" if opts.full else "quick", opts.path)
    result = CheckResult(report)
    check_header(header, report)
    progress.note("reading metadata")
    state = load_metadata(store, objects, report)
    if state is None:
        report.stats.seconds = time.monotonic() - t0
        return result
    result.state = state
    check_anchor(state, opts.anchor, report)
    present = set(store.list_objects())
    report.stats.objects_present = len(present)

    walker = Walker(store, objects, state)
    start, start_path = walker.resolve(opts.path) if opts.path.strip("/") else (ROOT_INO, "/")
    tree = walker.walk(start, start_path)
    result.tree = tree
    report.stats.records = len(tree.nodes) + len(tree.failed)
    structure_findings(tree, report, state.next_ino)

    referenced = tree.referenced()
    whole = tree.whole_volume and not opts.live
    orphans = sorted(present - referenced) if whole else []
    result.orphans = orphans

    # data objects
    jobs: list[Job] = [
        (ino, idx, oid, _expected(node, idx, header.block_size))
        for ino, node in tree.nodes.items()
        if node.is_file and ino in tree.scope
        for idx, oid in node.blocks.items()
    ]
    report.stats.blocks = len(jobs)
    failures: list[BlockFailure] = []
    if opts.full:
        progress.start("verifying", sum(j[3] for j in jobs), len(jobs))

        def advance(nbytes: int, nobj: int) -> None:
            report.stats.block_bytes += nbytes
            progress.advance(nbytes, nobj)

        failures = verify_blocks(store, objects, jobs, opts.workers, advance)
        progress.finish()
    else:
        failures = [
            BlockFailure(ino, idx, oid, exp, "missing", None, None, "the block object is missing")
            for ino, idx, oid, exp in jobs
            if oid not in present and oid not in store.carried
        ]
    result.block_failures = {(f.ino, f.index): f for f in failures}

    prober = Prober(objects)
    failed_records = [f for f in tree.failed.values() if f.ino in tree.scope]
    for fail in sorted(failed_records, key=lambda f: tree.path(f.ino)):
        report.add(_classify_record(store, tree, fail, prober, orphans, result))
    for block_fail in sorted(failures, key=lambda f: (tree.path(f.ino), f.index)):
        report.add(_classify_block(store, tree, block_fail, prober, orphans, result))
    if prober.exhausted:
        report.notes.append(
            "the swap/rollback probe budget ran out; some objects reported "
            "as tampered may be swapped or replayed copies"
        )
    for f in report.findings:  # now that heal sources are known, sharpen the advice
        healable_block = f.what.startswith("block") and (f.ino, f.index) in result.heal_blocks
        if healable_block or (f.what == "record" and f.ino in result.heal_records):
            f.advice = ADVICE["healable"]

    keep = bool(tree.failed)
    for oid in orphans:
        report.add(
            Finding(
                "orphaned",
                None,
                "object",
                _rel(store, oid),
                "referenced by nothing" + (" (kept)" if keep else ""),
                ADVICE["orphaned-kept" if keep else "orphaned"],
                corrupt=False,
                oid=oid,
            )
        )
    if whole:
        result.stale = stale_files(store, state.gen)
        for name in result.stale:
            report.add(
                Finding(
                    "orphaned",
                    None,
                    "file",
                    name,
                    "left over from an interrupted checkpoint",
                    ADVICE["orphaned"],
                    corrupt=False,
                )
            )
    elif opts.live:
        report.notes.append(
            "live volume: orphans are not reported (a mounted volume has objects in flight)"
        )
    else:
        report.notes.append(
            f"only {opts.path} was checked: orphans and the link counts of "
            "entries outside it were not"
        )
    report.stats.seconds = time.monotonic() - t0
    return result


def _classify_record(
    store: ObjectStore,
    tree: Tree,
    fail: RecordFailure,
    prober: Prober,
    orphans: list[int],
    result: CheckResult,
) -> Finding:
    finding = record_finding(tree, fail, store)
    if fail.reason != "auth" or finding.kind == "truncated":
        return finding
    try:
        blob = store.get(fail.oid, RECORD_OBJECT_MAX)
    except Exception:  # noqa: BLE001 - vanished meanwhile: keep the first classification
        return finding
    others = [(i, o) for i, o in tree.table.items() if i != fail.ino]
    hit = prober.record(blob, islice(others, _PROBE_OTHERS))
    if hit is not None:
        ino2, _ = hit
        finding.kind = "swapped"
        finding.belongs_to = f"record of {tree.path(ino2)}"
        finding.detail = (
            f"the record object holds the record of {tree.path(ino2)} (inode {ino2}) instead"
        )
        result.heal_records[ino2] = (fail.ino, fail.oid)
        return finding
    hit = prober.record(blob, ((fail.ino, o) for o in islice(orphans, _PROBE_OTHERS)))
    if hit is not None:
        finding.kind = "rolled-back"
        finding.belongs_to = f"older record {hit[1]:016x} of {tree.path(fail.ino)}"
        finding.detail = (
            f"the record object holds an older version of this record (the one "
            f"once stored as {_rel(store, hit[1])})"
        )
    return finding


def _classify_block(
    store: ObjectStore,
    tree: Tree,
    fail: BlockFailure,
    prober: Prober,
    orphans: list[int],
    result: CheckResult,
) -> Finding:
    path = tree.path(fail.ino)
    obj = _rel(store, fail.oid)
    what = f"block {fail.index}"
    advice = ADVICE["file"]

    def make(kind: str, detail: str) -> Finding:
        return Finding(
            kind, path, what, obj, detail, advice, ino=fail.ino, index=fail.index, oid=fail.oid
        )

    if fail.reason == "missing":
        return make("missing", "the block object is missing")
    if fail.reason in ("io", "decode"):
        return make("unreadable", fail.message)
    if fail.reason == "damaged":
        return make("tampered", fail.message)
    assert fail.size is not None
    overhead = block_overhead(fail.codec)
    if fail.size < overhead:
        return make("truncated", f"the block object is only {fail.size} bytes")
    try:
        blob = store.get(fail.oid, block_object_max(prober.block_size))
    except Exception:  # noqa: BLE001
        blob = b""
    node = tree.nodes[fail.ino]
    same_file = sorted(
        ((fail.ino, j, o) for j, o in node.blocks.items() if j != fail.index),
        key=lambda c: abs(c[1] - fail.index),
    )[:_PROBE_SIBLINGS]
    others = [
        (ino2, fail.index, n2.blocks[fail.index])
        for ino2, n2 in tree.nodes.items()
        if ino2 != fail.ino and n2.is_file and fail.index in n2.blocks
    ]
    hit = prober.block(blob, [*same_file, *others[:_PROBE_OTHERS]]) if blob else None
    if hit is not None:
        ino2, idx2, _ = hit
        where = "this file" if ino2 == fail.ino else tree.path(ino2)
        f = make("swapped", f"the object holds block {idx2} of {where} instead")
        f.belongs_to = f"{tree.path(ino2)} block {idx2}"
        result.heal_blocks[(ino2, idx2)] = (fail.ino, fail.index, fail.oid)
        return f
    hit = (
        prober.block(blob, ((fail.ino, fail.index, o) for o in orphans[:_PROBE_OTHERS]))
        if blob
        else None
    )
    if hit is not None:
        f = make(
            "rolled-back",
            "the object holds an older version of this block (once "
            f"stored as {_rel(store, hit[2])})",
        )
        f.belongs_to = f"older block {hit[2]:016x}"
        return f
    raw = fail.codec is not None and not fail.codec & CODEC_LZ4
    if raw and fail.size < overhead + fail.expected:
        return make(
            "truncated",
            f"the block object is {fail.size} bytes, shorter than the "
            f"{overhead + fail.expected} a block at this position takes",
        )
    if raw and fail.size > overhead + fail.expected:
        return make(
            "tampered",
            f"the block object is {fail.size} bytes, longer than any "
            "block (extended) and fails authentication",
        )
    return make("tampered", "the block fails authentication (modified, or from another volume)")


# --- the command-line entry point ------------------------------------------------------------


def open_and_check(
    backing: Path, cred: Credential, opts: CheckOptions, exclusive: bool = False
) -> tuple[CheckResult, ObjectStore, Header, Secret | None]:
    """Load the header, unlock, lock and check. A header that fails its MAC is a finding
    (exit 5), not an error: it is tampering, and the user gets the same report as for any
    other. The returned store holds the volume lock (shared, or exclusive for a repair)
    unless ``opts.live``; release it with ``store.unlock()``.

    With a KMS credential the volume is compared with (never advances) the KMS's anchor of
    the volume id in the header just unlocked: any earlier read of the header is the host's
    to change, and would let it have the anchor of another (never anchored) volume checked."""
    header = load_header(backing)
    store = ObjectStore(backing)
    try:
        master = header.unlock(cred)
    except IntegrityError as e:
        report = Report(header.volume_id.hex(), "full" if opts.full else "quick", opts.path)
        report.add(Finding("tampered", None, "header", HEADER_NAME, str(e), ADVICE["volume"]))
        return CheckResult(report), store, header, None
    if isinstance(cred, KmsCredential):
        opts.anchor = KmsAnchor(cred.client, header.volume_id).fetch()
    if exclusive or not opts.live:
        opts.live = False
        try:
            store.lock(shared=not exclusive)
        except BusyError:
            hint = "" if exclusive else (", or pass --read-only to check its last committed state")
            raise BusyError(
                f"volume {backing} is mounted (or being checked or repaired); "
                f"unmount it first{hint}"
            ) from None
    elif not store.is_locked():
        opts.live = False  # nothing is mounted after all: take the lock and check normally
        store.lock(shared=True)
    try:
        result = check_volume(store, header, master, opts)
        if opts.live:
            result = _settle_live(store, header, master, opts, result)
    except BaseException:
        store.unlock()
        raise
    return result, store, header, master


def _settle_live(
    store: ObjectStore,
    header: Header,
    master: Secret,
    opts: CheckOptions,
    result: CheckResult,
    attempts: int = 3,
) -> CheckResult:
    """A mounted volume deletes superseded objects after each commit, so an object found
    missing may simply have been replaced meanwhile. Objects are never overwritten in place,
    so authentication failures are always real. Repeat the check until it ran against an
    epoch that did not move, or nothing was missing."""
    objects = volume_objects(header, master)
    for _ in range(attempts):
        missing = [
            f
            for f in result.report.findings
            if f.kind == "missing" or (f.kind == "tampered" and f.what == "journal")
        ]
        if not missing:
            return result
        probe = Report("", "", "")
        now = load_metadata(store, objects, probe)
        if (
            now is not None
            and result.state is not None
            and now.seq == result.state.seq
            and not probe.findings
        ):
            return result
        result = check_volume(store, header, master, opts)
    result.report.notes.append(
        "the live volume kept changing; findings of missing objects "
        "may be objects replaced during the check"
    )
    return result
