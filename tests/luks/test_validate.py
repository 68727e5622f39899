"""Header validation and format behaviour on real image files (no device-mapper needed)."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from sealfs import failpoints
from sealfs.crypto import Secret
from sealfs.errors import LuksError, UnlockError, UsageError
from sealfs.luks import header as H
from sealfs.luks import profile as P
from sealfs.luks.cryptsetup import device_mapper_available
from sealfs.luks.device import DeviceState, probe
from sealfs.luks.snapshot import HeaderSnapshot
from sealfs.luks.volume import (
    check_volume_key,
    format_volume,
    header_backup,
    header_restore,
    inspect_device,
    validated_snapshot,
)

from . import attacker as A
from .conftest import IMAGE_SIZE, Golden, clone, new_image


def test_sealfs_header_accepted(golden_plain: Golden) -> None:
    region = bytes(A.read_region(golden_plain.path))
    info = H.validate_header_area(region, IMAGE_SIZE, P.LuksProfile())
    assert info.keyslots == (0,)
    assert info.data_offset == P.DATA_OFFSET and info.data_size == IMAGE_SIZE - P.DATA_OFFSET
    meta = A.cryptsetup_json(golden_plain.path)
    assert meta["segments"]["0"]["encryption"] == "aes-xts-plain64"
    assert meta["segments"]["0"]["sector_size"] == 4096
    assert (
        meta["keyslots"]["0"]["key_size"] == 64
        and meta["keyslots"]["0"]["kdf"]["type"] == "argon2id"
    )


def test_recovery_slot_accepted_and_both_keys_unlock(golden_recovery: Golden) -> None:
    profile = golden_recovery.profile
    info = check_volume_key(str(golden_recovery.path), Secret(golden_recovery.key), profile)
    assert info.keyslots == (0, 1)
    assert golden_recovery.recovery is not None
    check_volume_key(
        str(golden_recovery.path), Secret(golden_recovery.recovery), profile, keyslot=1
    )
    # Each key opens its own slot only.
    with pytest.raises(UnlockError):
        check_volume_key(str(golden_recovery.path), Secret(golden_recovery.key), profile, keyslot=1)


def test_wrong_key_is_an_unlock_error(golden_plain: Golden) -> None:
    with pytest.raises(UnlockError, match="no key slot opened"):
        check_volume_key(str(golden_plain.path), Secret(os.urandom(32)), P.LuksProfile())


@pytest.mark.parametrize(
    "extra",
    [
        # dstack's shape: pbkdf2, 512-byte sectors.
        ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "512"],
        # Right cipher, but 256-bit XTS (AES-128).
        ["--key-size", "256", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32"],
        # Bigger metadata area (a legitimate cryptsetup option).
        ["--luks2-metadata-size", "32768", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32"],
    ],
    ids=["dstack-shape", "xts-256", "metadata-32k"],
)
def test_other_cryptsetup_shapes_refused(tmp_path: Path, extra: list[str]) -> None:
    """Real headers cryptsetup makes with other options are not sealfs's shape."""
    img = new_image(tmp_path / "other.img")
    res = A.cryptsetup(
        "luksFormat",
        "--type",
        "luks2",
        "--batch-mode",
        "--key-file=-",
        "--pbkdf",
        "argon2id",
        *extra,
        str(img),
        key=b"k" * 32,
    )
    assert res.returncode == 0, res.stderr
    with pytest.raises(H.HeaderRefused):
        H.validate_header_area(bytes(A.read_region(img)), IMAGE_SIZE, P.LuksProfile())


def test_luks1_refused(tmp_path: Path) -> None:
    img = new_image(tmp_path / "luks1.img")
    res = A.cryptsetup(
        "luksFormat",
        "--type",
        "luks1",
        "--batch-mode",
        "--key-file=-",
        "--pbkdf-force-iterations",
        "1000",
        str(img),
        key=b"k" * 32,
    )
    assert res.returncode == 0, res.stderr
    report = inspect_device(str(img), P.LuksProfile())
    assert report.state == "luks" and not report.valid


def test_device_must_match_the_segment(golden_plain: Golden, tmp_path: Path) -> None:
    region = bytes(A.read_region(golden_plain.path))
    with pytest.raises(H.HeaderRefused, match="no room"):
        H.validate_header_area(region, P.DATA_OFFSET, P.LuksProfile())
    with pytest.raises(H.HeaderRefused, match="not a multiple"):
        H.validate_header_area(region, IMAGE_SIZE + 512, P.LuksProfile())


