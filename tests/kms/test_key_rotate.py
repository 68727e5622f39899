"""`sealfs key rotate` and `key add --new-kms` against a real KMS on 127.0.0.1: after
`sealfs kms policy rotate` the kms slot moves to the new key version and the volume opens."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Volume, new_volume, sealfs

from .conftest import COMPOSE_A, KmsProcess, KmsState, sim_policy
from .test_volume_anchor import kms_args

pytestmark = pytest.mark.mount


@pytest.fixture
def app(state: KmsState) -> Iterator[bytes]:
    """An app of its own: rotating it leaves the module's other apps at version 1."""
    app = os.urandom(20)
    state.put(sim_policy(app, COMPOSE_A))
    yield app
    state.store.delete_policy(state.macs, app)


def kms_slot(vol: Volume) -> dict[str, object]:
    listed = json.loads(sealfs("key", "list", str(vol.backing), "--json").stdout)["slots"]
    return next(dict(s["kms"]) for s in listed if s["type"] == "kms")


def test_rotate_rewraps_under_the_current_version(
    tmp_path: Path, kms: KmsProcess, state: KmsState, app: bytes
) -> None:
    vol = new_volume(tmp_path, *kms_args(kms, app))
    sealfs("mount", str(vol.backing), str(vol.mnt), *kms_args(kms, app))
    try:
        (vol.mnt / "f").write_text("kept across rotation")
    finally:
        vol.umount()
    assert kms_slot(vol)["key_version"] == 1
    secrets = ["--state", str(state.path), "--secret-file", str(state.secret_file)]
    sealfs("kms", "policy", "rotate", app.hex(), *secrets)

    res = sealfs("key", "rotate", str(vol.backing), "--key-file", str(vol.key), check=False)
    assert res.returncode == 2 and "unlock with --kms" in res.stderr
    out = json.loads(
        sealfs("key", "rotate", str(vol.backing), *kms_args(kms, app), "--json").stdout
    )
    assert (out["old_key_version"], out["key_version"]) == (1, 2)
    assert kms_slot(vol)["key_version"] == 2
    sealfs("mount", str(vol.backing), str(vol.mnt), *kms_args(kms, app))
    try:
        assert (vol.mnt / "f").read_text() == "kept across rotation"
    finally:
        vol.umount()
    sealfs("check", str(vol.backing), *kms_args(kms, app))


def test_add_a_kms_slot_to_a_key_file_volume(tmp_path: Path, kms: KmsProcess, app: bytes) -> None:
    vol = new_volume(tmp_path)
    new_kms = [
        "--new-kms", kms.url, "--new-app-id", app.hex(), "--new-attester", "simulated",
        "--new-compose-hash", COMPOSE_A.hex(), "--new-kms-public-key", kms.public_key.hex(),
    ]  # fmt: skip
    sealfs("key", "add", str(vol.backing), "--key-file", str(vol.key), *new_kms)
    assert kms_slot(vol)["app_id"] == app.hex()
    res = sealfs("key", "add", str(vol.backing), "--key-file", str(vol.key), *new_kms, check=False)
    assert res.returncode == 2 and "already has a kms slot" in res.stderr
    sealfs("check", str(vol.backing), *kms_args(kms, app))
