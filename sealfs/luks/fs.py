"""The file system on an opened LUKS volume: create, mount, unmount.

Only what first boot needs: mkfs with a UUID derived from the volume's identity (so a volume's
file system is recognisably its own) and a size one state block short of the device (the last
block holds the first-boot state record, see :mod:`sealfs.luks.state`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence

from sealfs.errors import BusyError, StorageError, UsageError

from .keys import KeyBinding

FILESYSTEMS = ("ext4", "none")
DEFAULT_MOUNT_OPTIONS = "nodev,nosuid"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_UUID_NAMESPACE = uuid.UUID("5d8a5a3e-8f4b-4c1e-9a53-3c9d0f6c2b71")


def fs_uuid(binding: KeyBinding) -> str:
    """Deterministic file-system UUID of a volume (its identity, not a secret)."""
    return str(uuid.uuid5(_UUID_NAMESPACE, f"sealfs-luks\0{binding.app_id}\0{binding.volume_id}"))


def check_fs(fs: str) -> str:
    if fs not in FILESYSTEMS:
        raise UsageError(f"unsupported file system {fs!r} (supported: {', '.join(FILESYSTEMS)})")
    return fs


def _run(argv: Sequence[str], what: str) -> None:
    tool = shutil.which(argv[0], path=_PATH)
    if tool is None:
        raise StorageError(f"{what}: {argv[0]} not found")
    try:
        proc = subprocess.run(
            [tool, *argv[1:]],
            capture_output=True,
            env={"PATH": _PATH, "LC_ALL": "C"},
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except OSError as e:
        raise StorageError(f"{what}: cannot run {argv[0]}: {e.strerror}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.decode("utf-8", "replace").splitlines()]
        detail = next((ln for ln in reversed(lines) if ln), f"exit status {proc.returncode}")
        if proc.returncode == 32 and "busy" in detail.lower():
            raise BusyError(f"{what}: {detail}")
        raise StorageError(f"{what}: {detail}")


def mkfs(device: str, fs: str, size_bytes: int, binding: KeyBinding) -> None:
    """Create ``fs`` on the first ``size_bytes`` of ``device`` (overwrites what is there)."""
    if fs == "ext4":
        blocks = size_bytes // 4096
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-b",
                "4096",
                "-U",
                fs_uuid(binding),
                "-L",
                "sealfs",
                "-E",
                "nodiscard",
                device,
                str(blocks),
            ],
            "mkfs.ext4",
        )
    elif fs != "none":
        raise UsageError(f"unsupported file system {fs!r}")


def mount(device: str, mountpoint: str, fs: str, options: str = DEFAULT_MOUNT_OPTIONS) -> None:
    os.makedirs(mountpoint, mode=0o755, exist_ok=True)
    if os.path.ismount(mountpoint):
        raise BusyError(f"{mountpoint} is already a mount point")
    _run(["mount", "-t", fs, "-o", options, device, mountpoint], f"mount {mountpoint}")


def umount(mountpoint: str) -> None:
    _run(["umount", mountpoint], f"umount {mountpoint}")


def mountpoints_of(device: str) -> list[str]:
    """Where ``device`` is mounted now (by device number, so /dev/dm-N aliases match)."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return []
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            major, minor = (int(x) for x in parts[2].split(":"))
            if os.makedev(major, minor) == rdev:
                found.append(_unescape(parts[4]))
    return found


def _unescape(path: str) -> str:
    """/proc/self/mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 3 < len(path) and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)
