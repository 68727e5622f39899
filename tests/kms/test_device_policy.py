"""Host identity in the KMS policy: an app's keys go only to the hosts (device ids) it lists.

A real `sealfs kms serve` on 127.0.0.1; policies are set through `sealfs kms policy set` while
it runs (it reads them per request). Simulated CVMs with different ``device_id`` play the
hosts a volume moves between. Real FUSE mounts check that `sealfs mount --device-id` reaches
the KMS with that id, in the mount daemon too.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealfs.attest.simulated import DEFAULT_DEVICE_ID
from sealfs.errors import AttestationError, UsageError
from sealfs.kms.client import KmsClient
from sealfs.kms.policy import AppPolicy
from tests.conftest import Volume, sealfs

from .conftest import REPO, KmsProcess, KmsState, attester

APP = bytes.fromhex("d3" * 20)
COMPOSE = hashlib.sha256(b"compose of the app that moves").digest()
HOST_A = hashlib.sha256(b"host A").digest()
HOST_B = hashlib.sha256(b"host B").digest()


def policy_set(state: KmsState, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sealfs",
            "kms",
            "policy",
            "set",
            APP.hex(),
            "--state",
            str(state.path),
            "--secret-file",
            str(state.secret_file),
            "--simulated",
            "--compose-hash",
            COMPOSE.hex(),
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def allow(state: KmsState, *flags: str) -> None:
    res = policy_set(state, *flags)
    assert res.returncode == 0, res.stderr


def get_key(kms: KmsProcess, device: bytes) -> bytes:
    att = attester(APP, compose=COMPOSE, device_id=device)
    client = KmsClient(kms.url, APP, att, trusted_keys=[kms.public_key], deadline_s=5)
    return client.get_key("volume-wrap", b"volume-that-moves")[0].reveal()


@pytest.fixture
def app(state: KmsState) -> Iterator[bytes]:
    yield APP
    state.store.delete_policy(state.macs, APP)


def test_only_listed_hosts_get_the_key(kms: KmsProcess, state: KmsState, app: bytes) -> None:
    allow(state, "--device", HOST_A.hex())
    key = get_key(kms, HOST_A)
    with pytest.raises(AttestationError, match=f"policy_denied.*host device {HOST_B.hex()}"):
        get_key(kms, HOST_B)
    log = kms.log()
    assert f"host device {HOST_B.hex()} is not among this app's allowed devices" in log
    assert f"device={HOST_B.hex()}" in log

    allow(state, "--device", HOST_A.hex(), "--device", HOST_B.hex())  # allow the new host
    assert get_key(kms, HOST_B) == key  # the same app key on any allowed host
    allow(state, "--device", HOST_B.hex())  # remove the old host
    with pytest.raises(AttestationError, match=f"host device {HOST_A.hex()}"):
        get_key(kms, HOST_A)

    allow(state, "--any-device")
    assert get_key(kms, HOST_A) == get_key(kms, HOST_B) == key
    allow(state)  # no --device at all: any host, too
    assert get_key(kms, DEFAULT_DEVICE_ID) == key


def test_policy_set_device_input(state: KmsState, app: bytes, tmp_path: Path) -> None:
    res = policy_set(state, "--device", HOST_A.hex(), "--any-device")
    assert res.returncode == 2 and "not both" in res.stderr, res.stderr
    res = policy_set(state, "--device", "abcd")
    assert res.returncode == 2 and "device id" in res.stderr, res.stderr
    doc = tmp_path / "policy.json"
    doc.write_text(f'{{"devices": ["{HOST_A.hex()}"]}}')
    allow(state, "--file", str(doc), "--device", HOST_B.hex())
    stored = state.store.get_policy(state.macs, APP)
    assert stored is not None and stored.devices == (HOST_A, HOST_B)
    allow(state, "--file", str(doc), "--any-device")
    stored = state.store.get_policy(state.macs, APP)
    assert stored is not None and stored.devices == ()


def test_policy_documents_without_devices_allow_any_host() -> None:
    written_before = {"app_id": "aa", "measurements": [], "compose_hashes": []}
    policy = AppPolicy.from_dict(written_before)
    assert policy.devices == ()
    pinned = AppPolicy.from_dict({**written_before, "devices": [HOST_A.hex()]})
    assert AppPolicy.from_dict(pinned.to_dict()) == pinned
    for bad in (["00" * 31], "not a list", [7]):
        with pytest.raises(UsageError, match="device"):
            AppPolicy.from_dict({**written_before, "devices": bad})


# --- through `sealfs mount` ------------------------------------------------------------------


def mount_args(kms: KmsProcess, device: bytes) -> list[str]:
    return [
        "--kms",
        kms.url,
        "--app-id",
        APP.hex(),
        "--attester",
        "simulated",
        "--compose-hash",
        COMPOSE.hex(),
        "--device-id",
        device.hex(),
        "--kms-deadline",
        "5",
        "--kms-public-key",
        kms.public_key.hex(),
    ]


@pytest.mark.mount
def test_mount_reaches_the_kms_with_its_device_id(
    kms: KmsProcess, state: KmsState, app: bytes, tmp_path: Path
) -> None:
    allow(state, "--device", HOST_A.hex())
    vol = Volume(tmp_path / "backing", tmp_path / "key", tmp_path / "mnt", tmp_path / "log")
    vol.mnt.mkdir()
    vol.key.write_bytes(os.urandom(64))
    vol.key.chmod(0o600)
    sealfs("create", str(vol.backing), *mount_args(kms, HOST_A), "--key-file", str(vol.key))
    try:
        res = sealfs("mount", str(vol.backing), str(vol.mnt), *mount_args(kms, HOST_B), check=False)
        assert res.returncode == 9, res.stderr
        assert f"host device {HOST_B.hex()} is not among" in res.stderr
        assert not os.path.ismount(vol.mnt)
        # The daemon unlocks through the KMS itself: it succeeds only if it got HOST_A too.
        mount = ["mount", str(vol.backing), str(vol.mnt), *mount_args(kms, HOST_A)]
        sealfs(*mount, "--log-file", str(vol.log))
        (vol.mnt / "moved").write_bytes(b"data")
        vol.umount()
    finally:
        vol.force_unmount()
    args = mount_args(kms, HOST_A)
    at = args.index("--compose-hash")
    tdx = [arg if arg != "simulated" else "tdx" for arg in args[:at] + args[at + 2 :]]
    res = sealfs("mount", str(vol.backing), str(vol.mnt), *tdx, check=False)
    assert res.returncode == 2 and "--device-id" in res.stderr, res.stderr
