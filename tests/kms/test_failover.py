"""Client failover between KMS replicas: order, a dead, silent or 5xx replica skipped within
one deadline, and a refusal final (never asked of another replica). Real `sealfs kms serve`
replicas on one state file, and tiny real HTTP servers on 127.0.0.1 for the broken ones."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sealfs.errors import AttestationError, KmsError
from sealfs.kms.client import EpochRefused, KmsClient
from tests.conftest import new_volume, sealfs

from .conftest import APP_A, COMPOSE_A, KmsProcess, KmsState, attester, start_kms


class StubReplica:
    """An HTTP server on 127.0.0.1 that answers every request with one fixed status and JSON
    body (a replica that is overloaded, or one that refuses), counting the requests."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.requests = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                stub.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubReplica:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def replicas(state: KmsState) -> Iterator[tuple[KmsProcess, KmsProcess]]:
    """Two replicas on one state file (the store's transactions are safe across processes)."""
    one = start_kms(state, "--allow-simulated", log_name="replica1.log")
    two = start_kms(state, "--allow-simulated", log_name="replica2.log")
    yield one, two
    one.stop()
    two.stop()


def served(replica: KmsProcess, path: str) -> int:
    """How many requests for ``path`` the replica has answered (its log says each one)."""
    return replica.log().count(f" {path} -> ")


def client(urls: list[str], pub: bytes, **kw: Any) -> KmsClient:
    kw.setdefault("deadline_s", 30)
    return KmsClient(urls, APP_A, kw.pop("att", attester()), trusted_keys=[pub], **kw)


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def silent_replica() -> Iterator[str]:
    """The URL of a socket that accepts connections (its backlog does) and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield f"http://127.0.0.1:{silent.getsockname()[1]}"


def test_replicas_are_tried_in_the_order_given(replicas: tuple[KmsProcess, KmsProcess]) -> None:
    one, two = replicas
    before = served(one, "/v1/key"), served(two, "/v1/key")
    key1, _ = client([one.url, two.url], one.public_key).get_key("volume-wrap", b"order")
    assert (served(one, "/v1/key"), served(two, "/v1/key")) == (before[0] + 1, before[1])
    key2, _ = client([two.url, one.url], one.public_key).get_key("volume-wrap", b"order")
    assert (served(one, "/v1/key"), served(two, "/v1/key")) == (before[0] + 1, before[1] + 1)
    assert key1.reveal() == key2.reveal()  # one root key: the same app key from either


def test_a_dead_replica_is_skipped(replicas: tuple[KmsProcess, KmsProcess]) -> None:
    one, _ = replicas
    key, version = client([dead_url(), one.url], one.public_key).get_key("volume-wrap", b"dead")
    assert version == 1 and len(key) == 32


def test_a_silent_replica_is_skipped_after_the_request_timeout(
    replicas: tuple[KmsProcess, KmsProcess],
) -> None:
    one, _ = replicas
    with silent_replica() as url:
        c = client([url, one.url], one.public_key, deadline_s=30, request_timeout_s=0.5)
        epoch, _ = c.get_epoch(b"silent")
    assert epoch == 0


def test_a_replica_answering_5xx_is_skipped(replicas: tuple[KmsProcess, KmsProcess]) -> None:
    one, _ = replicas
    with StubReplica(503, {"ok": False, "error": "busy", "message": "queue full"}) as busy:
        c = client([busy.url, one.url], one.public_key)
        c.advance_epoch(b"busy-vol", 4, b"\x04" * 32)
        assert busy.requests == 1  # the nonce request; then on to replica 1
        assert c.get_epoch(b"busy-vol") == (4, b"\x04" * 32)


def test_all_replicas_down_fails_at_the_deadline_naming_each() -> None:
    urls = [dead_url(), dead_url()]
    c = KmsClient(urls, APP_A, attester(), trusted_keys=[b"k" * 32], deadline_s=1.0)
    start = time.monotonic()
    with pytest.raises(KmsError) as e:
        c.get_key("volume-wrap", b"v")
    assert time.monotonic() - start >= 1.0
    assert str(e.value) == (
        f"no KMS replica available after 1 s ({urls[0]}: connection refused; "
        f"{urls[1]}: connection refused)"
    )


def test_a_refusal_is_not_asked_of_another_replica(
    replicas: tuple[KmsProcess, KmsProcess],
) -> None:
    """A 4xx is final: a network that forges one only denies service, but one that could
    shop for another replica's answer could pick a stale or laxer one."""
    one, two = replicas
    denied = {"ok": False, "error": "policy_denied", "message": "tcb status"}
    with StubReplica(403, denied) as refusing:
        before = served(one, "/v1/nonce")
        with pytest.raises(AttestationError, match="policy_denied"):
            client([refusing.url, one.url], one.public_key).get_key("volume-wrap", b"v")
        assert refusing.requests == 1 and served(one, "/v1/nonce") == before

    # A real refusal from a real replica: a rollback, then a policy denial.
    c = client([one.url, two.url], one.public_key)
    c.advance_epoch(b"refused-vol", 9, b"\x09" * 32)
    before2 = served(two, "/v1/nonce")
    with pytest.raises(EpochRefused) as e:
        c.advance_epoch(b"refused-vol", 3, b"\x03" * 32)
    assert e.value.reason == "rollback"
    out_of_date = attester(tcb_status="OutOfDate")
    with pytest.raises(AttestationError, match="policy_denied"):
        client([one.url, two.url], one.public_key, att=out_of_date).get_key("volume-wrap", b"v")
    assert served(two, "/v1/nonce") == before2


