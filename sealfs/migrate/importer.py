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
import time
from pathlib import Path

from sealfs.crypto import Secret, ct_equal
from sealfs.errors import StorageError, UsageError
from sealfs.store import HEADER_NAME, MissingObject, ObjectStore, read_bounded
from sealfs.volume.anchor import KmsAnchor, verify_fresh
from sealfs.volume.header import Credential, Header, KmsCredential, load_header

from .export import Summary
from .files import copy_hashed, fsync_dir, open_under
from .manifest import (
    MANIFEST_MAX,
    MANIFEST_NAME,
    BundleIncomplete,
    BundleTampered,
    Manifest,
    parse_manifest,
)
from .state import committed_state, metadata_names, object_name


def staging_dir(backing: Path) -> Path:
    """Where an import of ``backing`` is assembled (same filesystem, so the rename is atomic)."""
    return backing.parent / f".{backing.name}.migrate-staging"


def import_bundle(source: Path, backing: Path, cred: Credential, dry_run: bool) -> Summary:
    """Verify the bundle in ``source`` and install it as ``backing`` (unless ``dry_run``:
    then verify only, in a staging directory removed afterwards)."""
    t0 = time.monotonic()
    if not source.is_dir():
        raise UsageError(f"{source} is not a bundle directory")
    if backing.exists() and (not backing.is_dir() or any(backing.iterdir())):
        raise UsageError(f"{backing} exists and is not an empty directory: refusing to replace it")
    header = load_header(source)
    master = header.unlock(cred)  # also refuses another volume than --volume-id
    keys = header.volume_keys(master)
    try:
        with open_under(source, MANIFEST_NAME) as fd:
            data = read_bounded(fd, MANIFEST_NAME, MANIFEST_MAX)
    except MissingObject:
        raise BundleIncomplete(
            f"{source} has no manifest: the export was not finished with `--final`"
        ) from None
    manifest = parse_manifest(data, keys)
    if not ct_equal(manifest.volume_id, header.volume_id):
        raise BundleTampered("the bundle manifest names another volume than its header")
    summary = Summary(header.volume_id.hex(), True, dry_run)
    summary.commit, summary.head = manifest.commit, manifest.head.hex()
    stage = staging_dir(backing)
    shutil.rmtree(stage, ignore_errors=True)  # a leftover of an interrupted import
    stage.mkdir(mode=0o700, parents=True)
    try:
        _copy_verified(source, stage, manifest, summary)
        _check_state(stage, header, master, manifest, cred)
        if not dry_run:
            _install(stage, backing)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    summary.seconds = round(time.monotonic() - t0, 3)
    return summary


def _copy_verified(source: Path, stage: Path, manifest: Manifest, summary: Summary) -> None:
    for entry in manifest.files:
        try:
            size, digest = copy_hashed(source, stage, entry.name)
        except MissingObject:
            raise BundleIncomplete(
                f"the bundle lacks {entry.name}, which its manifest lists"
            ) from None
        if size != entry.size:
            raise BundleTampered(
                f"{entry.name} in the bundle is {size} bytes, not the {entry.size} of the manifest"
            )
        if not ct_equal(digest, entry.sha256):
            raise BundleTampered(f"{entry.name} in the bundle does not match its manifest hash")
        summary.objects_copied += entry.name.startswith("objects/")
        summary.bytes_copied += size
    summary.objects = summary.objects_copied
    summary.bytes_total = summary.bytes_copied


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
            verify_fresh(state.seq, state.heads, anchored)
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
