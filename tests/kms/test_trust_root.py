"""The trust root comes from the CVM, never from the disk: a host that swaps in a look-alike
volume and redirects the KMS address to a KMS it runs gets nothing (real KMSes on 127.0.0.1,
a real TCP redirector standing for the host's network, real FUSE mounts)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sealfs.store import HEADER_NAME
from tests.conftest import Volume, sealfs

from .conftest import APP_A, COMPOSE_A, KmsProcess, make_state, start_kms

pytestmark = pytest.mark.mount


class Redirector:
    """The host's network between the CVM and its KMS: forwards TCP connections to whichever
    KMS port it is currently pointed at. ``on_request(first_bytes)``, if set, runs before a
    connection's first bytes are forwarded: the host acting at the moment it sees a request."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.on_request: Callable[[bytes], None] | None = None
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        if self.on_request is not None:
            first = client.recv(65536)
            self.on_request(first)
            upstream.sendall(first)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsProcess]:
    """The host's own KMS: its own root key, a policy admitting app A."""
    server = start_kms(make_state(tmp_path_factory.mktemp("evil")), "--allow-simulated")
    yield server
    server.stop()


@pytest.fixture
def net(kms: KmsProcess) -> Iterator[Redirector]:
    r = Redirector(kms.port)
    yield r
    r.close()


def cvm_args(url: str, *pins: bytes) -> list[str]:
    """The KMS options of the CVM's own (measured) configuration."""
    args = [
        "--kms",
        url,
        "--app-id",
        APP_A.hex(),
        "--attester",
        "simulated",
        "--compose-hash",
        COMPOSE_A.hex(),
        "--kms-deadline",
        "5",
    ]
    for pin in pins:
        args += ["--kms-public-key", pin.hex()]
    return args


def new_kms_volume(base: Path, url: str, *extra: str) -> tuple[Volume, str]:
    base.mkdir()
    vol = Volume(base / "backing", base / "key", base / "mnt", base / "sealfs.log")
    vol.mnt.mkdir()
    out = sealfs("create", str(vol.backing), *cvm_args(url), *extra, "--json").stdout
    return vol, json.loads(out)["uuid"]


def swap_in(victim: Path, replacement: Path) -> None:
    """The host replaces the backing directory's contents with another volume's."""
    shutil.rmtree(victim)
    shutil.copytree(replacement, victim, symlinks=True)


def test_lookalike_volume_and_redirected_kms_are_refused(
    tmp_path: Path, kms: KmsProcess, evil: KmsProcess, net: Redirector
) -> None:
    vol, vid = new_kms_volume(tmp_path / "app", net.url, "--kms-public-key", kms.public_key.hex())
    sealfs(
        "mount",
        str(vol.backing),
        str(vol.mnt),
        *cvm_args(net.url, kms.public_key),
        "--volume-id",
        vid,
        "--log-file",
        str(vol.log),
    )
    (vol.mnt / "data").write_text("the app's data")
    vol.umount()

    # The attack: a look-alike volume whose kms slot names the host's KMS, swapped in; the
    # KMS address now leads to the host's KMS.
    fake, _ = new_kms_volume(tmp_path / "fake", evil.url, "--trust-on-first-use")
    swap_in(vol.backing, fake.backing)
    net.target = evil.port
    pinned = cvm_args(net.url, kms.public_key)
    res = sealfs(
        "mount", str(vol.backing), str(vol.mnt), *pinned, "--log-file", str(vol.log), check=False
    )
    assert res.returncode == 8 and "not a trusted KMS identity" in res.stderr, res.stderr
    assert not os.path.ismount(vol.mnt)
    res = sealfs("check", str(vol.backing), *pinned, check=False)
    assert res.returncode == 8 and "not a trusted KMS identity" in res.stderr, res.stderr
    # with the volume pinned too, it is refused before the KMS is even asked
    res = sealfs(
        "mount",
        str(vol.backing),
        str(vol.mnt),
        *pinned,
        "--volume-id",
        vid,
        "--log-file",
        str(vol.log),
        check=False,
    )
    assert res.returncode == 5 and "swapped-in" in res.stderr, res.stderr
    assert not os.path.ismount(vol.mnt)

    # Control: the attack is real - a CVM that trusts whatever answers mounts the host's
    # volume (whose master key the host knows) in place of its own.
    sealfs(
        "mount",
        str(vol.backing),
        str(vol.mnt),
        *cvm_args(net.url),
        "--trust-on-first-use",
        "--log-file",
        str(vol.log),
    )
    try:
        assert not (vol.mnt / "data").exists()
    finally:
        vol.umount()
    assert "INSECURE" in vol.log_text()


