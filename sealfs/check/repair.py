"""``sealfs check --repair``: make the volume check clean without ever making it worse.

Crash safety comes from doing every change as one ordinary commit through the filesystem
core (docs/format.md's crash rules): healed content is written as *new* objects, the block
maps, entries, link counts and the quarantine all change in memory, and a single journal
record switches to the new state. Objects are deleted only after that commit. A kill at any
point therefore leaves either the old state (plus orphans, which the next repair removes) or
the new one, and running the repair again finishes the job.

What it does, in this order:

* heal: an object found *swapped* holds the authentic content of another position; that
  content is re-sealed under its proper identity (new object id), so both halves of a swap
  come back intact;
* quarantine: a file with blocks that cannot be healed loses only those blocks (they read as
  zeros afterwards), gets a ``user.sealfs.damage`` xattr saying why, and moves to
  ``/lost+found/<ino>-<name>``;
* drop: an entry whose record cannot be read or healed is removed (and its inode dropped
  from the table); an entry pointing to no inode is removed;
* reattach: inodes no directory names (they sat below a damaged directory) are linked into
  ``/lost+found`` as ``#<ino>``, with their content intact;
* rebuild: link counts, directory parent pointers and the inode counter are recomputed;
* delete orphans (only when no record was unreadable: an orphan might then belong to it) and
  leftovers of an interrupted checkpoint rollover.

Volume-level damage (header, checkpoint, journal, a rollback proven by the anchor) is not
repairable in place; the plan says so and changes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from sealfs.crypto import Secret
from sealfs.fs.core import Filesystem
from sealfs.sealed.codec import RECORD_OBJECT_MAX, block_object_max
from sealfs.sealed.inode import ROOT_INO, Inode
from sealfs.store import ObjectStore
from sealfs.volume.header import Header

from .run import CheckResult

LOST_FOUND = b"lost+found"
DAMAGE_XATTR = b"user.sealfs.damage"
#: Test hook: SIGKILL the repair at this named point (see tests/check/test_repair.py).
KILL_ENV = "SEALFS_REPAIR_KILL_AT"


@dataclass
class Plan:
    """Every change a repair makes, computed before anything is touched (``--dry-run``)."""

    heal_blocks: list[tuple[int, int, int, int]] = field(default_factory=list)  # ino idx own src
    heal_records: list[tuple[int, int, int]] = field(default_factory=list)  # ino, src ino, oid
    quarantine: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    drop: list[int] = field(default_factory=list)  # inodes whose records are lost
    dangling: list[tuple[int, bytes, str]] = field(default_factory=list)
    reattach: list[int] = field(default_factory=list)
    rebuild: bool = False
    orphans: list[int] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    irreparable: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    @property
    def changes_metadata(self) -> bool:
        return bool(
            self.heal_blocks
            or self.heal_records
            or self.quarantine
            or self.drop
            or self.dangling
            or self.reattach
            or self.rebuild
        )


def plan_repair(result: CheckResult) -> Plan:
    report, tree = result.report, result.tree
    plan = Plan()
    volume_level = [f for f in report.problems if f.path is None]
    if volume_level or tree is None:
        plan.irreparable = [f.line() for f in volume_level]
        plan.actions.append(
            "nothing: volume-level damage cannot be repaired in place "
            "(restore the backing directory from a backup)"
        )
        return plan
    a = plan.actions
    for (ino, idx), (_src_ino, _src_idx, src_oid) in sorted(result.heal_blocks.items()):
        if (ino, idx) in result.block_failures and ino in tree.nodes:
            plan.heal_blocks.append((ino, idx, tree.nodes[ino].blocks[idx], src_oid))
            a.append(f"heal {tree.path(ino)} block {idx} from object {src_oid:016x}")
    healed = {(i, x) for i, x, *_ in plan.heal_blocks}
    for ino, (src_ino, src_oid) in sorted(result.heal_records.items()):
        if ino in tree.failed:
            plan.heal_records.append((ino, src_ino, src_oid))
            a.append(f"heal the record of {tree.path(ino)} from object {src_oid:016x}")
    healed_records = {i for i, *_ in plan.heal_records}
    for f in report.problems:
        if f.index is not None and f.ino is not None and (f.ino, f.index) not in healed:
            plan.quarantine.setdefault(f.ino, []).append(
                {"block": f.index, "kind": f.kind, "object": f.object, "detail": f.detail}
            )
    for ino in sorted(plan.quarantine):
        idxs = sorted(d["block"] for d in plan.quarantine[ino])
        a.append(
            f"quarantine {tree.path(ino)} into /lost+found/{ino}-"
            f"{os.path.basename(tree.path(ino))} (blocks {idxs} dropped; they read "
            "as zeros)"
        )
    for ino in sorted(tree.failed):
        if ino not in healed_records:
            plan.drop.append(ino)
            a.append(
                f"remove {tree.path(ino)} (its record is {_kind_of(report, ino)} and "
                "cannot be healed)"
            )
    for parent, name, _child, path in tree.dangling:
        plan.dangling.append((parent, name, path))
        a.append(f"remove the dangling entry {path}")
    for top in tree.unreached:
        if top in tree.nodes:
            plan.reattach.append(top)
            a.append(f"reattach {tree.path(top)} as /lost+found/#{top}")
    plan.rebuild = any(f.kind == "inconsistent" for f in report.problems) or plan.changes_metadata
    if plan.rebuild:
        a.append("rebuild link counts, parent pointers and the inode counter")
    if not tree.failed:
        plan.orphans = list(result.orphans)
    if plan.orphans:
        a.append(f"delete {len(plan.orphans)} orphaned object(s) after the commit")
    plan.stale = list(result.stale)
    for stale in plan.stale:
        a.append(f"delete the leftover {stale}")
    return plan


def _kind_of(report: Any, ino: int) -> str:
    for f in report.findings:
        if f.ino == ino and f.what == "record":
            return str(f.kind)
    return "damaged"


def _failpoint(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def apply_repair(
    store: ObjectStore, header: Header, master: Secret, result: CheckResult, plan: Plan
) -> None:
    """Carry out ``plan``; the caller holds the exclusive volume lock."""
    if plan.irreparable:
        return
    if plan.changes_metadata:
        trio.run(_commit_repair, store, header, master, result, plan)
    _failpoint("after-commit")
    for i, oid in enumerate(plan.orphans):
        store.delete(oid)
        if i == len(plan.orphans) // 2:
            _failpoint("mid-orphans")
    for name in plan.stale:
        store.remove_file(name)


async def _commit_repair(
    store: ObjectStore, header: Header, master: Secret, result: CheckResult, plan: Plan
) -> None:
    tree = result.tree
    assert tree is not None
    fs = Filesystem(store, header, master)
    await fs.load(writable=True)
    try:
        await _heal(fs, store, plan)
        lf = await _lost_found(fs)
        log: list[dict[str, Any]] = []
        await _quarantine(fs, tree, plan, lf, log)
        await _drop(fs, tree, plan, log)
        for top in plan.reattach:
            if fs.has_inode(top) and top not in await _named_by_live_dirs(fs, top):
                lf.entries.add(f"#{top}".encode(), top)  # type: ignore[union-attr]
                log.append({"action": "reattached", "path": f"/lost+found/#{top}", "inode": top})
        await _rebuild(fs)
        await _write_report(fs, lf, log)
        await fs.write_back()
        _failpoint("before-commit")
        await fs.commit()
    finally:
        fs.metalog.close()


async def _heal(fs: Filesystem, store: ObjectStore, plan: Plan) -> None:
    """Re-seal content found in the wrong object under its own identity. Every source is read
    before anything is written (a source may be the target of another heal)."""
    objects, bs = fs.objects, fs.block_size
    blocks = []
    for ino, idx, own_oid, src_oid in plan.heal_blocks:
        data = objects.open_block(ino, idx, own_oid, store.get(src_oid, block_object_max(bs)))
        blocks.append((ino, idx, data))
    for ino, _src_ino, src_oid in plan.heal_records:
        fs.heal_record(ino, store.get(src_oid, RECORD_OBJECT_MAX))
    for ino, idx, data in blocks:
        node = await fs.node(ino)
        length = max(0, min(bs, node.size - idx * bs))
        mtime, ctime = node.mtime_ns, node.ctime_ns
        await fs.write(node, idx * bs, data.ljust(length, b"\0")[:length])
        node.mtime_ns, node.ctime_ns = mtime, ctime
        node.damaged.discard(idx)


async def _lost_found(fs: Filesystem) -> Inode:
    root = await fs.node(ROOT_INO)
    assert root.entries is not None
    ino = root.entries.get(LOST_FOUND)
    if ino is not None:
        try:
            node = await fs.node(ino, (ROOT_INO, LOST_FOUND))
            if node.is_dir:
                return node
        except Exception:  # noqa: BLE001 - a damaged /lost+found is dropped by the plan
            pass
        name = LOST_FOUND + b".sealfs"
        existing = root.entries.get(name)
        if existing is not None:
            return await fs.node(existing, (ROOT_INO, name))
        return await fs.create(ROOT_INO, name, stat.S_IFDIR | 0o700, 0, 0)
    return await fs.create(ROOT_INO, LOST_FOUND, stat.S_IFDIR | 0o700, 0, 0)


def _free_name(lf: Inode, want: bytes) -> bytes:
    assert lf.entries is not None
    name, n = want[:240], 1
    while name in lf.entries:
        name, n = want[:230] + b".%d" % n, n + 1
    return name


async def _quarantine(
    fs: Filesystem, tree: Any, plan: Plan, lf: Inode, log: list[dict[str, Any]]
) -> None:
    for ino, damage in sorted(plan.quarantine.items()):
        node = await fs.node(ino)
        for d in damage:
            node.blocks.pop(d["block"], None)  # the object stays as an orphan until next repair
            node.damaged.discard(d["block"])
        path = tree.path(ino)
        record = {"path": path, "repaired": int(time.time()), "dropped_blocks": damage}
        value = json.dumps(record, sort_keys=True).encode()[:60000]
        await fs.setxattr(ino, DAMAGE_XATTR, value)
        links = list(tree.entry_of.get(ino, []))
        if not links:
            continue
        for parent, name in links[1:]:
            await fs.unlink(parent, name, want_dir=False)
        parent, name = links[0]
        new = _free_name(lf, b"%d-" % ino + name)
        await fs.rename(parent, name, lf.ino, new)
        log.append(
            {
                "action": "quarantined",
                "path": path,
                "now": "/lost+found/" + new.decode("utf-8", "backslashreplace"),
                "inode": ino,
                "dropped_blocks": damage,
            }
        )


async def _drop(fs: Filesystem, tree: Any, plan: Plan, log: list[dict[str, Any]]) -> None:
    """Remove entries whose record is lost, and the lost inodes themselves from the table."""
    for ino in plan.drop:
        links = list(tree.entry_of.get(ino, []))
        for parent, name in links:
            pnode = await fs.node(parent)
            if pnode.entries is not None and pnode.entries.get(name) == ino:
                pnode.entries.remove(name)
                fs.mark(pnode)
        fs.drop_inode(ino)
        log.append(
            {
                "action": "removed",
                "path": tree.path(ino),
                "inode": ino,
                "why": "its record is unreadable and could not be healed",
            }
        )
    for parent, name, path in plan.dangling:
        pnode = await fs.node(parent)
        if pnode.entries is not None and name in pnode.entries:
            pnode.entries.remove(name)
            await fs.setattr(parent, ctime_ns=pnode.ctime_ns)
            log.append(
                {
                    "action": "removed",
                    "path": path,
                    "why": "the entry named an inode that does not exist",
                }
            )


async def _named_by_live_dirs(fs: Filesystem, ino: int) -> set[int]:
    """{ino} if a directory reachable from the root names ``ino`` (it was healed back)."""
    for parent in await _reachable(fs):
        node = await fs.node(parent)
        if node.entries is not None and ino in node.entries.names.values():
            return {ino}
    return set()


async def _reachable(fs: Filesystem) -> list[int]:
    order, todo, seen = [], [ROOT_INO], {ROOT_INO}
    while todo:
        ino = todo.pop()
        order.append(ino)
        node = await fs.node(ino)
        if node.entries is None:
            continue
        for child in node.entries.names.values():
            if child not in seen and fs.has_inode(child):
                seen.add(child)
                todo.append(child)
    return order


async def _rebuild(fs: Filesystem) -> None:
    """Recompute every derived count from the entries themselves."""
    links: dict[int, int] = {}
    order = await _reachable(fs)
    for ino in order:
        node = await fs.node(ino)
        if node.entries is None:
            continue
        subdirs = 0
        for child in node.entries.names.values():
            c = await fs.node(child)
            links[child] = links.get(child, 0) + 1
            if c.is_dir:
                subdirs += 1
                if c.parent != ino:
                    c.parent = ino
                    fs.mark(c)
        if node.nlink != 2 + subdirs:
            node.nlink = 2 + subdirs
            fs.mark(node)
    for ino in order:
        node = await fs.node(ino)
        if node.entries is None and node.nlink != links.get(ino, 0):
            node.nlink = links.get(ino, 0)
            fs.mark(node)
    fs.renumber_past_known()


async def _write_report(fs: Filesystem, lf: Inode, log: list[dict[str, Any]]) -> None:
    """Append what was done to /lost+found/REPORT (inside the volume: sealed like the rest)."""
    if not log:
        return
    assert lf.entries is not None
    ino = lf.entries.get(b"REPORT")
    node = (
        (await fs.node(ino))
        if ino is not None
        else await fs.create(lf.ino, b"REPORT", stat.S_IFREG | 0o600, 0, 0)
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = "".join(json.dumps({"time": stamp, **e}, sort_keys=True) + "\n" for e in log)
    await fs.write(node, node.size, text.encode())
