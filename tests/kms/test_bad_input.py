"""Hostile and broken input against the running KMS: every case gets a clear error status,
is logged, leaks nothing, and the server keeps serving."""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from sealfs.attest.eventlog import RuntimeEvent
from sealfs.crypto import Secret
from sealfs.kms import protocol as P
from sealfs.kms.service import ServiceConfig
from tests.tdx_vectors import TDX_VECTORS

from .conftest import (
    InProcessKms,
    KmsProcess,
    KmsState,
    attester,
    envelope,
    fresh_nonce,
    get,
    post,
    raw_http,
)

TESTDATA = TDX_VECTORS
VOL = b"vol"
GETKEY = P.GetKey("volume-wrap", VOL)


@pytest.fixture(autouse=True)
def still_serving(kms: KmsProcess):  # type: ignore[no-untyped-def]
    """After every case the server is alive and answers."""
    yield
    assert kms.alive()
    status, info = get(kms.port, "/v1/info")
    assert status == 200 and info["ok"] is True


def assert_error(resp: tuple[int, dict[str, Any]], status: int, code: str) -> dict[str, Any]:
    got_status, body = resp
    assert (got_status, body.get("error")) == (status, code), body
    assert set(body) == {"ok", "error", "message"} and body["ok"] is False
    assert "\n" not in body["message"] and len(body["message"]) < 200
    return body


# --- HTTP framing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, status, code",
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET /v1/info HTTP/2.0\r\n\r\n", 400, "bad_request"),
        (b"GET /v1/info HTTP/1.1\r\n bad: fold\r\n\r\n", 400, "bad_request"),
        (b"GET /v1/info HTTP/1.1\r\nName : space\r\n\r\n", 400, "bad_request"),
        (b"POST /v1/key HTTP/1.1\r\nHost: x\r\n\r\n", 411, "length_required"),
        (
            b"POST /v1/key HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            411,
            "length_required",
        ),
        (
            b"POST /v1/key HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
            "bad_request",
        ),
        (b"POST /v1/key HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "bad_request"),
        (b"POST /v1/key HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413, "too_large"),
        (b"GET /v1/info HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET /v1/info HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n", 431, "headers_too_large"),
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404, "not_found"),
        (b"GET /v1/key HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
        (b"DELETE /v1/info HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
        (b"POST /v1/key HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", 400, "bad_request"),
    ],
)
def test_http_framing_errors(kms: KmsProcess, raw: bytes, status: int, code: str) -> None:
    assert_error(raw_http(kms.port, raw), status, code)


def test_oversized_body_is_refused_before_reading_it(kms: KmsProcess) -> None:
    big = b"x" * (P.MAX_BODY_BYTES + 1)
    assert_error(post(kms.port, "/v1/key", big), 413, "too_large")


def test_slow_sender_times_out(kms: KmsProcess) -> None:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", kms.port), timeout=10) as s:
        s.sendall(b"POST /v1/key HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        data = s.recv(4096)
    assert b" 408 " in data.split(b"\r\n")[0]
    assert time.monotonic() - start < 5  # the server runs with --request-timeout 1.5


def test_silent_connection_is_closed(kms: KmsProcess) -> None:
    with socket.create_connection(("127.0.0.1", kms.port), timeout=10) as s:
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""


# --- JSON and protocol fields ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'"text"',
        b"\xff\xfe",
        b"[" * 50000 + b"]" * 50000,
        b'{"version": 1, "version": 1}',
    ],
)
def test_malformed_json(kms: KmsProcess, body: bytes) -> None:
    assert_error(post(kms.port, "/v1/key", body), 400, "bad_request")


