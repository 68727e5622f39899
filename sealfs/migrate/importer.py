"""``sealfs migrate import``: verify a bundle completely, then make it the backing directory.

Everything is copied into a staging directory beside BACKING_DIR and checked there — the
manifest's MAC under the unlocked volume's key, each file's length and SHA-256 (of the bytes
copied, not of a second read), the replayed metadata against the manifest's commit, every
object it refers to, and, when unlocked through the KMS, the freshness anchor — and only then
renamed to BACKING_DIR. A refused or interrupted import leaves BACKING_DIR as it was.

An interrupted import keeps its staging directory, and a rerun keeps each staged copy that
re-hashes to its manifest entry instead of copying it again (the staging directory is the
host's: nothing in it is trusted unverified, and whatever the manifest does not list goes).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sealfs.crypto import Secret, ct_equal
from sealfs.errors import BusyError, IntegrityError, StorageError, UsageError
from sealfs.meter import Meter, NoMeter, each
from sealfs.store import HEADER_NAME, MissingObject, ObjectStore, read_bounded
from sealfs.tarstream import Member, TarReader
from sealfs.volume.anchor import KmsAnchor, RollbackError, verify_fresh
from sealfs.volume.header import MAX_HEADER_BYTES, Credential, Header, KmsCredential, load_header

from .export import Summary
from .files import (
    copy_hashed,
    fsync_dir,
    holds_copy,
    is_partial,
    open_under,
    remove_under,
    write_hashed,
)
from .manifest import (
    MANIFEST_MAX,
    MANIFEST_NAME,
    BundleIncomplete,
    BundleTampered,
    FileEntry,
    Manifest,
    parse_manifest,
)
from .state import committed_state, metadata_names, object_name
from .verify import verify_data


def staging_dir(backing: Path) -> Path:
    """Where an import of ``backing`` is assembled (same filesystem, so the rename is atomic)."""
    return backing.parent / f".{backing.name}.migrate-staging"


Fill = Callable[[Path, Summary], tuple[Header, Secret, Manifest]]


@dataclass(frozen=True)
class ImportOptions:
    """How an import runs (the command line's flags)."""

    dry_run: bool = False  # verify in the staging directory, install nothing
    verify_data: bool = False  # also decrypt every object (:func:`.verify.verify_data`)
    meter: Meter = field(default_factory=NoMeter)


def import_bundle(source: Path, backing: Path, cred: Credential, opts: ImportOptions) -> Summary:
    """Verify the bundle directory ``source`` and install it as ``backing`` (unless
    ``opts.dry_run``: then verify only, in a staging directory removed afterwards)."""
    if not source.is_dir():
        raise UsageError(f"{source} is not a bundle directory")
    return _import(
        backing, cred, opts, lambda stage, s: _from_dir(source, stage, cred, s, opts.meter)
    )


def import_stream(
    stream: BinaryIO, backing: Path, cred: Credential, opts: ImportOptions
) -> Summary:
    """Like :func:`import_bundle`, from the single byte stream ``export -`` writes."""
    return _import(
        backing, cred, opts, lambda stage, s: _from_stream(stream, stage, cred, s, opts.meter)
    )


def _import(backing: Path, cred: Credential, opts: ImportOptions, fill: Fill) -> Summary:
    t0 = time.monotonic()
    if backing.exists() and (not backing.is_dir() or any(backing.iterdir())):
        raise UsageError(f"{backing} exists and is not an empty directory: refusing to replace it")
    summary = Summary("", True, opts.dry_run)
    with _staging(backing, opts.dry_run) as stage:
        header, master, manifest = fill(stage, summary)
        listed = {e.name for e in manifest.files}
        folders = {n.rsplit("/", i)[0] for n in listed for i in (1, 2) if n.count("/") >= i}
        remove_under(stage, lambda name, _: name not in listed and name not in folders)
        summary.volume_id = header.volume_id.hex()
        summary.commit, summary.head = manifest.commit, manifest.head.hex()
        summary.objects = sum(e.name.startswith("objects/") for e in manifest.files)
        summary.bytes_total = summary.bytes_copied + summary.bytes_reused
        opts.meter.note("checking metadata")
        _check_state(stage, header, master, manifest, cred)
        if opts.verify_data:
            verify_data(stage, header, master, opts.meter)
            summary.data_verified = True
        if not opts.dry_run:
            _install(stage, backing)
    summary.seconds = round(time.monotonic() - t0, 3)
    return summary


@contextlib.contextmanager
def _staging(backing: Path, dry_run: bool) -> Iterator[Path]:
    """The staging directory for ``backing``, held (flock) for this import.

    An interrupted import (killed, a full disk, the KMS unreachable, an incomplete bundle)
    leaves it behind so that a rerun reuses the copies it verified; what cannot be reused (a
    ``.part`` file, a symlink or other non-regular entry the host put there) is cleared
    first. A bundle refused for its content (tampered with, stale, of another volume) gets
    it removed: that bundle will never install, a new export must be carried anyway. A dry
    run removes a staging directory it created, and keeps one it found."""
    stage = staging_dir(backing)
    created = _make_stage(stage)
    try:
        fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:  # swapped for a link or file since it was made
        raise StorageError(f"cannot use the staging directory {stage}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(
                f"another import into {backing} is running (it holds {stage})"
            ) from None
        remove_under(stage, _unusable)
        try:
            yield stage
        except IntegrityError as e:
            if not isinstance(e, BundleIncomplete):
                shutil.rmtree(stage, ignore_errors=True)
            raise
        if dry_run and created:
            shutil.rmtree(stage, ignore_errors=True)
    finally:
        os.close(fd)


def _unusable(name: str, mode: int) -> bool:
    """What a rerun cannot reuse from a staging directory: a copy in progress, or an entry
    that is neither a directory nor a regular file."""
    return is_partial(name) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode))


