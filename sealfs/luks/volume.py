"""LUKS volume operations: format, open, close, inspect, header backup and restore.

Each operation that reads a header follows the same path: capture the header region into a
sealed memfd, validate that copy against the trusted :class:`~sealfs.luks.profile.LuksProfile`,
and only then give that same copy to cryptsetup. Nothing here prints; the CLI does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sealfs import failpoints
from sealfs.crypto import Secret
from sealfs.errors import LuksError, StorageError, UsageError

from . import cryptsetup as cs
from . import header as H
from . import profile as P
from .device import DeviceState, check_device_path, classify, commit_header, read_exact, with_magics
from .device import device_size as get_device_size
from .snapshot import HeaderSnapshot

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

#: A key, or how to get it once the header is validated (a KMS key depends on the key version
#: the validated header records).
KeyFor = Secret | Callable[[H.HeaderInfo], Secret]


def resolve_key(key: KeyFor, info: H.HeaderInfo) -> Secret:
    """The key itself, or the one ``key`` picks for the validated header ``info``."""
    return key if isinstance(key, Secret) else key(info)


def check_mapping_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UsageError(f"mapping name {name!r}: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return name


def mapper_path(name: str) -> str:
    return f"/dev/mapper/{check_mapping_name(name)}"


def format_volume(
    device: str,
    key: Secret,
    profile: P.LuksProfile,
    *,
    recovery: Secret | None = None,
    recovery_cost: cs.KdfCost = cs.RECOVERY_SLOT_COST,
    key_version: int | None = None,
) -> H.HeaderInfo:
    """Format a blank device (or finish a format a crash interrupted); never overwrite data.

    The header is built in memory, validated like any header from disk (a self-check that the
    installed cryptsetup produces exactly the sealfs shape), then committed magic-last.
    ``key_version``: ``key`` is the KMS key of that version; it is recorded in the header's
    subsystem field, so that later opens ask the KMS for the same version.
    """
    if profile.recovery_slot != (recovery is not None):
        raise UsageError("a recovery key slot needs a recovery passphrase, and vice versa")
    check_device_path(device)
    size = get_device_size(device)
    _check_size(device, size)
    area = read_exact(device, 0, P.DATA_OFFSET)
    state = classify(area, size, profile)
    if state is DeviceState.LUKS:
        raise LuksError(f"{device} already holds a LUKS header; refusing to format over it")
    if state is DeviceState.FOREIGN:
        raise LuksError(
            f"{device} is not blank (its first 32 KiB hold data that is no sealfs header); "
            "refusing to format over it: wipe it explicitly if it really is unused"
        )
    if state is DeviceState.PENDING:
        # An earlier format wrote the whole body but crashed before the magics: finish it.
        region = with_magics(area)
        info = H.validate_header_area(region, size, profile)
        commit_header(device, region)
        failpoints.reached("luks:header-committed")
        return info
    with HeaderSnapshot.empty(size) as snap:
        subsystem = H.kms_subsystem(key_version) if key_version is not None else None
        cs.format_header(snap, device, key, profile, subsystem)
        if recovery is not None:
            cs.add_recovery_slot(snap, device, key, recovery, recovery_cost)
        snap.seal()
        region = snap.read()
    try:
        info = H.validate_header_area(region, size, profile)
    except H.HeaderRefused as e:
        raise LuksError(
            f"this cryptsetup produced a header sealfs does not accept ({e.reason}); "
            "refusing to write it"
        ) from None
    if info.kms_key_version != key_version:
        raise LuksError("internal: the new header does not record the KMS key version")
    commit_header(device, region)
    failpoints.reached("luks:header-committed")
    return info


def validated_snapshot(device: str, profile: P.LuksProfile) -> tuple[HeaderSnapshot, H.HeaderInfo]:
    """Capture and validate; the caller owns (and must close) the returned snapshot."""
    check_device_path(device)
    snap = HeaderSnapshot.capture(device)
    try:
        region = snap.read()
        if region[:6] != H.MAGIC_PRIMARY:
            state = classify(region, snap.device_size, profile)
            raise LuksError(f"{device} is not a LUKS volume (state: {state.value})")
        info = H.validate_header_area(region, snap.device_size, profile)
    except BaseException:
        snap.close()
        raise
    return snap, info


def open_volume(
    device: str,
    name: str,
    key: KeyFor,
    profile: P.LuksProfile,
    *,
    keyslot: int = P.KMS_KEYSLOT,
) -> H.HeaderInfo:
    """Validate the header, then map the device with that validated in-memory copy.

    ``key`` may be a function of the validated header (for a KMS key, which depends on the
    key version recorded there); it is called after validation, before cryptsetup runs.
    """
    check_mapping_name(name)
    if keyslot not in profile.keyslots:
        raise UsageError(f"key slot {keyslot} is not part of this volume's profile")
    cs.require_device_mapper()
    if os.path.exists(mapper_path(name)):
        raise LuksError(f"a mapping named {name} already exists")
    snap, info = validated_snapshot(device, profile)
    with snap:
        cs.open_mapping(snap, device, name, resolve_key(key, info), keyslot)
    return info


def check_volume_key(
    device: str, key: KeyFor, profile: P.LuksProfile, *, keyslot: int = P.KMS_KEYSLOT
) -> H.HeaderInfo:
    """Validate the header and check that ``key`` unlocks ``keyslot`` (no device-mapper)."""
    if keyslot not in profile.keyslots:
        raise UsageError(f"key slot {keyslot} is not part of this volume's profile")
    snap, info = validated_snapshot(device, profile)
    with snap:
        cs.check_key(snap, device, resolve_key(key, info), keyslot)
    return info


def close_volume(name: str) -> None:
    check_mapping_name(name)
    cs.require_device_mapper()
    if cs.mapping_status(name) is None:
        raise LuksError(f"no active LUKS mapping named {name}")
    cs.close_mapping(name)


@dataclass(frozen=True)
class DeviceReport:
    """What ``sealfs luks status DEVICE`` shows; built from reads only."""

    device: str
    size: int
    state: str
    valid: bool
    reason: str | None
    header: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_device(device: str, profile: P.LuksProfile) -> DeviceReport:
    check_device_path(device)
    size = get_device_size(device)
    _check_size(device, size)
    area = read_exact(device, 0, P.DATA_OFFSET)
    state = classify(area, size, profile)
    if state is not DeviceState.LUKS:
        return DeviceReport(device, size, state.value, False, None, None)
    try:
        info = H.validate_header_area(area, size, profile)
    except H.HeaderRefused as e:
        return DeviceReport(device, size, state.value, False, e.reason, None)
    return DeviceReport(device, size, state.value, True, None, asdict(info))


def header_backup(device: str, out: str, profile: P.LuksProfile) -> H.HeaderInfo:
    """Save the validated header region (both copies and the key slots) to a new 0600 file."""
    snap, info = validated_snapshot(device, profile)
    with snap:
        region = snap.read()
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"{out} already exists; refusing to overwrite a backup") from None
    except OSError as e:
        raise StorageError(f"{out}: {e.strerror}") from None
    try:
        view, done = memoryview(region), 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    except OSError as e:
        raise StorageError(f"{out}: write failed: {e.strerror}") from None
    finally:
        os.close(fd)
    return info


def header_restore(
    device: str, backup: str, profile: P.LuksProfile, *, force: bool = False
) -> H.HeaderInfo:
    """Write a validated backup back onto ``device`` (magic-last, like a format).

    Refuses to replace a header that still validates, or one that belongs to another volume
    (different UUID), unless ``force``: restoring the wrong header makes the data unreadable.
    """
    check_device_path(device)
    try:
        with open(backup, "rb") as f:
            region = f.read(P.DATA_OFFSET + 1)
    except OSError as e:
        raise StorageError(f"{backup}: {e.strerror}") from None
    if len(region) != P.DATA_OFFSET:
        raise LuksError(f"{backup}: not a sealfs header backup (size {len(region)})")
    size = get_device_size(device)
    _check_size(device, size)
    info = H.validate_header_area(region, size, profile)
    current = read_exact(device, 0, P.DATA_OFFSET)
    state = classify(current, size, profile)
    if state is DeviceState.LUKS and not force:
        try:
            H.validate_header_area(current, size, profile)
        except H.HeaderRefused:
            pass
        else:
            raise LuksError(f"{device} has a valid header already; use --force to replace it")
        on_disk_uuid = (
            H.parse_binary_header(current, 0).uuid.rstrip(b"\0").decode("ascii", "replace")
        )
        if on_disk_uuid != info.uuid:
            raise LuksError(
                f"{device} header belongs to volume {on_disk_uuid}, the backup to {info.uuid}; "
                "use --force if that is really intended"
            )
    commit_header(device, region)
    return info


def _check_size(device: str, size: int) -> None:
    if size <= P.DATA_OFFSET:
        raise UsageError(f"{device}: {size} bytes is too small for a sealfs LUKS volume")
    if (size - P.DATA_OFFSET) % P.SECTOR_SIZE:
        raise UsageError(f"{device}: size {size} is not a multiple of {P.SECTOR_SIZE} bytes")
