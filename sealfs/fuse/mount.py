"""Running a mounted volume: unlock, lock, replay, serve FUSE requests, commit, unmount."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from sealfs.errors import BusyError, SealfsError, UsageError
from sealfs.fs.core import Filesystem
from sealfs.fs.lifecycle import unlock_volume
from sealfs.fs.limits import Limits
from sealfs.fuse.ops import SealfsOperations
from sealfs.store import ObjectStore
from sealfs.volume.anchor import KmsAnchor
from sealfs.volume.header import Credential, KmsCredential

log = logging.getLogger("sealfs.mount")
RUN_DIR = Path("/run/sealfs")


def runtime_file(mountpoint: Path) -> Path:
    """Where a daemon records its pid for ``sealfs umount`` (outside the untrusted store)."""
    digest = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return RUN_DIR / f"mount-{digest}.json"


def check_mountpoint(mountpoint: Path) -> Path:
    mp = Path(mountpoint).absolute()
    if is_mounted(mp):  # first: a dead FUSE mount cannot even be stat'ed (ENOTCONN, EIO)
        raise BusyError(
            f"mountpoint {mp} is busy: something is already mounted there (if "
            f"its daemon died, `fusermount3 -u {mp}` clears it)"
        )
    try:
        st = mp.stat()
    except FileNotFoundError:
        raise UsageError(f"mountpoint {mp} does not exist") from None
    except OSError as e:
        raise UsageError(f"mountpoint {mp} cannot be used: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mountpoint {mp} is not a directory")
    return mp


def require_patched_pyfuse3() -> None:
    """Refuse to serve with a pyfuse3 that lacks the project's patches (the stock PyPI build):
    without the fallocate handler the kernel would answer every fallocate(2) with EOPNOTSUPP, and
    programs that reserve space (databases, package managers) would fail or quietly fall back,
    on this mount only; without ``FileInfo.noflush`` opening a file would fail."""
    if not hasattr(pyfuse3.Operations, "fallocate") or not hasattr(pyfuse3.FileInfo(), "noflush"):
        raise SealfsError(
            "the installed pyfuse3 lacks sealfs's patches; sealfs needs pyfuse3 "
            "3.5.0 with tools/pyfuse3-patches/ applied: run "
            "tools/install-pyfuse3.sh /path/to/python"
        )


def serve(
    backing: Path,
    mountpoint: Path,
    cred: Credential,
    *,
    allow_other: bool = False,
    allow_rollback: bool = False,
    writeback_cache: bool = False,
    anchor_on_fsync: bool = False,
    limits: Limits | None = None,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Mount and serve until unmounted or signalled; commit everything before returning.

    With a KMS credential the volume's freshness anchor is checked before mounting and
    advanced while mounted (with ``anchor_on_fsync``, before each fsync returns); with
    another credential freshness rests on the disk alone.
    """
    if anchor_on_fsync and not isinstance(cred, KmsCredential):
        raise UsageError(
            "--anchor-on-fsync needs a KMS unlock (--kms ...): with a key file or "
            "passphrase there is no anchor to wait for"
        )
    require_patched_pyfuse3()
    mp = check_mountpoint(mountpoint)
    store, header, master = unlock_volume(backing, cred)
    store.lock()
    try:
        if header.rekey_in_progress:
            log.warning(
                "rekey in progress (interrupted): objects open under the new master key or "
                "the previous one; run `sealfs rekey` again to finish it"
            )
        fs = Filesystem(store, header, master, limits)
        if isinstance(cred, KmsCredential):
            fs.anchor = KmsAnchor(cred.client, header.volume_id)
            fs.freshness.on_fsync = anchor_on_fsync
        elif header.kms_slot() is not None:
            log.warning(
                "volume has a KMS slot but was unlocked without the KMS: whole-volume "
                "rollback is not checked on this mount"
            )
        trio.run(_serve, fs, mp, backing, allow_other, allow_rollback, writeback_cache, ready)
    finally:
        store.unlock()


