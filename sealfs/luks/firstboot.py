"""Bring a block volume up at boot: format if blank, open, create the file system once, mount.

The state machine, each step safe to crash in and to rerun:

====================  ================================  ===================================
what the boot finds   meaning                           action
====================  ================================  ===================================
blank device          never formatted                   format (header committed last)
pending header        format crashed before the magics  finish the commit
LUKS header           formatted                         validate (refuse on any deviation)
foreign data          not ours, or damaged              refuse; never format over it
no state record       first boot never completed        mkfs (again), mount, write record
state record "ready"  initialized                       mount; never mkfs, whatever happens
====================  ================================  ===================================

Only the format of a *blank* device and the mkfs of a volume *without a ready record* can
destroy anything, and neither can hold application data: the application only ever sees the
volume after the ready record is on disk. See docs/luks.md for the crash-point table.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from sealfs import failpoints
from sealfs.crypto import Secret
from sealfs.errors import BusyError, LuksError, SealfsError, StorageError, UsageError

from . import cryptsetup as cs
from . import fs as F
from . import profile as P
from . import state
from .device import DeviceState, probe
from .keys import KeyBinding, KeySource
from .volume import check_mapping_name, format_volume, mapper_path, open_volume

#: The step boundaries of LUKS format and first boot a test can crash at
#: (``SEALFS_FAILPOINT=luks:<point>``, :mod:`sealfs.failpoints`).
CRASH_POINTS = (
    "header-body-written",
    "header-secondary-magic-written",
    "header-committed",
    "opened",
    "mkfs-done",
    "mounted",
    "ready-written",
)


@dataclass(frozen=True)
class VolumeSpec:
    """One block volume as the (trusted, measured) CVM configuration describes it."""

    device: str
    name: str
    binding: KeyBinding
    profile: P.LuksProfile = field(default_factory=P.LuksProfile)
    fs: str = "ext4"
    mountpoint: str | None = None
    mount_options: str = F.DEFAULT_MOUNT_OPTIONS

    def __post_init__(self) -> None:
        check_mapping_name(self.name)
        F.check_fs(self.fs)
        if self.fs != "none" and not self.mountpoint:
            raise UsageError("a volume with a file system needs a mount point (--mountpoint)")


@dataclass
class UpResult:
    """What happened, for the CLI and for the CVM's measurement of what was mounted."""

    device: str
    name: str
    mapper: str
    mountpoint: str | None
    steps: list[str] = field(default_factory=list)
    uuid: str = ""
    initialized_at: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bring_up(
    spec: VolumeSpec,
    keys: KeySource,
    *,
    recovery: Secret | None = None,
    recovery_cost: cs.KdfCost = cs.RECOVERY_SLOT_COST,
) -> UpResult:
    """Run the state machine for ``spec``; on failure nothing is left open or mounted."""
    result = UpResult(spec.device, spec.name, mapper_path(spec.name), spec.mountpoint)
    cs.require_device_mapper()
    if os.path.exists(result.mapper):
        raise BusyError(f"{result.mapper} already exists; close it first")
    found = probe(spec.device, spec.profile)
    if found is DeviceState.FOREIGN:
        raise LuksError(
            f"{spec.device} holds data that is neither blank nor a sealfs LUKS header; "
            "refusing to format over it"
        )
    if found in (DeviceState.BLANK, DeviceState.PENDING):
        new = keys.new_key(spec.binding)
        format_volume(
            spec.device,
            new.passphrase,
            spec.profile,
            recovery=recovery,
            recovery_cost=recovery_cost,
            key_version=new.key_version,
        )
        result.steps.append("formatted" if found is DeviceState.BLANK else "format-completed")
    # The key is chosen from the *validated* header (a KMS key by the version it records).
    info = open_volume(
        spec.device,
        spec.name,
        lambda hdr: keys.existing_key(spec.binding, hdr.kms_key_version),
        spec.profile,
    )
    result.uuid = info.uuid
    result.steps.append("opened")
    failpoints.reached("luks:opened")
    mounted = False
    try:
        record = state.read_record(result.mapper)
        if record is None:
            mounted = _first_use(spec, result)
        else:
            _check_record(spec, record)
            result.initialized_at = record.initialized_at
            if spec.fs != "none":
                _mount_initialized(spec, result)
                mounted = True
    except BaseException:
        _teardown(result.mapper, spec.mountpoint if mounted else None)
        raise
    return result


