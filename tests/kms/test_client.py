"""Client behaviour: retry with backoff while the KMS is down, clear failure at the deadline."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from sealfs.errors import AttestationError, KmsError
from sealfs.kms.client import KmsClient, probe
from sealfs.kms.peers import served_by

from .conftest import APP_A, KmsProcess, KmsState, attester, start_kms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fails_clearly_after_the_deadline() -> None:
    port = free_port()
    c = KmsClient(
        f"http://127.0.0.1:{port}", APP_A, attester(), deadline_s=1.0, trust_on_first_use=True
    )
    start = time.monotonic()
    with pytest.raises(KmsError) as e:
        c.get_key("volume-wrap", b"v")
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 3
    assert str(e.value) == (
        f"KMS at http://127.0.0.1:{port} not available after 1 s: connection refused"
    )


def test_retries_until_the_kms_comes_up(state: KmsState) -> None:
    port = free_port()
    started: list[KmsProcess] = []

    def later() -> None:
        time.sleep(1.0)
        started.append(start_kms(state, "--allow-simulated", log_name="late.log", port=port))

    t = threading.Thread(target=later)
    t.start()
    try:
        c = KmsClient(
            f"http://127.0.0.1:{port}", APP_A, attester(), deadline_s=20, trust_on_first_use=True
        )
        key, version = c.get_key("volume-wrap", b"v")
        assert version == 1 and len(key) == 32
    finally:
        t.join()
        for s in started:
            s.stop()


def test_refusals_are_not_retried(kms: KmsProcess) -> None:
    c = KmsClient(
        kms.url,
        APP_A,
        attester(tcb_status="OutOfDate"),
        trusted_keys=[kms.public_key],
        deadline_s=30,
    )
    start = time.monotonic()
    with pytest.raises(AttestationError, match="policy_denied"):
        c.get_key("volume-wrap", b"v")
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(
    "url", ["ftp://x", "http://", "http://h:99999", "http://h/path", "http://h?q=1"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(KmsError):
        KmsClient(url, APP_A, attester())


def test_bad_app_ids() -> None:
    for app in ("zz", "", b"x" * 65):
        with pytest.raises(KmsError):
            KmsClient("http://127.0.0.1:1", app, attester())


def test_reprs_are_safe(kms: KmsProcess) -> None:
    c = KmsClient(kms.url, APP_A, attester(), trusted_keys=[kms.public_key])
    key, _ = c.get_key("volume-wrap", b"v")
    assert key.reveal().hex() not in repr(c) + repr(key) + str(key)


def test_a_hanging_kms_cannot_outlast_the_deadline() -> None:
    with socket.socket() as silent:  # accepts TCP connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        c = KmsClient(
            f"http://127.0.0.1:{port}",
            APP_A,
            attester(),
            deadline_s=1.0,
            request_timeout_s=30,
            trust_on_first_use=True,
        )
        start = time.monotonic()
        with pytest.raises(KmsError, match="not available after 1 s: timed out"):
            c.get_key("volume-wrap", b"v")
        assert time.monotonic() - start < 3


@contextmanager
def trickling_server() -> Iterator[str]:
    """A server that answers one byte per 0.1 s (8 s for the answer), at the URL yielded."""
    answer = (
        b'HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{"ok":true,"kms_public_key":"00","x":1}\n'
    )
    stop = threading.Event()

    def trickle(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in answer:
                if stop.wait(0.1):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        server = threading.Thread(target=trickle, args=(listener,))
        server.start()
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            stop.set()
            server.join()


def test_a_trickling_kms_cannot_outlast_the_request_timeout() -> None:
    """Slowloris: a server sending its answer one byte at a time never lets a single recv
    time out; the exchange as a whole is still cut at ``request_timeout_s``."""
    with trickling_server() as url:
        status = probe(url, 0.5)  # against an 8 s answer
    assert not status.reachable
    assert status.error == "timed out"


def test_a_trickling_peer_cannot_stall_the_cross_check() -> None:
    """``kms serve`` asks its peers before it serves: a peer (or the network) trickling its
    answer must not hold the replica back past the check's timeout."""
    with trickling_server() as url, pytest.raises(KmsError, match="cannot ask peer .*timed out"):
        served_by(url, bytes(32), 0.5)
