"""The only module that runs ``cryptsetup``.

Rules it enforces: passphrases go in on stdin (``--key-file=-``) or through an anonymous pipe
named ``/proc/self/fd/N``, never in argv, the environment or a file; the child gets a minimal
environment; every header cryptsetup reads is the validated in-memory copy, passed with
``--header``; failures become one-line :class:`~sealfs.errors.SealfsError`\\ s built from
cryptsetup's own last message (which never contains key material).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sealfs.crypto import Secret
from sealfs.errors import BusyError, LuksError, SealfsError, UnlockError, UsageError

from . import profile as P
from .snapshot import HeaderSnapshot

_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DM_CONTROL = "/dev/mapper/control"

NO_DEVICE_MAPPER = (
    "device-mapper is not available in this kernel (no device-mapper in /proc/misc): a LUKS "
    "mapping needs a kernel with dm-crypt (modules dm-mod, dm-crypt, and dm-integrity for "
    "--integrity)"
)


@dataclass(frozen=True)
class KdfCost:
    """argon2id cost for a key slot; ``None`` means let cryptsetup benchmark (iter-time)."""

    iterations: int | None = None
    memory_kib: int | None = None
    threads: int | None = None
    iter_time_ms: int = 2000

    def args(self) -> list[str]:
        out = ["--pbkdf", "argon2id"]
        if self.iterations is None:
            out += ["--iter-time", str(self.iter_time_ms)]
        else:
            out += ["--pbkdf-force-iterations", str(self.iterations)]
        if self.memory_kib is not None:
            out += ["--pbkdf-memory", str(self.memory_kib)]
        if self.threads is not None:
            out += ["--pbkdf-parallel", str(self.threads)]
        return out


KMS_SLOT_COST = KdfCost(
    iterations=P.KMS_SLOT_ARGON2_TIME,
    memory_kib=P.KMS_SLOT_ARGON2_MEMORY_KIB,
    threads=P.KMS_SLOT_ARGON2_THREADS,
)
RECOVERY_SLOT_COST = KdfCost()


def binary() -> str:
    found = shutil.which("cryptsetup", path=_SBIN_PATH)
    if not found:
        raise LuksError("cryptsetup not found (install the cryptsetup-bin package)")
    return found


def device_mapper_available() -> bool:
    """True if the running kernel has device-mapper (a /dev/mapper/control node alone is not
    enough: container runtimes create it even when the kernel has no driver behind it)."""
    try:
        with open("/proc/misc", encoding="ascii", errors="replace") as f:
            registered = any(line.split()[1:] == ["device-mapper"] for line in f)
    except OSError:
        registered = False
    return registered and os.path.exists(DM_CONTROL)


def require_device_mapper() -> None:
    if not device_mapper_available():
        raise LuksError(NO_DEVICE_MAPPER)


def run(
    args: Sequence[str],
    *,
    secret: Secret | None = None,
    pass_fds: Sequence[int] = (),
    what: str = "cryptsetup",
) -> subprocess.CompletedProcess[bytes]:
    """Run cryptsetup with ``secret`` (if any) on stdin; raise a one-line error on failure."""
    argv = [binary(), *args]
    env = {"PATH": _SBIN_PATH, "LC_ALL": "C"}
    stdin = secret.reveal() if secret is not None else b""
    try:
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            env=env,
            pass_fds=tuple(pass_fds),
            check=False,
        )
    except OSError as e:
        raise LuksError(f"{what}: cannot run cryptsetup: {e.strerror}") from None
    finally:
        del stdin
    if proc.returncode != 0:
        raise _error(proc, what)
    return proc


def _error(proc: subprocess.CompletedProcess[bytes], what: str) -> SealfsError:
    lines = [ln.strip() for ln in proc.stderr.decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln]
    detail = lines[-1] if lines else f"exit status {proc.returncode}"
    if "device-mapper" in detail.lower() or "dm_mod" in detail:
        return LuksError(f"{what}: {NO_DEVICE_MAPPER}")
    if "requires reencryption recovery" in detail:
        return ReencryptionCrashed(f"{what}: {detail}")
    if proc.returncode == 2:
        return UnlockError(f"{what}: no key slot opened with the key given ({detail})")
    if proc.returncode == 5:
        return BusyError(f"{what}: {detail}")
    return LuksError(f"{what}: {detail}")


def format_header(
    snap: HeaderSnapshot,
    device: str,
    key: Secret,
    profile: P.LuksProfile,
    subsystem: str | None = None,
) -> None:
    """luksFormat into the in-memory header ``snap``, for ``device`` as data device.

    The device itself is only touched with --integrity (cryptsetup formats and wipes the
    dm-integrity area); the header reaches the disk later, via the crash-safe commit.
    ``subsystem`` (not secret) goes into the LUKS2 subsystem field of both header copies.
    """
    args = [
        "luksFormat",
        "--type", "luks2",
        "--batch-mode",
        "--cipher", P.CIPHER,
        "--key-size", str(P.CIPHER_KEY_BYTES * 8),
        "--sector-size", str(P.SECTOR_SIZE),
        "--offset", str(P.DATA_OFFSET // 512),
        "--luks2-metadata-size", str(P.HDR_SIZE),
        "--luks2-keyslots-size", str(P.KEYSLOTS_SIZE),
        "--key-slot", str(P.KMS_KEYSLOT),
        "--key-file=-",
        *KMS_SLOT_COST.args(),
        "--header", snap.child_path,
    ]  # fmt: skip
    if subsystem is not None:
        args += ["--subsystem", subsystem]
    if profile.integrity:
        require_device_mapper()
        args += ["--integrity", profile.integrity]
    run([*args, device], secret=key, pass_fds=[snap.fd], what="luksFormat")


def add_recovery_slot(
    snap: HeaderSnapshot,
    device: str,
    key: Secret,
    recovery: Secret,
    cost: KdfCost = RECOVERY_SLOT_COST,
) -> None:
    """Add the recovery passphrase as key slot 1 of the in-memory header.

    The existing key goes in on stdin; the new one through a pipe that cryptsetup opens as
    ``/proc/self/fd/N``, so neither is ever on disk or in argv.
    """

    def add(rfd: int) -> None:
        args = [
            "luksAddKey",
            "--batch-mode",
            "--key-file=-",
            "--key-slot", str(P.RECOVERY_KEYSLOT),
            *cost.args(),
            "--header", snap.child_path,
            device,
            f"/proc/self/fd/{rfd}",
        ]  # fmt: skip
        run(args, secret=key, pass_fds=[snap.fd, rfd], what="luksAddKey")

    _with_new_secret(recovery, add)


def check_key(snap: HeaderSnapshot, device: str, key: Secret, keyslot: int) -> None:
    """Check that ``key`` opens ``keyslot`` of the validated header (needs no device-mapper)."""
    args = [
        "open", "--test-passphrase", "--type", "luks2", "--disable-external-tokens",
        "--key-file=-", "--key-slot", str(keyslot), "--header", snap.child_path, device,
    ]  # fmt: skip
    run(args, secret=key, pass_fds=[snap.fd], what="key check")


def open_mapping(snap: HeaderSnapshot, device: str, name: str, key: Secret, keyslot: int) -> None:
    """Map ``device`` as /dev/mapper/``name`` using the validated in-memory header."""
    require_device_mapper()
    if not snap.sealed:
        raise LuksError("internal: refusing to open with an unsealed header copy")
    args = [
        "open", "--type", "luks2", "--disable-external-tokens",
        "--key-file=-", "--key-slot", str(keyslot),
        "--header", snap.child_path, device, name,
    ]  # fmt: skip
    run(args, secret=key, pass_fds=[snap.fd], what="open")


def close_mapping(name: str) -> None:
    require_device_mapper()
    run(["close", name], what="close")


def active_mapping(uuid: str) -> str | None:
    """The name of the active dm-crypt mapping of the LUKS2 volume ``uuid``, if any.

    Found by the device-mapper UUID cryptsetup gives every LUKS2 mapping
    (``CRYPT-LUKS2-<uuid without dashes>-<name>``), so it works for image files too.
    """
    if not device_mapper_available():
        return None
    proc = _dmsetup("info", "--noheadings", "-c", "-o", "name,uuid", "--separator", " ")
    prefix = f"CRYPT-LUKS2-{uuid.replace('-', '')}-"
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].startswith(prefix):
            return fields[0]
    return None


def _dmsetup(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run dmsetup (reads only, never a key) with the minimal environment."""
    dmsetup = shutil.which("dmsetup", path=_SBIN_PATH)
    if dmsetup is None:
        raise LuksError("dmsetup not found (it comes with libdevmapper)")
    env = {"PATH": _SBIN_PATH, "LC_ALL": "C"}
    return subprocess.run([dmsetup, *args], capture_output=True, env=env, check=False)


