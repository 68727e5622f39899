"""`sealfs rekey` through a real KMS on 127.0.0.1: the kms slot is re-wrapped, the freshness
anchor advances past the re-key, and a copy of the disk from before it is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sealfs.kms.client import KmsClient
from sealfs.store import HEADER_NAME
from tests.backing import snapshot
from tests.conftest import Volume, new_volume, sealfs
from tests.mount.test_rekey import write_tree

from .conftest import APP_A, COMPOSE_A, KmsProcess, KmsState, attester, sim_policy
from .test_volume_anchor import kmount, kms_args, kvol  # noqa: F401 - kvol is a fixture

pytestmark = pytest.mark.mount


def anchored(kms: KmsProcess, vol: Volume) -> tuple[int, bytes]:
    vid = bytes.fromhex(json.loads(sealfs("info", str(vol.backing), "--json").stdout)["volume_id"])
    client = KmsClient(kms.url, APP_A, attester(APP_A), trusted_keys=[kms.public_key])
    return client.get_epoch(vid)


def test_rekey_through_the_kms_advances_the_anchor(
    kvol: Volume,  # noqa: F811 - the fixture
    kms: KmsProcess,
    tmp_path: Path,
) -> None:
    kmount(kvol, kms)
    write_tree(kvol.mnt)
    kvol.umount()
    kmount(kvol, kms)
    tree = snapshot(kvol.mnt)
    kvol.umount()
    before = anchored(kms, kvol)
    old_disk = tmp_path / "before-rekey"
    shutil.copytree(kvol.backing, old_disk)

    res = sealfs(
        "rekey", str(kvol.backing), *kms_args(kms), "--keep-key-file", str(kvol.key), "--json"
    )
    summary = json.loads(res.stdout)
    assert [s["type"] for s in summary["slots"]] == ["kms", "keyfile"]
    epoch, head = summary["anchor"]["epoch"], bytes.fromhex(summary["anchor"]["head"])
    assert epoch > before[0] and anchored(kms, kvol) == (epoch, head)

    sealfs("check", str(kvol.backing), *kms_args(kms))  # fresh and intact: exit 0
    sealfs("check", str(kvol.backing), "--key-file", str(kvol.key))  # re-wrapped too
    kmount(kvol, kms)
    assert snapshot(kvol.mnt) == tree
    kvol.umount()

    # the host puts back the whole disk from before the re-key (old header, old objects):
    # the KMS still releases the app key that opens its slot, but the anchor is past it
    shutil.rmtree(kvol.backing)
    shutil.copytree(old_disk, kvol.backing)
    res = kmount(kvol, kms, check=False)
    assert res.returncode == 5 and "rolled back" in res.stderr, res.stderr
    # and a re-key refuses to adopt it, before writing anything
    header = (kvol.backing / HEADER_NAME).read_bytes()
    res = sealfs("rekey", str(kvol.backing), *kms_args(kms), "--drop-other-slots", check=False)
    assert res.returncode == 5 and "rolled back" in res.stderr, res.stderr
    assert (kvol.backing / HEADER_NAME).read_bytes() == header


def test_leaked_app_key_rotate_rekey_retire(
    tmp_path: Path, kms: KmsProcess, state: KmsState
) -> None:
    """The runbook for a leaked KMS app key: rotate the app's key version, re-key every volume
    through the KMS (the new master key wrapped under the new version), retire the old one."""
    app = os.urandom(20)
    state.put(sim_policy(app, COMPOSE_A))
    try:
        vol = new_volume(tmp_path, *kms_args(kms, app))
        secrets = ["--state", str(state.path), "--secret-file", str(state.secret_file)]
        sealfs("kms", "policy", "rotate", app.hex(), *secrets)
        res = sealfs(
            "rekey", str(vol.backing), *kms_args(kms, app), "--keep-key-file", str(vol.key),
            "--json",
        )  # fmt: skip
        kms_slot = next(s for s in json.loads(res.stdout)["slots"] if s["type"] == "kms")
        assert kms_slot["kms"]["key_version"] == 2
        sealfs("kms", "policy", "retire-version", app.hex(), "1", *secrets)
        sealfs("check", str(vol.backing), *kms_args(kms, app))  # opens under version 2
    finally:
        state.store.delete_policy(state.macs, app)
