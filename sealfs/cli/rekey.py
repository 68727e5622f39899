"""``sealfs rekey``: a new master key for every object of a volume (revokes old keys)."""

from __future__ import annotations

from pathlib import Path

import click

from sealfs.cli.credentials import credential_options, read_passphrase_file
from sealfs.cli.output import emit, json_option
from sealfs.cli.progress import Progress, progress_option
from sealfs.fs.rekey import BATCH_OBJECTS, RekeyResult, rekey_volume
from sealfs.volume.header import Credential, PassphraseCredential, read_key_file

MIB = 1 << 20


@click.command(
    epilog="Compare `sealfs key rotate/add/remove`: those re-wrap the same master key in "
    "other slots, touch no data and revoke nothing (an old header copy plus an old "
    "credential still opens everything). Only a re-key revokes."
)
@click.argument("backing_dir", type=click.Path(file_okay=False))
@credential_options
@click.option(
    "--keep-key-file",
    type=click.Path(dir_okay=False),
    multiple=True,
    help="Also keep the key-file slot this file opens (re-wrapped for the new master key). "
    "Repeatable.",
)
@click.option(
    "--keep-passphrase-file",
    type=click.Path(dir_okay=False),
    multiple=True,
    help="Also keep the passphrase slot the passphrase in this file opens (mode 0600; "
    "same KDF and costs, a fresh salt). Repeatable.",
)
@click.option(
    "--drop-other-slots",
    is_flag=True,
    help="Drop every slot that no credential given opens, instead of refusing. Whoever held "
    "only those credentials loses access for good.",
)
@click.option("--batch", type=click.IntRange(1), default=BATCH_OBJECTS, hidden=True)
@progress_option
@json_option
def rekey(
    backing_dir: str,
    cred: Credential,
    keep_key_file: tuple[str, ...],
    keep_passphrase_file: tuple[str, ...],
    drop_other_slots: bool,
    batch: int,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Re-encrypt the volume in BACKING_DIR under a new random master key (revocation).

    Every object (file data, inode records), the checkpoint and the journal is sealed again
    under a fresh master key, the new key is wrapped in the slots kept, and the old master
    key is forgotten. Afterwards an old copy of the header plus an old credential opens
    nothing that remains. Use it when a credential, a header copy or the master key may have
    leaked, or when someone with access leaves. It rewrites the whole volume: about as long
    as writing it (docs/benchmarks.md).

    Slots: every slot needs its secret to be wrapped again. The slot the unlocking credential
    opens is kept; the kms slot is kept when unlocking with --kms (wrapped under the app's
    current key version); key-file and passphrase slots are kept with --keep-key-file and
    --keep-passphrase-file. Any other slot makes the command refuse up front, naming it,
    unless --drop-other-slots is given.

    Offline only: a mounted volume is refused (exit 6; the command takes the volume lock as a
    mount does). With --kms the disk is checked against the KMS freshness anchor first, and
    the anchor advances past the re-key, so a copy of the disk from before it is refused as
    rolled back.

    Interrupted (crash, kill, power loss, full disk), the volume still mounts and checks clean
    meanwhile: objects open under the new key or the previous one, and the mount log, `sealfs
    check` and `sealfs info` say "rekey in progress". Run the command again to finish: it
    continues where it stopped and needs only a credential that opens the volume. The old key
    is revoked only once it reports success. An object that opens under neither key (damage)
    stops it (exit 5): run `sealfs check --repair`, then rekey again.

    Progress is shown on a terminal; --json prints objects re-sealed, bytes, seconds, MiB/s,
    the slots kept and dropped, and the commit anchored at the KMS.

    \b
    Examples:
      sealfs rekey /data/vol --kms http://kms:8750 --keep-passphrase-file /root/recovery.pw
      sealfs rekey /data/vol --key-file /root/vol.key --drop-other-slots --json
    """
    keep: list[Credential] = [read_key_file(path) for path in keep_key_file]
    keep += [PassphraseCredential(read_passphrase_file(p)) for p in keep_passphrase_file]
    meter = Progress.on_stderr(progress, as_json)
    result = rekey_volume(Path(backing_dir), cred, keep, drop_other_slots, meter, batch=batch)
    human = _human(result)
    if result.resumed and (keep or drop_other_slots):
        human += (
            "\nnote: the slots were re-wrapped when this re-key began; --keep-* and "
            "--drop-other-slots were not used"
        )
    emit(_summary(result), as_json, human)


def _summary(r: RekeyResult) -> dict[str, object]:
    return {
        "ok": True,
        "resumed": r.resumed,
        "objects_resealed": r.resealed,
        "objects_already_current": r.current,
        "orphans_removed": r.orphans_removed,
        "bytes": r.resealed_bytes,
        "seconds": round(r.seconds, 3),
        "mib_per_second": round(r.resealed_bytes / MIB / r.seconds, 2) if r.seconds else 0.0,
        "anchor": {"epoch": r.anchor[0], "head": r.anchor[1].hex()} if r.anchor else None,
        "slots": r.slots,
        "dropped_slots": r.dropped,
    }


def _human(r: RekeyResult) -> str:
    rate = r.resealed_bytes / MIB / r.seconds if r.seconds else 0.0
    lines = [
        f"re-keyed: {r.resealed} objects ({r.resealed_bytes / MIB:.1f} MiB) sealed under the "
        f"new master key in {r.seconds:.1f}s ({rate:.1f} MiB/s)"
        + (f"; {r.current} were already (continued an interrupted re-key)" if r.resumed else "")
    ]
    if r.orphans_removed:
        lines.append(f"removed {r.orphans_removed} orphaned objects")
    lines.append("slots: " + ", ".join(f"{s['id']} ({s['type']})" for s in r.slots))
    if r.dropped:
        lines.append("dropped: " + ", ".join(f"{s['id']} ({s['type']})" for s in r.dropped))
    if r.anchor:
        lines.append(f"KMS anchor advanced to commit {r.anchor[0]}")
    return "\n".join(lines)
