"""``sealfs migrate export``: copy a volume's ciphertext into a bundle directory.

Objects are never overwritten in place (a new version gets a new random id), so a pass while
the volume is mounted copies objects that stay valid; a rerun copies only the objects the
bundle lacks. The final pass runs with the volume lock held (no mount can start), copies the
objects the committed state refers to that are still missing, then the header, checkpoint and
journal, and last the manifest: a bundle without a manifest is not importable. The same
final pass can instead go out as one byte stream (:func:`export_stream`).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sealfs.crypto import Secret
from sealfs.errors import BusyError, IntegrityError, StorageError, UsageError
from sealfs.fs.metalog import MetaState
from sealfs.meter import Meter, NoMeter, each
from sealfs.store import HEADER_NAME, DamagedFile, MissingObject, ObjectStore, read_bounded
from sealfs.tarstream import TarWriter
from sealfs.volume.header import Credential, Header, load_header, load_header_bytes

from .files import (
    copy_hashed,
    failure,
    fsync_dir,
    hash_under,
    holds_copy,
    is_partial,
    open_under,
    remove_under,
    size_under,
    write_hashed,
)
from .manifest import (
    LEDGER_NAME,
    MANIFEST_MAX,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ledger_bytes,
    parse_ledger,
)
from .state import committed_state, metadata_names, object_name


@dataclass
class Summary:
    """What one export or import run did (the ``--json`` output)."""

    volume_id: str
    final: bool
    dry_run: bool
    objects: int = 0  # objects in the bundle (final) or seen (live pass)
    objects_copied: int = 0
    bytes_copied: int = 0
    bytes_total: int = 0
    bytes_hashed: int = 0  # read only to hash them (objects no live pass noted): downtime
    files_reused: int = 0  # copies an interrupted run left, verified and kept (not copied)
    bytes_reused: int = 0
    data_verified: bool = False  # import --verify-data: every object decrypted
    commit: int | None = None
    head: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def copied(self) -> int:
        """The bytes done so far, copied or reused (what a progress line counts)."""
        return self.bytes_copied + self.bytes_reused


def export_volume(
    backing: Path,
    dest: Path,
    cred: Credential,
    final: bool,
    dry_run: bool,
    meter: Meter | None = None,
) -> Summary:
    """One export pass of the volume in ``backing`` into the bundle directory ``dest``,
    reporting its progress to ``meter``."""
    t0 = time.monotonic()
    meter = meter or NoMeter()
    store, volume = _open_volume(backing, cred, final)
    header, master = volume.header, volume.master
    summary = Summary(header.volume_id.hex(), final, dry_run)
    try:
        if dest.exists() and not dest.is_dir():
            raise UsageError(f"{dest} exists and is not a directory")
        if not dry_run:
            try:
                dest.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"cannot create {dest}: {e.strerror}") from None
            # what an interrupted pass was writing; the whole copies it renamed into place stay
            remove_under(dest, lambda name, mode: stat.S_ISREG(mode) and is_partial(name))
        ledger = _read_ledger(dest, header, master)
        if final:
            _final_pass(store, backing, dest, volume, summary, ledger, meter)
        else:
            _live_pass(store, backing, dest, summary, ledger, meter)
            if not dry_run:
                _write_atomically(
                    dest,
                    LEDGER_NAME,
                    ledger_bytes(header.volume_id, ledger, header.volume_keys(master)),
                )
    finally:
        store.unlock()
        store.close()
    summary.seconds = round(time.monotonic() - t0, 3)
    return summary


def _live_pass(
    store: ObjectStore,
    backing: Path,
    dest: Path,
    summary: Summary,
    ledger: dict[str, FileEntry],
    meter: Meter,
) -> None:
    """Copy every object file the bundle lacks (a mounted volume's too: objects stay valid
    until deleted, and one deleted meanwhile is simply skipped), noting each one's hash in
    ``ledger``. A copy in ``dest`` that the ledger does not vouch for (its pass was killed
    before it saved the ledger) is kept only if it hashes like the source."""
    meter.note("listing objects")
    oids = list(store.list_objects())
    for oid in each(meter, "pre-copy", oids, len(oids), None, summary.copied):
        name = object_name(oid)
        size = size_under(backing, name)
        if size is None:
            continue  # superseded and deleted since the listing
        summary.objects += 1
        summary.bytes_total += size
        if size_under(dest, name) == size:
            known = ledger.get(name)
            if known is not None and known.size == size:
                continue
            try:
                held = _verified_copy(backing, dest, name, summary)
            except MissingObject:
                continue
            if held is not None:
                ledger[name] = held
                continue
        try:
            copied, digest = copy_hashed(backing, dest, name, write=not summary.dry_run)
        except MissingObject:
            continue
        ledger[name] = FileEntry(name, copied, digest)
        summary.objects_copied += 1
        summary.bytes_copied += copied


def export_stream(
    backing: Path, out: BinaryIO, cred: Credential, dry_run: bool, meter: Meter | None = None
) -> Summary:
    """The final export as one byte stream on ``out`` (a tar, :mod:`sealfs.tarstream`: the
    header, the manifest, then every file it lists), for
    ``export - | ssh host sealfs migrate import -``. The volume must
    be unmounted; each file is read twice (hashed for the manifest, then sent)."""
    t0 = time.monotonic()
    meter = meter or NoMeter()
    store, volume = _open_volume(backing, cred, final=True)
    header, master = volume.header, volume.master
    summary = Summary(header.volume_id.hex(), True, dry_run)
    try:
        meter.note("reading metadata")
        state, referenced = committed_state(store, header, master)
        entries = _collect(backing, None, volume, state, referenced, summary, {}, meter, "hashing")
        manifest = _manifest(header, state, entries)
        if not dry_run:
            tar = TarWriter(out)
            tar.add_bytes(HEADER_NAME, volume.raw)
            tar.add_bytes(MANIFEST_NAME, manifest.to_bytes(header.volume_keys(master)))
            total = sum(e.size for e in entries if e.name != HEADER_NAME)
            for entry in each(meter, "sending", entries, len(entries), total, summary.copied):
                if entry.name != HEADER_NAME:
                    _add(tar, backing, entry.name)
                    summary.objects_copied += entry.name.startswith("objects/")
                    summary.bytes_copied += entry.size
            tar.close()
    finally:
        store.unlock()
        store.close()
    summary.seconds = round(time.monotonic() - t0, 3)
    return summary


def _add(tar: TarWriter, root: Path, name: str) -> None:
    """Append the file ``root/name`` to the stream."""
    with open_under(root, name) as fd:
        tar.add(name, os.fstat(fd).st_size, lambda n: os.read(fd, n))


@dataclass(frozen=True)
class _Unlocked:
    """The header an export unlocked, with the exact bytes it was read from: the bundle
    carries those bytes, never a second read of ``sealfs.header``, which ``sealfs key`` may
    replace meanwhile (a mounted volume's header changes under the header lock only)."""

    header: Header
    raw: bytes
    master: Secret


def _open_volume(backing: Path, cred: Credential, final: bool) -> tuple[ObjectStore, _Unlocked]:
    """The volume's store and its unlocked header. A final pass first takes the volume lock
    (shared: checks may run, no mount and no re-key may start), so the master key it unlocks
    is the one the objects and metadata it then reads are sealed under."""
    load_header(backing)  # a sealfs volume at all, before a lock file is created in it
    store = ObjectStore(backing)
    try:
        if final:
            try:
                store.lock(shared=True)
            except BusyError:
                raise BusyError(
                    f"volume {backing} is mounted (or being checked): unmount it before the "
                    "final export"
                ) from None
        header, raw = load_header_bytes(backing)
        return store, _Unlocked(header, raw, header.unlock(cred))
    except BaseException:
        store.unlock()
        store.close()
        raise


def _collect(
    backing: Path,
    dest: Path | None,
    volume: _Unlocked,
    state: MetaState,
    referenced: set[int],
    summary: Summary,
    ledger: dict[str, FileEntry],
    meter: Meter,
    phase: str,
) -> list[FileEntry]:
    """The manifest entries of the metadata files and referenced objects, copying them into
    ``dest`` (when given) as :func:`_copy` says; the header is the one ``volume`` holds."""
    entries = [
        _header_entry(volume.raw, dest, summary)
        if name == HEADER_NAME
        else _copy(backing, dest, name, summary, None)
        for name in metadata_names(state)
    ]

    def read() -> int:
        return summary.bytes_copied + summary.bytes_hashed

    for oid in each(meter, phase, sorted(referenced), len(referenced), None, read):
        name = object_name(oid)
        try:
            entries.append(_copy(backing, dest, name, summary, ledger.get(name)))
        except MissingObject:
            raise IntegrityError(
                f"object {object_name(oid)} of the volume is missing: run `sealfs check` "
                "before migrating"
            ) from None
    summary.objects = len(referenced)
    summary.commit, summary.head = state.seq, state.head.hex()
    return entries


def _manifest(header: Header, state: MetaState, entries: list[FileEntry]) -> Manifest:
    return Manifest(
        header.volume_id,
        state.seq,
        state.head,
        state.gen,
        int(time.time()),
        tuple(sorted(entries, key=lambda e: e.name)),
    )


def _final_pass(
    store: ObjectStore,
    backing: Path,
    dest: Path,
    volume: _Unlocked,
    summary: Summary,
    ledger: dict[str, FileEntry],
    meter: Meter,
) -> None:
    """With the volume lock held: the objects the committed state refers to, the metadata
    files, and the manifest over all of them. Each hash was taken from the bytes read from
    ``backing`` (by this pass, or by the live pass that copied the object: objects never
    change under their name), so a copy altered in the bundle since then fails the import,
    and the app's downtime is the delta, not the volume."""
    meter.note("reading metadata")
    header = volume.header
    state, referenced = committed_state(store, header, volume.master)
    if not summary.dry_run:
        try:
            (dest / MANIFEST_NAME).unlink(missing_ok=True)  # the bundle is being changed
        except OSError as e:  # a directory the host planted there
            raise StorageError(f"cannot remove {dest / MANIFEST_NAME}: {failure(e)}") from None
    entries = _collect(
        backing, dest, volume, state, referenced, summary, ledger, meter, "final pass"
    )
    if summary.dry_run:
        return
    manifest = _manifest(header, state, entries)
    _write_atomically(dest, MANIFEST_NAME, manifest.to_bytes(header.volume_keys(volume.master)))


def _write_atomically(dest: Path, name: str, data: bytes) -> None:
    tmp = dest / f".{name}.part"
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.rename(dest / name)
        fsync_dir(dest)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {dest / name}: {failure(e)}") from None


def _read_ledger(dest: Path, header: Header, master: Secret) -> dict[str, FileEntry]:
    """What earlier live passes into ``dest`` hashed (nothing if absent or not authentic)."""
    try:
        with open_under(dest, LEDGER_NAME) as fd:
            data = read_bounded(fd, LEDGER_NAME, MANIFEST_MAX)
    except (MissingObject, DamagedFile, StorageError):
        return {}
    return parse_ledger(data, header.volume_id, header.volume_keys(master))


def _copy(
    backing: Path, dest: Path | None, name: str, summary: Summary, known: FileEntry | None
) -> FileEntry:
    """One file of the final bundle, copied into ``dest`` (if given) and hashed. An object
    (``known`` is None for metadata files, which change) that ``dest`` already holds with the
    length the source has is not copied again, and not even read if a live pass noted its
    hash (objects never change under their name); one no pass noted (its pass was
    interrupted before it saved the ledger) is kept only if it hashes like the source."""
    size = size_under(backing, name)
    entry: FileEntry | None = None
    held = dest is not None and name.startswith("objects/") and size_under(dest, name) == size
    if held and dest is not None and size is not None:
        vouched = known is not None and known.size == size
        entry = known if vouched else _verified_copy(backing, dest, name, summary)
    if entry is None:
        if dest is None:
            size, digest = hash_under(backing, name)
            summary.bytes_hashed += size
        else:
            size, digest = copy_hashed(backing, dest, name, write=not summary.dry_run)
            summary.objects_copied += name.startswith("objects/")
            summary.bytes_copied += size
        entry = FileEntry(name, size, digest)
    summary.bytes_total += entry.size
    return entry


def _header_entry(raw: bytes, dest: Path | None, summary: Summary) -> FileEntry:
    """The header's entry: the bytes unlocked, written into ``dest`` (if given, and not a
    dry run) and hashed."""
    if dest is None:
        summary.bytes_hashed += len(raw)
    else:
        summary.bytes_copied += len(raw)
    size, digest = write_hashed(
        io.BytesIO(raw).read, None if dest is None or summary.dry_run else dest, HEADER_NAME
    )
    summary.bytes_total += size
    return FileEntry(HEADER_NAME, size, digest)


def _verified_copy(backing: Path, dest: Path, name: str, summary: Summary) -> FileEntry | None:
    """The entry of ``name`` if the copy ``dest`` holds (one no ledger vouches for) hashes
    like the source; None if it must be copied again."""
    size, digest = hash_under(backing, name)
    summary.bytes_hashed += size
    if not holds_copy(dest, name, size, digest):
        return None
    summary.files_reused += 1
    summary.bytes_reused += size
    return FileEntry(name, size, digest)
