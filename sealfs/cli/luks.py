"""``sealfs luks``: LUKS2 block volumes (dm-crypt, optional dm-integrity) with validated headers.

Every command that reads a header validates it first against the volume's *configured* shape
(``--integrity``, ``--recovery-slot``), which therefore has to be given again on every open:
the header itself is untrusted and cannot be asked what it should look like.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from sealfs.errors import LuksError, UsageError
from sealfs.luks import profile as P

from .credentials import KmsOptions, kms_client, kms_options
from .exit_codes import fail_with
from .logs import log_warnings
from .output import SealfsGroup, emit, json_option
from .progress import Progress, progress_option

if TYPE_CHECKING:
    from sealfs.crypto import Secret
    from sealfs.luks.header import HeaderInfo
    from sealfs.luks.keys import KeyBinding, KeySource

FC = Callable[..., Any]
MIB = 1024 * 1024


def _profile_options(fn: FC) -> FC:
    fn = click.option(
        "--recovery-slot",
        is_flag=True,
        help="The volume has a recovery key slot (slot 1) besides the KMS slot.",
    )(fn)
    return click.option(
        "--integrity",
        type=click.Choice(sorted(P.INTEGRITY_MODES)),
        default=None,
        help="The volume uses dm-integrity with this MAC (authenticated sectors).",
    )(fn)


def _key_options(fn: FC) -> FC:
    """--key-file, or --kms with the shared KMS options; --volume-id. The command receives
    ``keys`` (a key source) and ``binding`` (what the key is bound to) instead."""

    @kms_options
    @click.option(
        "--key-file",
        type=str,
        help="File holding the passphrase (used verbatim; mode 0600). Alternative to --kms.",
    )
    @click.option(
        "--volume-id",
        metavar="ID",
        help="Volume id the key is bound to (KMS purpose luks-passphrase). Required with "
        "--kms; trusted configuration, never read from the disk. Default with "
        "--key-file: 'default'.",
    )
    @functools.wraps(fn)
    def wrapper(
        *args: Any, key_file: str | None, volume_id: str | None, kms: KmsOptions, **kwargs: Any
    ) -> Any:
        kwargs["keys"], kwargs["binding"] = _key_source(key_file, volume_id, kms)
        return fn(*args, **kwargs)

    # The shared help texts describe sealfs volumes (kms slot, freshness anchor); say what
    # the options mean for a LUKS volume instead.
    helps = {
        "kms_urls": "Get the passphrase from the KMS at URL (http://host:port): this CVM proves "
        "itself with a quote and receives the key for --app-id and --volume-id. "
        "Alternative to --key-file. Repeat it for each replica (tried in order).",
        "app_id": "App id the key is bound to: hex, required with --kms (the app id this CVM "
        "attests as). Default with --key-file: 'local'.",
    }
    for param in getattr(wrapper, "__click_params__", []):
        if param.name in helps:
            param.help = helps[param.name]
    return wrapper


def _key_source(
    key_file: str | None, volume_id: str | None, kms: KmsOptions
) -> tuple[KeySource, KeyBinding]:
    """The key source and what the key is bound to; nothing is fetched or read yet."""
    from sealfs.luks.keys import KeyBinding, KeyFileSource, KmsKeySource

    if bool(kms.url) == bool(key_file):
        raise UsageError("give exactly one of --kms URL or --key-file PATH")
    if not kms.url:
        assert key_file is not None
        return KeyFileSource(key_file), KeyBinding(
            app_id=kms.app_id or "local", volume_id=volume_id or "default"
        )
    if not kms.app_id:
        raise UsageError("--kms needs --app-id (the app id this CVM attests as)")
    if not volume_id:
        raise UsageError(
            "--kms needs --volume-id: every volume gets its own key, and the id "
            "is configuration, never read from the disk"
        )
    log_warnings()
    source = KmsKeySource(kms_client(kms))
    return source, source.binding(volume_id)


def _slot_key(
    keys: KeySource, binding: KeyBinding, use_recovery: bool
) -> Callable[[HeaderInfo], Secret]:
    """The passphrase for the slot being opened, chosen from the validated header."""
    from sealfs.luks.keys import KeyFileSource

    if use_recovery and not isinstance(keys, KeyFileSource):
        raise UsageError(
            "--use-recovery takes the recovery passphrase from --key-file, not from the KMS"
        )
    return lambda info: keys.existing_key(binding, info.kms_key_version)


def _recovery_cost_option(fn: FC) -> FC:
    return click.option(
        "--recovery-iter-time",
        type=click.IntRange(100, 60_000),
        default=2000,
        show_default=True,
        metavar="MS",
        help="argon2id cost of the recovery slot, as cryptsetup's benchmarked unlock time.",
    )(fn)


def _recovery_cost(iter_time_ms: int) -> Any:
    from sealfs.luks.cryptsetup import KdfCost

    return KdfCost(iter_time_ms=iter_time_ms)


def _profile(integrity: str | None, recovery_slot: bool) -> P.LuksProfile:
    return P.LuksProfile(integrity=integrity, recovery_slot=recovery_slot)


@click.group("luks", cls=SealfsGroup)
def luks() -> None:
    """LUKS2 block volumes: a whole encrypted block device for ext4 or a raw database.

    aes-xts-plain64 with 512-bit keys, 4096-byte sectors, optional dm-integrity
    (hmac-sha256), an optional recovery key slot. The passphrase comes from the KMS (--kms,
    bound to --app-id and --volume-id) or a key file, and reaches cryptsetup on stdin only.
    Headers are validated in memory and opened from that copy.
    """


@luks.command("format")
@click.argument("device", type=str)
@_key_options
@click.option(
    "--recovery-key-file",
    type=str,
    help="Also add a recovery key slot unlocked by this passphrase file (mode 0600).",
)
@_recovery_cost_option
@click.option(
    "--integrity",
    type=click.Choice(sorted(P.INTEGRITY_MODES)),
    default=None,
    help="Authenticate every sector with dm-integrity (wipes the device; slow).",
)
@json_option
def format_cmd(
    device: str,
    keys: KeySource,
    binding: KeyBinding,
    recovery_key_file: str | None,
    recovery_iter_time: int,
    integrity: str | None,
    as_json: bool,
) -> None:
    """Format a blank DEVICE (block device or image file) as a sealfs LUKS2 volume.

    Refuses anything that is not blank. A format interrupted by a crash is finished. With
    --kms, key slot 0 gets the KMS key of the app's current key version, and the header
    records that version.
    """
    from sealfs.luks.keys import read_key_file
    from sealfs.luks.volume import format_volume

    recovery = read_key_file(recovery_key_file) if recovery_key_file else None
    profile = _profile(integrity, recovery is not None)
    new = keys.new_key(binding)
    info = format_volume(
        device,
        new.passphrase,
        profile,
        recovery=recovery,
        recovery_cost=_recovery_cost(recovery_iter_time),
        key_version=new.key_version,
    )
    emit(
        {
            "ok": True,
            "device": device,
            "uuid": info.uuid,
            "profile": profile.describe(),
            "app_id": binding.app_id,
            "volume_id": binding.volume_id,
            "kms_key_version": info.kms_key_version,
        },
        as_json,
        f"formatted {device} (LUKS2 {info.uuid}; {profile.describe()})",
    )


def _keyslot(use_recovery: bool, recovery_slot: bool) -> int:
    """The key slot --use-recovery selects (the recovery slot exists only with
    --recovery-slot)."""
    if use_recovery and not recovery_slot:
        raise UsageError("--use-recovery needs --recovery-slot")
    return P.RECOVERY_KEYSLOT if use_recovery else P.KMS_KEYSLOT


@luks.command("open")
@click.argument("device", type=str)
@click.argument("name")
@_key_options
@_profile_options
@click.option(
    "--use-recovery",
    is_flag=True,
    help="The key file holds the recovery passphrase: unlock key slot 1.",
)
@json_option
def open_cmd(
    device: str,
    name: str,
    keys: KeySource,
    binding: KeyBinding,
    integrity: str | None,
    recovery_slot: bool,
    use_recovery: bool,
    as_json: bool,
) -> None:
    """Validate DEVICE's header, then map it as /dev/mapper/NAME (from the validated copy)."""
    from sealfs.luks.volume import mapper_path, open_volume

    keyslot = _keyslot(use_recovery, recovery_slot)
    info = open_volume(
        device,
        name,
        _slot_key(keys, binding, use_recovery),
        _profile(integrity, recovery_slot),
        keyslot=keyslot,
    )
    emit(
        {"ok": True, "device": device, "mapper": mapper_path(name), "uuid": info.uuid},
        as_json,
        f"opened {device} as {mapper_path(name)}",
    )