def mutate(kms: KmsProcess, **changes: Any) -> dict[str, Any]:
    body, _, _ = envelope(kms.port, attester(), GETKEY)
    for k, v in changes.items():
        if v is KeyError:
            body.pop(k)
        else:
            body[k] = v
    return body


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"version": 2}, "protocol version"),
        ({"version": True}, "protocol version"),
        ({"surprise": 1}, "unknown field"),
        ({"quote": KeyError}, "missing field"),
        ({"tee": "sgx"}, "tee must be"),
        ({"nonce": "zz" * 32}, "nonce"),
        ({"nonce": "00" * 31}, "nonce"),
        ({"public_key": "00" * 33}, "public_key"),
        ({"quote": "***"}, "quote"),
        ({"quote": "A" * 200000}, "quote"),
        ({"params": [1]}, "params"),
        ({"params": {"purpose": "root", "volume_id": "00", "key_version": None}}, "purpose"),
        (
            {"params": {"purpose": "volume-wrap", "volume_id": "00" * 65, "key_version": None}},
            "volume_id",
        ),
        (
            {"params": {"purpose": "volume-wrap", "volume_id": "00", "key_version": 0}},
            "key_version",
        ),
        (
            {"params": {"purpose": "volume-wrap", "volume_id": "00", "key_version": "1"}},
            "key_version",
        ),
        ({"params": {"purpose": "volume-wrap", "volume_id": "00"}}, "missing field"),
        ({"event_log": {"event": "x"}}, "event log"),
        ({"event_log": [{"event": "a:b", "payload": ""}]}, "event name"),
        ({"collateral": "text"}, "collateral"),
        ({"app_id": "00" * 65}, "app_id"),
    ],
)
def test_malformed_fields(kms: KmsProcess, changes: dict[str, Any], message: str) -> None:
    code = "unsupported_version" if "version" in changes else "bad_request"
    body = assert_error(post(kms.port, "/v1/key", mutate(kms, **changes)), 400, code)
    assert message in body["message"]


@pytest.mark.parametrize(
    "params",
    [
        {"volume_id": "00", "epoch": -1, "root_digest": "00" * 32},
        {"volume_id": "00", "epoch": 2**63, "root_digest": "00" * 32},
        {"volume_id": "00", "epoch": True, "root_digest": "00" * 32},
        {"volume_id": "00", "epoch": 1, "root_digest": "00" * 8},
        {"volume_id": "", "epoch": 1, "root_digest": "00" * 32},
    ],
)
def test_malformed_epoch_params(kms: KmsProcess, params: dict[str, Any]) -> None:
    body = mutate(kms, params=params)
    assert_error(post(kms.port, "/v1/epoch/advance", body), 400, "bad_request")


# --- attestation failures ----------------------------------------------------------------------


def test_unknown_nonce(kms: KmsProcess) -> None:
    body, _, _ = envelope(kms.port, attester(), GETKEY, nonce=b"\x42" * 32)
    assert_error(post(kms.port, "/v1/key", body), 401, "bad_nonce")


def test_replayed_nonce(kms: KmsProcess) -> None:
    nonce = fresh_nonce(kms.port)
    body, _, _ = envelope(kms.port, attester(), GETKEY, nonce=nonce)
    assert post(kms.port, "/v1/key", body)[0] == 200
    body2, _, _ = envelope(kms.port, attester(), GETKEY, nonce=nonce)  # fresh quote, old nonce
    assert_error(post(kms.port, "/v1/key", body2), 401, "bad_nonce")


def test_nonce_is_spent_even_when_the_request_fails(kms: KmsProcess) -> None:
    nonce = fresh_nonce(kms.port)
    bad, _, _ = envelope(kms.port, attester(), GETKEY, nonce=nonce, report_data=bytes(64))
    assert_error(post(kms.port, "/v1/key", bad), 401, "attestation_failed")
    good, _, _ = envelope(kms.port, attester(), GETKEY, nonce=nonce)
    assert_error(post(kms.port, "/v1/key", good), 401, "bad_nonce")


def test_wrong_report_data(kms: KmsProcess) -> None:
    body, _, _ = envelope(kms.port, attester(), GETKEY, report_data=b"\x01" * 64)
    msg = assert_error(post(kms.port, "/v1/key", body), 401, "attestation_failed")["message"]
    assert "report_data" in msg


def test_parameters_changed_in_transit(kms: KmsProcess) -> None:
    """An attacker who rewrites the purpose or volume breaks the report_data binding."""
    body, _, _ = envelope(kms.port, attester(), GETKEY)
    body["params"]["purpose"] = "luks-passphrase"
    assert_error(post(kms.port, "/v1/key", body), 401, "attestation_failed")
    body, _, _ = envelope(kms.port, attester(), GETKEY)
    body["public_key"] = "11" * 32  # swap in the attacker's key
    assert_error(post(kms.port, "/v1/key", body), 401, "attestation_failed")


def test_tampered_quote(kms: KmsProcess) -> None:
    body, _, _ = envelope(kms.port, attester(), GETKEY)
    quote = bytearray(base64.b64decode(body["quote"]))
    quote[40] ^= 0x80  # inside MRTD
    body["quote"] = base64.b64encode(bytes(quote)).decode()
    msg = assert_error(post(kms.port, "/v1/key", body), 401, "attestation_failed")["message"]
    assert "signature" in msg