def _make_stage(stage: Path) -> bool:
    """Create the staging directory (True) or find the one an interrupted import left
    (False). Anything else under that name (a symlink or file the host planted) is refused,
    never followed or deleted."""
    try:
        stage.mkdir(mode=0o700, parents=True)
        return True
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(stage).st_mode):
                return False
        error = "it is not a directory"
    except OSError as e:
        error = e.strerror or str(e)
    raise StorageError(
        f"cannot use the staging directory {stage}: {error} (remove it if no import is running)"
    )


def _verified_manifest(data: bytes, header: Header, master: Secret) -> Manifest:
    manifest = parse_manifest(data, header.volume_keys(master))
    if not ct_equal(manifest.volume_id, header.volume_id):
        raise BundleTampered("the bundle manifest names another volume than its header")
    return manifest


def _from_dir(
    source: Path, stage: Path, cred: Credential, summary: Summary, meter: Meter
) -> tuple[Header, Secret, Manifest]:
    header = load_header(source)
    master = header.unlock(cred)  # also refuses another volume than --volume-id
    try:
        with open_under(source, MANIFEST_NAME) as fd:
            data = read_bounded(fd, MANIFEST_NAME, MANIFEST_MAX)
    except MissingObject:
        raise BundleIncomplete(
            f"{source} has no manifest: the export was not finished with `--final`"
        ) from None
    manifest = _verified_manifest(data, header, master)
    files, total = manifest.files, manifest.total_bytes
    for entry in each(meter, "copying", files, len(files), total, summary.copied):
        if holds_copy(stage, entry.name, entry.size, entry.sha256):
            summary.files_reused += 1  # verified by an interrupted run, and again now
            summary.bytes_reused += entry.size
            continue
        try:
            size, digest = copy_hashed(source, stage, entry.name)
        except MissingObject:
            raise BundleIncomplete(
                f"the bundle lacks {entry.name}, which its manifest lists"
            ) from None
        _matches(entry, size, digest, summary)
    return header, master, manifest


