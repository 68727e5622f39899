"""``tools/bench``: mount every filesystem, run every workload on each, report medians.

All filesystems are set up and mounted first, each on a fresh backing directory under one
scratch directory. Then, workload by workload and repetition by repetition, the filesystems take
turns (the starting one rotates), so that a slow drift of the machine (other jobs, thermal, the
host) affects them alike. Before each timed repetition every FUSE daemon is left to go idle.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

from . import filesystems, report, source_tree, system, workloads
from .filesystems import FileSystem
from .system import GiB, MiB, log
from .workloads import Ctx, Params, Workload, WorkloadTimeout

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SCRATCH = Path("/var/tmp/sealfs-bench")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 1G)")
    mult = {"": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def _names(text: str, known: list[str], what: str) -> list[str]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part not in known:
            raise argparse.ArgumentTypeError(f"unknown {what} {part!r}; known: {', '.join(known)}")
        out.append(part)
    return out


def build_parser() -> argparse.ArgumentParser:
    fs_names = [c.name for c in filesystems.ALL if c is not filesystems.SealfsB]  # B: opt-in
    wl_names = [w.name for w in workloads.ALL]
    ap = argparse.ArgumentParser(
        prog="tools/bench",
        description="Benchmark sealfs against a plain directory, gocryptfs and CryFS. "
        "See docs/benchmarks.md.",
    )
    ap.add_argument(
        "--fs",
        default=",".join(fs_names),
        help=f"comma-separated filesystems (default: all of {','.join(fs_names)})",
    )
    ap.add_argument(
        "--workload",
        default=",".join(wl_names),
        help=f"comma-separated workloads (default: all of {','.join(wl_names)})",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: smaller sizes, 1 repetition (explicit options still win)",
    )
    ap.add_argument("--size", type=parse_size, help="sequential write/read size (default 1G)")
    ap.add_argument("--reps", type=int, help="repetitions per measurement (default 3, quick 1)")
    ap.add_argument("--small-files", type=int, dest="small_count", help="default 10000")
    ap.add_argument("--rand-file", type=parse_size, help="random I/O file size (default 256M)")
    ap.add_argument("--rand-io", type=parse_size, help="random I/O bytes per rep (default 32M)")
    ap.add_argument("--dd-bytes", type=parse_size, help="bytes written by dd bs=512 (default 8M)")
    ap.add_argument(
        "--cycle-size", type=parse_size, help="each write of the sustained cycle (default 512M)"
    )
    ap.add_argument("--appends", type=int, dest="append_count", help="default 2000")
    ap.add_argument("--sqlite-commits", type=int, help="default 500")
    ap.add_argument("--tree-tar", help="tarball of the source tree (default: Django sdist)")
    ap.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds allowed per repetition of a workload (default 900)",
    )
    ap.add_argument(
        "--scratch",
        type=Path,
        default=DEFAULT_SCRATCH,
        help=f"scratch directory, same disk as the repo (default {DEFAULT_SCRATCH})",
    )
    ap.add_argument("--sealfs", type=Path, help="sealfs binary (default: the repo's .venv)")
    ap.add_argument("--json", type=Path, help="also write all figures (every repetition) here")
    ap.add_argument(
        "--doc",
        type=Path,
        help="Markdown file whose results section is replaced (default "
        "docs/benchmarks.md, but only for an unfiltered run or with --section)",
    )
    ap.add_argument(
        "--section",
        help="name of the results section to replace (default: full, or quick "
        "with --quick); a new name adds a section",
    )
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument(
        "--no-install", action="store_true", help="do not apt-get install missing tools"
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep this run's scratch directory (unmounted) for inspection",
    )
    return ap


class Aborted(Exception):
    pass


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Runner:
    def __init__(
        self,
        args: argparse.Namespace,
        fs_names: list[str],
        wls: list[Workload],
        params: Params,
        reps: int,
    ):
        self.args = args
        self.params = params
        self.reps = reps
        self.workloads = wls
        self.run_dir = args.scratch / f"run-{os.getpid()}"
        self.fss: list[FileSystem] = []
        for name in fs_names:
            cls = filesystems.BY_NAME[name]
            root = self.run_dir / name
            fs = cls(root, args.sealfs) if issubclass(cls, filesystems.Sealfs) else cls(root)
            self.fss.append(fs)
        self.results: dict[str, dict[str, list[float]]] = {f.name: {} for f in self.fss}
        self.errors: dict[str, dict[str, str]] = {f.name: {} for f in self.fss}
        self.dead: set[str] = set()
        self.notes: list[str] = []
        # (thread, done event, filesystem, context) of the running workload step, if any
        self._worker: tuple[threading.Thread, threading.Event, FileSystem, Ctx] | None = None

    # --- execution with a time limit ---

    def _guarded(self, fs: FileSystem, ctx: Ctx, fn, timeout: float):
        """Run fn(ctx) in a worker thread with a time limit.

        On timeout: cancel cooperatively, kill child processes, and if the worker is stuck in a
        system call on the FUSE mount, abort the FUSE connection so that the call fails.
        """
        box: dict[str, object] = {}
        done = threading.Event()

        def target() -> None:
            system.uncancel_thread(threading.get_ident())  # idents are reused
            try:
                box["value"] = fn(ctx)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                box["error"] = e
            finally:
                done.set()

        ctx.deadline = time.monotonic() + timeout
        ctx.cancelled = threading.Event()
        t = threading.Thread(target=target, name=f"{fs.name}-worker", daemon=True)
        self._worker = (t, done, fs, ctx)
        t.start()
        # Wait on our own Event, in short slices: a signal (Ctrl-C) may be delivered to the
        # worker thread, and the main thread runs Python's handler only when it wakes up. (Not
        # Thread.join: in Python 3.11 a KeyboardInterrupt inside join() marks the still running
        # thread as stopped.)
        end = time.monotonic() + timeout + 5
        while not done.wait(0.2) and time.monotonic() < end:
            pass
        if not done.is_set():
            self._stop_worker()
            raise WorkloadTimeout(f"exceeded {timeout:.0f}s")
        self._worker = None
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box.get("value")

    def _stop_worker(self) -> None:
        if self._worker is None:
            return
        t, done, fs, ctx = self._worker
        if done.is_set():
            self._worker = None
            return
        log(f"stopping the {t.name} thread")
        ctx.cancelled.set()
        system.cancel_thread(t.ident)
        if not done.wait(20):
            log(f"{fs.name}: worker stuck in the filesystem; aborting the FUSE connection")
            fs.emergency_stop()
            self.dead.add(fs.name)
            done.wait(30)
        self._worker = None

    # --- phases ---

    def setup(self) -> None:
        self.run_dir.mkdir(parents=True)
        for fs in self.fss:
            why = fs.available()
            if why:
                self._fail(fs, "setup", why, dead=True)
                continue
            log(f"{fs.name}: creating and mounting a fresh volume in {fs.root}")
            t0 = time.monotonic()
            try:
                fs.setup()
            except Exception as e:  # noqa: BLE001
                self._fail(fs, "setup", str(e), dead=True)
                with contextlib.suppress(Exception):
                    fs.emergency_stop()
                continue
            extra = f", daemon pid {fs.pid}" if fs.fuse else ""
            log(f"{fs.name}: ready in {time.monotonic() - t0:.1f}s{extra}")

    def _fail(self, fs: FileSystem, what: str, msg: str, dead: bool = False) -> None:
        msg = " ".join(str(msg).split())[:300]
        self.errors[fs.name][what] = msg
        log(f"{fs.name}: {what} FAILED: {msg}")
        if dead:
            self.dead.add(fs.name)

    def _ctx(self, fs: FileSystem, wl: Workload) -> Ctx:
        return Ctx(
            fs=fs, dir=fs.data / f"bench-{wl.group}", params=self.params, scratch=self.run_dir
        )

    def _live(self) -> list[FileSystem]:
        return [f for f in self.fss if f.name not in self.dead]

    def _quiesce(self) -> None:
        pids = [f.pid for f in self._live() if f.pid]
        waited = system.wait_quiet(pids)
        if waited > 5:
            log(f"  (waited {waited:.1f}s for the FUSE daemons to go idle)")

    def run_workload(self, wl: Workload, next_group: str | None) -> None:
        log(f"== {wl.name}: {wl.description}")
        ctxs: dict[str, Ctx] = {}
        for fs in self._live():
            ctx = self._ctx(fs, wl)

            def prepare(c: Ctx, wl: Workload = wl) -> None:
                c.dir.mkdir(parents=True, exist_ok=True)
                wl.prepare(c)

            try:
                self._guarded(fs, ctx, prepare, self.args.timeout)
                ctxs[fs.name] = ctx
            except Exception as e:  # noqa: BLE001
                self._record_failure(fs, wl, e)
        for rep in range(self.reps):
            order = [f for f in self._live() if f.name in ctxs]
            if order:
                k = rep % len(order)
                order = order[k:] + order[:k]
            for fs in order:
                ctx = ctxs[fs.name]
                ctx.rep = rep
                self._quiesce()
                try:
                    figures = self._guarded(fs, ctx, wl.run, self.args.timeout)
                except Exception as e:  # noqa: BLE001
                    self._record_failure(fs, wl, e)
                    del ctxs[fs.name]
                    continue
                for key, value in figures.items():
                    self.results[fs.name].setdefault(key, []).append(value)
                shown = ", ".join(
                    f"{k} {report.fmt(v, workloads.METRICS[k].unit)} {workloads.METRICS[k].unit}"
                    for k, v in figures.items()
                )
                log(f"  {wl.name} [{rep + 1}/{self.reps}] {fs.name}: {shown}")
        if next_group != wl.group:
            for fs in self._live():
                ctx = self._ctx(fs, wl)
                try:
                    self._guarded(fs, ctx, wl.cleanup, self.args.timeout)
                except Exception as e:  # noqa: BLE001
                    log(f"{fs.name}: cleanup of {wl.name} failed: {e}")

    def _record_failure(self, fs: FileSystem, wl: Workload, e: BaseException) -> None:
        kind = "timeout" if isinstance(e, WorkloadTimeout) else type(e).__name__
        alive = fs.name not in self.dead and fs.alive()
        self._fail(fs, wl.name, f"{kind}: {e}", dead=not alive)
        if not alive:
            log(f"{fs.name}: filesystem is gone (unmounted or daemon died); skipping it from now")
            with contextlib.suppress(Exception):
                fs.emergency_stop()

    def teardown(self) -> None:
        self._stop_worker()
        for fs in self.fss:
            if not fs.fuse:
                continue
            if fs.name in self.dead and not system.is_mounted(fs.mnt):
                system.kill_pid(fs.pid)
                continue
            try:
                t0 = time.monotonic()
                fs.unmount()
                if fs.name not in self.dead:
                    log(f"{fs.name}: unmounted in {time.monotonic() - t0:.1f}s")
            except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
                log(f"{fs.name}: clean unmount failed ({e}); forcing")
                fs.emergency_stop()
        still = [f for f in self.fss if f.fuse and system.is_mounted(f.mnt)]
        if still:
            log(f"still mounted, leaving {self.run_dir} in place: {[str(f.mnt) for f in still]}")
        elif self.args.keep:
            log(f"kept {self.run_dir}")
        elif self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            log(f"removed {self.run_dir}")


def _versions(fss: list[FileSystem]) -> dict[str, str]:
    v: dict[str, str] = {}
    for fs in fss:
        if fs.fuse and not fs.available():
            with contextlib.suppress(Exception):
                v[fs.name] = filesystems.short_version(fs.version())
    v["fio"] = system.first_line(["fio", "--version"])
    v["sqlite"] = sqlite3.sqlite_version
    v["python"] = platform.python_version()
    v["fuse"] = system.first_line(["fusermount3", "--version"]).replace("fusermount3 version: ", "")
    v["tar"] = system.first_line(["tar", "--version"])
    return v


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        fs_names = _names(args.fs, [c.name for c in filesystems.ALL], "filesystem")
        wl_names = _names(args.workload, [w.name for w in workloads.ALL], "workload")
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    wls = [w for w in workloads.ALL if w.name in wl_names]
    params = Params.quick() if args.quick else Params()
    for opt in (
        "small_count",
        "rand_file",
        "rand_io",
        "dd_bytes",
        "cycle_size",
        "append_count",
        "sqlite_commits",
    ):
        if getattr(args, opt) is not None:
            setattr(params, opt, getattr(args, opt))
    if args.size is not None:
        params.seq_size = args.size
    reps = args.reps or (1 if args.quick else 3)
    filtered = args.fs != build_parser().get_default(
        "fs"
    ) or args.workload != build_parser().get_default("workload")
    if args.no_doc:
        doc = None
    elif args.doc or args.section or not filtered:
        doc = args.doc or REPO / "docs/benchmarks.md"
    else:
        doc = None
    section = args.section or ("quick" if args.quick else "full")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", section):
        ap.error("--section: letters, digits, '.', '_' and '-' only")

    if os.geteuid() != 0:
        ap.error("must run as root (drops caches, mounts FUSE filesystems, may apt-get install)")

    # Tools: install what the chosen filesystems and workloads need.
    needed = {"fusermount3": "fuse3", "tar": "tar"}
    for name in fs_names:
        needed.update(filesystems.BY_NAME[name].packages)
    for w in wls:
        needed.update(w.needs)
    missing = system.ensure_commands(needed, install=not args.no_install)
    if missing:
        log(f"missing commands (their filesystems/workloads will fail): {', '.join(missing)}")

    scratch: Path = args.scratch.resolve()
    args.scratch = scratch
    scratch.mkdir(parents=True, exist_ok=True)
    if os.stat(scratch).st_dev != os.stat(REPO).st_dev:
        log(f"warning: {scratch} is not on the same filesystem as {REPO}")

    # Free space: each group's files exist on every filesystem at once.
    per_fs = 0
    if any(w.group == "seq" for w in wls):
        per_fs = max(per_fs, params.seq_size * reps)  # seqwrite writes one file per repetition
    if any(w.group == "rand" for w in wls):
        per_fs = max(per_fs, params.rand_file)
    if any(w.group == "cycle" for w in wls):
        per_fs = max(per_fs, params.cycle_size * 2)  # deferred deletes may lag behind
    per_fs = int(per_fs * 1.25) + 512 * MiB
    need = per_fs * len(fs_names) + 2 * GiB
    free = system.free_bytes(scratch)
    if free < need:
        log(f"refusing to run: {free / GiB:.1f} GiB free in {scratch}, need {need / GiB:.1f} GiB")
        return 2

    lock = open(scratch / ".lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log(f"another tools/bench run holds {scratch}/.lock; refusing to run concurrently")
        return 2

    if any(w.name == "tree" for w in wls):
        tar, nfiles, desc = source_tree.prepare(scratch / "cache", args.tree_tar)
        params.tree_tar, params.tree_files, params.tree_name = str(tar), nfiles, desc
        log(f"source tree: {desc}, {nfiles:,} files ({tar})")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    runner = Runner(args, fs_names, wls, params, reps)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = system.machine_info(scratch)
    versions = _versions(runner.fss)
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, load {machine['loadavg']}")
    log(f"filesystems: {', '.join(fs_names)}; workloads: {', '.join(wl_names)}; reps {reps}")
    interrupted = False
    t_start = time.monotonic()
    try:
        runner.setup()
        for i, wl in enumerate(wls):
            if not runner._live():
                log("no filesystem left to measure")
                break
            next_group = wls[i + 1].group if i + 1 < len(wls) else None
            runner.run_workload(wl, next_group)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: unmounting and cleaning up")
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            runner.teardown()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    total = time.monotonic() - t_start

    metric_workload = {m: w.name for w in workloads.ALL for m in w.metrics}
    data = {
        "started": started,
        "command": "tools/bench "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "quick": args.quick,
        "section": section,
        "reps": reps,
        "duration_s": round(total, 1),
        "interrupted": interrupted,
        "machine": machine,
        "loadavg_end": Path("/proc/loadavg").read_text().split(" ")[0],
        "versions": versions,
        "params": params.describe(),
        "filesystems": fs_names,
        "labels": {f.name: f.label for f in runner.fss},
        "workloads": wl_names,
        "metric_workload": metric_workload,
        "results": runner.results,
        "medians": report.medians(runner.results),
        "errors": {k: v for k, v in runner.errors.items() if v},
        "dead": sorted(runner.dead),
        "notes": runner.notes,
    }
    text = report.markdown(data)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        log(f"wrote {args.json}")
    if doc and not interrupted:
        report.write_doc(doc, section, text)
        log(f"updated the {section!r} results in {doc}")
    log(f"total {total / 60:.1f} min")
    return 130 if interrupted else 0