@luks.command("check-key")
@click.argument("device", type=str)
@_key_options
@_profile_options
@click.option(
    "--use-recovery",
    is_flag=True,
    help="The key file holds the recovery passphrase: check key slot 1.",
)
@json_option
def check_key_cmd(
    device: str,
    keys: KeySource,
    binding: KeyBinding,
    integrity: str | None,
    recovery_slot: bool,
    use_recovery: bool,
    as_json: bool,
) -> None:
    """Validate DEVICE's header and check that the key opens it, without mapping anything.

    Works without device-mapper (cryptsetup --test-passphrase): e.g. to check, before a
    boot or after a KMS policy change, that the KMS still releases this volume's key.
    Exit 0 if the key opens the slot, 3 if it does not.
    """
    from sealfs.luks.volume import check_volume_key

    keyslot = _keyslot(use_recovery, recovery_slot)
    info = check_volume_key(
        device,
        _slot_key(keys, binding, use_recovery),
        _profile(integrity, recovery_slot),
        keyslot=keyslot,
    )
    emit(
        {
            "ok": True,
            "device": device,
            "uuid": info.uuid,
            "keyslot": keyslot,
            "kms_key_version": info.kms_key_version,
        },
        as_json,
        f"{device}: the key opens key slot {keyslot} of {info.uuid}",
    )


