"""KMS-unlocked volumes, mounted for real: key release, and whole-volume rollback and fork
detection through the freshness anchor (a real KMS on 127.0.0.1, real FUSE mounts)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import Volume, sealfs

from .conftest import APP_A, APP_B, COMPOSE_A, KmsProcess

pytestmark = pytest.mark.mount


def kms_args(kms: KmsProcess, app: bytes = APP_A, compose: bytes = COMPOSE_A) -> list[str]:
    return ["--kms", kms.url, "--app-id", app.hex(), "--attester", "simulated",
            "--compose-hash", compose.hex(), "--kms-deadline", "5",
            "--kms-public-key", kms.public_key.hex()]


@pytest.fixture
def kvol(tmp_path: Path, kms: KmsProcess):  # type: ignore[no-untyped-def]
    base = tmp_path / "kv"
    base.mkdir()
    vol = Volume(base / "backing", base / "key", base / "mnt", base / "sealfs.log")
    vol.mnt.mkdir()
    vol.key.write_bytes(os.urandom(64))
    vol.key.chmod(0o600)
    sealfs("create", str(vol.backing), *kms_args(kms), "--key-file", str(vol.key))
    yield vol
    vol.force_unmount()


def kmount(vol: Volume, kms: KmsProcess, *extra: str, check: bool = True):  # type: ignore[no-untyped-def]
    return sealfs("mount", str(vol.backing), str(vol.mnt), *kms_args(kms), "--log-file",
                  str(vol.log), *extra, check=check)


def test_kms_slot_unlocks_and_info_shows_it(kvol: Volume, kms: KmsProcess) -> None:
    info = sealfs("info", str(kvol.backing), "--json").stdout
    assert '"type": "kms"' in info and APP_A.hex() in info
    kmount(kvol, kms)
    (kvol.mnt / "f").write_text("released by the KMS")
    kvol.umount()
    kmount(kvol, kms)
    assert (kvol.mnt / "f").read_text() == "released by the KMS"
    kvol.umount()
    sealfs("check", str(kvol.backing), *kms_args(kms))  # fresh and intact: exit 0


def test_other_app_cannot_unlock(kvol: Volume, kms: KmsProcess) -> None:
    res = sealfs("mount", str(kvol.backing), str(kvol.mnt),
                 *kms_args(kms, APP_B, bytes(32)), check=False)
    assert res.returncode in (3, 9), res.stderr
    assert not os.path.ismount(kvol.mnt)


def test_whole_volume_rollback_is_refused(kvol: Volume, kms: KmsProcess,
                                          tmp_path: Path) -> None:
    kmount(kvol, kms)
    (kvol.mnt / "balance").write_text("100")
    kvol.umount()
    old = tmp_path / "old-copy"
    shutil.copytree(kvol.backing, old)
    kmount(kvol, kms)
    (kvol.mnt / "balance").write_text("0")
    kvol.umount()
    shutil.rmtree(kvol.backing)
    shutil.copytree(old, kvol.backing)  # the host restores the old disk
    res = kmount(kvol, kms, check=False)
    assert res.returncode == 5, res.stderr
    assert "rolled back" in res.stderr
    assert not os.path.ismount(kvol.mnt)
    # an offline check with the KMS sees it too (and does not move the anchor)
    res = sealfs("check", str(kvol.backing), *kms_args(kms), "--json", check=False)
    assert res.returncode == 5 and "rolled" in res.stdout, res.stdout + res.stderr
    # the operator can override, and it is logged
    kmount(kvol, kms, "--allow-rollback")
    assert (kvol.mnt / "balance").read_text() == "100"
    kvol.umount()
    assert "OVERRIDE" in kvol.log_text()


def test_forked_clone_is_refused(kvol: Volume, kms: KmsProcess, tmp_path: Path) -> None:
    kmount(kvol, kms)
    (kvol.mnt / "f").write_text("shared history")
    kvol.umount()
    clone = Volume(tmp_path / "clone", kvol.key, tmp_path / "clone-mnt", tmp_path / "c.log")
    clone.mnt.mkdir()
    shutil.copytree(kvol.backing, clone.backing)
    # the clone lives on without the KMS (key file), reaching the same commit number...
    clone.mount()
    (clone.mnt / "f").write_text("the clone's own history")
    clone.umount()
    # ...while the original advances the anchor with different content
    kmount(kvol, kms)
    (kvol.mnt / "f").write_text("the original's history")
    kvol.umount()
    res = sealfs("mount", str(clone.backing), str(clone.mnt), *kms_args(kms), check=False)
    assert res.returncode == 5, res.stderr
    assert "forked" in res.stderr or "rolled back" in res.stderr
    assert not os.path.ismount(clone.mnt)


def test_kms_down_fails_with_clear_message(kvol: Volume, tmp_path: Path) -> None:
    res = sealfs("mount", str(kvol.backing), str(kvol.mnt), "--kms", "http://127.0.0.1:9",
                 "--app-id", APP_A.hex(), "--attester", "simulated", "--compose-hash",
                 COMPOSE_A.hex(), "--kms-deadline", "1", "--kms-public-key", "ab" * 32,
                 check=False)
    assert res.returncode == 8, res.stderr
    assert "not available" in res.stderr and "Traceback" not in res.stderr