def mapping_status(name: str) -> dict[str, str] | None:
    """The *kernel's* view of an active LUKS mapping, or None if there is none.

    Deliberately not ``cryptsetup status``: for a mapping opened with a detached header, that
    re-reads the (untrusted, possibly swapped) header on the data device to print the cipher.
    The device-mapper table is what actually encrypts. Key material is never part of the
    result (the table names a keyring key, and dmsetup masks inline keys).
    """
    if not device_mapper_available():
        return None
    info = _dmsetup("info", "--noheadings", "-c", "-o", "uuid", name)
    if info.returncode != 0 or not info.stdout.decode().strip().startswith("CRYPT-LUKS2-"):
        return None
    table = _dmsetup("table", name)
    lines = table.stdout.decode("utf-8", "replace").splitlines()
    if table.returncode != 0 or len(lines) != 1:
        return None
    fields = lines[0].split()
    if len(fields) < 8 or fields[2] != "crypt":
        return None
    out = {
        "type": "LUKS2",
        "cipher": fields[3],
        "size_sectors": fields[1],
        "device": fields[6],
        "offset_sectors": fields[7],
        "sector_size": "512",
        "integrity": "none",
    }
    for opt in fields[9:]:
        key, _, value = opt.partition(":")
        if key == "sector_size":
            out["sector_size"] = value
        elif key == "integrity":
            out["integrity"] = value
    if fields[3].startswith("capi:authenc(hmac(sha256),"):
        out["integrity"] = f"hmac(sha256) {out['integrity']}"
    return out


