"""The metadata walk: every inode record of the checked scope, its paths and link counts.

Read-only by construction: it uses the store's read methods and the codec, never the
filesystem core's write path. Records are loaded breadth-first, one directory level at a time,
in a small thread pool (the reads overlap; the records are small). The walk gives each inode
its plaintext paths, which is what every later finding is reported by.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sealfs.crypto import SEAL_OVERHEAD, AuthError
from sealfs.errors import StorageError, UsageError
from sealfs.fs.metalog import MetaState
from sealfs.sealed.codec import RECORD_OBJECT_MAX
from sealfs.sealed.inode import ROOT_INO, Inode, RecordError
from sealfs.sealed.objects import SealedObjects
from sealfs.store import DamagedFile, MissingObject, ObjectStore

from .report import ADVICE, Finding, Report


@dataclass
class RecordFailure:
    """Why one inode record could not be used (classified further by the prober)."""

    ino: int
    oid: int
    reason: str  # "missing", "damaged" (not a plausible file), "auth", "decode", "io"
    size: int | None
    message: str


@dataclass
class Tree:
    """What the walk learnt about the checked scope."""

    table: dict[int, int]
    nodes: dict[int, Inode] = field(default_factory=dict)  # records that opened
    failed: dict[int, RecordFailure] = field(default_factory=dict)
    paths: dict[int, list[str]] = field(default_factory=dict)
    links: Counter[int] = field(default_factory=Counter)  # directory entries per inode
    entry_of: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    dangling: list[tuple[int, bytes, int, str]] = field(default_factory=list)
    unreached: list[int] = field(default_factory=list)  # tops of unreachable inodes
    scope: set[int] = field(default_factory=set)  # inodes walked (the subtree, or all)
    scope_root: int = ROOT_INO
    whole_volume: bool = True

    def path(self, ino: int) -> str:
        p = self.paths.get(ino)
        return p[0] if p else f"<inode {ino}>"

    def referenced(self) -> set[int]:
        """Every object id the table or a loaded block map refers to."""
        out = set(self.table.values())
        for node in self.nodes.values():
            out.update(node.blocks.values())
        return out


def _join(base: str, name: bytes) -> str:
    return f"{base.rstrip('/')}/{name.decode('utf-8', 'backslashreplace')}"


class Walker:
    """Loads records and walks the tree of one volume state."""

    def __init__(
        self, store: ObjectStore, objects: SealedObjects, state: MetaState, threads: int = 4
    ) -> None:
        self.store = store
        self.objects = objects
        self.tree = Tree(dict(state.table))
        self.threads = threads

    # --- loading records -----------------------------------------------------------------

    def _load(self, ino: int) -> Inode | RecordFailure:
        oid = self.tree.table[ino]
        try:
            blob = self.store.get(oid, RECORD_OBJECT_MAX)
        except MissingObject:
            return RecordFailure(ino, oid, "missing", None, "the record object is missing")
        except DamagedFile as e:
            return RecordFailure(ino, oid, "damaged", None, str(e))
        except StorageError as e:
            return RecordFailure(ino, oid, "io", None, str(e))
        try:
            return self.objects.open_record(ino, oid, blob)
        except AuthError as e:
            return RecordFailure(ino, oid, "auth", len(blob), str(e))
        except RecordError as e:
            return RecordFailure(ino, oid, "decode", len(blob), str(e))

    def load_many(self, inos: list[int]) -> None:
        todo = [
            i for i in dict.fromkeys(inos) if i not in self.tree.nodes and i not in self.tree.failed
        ]
        if not todo:
            return
        if len(todo) < 8:
            results = [self._load(i) for i in todo]
        else:
            with ThreadPoolExecutor(self.threads) as ex:
                results = list(ex.map(self._load, todo))
        for ino, res in zip(todo, results, strict=True):
            if isinstance(res, Inode):
                self.tree.nodes[ino] = res
            else:
                self.tree.failed[ino] = res

    # --- walking -------------------------------------------------------------------------

    def resolve(self, path: str) -> tuple[int, str]:
        """The inode of ``path`` (a directory), loading only the records along the way."""
        ino, cur = ROOT_INO, "/"
        for part in [p for p in path.split("/") if p]:
            self.load_many([ino])
            node = self.tree.nodes.get(ino)
            if node is None:
                raise UsageError(
                    f"cannot resolve {path}: the record of {cur} is damaged; check {cur} instead"
                )
            if node.entries is None:
                raise UsageError(f"{cur} is not a directory")
            child = node.entries.get(part.encode("utf-8", "surrogateescape"))
            if child is None:
                raise UsageError(f"{path} does not exist in the volume")
            ino, cur = child, _join(cur, part.encode("utf-8", "surrogateescape"))
        self.load_many([ino])
        node = self.tree.nodes.get(ino)
        if node is not None and node.entries is None:
            raise UsageError(f"--path must name a directory; {cur} is not one")
        return ino, cur

    def walk(self, start: int = ROOT_INO, start_path: str = "/") -> Tree:
        """Breadth-first from ``start``; with the root, also finds unreachable inodes."""
        tree = self.tree
        tree.scope_root = start
        tree.whole_volume = start == ROOT_INO
        if start not in tree.table:
            raise UsageError("the volume's root inode is not in its metadata table")
        tree.paths[start] = [start_path]
        level = [start]
        self.load_many(level)
        seen = {start}
        while level:
            nxt: list[int] = []
            for ino in level:
                node = tree.nodes.get(ino)
                if node is None or node.entries is None:
                    continue
                base = tree.path(ino)
                for name in sorted(node.entries.names):
                    child = node.entries.names[name]
                    path = _join(base, name)
                    if child not in tree.table:
                        tree.dangling.append((ino, name, child, path))
                        continue
                    tree.links[child] += 1
                    tree.entry_of.setdefault(child, []).append((ino, name))
                    tree.paths.setdefault(child, []).append(path)
                    if child not in seen:
                        seen.add(child)
                        nxt.append(child)
            self.load_many(nxt)
            level = nxt
        if tree.whole_volume:
            self._unreachable(seen)
        tree.scope = seen
        return tree

    def _unreachable(self, seen: set[int]) -> None:
        """Inodes in the table the root does not reach: below a damaged directory, or lost.
        Their records are loaded too (their block maps count as referenced, and repair can
        reattach them); the tops get ``<inode N>`` paths and their subtrees paths below."""
        tree = self.tree
        rest = [i for i in tree.table if i not in seen]
        self.load_many(rest)
        below: set[int] = set()
        for ino in rest:
            node = tree.nodes.get(ino)
            if node is not None and node.entries is not None:
                below.update(c for c in node.entries.names.values() if c != ino)
        tops = sorted(i for i in rest if i not in below)
        tree.unreached = tops
        for top in tops:
            tree.paths.setdefault(top, [f"<inode {top}>"])
        # name the inodes under each top (a cycle of lost directories has no top: name all)
        todo = list(tops) + sorted(i for i in rest if i in below)
        for ino in todo:
            tree.paths.setdefault(ino, [f"<inode {ino}>"])
            node = tree.nodes.get(ino)
            if node is None or node.entries is None:
                continue
            for name in sorted(node.entries.names):
                child = node.entries.names[name]
                if child in tree.table and child not in seen:
                    tree.links[child] += 1
                    tree.entry_of.setdefault(child, []).append((ino, name))
                    if child not in tree.paths or tree.paths[child][0].startswith("<"):
                        tree.paths[child] = [_join(tree.path(ino), name)]
        seen.update(rest)


# --- structural findings ---------------------------------------------------------------------


def record_finding(tree: Tree, fail: RecordFailure, store: ObjectStore) -> Finding:
    """The finding for a record that failed; kind refined later by the prober."""
    obj = str(store.object_path(fail.oid).relative_to(store.root))
    path = tree.path(fail.ino)
    if fail.reason == "missing":
        kind, detail = "missing", "the inode record object is missing"
    elif fail.reason == "damaged":
        kind, detail = "tampered", str(fail.message)
    elif fail.reason == "io":
        kind, detail = "unreadable", f"the inode record cannot be read: {fail.message}"
    elif fail.reason == "decode":
        kind, detail = (
            "unreadable",
            (
                "the inode record is authentic but does not parse "
                f"({fail.message}): a sealfs bug or a newer format"
            ),
        )
    elif fail.size is not None and fail.size < SEAL_OVERHEAD:
        kind, detail = "truncated", f"the inode record is only {fail.size} bytes"
    else:
        kind, detail = "tampered", "the inode record fails authentication"
    return Finding(kind, path, "record", obj, detail, ADVICE["record"], ino=fail.ino, oid=fail.oid)


def structure_findings(tree: Tree, report: Report, next_ino: int) -> None:
    """Reference counts, parent pointers, dangling entries and unreachable inodes."""
    for _parent, _name, child, path in tree.dangling:
        report.add(
            Finding(
                "missing",
                path,
                "entry",
                None,
                f"the directory entry points to inode {child}, which is not in the metadata table",
                ADVICE["inconsistent"],
                ino=child,
            )
        )
    damaged_dirs = bool(tree.failed)
    for top in tree.unreached:
        node = tree.nodes.get(top)
        n_below = sum(1 for p in tree.paths.values() if p[0].startswith(f"<inode {top}>/"))
        what = "directory" if node is not None and node.is_dir else "inode"
        if damaged_dirs:
            report.add(
                Finding(
                    "unreadable",
                    tree.path(top),
                    "entry",
                    None,
                    f"{what} {top} ({n_below} more below it) is in the metadata "
                    "table but no readable directory names it: it sat below a "
                    "damaged directory",
                    "run `sealfs check --repair` to reattach it under /lost+found",
                    ino=top,
                )
            )
        else:
            report.add(
                Finding(
                    "inconsistent",
                    tree.path(top),
                    "entry",
                    None,
                    f"{what} {top} ({n_below} more below it) is in the metadata "
                    "table but no directory names it (lost)",
                    ADVICE["inconsistent"],
                    ino=top,
                )
            )
    if tree.table and max(tree.table) >= next_ino:
        report.add(
            Finding(
                "inconsistent",
                None,
                "table",
                None,
                f"the inode counter ({next_ino}) is not above the highest inode "
                f"({max(tree.table)})",
                ADVICE["inconsistent"],
            )
        )
    for ino, node in tree.nodes.items():
        if (
            ino not in tree.scope
            or ino in tree.unreached
            or (not tree.whole_volume and ino == tree.scope_root)
        ):
            continue
        if node.entries is not None:
            _check_dir(tree, report, ino, node)
        else:
            have = tree.links[ino]
            # links may sit in a damaged directory or outside a --path subtree: then only
            # too many entries is provably wrong
            partial = bool(tree.failed) or not tree.whole_volume
            if have != node.nlink and (not partial or have > node.nlink):
                report.add(
                    Finding(
                        "inconsistent",
                        tree.path(ino),
                        "link count",
                        None,
                        f"link count is {node.nlink} but {have} directory entries name it",
                        ADVICE["inconsistent"],
                        ino=ino,
                    )
                )


def _check_dir(tree: Tree, report: Report, ino: int, node: Inode) -> None:
    assert node.entries is not None
    if tree.links[ino] > 1:
        report.add(
            Finding(
                "inconsistent",
                tree.path(ino),
                "entry",
                None,
                f"directory is named by {tree.links[ino]} entries",
                ADVICE["inconsistent"],
                ino=ino,
            )
        )
    subdirs, unknown = 0, False
    for child in node.entries.names.values():
        c = tree.nodes.get(child)
        if c is None:
            unknown = unknown or child in tree.failed
            continue
        if c.entries is not None:
            subdirs += 1
            if c.parent != ino and tree.links[child] == 1:
                report.add(
                    Finding(
                        "inconsistent",
                        tree.path(child),
                        "parent",
                        None,
                        f"parent pointer is {c.parent}, but it is listed in directory inode {ino}",
                        ADVICE["inconsistent"],
                        ino=child,
                    )
                )
    if not unknown and node.nlink != 2 + subdirs:
        report.add(
            Finding(
                "inconsistent",
                tree.path(ino),
                "link count",
                None,
                f"directory link count is {node.nlink}, expected {2 + subdirs} "
                f"(2 + {subdirs} subdirectories)",
                ADVICE["inconsistent"],
                ino=ino,
            )
        )
