"""``sealfs migrate export`` and ``sealfs migrate import``: move a volume to another host."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from sealfs.cli.credentials import credential_options, stream_credential_options
from sealfs.cli.output import SealfsGroup, emit, json_option
from sealfs.cli.progress import Progress, progress_option
from sealfs.errors import UsageError
from sealfs.fuse.mount import served_backing, unmount
from sealfs.migrate.export import Summary, export_stream, export_volume
from sealfs.migrate.importer import ImportOptions, import_bundle, import_stream
from sealfs.volume.header import Credential

_DRY_RUN = click.option("--dry-run", is_flag=True, help="Show what would be copied; write nothing.")


@click.group(cls=SealfsGroup)
def migrate() -> None:
    """Move a volume to another host: export it into a bundle, import the bundle there.

    \b
    On the old host (the volume may stay mounted for the first passes):
      sealfs migrate export /data/vol /mnt/bundle --kms ...          # repeat: incremental
      sealfs umount /srv/app
      sealfs migrate export /data/vol /mnt/bundle --kms ... --final
    On the new host, inside its CVM:
      sealfs migrate import /mnt/bundle /data/vol --kms ... --app-id HEX
      sealfs mount /data/vol /srv/app --kms ...
    Or in one go, unmounted:
      sealfs migrate export /data/vol - --kms ... | ssh newhost sealfs migrate import - ...

    Only ciphertext leaves the CVM. The bundle's manifest (every file's length and SHA-256,
    the volume id, the last commit and its head) is authenticated under a key derived from
    the volume master key, so whoever carries the bundle cannot alter it unseen. Once the
    new host commits, the KMS anchor moves on and a mount or check of the old copy is
    refused as stale (a fork left behind, exit 5).
    """


@migrate.command("export")
@click.argument("backing_dir", type=click.Path(file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@credential_options
@click.option(
    "--final",
    is_flag=True,
    help="The last pass: needs the volume unmounted; copies the objects still missing, "
    "the header, checkpoint and journal, and writes the manifest.",
)
@click.option(
    "--umount",
    "mountpoint",
    metavar="MOUNTPOINT",
    help="With --final (implied): first unmount the volume from MOUNTPOINT (which must serve "
    "BACKING_DIR), waiting for its final commit, then run the final pass at once.",
)
@_DRY_RUN
@progress_option
@json_option
def export(
    backing_dir: str,
    dest: str,
    cred: Credential,
    final: bool,
    mountpoint: str | None,
    dry_run: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Copy the volume in BACKING_DIR into the bundle directory DEST (or, with DEST `-`,
    write the final bundle as one byte stream on standard output; this implies --final).

    Unlocks like `sealfs mount` (the key proves the operator may move this volume). Without
    --final this is a pre-copy that may run while the volume is mounted and in use: objects
    are never overwritten in place, so every object copied stays valid; a rerun copies only
    the objects DEST lacks. With --final (volume unmounted) the remaining delta and the
    metadata are copied and the manifest is written: the application's downtime is this
    pass. A bundle without a manifest is refused by import.

    An interrupted export (killed, a full disk) is simply run again: it removes the `.part`
    file it was writing, keeps every whole copy a pass noted in its authenticated ledger,
    re-hashes one no ledger notes (kept only if it matches the source), and copies the rest.

    On a terminal a progress line on standard error shows the bytes and objects done, the
    rate and an estimate of the time left (from the objects: their sizes are not read ahead,
    to keep the final pass short; a stream's send phase knows its bytes).

    \b
    Exit codes: 0 done, 2 usage, 3 cannot unlock, 4 bad header, 5 the volume is damaged
    (run `sealfs check`), 6 --final while the volume is mounted, 7 storage error.
    """
    if mountpoint is not None:
        final = True
        _unmount_volume(Path(mountpoint), Path(backing_dir), dry_run)
    meter = Progress.on_stderr(progress, as_json)
    if dest == "-":
        final = True
        summary = export_stream(Path(backing_dir), sys.stdout.buffer, cred, dry_run, meter)
    else:
        summary = export_volume(Path(backing_dir), Path(dest), cred, final, dry_run, meter)
    meter.end()
    verb = "would copy" if dry_run else "copied"
    lines = [
        f"{verb} {summary.objects_copied} object(s), {summary.bytes_copied} bytes to {dest}"
        + _reused(summary)
    ]
    if final:
        lines.append(
            f"bundle of volume {summary.volume_id} at commit {summary.commit}: "
            f"{summary.objects} object(s), {summary.bytes_total} bytes"
        )
        if not dry_run:
            lines.append(
                f"the copy in {backing_dir} becomes a stale fork once the new host commits: "
                "do not mount it again (a mount or check of it is refused as stale, exit 5)"
            )
    _report(summary, as_json, lines, to_stderr=dest == "-")