def test_event_log_that_does_not_match_rtmr3(kms: KmsProcess) -> None:
    att = attester()
    events = [*att.event_log(), RuntimeEvent("unmeasured", b"x")]
    body, _, _ = envelope(kms.port, att, GETKEY, events=events)
    msg = assert_error(post(kms.port, "/v1/key", body), 401, "attestation_failed")["message"]
    assert "RTMR3" in msg


def test_identity_emitted_after_boot_is_refused(kms: KmsProcess) -> None:
    att = attester()
    att.emit_event("app-id", bytes.fromhex("b2" * 20))  # an app trying to re-label itself
    body, _, _ = envelope(kms.port, att, GETKEY)
    body.pop("app_id")
    msg = assert_error(post(kms.port, "/v1/key", body), 401, "attestation_failed")["message"]
    assert "after boot-mr-done" in msg


def test_expired_simulated_collateral(kms: KmsProcess) -> None:
    att = attester(validity=(0, int(time.time()) - 1))
    body, _, _ = envelope(kms.port, att, GETKEY)
    msg = assert_error(post(kms.port, "/v1/key", body), 401, "attestation_failed")["message"]
    assert "collateral expired" in msg


def test_missing_collateral(kms: KmsProcess) -> None:
    body = mutate(kms, collateral=None)
    assert_error(post(kms.port, "/v1/key", body), 401, "attestation_failed")


def test_real_tdx_quote_with_expired_collateral(kms: KmsProcess) -> None:
    """A genuine TDX quote whose Intel collateral has expired is refused by DCAP."""
    body = mutate(
        kms,
        tee="tdx",
        quote=base64.b64encode((TESTDATA / "tdx_quote").read_bytes()).decode(),
        collateral=json.loads((TESTDATA / "tdx_quote_collateral.json").read_text()),
    )
    msg = assert_error(post(kms.port, "/v1/key", body), 401, "attestation_failed")["message"]
    assert "not valid at" in msg or "expired" in msg


def test_refusals_are_logged(kms: KmsProcess) -> None:
    body, _, _ = envelope(kms.port, attester(), GETKEY, report_data=b"\x01" * 64)
    post(kms.port, "/v1/key", body)
    assert "POST /v1/key -> 401 attestation_failed" in kms.log()


# --- limits that need a controllable server ----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def inproc_state(tmp_path: Path) -> KmsState:
    from .conftest import make_state

    return make_state(tmp_path)


def test_expired_nonce(inproc_state: KmsState) -> None:
    clock = Clock()
    config = ServiceConfig(allow_simulated=True, nonce_ttl_s=30, clock=clock)
    with InProcessKms(inproc_state, config) as srv:
        body, _, _ = envelope(srv.port, attester(), GETKEY)
        clock.now += 31
        assert_error(post(srv.port, "/v1/key", body), 401, "bad_nonce")


def test_nonce_flood_evicts_but_never_reuses(inproc_state: KmsState) -> None:
    config = ServiceConfig(allow_simulated=True, max_outstanding_nonces=8)
    with InProcessKms(inproc_state, config) as srv:
        body, _, _ = envelope(srv.port, attester(), GETKEY)
        for _ in range(10):
            fresh_nonce(srv.port)
        assert_error(post(srv.port, "/v1/key", body), 401, "bad_nonce")
        assert len(srv.service.nonces._live) <= 8


def test_tampered_state_gives_generic_error(inproc_state: KmsState) -> None:
    import sqlite3

    with InProcessKms(inproc_state, ServiceConfig(allow_simulated=True)) as srv:
        conn = sqlite3.connect(inproc_state.path)  # edited under the running KMS
        conn.execute("UPDATE policies SET mac = zeroblob(32)")
        conn.commit()
        conn.close()
        body, _, _ = envelope(srv.port, attester(), GETKEY)
        msg = assert_error(post(srv.port, "/v1/key", body), 500, "internal")["message"]
        assert msg == "KMS internal error"


def test_wrong_operator_secret_cannot_start_a_server(inproc_state: KmsState) -> None:
    from sealfs.errors import UnlockError

    with pytest.raises(UnlockError):
        inproc_state.store.unlock(Secret(b"not the operator secret"))