def test_snapshot_is_sealed_against_the_host(disk: Path, golden_plain: Golden) -> None:
    """Check-then-use: after capture, changing the disk cannot change what gets opened."""
    snap, _ = validated_snapshot(str(disk), P.LuksProfile())
    with snap:
        before = snap.read()
        A.edit_json(disk, lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"))
        assert A.read_region(disk) != before
        assert snap.read() == before
        with pytest.raises(OSError) as e:
            os.pwrite(snap.fd, b"x", 0)
        assert e.value.errno == errno.EPERM
        H.validate_header_area(snap.read(), snap.device_size, P.LuksProfile())


def test_format_refuses_existing_header(disk: Path) -> None:
    with pytest.raises(LuksError, match="already holds a LUKS header"):
        format_volume(str(disk), Secret(b"k" * 32), P.LuksProfile())


def test_format_refuses_foreign_data(tmp_path: Path) -> None:
    img = new_image(tmp_path / "ext4.img")
    res = os.system(f"mkfs.ext4 -q -F {img} >/dev/null 2>&1")
    assert res == 0
    assert probe(str(img), P.LuksProfile()) is DeviceState.FOREIGN
    with pytest.raises(LuksError, match="not blank"):
        format_volume(str(img), Secret(b"k" * 32), P.LuksProfile())


def test_format_checks_recovery_arguments(tmp_path: Path) -> None:
    img = new_image(tmp_path / "x.img")
    with pytest.raises(UsageError):
        format_volume(str(img), Secret(b"k" * 32), P.LuksProfile(recovery_slot=True))


def test_format_leaves_the_data_area_alone(golden_plain: Golden) -> None:
    with open(golden_plain.path, "rb") as f:
        f.seek(P.DATA_OFFSET)
        assert not any(f.read())


def test_too_small_device(tmp_path: Path) -> None:
    img = new_image(tmp_path / "tiny.img", P.DATA_OFFSET)
    with pytest.raises(UsageError, match="too small"):
        format_volume(str(img), Secret(b"k" * 32), P.LuksProfile())


def test_integrity_without_device_mapper_is_one_clear_error(tmp_path: Path) -> None:
    if device_mapper_available():
        pytest.skip("this kernel has device-mapper")
    img = new_image(tmp_path / "i.img")
    with pytest.raises(LuksError) as e:
        format_volume(str(img), Secret(b"k" * 32), P.LuksProfile(integrity="hmac-sha256"))
    assert "device-mapper is not available" in str(e.value)
    assert "\n" not in str(e.value)
    assert probe(str(img), P.LuksProfile()) is DeviceState.BLANK


def test_header_backup_and_restore(disk: Path, golden_plain: Golden, tmp_path: Path) -> None:
    backup = tmp_path / "hdr.backup"
    info = header_backup(str(disk), str(backup), P.LuksProfile())
    assert backup.stat().st_mode & 0o777 == 0o600
    assert backup.stat().st_size == P.DATA_OFFSET
    with pytest.raises(UsageError, match="already exists"):
        header_backup(str(disk), str(backup), P.LuksProfile())
    # The host destroys the header: restore brings the volume back.
    region = A.read_region(disk)
    region[: 2 * A.HDR_SIZE] = os.urandom(2 * A.HDR_SIZE)
    A.write_region(disk, region)
    assert probe(str(disk), P.LuksProfile()) is DeviceState.FOREIGN
    restored = header_restore(str(disk), str(backup), P.LuksProfile())
    assert restored.uuid == info.uuid
    check_volume_key(str(disk), Secret(golden_plain.key), P.LuksProfile())


def test_restore_refuses_to_replace_a_valid_header(
    disk: Path, tmp_path: Path, golden_recovery: Golden
) -> None:
    other = clone(golden_recovery, tmp_path / "other.img")
    backup = tmp_path / "other.backup"
    header_backup(str(other), str(backup), golden_recovery.profile)
    with pytest.raises(H.HeaderRefused):  # the backup is not of this profile
        header_restore(str(disk), str(backup), P.LuksProfile())
    own = tmp_path / "own.backup"
    header_backup(str(disk), str(own), P.LuksProfile())
    with pytest.raises(LuksError, match="valid header already"):
        header_restore(str(disk), str(own), P.LuksProfile())


def test_restore_refuses_a_crafted_backup(disk: Path, tmp_path: Path) -> None:
    backup = tmp_path / "hdr.backup"
    header_backup(str(disk), str(backup), P.LuksProfile())
    A.edit_json(backup, lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"))
    before = A.read_region(disk)
    with pytest.raises(H.HeaderRefused, match="cipher_null"):
        header_restore(str(disk), str(backup), P.LuksProfile(), force=True)
    assert A.read_region(disk) == before


def test_snapshot_from_bytes_rejects_wrong_size() -> None:
    with pytest.raises(LuksError):
        HeaderSnapshot.from_bytes(b"short", 1 << 30)


@pytest.mark.parametrize(
    "point", ["header-body-written", "header-secondary-magic-written", "header-committed"]
)
def test_format_crash_points(tmp_path: Path, point: str) -> None:
    """Kill a real format at each write of the header commit; the next run finishes or
    accepts it, and the key opens the result (the rest of first boot runs in the VM)."""
    img = new_image(tmp_path / "crash.img")
    key = os.urandom(32)
    pid = os.fork()
    if pid == 0:
        os.environ[failpoints.ENV] = f"luks:{point}"
        try:
            format_volume(str(img), Secret(key), P.LuksProfile())
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    expected = DeviceState.LUKS if point == "header-committed" else DeviceState.PENDING
    assert probe(str(img), P.LuksProfile()) is expected
    if point == "header-body-written":
        assert not A.cryptsetup_accepts(img)  # no magic at all: not a LUKS device yet
    if expected is DeviceState.PENDING:
        format_volume(str(img), Secret(os.urandom(32)), P.LuksProfile())  # finishes, no new key
    check_volume_key(str(img), Secret(key), P.LuksProfile())


def test_pending_header_with_damaged_body_is_foreign(disk: Path) -> None:
    region = A.read_region(disk)
    region[:6] = bytes(6)
    region[A.BIN_SIZE + 100] ^= 1
    A.write_region(disk, region)
    assert probe(str(disk), P.LuksProfile()) is DeviceState.FOREIGN
    with pytest.raises(LuksError, match="not blank"):
        format_volume(str(disk), Secret(b"k" * 32), P.LuksProfile())