@migrate.command("import")
@click.argument("source", type=click.Path(file_okay=False))
@click.argument("backing_dir", type=click.Path(file_okay=False))
@stream_credential_options("source")
@click.option(
    "--verify-data",
    is_flag=True,
    help="Also decrypt every object of the staged volume before installing it (the full "
    "`sealfs check` of the imported copy): refuses a bundle whose objects match the manifest "
    "but were damaged on the old host before the export hashed them.",
)
@_DRY_RUN
@progress_option
@json_option
def import_(
    source: str,
    backing_dir: str,
    cred: Credential,
    verify_data: bool,
    dry_run: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Verify the bundle in SOURCE (a directory, or `-`: the byte stream of `export -` on
    standard input) and install it as the volume in BACKING_DIR.

    Runs on the new host, inside its CVM, and unlocks like `sealfs mount` (through the KMS
    the same app id releases the same key on any allowed host; give --app-id, since the
    volume is not there yet). BACKING_DIR must not exist or be empty. The bundle is copied
    into a staging directory beside BACKING_DIR and verified there: the manifest's MAC,
    every file's length and SHA-256, the metadata's last commit against the manifest,
    every object the metadata refers to, and (with --kms) the freshness anchor. Only then
    is it renamed to BACKING_DIR; a refused or interrupted import leaves nothing there.
    With --dry-run the bundle is verified the same way and nothing is installed. With `-`
    standard input is the stream's: --passphrase asks on the terminal (without one, use
    --passphrase-file).

    An interrupted import (killed, a full disk, the KMS unreachable, a bundle still
    incomplete) keeps its staging directory `.BACKING_DIR.migrate-staging`; rerun the same
    command and every staged file that still matches the manifest (re-hashed: the staging
    directory is the host's) is kept instead of copied again. After a refusal for tampering,
    staleness or another volume the staging directory is removed.

    The manifest proves the bundle holds what the exporter read, not that it was sound: an
    object damaged on the old host's disk before the export is carried faithfully. With
    --verify-data every record and data object of the staged volume is also decrypted and
    checked against its file and position (as `sealfs check` does; it reads the volume once
    more) and any problem refuses the bundle. On a terminal a progress line on standard
    error shows the bytes and objects done (the totals come from the manifest), the rate and
    an estimate of the time left.

    \b
    Exit codes: 0 imported, 2 usage (BACKING_DIR not empty, ...), 3 cannot unlock,
    4 bad header, 5 bundle refused: incomplete or cut short, tampered with or a malformed
    stream, of another volume, older than the KMS anchor (a stale export), or
    (--verify-data) holding damaged data, 6 another import into BACKING_DIR is running,
    7 storage error (a full disk: free space, rerun), 8 KMS unreachable.
    """
    meter = Progress.on_stderr(progress, as_json)
    opts = ImportOptions(dry_run, verify_data, meter)
    if source == "-":
        summary = import_stream(sys.stdin.buffer, Path(backing_dir), cred, opts)
    else:
        summary = import_bundle(Path(source), Path(backing_dir), cred, opts)
    meter.end()
    verb = "verified" if dry_run else "imported"
    _report(
        summary,
        as_json,
        [
            f"{verb} volume {summary.volume_id} at commit {summary.commit}: "
            f"{summary.objects} object(s), {summary.bytes_total} bytes"
            + ("" if dry_run else f" into {backing_dir}")
            + _reused(summary)
        ],
    )


def _reused(summary: Summary) -> str:
    """What a rerun kept of the copies an interrupted run made (verified, not copied again)."""
    if not summary.files_reused:
        return ""
    return (
        f" ({summary.files_reused} file(s), {summary.bytes_reused} bytes left by an "
        "interrupted run verified and kept)"
    )


def _report(summary: Summary, as_json: bool, lines: list[str], to_stderr: bool = False) -> None:
    """Print the result; on standard error when standard output carries the bundle."""
    data = {"ok": True, **dataclasses.asdict(summary)}
    if to_stderr:
        click.echo(json.dumps(data, sort_keys=True) if as_json else "\n".join(lines), err=True)
    else:
        emit(data, as_json, "\n".join(lines))


def _unmount_volume(mountpoint: Path, backing: Path, dry_run: bool) -> None:
    """Unmount ``mountpoint`` for the final pass, refusing one that serves another volume."""
    served = served_backing(mountpoint)
    if served is None or served.resolve() != backing.resolve():
        raise UsageError(f"{mountpoint} is not a sealfs mount of {backing}")
    if not dry_run:
        unmount(mountpoint)
