"""KMS-unlocked volumes, mounted for real: key release, and whole-volume rollback and fork
detection through the freshness anchor (a real KMS on 127.0.0.1, real FUSE mounts)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.backing import force_checkpoints, fsync_path, journal_generation
from tests.conftest import Volume, sealfs

from .conftest import APP_A, APP_B, COMPOSE_A, KmsProcess, KmsState, start_kms

pytestmark = pytest.mark.mount


def kms_args(
    kms: KmsProcess, app: bytes = APP_A, compose: bytes = COMPOSE_A, deadline: float = 5
) -> list[str]:
    return [
        "--kms",
        kms.url,
        "--app-id",
        app.hex(),
        "--attester",
        "simulated",
        "--compose-hash",
        compose.hex(),
        "--kms-deadline",
        str(deadline),
        "--kms-public-key",
        kms.public_key.hex(),
    ]


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
    return sealfs(
        "mount",
        str(vol.backing),
        str(vol.mnt),
        *kms_args(kms),
        "--log-file",
        str(vol.log),
        *extra,
        check=check,
    )


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
    res = sealfs(
        "mount", str(kvol.backing), str(kvol.mnt), *kms_args(kms, APP_B, bytes(32)), check=False
    )
    assert res.returncode in (3, 9), res.stderr
    assert not os.path.ismount(kvol.mnt)


def test_whole_volume_rollback_is_refused(kvol: Volume, kms: KmsProcess, tmp_path: Path) -> None:
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
    res = sealfs(
        "mount",
        str(kvol.backing),
        str(kvol.mnt),
        "--kms",
        "http://127.0.0.1:9",
        "--app-id",
        APP_A.hex(),
        "--attester",
        "simulated",
        "--compose-hash",
        COMPOSE_A.hex(),
        "--kms-deadline",
        "1",
        "--kms-public-key",
        "ab" * 32,
        check=False,
    )
    assert res.returncode == 8, res.stderr
    assert "not available" in res.stderr and "Traceback" not in res.stderr


def test_recovery_mount_leaves_the_volume_mountable_through_the_kms(
    kvol: Volume, kms: KmsProcess, tmp_path: Path
) -> None:
    """A key-file mount (no KMS) writes checkpoints past the anchored commit; they keep the
    heads back to it, so the next KMS mount and `check` both accept the volume; a rollback
    after that is still refused by both."""
    kmount(kvol, kms)
    (kvol.mnt / "f").write_text("written through the KMS")
    kvol.umount()
    kvol.mount()  # the recovery key file: the anchor cannot move
    assert force_checkpoints(kvol.mnt, kvol.backing, count=2)
    (kvol.mnt / "f").write_text("written with the recovery key")
    kvol.umount()
    old = tmp_path / "after-recovery"
    shutil.copytree(kvol.backing, old)
    sealfs("check", str(kvol.backing), *kms_args(kms))  # check: fresh (exit 0)...
    kmount(kvol, kms)  # ...and the mount agrees
    assert (kvol.mnt / "f").read_text() == "written with the recovery key"
    (kvol.mnt / "f").write_text("anchored again")
    kvol.umount()
    sealfs("check", str(kvol.backing), *kms_args(kms))
    shutil.rmtree(kvol.backing)
    shutil.copytree(old, kvol.backing)  # the host puts the recovery-era disk back
    res = kmount(kvol, kms, check=False)
    assert res.returncode == 5 and "rolled back" in res.stderr, res.stderr
    res = sealfs("check", str(kvol.backing), *kms_args(kms), "--json", check=False)
    assert res.returncode == 5 and "rolled" in res.stdout, res.stdout + res.stderr


def test_fsync_never_waits_for_an_unreachable_kms(kvol: Volume, state: KmsState) -> None:
    """The KMS goes away with a client deadline of 600 s: fsyncs keep completing, checkpoints
    included (anything that waited for the KMS would hang until pytest's timeout); when it
    comes back the unmount anchors the volume and the next KMS mount accepts it."""
    server = start_kms(state, "--allow-simulated", log_name="kms-outage.log")
    args = kms_args(server, deadline=600)
    try:
        sealfs("mount", str(kvol.backing), str(kvol.mnt), *args, "--log-file", str(kvol.log))
        (kvol.mnt / "f").write_text("before the outage")
        fsync_path(kvol.mnt / "f")
        server.stop()
        gen = journal_generation(kvol.backing)
        assert force_checkpoints(kvol.mnt, kvol.backing, count=2)  # all while the KMS is down
        assert journal_generation(kvol.backing) >= gen + 2
        server = start_kms(state, "--allow-simulated", log_name="kms-back.log", port=server.port)
        kvol.umount()
        sealfs("check", str(kvol.backing), *args)
        sealfs("mount", str(kvol.backing), str(kvol.mnt), *args)
        assert (kvol.mnt / "f").read_text() == "before the outage"
        kvol.umount()
    finally:
        server.stop()