def test_an_advance_retried_on_another_replica_is_idempotent(
    replicas: tuple[KmsProcess, KmsProcess],
) -> None:
    """The answer to an accepted advance can be lost; the client then sends the same advance
    to the next replica, which finds it already anchored and agrees."""
    one, two = replicas
    client([one.url], one.public_key).advance_epoch(b"lost-answer", 7, b"\x07" * 32)
    again = client([two.url], one.public_key).advance_epoch(b"lost-answer", 7, b"\x07" * 32)
    assert again == (7, b"\x07" * 32)


def test_bad_replica_lists() -> None:
    with pytest.raises(KmsError, match="no KMS URL"):
        KmsClient([], APP_A, attester())
    with pytest.raises(KmsError, match="given twice"):
        KmsClient(["http://a:1", "http://a:1/"], APP_A, attester())


def test_a_replica_started_later_on_the_same_state_takes_over(state: KmsState) -> None:
    """The SQLite deployment: replica 1 dies, replica 2 is started on its state file."""
    one = start_kms(state, "--allow-simulated", log_name="takeover1.log")
    c = client([one.url, dead_url()], one.public_key, deadline_s=30)
    try:
        c.advance_epoch(b"takeover", 1, b"\x01" * 32)
    finally:
        one.stop()
    two = start_kms(state, "--allow-simulated", log_name="takeover2.log")
    try:
        urls = list(dict.fromkeys([one.url, two.url]))  # the port may have been reused
        c2 = client(urls, one.public_key, deadline_s=30)
        assert c2.get_epoch(b"takeover") == (1, b"\x01" * 32)
        c2.advance_epoch(b"takeover", 2, b"\x02" * 32)
    finally:
        two.stop()


def test_kms_info_reports_each_replica(replicas: tuple[KmsProcess, KmsProcess]) -> None:
    one, two = replicas
    pub = one.public_key.hex()
    res = sealfs("kms", "info", "--kms", one.url, "--kms", two.url, "--kms-public-key", pub)
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{one.url}  reachable  ")
    assert lines[1].startswith(f"{two.url}  reachable  ") and lines[1].endswith(f"key {pub}")

    dead = dead_url()
    res = sealfs("kms", "info", "--kms", one.url, "--kms", dead, "--json", check=False)
    assert res.returncode == 8, res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["problems"] == [f"{dead} unreachable"]
    first, second = doc["replicas"]
    assert first["reachable"] and first["kms_public_key"] == pub and first["protocol"] == 1
    assert first["latency_ms"] >= 0
    assert not second["reachable"] and second["error"] == "connection refused"

    res = sealfs("kms", "info", "--kms", one.url, "--kms-public-key", "ab" * 32, check=False)
    assert res.returncode == 8 and f"problem: {one.url} announces a key that is not pinned" in (
        res.stdout
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kms", "ftp://x"], "KMS URL must be http(s)"),
        (["--kms-public-key", "ab" * 32], "--kms-public-key goes with --kms"),
        ([], "give --state PATH"),
        (["--kms", "http://127.0.0.1:9", "--state", "x.db"], "not both"),
    ],
)
def test_kms_info_usage_errors(args: list[str], message: str) -> None:
    res = sealfs("kms", "info", *args, check=False)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_the_cli_skips_a_silent_replica_after_kms_timeout(
    replicas: tuple[KmsProcess, KmsProcess], tmp_path: Path
) -> None:
    one, _ = replicas
    with silent_replica() as url:
        vol = new_volume(
            tmp_path,
            # Without --kms-timeout the silent replica would hold each exchange for the
            # whole 14 s deadline (the default timeout is 15 s) and the create would fail.
            *("--kms", url, "--kms", one.url, "--kms-timeout", "0.5", "--kms-deadline", "14"),
            *("--kms-public-key", one.public_key.hex(), "--app-id", APP_A.hex()),
            *("--attester", "simulated", "--compose-hash", COMPOSE_A.hex()),
        )
    res = sealfs("info", str(vol.backing), "--json")
    assert '"type": "kms"' in res.stdout