@luks.command("up")
@click.argument("device", type=str)
@click.argument("name")
@_key_options
@_profile_options
@click.option(
    "--recovery-key-file",
    type=str,
    help="On first boot, add the recovery slot with this passphrase (implies --recovery-slot).",
)
@_recovery_cost_option
@click.option(
    "--fs",
    "fs_type",
    type=click.Choice(["ext4", "none"]),
    default="ext4",
    show_default=True,
    help="File system created on first use ('none': raw device).",
)
@click.option(
    "--mountpoint",
    type=click.Path(file_okay=False),
    help="Where to mount the file system (required unless --fs none).",
)
@click.option("--mount-options", default="nodev,nosuid", show_default=True)
@json_option
def up_cmd(
    device: str,
    name: str,
    keys: KeySource,
    binding: KeyBinding,
    integrity: str | None,
    recovery_slot: bool,
    recovery_key_file: str | None,
    recovery_iter_time: int,
    fs_type: str,
    mountpoint: str | None,
    mount_options: str,
    as_json: bool,
) -> None:
    """Boot-time bring-up: format if blank, open, create the file system once, mount.

    Safe to rerun after a crash at any point; never formats or runs mkfs on a volume that
    completed its first boot.
    """
    from sealfs.luks.firstboot import VolumeSpec, bring_up
    from sealfs.luks.keys import read_key_file

    recovery = read_key_file(recovery_key_file) if recovery_key_file else None
    spec = VolumeSpec(
        device=device,
        name=name,
        binding=binding,
        profile=_profile(integrity, recovery_slot or recovery is not None),
        fs=fs_type,
        mountpoint=os.path.abspath(mountpoint) if mountpoint else None,
        mount_options=mount_options,
    )
    result = bring_up(
        spec, keys, recovery=recovery, recovery_cost=_recovery_cost(recovery_iter_time)
    )
    where = f" on {result.mountpoint}" if result.mountpoint else ""
    emit(
        {"ok": True, **result.as_dict()},
        as_json,
        f"{device} is up as {result.mapper}{where} ({', '.join(result.steps)})",
    )


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
            fail_with(LuksError)
        return
    from sealfs.luks.firstboot import mapping_state

    st = mapping_state(target)
    emit(
        {"ok": st["active"], **st},
        as_json,
        f"{target}: " + (f"active, {st.get('state')}" if st["active"] else "not active"),
    )
    if not st["active"]:
        fail_with(LuksError)


