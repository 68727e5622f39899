"""A bundle as one stream (``sealfs luks export DEVICE -`` / ``import - DEVICE``): for a pipe
such as ``ssh newhost sealfs luks import - /dev/vdb``, with no room for a bundle directory.

The stream is a POSIX tar archive (:mod:`sealfs.tarstream`) of the bundle's files in a fixed order: ``manifest.json``
first, then ``header.bin``, then the non-zero ``chunks/NNNNNNNN`` in index order. The manifest
comes first so that the importer knows every hash before any data arrives; export therefore
reads the device twice (hash, then send), and refuses if a chunk changed in between. Import
checks the manifest and validates the header before it touches the target, then checks each
chunk as it arrives and writes it; a stream that goes bad in the middle stops the import with
the chunks before it written and no header (nothing opens), and a rerun resumes.
"""

from __future__ import annotations

from typing import IO

from sealfs.errors import IntegrityError, LuksError
from sealfs.tarstream import TarReader, TarWriter

from . import profile as P
from .bundle import (
    CHUNKS,
    HEADER,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    BundleResult,
    Manifest,
    Meter,
    NoMeter,
    check_header_unchanged,
    chunk_name,
    device_chunks,
    sha256_hex,
    validated_source,
    verified_manifest,
    write_chunks,
)

STDIO = "-"


def export_stream(
    device: str,
    out: IO[bytes],
    profile: P.LuksProfile,
    *,
    chunk_size: int,
    meter: Meter | None = None,
) -> BundleResult:
    """Write ``device`` as a bundle stream to ``out`` (see the module docstring)."""
    meter = meter or NoMeter()
    region, size, info = validated_source(device, profile, chunk_size)
    digests = tuple(
        sha256_hex(data) if any(data) else None
        for _, data in device_chunks(device, size, chunk_size, meter, "hash")
    )
    text = Manifest(info.uuid, size, chunk_size, sha256_hex(region), digests).to_json()
    tar = TarWriter(out)
    tar.add_bytes(MANIFEST, text)
    tar.add_bytes(HEADER, region)
    for index, data in device_chunks(device, size, chunk_size, meter, "export"):
        if (sha256_hex(data) if any(data) else None) != digests[index]:
            raise LuksError(f"{device}: chunk {index} changed during the export; in use?")
        if digests[index] is not None:
            tar.add_bytes(f"{CHUNKS}/{chunk_name(index)}", data)
    tar.close()
    check_header_unchanged(device, region)
    written = sum(d is not None for d in digests)
    return BundleResult(device, STDIO, info.uuid, size, len(digests), written, 0, sha256_hex(text))


def import_stream(
    stream: IO[bytes],
    device: str,
    profile: P.LuksProfile,
    *,
    manifest_sha256: str | None = None,
    meter: Meter | None = None,
) -> BundleResult:
    """Write a bundle stream onto ``device`` (same target rules as a bundle directory)."""
    members = _Members(TarReader(stream.read))
    text = members.next(MANIFEST, MAX_MANIFEST_BYTES, exact=False)
    region = members.next(HEADER, P.DATA_OFFSET)
    manifest = verified_manifest(STDIO, text, region, profile, manifest_sha256)
    present = [i for i, d in enumerate(manifest.chunks) if d is not None]
    position = {index: n for n, index in enumerate(present)}

    def chunk(index: int) -> bytes:
        """Chunk ``index`` from the stream, checked (the ones before it are read and
        checked on the way, also those the target holds already)."""
        if index not in position:
            return bytes(manifest.chunk_span(index)[1])
        while members.chunks_read <= position[index]:
            members.next_chunk(manifest, present[members.chunks_read])
        return members.last

    written, skipped = write_chunks(device, manifest, region, profile, chunk, meter or NoMeter())
    while members.chunks_read < len(present):  # the rest of the stream must be sound too
        members.next_chunk(manifest, present[members.chunks_read])
    members.end()
    return BundleResult.of_import(device, STDIO, manifest, written, skipped, sha256_hex(text))


class _Members:
    """The stream's members in the one order export writes them; anything else is refused."""

    def __init__(self, tar: TarReader) -> None:
        self.tar = tar
        self.chunks_read = 0
        self.last = b""

    def next(self, name: str, length: int, *, exact: bool = True) -> bytes:
        member = self.tar.next()
        if member is None:
            raise IntegrityError(f"bundle stream ended before {name}")
        if member.name != name:
            raise IntegrityError(f"bundle stream: expected {name}, found {member.name}")
        if member.size > length or (exact and member.size != length):
            raise IntegrityError(f"bundle stream: {name} is {member.size} bytes")
        return member.read_all()

    def next_chunk(self, manifest: Manifest, index: int) -> None:
        data = self.next(f"{CHUNKS}/{chunk_name(index)}", manifest.chunk_span(index)[1])
        if sha256_hex(data) != manifest.chunks[index]:
            raise IntegrityError(f"bundle stream: chunk {index} does not match the manifest")
        self.chunks_read += 1
        self.last = data

    def end(self) -> None:
        extra = self.tar.next()
        if extra is not None:
            raise IntegrityError(f"bundle stream: unexpected {extra.name} after the last chunk")
