"""Host helpers for the benchmark: commands, caches, packages, mounts, daemon RSS, machine info."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB

_T0 = time.monotonic()
_live_procs: set[tuple[subprocess.Popen, int]] = set()
_live_lock = threading.Lock()
_cancelled_threads: set[int] = set()


def log(msg: str) -> None:
    """Progress line on stderr, with the time since start."""
    elapsed = time.monotonic() - _T0
    print(f"[{int(elapsed) // 60:3d}:{int(elapsed) % 60:02d}] {msg}", file=sys.stderr, flush=True)


class CommandError(RuntimeError):
    pass


class Cancelled(RuntimeError):
    """Raised by :func:`run` in a thread whose work was cancelled (timeout, Ctrl-C)."""


def cancel_thread(ident: int | None) -> None:
    """From now on :func:`run` refuses to start commands in that thread, and kills its running ones."""
    if ident is None:
        return
    with _live_lock:
        _cancelled_threads.add(ident)
        procs = [p for p, owner in _live_procs if owner == ident]
    for p in procs:
        with contextlib.suppress(OSError):
            p.kill()


def uncancel_thread(ident: int | None) -> None:
    with _live_lock:
        _cancelled_threads.discard(ident)  # type: ignore[arg-type]


def run(
    cmd: Sequence[str | os.PathLike],
    *,
    timeout: float = 120,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    check: bool = True,
    stdout_path: str | os.PathLike | None = None,
) -> tuple[int, str]:
    """Run a command; return (exit code, combined output, capped).

    Output goes through a temporary file rather than a pipe, because daemons (gocryptfs, cryfs,
    sealfs) that fork into the background could otherwise keep a pipe open and hang us.
    ``stdout_path`` sends stdout to a file of the caller's (e.g. /dev/null) instead.
    The child is killed on timeout or on any exception (Ctrl-C included).
    """
    args = [os.fspath(c) for c in cmd]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with tempfile.TemporaryFile() as out:
        stdout = open(stdout_path, "wb") if stdout_path else out  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=stdout,
                stderr=out,
                env=full_env,
                cwd=cwd,
                start_new_session=False,
            )
            entry = (proc, threading.get_ident())
            with _live_lock:
                _live_procs.add(entry)
                cancelled = entry[1] in _cancelled_threads
            try:
                if cancelled:
                    raise Cancelled(f"cancelled: {args[0]}")
                proc.communicate(input=input, timeout=timeout)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                with _live_lock:
                    _live_procs.discard(entry)
        finally:
            if stdout is not out:
                stdout.close()
        out.seek(0)
        text = out.read(64 * 1024).decode(errors="replace")
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(args)} exited {proc.returncode}: {text.strip()[-2000:]}")
    return proc.returncode, text


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# --- packages ---------------------------------------------------------------------------------

_apt_updated = False


def ensure_commands(needed: dict[str, str], install: bool = True) -> list[str]:
    """Make sure each command exists, apt-get installing its Debian package if missing.

    ``needed`` maps command -> Debian package. Returns the commands still missing.
    """
    global _apt_updated
    missing = {cmd: pkg for cmd, pkg in needed.items() if shutil.which(cmd) is None}
    if missing and install:
        pkgs = sorted(set(missing.values()))
        log(f"installing Debian packages: {' '.join(pkgs)}")
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        if not _apt_updated:
            run(["apt-get", "update", "-qq"], timeout=600, env=env, check=False)
            _apt_updated = True
        run(["apt-get", "install", "-y", "-qq", *pkgs], timeout=1200, env=env, check=False)
    return [cmd for cmd in needed if shutil.which(cmd) is None]


# --- mounts -----------------------------------------------------------------------------------


def _unescape_mountinfo(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mount_entry(path: Path) -> dict[str, str] | None:
    """The /proc/self/mountinfo entry mounted exactly at ``path`` (never stats the path)."""
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if _unescape_mountinfo(parts[4]) == target:
                rparts = right.split()
                found = {"dev": parts[2], "fstype": rparts[0], "source": rparts[1]}
    return found


def is_mounted(path: Path) -> bool:
    return mount_entry(path) is not None


def fuse_connection(path: Path) -> str | None:
    """The /sys/fs/fuse/connections entry of the FUSE mount at ``path``, if any."""
    entry = mount_entry(path)
    if not entry:
        return None
    major, minor = (int(x) for x in entry["dev"].split(":"))
    conn = Path("/sys/fs/fuse/connections") / str(os.makedev(major, minor))
    return str(conn) if conn.exists() else None


def abort_fuse(conn: str | None) -> None:
    """Abort a FUSE connection: every blocked request fails with ENOTCONN."""
    if conn:
        with contextlib.suppress(OSError):
            Path(conn, "abort").write_text("1\n")


def fuse_unmount(path: Path, timeout: float = 60) -> None:
    """Unmount a FUSE mount; retry for a while if busy, then detach lazily."""
    deadline = time.monotonic() + timeout
    while is_mounted(path):
        code, _ = run(["fusermount3", "-u", path], check=False, timeout=timeout)
        if code == 0 or not is_mounted(path):
            return
        if time.monotonic() > deadline:
            run(["fusermount3", "-uz", path], check=False)
            return
        time.sleep(0.5)


def wait_mounted(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if time.monotonic() > deadline:
            raise CommandError(f"{path} did not appear as a mount within {timeout:.0f}s")
        time.sleep(0.1)


# --- processes --------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _holds_dev_fuse(pid: int) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                    return True
    except OSError:
        pass
    return False


def find_fuse_daemon(mountpoint: Path) -> int | None:
    """Pid of the FUSE daemon serving ``mountpoint``.

    The daemon is the process whose command line has the mountpoint as an argument (possibly
    inside a longer argument) and which holds /dev/fuse open.
    """
    target = os.path.abspath(mountpoint)
    candidates = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        args = _cmdline(pid)
        if any(a == target or a.rstrip("/") == target for a in args[1:]):
            candidates.append(pid)
    holding = [p for p in candidates if _holds_dev_fuse(p)]
    if holding:
        return min(holding)
    return min(candidates) if candidates else None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_pid_exit(pid: int | None, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_quiet(pids: Sequence[int], window: float = 0.5, timeout: float = 30) -> float:
    """Wait until the given daemons use (almost) no CPU for ``window`` seconds.

    Some filesystems (CryFS's block cache, for one) write back in the background after a
    workload; waiting keeps that work out of the next filesystem's measurement. Returns the
    seconds waited.
    """
    t0 = time.monotonic()
    pids = [p for p in pids if pid_alive(p)]
    if not pids:
        return 0.0
    before = sum(cpu_seconds(p) for p in pids)
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        now = sum(cpu_seconds(p) for p in pids)
        if now - before < 0.02:
            break
        before = now
    return time.monotonic() - t0


def kill_pid(pid: int | None) -> None:
    if pid_alive(pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            with contextlib.suppress(OSError):
                kids = [int(k) for k in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
                out.extend(kids)
                todo.extend(kids)
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` plus its descendants (a daemon may use helper processes)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


class RssSampler:
    """Samples a daemon's RSS every ``interval`` seconds in a thread; ``peak`` is the maximum."""

    def __init__(self, pid: int | None, interval: float = 0.05):
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.pid:
                self.peak = max(self.peak, rss_bytes(self.pid))
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.pid:
            self.peak = max(self.peak, rss_bytes(self.pid))


# --- machine description ----------------------------------------------------------------------


def first_line(cmd: Sequence[str], pattern: str | None = None) -> str:
    """First (or first matching) line of a command's output, '' if it cannot run."""
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        return ""
    try:
        _, text = run(cmd, check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in text.splitlines():
        line = line.strip()
        if line and (pattern is None or re.search(pattern, line)):
            return line
    return ""


def machine_info(scratch: Path) -> dict[str, str]:
    cpu = ""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    mem = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    backing = ""
    with contextlib.suppress(OSError, ValueError):
        _, text = run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", scratch], check=False)
        backing = " ".join(text.split())
    debian = ""
    with contextlib.suppress(OSError):
        debian = "Debian " + Path("/etc/debian_version").read_text().strip()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "aes_ni": "yes" if " aes" in f" {flags} " or " aes " in flags else "no",
        "memory": mem,
        "kernel": platform.release(),
        "os": debian or platform.platform(),
        "backing_fs": backing,
        "loadavg": Path("/proc/loadavg").read_text().split(" ")[0],
    }