@luks.command("header-backup")
@click.argument("device", type=str)
@click.argument("backup", type=str)
@_profile_options
@json_option
def header_backup_cmd(
    device: str, backup: str, integrity: str | None, recovery_slot: bool, as_json: bool
) -> None:
    """Save DEVICE's validated header region (16 MiB: both copies and key slots) to BACKUP."""
    from sealfs.luks.volume import header_backup

    info = header_backup(device, backup, _profile(integrity, recovery_slot))
    emit(
        {"ok": True, "device": device, "backup": backup, "uuid": info.uuid},
        as_json,
        f"saved header {info.uuid} of {device} to {backup}",
    )


@luks.command("header-restore")
@click.argument("device", type=str)
@click.argument("backup", type=str)
@_profile_options
@click.option(
    "--force",
    is_flag=True,
    help="Replace a header that still validates or belongs to another volume.",
)
@json_option
def header_restore_cmd(
    device: str, backup: str, integrity: str | None, recovery_slot: bool, force: bool, as_json: bool
) -> None:
    """Validate BACKUP, then write it onto DEVICE (crash-safe, magic last)."""
    from sealfs.luks.volume import header_restore

    info = header_restore(device, backup, _profile(integrity, recovery_slot), force=force)
    emit(
        {"ok": True, "device": device, "backup": backup, "uuid": info.uuid},
        as_json,
        f"restored header {info.uuid} onto {device}",
    )