def _from_stream(
    stream: BinaryIO, stage: Path, cred: Credential, summary: Summary, meter: Meter
) -> tuple[Header, Secret, Manifest]:
    """The stream (:mod:`sealfs.tarstream`) holds the header, the manifest, then every file
    the manifest lists, then nothing more; it is read in bounded pieces as it arrives."""
    tar = TarReader(stream.read)
    raw = _member(tar.next(), HEADER_NAME, MAX_HEADER_BYTES).read_all()
    # parsed from the bytes received, not read back from the host's staging directory
    header = Header.from_bytes(raw)
    head_size, head_digest = write_hashed(io.BytesIO(raw).read, stage, HEADER_NAME)
    master = header.unlock(cred)
    data = _member(tar.next(), MANIFEST_NAME, MANIFEST_MAX).read_all()
    manifest = _verified_manifest(data, header, master)
    pending = {e.name: e for e in manifest.files}
    if HEADER_NAME not in pending:
        raise BundleIncomplete("the manifest does not list the volume header")
    _matches(pending.pop(HEADER_NAME), head_size, head_digest, summary)
    total = sum(e.size for e in pending.values())
    for member in each(meter, "receiving", _members(tar), len(pending), total, summary.copied):
        entry = pending.pop(member.name, None)
        if entry is None:
            raise BundleTampered(f"the stream holds {member.name!r}, which no manifest lists")
        size, digest = write_hashed(_member(member, entry.name, entry.size).read, stage, entry.name)
        _matches(entry, size, digest, summary)
    if pending:
        raise BundleIncomplete(
            f"the bundle stream ended before {len(pending)} listed file(s) arrived ({min(pending)})"
        )
    return header, master, manifest


def _members(tar: TarReader) -> Iterator[Member]:
    """The stream's remaining members, in order."""
    while (member := tar.next()) is not None:
        yield member


def _member(member: Member | None, name: str, limit: int) -> Member:
    """``member``, which must be the file ``name`` of at most ``limit`` bytes."""
    if member is None:
        raise BundleIncomplete(f"the bundle stream ended before {name}")
    if member.name != name or member.size > limit:
        raise BundleTampered(f"the bundle stream holds {member.name!r} where {name} belongs")
    return member


def _matches(entry: FileEntry, size: int, digest: bytes, summary: Summary) -> None:
    if size != entry.size:
        raise BundleTampered(
            f"{entry.name} in the bundle is {size} bytes, not the {entry.size} of the manifest"
        )
    if not ct_equal(digest, entry.sha256):
        raise BundleTampered(f"{entry.name} in the bundle does not match its manifest hash")
    summary.objects_copied += entry.name.startswith("objects/")
    summary.bytes_copied += size


def _check_state(
    stage: Path, header: Header, master: Secret, manifest: Manifest, cred: Credential
) -> None:
    """The staged volume replays to the manifest's commit, holds every object it refers to,
    and is not older than the KMS anchor."""
    if load_header(stage).to_bytes() != header.to_bytes():
        raise BundleTampered(f"the {HEADER_NAME} in the bundle changed while it was imported")
    store = ObjectStore(stage)
    try:
        state, referenced = committed_state(store, header, master)
        if state.seq != manifest.commit or not ct_equal(state.head, manifest.head):
            raise BundleTampered(
                f"the bundle's metadata ends at commit {state.seq}, not at the manifest's "
                f"commit {manifest.commit}"
            )
        listed = {e.name for e in manifest.files}
        missing = [n for n in metadata_names(state) if n not in listed]
        missing += [object_name(o) for o in sorted(referenced) if object_name(o) not in listed]
        if missing:
            raise BundleIncomplete(
                f"the bundle lacks {len(missing)} file(s) its metadata refers to ({missing[0]})"
            )
        if isinstance(cred, KmsCredential):
            anchored = KmsAnchor(cred.client, header.volume_id).fetch()
            try:
                verify_fresh(state.seq, state.heads, anchored)
            except RollbackError as e:
                raise RollbackError(
                    e.reason,
                    "the bundle is a stale export (the volume committed after it was made: "
                    f"export again with --final): {e}",
                ) from None
    except MissingObject as e:
        raise BundleIncomplete(f"the bundle is incomplete: {e}") from None
    finally:
        store.close()


def _install(stage: Path, backing: Path) -> None:
    """Make the staged volume durable (the files were fsynced as written; their directories
    now), then rename it into place, over an empty directory if one is there."""
    try:
        for root, _, _ in os.walk(stage):
            fsync_dir(Path(root))
        os.rename(stage, backing)
        fsync_dir(backing.parent)
    except OSError as e:
        raise StorageError(f"cannot install the imported volume at {backing}: {e}") from None
