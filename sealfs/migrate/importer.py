"""``sealfs migrate import``: verify a bundle completely, then make it the backing directory.

Everything is copied into a staging directory beside BACKING_DIR and checked there — the
manifest's MAC under the unlocked volume's key, each file's length and SHA-256 (of the bytes
copied, not of a second read), the replayed metadata against the manifest's commit, every
object it refers to, and, when unlocked through the KMS, the freshness anchor — and only then
renamed to BACKING_DIR. A refused or interrupted import leaves BACKING_DIR as it was.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from sealfs.crypto import Secret, ct_equal
from sealfs.errors import StorageError, UsageError
from sealfs.meter import Meter, NoMeter, each
from sealfs.store import HEADER_NAME, MissingObject, ObjectStore, read_bounded
from sealfs.volume.anchor import KmsAnchor, RollbackError, verify_fresh
from sealfs.volume.header import MAX_HEADER_BYTES, Credential, Header, KmsCredential, load_header

from .export import Summary
from .files import copy_hashed, fsync_dir, open_under, write_hashed
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
    stage = _fresh_stage(backing)
    try:
        header, master, manifest = fill(stage, summary)
        summary.volume_id = header.volume_id.hex()
        summary.commit, summary.head = manifest.commit, manifest.head.hex()
        summary.objects = sum(e.name.startswith("objects/") for e in manifest.files)
        summary.bytes_total = summary.bytes_copied
        opts.meter.note("checking metadata")
        _check_state(stage, header, master, manifest, cred)
        if opts.verify_data:
            verify_data(stage, header, master, opts.meter)
            summary.data_verified = True
        if not opts.dry_run:
            _install(stage, backing)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    summary.seconds = round(time.monotonic() - t0, 3)
    return summary


def _fresh_stage(backing: Path) -> Path:
    """An empty staging directory for ``backing``, created by this import. A leftover
    directory of an interrupted import is removed; anything else under that name (a symlink
    or file the host planted) is refused, never followed or deleted."""
    stage = staging_dir(backing)
    try:
        if stat.S_ISDIR(os.lstat(stage).st_mode):
            shutil.rmtree(stage)
    except FileNotFoundError:
        pass
    try:
        stage.mkdir(mode=0o700, parents=True)
    except OSError as e:
        raise StorageError(
            f"cannot create the staging directory {stage}: {e.strerror} "
            "(remove it if no import is running)"
        ) from None
    return stage


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
    """The stream is a tar of the header, the manifest, then every file it lists."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            members = iter(tar)
            head = _member(tar, next(members, None), HEADER_NAME, MAX_HEADER_BYTES)
            head_size, head_digest = write_hashed(head.read, stage, HEADER_NAME)
            header = load_header(stage)
            master = header.unlock(cred)
            data = _member(tar, next(members, None), MANIFEST_NAME, MANIFEST_MAX).read()
            manifest = _verified_manifest(data, header, master)
            pending = {e.name: e for e in manifest.files}
            _matches(pending.pop(HEADER_NAME), head_size, head_digest, summary)
            total = sum(e.size for e in pending.values())
            for member in each(meter, "receiving", members, len(pending), total, summary.copied):
                entry = pending.pop(member.name, None)
                if entry is None:
                    raise BundleTampered(
                        f"the stream holds {member.name!r}, which no manifest lists"
                    )
                size, digest = write_hashed(
                    _member(tar, member, entry.name, entry.size).read, stage, entry.name
                )
                _matches(entry, size, digest, summary)
    except (tarfile.TarError, EOFError) as e:
        raise BundleIncomplete(f"the bundle stream is cut short or damaged ({e})") from None
    except KeyError:
        raise BundleIncomplete("the manifest does not list the volume header") from None
    if pending:
        raise BundleIncomplete(
            f"the bundle stream ended before {len(pending)} listed file(s) arrived ({min(pending)})"
        )
    return header, master, manifest


def _member(
    tar: tarfile.TarFile, member: tarfile.TarInfo | None, name: str, limit: int
) -> BinaryIO:
    """The content of ``member``, which must be the regular file ``name`` of at most
    ``limit`` bytes."""
    if member is None:
        raise BundleIncomplete(f"the bundle stream ended before {name}")
    if member.name != name or not member.isfile() or member.size > limit:
        raise BundleTampered(f"the bundle stream holds {member.name!r} where {name} belongs")
    content = tar.extractfile(member)
    assert content is not None  # a regular file
    return cast(BinaryIO, content)


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