async def _serve(
    fs: Filesystem,
    mp: Path,
    backing: Path,
    allow_other: bool,
    allow_rollback: bool,
    writeback_cache: bool,
    ready: Callable[[], None],
) -> None:
    await fs.load(allow_rollback=allow_rollback)
    source = str(Path(backing).absolute()).replace("\\", "\\\\").replace(",", "\\,")
    options = set(pyfuse3.default_options) | {f"fsname=sealfs:{source}", "subtype=sealfs"}
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(SealfsOperations(fs, writeback_cache), str(mp), options)
    except RuntimeError as e:
        raise BusyError(f"cannot mount on {mp}: {e}") from None
    record = runtime_file(mp)
    try:
        RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        record.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "mountpoint": str(mp),
                    "backing": str(Path(backing).absolute()),
                }
            )
        )
    except OSError as e:
        log.warning("cannot write %s: %s", record, e)
    log.info("mounted volume %s on %s", fs.vid.hex(), mp)
    ready()
    terminated = False
    try:
        async with trio.open_nursery() as nursery:
            fs.workers.nursery = nursery
            await nursery.start(fs.commit_loop)

            async def on_signal() -> None:
                nonlocal terminated
                with trio.open_signal_receiver(
                    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1
                ) as signals:
                    async for signum in signals:
                        if signum == signal.SIGUSR1:  # operators: what is held in memory
                            log.info("stats: %s", fs.stats())
                            continue
                        log.info("signal %d: unmounting", signum)
                        terminated = True
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            nursery.start_soon(trio.to_thread.run_sync, functools.partial(tune_readahead, mp))
            await pyfuse3.main()
            await fs.sync()  # background flushes need the nursery: finish them here
            await fs.deletions_done()
            nursery.cancel_scope.cancel()
    finally:
        fs.workers.nursery = None
        try:
            await fs.close()
            log.info("unmounted %s; all data committed", mp)
        except SealfsError as e:
            log.error(
                "unmounted %s, but the final commit FAILED (%s): changes made since the "
                "last successful commit or fsync are lost",
                mp,
                e,
            )
            raise
        finally:
            pyfuse3.close(unmount=terminated)
            with contextlib.suppress(OSError):
                record.unlink()


def tune_readahead(mp: Path, kib: int = 1024) -> None:
    """Raise the mount's kernel readahead from the default 128 KiB, so sequential reads arrive
    as 1 MiB requests (a third of the round trips' cost; measured in docs/benchmarks.md).
    Best effort: needs root and sysfs. Runs in a thread because stat() on the mountpoint is
    itself a FUSE request that this process must answer."""
    try:
        dev = os.stat(mp).st_dev
        (Path("/sys/class/bdi") / f"{os.major(dev)}:{os.minor(dev)}" / "read_ahead_kb").write_text(
            str(kib)
        )
    except OSError as e:
        log.debug("cannot tune readahead: %s", e)


def served_backing(mountpoint: Path) -> Path | None:
    """The backing directory the sealfs daemon on ``mountpoint`` serves (its runtime record),
    or None if none is known."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return Path(json.loads(runtime_file(Path(mountpoint).absolute()).read_text())["backing"])
    return None


def unmount(mountpoint: Path, timeout: float = 120.0) -> None:
    """Unmount and wait for the daemon to finish its final commit (it releases the volume
    lock when it exits)."""
    mp = Path(mountpoint).absolute()
    if not is_mounted(mp):
        raise UsageError(f"{mp} is not mounted")
    backing = served_backing(mp)
    res = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
        if "busy" in msg.lower():
            raise BusyError(f"cannot unmount {mp}: it is in use by some process")
        raise UsageError(f"cannot unmount {mp}: {msg}")
    if backing is None:
        return
    store = ObjectStore(backing)
    deadline = time.monotonic() + timeout
    while store.is_locked():
        if time.monotonic() > deadline:
            raise BusyError(f"the sealfs daemon for {mp} did not finish within {timeout:.0f}s")
        time.sleep(0.02)


def is_mounted(mp: Path) -> bool:
    """From /proc/self/mountinfo: os.path.ismount() says False when the mount root cannot be
    stat'ed (a dead daemon: ENOTCONN; a damaged root: EIO)."""
    target = str(Path(mp).absolute())
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
