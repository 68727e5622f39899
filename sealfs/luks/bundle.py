"""Move a LUKS2 volume between hosts as a bundle: validated header, data chunks, manifest.

A bundle is a directory::

    manifest.json        what follows, with a SHA-256 per piece (written last)
    header.bin           the 16 MiB header region, validated on export and again on import
    chunks/00000000 ...  the data area (DATA_OFFSET to the end) in fixed-size chunks;
                         an all-zero chunk is listed in the manifest but has no file

The manifest is not signed: the bundle only ever carries ciphertext and a header whose key
slots are protected by their passphrases, so the manifest protects against transport damage and
partial tampering, and its own SHA-256 (printed by export, checked by ``import
--manifest-sha256``) lets the operator pin the whole bundle out of band. docs/luks.md says what
that does and does not protect.

Import never leaves something that looks like a volume until every byte is in place: the whole
bundle is verified before the target is touched, chunks are written next (each re-verified as it
is written), and the header goes last, magic-last (:func:`~sealfs.luks.device.commit_header`).
A rerun skips chunks the target already holds (same SHA-256), so an interrupted import resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sealfs import failpoints, strict
from sealfs.errors import IntegrityError, LuksError, StorageError, UsageError
from sealfs.meter import Meter as Meter  # luks.stream takes it from here
from sealfs.meter import NoMeter as NoMeter

from . import header as H
from . import profile as P
from .device import (
    DeviceState,
    check_device_path,
    classify,
    commit_header,
    pwrite_all,
    read_exact,
    with_magics,
)
from .device import device_size as get_device_size
from .volume import validated_snapshot

FORMAT = "sealfs-luks-bundle"
VERSION = 1
MANIFEST = "manifest.json"
HEADER = "header.bin"
CHUNKS = "chunks"
DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024
#: Chunk sizes a manifest may name: whole sectors, and small enough to hold one in memory.
CHUNK_SIZE_RANGE = (P.SECTOR_SIZE, 1024 * 1024 * 1024)
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: The largest image a manifest may name (1 PiB): an unpinned manifest is the host's word,
#: and import reads (and hashes) the whole image, zero chunks too.
MAX_IMAGE_SIZE = 1 << 50


@dataclass(frozen=True)
class Manifest:
    """The checked contents of manifest.json."""

    uuid: str
    image_size: int
    chunk_size: int
    header_sha256: str
    #: Per chunk: its SHA-256 (hex), or None for an all-zero chunk (no file in the bundle).
    chunks: tuple[str | None, ...]

    @property
    def data_size(self) -> int:
        return self.image_size - P.DATA_OFFSET

    def chunk_span(self, index: int) -> tuple[int, int]:
        """Device offset and length of chunk ``index``."""
        start = index * self.chunk_size
        return P.DATA_OFFSET + start, min(self.chunk_size, self.data_size - start)

    def expected(self, index: int) -> str:
        """The SHA-256 chunk ``index`` must have (an all-zero chunk's is computed)."""
        digest = self.chunks[index]
        return digest if digest is not None else sha256_hex(bytes(self.chunk_span(index)[1]))

    def to_json(self) -> bytes:
        return (
            json.dumps(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "uuid": self.uuid,
                    "image_size": self.image_size,
                    "chunk_size": self.chunk_size,
                    "header_sha256": self.header_sha256,
                    "chunks": [{"zero": True} if c is None else {"sha256": c} for c in self.chunks],
                },
                indent=1,
            ).encode()
            + b"\n"
        )


@dataclass(frozen=True)
class BundleResult:
    """What export or import did (the CLI's summary)."""

    device: str
    bundle: str
    uuid: str
    image_size: int
    chunks: int
    #: Chunks with data (export: files written; import: chunks the target needed).
    written: int
    #: Import only: chunks the target already held (a resumed import).
    skipped: int
    manifest_sha256: str

    @classmethod
    def of_import(
        cls, device: str, source: str, manifest: Manifest, written: int, skipped: int, sha: str
    ) -> BundleResult:
        return cls(
            device,
            source,
            manifest.uuid,
            manifest.image_size,
            len(manifest.chunks),
            written,
            skipped,
            sha,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "bundle": self.bundle,
            "uuid": self.uuid,
            "image_size": self.image_size,
            "chunks": self.chunks,
            "written": self.written,
            "skipped": self.skipped,
            "manifest_sha256": self.manifest_sha256,
        }


