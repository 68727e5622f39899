"""``sealfs luks``: LUKS2 block volumes (dm-crypt, optional dm-integrity) with validated headers.

Every command that reads a header validates it first against the volume's *configured* shape
(``--integrity``, ``--recovery-slot``), which therefore has to be given again on every open:
the header itself is untrusted and cannot be asked what it should look like.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from sealfs.errors import LuksError, UsageError
from sealfs.luks import profile as P

from .output import SealfsGroup, emit, json_option

if TYPE_CHECKING:
    from sealfs.luks.keys import KeyBinding, KeyFileSource

FC = Callable[..., Any]


def _profile_options(fn: FC) -> FC:
    fn = click.option(
        "--recovery-slot", is_flag=True,
        help="The volume has a recovery key slot (slot 1) besides the KMS slot.",
    )(fn)
    return click.option(
        "--integrity", type=click.Choice(sorted(P.INTEGRITY_MODES)), default=None,
        help="The volume uses dm-integrity with this MAC (authenticated sectors).",
    )(fn)


def _key_options(fn: FC) -> FC:
    fn = click.option("--volume-id", default="default", show_default=True,
                      help="Volume id the key is bound to (KMS purpose luks-passphrase).")(fn)
    fn = click.option("--app-id", default="local", show_default=True,
                      help="App id the key is bound to.")(fn)
    return click.option(
        "--key-file", required=True, type=str,
        help="File holding the passphrase (used verbatim; mode 0600). Stands in for the KMS.",
    )(fn)


def _recovery_cost_option(fn: FC) -> FC:
    return click.option(
        "--recovery-iter-time", type=click.IntRange(100, 60_000), default=2000,
        show_default=True, metavar="MS",
        help="argon2id cost of the recovery slot, as cryptsetup's benchmarked unlock time.",
    )(fn)


def _recovery_cost(iter_time_ms: int) -> Any:
    from sealfs.luks.cryptsetup import KdfCost

    return KdfCost(iter_time_ms=iter_time_ms)


def _profile(integrity: str | None, recovery_slot: bool) -> P.LuksProfile:
    return P.LuksProfile(integrity=integrity, recovery_slot=recovery_slot)


def _key(key_file: str, app_id: str, volume_id: str) -> tuple[KeyFileSource, KeyBinding]:
    """The key source (a key file until the KMS source is wired in) and what it is bound to."""
    from sealfs.luks.keys import KeyBinding, KeyFileSource

    return KeyFileSource(key_file), KeyBinding(app_id=app_id, volume_id=volume_id)


@click.group("luks", cls=SealfsGroup)
def luks() -> None:
    """LUKS2 block volumes: a whole encrypted block device for ext4 or a raw database.

    aes-xts-plain64 with 512-bit keys, 4096-byte sectors, optional dm-integrity
    (hmac-sha256), an optional recovery key slot. The passphrase reaches cryptsetup on
    stdin only. Headers are validated in memory and opened from that copy.
    """


@luks.command("format")
@click.argument("device", type=str)
@_key_options
@click.option("--recovery-key-file", type=str,
              help="Also add a recovery key slot unlocked by this passphrase file (mode 0600).")
@_recovery_cost_option
@click.option("--integrity", type=click.Choice(sorted(P.INTEGRITY_MODES)), default=None,
              help="Authenticate every sector with dm-integrity (wipes the device; slow).")
@json_option
def format_cmd(device: str, key_file: str, app_id: str, volume_id: str,
               recovery_key_file: str | None, recovery_iter_time: int, integrity: str | None,
               as_json: bool) -> None:
    """Format a blank DEVICE (block device or image file) as a sealfs LUKS2 volume.

    Refuses anything that is not blank. A format interrupted by a crash is finished.
    """
    from sealfs.luks.keys import read_key_file
    from sealfs.luks.volume import format_volume

    source, binding = _key(key_file, app_id, volume_id)
    recovery = read_key_file(recovery_key_file) if recovery_key_file else None
    profile = _profile(integrity, recovery is not None)
    info = format_volume(device, source.luks_passphrase(binding), profile, recovery=recovery,
                         recovery_cost=_recovery_cost(recovery_iter_time))
    emit({"ok": True, "device": device, "uuid": info.uuid, "profile": profile.describe()},
         as_json, f"formatted {device} (LUKS2 {info.uuid}; {profile.describe()})")


@luks.command("open")
@click.argument("device", type=str)
@click.argument("name")
@_key_options
@_profile_options
@click.option("--use-recovery", is_flag=True,
              help="The key file holds the recovery passphrase: unlock key slot 1.")
@json_option
def open_cmd(device: str, name: str, key_file: str, app_id: str, volume_id: str,
             integrity: str | None, recovery_slot: bool, use_recovery: bool,
             as_json: bool) -> None:
    """Validate DEVICE's header, then map it as /dev/mapper/NAME (from the validated copy)."""
    from sealfs.luks.volume import mapper_path, open_volume

    if use_recovery and not recovery_slot:
        raise UsageError("--use-recovery needs --recovery-slot")
    source, binding = _key(key_file, app_id, volume_id)
    keyslot = P.RECOVERY_KEYSLOT if use_recovery else P.KMS_KEYSLOT
    info = open_volume(device, name, source.luks_passphrase(binding),
                       _profile(integrity, recovery_slot), keyslot=keyslot)
    emit({"ok": True, "device": device, "mapper": mapper_path(name), "uuid": info.uuid},
         as_json, f"opened {device} as {mapper_path(name)}")