@luks.command("export")
@click.argument("device", type=str)
@click.argument("dest", type=str)
@_profile_options
@click.option(
    "--chunk-mib",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="Size of the data chunks in MiB (each is hashed, stored and resumed as a unit).",
)
@progress_option
@json_option
def export_cmd(
    device: str,
    dest: str,
    integrity: str | None,
    recovery_slot: bool,
    chunk_mib: int,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Copy DEVICE (not in use) into a new bundle directory DEST, to move it to another host.

    DEST '-' writes the bundle as one tar stream to standard output instead (the summary then
    goes to standard error), e.g. piped into ssh and 'sealfs luks import - DEVICE'.

    The header is validated against the profile first. DEST gets header.bin, the data in
    chunks (all-zero chunks take no space) and manifest.json with a SHA-256 per piece,
    written last. The printed manifest SHA-256 is what to check on the other side
    (import --manifest-sha256). The bundle holds only ciphertext and the key slots.
    """
    import sys

    from sealfs.luks.bundle import export_volume
    from sealfs.luks.stream import STDIO, export_stream

    profile = _profile(integrity, recovery_slot)
    meter = Progress.on_stderr(progress, as_json, unit="chunks")
    if dest == STDIO:
        if sys.stdout.isatty():
            raise UsageError("refusing to write a bundle stream to a terminal; redirect it")
        result = export_stream(
            device, sys.stdout.buffer, profile, chunk_size=chunk_mib * MIB, meter=meter
        )
    else:
        result = export_volume(device, dest, profile, chunk_size=chunk_mib * MIB, meter=meter)
    meter.end()
    summary = (
        f"exported {device} ({result.uuid}, {result.chunks} chunks, {result.written} with data) "
        f"to {dest}; manifest SHA-256 {result.manifest_sha256}"
    )
    if dest == STDIO:  # standard output carries the stream: the summary goes to stderr
        data = {"ok": True, **result.as_dict()}
        click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else summary, err=True)
    else:
        emit({"ok": True, **result.as_dict()}, as_json, summary)


@luks.command("import")
@click.argument("source", type=str)
@click.argument("device", type=str)
@_profile_options
@click.option(
    "--manifest-sha256",
    metavar="HEX",
    help="Refuse the bundle unless its manifest has this SHA-256 (as export printed it).",
)
@progress_option
@json_option
def import_cmd(
    source: str,
    device: str,
    integrity: str | None,
    recovery_slot: bool,
    manifest_sha256: str | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Write the bundle SOURCE onto DEVICE (blank, same size) or a new image file DEVICE.

    Everything is checked before the first write: the manifest, the header (validated against
    the profile, like an open) and every chunk's SHA-256. Chunks are written next and the
    header last, so an interrupted import leaves nothing that opens; rerun the same command
    to resume (chunks already in place are skipped). SOURCE '-' reads a bundle stream
    (export DEVICE -) from standard input: the manifest and header are checked before the
    first write, each chunk as it arrives. Exit 5 if the bundle does not match its
    manifest, 10 if the header or the target is refused.
    """
    import sys

    from sealfs.luks.bundle import import_volume
    from sealfs.luks.stream import STDIO, import_stream

    profile = _profile(integrity, recovery_slot)
    meter = Progress.on_stderr(progress, as_json, unit="chunks")
    if source == STDIO:
        result = import_stream(
            sys.stdin.buffer, device, profile, manifest_sha256=manifest_sha256, meter=meter
        )
    else:
        result = import_volume(
            source, device, profile, manifest_sha256=manifest_sha256, meter=meter
        )
    meter.end()
    emit(
        {"ok": True, **result.as_dict()},
        as_json,
        f"imported {result.uuid} onto {device}: {result.written} chunks written, "
        f"{result.skipped} already in place; manifest SHA-256 {result.manifest_sha256}",
    )


@luks.command("rekey")
@click.argument("device", type=str)
@_key_options
@_profile_options
@click.option(
    "--recovery-key-file",
    type=str,
    help="Recovery passphrase for the new recovery slot (required with --recovery-slot; the "
    "same passphrase or a new one; mode 0600).",
)
@_recovery_cost_option
@click.option(
    "--hotzone-mib",
    type=click.IntRange(1, 1024),
    default=None,
    metavar="MIB",
    help="Size of the piece cryptsetup re-encrypts per step, its 'hotzone' (default: its own).",
)
@progress_option
@json_option
def rekey_cmd(
    device: str,
    keys: KeySource,
    binding: KeyBinding,
    integrity: str | None,
    recovery_slot: bool,
    recovery_key_file: str | None,
    recovery_iter_time: int,
    hotzone_mib: int | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Re-encrypt DEVICE under a new random volume key: this is what REVOKES old keys.

    'sealfs luks key add/remove' only re-wrap the volume key: a copy of the header taken
    before, plus a passphrase it held, still opens the data. After a rekey, nothing from
    before opens what is on the disk: every sector is re-encrypted (cryptsetup reencrypt,
    LUKS2) and every slot of the old key is wiped. Slot 0 gets the KMS key of the app's
    current key version (run 'sealfs kms policy rotate' first if that key leaked); slot 1,
    with --recovery-slot, the passphrase from --recovery-key-file.

    Online when DEVICE is open (the mapping and its file system keep working), offline
    otherwise. Interrupted (crash, SIGKILL, power loss): run the same command again, it
    continues where it stopped (cryptsetup's own resume). A rerun after it finished re-keys
    again. Not possible with --integrity (cryptsetup cannot re-encrypt dm-integrity).
    Progress on standard error on a terminal (--progress to force it).
    """
    from sealfs.luks.cryptsetup import ReencryptProgress
    from sealfs.luks.keys import read_key_file
    from sealfs.luks.rekey import rekey_volume

    recovery = read_key_file(recovery_key_file) if recovery_key_file else None
    meter, started = Progress.on_stderr(progress, as_json, unit="steps"), [False]

    def report(p: ReencryptProgress) -> None:
        if not started[0]:
            meter.start("re-encrypting", p.total_bytes, 0)
            started[0] = True
        meter.advance(p.done_bytes - meter.done_bytes, 0)

    result = rekey_volume(
        device,
        keys,
        binding,
        _profile(integrity, recovery_slot),
        recovery=recovery,
        recovery_cost=_recovery_cost(recovery_iter_time),
        hotzone_bytes=hotzone_mib * MIB if hotzone_mib else None,
        on_progress=report,
    )
    if started[0]:
        meter.finish()
    how = "continued an interrupted rekey: " if result.resumed else ""
    emit(
        {"ok": True, **result.as_dict()},
        as_json,
        f"re-keyed {device} ({result.uuid}): {how}{', '.join(result.steps)}; the old volume "
        "key no longer opens it",
    )


@luks.group("key", cls=SealfsGroup)
def key_group() -> None:
    """The recovery key slot: list, add, remove. These RE-WRAP, they do not revoke.

    Adding or removing a slot changes which passphrases unwrap the volume key, not the key:
    a header copy taken before (e.g. 'sealfs luks header-backup', or by the host) still opens
    the data with any passphrase it held. To revoke, run 'sealfs luks rekey'.
    """


@key_group.command("list")
@click.argument("device", type=str)
@_profile_options
@json_option
def key_list_cmd(device: str, integrity: str | None, recovery_slot: bool, as_json: bool) -> None:
    """List DEVICE's key slots (validated header; no key needed)."""
    from sealfs.luks.slots import list_slots

    info, slots = list_slots(device, _profile(integrity, recovery_slot))
    lines = [f"{device} ({info.uuid}):"]
    for s in slots:
        version = f", KMS key version {s.kms_key_version}" if s.kms_key_version else ""
        lines.append(
            f"  slot {s.slot}: {s.role} ({s.kdf}, time {s.kdf_time}, "
            f"memory {s.kdf_memory_kib} KiB{version})"
        )
    emit(
        {"ok": True, "device": device, "uuid": info.uuid, "slots": [s.as_dict() for s in slots]},
        as_json,
        "\n".join(lines),
    )


@key_group.command("add")
@click.argument("device", type=str)
@_key_options
@_profile_options
@click.option("--new-key-file", type=str, help="New slot's key: this file's bytes, verbatim.")
@click.option(
    "--new-passphrase-file",
    type=str,
    help="New slot's passphrase as a person types it at a prompt: this file without one final newline.",
)
@_recovery_cost_option
@json_option
def key_add_cmd(
    device: str,
    keys: KeySource,
    binding: KeyBinding,
    integrity: str | None,
    recovery_slot: bool,
    new_key_file: str | None,
    new_passphrase_file: str | None,
    recovery_iter_time: int,
    as_json: bool,
) -> None:
    """Add the recovery slot (slot 1) to DEVICE, unlocking with slot 0's key.

    Re-wraps only: see 'sealfs luks key --help'. Afterwards every command needs
    --recovery-slot for this volume.
    """
    from sealfs.luks.slots import add_recovery, read_new_secret

    if bool(new_key_file) == bool(new_passphrase_file):
        raise UsageError("give exactly one of --new-key-file or --new-passphrase-file")
    path = new_key_file or new_passphrase_file
    assert path is not None
    new = read_new_secret(path, passphrase=new_passphrase_file is not None)
    info = add_recovery(
        device,
        _slot_key(keys, binding, False),
        _profile(integrity, recovery_slot),
        new,
        _recovery_cost(recovery_iter_time),
    )
    emit(
        {"ok": True, "device": device, "uuid": info.uuid, "slot": P.RECOVERY_KEYSLOT},
        as_json,
        f"added recovery slot {P.RECOVERY_KEYSLOT} to {device}; from now on use --recovery-slot",
    )


@key_group.command("remove")
@click.argument("device", type=str)
@_key_options
@_profile_options
@click.option("--slot", type=int, required=True, help="The slot to wipe (1: the recovery slot).")
@json_option
def key_remove_cmd(
    device: str,
    keys: KeySource,
    binding: KeyBinding,
    integrity: str | None,
    recovery_slot: bool,
    slot: int,
    as_json: bool,
) -> None:
    """Wipe key slot SLOT of DEVICE; refuses the last slot that opens it (slot 0).

    Slot 0's key must open the volume first. Re-wraps only: a header copy taken before
    still holds the removed slot (see 'sealfs luks key --help'); 'sealfs luks rekey' revokes.
    """
    from sealfs.luks.slots import remove_slot

    info = remove_slot(
        device, _slot_key(keys, binding, False), _profile(integrity, recovery_slot), slot
    )
    emit(
        {"ok": True, "device": device, "uuid": info.uuid, "removed": slot},
        as_json,
        f"wiped key slot {slot} of {device}; from now on omit --recovery-slot",
    )