def chunk_count(image_size: int, chunk_size: int) -> int:
    return -(-(image_size - P.DATA_OFFSET) // chunk_size)


# -- export ------------------------------------------------------------------------------------


def export_volume(
    device: str,
    dest: str,
    profile: P.LuksProfile,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    meter: Meter | None = None,
) -> BundleResult:
    """Write ``device`` (header validated against ``profile``) as a new bundle at ``dest``.

    The volume must not be in use: a block device is opened exclusively (refused while mapped
    or mounted); an image file cannot be checked, so do not export one a VM is running on. The
    header is captured again at the end and must be unchanged.
    """
    region, size, info = validated_source(device, profile, chunk_size)
    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        raise UsageError(f"{dest} already exists; export needs a new directory") from None
    except OSError as e:
        raise StorageError(f"{dest}: {e.strerror}") from None
    os.mkdir(os.path.join(dest, CHUNKS), 0o700)
    _write_new(os.path.join(dest, HEADER), region)
    digests: list[str | None] = []
    for index, data in device_chunks(device, size, chunk_size, meter or NoMeter(), "export"):
        digests.append(sha256_hex(data) if any(data) else None)
        if digests[-1] is not None:
            _write_new(os.path.join(dest, CHUNKS, chunk_name(index)), data)
    check_header_unchanged(device, region)
    manifest = Manifest(info.uuid, size, chunk_size, sha256_hex(region), tuple(digests))
    text = manifest.to_json()
    tmp = os.path.join(dest, MANIFEST + ".tmp")
    _write_new(tmp, text)
    os.rename(tmp, os.path.join(dest, MANIFEST))
    _fsync_dir(dest)
    return BundleResult(
        device,
        dest,
        info.uuid,
        size,
        len(digests),
        sum(d is not None for d in digests),
        0,
        sha256_hex(text),
    )


def validated_source(
    device: str, profile: P.LuksProfile, chunk_size: int
) -> tuple[bytes, int, H.HeaderInfo]:
    """The header region of the volume to export (validated for ``profile``), its size and
    header facts; a chunk size export cannot use is refused first."""
    if not (CHUNK_SIZE_RANGE[0] <= chunk_size <= CHUNK_SIZE_RANGE[1]) or (
        chunk_size % P.SECTOR_SIZE
    ):
        raise UsageError(f"chunk size {chunk_size}: use a multiple of {P.SECTOR_SIZE} up to 1 GiB")
    snap, info = validated_snapshot(device, profile)
    with snap:
        return snap.read(), snap.device_size, info


def device_chunks(
    device: str, size: int, chunk_size: int, meter: Meter, phase: str
) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of every data chunk, in order, with ``device`` held open exclusively
    (a block device cannot be mapped or mounted meanwhile)."""
    meter.start(phase, size - P.DATA_OFFSET, chunk_count(size, chunk_size))
    with _open_device(device, os.O_RDONLY):
        for index in range(chunk_count(size, chunk_size)):
            offset = P.DATA_OFFSET + index * chunk_size
            data = read_exact(device, offset, min(chunk_size, size - offset))
            yield index, data
            meter.advance(len(data), 1)
    meter.finish()


def check_header_unchanged(device: str, region: bytes) -> None:
    if read_exact(device, 0, P.DATA_OFFSET) != region:
        raise LuksError(f"{device}: the header changed during the export; is the volume in use?")


# -- import ------------------------------------------------------------------------------------


def import_volume(
    source: str,
    device: str,
    profile: P.LuksProfile,
    *,
    manifest_sha256: str | None = None,
    meter: Meter | None = None,
) -> BundleResult:
    """Verify the bundle at ``source`` completely, then write it onto ``device``.

    ``device`` is an existing block device or image file of exactly the exported size, or a
    path where a new image file is created. Its header region must be blank, or already hold
    this bundle's header (a finished or crash-interrupted import): an import never overwrites
    another volume.
    """
    if not os.path.isdir(source):
        raise UsageError(f"{source}: no such bundle directory")
    text = _read_file(os.path.join(source, MANIFEST), MAX_MANIFEST_BYTES, "manifest")
    region = _read_file(os.path.join(source, HEADER), P.DATA_OFFSET, "header")
    manifest = verified_manifest(source, text, region, profile, manifest_sha256)
    _check_target_fits(device, manifest.image_size)
    meter = meter or NoMeter()
    meter.start("verify bundle", manifest.data_size, len(manifest.chunks))
    for index in range(len(manifest.chunks)):  # all of it checks out before anything is written
        meter.advance(len(_bundle_chunk(source, manifest, index)), 1)
    meter.finish()
    written, skipped = write_chunks(
        device, manifest, region, profile, lambda i: _bundle_chunk(source, manifest, i), meter
    )
    return BundleResult.of_import(device, source, manifest, written, skipped, sha256_hex(text))


def verified_manifest(
    source: str,
    text: bytes,
    region: bytes,
    profile: P.LuksProfile,
    manifest_sha256: str | None,
) -> Manifest:
    """The manifest of a bundle, refused unless the manifest has the pinned hash
    (if given) and is well-formed, and the header matches it and validates for ``profile``."""
    text_sha = sha256_hex(text)
    if manifest_sha256 is not None and text_sha != manifest_sha256.lower():
        raise IntegrityError(
            f"{source}: manifest SHA-256 is {text_sha}, not the expected {manifest_sha256}"
        )
    manifest = parse_manifest(text)
    if sha256_hex(region) != manifest.header_sha256:
        raise IntegrityError(f"{source}: {HEADER} does not match the manifest")
    info = H.validate_header_area(region, manifest.image_size, profile)
    if info.uuid != manifest.uuid:
        raise IntegrityError(
            f"{source}: header is volume {info.uuid}, manifest says {manifest.uuid}"
        )
    return manifest


def write_chunks(
    device: str,
    manifest: Manifest,
    region: bytes,
    profile: P.LuksProfile,
    chunk: Callable[[int], bytes],
    meter: Meter,
) -> tuple[int, int]:
    """Bring ``device`` to the bundle's contents: every chunk it lacks from ``chunk(index)``
    (which returns verified bytes; called in index order, only for chunks the target lacks),
    then the header, magic-last. Returns (chunks written, chunks already in place)."""
    finished = _prepare_target(device, manifest, region, profile)
    written = skipped = 0
    meter.start("import", manifest.data_size, len(manifest.chunks))
    with _open_device(device, os.O_RDONLY if finished else os.O_RDWR) as fd:
        for index in range(len(manifest.chunks)):
            offset, length = manifest.chunk_span(index)
            if sha256_hex(read_exact(device, offset, length)) == manifest.expected(index):
                skipped += 1
            elif finished:
                raise LuksError(
                    f"{device} already holds this volume, but chunk {index} differs from the "
                    "bundle (used since the import?); refusing to write into it"
                )
            else:
                _write_at(fd, device, chunk(index), offset)
                written += 1
                failpoints.reached("luks:bundle-chunk-written")
            meter.advance(length, 1)
        if not finished:
            _fsync(fd, device)
    meter.finish()
    if not finished:
        commit_header(device, region)
    return written, skipped


def parse_manifest(text: bytes) -> Manifest:
    """The manifest, refused (IntegrityError) unless every field is exactly as export writes."""
    try:
        obj = strict.loads(text)
    except ValueError as e:
        raise IntegrityError(f"manifest is not valid JSON: {e}") from None
    keys = {"format", "version", "uuid", "image_size", "chunk_size", "header_sha256", "chunks"}
    if not isinstance(obj, dict) or set(obj) != keys:
        raise IntegrityError(f"manifest must have exactly the fields {', '.join(sorted(keys))}")
    if obj["format"] != FORMAT or obj["version"] != VERSION:
        raise IntegrityError(f"not a {FORMAT} version {VERSION} manifest")
    if not isinstance(obj["uuid"], str) or not 0 < len(obj["uuid"]) <= 40:
        raise IntegrityError("manifest: bad uuid")
    size, chunk = obj["image_size"], obj["chunk_size"]
    if not strict.integer_in(size, P.DATA_OFFSET + P.SECTOR_SIZE, MAX_IMAGE_SIZE) or (
        (size - P.DATA_OFFSET) % P.SECTOR_SIZE
    ):
        raise IntegrityError("manifest: bad image_size")
    if not strict.integer_in(chunk, *CHUNK_SIZE_RANGE) or chunk % P.SECTOR_SIZE:
        raise IntegrityError("manifest: bad chunk_size")
    entries = obj["chunks"]
    if not isinstance(entries, list) or len(entries) != chunk_count(size, chunk):
        raise IntegrityError(
            f"manifest: {size} bytes in chunks of {chunk} need "
            f"{chunk_count(size, chunk)} chunk entries"
        )
    return Manifest(
        obj["uuid"],
        size,
        chunk,
        _digest(obj["header_sha256"], "header_sha256"),
        tuple(_chunk_entry(e, i) for i, e in enumerate(entries)),
    )


def _chunk_entry(entry: Any, index: int) -> str | None:
    if entry == {"zero": True}:
        return None
    if not isinstance(entry, dict) or set(entry) != {"sha256"}:
        raise IntegrityError(
            f"manifest: chunk {index} must be {{'sha256': HEX}} or {{'zero': true}}"
        )
    return _digest(entry["sha256"], f"chunk {index}")


def _digest(value: Any, name: str) -> str:
    try:
        strict.hex_bytes(value, 32, 32)
    except ValueError as e:
        raise IntegrityError(f"manifest: {name} {e}") from None
    return str(value).lower()


def _bundle_chunk(source: str, manifest: Manifest, index: int) -> bytes:
    """Chunk ``index`` from the bundle, refused unless it has the manifest's size and hash."""
    length = manifest.chunk_span(index)[1]
    path = os.path.join(source, CHUNKS, chunk_name(index))
    if manifest.chunks[index] is None:
        if os.path.lexists(path):
            raise IntegrityError(f"{path}: the manifest lists chunk {index} as all zero")
        return bytes(length)
    data = _read_file(path, length, f"chunk {index}")
    if sha256_hex(data) != manifest.chunks[index]:
        raise IntegrityError(f"{path}: chunk {index} does not match the manifest")
    return data


def _prepare_target(device: str, manifest: Manifest, region: bytes, profile: P.LuksProfile) -> bool:
    """Create a missing image file; refuse a target of the wrong size or holding another
    header. Blank, or this very header still without its magics (an import interrupted while
    committing it), are fine; True if the target already holds the committed header (a
    finished import, which is only verified, never written to)."""
    if not _check_target_fits(device, manifest.image_size):
        try:
            fd = os.open(device, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"{device}: cannot create: {e.strerror}") from None
        try:
            os.ftruncate(fd, manifest.image_size)
        except OSError as e:
            raise StorageError(f"{device}: {e.strerror}") from None
        finally:
            os.close(fd)
        return False
    current = read_exact(device, 0, P.DATA_OFFSET)
    if current == region:
        return True
    if with_magics(current) == region:
        return False
    if classify(current, manifest.image_size, profile) is not DeviceState.BLANK:
        raise LuksError(
            f"{device} is not blank and does not hold this volume's header; "
            "refusing to import over it"
        )
    return False


def _check_target_fits(device: str, image_size: int) -> bool:
    """Refuse, before anything is written, a target the bundle's image does not fit: an
    existing device or image file must have exactly ``image_size`` bytes, and a new image
    file must fit the free space of the filesystem it would be created on (the size is the
    host's word unless the manifest is pinned, and an import fills the whole image in the
    end). True if ``device`` exists."""
    if os.path.lexists(device):
        check_device_path(device)
        size = get_device_size(device)
        if size != image_size:
            raise UsageError(
                f"{device} has {size} bytes, the exported volume {image_size}: "
                "the target must be exactly the same size"
            )
        return True
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(device)))
    except OSError as e:
        raise StorageError(f"{device}: cannot create: {e.strerror}") from None
    free = st.f_bavail * st.f_frsize
    if image_size > free:
        raise StorageError(
            f"{device}: the bundle's image is {image_size} bytes, its filesystem has {free} "
            "bytes free; refusing before writing anything"
        )
    return False