@luks.command("up")
@click.argument("device", type=str)
@click.argument("name")
@_key_options
@_profile_options
@click.option("--recovery-key-file", type=str,
              help="On first boot, add the recovery slot with this passphrase (implies "
                   "--recovery-slot).")
@_recovery_cost_option
@click.option("--fs", "fs_type", type=click.Choice(["ext4", "none"]), default="ext4",
              show_default=True, help="File system created on first use ('none': raw device).")
@click.option("--mountpoint", type=click.Path(file_okay=False),
              help="Where to mount the file system (required unless --fs none).")
@click.option("--mount-options", default="nodev,nosuid", show_default=True)
@json_option
def up_cmd(device: str, name: str, key_file: str, app_id: str, volume_id: str,
           integrity: str | None, recovery_slot: bool, recovery_key_file: str | None,
           recovery_iter_time: int, fs_type: str, mountpoint: str | None, mount_options: str, as_json: bool) -> None:
    """Boot-time bring-up: format if blank, open, create the file system once, mount.

    Safe to rerun after a crash at any point; never formats or runs mkfs on a volume that
    completed its first boot.
    """
    from sealfs.luks.firstboot import VolumeSpec, bring_up
    from sealfs.luks.keys import read_key_file

    recovery = read_key_file(recovery_key_file) if recovery_key_file else None
    source, binding = _key(key_file, app_id, volume_id)
    spec = VolumeSpec(device=device, name=name, binding=binding,
                      profile=_profile(integrity, recovery_slot or recovery is not None),
                      fs=fs_type, mountpoint=os.path.abspath(mountpoint) if mountpoint else None,
                      mount_options=mount_options)
    result = bring_up(spec, source, recovery=recovery,
                      recovery_cost=_recovery_cost(recovery_iter_time))
    where = f" on {result.mountpoint}" if result.mountpoint else ""
    emit({"ok": True, **result.as_dict()}, as_json,
         f"{device} is up as {result.mapper}{where} ({', '.join(result.steps)})")


@luks.command("close")
@click.argument("name")
@json_option
def close_cmd(name: str, as_json: bool) -> None:
    """Unmount whatever is mounted from /dev/mapper/NAME, then close the mapping."""
    from sealfs.luks.firstboot import bring_down

    unmounted = bring_down(name)
    emit({"ok": True, "name": name, "unmounted": unmounted}, as_json, f"closed {name}")


@luks.command("status")
@click.argument("target")
@_profile_options
@json_option
def status_cmd(target: str, integrity: str | None, recovery_slot: bool, as_json: bool) -> None:
    """Show a device's header verdict (TARGET is a path) or a mapping's state (a name).

    Exit status 0 only if the header validates (or the mapping is active).
    """
    if os.sep in target or os.path.exists(target):
        from sealfs.luks.volume import inspect_device

        report = inspect_device(target, _profile(integrity, recovery_slot))
        data = {"ok": report.valid, **report.as_dict()}
        if report.valid:
            human = f"{target}: valid sealfs LUKS2 header {report.header['uuid']}"  # type: ignore[index]
        elif report.reason:
            human = f"{target}: header refused: {report.reason}"
        else:
            human = f"{target}: {report.state}"
        emit(data, as_json, human)
        if not report.valid:
            click.get_current_context().exit(LuksError.exit_code)
        return
    from sealfs.luks.firstboot import mapping_state

    st = mapping_state(target)
    emit({"ok": st["active"], **st}, as_json,
         f"{target}: " + (f"active, {st.get('state')}" if st["active"] else "not active"))
    if not st["active"]:
        click.get_current_context().exit(LuksError.exit_code)


@luks.command("header-backup")
@click.argument("device", type=str)
@click.argument("backup", type=str)
@_profile_options
@json_option
def header_backup_cmd(device: str, backup: str, integrity: str | None, recovery_slot: bool,
                      as_json: bool) -> None:
    """Save DEVICE's validated header region (16 MiB: both copies and key slots) to BACKUP."""
    from sealfs.luks.volume import header_backup

    info = header_backup(device, backup, _profile(integrity, recovery_slot))
    emit({"ok": True, "device": device, "backup": backup, "uuid": info.uuid}, as_json,
         f"saved header {info.uuid} of {device} to {backup}")


@luks.command("header-restore")
@click.argument("device", type=str)
@click.argument("backup", type=str)
@_profile_options
@click.option("--force", is_flag=True,
              help="Replace a header that still validates or belongs to another volume.")
@json_option
def header_restore_cmd(device: str, backup: str, integrity: str | None, recovery_slot: bool,
                       force: bool, as_json: bool) -> None:
    """Validate BACKUP, then write it onto DEVICE (crash-safe, magic last)."""
    from sealfs.luks.volume import header_restore

    info = header_restore(device, backup, _profile(integrity, recovery_slot), force=force)
    emit({"ok": True, "device": device, "backup": backup, "uuid": info.uuid}, as_json,
         f"restored header {info.uuid} onto {device}")
