"""``sealfs key``: list, add, remove and rotate a volume's key slots (re-wrap, no data touched)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sealfs.cli.credentials import (
    KmsOptions,
    credential_options,
    kms_client,
    read_passphrase_file,
)
from sealfs.cli.output import emit, json_option
from sealfs.cli.volume import kdf_options
from sealfs.crypto import KdfParams, Secret
from sealfs.errors import UsageError
from sealfs.volume.header import (
    Credential,
    Header,
    KmsCredential,
    PassphraseCredential,
    Slot,
    load_header,
    read_key_file,
)
from sealfs.volume.header import (
    new_key_file as generate_key_file,
)
from sealfs.volume.slots import change_slots

NOT_REVOKED = (
    "Re-wrapping does not revoke: the master key stays the same, so an old copy of the "
    "header plus a credential it held still opens all the data written before and after. "
    "When a credential leaked, only a re-key revokes it: `sealfs rekey` seals every object "
    "again under a new master key (offline)."
)


@click.group("key", epilog=NOT_REVOKED)
def key() -> None:
    """Manage a volume's key slots: each wraps the master key under one credential.

    Every command but `list` unlocks with the same options as `sealfs mount` (--key-file,
    --passphrase-file, --passphrase, --kms ...); the slot being added is named by --new-*
    options. The header is replaced atomically, so this works on a mounted volume too.
    """


def _slot_line(info: dict[str, Any]) -> str:
    line = f"slot {info['id']}: {info['type']}"
    if "kms" in info:
        k = info["kms"]
        line += f" (KMS {k['url']}, app {k['app_id']}, key version {k['key_version']})"
    elif "kdf" in info:
        line += f" ({info['kdf']['name']})"
    return line


@key.command("list")
@click.argument("backing_dir", type=click.Path(file_okay=False))
@json_option
def key_list(backing_dir: str, as_json: bool) -> None:
    """List the key slots of the volume in BACKING_DIR: id, type, KMS url, app id and key
    version. Reads only the header; no credential is needed (and none is checked)."""
    slots = load_header(Path(backing_dir)).public_info()["slots"]
    emit({"ok": True, "slots": slots}, as_json, "\n".join(_slot_line(s) for s in slots))


@key.command("add", epilog=NOT_REVOKED)
@click.argument("backing_dir", type=click.Path(file_okay=False))
@credential_options
@click.option(
    "--new-key-file",
    type=click.Path(dir_okay=False),
    help="Add a key-file slot for this file: used if it exists (mode 0600, at least 32 "
    "random bytes), else generated there with 64 fresh random bytes.",
)
@click.option(
    "--new-passphrase-file",
    type=click.Path(dir_okay=False),
    help="Add a recovery-passphrase slot for the passphrase in this file (mode 0600).",
)
@click.option("--new-kms", metavar="URL", help="Add a kms slot: the KMS at URL.")
@click.option("--new-app-id", metavar="HEX", help="With --new-kms: the app id to wrap for.")
@click.option(
    "--new-kms-public-key",
    metavar="HEX",
    multiple=True,
    help="With --new-kms: a trusted Ed25519 public key of that KMS (repeat per replica).",
)
@click.option(
    "--new-attester",
    type=click.Choice(["tdx", "simulated"]),
    default="tdx",
    show_default=True,
    help="With --new-kms: the quote source (as --attester).",
)
@click.option("--new-compose-hash", metavar="HEX", help="With --new-attester simulated.")
@click.option("--new-device-id", metavar="HEX", help="With --new-attester simulated.")
@kdf_options
@json_option
def key_add(
    backing_dir: str,
    cred: Credential,
    new_key_file: str | None,
    new_passphrase_file: str | None,
    new_kms: str | None,
    new_app_id: str | None,
    new_kms_public_key: tuple[str, ...],
    new_attester: str,
    new_compose_hash: str | None,
    new_device_id: str | None,
    kdf_params: KdfParams,
    as_json: bool,
) -> None:
    """Add a key slot to the volume in BACKING_DIR, unlocked with an existing credential.

    \b
    Examples:
      sealfs key add /data/vol --key-file /root/vol.key --new-key-file /root/ops2.key
      sealfs key add /data/vol --key-file /root/vol.key --new-passphrase-file /root/pw
      sealfs key add /data/vol --passphrase --new-kms http://kms:8750 --new-app-id 0a1b...
    """
    if sum(1 for x in (new_key_file, new_passphrase_file, new_kms) if x) != 1:
        raise UsageError("give exactly one of --new-key-file, --new-passphrase-file, --new-kms")
    new: Credential
    if new_kms:
        opts = KmsOptions(
            (new_kms,),
            new_app_id,
            new_attester,
            new_compose_hash,
            new_device_id,
            60.0,
            new_kms_public_key,
            False,
        )
        new = KmsCredential(kms_client(opts))
    elif new_key_file:
        path = Path(new_key_file)
        new = read_key_file(path) if path.exists() else generate_key_file(path)
    else:
        assert new_passphrase_file is not None
        new = PassphraseCredential(read_passphrase_file(new_passphrase_file))
    slot = change_slots(
        Path(backing_dir), cred, lambda header, master: header.add_slot(master, new, kdf_params)
    )
    info = slot.public_info()
    emit({"ok": True, "slot": info}, as_json, f"added {_slot_line(info)}")


@key.command("remove", epilog=NOT_REVOKED)
@click.argument("backing_dir", type=click.Path(file_okay=False))
@credential_options
@click.option("--slot", "slot_id", type=int, required=True, help="Id of the slot to remove.")
@json_option
def key_remove(backing_dir: str, cred: Credential, slot_id: int, as_json: bool) -> None:
    """Remove key slot --slot from the volume in BACKING_DIR; refuses to remove the last one.

    Removing the kms slot also ends the volume's freshness anchor at the KMS: later mounts
    with a key file or passphrase cannot detect a rolled-back disk.
    """
    slot = change_slots(
        Path(backing_dir), cred, lambda header, master: header.remove_slot(master, slot_id)
    )
    info = slot.public_info()
    emit({"ok": True, "removed": info}, as_json, f"removed {_slot_line(info)}")


@key.command("rotate", epilog=NOT_REVOKED)
@click.argument("backing_dir", type=click.Path(file_okay=False))
@credential_options
@json_option
def key_rotate(backing_dir: str, cred: Credential, as_json: bool) -> None:
    """Re-wrap the kms slot of the volume in BACKING_DIR under the app key's current version.

    Run it for every volume after `sealfs kms policy rotate`; unlock with --kms (the slot's
    old version opens it, the current one wraps it again). Once no volume is left on the old
    version, the KMS may stop releasing it.
    """
    if not isinstance(cred, KmsCredential):
        raise UsageError("rotate re-wraps the kms slot with a key from the KMS: unlock with --kms")
    kms_cred = cred

    def rotate(header: Header, master: Secret) -> tuple[Slot, Slot]:
        return header.rewrap_kms_slot(master, kms_cred)

    old, new = change_slots(Path(backing_dir), cred, rotate)
    assert old.kms is not None and new.kms is not None
    versions = {"old_key_version": old.kms["key_version"], "key_version": new.kms["key_version"]}
    emit(
        {"ok": True, "slot": new.public_info(), **versions},
        as_json,
        f"kms slot {new.id}: key version {versions['old_key_version']} -> "
        f"{versions['key_version']}",
    )