def test_without_a_pinned_kms_identity_nothing_is_asked(
    tmp_path: Path, kms: KmsProcess, net: Redirector
) -> None:
    vol, _ = new_kms_volume(tmp_path / "app", net.url, "--kms-public-key", kms.public_key.hex())
    info = json.loads(sealfs("info", str(vol.backing), "--json").stdout)
    assert info["slots"][0]["kms"]["kms_public_key"] == kms.public_key.hex()
    for cmd in (
        ["mount", str(vol.backing), str(vol.mnt)],
        ["check", str(vol.backing)],
        ["create", str(tmp_path / "other")],
    ):
        res = sealfs(*cmd, *cvm_args(net.url), check=False)
        assert res.returncode == 2, res.stderr
        assert "no trusted KMS identity" in res.stderr and "--kms-public-key" in res.stderr
    assert not os.path.ismount(vol.mnt) and not (tmp_path / "other").exists()


def test_swapped_in_volume_of_the_same_app_is_refused_by_volume_id(
    tmp_path: Path, kms: KmsProcess, net: Redirector
) -> None:
    """Another authentic volume of the same app (and the same KMS) is not the one asked for."""
    vol, vid = new_kms_volume(
        tmp_path / "app",
        net.url,
        "--kms-public-key",
        kms.public_key.hex(),
        "--new-key-file",
        str(tmp_path / "app.key"),
    )
    other, other_vid = new_kms_volume(
        tmp_path / "other", net.url, "--kms-public-key", kms.public_key.hex()
    )
    swap_in(vol.backing, other.backing)
    args = cvm_args(net.url, kms.public_key)
    res = sealfs(
        "mount",
        str(vol.backing),
        str(vol.mnt),
        *args,
        "--volume-id",
        vid,
        "--log-file",
        str(vol.log),
        check=False,
    )
    assert res.returncode == 5, res.stderr
    assert f"holds volume {other_vid}, not the expected {vid}" in res.stderr
    assert not os.path.ismount(vol.mnt)
    res = sealfs("check", str(vol.backing), *args, "--volume-id", vid.replace("-", ""), check=False)
    assert res.returncode == 5 and "swapped-in" in res.stdout, res.stdout
    res = sealfs("check", str(vol.backing), *args, "--volume-id", "not-a-uuid", check=False)
    assert res.returncode == 2 and "not a volume id" in res.stderr, res.stderr
    # the pin applies to every credential, before any key is tried
    res = sealfs(
        "check",
        str(vol.backing),
        "--key-file",
        str(tmp_path / "app.key"),
        "--volume-id",
        vid,
        check=False,
    )
    assert res.returncode == 5 and "swapped-in" in res.stdout, res.stdout
    res = sealfs("check", str(vol.backing), *args, "--volume-id", other_vid, check=False)
    assert res.returncode == 0, res.stdout  # its own id: fine


def test_check_compares_the_unlocked_volume_with_its_own_anchor(
    tmp_path: Path, kms: KmsProcess, net: Redirector
) -> None:
    """The host serves a throwaway header first and the real (rolled-back) one from the
    moment the CVM talks to the KMS: the anchor check must use the volume it unlocked."""
    vol, vid = new_kms_volume(tmp_path / "app", net.url, "--kms-public-key", kms.public_key.hex())
    args = [*cvm_args(net.url, kms.public_key), "--volume-id", vid]
    sealfs("mount", str(vol.backing), str(vol.mnt), *args, "--log-file", str(vol.log))
    (vol.mnt / "balance").write_text("100")
    vol.umount()
    old = tmp_path / "old"
    shutil.copytree(vol.backing, old)
    sealfs("mount", str(vol.backing), str(vol.mnt), *args, "--log-file", str(vol.log))
    (vol.mnt / "balance").write_text("0")
    vol.umount()
    swap_in(vol.backing, old)  # the rollback
    header = vol.backing / HEADER_NAME
    authentic = header.read_bytes()
    decoy = json.loads(authentic)
    decoy["volume_id"] = os.urandom(16).hex()  # a volume the KMS never anchored

    def swap_back(request: bytes) -> None:
        if request.startswith(b"POST /v1/") and not request.startswith(b"POST /v1/nonce"):
            header.write_bytes(authentic)

    net.on_request = swap_back
    for pin in (args[-2:], []):  # with and without --volume-id
        header.write_text(json.dumps(decoy))
        res = sealfs(
            "check", str(vol.backing), *cvm_args(net.url, kms.public_key), *pin, check=False
        )
        assert res.returncode in (3, 5), res.stdout  # never "clean"
    header.write_bytes(authentic)
    res = sealfs("check", str(vol.backing), *args, check=False)
    assert res.returncode == 5 and "rolled-back" in res.stdout, res.stdout
