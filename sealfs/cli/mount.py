"""``sealfs mount`` and ``sealfs umount``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TextIO

import click

from sealfs.cli.credentials import credential_options, kms_client_args
from sealfs.cli.logs import log_service
from sealfs.errors import BusyError, SealfsError, UsageError
from sealfs.fs.limits import Limits
from sealfs.fuse.mount import check_mountpoint, serve, unmount
from sealfs.volume.header import Credential, KeyFileCredential, KmsCredential, load_header

ERROR_CLASSES = {cls.kind: cls for cls in SealfsError.__subclasses__()}


@click.command()
@click.argument("backing_dir", type=click.Path(file_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@credential_options
@click.option(
    "-f", "--foreground", is_flag=True, help="Stay in the foreground and log to standard error."
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False),
    help="Daemon log (default /run/sealfs/<volume-id>.log). Integrity failures are "
    "logged here with the plaintext path.",
)
@click.option(
    "--allow-other/--no-allow-other",
    default=None,
    help="Let other users (e.g. container processes) use the mount; permissions "
    "are still enforced. Default: on when running as root.",
)
@click.option(
    "--commit-interval",
    default=5.0,
    show_default=True,
    help="Seconds between automatic commits; a crash loses at most this much "
    "unsynced work. fsync(2) always commits at once.",
)
@click.option(
    "--writeback-cache",
    is_flag=True,
    help="Let the kernel buffer and merge writes (FUSE writeback cache): faster for "
    "many tiny writes (e.g. dd bs=512), slower for streaming writes and many "
    "small files on the machines measured (docs/benchmarks.md).",
)
@click.option(
    "--allow-rollback",
    is_flag=True,
    help="Mount even if the volume is older than (or forked from) the state "
    "anchored at the KMS. Dangerous: this accepts a host's replay of old data. "
    "The override is logged.",
)
@click.option(
    "--anchor-on-fsync",
    is_flag=True,
    help="Strict freshness (KMS unlock only): fsync(2), fdatasync(2) and fsync of a "
    "directory return only once their commit is anchored at the KMS, so the host cannot "
    "roll back fsync'd data unseen (by default the anchor advances every 30 s, and a host "
    "may drop up to that much fsync'd work). Concurrent fsyncs share one KMS round trip. "
    "If the KMS refuses or is not reached within --kms-deadline the fsync fails with EIO: "
    "the data is durable on disk but not anchored (logged); the next fsync tries again. "
    "Costs a KMS round trip per group of concurrent fsyncs (docs/benchmarks.md).",
)
@click.option("--debug", is_flag=True, help="Log every commit and recovery step.")
@click.option("--ready-fd", type=int, hidden=True)
def mount(
    backing_dir: str,
    mountpoint: str,
    cred: Credential,
    foreground: bool,
    log_file: str | None,
    allow_other: bool | None,
    commit_interval: float,
    writeback_cache: bool,
    allow_rollback: bool,
    anchor_on_fsync: bool,
    debug: bool,
    ready_fd: int | None,
) -> None:
    """Mount the volume in BACKING_DIR on MOUNTPOINT.

    Unlocks the volume, verifies and replays its metadata (repairing a torn last commit left
    by a crash), takes the volume lock (a second mount of the same volume is refused) and
    serves it. Without --foreground the command returns once the mount is ready and a
    daemon keeps serving it; `sealfs umount MOUNTPOINT` flushes, commits and unmounts.

    Reads of data that fail verification return EIO and are logged with their path.
    """
    if allow_other is None:
        allow_other = os.geteuid() == 0
    if foreground or ready_fd is not None:
        log_service(
            _private_log(Path(log_file)) if log_file else sys.stderr,
            logging.DEBUG if debug else logging.INFO,
        )
        ready = _ready_writer(ready_fd)
        try:
            serve(
                Path(backing_dir),
                Path(mountpoint),
                cred,
                allow_other=allow_other,
                allow_rollback=allow_rollback,
                writeback_cache=writeback_cache,
                anchor_on_fsync=anchor_on_fsync,
                limits=Limits(commit_interval=commit_interval),
                ready=ready,
            )
        except SealfsError as e:
            if ready_fd is not None:
                _report(ready_fd, {"ok": False, "kind": e.kind, "message": e.message})
            raise
        return
    extra = ["--allow-rollback"] if allow_rollback else []
    if writeback_cache:
        extra.append("--writeback-cache")
    if anchor_on_fsync:
        extra.append("--anchor-on-fsync")
    if debug:
        extra.append("--debug")
    pid, log = start_daemon(
        backing_dir, mountpoint, cred, log_file, allow_other, commit_interval, extra
    )
    click.echo(f"mounted {backing_dir} on {mountpoint} (daemon pid {pid}, log {log})")


def _private_log(path: Path) -> TextIO:
    """Open the daemon log for appending, readable by its owner only: it names plaintext paths
    (integrity failures). A directory sealfs creates for it is 0700."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # an older log may have been created more open
    except OSError as e:
        raise UsageError(f"cannot open the log file {path}: {e.strerror}") from None
    return os.fdopen(fd, "a", buffering=1)


