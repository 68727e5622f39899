"""KMS test fixtures: real `sealfs kms serve` processes on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from sealfs.attest.eventlog import events_to_wire
from sealfs.attest.simulated import SimulatedAttester
from sealfs.crypto import EphemeralKeyPair, KdfParams, Secret
from sealfs.kms import protocol as P
from sealfs.kms.derivation import StoreMac
from sealfs.kms.policy import AppPolicy, Measurement
from sealfs.kms.server import HttpLimits, KmsHttpServer
from sealfs.kms.service import KmsService, ServiceConfig
from sealfs.kms.store import KmsStore

REPO = Path(__file__).resolve().parents[2]
SECRET = b"operator secret for the kms tests"
FAST_KDF_KIB = 8192

APP_A = bytes.fromhex("a1" * 20)
APP_B = bytes.fromhex("b2" * 20)
COMPOSE_A = hashlib.sha256(b"compose of app A").digest()
COMPOSE_B = hashlib.sha256(b"compose of app B").digest()


def attester(app_id: bytes = APP_A, compose: bytes | None = None, **kw: Any) -> SimulatedAttester:
    if compose is None:
        compose = COMPOSE_A if app_id == APP_A else COMPOSE_B
    return SimulatedAttester(app_id, compose, **kw)


def sim_policy(app_id: bytes, compose: bytes, **kw: Any) -> AppPolicy:
    a = SimulatedAttester(app_id, compose)
    m = Measurement(a.mrtd, a.rtmr0, a.rtmr1, a.rtmr2)
    kw.setdefault("allow_simulated", True)
    return AppPolicy(app_id=app_id, measurements=(m,), compose_hashes=(compose,), **kw)


@dataclass
class KmsState:
    path: Path  # the SQLite file, or for a database a file in the test's directory
    secret_file: Path
    store: KmsStore
    macs: StoreMac
    root: Secret
    url: str = ""  # a postgresql:// state: what --state names instead of path

    def put(self, policy: AppPolicy) -> None:
        self.store.put_policy(self.macs, policy)


def make_state(tmp: Path, url: str = "") -> KmsState:
    """A new state with policies for apps A and B: a SQLite file in ``tmp``, or the
    PostgreSQL database ``url``."""
    tmp.mkdir(parents=True, exist_ok=True)
    secret_file = tmp / "operator.secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    path = tmp / "kms.db"
    store, root = KmsStore.initialize(
        url or path, Secret(SECRET), KdfParams.default(memory_kib=FAST_KDF_KIB)
    )
    state = KmsState(path, secret_file, store, StoreMac(root), root, url)
    state.put(sim_policy(APP_A, COMPOSE_A))
    state.put(sim_policy(APP_B, COMPOSE_B))
    return state


@dataclass
class KmsProcess:
    """A `sealfs kms serve` subprocess; its stderr log is kept in a file for assertions."""

    proc: subprocess.Popen[bytes]
    url: str
    port: int
    public_key: bytes
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_kms(state: KmsState, *extra: str, log_name: str = "kms.log", port: int = 0) -> KmsProcess:
    log_path = state.path.parent / log_name
    args = [
        sys.executable,
        "-m",
        "sealfs",
        "kms",
        "serve",
        "--state",
        state.url or str(state.path),
        "--secret-file",
        str(state.secret_file),
        "--port",
        str(port),
        *extra,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            proc.kill()
            raise AssertionError(f"KMS did not start: {log_path.read_text()}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"KMS exited: {log_path.read_text()}")
        line += chunk
    text = line.decode()
    assert text.startswith("listening on http://127.0.0.1:"), text
    bound = int(text.split("127.0.0.1:")[1].split()[0])
    pub = bytes.fromhex(text.rsplit("KMS public key ", 1)[1].strip().rstrip(")"))
    return KmsProcess(proc, f"http://127.0.0.1:{bound}", bound, pub, log_path, args)


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> KmsState:
    return make_state(tmp_path_factory.mktemp("kms"))


@pytest.fixture(scope="module")
def kms(state: KmsState) -> Iterator[KmsProcess]:
    """A KMS that allows simulated TEEs, with policies for apps A and B."""
    server = start_kms(state, "--allow-simulated", "--request-timeout", "1.5")
    yield server
    server.stop()


# --- raw HTTP helpers --------------------------------------------------------------------------


def connect_from(source: str, port: int, timeout: float = 60.0) -> socket.socket:
    """A connection to the KMS on 127.0.0.1 from loopback address ``source``: all of
    127.0.0.0/8 is loopback on Linux, so tests can play several peers."""
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )


def read_answer(s: socket.socket) -> tuple[int, dict[str, Any]]:
    """Read one answer to its end (the server closes): (status, JSON body)."""
    chunks = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body) if body else {}


def raw_http(
    port: int,
    data: bytes,
    timeout: float = 10.0,
    half_close: bool = True,
    source: str = "127.0.0.1",
) -> tuple[int, dict[str, Any]]:
    """Send raw bytes from loopback address ``source``, return (status, JSON body)."""
    with connect_from(source, port, timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return read_answer(s)


def post(
    port: int, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    return raw_http(port, head.encode() + b"\r\n" + data)


def get(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, dict[str, Any]]:
    return raw_http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), source=source)


def wait_for(condition: Callable[[], bool], what: str, guard_s: float = 60.0) -> None:
    """Wait until ``condition()`` holds (an event in another thread or process); the guard
    only turns a hang into a failure, it does not pace the test."""
    deadline = time.monotonic() + guard_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- an in-process server, for tests that need to control the KMS clock ------------------------


class InProcessKms:
    """A KmsHttpServer run by trio in a background thread (same code as `kms serve`)."""

    def __init__(
        self, state: KmsState, config: ServiceConfig, limits: HttpLimits | None = None
    ) -> None:
        self.service = KmsService(state.store, state.root, config)
        self.server = KmsHttpServer(self.service, limits)
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self.port = 0
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        with trio.CancelScope() as scope:
            self._cancel = scope
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(self.server.serve, "127.0.0.1", 0)
                self._ready.set()

    def __enter__(self) -> InProcessKms:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None and self._cancel is not None
        self._token.run_sync_soon(self._cancel.cancel)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# --- hand-built protocol requests (for tampering and replay tests) -----------------------------


def fresh_nonce(port: int) -> bytes:
    status, body = post(port, "/v1/nonce", b"")
    assert status == 200, body
    return bytes.fromhex(body["nonce"])


def envelope(
    port: int,
    att: SimulatedAttester,
    params: Any,
    *,
    nonce: bytes | None = None,
    report_data: bytes | None = None,
    events: list[Any] | None = None,
    app_id: bytes | None = None,
) -> tuple[dict[str, Any], EphemeralKeyPair, bytes]:
    """A complete, valid request body for ``params`` (override parts to make it invalid)."""
    nonce = nonce if nonce is not None else fresh_nonce(port)
    eph = EphemeralKeyPair()
    rd = (
        report_data
        if report_data is not None
        else P.report_data_for(nonce, eph.public_bytes, params)
    )
    body = {
        "version": P.PROTOCOL_VERSION,
        "tee": "simulated",
        "nonce": nonce.hex(),
        "public_key": eph.public_bytes.hex(),
        "quote": base64.b64encode(att.quote(rd)).decode(),
        "event_log": events_to_wire(events if events is not None else att.event_log()),
        "app_id": (app_id or att.app_id).hex(),
        "collateral": att.collateral(),
        "params": params.to_wire(),
    }
    return body, eph, nonce


# The PostgreSQL fixtures (a real server, one database per test), for every KMS test that
# needs them; imported last because tests/kms/postgres.py builds on the helpers above.
from .postgres import pg_state, postgres  # noqa: E402, F401