def _first_use(spec: VolumeSpec, result: UpResult) -> bool:
    """No ready record: (re)create the file system, mount it, then record readiness."""
    mounted = False
    if spec.fs != "none":
        F.mkfs(result.mapper, spec.fs, state.data_size(result.mapper), spec.binding)
        result.steps.append("mkfs")
        failpoints.reached("luks:mkfs-done")
        assert spec.mountpoint is not None
        F.mount(result.mapper, spec.mountpoint, spec.fs, spec.mount_options)
        mounted = True
        result.steps.append("mounted")
        failpoints.reached("luks:mounted")
    record = state.StateRecord.ready(spec.binding.app_id, spec.binding.volume_id, spec.fs)
    state.write_record(result.mapper, record)
    result.initialized_at = record.initialized_at
    result.steps.append("ready")
    failpoints.reached("luks:ready-written")
    return mounted


def _check_record(spec: VolumeSpec, record: state.StateRecord) -> None:
    if record.state != "ready" or record.version != state.FORMAT_VERSION:
        raise LuksError(f"{spec.device}: unknown state record ({record.state!r})")
    if (record.app_id, record.volume_id) != (spec.binding.app_id, spec.binding.volume_id):
        raise LuksError(
            f"{spec.device} was initialized for app {record.app_id!r} volume "
            f"{record.volume_id!r}, not {spec.binding.app_id!r} {spec.binding.volume_id!r}"
        )
    if record.fs != spec.fs:
        raise LuksError(f"{spec.device} holds {record.fs!r}, configured as {spec.fs!r}")


def _mount_initialized(spec: VolumeSpec, result: UpResult) -> None:
    assert spec.mountpoint is not None
    try:
        F.mount(result.mapper, spec.mountpoint, spec.fs, spec.mount_options)
    except BusyError:
        raise
    except SealfsError as e:
        raise StorageError(
            f"{spec.device} is initialized but its file system does not mount ({e.message}); "
            f"sealfs never reformats an initialized volume: run fsck.{spec.fs} on {result.mapper}"
        ) from None
    result.steps.append("mounted")


def _teardown(mapper: str, mountpoint: str | None) -> None:
    """Best-effort cleanup after a failed bring-up, so a retry starts from scratch."""
    if mountpoint is not None:
        try:
            F.umount(mountpoint)
        except SealfsError:
            return  # still mounted: closing the mapping would fail anyway
    with contextlib.suppress(SealfsError):
        cs.close_mapping(os.path.basename(mapper))


def bring_down(name: str, *, mountpoint: str | None = None) -> list[str]:
    """Unmount everything mounted from the mapping (or just ``mountpoint``) and close it."""
    mapper = mapper_path(name)
    cs.require_device_mapper()
    if cs.mapping_status(name) is None:
        raise LuksError(f"no active LUKS mapping named {name}")
    targets = [mountpoint] if mountpoint else F.mountpoints_of(mapper)
    for target in targets:
        F.umount(target)
    cs.close_mapping(name)
    return targets


def mapping_state(name: str) -> dict[str, Any]:
    """Status of an active mapping: the kernel table plus the first-boot record."""
    status = cs.mapping_status(check_mapping_name(name))
    if status is None:
        return {"name": name, "active": False}
    mapper = mapper_path(name)
    out: dict[str, Any] = {"name": name, "active": True, "kernel": status}
    try:
        record = state.read_record(mapper)
        out["state"] = "ready" if record else "uninitialized"
        out["record"] = asdict(record) if record else None
    except SealfsError as e:
        out["state"] = "unreadable"
        out["error"] = e.message
    out["mountpoints"] = F.mountpoints_of(mapper)
    return out