# -- key slots and re-encryption on the device itself -----------------------------------------
#
# These write the header on the device in place (cryptsetup's own two-copy update), because
# a re-encryption must persist its progress there to be resumable. The callers validate the
# header right before each call and again after it; see docs/luks.md, "Re-key".


def _with_new_secret(new: Secret, fn: Callable[[int], None]) -> None:
    """Call ``fn(rfd)`` with ``new`` readable from the pipe ``rfd`` (never on disk or argv)."""
    rfd, wfd = os.pipe()
    try:
        data = new.reveal()
        if len(data) > 60000:  # stays far below the pipe buffer, so the write cannot block
            raise UsageError("passphrase too long")
        os.write(wfd, data)
        del data
        os.close(wfd)
        wfd = -1
        fn(rfd)
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)


def add_key(device: str, key: Secret, new: Secret, keyslot: int, cost: KdfCost) -> None:
    """Add ``new`` as ``keyslot`` of the device's header, unlocking with ``key``."""

    def add(rfd: int) -> None:
        args = [
            "luksAddKey", "--batch-mode", "--key-file=-", "--key-slot", str(keyslot),
            *cost.args(), device, f"/proc/self/fd/{rfd}",
        ]  # fmt: skip
        run(args, secret=key, pass_fds=[rfd], what="luksAddKey")

    _with_new_secret(new, add)


def kill_slot(device: str, key: Secret, keyslot: int) -> None:
    """Wipe ``keyslot`` of the device's header; ``key`` must open one of the others."""
    args = ["luksKillSlot", "--batch-mode", "--key-file=-", device, str(keyslot)]
    run(args, secret=key, what="luksKillSlot")


def set_subsystem(device: str, subsystem: str) -> None:
    """Set the header's subsystem field (sealfs records the KMS key version there)."""
    run(["config", "--subsystem", subsystem, device], what="config")


class ReencryptionCrashed(LuksError):
    """A re-encryption stopped inside a hotzone: :func:`recover_reencryption` first."""


def recover_reencryption(device: str, key: Secret) -> None:
    """Restore the hotzone a crash interrupted, from the checksums in the reencrypt slot.

    cryptsetup's ``repair`` on a LUKS2 re-encryption; it needs the volume keys, so it also
    checks the reencryption metadata digest a forged state cannot carry.
    """
    args = ["repair", "--batch-mode", "--key-file=-", "--disable-external-tokens", device]
    run(args, secret=key, what="reencryption recovery")


@dataclass(frozen=True)
class ReencryptProgress:
    """One progress report of ``cryptsetup reencrypt --progress-json``."""

    done_bytes: int
    total_bytes: int


def reencrypt(
    device: str,
    key: Secret,
    *,
    keyslot: int | None,
    resume: bool,
    active_name: str | None,
    offline_file: bool,
    hotzone_bytes: int | None,
    on_progress: Callable[[ReencryptProgress], None],
) -> None:
    """Start (``keyslot``: the slot ``key`` opens; the others are wiped at the end) or resume
    a LUKS2 re-encryption under a new random volume key, reporting progress as it goes.

    Forward direction, checksum resilience (the only shape the rekey validator accepts).
    ``active_name``: the mapping of this volume, re-encrypted online (cryptsetup reloads its
    table piece by piece). Otherwise offline; ``offline_file`` says the device is an image
    file, for which cryptsetup cannot itself rule out an active mapping (the caller did).
    """
    args = ["reencrypt", "--batch-mode", "--key-file=-", "--disable-external-tokens"]
    if resume:
        args += ["--resume-only"]
    else:
        args += [
            "--key-slot", str(keyslot), "--resilience", "checksum",
            "--resilience-hash", P.AF_HASH, *KMS_SLOT_COST.args(),
        ]  # fmt: skip
    if hotzone_bytes is not None:
        args += ["--hotzone-size", str(hotzone_bytes)]
    if active_name is not None:
        args += ["--active-name", active_name]
    elif offline_file:
        args += ["--force-offline-reencrypt"]
    args += ["--progress-json", "--progress-frequency", "1", device]
    argv = [binary(), *args]
    env = {"PATH": _SBIN_PATH, "LC_ALL": "C"}
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
    except OSError as e:
        raise LuksError(f"reencrypt: cannot run cryptsetup: {e.strerror}") from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(key.reveal())
        proc.stdin.close()
        for line in proc.stdout:
            report = _parse_progress(line)
            if report is not None:
                on_progress(report)
        stderr = proc.stderr.read()
    finally:
        returncode = proc.wait()
    if returncode != 0:
        raise _error(subprocess.CompletedProcess(argv, returncode, b"", stderr), "reencrypt")


def _parse_progress(line: bytes) -> ReencryptProgress | None:
    import json

    try:
        data = json.loads(line)
        return ReencryptProgress(int(data["device_bytes"]), int(data["device_size"]))
    except (ValueError, KeyError, TypeError):
        return None
