"""``sealfs check``: offline verification (and repair) of a volume, reported by path."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sealfs.check.repair import Plan, apply_repair, plan_repair
from sealfs.check.report import Report
from sealfs.check.run import CheckOptions, CheckResult, check_volume, open_and_check
from sealfs.cli.credentials import credential_options
from sealfs.cli.exit_codes import exit_code, fail_with
from sealfs.cli.output import emit, json_option
from sealfs.cli.progress import Progress, progress_option
from sealfs.crypto import Secret
from sealfs.errors import IntegrityError, UsageError
from sealfs.store import ObjectStore
from sealfs.volume.header import Credential, Header


@click.command()
@click.argument("backing_dir", type=click.Path(file_okay=False))
@credential_options
@click.option(
    "--path",
    "subpath",
    default="/",
    show_default=True,
    metavar="SUBDIR",
    help="Check only this directory of the volume and everything below it.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Metadata and structure only: every record, link count and object's "
    "presence, but no data object is read.",
)
@click.option(
    "--repair",
    is_flag=True,
    help="Fix what can be fixed (see REPAIR below). Needs the volume unmounted.",
)
@click.option(
    "--dry-run", is_flag=True, help="With --repair: show what it would do, change nothing."
)
@click.option(
    "--read-only",
    "live",
    is_flag=True,
    help="Allow checking a mounted volume: its last committed state is checked; "
    "orphans are not reported and missing objects are re-verified.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Processes verifying data (default: one per CPU).",
)
@progress_option
@json_option
def check(
    backing_dir: str,
    cred: Credential,
    subpath: str,
    quick: bool,
    repair: bool,
    dry_run: bool,
    live: bool,
    workers: int | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Verify the volume in BACKING_DIR and report every problem by plaintext path.

    Unlocks like `sealfs mount`, then verifies the header and key slots, the metadata
    checkpoint and journal, every inode record, directory and link count, and (unless
    --quick) every data object's authentication tag and its binding to its file, position and
    version. The volume must not be mounted (see --read-only).

    \b
    Each finding has a kind:
      tampered      fails authentication (modified, or from another volume)
      missing       an object the metadata refers to is not there
      rolled-back   an older, once-valid version was put back
      swapped       authentic, but belongs to another file, position or record
      truncated     shorter than it was written
      orphaned      referenced by nothing: a normal crash leftover, NOT corruption
      unreadable    cannot be reached or decoded because something it needs is damaged
      inconsistent  authentic metadata contradicting itself (link counts): a sealfs bug
    and names the backing object and what to do about it.

    \b
    REPAIR (--repair) never makes things worse, and is crash-safe (all changes are one
    commit; a kill leaves a volume that checks and repairs again):
      swapped objects are healed (their content is put back where it belongs);
      damaged files move to /lost+found/<ino>-<name> with the damaged blocks dropped
        (they read as zeros) and a user.sealfs.damage xattr saying why;
      unreadable entries are removed, what sat below them is reattached in /lost+found;
      link counts are rebuilt; orphans are deleted after the commit.
    Actions are logged in /lost+found/REPORT. Damage to the header, checkpoint or journal
    cannot be repaired in place: restore from a backup.

    \b
    Exit codes:
      0  clean (orphaned objects and a torn journal tail from a crash do not count)
      2  usage error
      3  cannot unlock (wrong key or passphrase)
      4  header unreadable or of an unsupported format
      5  corruption found (also after --repair repaired it; see "repair" in --json)
      6  busy: the volume is mounted (use --read-only) or being checked
      7  storage error reading the backing directory
    """
    if dry_run and not repair:
        raise UsageError("--dry-run only makes sense with --repair")
    if repair and live:
        raise UsageError(
            "--repair needs the volume unmounted; it cannot be combined with --read-only"
        )
    meter = Progress.on_stderr(progress, as_json)
    opts = CheckOptions(
        full=not quick, path=subpath or "/", live=live, workers=workers, progress=meter
    )
    if repair and opts.path.strip("/"):
        raise UsageError("--repair works on the whole volume; drop --path")
    result, store, header, master = open_and_check(
        Path(backing_dir), cred, opts, exclusive=repair and not dry_run
    )
    try:
        report = result.report
        if repair and master is not None:
            plan = plan_repair(result)
            report.repair = {
                "dry_run": dry_run,
                "actions": plan.actions,
                "irreparable": plan.irreparable,
            }
            if not dry_run and not plan.irreparable and plan.actions:
                after = _repair_rounds(
                    store,
                    header,
                    master,
                    result,
                    plan,
                    quick,
                    workers,
                    meter,
                    report.repair["actions"],
                )
                report.repair["clean_after"] = after.clean
                report.repair["remaining"] = [f.to_dict() for f in after.problems]
            elif not dry_run:
                report.repair["clean_after"] = report.clean
                report.repair["remaining"] = [f.to_dict() for f in report.problems]
    finally:
        store.unlock()
    meter.end()
    human = report.human()
    if report.repair and "clean_after" in report.repair:
        human += (
            "\nafter repair: clean"
            if report.repair["clean_after"]
            else f"\nafter repair: {len(report.repair['remaining'])} problem(s) remain"
        )
    # Corruption is an integrity failure, whatever --repair did (orphans and a torn journal
    # tail from a crash do not count): the exit code says what was found.
    emit(
        {**report.to_dict(), "exit_code": 0 if report.clean else exit_code(IntegrityError)},
        as_json,
        human,
    )
    sys.stdout.flush()
    if not report.clean:
        fail_with(IntegrityError)


def _repair_rounds(
    store: ObjectStore,
    header: Header,
    master: Secret,
    result: CheckResult,
    plan: Plan,
    quick: bool,
    workers: int | None,
    progress: Progress,
    actions: list[str],
    rounds: int = 3,
) -> Report:
    """Repair, re-check, and repeat while the re-check finds more to do: healing a record
    reveals its block map, whose blocks can only be checked (and healed) in the next round.
    Each round is one crash-safe commit."""
    for _ in range(rounds):
        apply_repair(store, header, master, result, plan)
        result = check_volume(
            store, header, master, CheckOptions(full=not quick, workers=workers, progress=progress)
        )
        plan = plan_repair(result)
        if result.report.clean and not plan.orphans and not plan.stale:
            break
        if plan.irreparable or not plan.actions:
            break
        actions += plan.actions
    return result.report