# -- small file helpers ------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunk_name(index: int) -> str:
    return f"{index:08d}"


class _open_device:
    """A device or image file descriptor as a context manager (O_EXCL on a block device, so
    one that is mapped or mounted is refused)."""

    def __init__(self, device: str, mode: int) -> None:
        flags = mode | os.O_CLOEXEC
        try:
            if stat.S_ISBLK(os.stat(device).st_mode):
                flags |= os.O_EXCL
            self.fd = os.open(device, flags)
        except OSError as e:
            raise StorageError(f"{device}: cannot open: {e.strerror}") from None

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _write_at(fd: int, path: str, data: bytes, offset: int) -> None:
    try:
        pwrite_all(fd, data, offset)
    except OSError as e:
        raise StorageError(f"{path}: write failed at {offset}: {e.strerror}") from None


def _fsync(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise StorageError(f"{path}: fsync failed: {e.strerror}") from None


def _write_new(path: str, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StorageError(f"{path}: cannot create: {e.strerror}") from None
    try:
        _write_at(fd, path, data, 0)
        _fsync(fd, path)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync(fd, path)
    finally:
        os.close(fd)


def _read_file(path: str, length: int, what: str) -> bytes:
    """A bundle file of exactly ``length`` bytes (at most, for the manifest). The bundle is
    the host's: a symlink, FIFO or device in it is refused, never followed or waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: {what} is missing from the bundle") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IntegrityError(f"{path}: {what} is not a regular file") from None
        raise StorageError(f"{path}: {e.strerror}") from None
    try:
        with open(fd, "rb", closefd=False) as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IntegrityError(f"{path}: {what} is not a regular file")
            data = f.read(length + 1)
    except OSError as e:
        raise StorageError(f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > length or (len(data) < length and what != "manifest"):
        raise IntegrityError(f"{path}: {what} is {len(data)} bytes, expected {length}")
    return data
