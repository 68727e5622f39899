"""Test helper: map plaintext paths of a volume to the backing files that hold them.

Opens a volume offline (read-only, no lock, no journal repair) with the library itself and
walks the whole tree once, so attack tests can say "flip a bit in block 1 of /dir/file" and get
the exact object file to tamper with. Safe to use on an idle mounted volume as well, since it
only reads the checkpoint, the journal and the records (it does not see uncommitted changes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from sealfs.fs.core import Filesystem
from sealfs.fs.lifecycle import unlock_volume
from sealfs.sealed.codec import FRAME_HEADER, split_frames
from sealfs.sealed.inode import ROOT_INO
from sealfs.store import CHECKPOINT_NAME, HEADER_NAME, ObjectStore, journal_name
from sealfs.volume.header import read_key_file
from tests.conftest import Volume


@dataclass
class Entry:
    """One inode reachable under ``path``: its record object and, for files, its blocks."""

    path: str
    ino: int
    kind: str  # "file", "dir", "symlink", "other"
    record: Path  # backing file of the sealed inode record
    record_oid: int
    blocks: dict[int, Path] = field(default_factory=dict)  # block index -> backing file
    block_oids: dict[int, int] = field(default_factory=dict)

    def block(self, idx: int = 0) -> Path:
        return self.blocks[idx]


@dataclass
class Layout:
    """A snapshot of where everything of one volume lives in its backing directory."""

    backing: Path
    entries: dict[str, Entry]
    gen: int  # journal generation the checkpoint names
    seq: int  # last commit sequence number replayed
    journal_frames: list[tuple[int, int]]  # (offset, total frame length) of each record

    def __getitem__(self, path: str) -> Entry:
        return self.entries[path]

    @property
    def header(self) -> Path:
        return self.backing / HEADER_NAME

    @property
    def checkpoint(self) -> Path:
        return self.backing / CHECKPOINT_NAME

    @property
    def journal(self) -> Path:
        return self.backing / journal_name(self.gen)

    def all_objects(self) -> list[Path]:
        return sorted(p for p in (self.backing / "objects").rglob("*") if p.is_file())


def _kind(node) -> str:  # type: ignore[no-untyped-def]
    if node.is_dir:
        return "dir"
    if node.is_file:
        return "file"
    if node.is_symlink:
        return "symlink"
    return "other"


def layout(backing: Path, key: Path) -> Layout:
    """Walk the committed state of the volume in ``backing`` (unlocked with key file ``key``)."""
    store, header, master = unlock_volume(Path(backing), read_key_file(key))
    fs = Filesystem(store, header, master)

    def entry(path: str, node) -> Entry:  # type: ignore[no-untyped-def]
        oid = fs.inodes.table[node.ino]
        return Entry(
            path,
            node.ino,
            _kind(node),
            store.object_path(oid),
            oid,
            {i: store.object_path(o) for i, o in node.blocks.items()},
            dict(node.blocks),
        )

    async def walk() -> tuple[dict[str, Entry], int, int]:
        state = await fs.load(writable=False)
        out: dict[str, Entry] = {}
        root = await fs.node(ROOT_INO)
        out["/"] = entry("/", root)
        todo = [("", ROOT_INO)]
        while todo:
            base, ino = todo.pop()
            node = await fs.node(ino)
            assert node.entries is not None
            for name in list(node.entries.names):
                child = await fs.lookup(ino, name)
                path = f"{base}/{name.decode('utf-8', 'surrogateescape')}"
                out[path] = entry(path, child)
                if child.is_dir:
                    todo.append((path, child.ino))
        return out, state.gen, state.seq

    entries, gen, seq = trio.run(walk)
    frames = _frames((Path(backing) / journal_name(gen)).read_bytes())
    return Layout(Path(backing), entries, gen, seq, frames)


def _frames(data: bytes) -> list[tuple[int, int]]:
    """(offset, total length) of each complete journal frame, header included."""
    frames, _, _ = split_frames(data)
    return [(off, FRAME_HEADER + len(sealed)) for off, sealed in frames]


def fold(vol: Volume) -> None:
    """Write a checkpoint of the unmounted volume offline, as a mount does once its journal
    is long: every object carried inside a journal frame becomes its own file, and the journal
    starts empty. Attack tests fold their templates so that the objects they tamper with are
    files; an object that lives only inside a journal frame can only be attacked through the
    journal, which has tests of its own."""
    store, header, master = unlock_volume(vol.backing, read_key_file(vol.key))
    fs = Filesystem(store, header, master)

    async def run() -> None:
        await fs.load()
        fs.metalog.write_checkpoint(dict(fs.inodes.table), fs.inodes.next_ino)
        await fs.close()

    trio.run(run)
    assert not store.carried


JOURNAL_FILLER = "/journal-filler"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def committed_version(
    vol: Volume, path: str, data: bytes
) -> tuple[dict[str, bytes], dict[str, Path]]:
    """Write ``data`` to ``path`` on the unmounted ``vol``, commit it and fold the volume,
    and return the bytes and backing files of its record and blocks ("record" / block index):
    a version an attacker can put back after the file has changed."""
    vol.mount()
    p = vol.mnt / path.lstrip("/")
    p.write_bytes(data)
    fsync_path(p)
    unmount(vol)
    fold(vol)
    e = layout(vol.backing, vol.key)[path]
    saved, files = {"record": e.record.read_bytes()}, {"record": e.record}
    for idx, f in e.blocks.items():
        saved[str(idx)], files[str(idx)] = f.read_bytes(), f
    return saved, files


def fill_journal(mnt: Path, commits: int = 4) -> None:
    """Make ``commits`` commits that change only the file JOURNAL_FILLER (which must exist
    already, so that its directory's record stays as it is): after a :func:`fold`, a template
    gets journal frames to tamper with without moving anything else into the journal."""
    path = Path(mnt) / JOURNAL_FILLER.lstrip("/")
    for i in range(commits):
        with open(path, "ab") as f:
            f.write(b"filler %d\n" % i)
        fsync_path(path)


def journal_generation(backing: Path) -> int:
    """The generation of the newest journal file: one more after each checkpoint."""
    return max(int(p.name.split(".", 1)[1], 16) for p in Path(backing).glob("journal.*"))


def force_checkpoints(mnt: Path, backing: Path, count: int = 1) -> int:
    """fsync partial blocks of one file (an fsync carries them in its journal frame) until
    ``count`` checkpoints have been written; returns the number of fsyncs. Bound by that
    event, not by time (and by 2,000 fsyncs, far more than a checkpoint needs)."""
    start = journal_generation(backing)
    chunk = os.urandom(100 << 10)
    with open(Path(mnt) / "checkpoint-filler", "wb") as f:
        for i in range(2000):
            for j in range(4):  # four partly written blocks: 400 KiB carried per fsync
                f.seek(((4 * i + j) % 1024) * (128 << 10))
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            if journal_generation(backing) >= start + count:
                return i + 1
    raise AssertionError(f"{count} checkpoint(s) not written after 2000 fsyncs")


def fold_and_fill(vol: Volume) -> None:
    """Every object of the unmounted volume a file, then a few journal records after that."""
    fold(vol)
    vol.mount()
    fill_journal(vol.mnt)
    unmount(vol)


def make_content(tag: str, n: int) -> bytes:
    """Deterministic content: compressible (so lz4 really compresses) but different in every
    block, so a block moved to another position or file is never byte-identical."""
    salt = hashlib.sha256(tag.encode()).hexdigest().encode()
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"%s:%08d:%s\n" % (tag.encode(), i, salt)
        i += 1
    return bytes(out[:n])


# --- the format-1 fixture -------------------------------------------------------------------

LEGACY_FIXTURE = Path(__file__).parent / "data" / "legacy-v1"


def legacy_contents() -> dict[str, bytes]:
    """The files of tests/data/legacy-v1 (a volume written by format-1 sealfs), by path."""
    incompressible = b"".join(hashlib.sha256(b"legacy%d" % i).digest() for i in range(400))
    return {
        "/small.txt": make_content("small", 100),
        "/dir/carried.bin": make_content("carried", 10000),
        "/dir/files.bin": incompressible[:12800] + make_content("files", 9000),
    }


def legacy_volume(tmp_path: Path) -> Volume:
    """A private copy of the format-1 fixture volume, with its key file at mode 0600."""
    base = tmp_path / "legacy"
    vol = Volume(base / "backing", base / "key", base / "mnt", base / "sealfs.log")
    copy_tree(LEGACY_FIXTURE / "backing", vol.backing)
    shutil.copyfile(LEGACY_FIXTURE / "key", vol.key)
    vol.key.chmod(0o600)
    vol.mnt.mkdir()
    return vol


# --- tampering primitives ----------------------------------------------------------------------


def flip_bit(path: Path, offset: int | None = None, bit: int = 0) -> None:
    """Flip one bit of ``path`` (default: a byte in the middle), keeping its size and mtime
    behaviour of an ordinary write."""
    data = bytearray(path.read_bytes())
    assert data, f"{path} is empty"
    pos = len(data) // 2 if offset is None else offset
    data[pos] ^= 1 << bit
    path.write_bytes(bytes(data))


def swap_files(a: Path, b: Path) -> None:
    """Exchange the contents of two backing files (names stay where they are)."""
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def truncate(path: Path, length: int) -> None:
    os.truncate(path, length)


def extend(path: Path, extra: bytes = b"\0" * 16) -> None:
    with open(path, "ab") as f:
        f.write(extra)


def copy_tree(src: Path, dst: Path) -> None:
    """A byte-exact copy of a backing directory (what a host snapshot would hold)."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("lock"))


def object_store(backing: Path) -> ObjectStore:
    return ObjectStore(Path(backing))


# --- mounts ----------------------------------------------------------------------------------


def is_mounted(mnt: Path) -> bool:
    """From /proc/self/mountinfo. os.path.ismount() says False when stat of the mount root
    fails (EIO from a volume whose root record is damaged, ENOTCONN after the daemon was
    killed), which would leave such mounts behind."""
    target = str(Path(mnt).absolute())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def unmount(vol: Volume, timeout: float = 60.0) -> None:
    """Unmount and wait until the daemon has finished its final commit and exited.

    Like ``sealfs umount``, but a zombie counts as exited: here the daemon's parent is
    PID 1, which reaps only every second or two, and ``sealfs umount`` waits for that.
    """
    pid = vol.daemon_pid()
    subprocess.run(["fusermount3", "-u", str(vol.mnt)], check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        assert time.monotonic() < deadline, f"daemon {pid} did not exit"
        time.sleep(0.02)


def force_unmount(vol: Volume) -> None:
    if is_mounted(vol.mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(vol.mnt)], capture_output=True)


#: What a hostile host can put where sealfs expects one of its files (see :func:`plant`).
PLANTED_KINDS = ("symlink", "fifo", "dir", "sparse")
SPARSE_SIZE = 1 << 30  # a 1 GiB file that takes no disk space: memory must stay flat


def plant(path: Path, kind: str, target: Path | None = None) -> None:
    """Replace whatever is at ``path`` by a symlink to ``target``, a FIFO, an empty directory
    or a 1 GiB sparse file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "symlink":
        assert target is not None
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        assert kind == "sparse", kind
        with open(path, "wb"):
            pass
        os.truncate(path, SPARSE_SIZE)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """What a mounted tree must keep through a move or a re-key, per path: type, mode, size,
    mtime, content, xattrs, and which paths share an inode (hard links)."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
            continue
        content = path.read_bytes() if path.is_file() else None
        xattrs = {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))}
        first = inodes.setdefault(st.st_ino, rel)
        out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, content, xattrs, first, st.st_nlink)
    return out