def _report(fd: int, message: dict[str, object]) -> None:
    try:
        os.write(fd, json.dumps(message).encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


def _ready_writer(fd: int | None):  # type: ignore[no-untyped-def]
    def ready() -> None:
        if fd is not None:
            _report(fd, {"ok": True, "pid": os.getpid()})

    return ready


def start_daemon(
    backing_dir: str,
    mountpoint: str,
    cred: Credential,
    log_file: str | None,
    allow_other: bool,
    commit_interval: float,
    extra: list[str],
) -> tuple[int, str]:
    """Start ``mount --ready-fd`` detached, wait until it reports the mount ready, and return
    the daemon's pid and log file (``sealfs mount``, and ``sealfs init up`` for each volume).

    The credential travels to the child on its standard input (a key file's bytes, a
    passphrase), or as the KMS options that make the same client again; never a secret in
    argv or the environment.
    """
    if cred.expected_volume is not None:
        extra = [*extra, "--volume-id", cred.expected_volume.hex()]
    check_mountpoint(Path(mountpoint))  # fail fast, before unlocking
    if log_file is None:
        vid = load_header(Path(backing_dir)).volume_id.hex()
        log_file = f"/run/sealfs/{vid}.log"
    read_fd, write_fd = os.pipe()
    args = [
        sys.executable,
        "-m",
        "sealfs",
        "mount",
        backing_dir,
        mountpoint,
        "--ready-fd",
        str(write_fd),
        "--log-file",
        log_file,
        "--commit-interval",
        str(commit_interval),
        "--allow-other" if allow_other else "--no-allow-other",
        *extra,
    ]
    stdin_data = b""
    if isinstance(cred, KeyFileCredential):
        args += ["--key-file", "-"]
        stdin_data = cred.secret.reveal()
    elif isinstance(cred, KmsCredential):
        args += kms_client_args(cred.client)
    else:
        args.append("--passphrase")
        stdin_data = cred.secret.reveal() + b"\n"
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(write_fd,),
        start_new_session=True,
    )
    os.close(write_fd)
    assert proc.stdin is not None
    proc.stdin.write(stdin_data)
    proc.stdin.close()
    with os.fdopen(read_fd, "rb") as f:
        line = f.readline()
    try:
        message = json.loads(line)
    except ValueError:
        code = proc.wait()
        raise BusyError(
            f"the sealfs daemon exited (status {code}) before the mount was ready; see {log_file}"
        ) from None
    if not message.get("ok"):
        cls = ERROR_CLASSES.get(message.get("kind"), SealfsError)
        raise cls(message.get("message", "mount failed"))
    return int(message["pid"]), log_file


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    help="Seconds to wait for the daemon's final commit.",
)
def umount(mountpoint: str, timeout: float) -> None:
    """Unmount MOUNTPOINT and wait until the daemon has committed everything and exited.

    The kernel first writes back its cached pages, then the daemon writes its remaining
    dirty blocks, commits the metadata, advances the KMS freshness anchor (when mounted with
    --kms) and releases the volume. Fails with exit code 6 while a process still uses the
    mount (see fuser -m MOUNTPOINT). After a daemon crash use `fusermount3 -u -z MOUNTPOINT`.
    """
    if not Path(mountpoint).exists():
        raise UsageError(f"{mountpoint} does not exist")
    unmount(Path(mountpoint), timeout)
    click.echo(f"unmounted {mountpoint}")
