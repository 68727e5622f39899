"""`sealfs init serve NAME CONFIG`, the main process of sealfs@NAME.service, against a real KMS
on 127.0.0.1: it mounts the volume of the config, tells systemd (NOTIFY_SOCKET) it is ready
only once the mount answers, unmounts on SIGTERM, and refuses a volume other than the one
`sealfs init up` pinned."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealfs.cli.credentials import DEV_COMPOSE_HASH
from sealfs.cli.init_serve import PIN_DIR
from sealfs.fuse.mount import is_mounted
from tests.conftest import REPO, sealfs
from tests.kms.conftest import KmsProcess, make_state, sim_policy, start_kms

APP_ID = bytes.fromhex("d4" * 20)


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsProcess]:
    state = make_state(tmp_path_factory.mktemp("kms"))
    state.put(sim_policy(APP_ID, DEV_COMPOSE_HASH))
    server = start_kms(state, "--allow-simulated")
    yield server
    server.stop()


@pytest.fixture
def name() -> Iterator[str]:
    """A volume name of its own, and its pin removed afterwards (PIN_DIR is the host's)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    (PIN_DIR / f"{name}.volume-id").unlink(missing_ok=True)


def _setup(tmp_path: Path, kms: KmsProcess, name: str) -> tuple[Path, Path, str]:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    mnt.mkdir()
    kms_args = ["--kms", kms.url, "--app-id", APP_ID.hex(),
                "--kms-public-key", kms.public_key.hex(), "--attester", "simulated"]  # fmt: skip
    sealfs("create", str(backing), *kms_args)
    volume_id: str = json.loads(sealfs("info", str(backing), "--json").stdout)["volume_id"]
    config = tmp_path / "volumes.toml"
    config.write_text(
        f'[kms]\nurls = ["{kms.url}"]\npublic_keys = ["{kms.public_key.hex()}"]\n'
        f'app_id = "{APP_ID.hex()}"\nattester = "simulated"\ndeadline = 30\n\n'
        f'[[volume]]\nname = "{name}"\nkind = "sealfs"\nbacking = "{backing}"\n'
        f'mountpoint = "{mnt}"\n'
    )
    return config, mnt, volume_id


def test_serve_notifies_ready_once_mounted_and_unmounts_on_sigterm(
    tmp_path: Path, kms: KmsProcess, name: str
) -> None:
    config, mnt, volume_id = _setup(tmp_path, kms, name)
    PIN_DIR.mkdir(parents=True, exist_ok=True)
    (PIN_DIR / f"{name}.volume-id").write_text(volume_id + "\n")
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(120)
        proc = subprocess.Popen(
            [sys.executable, "-m", "sealfs", "init", "serve", name, str(config)],
            cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": str(notify)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            message = sock.recv(4096).decode()
            assert message == f"READY=1\nMAINPID={proc.pid}"
            assert is_mounted(mnt)
            (mnt / "f").write_text("served")
            assert (mnt / "f").read_text() == "served"
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not is_mounted(mnt)


def test_serve_refuses_a_volume_other_than_the_pinned_one(
    tmp_path: Path, kms: KmsProcess, name: str
) -> None:
    config, mnt, _ = _setup(tmp_path, kms, name)
    PIN_DIR.mkdir(parents=True, exist_ok=True)
    (PIN_DIR / f"{name}.volume-id").write_text(uuid.uuid4().hex + "\n")
    res = sealfs("init", "serve", name, str(config), check=False)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not is_mounted(mnt)
