"""The workloads. Each one runs in a working directory on the filesystem under test and returns
figures (one or more metrics) for one repetition.

A workload has an untimed ``prepare`` (once per filesystem, before its repetitions), a timed
``run`` (once per repetition) and a ``cleanup``. Workloads of the same ``group`` share files
(the sequential read reads the file the sequential write wrote), so the runner cleans a group
up only after its last workload.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import system
from .filesystems import FileSystem
from .system import MiB, run

# --- parameters -------------------------------------------------------------------------------


@dataclass
class Params:
    seq_size: int = 1024 * MiB  # sequential write / read
    rand_file: int = 256 * MiB  # file that random I/O runs on
    rand_io: int = 32 * MiB  # bytes of 4 KiB random reads, and of random writes, per repetition
    small_count: int = 10_000  # files created / stat'ed / deleted
    small_size: int = 1024  # bytes each
    dd_bytes: int = 8 * MiB  # dd bs=512
    append_count: int = 2000  # 4 KiB appends, each followed by fdatasync
    sqlite_commits: int = 500  # transactions
    sqlite_rows: int = 10  # rows per transaction
    cycle_size: int = 512 * MiB  # each write of the sustained write cycle
    tree_tar: str = ""  # uncompressed tarball of the source tree (set by the runner)
    tree_files: int = 0  # regular files in it (for the report)
    tree_name: str = ""

    @classmethod
    def quick(cls) -> Params:
        return cls(
            seq_size=256 * MiB,
            rand_file=64 * MiB,
            rand_io=8 * MiB,
            small_count=2000,
            dd_bytes=2 * MiB,
            append_count=300,
            sqlite_commits=100,
            cycle_size=128 * MiB,
        )

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("tree_tar")
        return d


# --- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


M = Metric
METRICS: dict[str, Metric] = {
    m.key: m
    for m in [
        M("seq_write", "sequential write + fsync", "MiB/s", True),
        M("rss_peak", "daemon RSS peak during sequential write", "MiB", False),
        M("seq_read", "sequential read, cold cache", "MiB/s", True),
        M("cycle", "sustained cycle: write, rm, write, rm + deferred work", "MiB/s", True),
        M("rand_read", "random 4 KiB reads, cold cache (fio)", "IOPS", True),
        M("rand_write", "random 4 KiB writes + final fsync (fio)", "IOPS", True),
        M("small_create", "create small files + sync", "s", False),
        M("small_stat", "stat small files, cold cache", "s", False),
        M("small_delete", "delete small files + sync", "s", False),
        M("tree_untar", "source tree: untar + sync", "s", False),
        M("tree_ls", "source tree: ls -lR, cold cache", "s", False),
        M("tree_rm", "source tree: rm -rf + sync", "s", False),
        M("tree_total", "source tree: untar + ls -lR + rm -rf", "s", False),
        M("dd512", "dd bs=512 + fsync", "s", False),
        M("append_fdatasync", "4 KiB append + fdatasync", "ops/s", True),
        M("sqlite_commits", "SQLite insert transactions", "commits/s", True),
    ]
}


# --- context ----------------------------------------------------------------------------------


class WorkloadTimeout(Exception):
    pass


@dataclass
class Ctx:
    fs: FileSystem
    dir: Path  # working directory for this workload, on the filesystem under test
    params: Params
    scratch: Path  # a directory on the plain disk (inputs such as dd's source)
    rep: int = 0
    deadline: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self.cancelled.is_set():
            raise WorkloadTimeout("time limit reached")
        return left

    def check(self) -> None:
        self.remaining()


# --- helpers ----------------------------------------------------------------------------------

_RANDOM_BLOCK = os.urandom(8 * MiB)


def _write_file(path: Path, size: int, ctx: Ctx | None = None, chunk: int = MiB) -> None:
    """Write ``size`` bytes of incompressible data, fsync, close."""
    view = memoryview(_RANDOM_BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done, off = 0, 0
        while done < size:
            n = min(chunk, size - done)
            if off + n > len(view):
                off = 0
            written = os.write(fd, view[off : off + n])
            done += written
            off += written
            if ctx is not None and (done // chunk) % 64 == 0:
                ctx.check()
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a directory's changes (e.g. an unlink) durable, as an application would."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        run(["rm", "-rf", path], timeout=1800)
    elif path.exists():
        path.unlink()


# --- workloads --------------------------------------------------------------------------------


class Workload:
    name = ""
    group = ""  # workloads of one group share files; see module docstring
    description = ""
    metrics: tuple[str, ...] = ()
    needs: dict[str, str] = {}  # command -> Debian package

    def prepare(self, ctx: Ctx) -> None:
        pass

    def run(self, ctx: Ctx) -> dict[str, float]:
        raise NotImplementedError

    def cleanup(self, ctx: Ctx) -> None:
        _rm(ctx.dir)


class SeqWrite(Workload):
    name = "seqwrite"
    group = "seq"
    metrics = ("seq_write", "rss_peak")
    description = (
        "Write a new file of --size bytes (incompressible data, 1 MiB write() calls), fsync, "
        "close. Caches are dropped first. The FUSE daemon's RSS (with its child processes) is sampled "
        "every 50 ms meanwhile."
    )

    def run(self, ctx: Ctx) -> dict[str, float]:
        # A new file per repetition: deleting the previous one would start background work in
        # some filesystems (deferred deletes) that would then be timed as part of this write.
        # The files go when the "seq" group is cleaned up, after seqread.
        path = ctx.dir / f"big-{ctx.rep}"
        if path.exists():
            path.unlink()
            _fsync_dir(ctx.dir)
            if ctx.fs.pid:
                system.wait_quiet([ctx.fs.pid], timeout=120)
        system.drop_caches()
        with system.RssSampler(ctx.fs.pid) as rss:
            t0 = time.perf_counter()
            _write_file(path, ctx.params.seq_size, ctx)
            elapsed = time.perf_counter() - t0
        out = {"seq_write": ctx.params.seq_size / MiB / elapsed}
        if ctx.fs.fuse and rss.samples:
            out["rss_peak"] = rss.peak / MiB
        return out


class SeqRead(Workload):
    name = "seqread"
    group = "seq"
    metrics = ("seq_read",)
    description = (
        "Drop caches, then read the --size file (the last one seqwrite wrote, or one written "
        "untimed) with 1 MiB read() calls."
    )

    @staticmethod
    def _file(ctx: Ctx) -> Path:
        """The file seqwrite wrote last, if it has the right size."""
        for path in sorted(ctx.dir.glob("big-*"), key=lambda p: p.stat().st_mtime, reverse=True):
            if path.stat().st_size == ctx.params.seq_size:
                return path
        return ctx.dir / "big-read"

    def prepare(self, ctx: Ctx) -> None:
        path = self._file(ctx)
        if not path.exists():
            _write_file(path, ctx.params.seq_size, ctx)

    def run(self, ctx: Ctx) -> dict[str, float]:
        path = self._file(ctx)
        system.drop_caches()
        buf = bytearray(MiB)
        total = 0
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total += n
                if total % (64 * MiB) == 0:
                    ctx.check()
        elapsed = time.perf_counter() - t0
        if total != ctx.params.seq_size:
            raise RuntimeError(f"read {total} bytes, expected {ctx.params.seq_size}")
        return {"seq_read": total / MiB / elapsed}


class Cycle(Workload):
    name = "cycle"
    group = "cycle"
    metrics = ("cycle",)
    description = (
        "Sustained writing: write a --cycle-size file (1 MiB writes, fsync), delete it (sync), "
        "write another, delete it (sync), then wait until the FUSE daemon is idle and sync once "
        "more. Deferred work (background deletes, write-back) is timed where it lands. MiB/s "
        "of data written over the whole cycle."
    )
    quiet_window = 0.5  # s without daemon CPU that counts as idle (system.wait_quiet)

    def run(self, ctx: Ctx) -> dict[str, float]:
        size = ctx.params.cycle_size
        ctx.dir.mkdir(parents=True, exist_ok=True)
        system.drop_caches()
        t0 = time.perf_counter()
        for i in range(2):
            path = ctx.dir / f"cycle-{ctx.rep}-{i}"
            _write_file(path, size, ctx)
            path.unlink()
            os.sync()
        busy = time.perf_counter() - t0
        if ctx.fs.pid:
            # The daemon's own deferred work ends where its last busy window ends; the quiet
            # window that proves it is idle is not counted.
            waited = system.wait_quiet([ctx.fs.pid], self.quiet_window, timeout=ctx.remaining())
            busy += max(0.0, waited - self.quiet_window)
        t1 = time.perf_counter()
        os.sync()  # what the deferred work left in the page cache
        busy += time.perf_counter() - t1
        return {"cycle": 2 * size / MiB / busy}


class _Fio(Workload):
    group = "rand"
    needs = {"fio": "fio"}
    rw = ""

    def prepare(self, ctx: Ctx) -> None:
        path = ctx.dir / "rand"
        if not path.exists() or path.stat().st_size != ctx.params.rand_file:
            _write_file(path, ctx.params.rand_file, ctx)

    def run(self, ctx: Ctx) -> dict[str, float]:
        p = ctx.params
        system.drop_caches()
        out_json = ctx.scratch / f"fio-{ctx.fs.name}.json"
        cmd = [
            "fio",
            f"--name={self.rw}",
            f"--filename={ctx.dir / 'rand'}",
            f"--rw={self.rw}",
            "--bs=4k",
            f"--size={p.rand_file}",
            f"--io_size={p.rand_io}",
            "--ioengine=psync",
            "--iodepth=1",
            "--numjobs=1",
            "--fallocate=none",
            "--randrepeat=1",
            "--invalidate=1",
            "--output-format=json",
            f"--output={out_json}",
        ]
        if self.rw == "randwrite":
            cmd.append("--end_fsync=1")
        t0 = time.perf_counter()
        run(cmd, timeout=ctx.remaining())
        elapsed = time.perf_counter() - t0
        job = json.loads(out_json.read_text())["jobs"][0]
        ios = job["read" if self.rw == "randread" else "write"]["total_ios"]
        if ios <= 0:
            raise RuntimeError(f"fio did no I/O: {job.get('error')}")
        # Wall time, so that the final fsync of random writes is counted.
        return {self.metrics[0]: ios / elapsed}


class RandRead(_Fio):
    name = "randread"
    rw = "randread"
    metrics = ("rand_read",)
    description = (
        "fio, psync, queue depth 1: --rand-io bytes of 4 KiB reads at random offsets (each block "
        "at most once) of a --rand-file file, after dropping caches. IOPS over fio's wall time."
    )


class RandWrite(_Fio):
    name = "randwrite"
    rw = "randwrite"
    metrics = ("rand_write",)
    description = (
        "fio, psync, queue depth 1: --rand-io bytes of 4 KiB writes at random offsets of the same "
        "file (read-modify-write for block-encrypting filesystems), then one fsync. IOPS over "
        "fio's wall time, fsync included."
    )


class SmallFiles(Workload):
    name = "smallfiles"
    group = "smallfiles"
    metrics = ("small_create", "small_stat", "small_delete")
    description = (
        "Create N files of 1 KiB in 100-file directories, then sync; drop caches and lstat "
        "every file; unlink everything and rmdir, then sync. Three timings."
    )

    def run(self, ctx: Ctx) -> dict[str, float]:
        p = ctx.params
        base = ctx.dir / f"small-{ctx.rep}"
        payload = _RANDOM_BLOCK[: p.small_size]
        ndirs = (p.small_count + 99) // 100
        paths = [
            os.path.join(base, f"d{i // 100:04d}", f"file-{i:06d}.dat")
            for i in range(p.small_count)
        ]
        system.drop_caches()
        t0 = time.perf_counter()
        base.mkdir()
        for d in range(ndirs):
            os.mkdir(os.path.join(base, f"d{d:04d}"))
        for i, path in enumerate(paths):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)
            if i % 500 == 0:
                ctx.check()
        os.sync()
        t1 = time.perf_counter()
        system.drop_caches()
        t2 = time.perf_counter()
        for i, path in enumerate(paths):
            os.lstat(path)
            if i % 500 == 0:
                ctx.check()
        t3 = time.perf_counter()
        for i, path in enumerate(paths):
            os.unlink(path)
            if i % 500 == 0:
                ctx.check()
        for d in range(ndirs):
            os.rmdir(os.path.join(base, f"d{d:04d}"))
        base.rmdir()
        os.sync()
        t4 = time.perf_counter()
        return {"small_create": t1 - t0, "small_stat": t3 - t2, "small_delete": t4 - t3}


class Tree(Workload):
    name = "tree"
    group = "tree"
    metrics = ("tree_untar", "tree_ls", "tree_rm", "tree_total")
    description = (
        "A real source tree (uncompressed tarball, cached): `tar -xf --no-same-owner` + sync; "
        "drop caches, `ls -lR` to /dev/null; `rm -rf` + sync. Timings per phase and their sum."
    )

    def run(self, ctx: Ctx) -> dict[str, float]:
        dest = ctx.dir / f"tree-{ctx.rep}"
        dest.mkdir()
        system.drop_caches()
        t0 = time.perf_counter()
        run(
            ["tar", "-xf", ctx.params.tree_tar, "-C", dest, "--no-same-owner"],
            timeout=ctx.remaining(),
        )
        os.sync()
        t1 = time.perf_counter()
        system.drop_caches()
        t2 = time.perf_counter()
        run(["ls", "-lR", dest], timeout=ctx.remaining(), stdout_path=os.devnull)
        t3 = time.perf_counter()
        run(["rm", "-rf", dest], timeout=ctx.remaining())
        os.sync()
        t4 = time.perf_counter()
        untar, ls, rm = t1 - t0, t3 - t2, t4 - t3
        return {"tree_untar": untar, "tree_ls": ls, "tree_rm": rm, "tree_total": untar + ls + rm}


class Dd512(Workload):
    name = "dd512"
    group = "dd512"
    metrics = ("dd512",)
    description = (
        "`dd bs=512 conv=fsync` of --dd-bytes from a cached file on the plain disk into a new "
        "file: many sub-block writes, one fsync."
    )
    needs = {"dd": "coreutils"}

    def prepare(self, ctx: Ctx) -> None:
        src = ctx.scratch / "dd-source"
        if not src.exists() or src.stat().st_size != ctx.params.dd_bytes:
            _write_file(src, ctx.params.dd_bytes)
        ctx.dir.mkdir(parents=True, exist_ok=True)

    def run(self, ctx: Ctx) -> dict[str, float]:
        dst = ctx.dir / f"dd-{ctx.rep}"
        count = ctx.params.dd_bytes // 512
        src = ctx.scratch / "dd-source"
        src.read_bytes()  # keep the source in the page cache
        t0 = time.perf_counter()
        run(
            [
                "dd",
                f"if={src}",
                f"of={dst}",
                "bs=512",
                f"count={count}",
                "conv=fsync",
                "status=none",
            ],
            timeout=ctx.remaining(),
        )
        elapsed = time.perf_counter() - t0
        if dst.stat().st_size != ctx.params.dd_bytes:
            raise RuntimeError(f"dd wrote {dst.stat().st_size} bytes")
        dst.unlink()
        return {"dd512": elapsed}


class Appends(Workload):
    name = "appends"
    group = "appends"
    metrics = ("append_fdatasync",)
    description = "Database-log pattern: open O_APPEND, then N times write 4 KiB and fdatasync."

    def run(self, ctx: Ctx) -> dict[str, float]:
        path = ctx.dir / f"log-{ctx.rep}"
        payload = _RANDOM_BLOCK[:4096]
        n = ctx.params.append_count
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            t0 = time.perf_counter()
            for i in range(n):
                os.write(fd, payload)
                os.fdatasync(fd)
                if i % 100 == 0:
                    ctx.check()
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
        path.unlink()
        return {"append_fdatasync": n / elapsed}


class Sqlite(Workload):
    name = "sqlite"
    group = "sqlite"
    metrics = ("sqlite_commits",)
    description = (
        "Python's sqlite3, default rollback journal (journal_mode=DELETE, synchronous=FULL): "
        "a table with an index; N transactions of R inserted rows (100-byte blobs), each "
        "committed."
    )

    def run(self, ctx: Ctx) -> dict[str, float]:
        p = ctx.params
        path = ctx.dir / f"db-{ctx.rep}.sqlite"
        rng = random.Random(ctx.rep)
        blob = _RANDOM_BLOCK[:100]
        con = sqlite3.connect(path, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=DELETE")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT NOT NULL, v BLOB)")
            con.execute("CREATE INDEX t_k ON t (k)")
            t0 = time.perf_counter()
            for i in range(p.sqlite_commits):
                con.execute("BEGIN")
                con.executemany(
                    "INSERT INTO t (k, v) VALUES (?, ?)",
                    [(f"{rng.getrandbits(64):016x}", blob) for _ in range(p.sqlite_rows)],
                )
                con.execute("COMMIT")
                if i % 50 == 0:
                    ctx.check()
            elapsed = time.perf_counter() - t0
            (count,) = con.execute("SELECT count(*) FROM t").fetchone()
        finally:
            con.close()
        if count != p.sqlite_commits * p.sqlite_rows:
            raise RuntimeError(f"sqlite has {count} rows")
        for suffix in ("", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return {"sqlite_commits": p.sqlite_commits / elapsed}


ALL: list[Workload] = [
    SeqWrite(),
    SeqRead(),
    Cycle(),
    RandRead(),
    RandWrite(),
    SmallFiles(),
    Tree(),
    Dd512(),
    Appends(),
    Sqlite(),
]
BY_NAME = {w.name: w for w in ALL}
