"""``sealfs luks export`` / ``import`` on real image files: a LUKS2 volume moved as a bundle.

The data area of the exported image is filled with random bytes (what ciphertext looks like)
except for one chunk left zero, so both kinds of manifest entry are exercised. The open after
an import needs device-mapper and runs in the VM (tests/luks/dm); here ``check-key`` (real
cryptsetup) proves the key still opens the imported header.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sealfs import failpoints
from sealfs.luks import profile as P
from sealfs.tarstream import RECORD, TarWriter
from tests.conftest import sealfs_measured
from tests.hostile_stream import HOSTILE, assert_refused, pax_bomb, relay

from . import attacker as A
from .conftest import IMAGE_SIZE, REPO, Golden, clone, new_image, sealfs_cli, write_key

MIB = 1024 * 1024
CHUNKS = (IMAGE_SIZE - P.DATA_OFFSET) // MIB  # with --chunk-mib 1
ZERO_CHUNK = 5


@pytest.fixture
def volume(golden_plain: Golden, tmp_path: Path) -> Path:
    """A formatted image whose data area is random except chunk ZERO_CHUNK."""
    img = clone(golden_plain, tmp_path / "src.img")
    with open(img, "r+b") as f:
        for index in range(CHUNKS):
            if index != ZERO_CHUNK:
                f.seek(P.DATA_OFFSET + index * MIB)
                f.write(os.urandom(MIB))
    return img


@pytest.fixture
def bundle(volume: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    res = sealfs_cli("luks", "export", str(volume), str(dest), "--chunk-mib", "1", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["chunks"] == CHUNKS and out["written"] == CHUNKS - 1
    return dest


def import_json(bundle: Path, target: Path, *extra: str) -> dict[str, Any]:
    res = sealfs_cli("luks", "import", str(bundle), str(target), "--json", *extra)
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def test_roundtrip_every_byte_equal(
    volume: Path, bundle: Path, golden_plain: Golden, tmp_path: Path
) -> None:
    assert not (bundle / "chunks" / f"{ZERO_CHUNK:08d}").exists()  # zero chunks take no space
    manifest_sha = json.loads(
        sealfs_cli("luks", "export", str(volume), str(tmp_path / "b2"), "--json").stdout
    )["manifest_sha256"]
    assert len(manifest_sha) == 64
    target = tmp_path / "new.img"
    out = import_json(bundle, target)
    assert out["written"] == CHUNKS - 1 and out["skipped"] == 1  # the zero chunk: already zero
    assert target.read_bytes() == volume.read_bytes()
    assert target.stat().st_mode & 0o777 == 0o600
    key = write_key(tmp_path / "k", golden_plain.key)
    res = sealfs_cli("luks", "check-key", str(target), "--key-file", str(key))
    assert res.returncode == 0, res.stderr
    # A rerun is a verification: nothing written.
    again = import_json(bundle, target, "--manifest-sha256", out["manifest_sha256"])
    assert again["written"] == 0 and again["skipped"] == CHUNKS
    # An existing blank image of the same size is a fine target too.
    blank = new_image(tmp_path / "blank.img")
    import_json(bundle, blank)
    assert blank.read_bytes() == volume.read_bytes()


def test_export_refusals(golden_plain: Golden, tmp_path: Path) -> None:
    img = clone(golden_plain, tmp_path / "v.img")
    (tmp_path / "exists").mkdir()
    res = sealfs_cli("luks", "export", str(img), str(tmp_path / "exists"))
    assert res.returncode == 2 and "already exists" in res.stderr
    res = sealfs_cli("luks", "export", str(img), str(tmp_path / "b"), "--recovery-slot")
    assert res.returncode == 10 and not (tmp_path / "b").exists()
    A.edit_json(img, lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"))
    res = sealfs_cli("luks", "export", str(img), str(tmp_path / "b"))
    assert res.returncode == 10 and "cipher_null" in res.stderr
    assert not (tmp_path / "b").exists()


def _rehash_manifest(bundle: Path, **changes: Any) -> None:
    """What an attacker who edits the bundle consistently does: fix the manifest hashes."""
    import hashlib

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["header_sha256"] = hashlib.sha256((bundle / "header.bin").read_bytes()).hexdigest()
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _flip_chunk_byte(b: Path) -> None:
    path = b / "chunks" / "00000003"
    data = bytearray(path.read_bytes())
    data[1234] ^= 1
    path.write_bytes(data)


def _swap_chunks(b: Path) -> None:
    one, two = b / "chunks" / "00000001", b / "chunks" / "00000002"
    tmp = b / "tmp"
    one.rename(tmp)
    two.rename(one)
    tmp.rename(two)


def _edit_manifest_size(b: Path) -> None:
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["image_size"] += P.SECTOR_SIZE
    (b / "manifest.json").write_text(json.dumps(manifest))


def _zero_a_chunk_in_manifest(b: Path) -> None:
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["chunks"][0] = {"zero": True}
    (b / "manifest.json").write_text(json.dumps(manifest))


def _cipher_null_header(b: Path) -> None:
    A.edit_json(b / "header.bin", lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"))
    _rehash_manifest(b)


def _fifo_chunk(b: Path) -> None:
    """A chunk replaced by a FIFO nobody writes to: opening it must not wait forever."""
    path = b / "chunks" / "00000002"
    path.unlink()
    os.mkfifo(path)


def _symlinked_manifest(b: Path) -> None:
    """The manifest replaced by a symlink out of the bundle (to a FIFO, which would hang)."""
    os.mkfifo(b.parent / "outside")
    (b / "manifest.json").unlink()
    (b / "manifest.json").symlink_to(b.parent / "outside")


ATTACKS = {
    "chunk is a FIFO": (_fifo_chunk, 5, "not a regular file"),
    "manifest is a symlink": (_symlinked_manifest, 5, "not a regular file"),
    "flipped chunk byte": (_flip_chunk_byte, 5, "chunk 3 does not match"),
    "dropped chunk": (lambda b: (b / "chunks" / "00000007").unlink(), 5, "missing"),
    "truncated chunk": (lambda b: os.truncate(b / "chunks" / "00000004", 1000), 5, "1000 bytes"),
    "reordered chunks": (_swap_chunks, 5, "chunk 1 does not match"),
    "manifest image size": (_edit_manifest_size, 5, "chunk entries"),
    "manifest says zero": (_zero_a_chunk_in_manifest, 5, "lists chunk 0 as all zero"),
    "manifest dropped": (lambda b: (b / "manifest.json").unlink(), 5, "missing"),
    "header edited": (lambda b: A.edit_binary(b / "header.bin", 208, b"x"), 5, "header.bin"),
    "crafted cipher_null header": (_cipher_null_header, 10, "cipher_null"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_tampered_bundle_refused_target_untouched(
    bundle: Path, tmp_path: Path, attack: str
) -> None:
    tamper, code, message = ATTACKS[attack]
    tamper(bundle)
    for target in (tmp_path / "absent.img", new_image(tmp_path / "blank.img")):
        res = sealfs_cli("luks", "import", str(bundle), str(target))
        assert res.returncode == code, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "absent.img").exists()  # never created
    assert not any((tmp_path / "blank.img").read_bytes())  # never written


def test_manifest_pinned_by_its_hash(bundle: Path, tmp_path: Path) -> None:
    """An attacker who rewrites chunk *and* manifest consistently passes the per-chunk check;
    the manifest SHA-256 the operator carried over from the export does not."""
    import hashlib

    _flip_chunk_byte(bundle)

    manifest = json.loads((bundle / "manifest.json").read_text())
    original = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    data = (bundle / "chunks" / "00000003").read_bytes()
    manifest["chunks"][3] = {"sha256": hashlib.sha256(data).hexdigest()}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    target = tmp_path / "t.img"
    res = sealfs_cli("luks", "import", str(bundle), str(target), "--manifest-sha256", original)
    assert res.returncode == 5 and "manifest SHA-256" in res.stderr
    assert not target.exists()
    # Without the pin the consistent rewrite goes through (docs/luks.md says so): what is
    # left is dm-integrity, or XTS turning the changed ciphertext into garbage plaintext.
    assert sealfs_cli("luks", "import", str(bundle), str(target)).returncode == 0


def test_target_refusals(bundle: Path, golden_plain: Golden, tmp_path: Path) -> None:
    other = clone(golden_plain, tmp_path / "other.img")  # another volume (same header, too)
    with open(other, "r+b") as f:
        f.seek(P.DATA_OFFSET)
        f.write(b"other data")
    before = other.read_bytes()
    res = sealfs_cli("luks", "import", str(bundle), str(other))
    # Same header as the bundle (a clone of one golden image), different data: a finished
    # import that was used since, which is never written to.
    assert res.returncode == 10 and "refusing to write into it" in res.stderr
    assert other.read_bytes() == before
    foreign = new_image(tmp_path / "foreign.img")
    with open(foreign, "r+b") as f:
        f.write(b"an ext4 superblock, say")
    res = sealfs_cli("luks", "import", str(bundle), str(foreign))
    assert res.returncode == 10 and "not blank" in res.stderr
    small = new_image(tmp_path / "small.img", IMAGE_SIZE - MIB)
    res = sealfs_cli("luks", "import", str(bundle), str(small))
    assert res.returncode == 2 and "same size" in res.stderr
    assert not any(small.read_bytes())


def test_interrupted_import_resumes(volume: Path, bundle: Path, tmp_path: Path) -> None:
    """Kill the import after every chunk it writes: each rerun goes one chunk further, the
    target never holds a header before the end, and the last run finishes it."""
    target = tmp_path / "t.img"
    crash = {failpoints.ENV: "luks:bundle-chunk-written"}
    for killed in range(CHUNKS - 1):
        res = sealfs_cli("luks", "import", str(bundle), str(target), env=crash)
        assert res.returncode == -9, (killed, res.stderr)
        assert not any(A.read_region(target))  # nothing that opens: no header yet
        assert sealfs_cli("luks", "status", str(target)).returncode == 10
    out = import_json(bundle, target)  # nothing left to write: commits the header
    assert out["written"] == 0 and out["skipped"] == CHUNKS
    assert target.read_bytes() == volume.read_bytes()


@pytest.mark.parametrize("point", ["header-body-written", "header-secondary-magic-written"])
def test_import_killed_while_committing_the_header(
    volume: Path, bundle: Path, tmp_path: Path, point: str
) -> None:
    target = tmp_path / "t.img"
    res = sealfs_cli(
        "luks", "import", str(bundle), str(target), env={failpoints.ENV: f"luks:{point}"}
    )
    assert res.returncode == -9
    import_json(bundle, target)
    assert target.read_bytes() == volume.read_bytes()


def test_bundle_copied_elsewhere_still_imports(bundle: Path, volume: Path, tmp_path: Path) -> None:
    """The bundle is location-independent (relative names only): copy it, import the copy."""
    copy = tmp_path / "carried"
    shutil.copytree(bundle, copy)
    target = tmp_path / "t.img"
    import_json(copy, target)
    assert target.read_bytes() == volume.read_bytes()


# -- the stream form (export DEVICE - | import - DEVICE) ---------------------------------------


def stream_export(volume: Path, out: Path) -> subprocess.CompletedProcess[bytes]:
    with open(out, "wb") as f:
        return subprocess.run(
            [sys.executable, "-m", "sealfs", "luks", "export", str(volume), "-"]
            + ["--chunk-mib", "1", "--json"],
            stdout=f,
            stderr=subprocess.PIPE,
            cwd=REPO,
            timeout=120,
            check=False,
        )


def stream_import(stream: Path, target: Path) -> subprocess.CompletedProcess[bytes]:
    with open(stream, "rb") as f:
        return subprocess.run(
            [sys.executable, "-m", "sealfs", "luks", "import", "-", str(target), "--json"],
            stdin=f,
            capture_output=True,
            cwd=REPO,
            timeout=120,
            check=False,
        )


def test_stream_roundtrip_same_manifest(volume: Path, bundle: Path, tmp_path: Path) -> None:
    stream = tmp_path / "stream.tar"
    res = stream_export(volume, stream)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stderr)  # stdout carries the stream
    assert (bundle / "manifest.json").read_bytes() == _stream_member(stream, "manifest.json")
    target = tmp_path / "t.img"
    res = stream_import(stream, target)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["manifest_sha256"] == summary["manifest_sha256"]
    assert target.read_bytes() == volume.read_bytes()


def _stream_member(stream: Path, name: str) -> bytes:
    import tarfile

    with tarfile.open(stream) as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def _member_offset(stream: Path, name: str) -> int:
    import tarfile

    with tarfile.open(stream) as tar:
        return tar.getmember(name).offset_data


def test_stream_damaged_midway_stops_before_the_header_and_resumes(
    volume: Path, tmp_path: Path
) -> None:
    """A chunk that does not match, or a stream cut short: the chunks before it are written,
    the header is not (nothing opens); a good stream then resumes."""
    good = tmp_path / "good.tar"
    assert stream_export(volume, good).returncode == 0
    data = bytearray(good.read_bytes())
    bad = tmp_path / "bad.tar"
    data[_member_offset(good, "chunks/00000008") + 77] ^= 1
    bad.write_bytes(data)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[: _member_offset(good, "chunks/00000010") + 1000])
    target = tmp_path / "t.img"
    for broken, message in ((bad, "chunk 8 does not match"), (cut, "cut short")):
        res = stream_import(broken, target)
        assert res.returncode == 5 and message in res.stdout.decode(), res.stdout  # --json
        assert not any(A.read_region(target))  # no header: nothing opens
    res = stream_import(good, target)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["skipped"] >= 8  # chunks 0-7 were already in place
    assert target.read_bytes() == volume.read_bytes()


def test_stream_crafted_header_refused_before_any_write(volume: Path, tmp_path: Path) -> None:
    A.edit_json(volume, lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"))
    # The exporting side refuses it too; build the stream the way a host would instead.
    stream = tmp_path / "evil.tar"
    res = stream_export(volume, stream)
    assert res.returncode == 10
    import hashlib
    import io
    import tarfile

    region = bytes(A.read_region(volume))
    manifest = {
        "format": "sealfs-luks-bundle",
        "version": 1,
        "uuid": "refused before the uuid is compared",
        "image_size": IMAGE_SIZE,
        "chunk_size": MIB,
        "header_sha256": hashlib.sha256(region).hexdigest(),
        "chunks": [{"zero": True}] * CHUNKS,
    }
    with tarfile.open(stream, "w") as tar:
        for name, blob in (
            ("manifest.json", json.dumps(manifest).encode()),
            ("header.bin", region),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    target = tmp_path / "t.img"
    res = stream_import(stream, target)
    assert res.returncode == 10 and "cipher_null" in res.stdout.decode()
    assert not target.exists()


def test_stream_is_standard_tar(volume: Path, tmp_path: Path) -> None:
    stream = tmp_path / "stream.tar"
    assert stream_export(volume, stream).returncode == 0
    listing = subprocess.run(["tar", "-tf", str(stream)], capture_output=True, check=True)
    names = listing.stdout.decode().split()
    assert names[:2] == ["manifest.json", "header.bin"] and listing.stderr == b""
    assert names[2:] == [f"chunks/{i:08d}" for i in range(CHUNKS) if i != ZERO_CHUNK]


def _stream_of(manifest: dict[str, Any], region: bytes, out: Path) -> Path:
    """A stream holding ``manifest`` and the header ``region``, and no chunk."""
    with open(out, "wb") as f:
        tar = TarWriter(f)
        tar.add_bytes("manifest.json", json.dumps(manifest).encode())
        tar.add_bytes("header.bin", region)
        tar.close()
    return out


def test_claimed_image_size_bounded_before_any_write(bundle: Path, tmp_path: Path) -> None:
    """Without --manifest-sha256 the image size is the host's word: a size beyond the sane
    maximum, beyond the free space for a new image file, or other than an existing target's
    is refused before anything is created or written."""
    manifest = json.loads((bundle / "manifest.json").read_bytes())
    region = (bundle / "header.bin").read_bytes()
    gib = 1 << 30

    def claiming(size: int) -> dict[str, Any]:
        chunks = [{"zero": True}] * -(-(size - P.DATA_OFFSET) // gib)
        return {**manifest, "image_size": size, "chunk_size": gib, "chunks": chunks}

    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    target = tmp_path / "new.img"
    for size, code, message in (
        ((1 << 50) + gib, 5, "bad image_size"),
        (P.DATA_OFFSET + (free // gib + 2) * gib, 7, "refusing before writing anything"),
    ):
        stream = _stream_of(claiming(size), region, tmp_path / "evil.tar")
        res = stream_import(stream, target)
        assert res.returncode == code and message in res.stdout.decode(), res.stdout
        assert not target.exists()
        res = sealfs_cli(
            "luks", "import", str(_as_dir(claiming(size), region, tmp_path)), str(target)
        )
        assert res.returncode == code and message in res.stderr, res.stderr
        assert not target.exists()
    existing = new_image(tmp_path / "existing.img")
    stream = _stream_of(claiming(IMAGE_SIZE + gib), region, tmp_path / "evil.tar")
    res = stream_import(stream, existing)
    assert res.returncode == 2 and "same size" in res.stdout.decode()
    assert existing.stat().st_size == IMAGE_SIZE and not any(existing.read_bytes())


def _as_dir(manifest: dict[str, Any], region: bytes, tmp_path: Path) -> Path:
    """The same claim as a bundle directory."""
    dest = tmp_path / "evil-bundle"
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "chunks").mkdir(parents=True)
    (dest / "manifest.json").write_bytes(json.dumps(manifest).encode())
    (dest / "header.bin").write_bytes(region)
    return dest


def test_stream_pax_bomb_refused_with_bounded_memory(tmp_path: Path) -> None:
    target = tmp_path / "t.img"
    with pax_bomb(300 * MIB) as stream:
        res = sealfs_measured("luks", "import", "-", str(target), stdin=stream)
    assert res.returncode == 5 and res.stderr.count("\n") == 1, res.stderr
    assert "pax header of 314572800 bytes" in res.stderr
    assert res.max_rss_mib < 100, res.max_rss_mib
    assert not target.exists()


def _export_argv(volume: Path) -> list[str]:
    return [sys.executable, "-m", "sealfs", "luks", "export", str(volume), "-", "--chunk-mib", "1"]


def _import_argv(target: Path) -> list[str]:
    return [sys.executable, "-m", "sealfs", "luks", "import", "-", str(target)]


def test_stream_cut_by_a_relay_resumes(volume: Path, tmp_path: Path) -> None:
    """A real export piped into a real import through a relay that forwards N bytes and
    closes (N from a seeded RNG): refused in one line with no header written (nothing opens),
    and the whole stream then finishes the image."""

    whole = tmp_path / "whole.tar"
    assert stream_export(volume, whole).returncode == 0
    size = whole.stat().st_size
    target = tmp_path / "t.img"
    rng = random.Random(12)
    for cut in sorted(rng.sample(range(1, size - RECORD - 1024), 4)):
        code, err, _ = relay(_export_argv(volume), _import_argv(target), cut, REPO)
        assert code == 5 and err.count("\n") == 1 and "cut short" in err, (cut, err)
        assert not target.exists() or not any(A.read_region(target))
    code, err, _ = relay(_export_argv(volume), _import_argv(target), None, REPO)
    assert code == 0, err
    assert target.read_bytes() == volume.read_bytes()


@pytest.mark.parametrize(("stream", "message"), HOSTILE)
def test_hostile_stream_refused_target_untouched(
    stream: bytes, message: str, tmp_path: Path
) -> None:
    blank = new_image(tmp_path / "blank.img")
    for target in (tmp_path / "new.img", blank):
        assert_refused(_import_argv(target), stream, message, REPO)
    assert not (tmp_path / "new.img").exists()
    assert blank.stat().st_size == IMAGE_SIZE and not any(blank.read_bytes())
