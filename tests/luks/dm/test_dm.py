"""Real device-mapper: open, close, integrity, the validated-header open, crafted headers and
first-boot crash points, end to end with dm-crypt / dm-integrity (inside the test VM)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sealfs import failpoints
from sealfs.crypto import Secret
from sealfs.errors import LuksError, StorageError, UnlockError
from sealfs.luks import cryptsetup as cs
from sealfs.luks import header as H
from sealfs.luks import profile as P
from sealfs.luks.firstboot import CRASH_POINTS, VolumeSpec, bring_down, bring_up, mapping_state
from sealfs.luks.keys import KeyBinding, KeyFileSource
from sealfs.luks.state import read_record
from sealfs.luks.volume import format_volume, open_volume, validated_snapshot

from .. import attacker as A
from ..conftest import FAST_RECOVERY, REPO, new_image, write_key
from .conftest import HAVE_DM, SKIP_REASON, cleanup_mapping, drop_caches

if not HAVE_DM:
    pytest.skip(SKIP_REASON, allow_module_level=True)

MARKER = b"SEALFS-PLAINTEXT-MARKER-" * 170  # 4080 bytes: one recognisable sector
#: Small images keep emulated I/O (and the dm-integrity wipe) short: 16 MiB header + 8 MiB data.
VM_IMAGE = 24 * 1024 * 1024
BINDING = KeyBinding("vm-tests", "vol-1")


def key_source(tmp_path: Path, key: bytes | None = None) -> tuple[KeyFileSource, bytes]:
    key = key if key is not None else os.urandom(32)
    return KeyFileSource(str(write_key(tmp_path / "kms.key", key))), key


def raw_contains(path: Path | str, needle: bytes) -> bool:
    with open(path, "rb") as f:
        f.seek(P.DATA_OFFSET)
        return needle in f.read()


def write_sector(device: str, data: bytes, offset: int = 0) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data.ljust(4096, b"\0"), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def active_cipher(name: str) -> str:
    status = cs.mapping_status(name)
    assert status is not None
    return status["cipher"]


# -- the headline attack -------------------------------------------------------------------


def test_unvalidated_cipher_null_header_maps_plaintext(
    tmp_path: Path, mapping_names: list[str]
) -> None:
    """What happens without validation: the host edits the segment cipher of the CVM's own
    volume to cipher_null; the CVM's real key still opens it; every write lands in plaintext.
    sealfs refuses the same header before cryptsetup sees it."""
    img = new_image(tmp_path / "victim.img", VM_IMAGE)
    key = os.urandom(32)
    format_volume(str(img), Secret(key), P.LuksProfile())
    A.edit_json(img, lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"))

    # A naive init: `cryptsetup open` straight from the disk, as dstack did before its fix.
    mapping_names.append("naive")
    res = A.cryptsetup("open", "--key-file=-", str(img), "naive", key=key)
    assert res.returncode == 0, res.stderr
    assert active_cipher("naive") == "cipher_null-ecb"
    write_sector("/dev/mapper/naive", MARKER)
    subprocess.run(["cryptsetup", "close", "naive"], check=True)
    assert raw_contains(img, MARKER), "cipher_null mapping should have written plaintext"

    # sealfs on the same disk: refused, nothing mapped.
    with pytest.raises(H.HeaderRefused, match="cipher_null"):
        open_volume(str(img), "guarded", Secret(key), P.LuksProfile())
    assert not os.path.exists("/dev/mapper/guarded")


def test_validated_copy_defeats_header_swap(tmp_path: Path, mapping_names: list[str]) -> None:
    """Time of check vs time of use: the host swaps in a cipher_null header right after
    validation. cryptsetup opens the sealed in-memory copy, so the mapping stays aes-xts and
    nothing reaches the disk in plaintext."""
    img = new_image(tmp_path / "swap.img", VM_IMAGE)
    key = os.urandom(32)
    format_volume(str(img), Secret(key), P.LuksProfile())
    snap, _ = validated_snapshot(str(img), P.LuksProfile())
    with snap:
        A.edit_json(img, lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"))
        assert A.cryptsetup_json(img)["segments"]["0"]["encryption"] == "cipher_null-ecb"
        mapping_names.append("swap")
        cs.open_mapping(snap, str(img), "swap", Secret(key), P.KMS_KEYSLOT)
    assert active_cipher("swap") == P.CIPHER
    write_sector("/dev/mapper/swap", MARKER)
    subprocess.run(["cryptsetup", "close", "swap"], check=True)
    assert not raw_contains(img, MARKER)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"), "cipher_null"),
        (
            lambda m: m["tokens"].update(
                {"0": {"type": "luks2-keyring", "keyslots": ["0"], "key_description": "x"}}
            ),
            "tokens",
        ),
    ],
    ids=["cipher-null", "token"],
)
def test_crafted_headers_never_mapped(
    tmp_path: Path, edit: object, reason: str, mapping_names: list[str]
) -> None:
    img = new_image(tmp_path / "c.img", VM_IMAGE)
    key = os.urandom(32)
    format_volume(str(img), Secret(key), P.LuksProfile())
    A.edit_json(img, edit)  # type: ignore[arg-type]
    assert A.cryptsetup_unlocks(img, key)  # cryptsetup would have opened every one of these
    mapping_names.append("crafted")
    with pytest.raises(H.HeaderRefused, match=reason):
        open_volume(str(img), "crafted", Secret(key), P.LuksProfile())
    assert cs.mapping_status("crafted") is None


# -- open / close / keys ---------------------------------------------------------------------


def test_open_close_and_ciphertext_on_disk(tmp_path: Path, mapping_names: list[str]) -> None:
    img = new_image(tmp_path / "v.img", VM_IMAGE)
    key = os.urandom(32)
    format_volume(str(img), Secret(key), P.LuksProfile())
    mapping_names.append("v")
    open_volume(str(img), "v", Secret(key), P.LuksProfile())
    status = cs.mapping_status("v")
    assert status is not None
    assert status["cipher"] == P.CIPHER and status["sector_size"] == "4096"
    assert status["integrity"] == "none"
    write_sector("/dev/mapper/v", MARKER, 8192)
    with pytest.raises(LuksError, match="already exists"):
        open_volume(str(img), "v", Secret(key), P.LuksProfile())
    subprocess.run(["cryptsetup", "close", "v"], check=True)
    assert not raw_contains(img, MARKER)
    with pytest.raises(UnlockError):
        open_volume(str(img), "v", Secret(os.urandom(32)), P.LuksProfile())
    assert cs.mapping_status("v") is None


def test_recovery_slot_opens_the_same_data(tmp_path: Path, mapping_names: list[str]) -> None:
    img = new_image(tmp_path / "r.img", VM_IMAGE)
    key, recovery = os.urandom(32), b"recovery words for the vm test"
    profile = P.LuksProfile(recovery_slot=True)
    format_volume(
        str(img), Secret(key), profile, recovery=Secret(recovery), recovery_cost=FAST_RECOVERY
    )
    mapping_names.append("r")
    open_volume(str(img), "r", Secret(key), profile)
    write_sector("/dev/mapper/r", MARKER)
    subprocess.run(["cryptsetup", "close", "r"], check=True)
    open_volume(str(img), "r", Secret(recovery), profile, keyslot=P.RECOVERY_KEYSLOT)
    with open("/dev/mapper/r", "rb") as f:
        assert f.read(len(MARKER)) == MARKER


# -- integrity ---------------------------------------------------------------------------------


def _flip_changed_blocks(img: Path, before: bytes) -> int:
    """The host's edit: flip one byte in every 4 KiB block of the data area that the last
    session changed (data, and with integrity also its tag and journal copy). The LUKS header
    and the dm-integrity superblock are left alone so that the volume still opens."""
    after = img.read_bytes()
    flipped = 0
    with open(img, "r+b") as f:
        for off in range(P.DATA_OFFSET + 4096, len(after), 4096):
            if before[off : off + 4096] != after[off : off + 4096]:
                f.seek(off + 2048)
                f.write(bytes([after[off + 2048] ^ 0x40]))
                flipped += 1
    return flipped


@pytest.mark.parametrize("integrity", ["hmac-sha256", None], ids=["integrity", "xts-only"])
def test_tampered_sector(tmp_path: Path, integrity: str | None, mapping_names: list[str]) -> None:
    """With dm-integrity a modified sector reads as EIO; with XTS alone it reads as garbage
    (the documented limit of block mode without integrity)."""
    img = new_image(tmp_path / "t.img", VM_IMAGE)
    keys, _ = key_source(tmp_path)
    spec = VolumeSpec(str(img), "tamper", BINDING, P.LuksProfile(integrity=integrity), fs="none")
    mapping_names.append("tamper")
    assert bring_up(spec, keys).steps == ["formatted", "opened", "ready"]
    status = cs.mapping_status("tamper")
    assert status is not None and status["sector_size"] == "4096"
    if integrity:
        assert status["cipher"] == "capi:authenc(hmac(sha256),xts(aes))-plain64"
        assert status["integrity"].startswith("hmac(sha256)")
    bring_down("tamper")
    drop_caches()
    before = img.read_bytes()
    bring_up(spec, keys)
    data = os.urandom(4096)
    write_sector("/dev/mapper/tamper", data, 8192)
    bring_down("tamper")
    drop_caches()
    assert _flip_changed_blocks(img, before) >= 1
    assert bring_up(spec, keys).steps == ["opened"]
    fd = os.open("/dev/mapper/tamper", os.O_RDONLY | os.O_DIRECT)
    page = mmap.mmap(-1, 4096)  # page-aligned buffer for O_DIRECT: no page cache involved
    try:
        if integrity:
            with pytest.raises(OSError) as e:
                os.preadv(fd, [page], 8192)
            # dm-integrity fails the read: EILSEQ for direct I/O on 6.x kernels, EIO elsewhere.
            assert e.value.errno in (errno.EIO, errno.EILSEQ)
        else:
            assert os.preadv(fd, [page], 8192) == 4096
            assert bytes(page) != data  # silently wrong bytes: XTS alone cannot tell
    finally:
        os.close(fd)
    bring_down("tamper")


def test_integrity_with_ext4_roundtrip(tmp_path: Path, mapping_names: list[str]) -> None:
    img = new_image(tmp_path / "ie.img", VM_IMAGE)
    keys, _ = key_source(tmp_path)
    spec = VolumeSpec(
        str(img),
        "ie",
        BINDING,
        P.LuksProfile(integrity="hmac-sha256"),
        mountpoint=str(tmp_path / "mnt"),
    )
    mapping_names.append("ie")
    up = bring_up(spec, keys)
    assert up.steps == ["formatted", "opened", "mkfs", "mounted", "ready"]
    payload = os.urandom(300_000)
    (tmp_path / "mnt" / "db").write_bytes(payload)
    bring_down("ie")
    drop_caches()
    assert bring_up(spec, keys).steps == ["opened", "mounted"]
    assert (tmp_path / "mnt" / "db").read_bytes() == payload
    bring_down("ie")


def test_bundle_moves_a_volume(tmp_path: Path, mapping_names: list[str]) -> None:
    """Export a used volume (ext4 with a file), import it as a new image on "the other host",
    and bring that up with the same key: same file. The import never leaves a header before
    the data (tests/luks/test_bundle.py covers the refusals on image files)."""
    from sealfs.luks.bundle import export_volume, import_volume

    img = new_image(tmp_path / "from.img", VM_IMAGE)
    keys, _ = key_source(tmp_path)
    spec = VolumeSpec(str(img), "mv", BINDING, mountpoint=str(tmp_path / "mnt"))
    mapping_names.append("mv")
    bring_up(spec, keys)
    payload = os.urandom(300_000)
    (tmp_path / "mnt" / "db").write_bytes(payload)
    bring_down("mv")
    export_volume(str(img), str(tmp_path / "bundle"), P.LuksProfile(), chunk_size=1024 * 1024)
    moved = tmp_path / "to.img"
    import_volume(str(tmp_path / "bundle"), str(moved), P.LuksProfile())
    assert moved.read_bytes() == img.read_bytes()
    drop_caches()
    spec = VolumeSpec(str(moved), "mv", BINDING, mountpoint=str(tmp_path / "mnt"))
    assert bring_up(spec, keys).steps == ["opened", "mounted"]
    assert (tmp_path / "mnt" / "db").read_bytes() == payload
    bring_down("mv")


# -- first boot ------------------------------------------------------------------------------


def _crash_at(point: str, spec: VolumeSpec, keys: KeyFileSource) -> None:
    """Run bring_up in a forked child that SIGKILLs itself at ``point``."""
    pid = os.fork()
    if pid == 0:  # child: crash at the named point (or exit 3 if it is never reached)
        os.environ[failpoints.ENV] = f"luks:{point}"
        try:
            bring_up(spec, keys)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"crash point {point} was not reached"
    )


EXPECTED_AFTER_CRASH = {
    # point reached before the kill -> steps of the next, successful boot
    "header-body-written": ["format-completed", "opened", "mkfs", "mounted", "ready"],
    "header-secondary-magic-written": ["format-completed", "opened", "mkfs", "mounted", "ready"],
    "header-committed": ["opened", "mkfs", "mounted", "ready"],
    "opened": ["opened", "mkfs", "mounted", "ready"],
    "mkfs-done": ["opened", "mkfs", "mounted", "ready"],
    "mounted": ["opened", "mkfs", "mounted", "ready"],
    "ready-written": ["opened", "mounted"],
}


@pytest.mark.parametrize("point", list(EXPECTED_AFTER_CRASH))
def test_first_boot_crash_points(tmp_path: Path, point: str, mapping_names: list[str]) -> None:
    assert set(EXPECTED_AFTER_CRASH) == set(CRASH_POINTS)
    img = new_image(tmp_path / "fb.img", VM_IMAGE)
    keys, _ = key_source(tmp_path)
    spec = VolumeSpec(str(img), "fb", BINDING, mountpoint=str(tmp_path / "mnt"))
    mapping_names.append("fb")
    _crash_at(point, spec, keys)
    cleanup_mapping("fb")  # the "reboot"
    up = bring_up(spec, keys)
    assert up.steps == EXPECTED_AFTER_CRASH[point]
    (tmp_path / "mnt" / "app-data").write_text("written after first boot")
    bring_down("fb")
    if point in ("mounted", "ready-written"):  # the two sides of the commit point
        # Every later boot: ready, data kept, nothing re-created.
        up = bring_up(spec, keys)
        assert up.steps == ["opened", "mounted"]
        assert (tmp_path / "mnt" / "app-data").read_text() == "written after first boot"
        bring_down("fb")


def test_initialized_volume_is_never_reformatted(tmp_path: Path, mapping_names: list[str]) -> None:
    """A ready volume whose file system no longer mounts (here: superblock destroyed) is
    refused, not re-created: the data behind it stays for fsck."""
    img = new_image(tmp_path / "d.img", VM_IMAGE)
    keys, _ = key_source(tmp_path)
    spec = VolumeSpec(str(img), "dmg", BINDING, mountpoint=str(tmp_path / "mnt"))
    mapping_names.append("dmg")
    bring_up(spec, keys)
    (tmp_path / "mnt" / "precious").write_bytes(b"x" * 100_000)
    bring_down("dmg")
    with open(img, "r+b") as f:  # garbage over the first data sector (ext4 superblock)
        f.seek(P.DATA_OFFSET)
        f.write(os.urandom(4096))
    snapshot = img.read_bytes()
    drop_caches()
    with pytest.raises(StorageError, match="never reformats"):
        bring_up(spec, keys)
    assert cs.mapping_status("dmg") is None  # cleaned up after the failure
    assert img.read_bytes() == snapshot


def test_foreign_disk_is_not_formatted(tmp_path: Path) -> None:
    img = new_image(tmp_path / "f.img", VM_IMAGE)
    with open(img, "r+b") as f:
        f.write(os.urandom(8192))
    keys, _ = key_source(tmp_path)
    spec = VolumeSpec(str(img), "foreign", BINDING, mountpoint=str(tmp_path / "mnt"))
    with pytest.raises(LuksError, match="refusing to format"):
        bring_up(spec, keys)


def test_volume_of_another_identity_refused(tmp_path: Path, mapping_names: list[str]) -> None:
    img = new_image(tmp_path / "o.img", VM_IMAGE)
    keys, _ = key_source(tmp_path)
    mapping_names.append("own")
    bring_up(VolumeSpec(str(img), "own", BINDING, fs="none"), keys)
    bring_down("own")
    other = VolumeSpec(str(img), "own", KeyBinding("vm-tests", "vol-2"), fs="none")
    with pytest.raises(LuksError, match="initialized for app"):
        bring_up(other, keys)
    assert cs.mapping_status("own") is None


# -- the real command line and the shell entry point on the virtio disk ----------------------


def test_virtio_disk_with_shell_entry_point_and_cli(
    tmp_path: Path, mapping_names: list[str]
) -> None:
    disk = os.environ.get("SEALFS_VM_DISK")
    if not disk:
        pytest.skip("no virtio disk given (SEALFS_VM_DISK)")
    key = write_key(tmp_path / "kms.key", os.urandom(32))
    mnt = tmp_path / "data"
    env = {
        "PATH": os.environ["PATH"],
        "SEALFS_PYTHON": sys.executable,
        "SEALFS_KEY_FILE": str(key),
        "SEALFS_VOLUME_ID": "db",
        "SEALFS_INTEGRITY": "none",
    }
    tool = str(REPO / "tools" / "sealfs-luks")
    mapping_names.append("db")
    write_sector(disk, bytes(4096) * 8)  # a blank disk, even if this test ran before

    res = subprocess.run(
        ["sh", tool, "up", disk, "db", str(mnt)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "formatted" in res.stdout and "mkfs" in res.stdout
    (mnt / "table").write_bytes(MARKER)
    res = subprocess.run(
        ["sh", tool, "down", "db"], env=env, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    drop_caches()
    assert not raw_contains(disk, MARKER)

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sealfs",
            "luks",
            "up",
            disk,
            "db",
            "--key-file",
            str(key),
            "--volume-id",
            "db",
            "--mountpoint",
            str(mnt),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["steps"] == ["opened", "mounted"]
    assert (mnt / "table").read_bytes() == MARKER
    state = mapping_state("db")
    assert state["state"] == "ready" and state["mountpoints"] == [str(mnt)]
    assert read_record("/dev/mapper/db") is not None
    assert bring_down("db") == [str(mnt)]
    assert cs.mapping_status("db") is None
