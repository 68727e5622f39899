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


# --- moving a volume between two pinned hosts ------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int, int, bytes, dict[str, bytes]]]:
    """What a reader sees: per path its mode, size, mtime, content (files) and xattrs."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        xattrs = {n: os.getxattr(path, n) for n in os.listxattr(path)} if path.is_file() else {}
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, data, xattrs)
    return out


@pytest.mark.mount
def test_volume_moves_between_two_pinned_hosts(
    kms: KmsProcess, state: KmsState, app: bytes, tmp_path: Path
) -> None:
    """Host A runs the app; the policy pins A. A live and a final export, then host B is
    refused until the policy admits it, imports, mounts and sees the same tree; after B
    commits, A's old copy is refused (exit 5)."""
    allow(state, "--device", HOST_A.hex())
    a = Volume(tmp_path / "a", tmp_path / "key", tmp_path / "a-mnt", tmp_path / "a.log")
    b = Volume(tmp_path / "b", tmp_path / "key", tmp_path / "b-mnt", tmp_path / "b.log")
    for vol in (a, b):
        vol.mnt.mkdir()
    a.key.write_bytes(os.urandom(64))
    a.key.chmod(0o600)
    on_a, on_b = mount_args(kms, HOST_A), mount_args(kms, HOST_B)
    sealfs("create", str(a.backing), *on_a, "--compression", "lz4")
    bundle = tmp_path / "bundle"
    try:
        sealfs("mount", str(a.backing), str(a.mnt), *on_a, "--log-file", str(a.log))
        (a.mnt / "d").mkdir()
        (a.mnt / "d" / "text").write_bytes(b"compressible " * 50_000)
        os.link(a.mnt / "d" / "text", a.mnt / "hardlink")
        os.setxattr(a.mnt / "d" / "text", "user.origin", b"host A")
        with open(a.mnt / "sparse", "wb") as f:
            f.truncate(3 << 20)
            f.write(b"head")
        sealfs("migrate", "export", str(a.backing), str(bundle), *on_a)  # live pre-copy
        (a.mnt / "late").write_bytes(os.urandom(200_000))  # written after the pre-copy
        want = _tree(a.mnt)
        a.umount()
        sealfs("migrate", "export", str(a.backing), str(bundle), "--final", *on_a)

        res = sealfs("migrate", "import", str(bundle), str(b.backing), *on_b, check=False)
        assert res.returncode == 9 and f"host device {HOST_B.hex()}" in res.stderr, res.stderr
        assert not b.backing.exists()
        allow(state, "--device", HOST_A.hex(), "--device", HOST_B.hex())
        sealfs("migrate", "import", str(bundle), str(b.backing), *on_b)
        allow(state, "--device", HOST_B.hex())  # the old host is retired

        sealfs("mount", str(b.backing), str(b.mnt), *on_b, "--log-file", str(b.log))
        assert _tree(b.mnt) == want
        assert os.stat(b.mnt / "hardlink").st_ino == os.stat(b.mnt / "d" / "text").st_ino
        (b.mnt / "new-host").write_bytes(b"B was here")
        b.umount()
        sealfs("check", str(b.backing), *on_b)

        res = sealfs("mount", str(a.backing), str(a.mnt), *on_a, check=False)
        assert res.returncode == 9, res.stderr  # A is no longer admitted at all
        allow(state, "--device", HOST_A.hex(), "--device", HOST_B.hex())
        res = sealfs("mount", str(a.backing), str(a.mnt), *on_a, check=False)
        assert res.returncode == 5, res.stderr  # and its copy is behind the anchor anyway
        assert not os.path.ismount(a.mnt)
    finally:
        a.force_unmount()
        b.force_unmount()
