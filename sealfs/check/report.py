"""What a check found: findings with plaintext path, kind, backing object and advice.

A finding is the unit users act on (DESIGN.md, "What users complain about", point 2): it says
*where* (the plaintext path, or the volume-level file for metadata), *what* happened (a kind
from :data:`KINDS`), *which* backing object holds the problem, and *what to do*. Findings that
are normal after a crash (orphaned objects, a torn journal tail) carry ``corrupt=False`` and
never change the exit code, so a crash never raises a false tamper alarm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Every kind a finding can have, with its meaning (docs/check.md lists the same).
KINDS: dict[str, str] = {
    "tampered": "fails authentication: modified, or from another volume",
    "missing": "the object the metadata refers to is not in the backing directory",
    "rolled-back": "an older, once-valid version was put back (replay / volume rollback)",
    "swapped": "authentic, but belongs to another file, position or record",
    "truncated": "shorter than it was written",
    "orphaned": "present but referenced by nothing (normal leftover of a crash)",
    "unreadable": "cannot be reached or decoded because something it depends on is damaged",
    "inconsistent": "authentic metadata that contradicts itself (link counts, dangling or "
    "lost entries): a sealfs bug, not an attack",
}

ADVICE = {
    "volume": "the volume cannot be repaired in place: restore the backing directory from a "
    "backup, or recover the files still readable from a read-only copy",
    "file": "run `sealfs check --repair` to move the file into /lost+found (its intact blocks "
    "stay readable, damaged ones read as zeros), then restore it from a backup",
    "healable": "run `sealfs check --repair`: the authentic content was found in another "
    "object and is put back where it belongs",
    "record": "run `sealfs check --repair` to remove the unreadable entry (what it held is "
    "reattached under /lost+found where possible), then restore it from a backup",
    "orphaned": "nothing to do; `sealfs check --repair` deletes it",
    "orphaned-kept": "kept: it may belong to a damaged file; `sealfs check --repair` "
    "deletes it once the damaged files are repaired",
    "inconsistent": "run `sealfs check --repair` to rebuild the link counts and reattach or "
    "drop the entries",
    "rollback": "do not use this copy: the anchor proves a newer state existed; find the "
    "newest copy of the backing directory",
}


@dataclass
class Finding:
    """One problem (or, with ``corrupt=False``, one harmless leftover)."""

    kind: str
    path: str | None  # plaintext path; None for volume-level objects (header, journal)
    what: str  # "header", "checkpoint", "journal", "record", "block 3", "entry", "object"
    object: str | None  # backing file, relative to the backing directory
    detail: str
    advice: str
    corrupt: bool = True
    ino: int | None = None
    index: int | None = None
    oid: int | None = None
    belongs_to: str | None = None  # swapped / rolled back: the identity the object opens as

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["oid"] = f"{self.oid:016x}" if self.oid is not None else None
        return d

    def line(self) -> str:
        where = self.path if self.path is not None else "(volume)"
        obj = f" [{self.object}]" if self.object else ""
        return f"{self.kind:>12}  {where}: {self.what}{obj}: {self.detail}"


@dataclass
class Stats:
    records: int = 0
    blocks: int = 0
    block_bytes: int = 0
    objects_present: int = 0
    seconds: float = 0.0


@dataclass
class Report:
    """The whole outcome of one check (and, with ``--repair``, of the repair)."""

    volume_id: str
    mode: str  # "quick" or "full"
    scope: str  # "/" or the --path subtree
    epoch: int | None = None
    head: str | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    repair: dict[str, Any] | None = None

    def add(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        return finding

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.corrupt]

    @property
    def clean(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.clean,
            "volume_id": self.volume_id,
            "mode": self.mode,
            "scope": self.scope,
            "epoch": self.epoch,
            "head": self.head,
            "problems": len(self.problems),
            "findings": [f.to_dict() for f in self.findings],
            "notes": self.notes,
            "stats": asdict(self.stats),
            "repair": self.repair,
        }

    def human(self, max_orphans: int = 20) -> str:
        s = self.stats
        rate = s.block_bytes / s.seconds / 2**20 if s.seconds else 0.0
        out = [
            f"volume {self.volume_id} ({self.mode} check of {self.scope}, epoch "
            f"{self.epoch}): {s.records} records, {s.blocks} data objects, "
            f"{s.block_bytes / 2**20:.1f} MiB verified in {s.seconds:.1f}s "
            f"({rate:.0f} MiB/s)"
        ]
        orphans = [f for f in self.findings if f.kind == "orphaned" and not f.corrupt]
        for f in self.findings:
            if f in orphans:
                continue
            out.append(f.line())
            out.append(f"{'':>14}-> {f.advice}")
        if orphans:
            for f in orphans[:max_orphans]:
                out.append(f.line())
            if len(orphans) > max_orphans:
                out.append(f"{'':>14}... and {len(orphans) - max_orphans} more orphaned objects")
            out.append(f"{'':>14}-> {orphans[0].advice}")
        out += [f"note: {n}" for n in self.notes]
        if self.repair is not None:
            verb = "would" if self.repair.get("dry_run") else "did"
            for a in self.repair.get("actions", []):
                out.append(f"repair ({verb}): {a}")
        if self.clean:
            out.append("clean: no corruption found")
        else:
            out.append(f"CORRUPTION FOUND: {len(self.problems)} problem(s)")
        return "\n".join(out)
