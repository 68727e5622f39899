"""``sealfs demo``: the whole life of a volume on embedded defaults (what ``make run`` runs).

Every step runs the real command line in a subprocess, exactly as an operator would: a local
KMS in simulated-TEE mode, a volume whose key the KMS releases to a (simulated) attested CVM,
a real FUSE mount, data written and read back, an integrity check, and unmounting.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from sealfs.errors import SealfsError
from sealfs.fuse.mount import is_mounted

APP_ID = hashlib.sha256(b"sealfs demo app").hexdigest()[:40]
COMPOSE = hashlib.sha256(b"sealfs-dev").hexdigest()


class DemoFailed(SealfsError):
    kind = "demo"


def _run(*args: str, input: bytes | None = None) -> str:
    cmd = [sys.executable, "-m", "sealfs", *args]
    click.echo(f"$ sealfs {' '.join(args)}", err=True)
    res = subprocess.run(cmd, input=input, capture_output=True)
    out = res.stdout.decode(errors="replace").strip()
    if res.returncode != 0:
        raise DemoFailed(
            f"step 'sealfs {args[0]}' failed ({res.returncode}): "
            f"{res.stderr.decode(errors='replace').strip()}"
        )
    if out:
        click.echo("  " + out.replace("\n", "\n  "), err=True)
    return out


def _start_kms(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    args = [
        sys.executable,
        "-m",
        "sealfs",
        "kms",
        "serve",
        "--state",
        str(work / "kms.db"),
        "--secret-file",
        str(work / "operator.secret"),
        "--port",
        "0",
        "--allow-simulated",
    ]
    click.echo("$ sealfs kms serve --allow-simulated (background)", err=True)
    log = open(work / "kms.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("listening on "):
        proc.kill()
        raise DemoFailed(f"the KMS did not start; see {work / 'kms.log'}")
    url = line.split()[2]
    click.echo(f"  {line.strip()}", err=True)
    return proc, url


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to put the KMS state, the backing directory and the mountpoint "
    "(default: a new temporary directory, removed afterwards).",
)
@click.option(
    "--size-mib",
    default=64,
    show_default=True,
    help="Size of the random file written and read back.",
)
@click.option("--keep", is_flag=True, help="Keep the work directory for inspection.")
def demo(workdir: Path | None, size_mib: int, keep: bool) -> None:
    """Run the whole life of a volume on embedded defaults.

    Starts a local KMS in simulated-TEE mode (development only), creates a volume whose master
    key the KMS releases to a simulated attested CVM (plus a recovery key file), mounts it with
    FUSE, writes files and reads them back, remounts (checking the freshness anchor), verifies
    the volume with `sealfs check`, and unmounts. Exits non-zero if any step fails.
    """
    work = workdir or Path(tempfile.mkdtemp(prefix="sealfs-demo-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    backing, mnt, key = work / "backing", work / "mnt", work / "recovery.key"
    kms = None
    try:
        secret = work / "operator.secret"
        secret.write_bytes(os.urandom(32).hex().encode() + b"\n")
        secret.chmod(0o600)
        init = _run(
            "kms",
            "init",
            "--state",
            str(work / "kms.db"),
            "--secret-file",
            str(secret),
            "--kdf-memory-kib",
            "8192",
        )
        kms_public_key = init.rsplit("KMS public key: ", 1)[-1].strip()
        _run(
            "kms",
            "policy",
            "set",
            APP_ID,
            "--state",
            str(work / "kms.db"),
            "--secret-file",
            str(secret),
            "--simulated",
            "--compose-hash",
            COMPOSE,
        )
        kms, url = _start_kms(work)
        kms_args = [
            "--kms",
            url,
            "--kms-public-key",
            kms_public_key,
            "--attester",
            "simulated",
            "--app-id",
            APP_ID,
        ]
        _run("create", str(backing), *kms_args, "--new-key-file", str(key), "--compression", "lz4")
        _run("info", str(backing))
        mnt.mkdir(exist_ok=True)
        log = str(work / "sealfs.log")
        _run("mount", str(backing), str(mnt), *kms_args, "--log-file", log)
        payload = os.urandom(size_mib << 20)
        start = time.monotonic()
        (mnt / "data.bin").write_bytes(payload)
        (mnt / "docs").mkdir()
        for i in range(200):
            (mnt / "docs" / f"note-{i}.txt").write_text(f"note {i}\n" * 50)
        os.symlink("docs/note-1.txt", mnt / "latest")
        os.setxattr(mnt / "data.bin", "user.origin", b"sealfs demo")
        written = time.monotonic() - start
        click.echo(f"  wrote {size_mib} MiB + 200 small files in {written:.1f}s", err=True)
        _run("umount", str(mnt))
        _run("mount", str(backing), str(mnt), *kms_args, "--log-file", log)
        ok = (
            hashlib.sha256((mnt / "data.bin").read_bytes()).digest()
            == hashlib.sha256(payload).digest()
            and all(
                (mnt / "docs" / f"note-{i}.txt").read_text() == f"note {i}\n" * 50
                for i in range(200)
            )
            and (mnt / "latest").read_text() == "note 1\n" * 50
            and os.getxattr(mnt / "data.bin", "user.origin") == b"sealfs demo"
        )
        if not ok:
            raise DemoFailed("data read back after remount differs from what was written")
        click.echo("  read back: identical", err=True)
        _run("umount", str(mnt))
        _run("check", str(backing), *kms_args)
        click.echo(
            f"demo finished: volume {backing} created, mounted, written, read back, "
            "checked and unmounted"
        )
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if kms is not None:
            kms.terminate()
            kms.wait(10)
        if keep or workdir:
            click.echo(f"work directory kept: {work}", err=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
