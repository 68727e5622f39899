"""Key release against a running KMS: determinism, isolation between apps, eavesdroppers,
replays, tampering in transit, rotation and policy denials."""

from __future__ import annotations

import http.server
import json
import logging
import sqlite3
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sealfs.crypto import AuthError, EphemeralKeyPair, Secret, SigningKey, seal_to_public
from sealfs.errors import AttestationError, KmsError, UsageError
from sealfs.kms import protocol as P
from sealfs.kms.client import KmsClient
from sealfs.kms.derivation import app_key

from .conftest import (
    APP_A,
    APP_B,
    COMPOSE_A,
    KmsProcess,
    KmsState,
    attester,
    envelope,
    get,
    make_state,
    post,
    sim_policy,
    start_kms,
)

VOL = b"volume-0001"


def client(kms: KmsProcess, app_id: bytes = APP_A, **kw: Any) -> KmsClient:
    att = kw.pop("att", None) or attester(app_id)
    return KmsClient(
        kms.url,
        app_id,
        att,
        trusted_keys=[kms.public_key],
        deadline_s=kw.pop("deadline_s", 5),
        **kw,
    )


def test_get_key_is_deterministic_and_matches_derivation(kms: KmsProcess, state: KmsState) -> None:
    c = client(kms)
    key, version = c.get_key("volume-wrap", VOL)
    assert version == 1 and len(key) == 32
    assert c.get_key("volume-wrap", VOL) == (key, 1)
    assert key == app_key(state.root, "volume-wrap", APP_A, 1, VOL)
    others = {c.get_key(p, VOL)[0].reveal() for p in ("luks-passphrase", "epoch-signing")}
    assert key.reveal() not in others and len(others) == 2
    # Another CVM of the same app (fresh instance, same measurements) gets the same key.
    again = client(kms, att=attester(APP_A, instance_id=b"another-instance"))
    assert again.get_key("volume-wrap", VOL)[0] == key


def test_replica_sharing_the_root_gives_the_same_keys(
    kms: KmsProcess, state: KmsState, tmp_path: Path
) -> None:
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    src = sqlite3.connect(state.path)
    dst = sqlite3.connect(replica_dir / "kms.db")
    src.backup(dst)
    src.close()
    dst.close()
    (replica_dir / "kms.db").chmod(0o600)
    replica_state = KmsState(
        replica_dir / "kms.db", state.secret_file, state.store, state.macs, state.root
    )
    replica = start_kms(replica_state, "--allow-simulated", log_name="replica.log")
    try:
        assert replica.public_key == kms.public_key  # identity derives from the root too
        assert client(replica).get_key("volume-wrap", VOL) == client(kms).get_key(
            "volume-wrap", VOL
        )
    finally:
        replica.stop()


def test_one_app_cannot_get_another_apps_key(kms: KmsProcess) -> None:
    key_a, _ = client(kms, APP_A).get_key("volume-wrap", VOL)
    key_b, _ = client(kms, APP_B).get_key("volume-wrap", VOL)
    assert key_a != key_b

    # B's CVM asking as A: its own measured log says B, so the client refuses up front ...
    with pytest.raises(AttestationError, match="measured app id"):
        KmsClient(kms.url, APP_A, attester(APP_B), trusted_keys=[kms.public_key]).get_key(
            "volume-wrap", VOL
        )
    # ... and a hand-made request that claims A is refused by the KMS.
    params = P.GetKey("volume-wrap", VOL)
    body, _, _ = envelope(kms.port, attester(APP_B), params, app_id=APP_A)
    status, resp = post(kms.port, "/v1/key", body)
    assert (status, resp["error"]) == (403, "app_id_mismatch")
    # B's quote presented with A's event log does not replay to B's RTMR3.
    body, _, _ = envelope(kms.port, attester(APP_B), params, events=attester(APP_A).event_log())
    body.pop("app_id")
    status, resp = post(kms.port, "/v1/key", body)
    assert (status, resp["error"]) == (401, "attestation_failed")
    assert "RTMR3" in resp["message"]
    # An app with no policy gets nothing.
    stranger = bytes.fromhex("c3" * 20)
    with pytest.raises(AttestationError, match="unknown_app"):
        client(kms, stranger, att=attester(stranger, compose=COMPOSE_A)).get_key("volume-wrap", VOL)


def test_recorded_exchange_is_useless_to_an_eavesdropper(kms: KmsProcess, state: KmsState) -> None:
    params = P.GetKey("volume-wrap", VOL)
    body, eph, nonce = envelope(kms.port, attester(), params)
    status, resp = post(kms.port, "/v1/key", body)
    assert status == 200, resp
    recorded = json.dumps(body) + json.dumps(resp)
    real = app_key(state.root, "volume-wrap", APP_A, 1, VOL)
    assert real.reveal().hex() not in recorded and real.reveal() not in recorded.encode()

    r = resp["result"]
    enc, ct = bytes.fromhex(r["enc"]), bytes.fromhex(r["ciphertext"])
    info = P.key_release_info(APP_A, "volume-wrap", VOL, 1, nonce)
    assert eph.open_sealed(enc, ct, info) == real  # only the CVM's ephemeral key opens it
    with pytest.raises(AuthError):
        EphemeralKeyPair().open_sealed(enc, ct, info)

    # Replaying the recorded request gets nothing: the nonce is spent ...
    status, again = post(kms.port, "/v1/key", body)
    assert (status, again["error"]) == (401, "bad_nonce")
    # ... and a nonce is only good at the KMS that issued it, so another replica refuses too.
    other = start_kms(
        make_state(state.path.parent / "other"), "--allow-simulated", log_name="other.log"
    )
    try:
        status, again = post(other.port, "/v1/key", body)
        assert (status, again["error"]) == (401, "bad_nonce")
    finally:
        other.stop()


class TamperingProxy:
    """A network attacker between CVM and KMS: forwards requests, rewrites key answers."""

    def __init__(self, upstream: str, mode: str) -> None:
        proxy = self
        self.mode = mode
        self.forged_key = Secret.generate()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n) if n else None
                req = urllib.request.Request(
                    upstream + self.path,
                    data=data,
                    method=method,
                    headers={"Content-Type": "application/json"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=5) as r:
                        status, payload = r.status, json.loads(r.read())
                except urllib.error.HTTPError as e:
                    status, payload = e.code, json.loads(e.read())
                payload = proxy.rewrite(self.path, data, payload)
                out = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def do_GET(self) -> None:  # noqa: N802
                self._forward("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._forward("POST")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.attacker_key = SigningKey(Secret.generate())

    def rewrite(self, path: str, request: bytes | None, payload: dict[str, Any]) -> dict[str, Any]:
        if path == "/v1/key" and payload.get("ok") and request:
            req = json.loads(request)
            r = payload["result"]
            info = P.key_release_info(
                bytes.fromhex(r["app_id"]),
                req["params"]["purpose"],
                bytes.fromhex(req["params"]["volume_id"]),
                r["key_version"],
                bytes.fromhex(req["nonce"]),
            )
            enc, ct = seal_to_public(bytes.fromhex(req["public_key"]), self.forged_key, info)
            r["enc"], r["ciphertext"] = enc.hex(), ct.hex()
            if self.mode == "resign":
                payload["kms_public_key"] = self.attacker_key.public_bytes.hex()
                rd = P.report_data_for(
                    bytes.fromhex(req["nonce"]),
                    bytes.fromhex(req["public_key"]),
                    P.GetKey.from_wire(req["params"]),
                )
                parts = P.get_key_result_parts(
                    bytes.fromhex(r["app_id"]), r["key_version"], enc, ct
                )
                payload["signature"] = self.attacker_key.sign(
                    P.response_message("get_key", rd, parts)
                ).hex()
        if path == "/v1/info" and self.mode == "resign":
            payload["kms_public_key"] = self.attacker_key.public_bytes.hex()
        return payload

    def __enter__(self) -> TamperingProxy:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("mode", ["swap", "resign"])
def test_substituted_key_in_transit_is_rejected(kms: KmsProcess, mode: str) -> None:
    with TamperingProxy(kms.url, mode) as proxy:
        c = KmsClient(proxy.url, APP_A, attester(), trusted_keys=[kms.public_key], deadline_s=5)
        with pytest.raises(KmsError, match="signature is invalid|not a trusted KMS identity"):
            c.get_key("volume-wrap", VOL)


def test_unpinned_client_fails_closed_before_any_request(kms: KmsProcess) -> None:
    c = KmsClient(kms.url, APP_A, attester(), deadline_s=5)
    with pytest.raises(UsageError, match="no trusted KMS identity.*--kms-public-key"):
        c.get_key("volume-wrap", VOL)
    assert c.answering_key is None


def test_trust_on_first_use_is_explicit_and_logged_loudly(
    kms: KmsProcess, caplog: pytest.LogCaptureFixture
) -> None:
    c = KmsClient(kms.url, APP_A, attester(), deadline_s=5, trust_on_first_use=True)
    with caplog.at_level(logging.WARNING, "sealfs.kms.client"):
        c.get_key("volume-wrap", VOL)
    assert c.trusted_keys == (kms.public_key,) and c.answering_key == kms.public_key
    assert "INSECURE" in caplog.text and "first use" in caplog.text


def test_key_provider_event_pins_the_kms(kms: KmsProcess) -> None:
    good = attester(key_provider=P.key_provider_payload(kms.public_key))
    c = KmsClient(kms.url, APP_A, good, deadline_s=5)
    c.get_key("volume-wrap", VOL)
    assert c.trusted_keys == (kms.public_key,)
    wrong = attester(key_provider=P.key_provider_payload(bytes(32)))
    with pytest.raises(KmsError, match="not a trusted KMS identity"):
        KmsClient(kms.url, APP_A, wrong, deadline_s=5).get_key("volume-wrap", VOL)


def test_any_of_several_pinned_replica_keys_is_accepted(kms: KmsProcess) -> None:
    c = KmsClient(
        kms.url, APP_A, attester(), deadline_s=5, trusted_keys=[bytes(range(32)), kms.public_key]
    )
    c.get_key("volume-wrap", VOL)
    assert c.answering_key == kms.public_key


@pytest.fixture
def rotating_app(state: KmsState) -> Iterator[bytes]:
    app = bytes.fromhex("d4" * 20)
    state.put(sim_policy(app, COMPOSE_A))
    yield app
    state.store.delete_policy(state.macs, app)


def test_rotation_keeps_old_versions_derivable(
    kms: KmsProcess, state: KmsState, rotating_app: bytes
) -> None:
    c = client(kms, rotating_app, att=attester(rotating_app, compose=COMPOSE_A))
    v1, n1 = c.get_key("volume-wrap", VOL)
    state.store.rotate_policy(state.macs, rotating_app)
    v2, n2 = c.get_key("volume-wrap", VOL)
    assert (n1, n2) == (1, 2) and v1 != v2
    assert c.get_key("volume-wrap", VOL, key_version=1) == (v1, 1)
    with pytest.raises(KmsError, match="bad_key_version"):
        c.get_key("volume-wrap", VOL, key_version=3)


def test_retired_version_is_refused_and_the_rest_still_released(
    kms: KmsProcess, state: KmsState, rotating_app: bytes
) -> None:
    """The running KMS reads the retirement at the next request; only that version stops."""
    c = client(kms, rotating_app, att=attester(rotating_app, compose=COMPOSE_A))
    state.store.rotate_policy(state.macs, rotating_app)
    state.store.rotate_policy(state.macs, rotating_app)
    v2 = c.get_key("volume-wrap", VOL, key_version=2)
    state.store.retire_version(state.macs, rotating_app, 1)
    with pytest.raises(KmsError, match="key_version_retired.*key version 1 .*recovery slot"):
        c.get_key("volume-wrap", VOL, key_version=1)
    assert c.get_key("volume-wrap", VOL, key_version=2) == v2
    assert c.get_key("volume-wrap", VOL)[1] == 3
    assert "refused retired key v1" in kms.log()


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"compose": b"\x09" * 32}, "compose hash"),
        ({"mrtd": b"\x09" * 48}, "MRTD"),
        ({"rtmr1": b"\x09" * 48}, "MRTD/RTMR0-2"),
        ({"tcb_status": "OutOfDate"}, "TCB status"),
        ({"debug": True}, "debug"),
    ],
)
def test_policy_denials(kms: KmsProcess, kw: dict[str, Any], reason: str) -> None:
    with pytest.raises(AttestationError, match=reason):
        client(kms, att=attester(APP_A, **kw)).get_key("volume-wrap", VOL)
    assert get(kms.port, "/v1/info")[0] == 200


def test_simulated_quotes_need_the_explicit_flag(state: KmsState) -> None:
    strict = start_kms(state, log_name="strict.log")
    try:
        status, info = get(strict.port, "/v1/info")
        assert status == 200 and info["simulated_allowed"] is False
        with pytest.raises(AttestationError, match="simulated attestation is disabled"):
            client(strict).get_key("volume-wrap", VOL)
        assert "SIMULATED" not in strict.log()
    finally:
        strict.stop()


def test_simulated_quotes_need_the_apps_opt_in_too(kms: KmsProcess, state: KmsState) -> None:
    """A KMS started with --allow-simulated still refuses forged quotes for production apps."""
    prod = bytes.fromhex("e6" * 20)
    state.put(sim_policy(prod, COMPOSE_A, allow_simulated=False))
    try:
        with pytest.raises(AttestationError, match="simulated TEEs are not allowed"):
            client(kms, prod, att=attester(prod, compose=COMPOSE_A)).get_key("volume-wrap", VOL)
    finally:
        state.store.delete_policy(state.macs, prod)


def test_simulated_mode_is_loud(kms: KmsProcess) -> None:
    client(kms).get_key("volume-wrap", VOL)
    log = kms.log()
    assert "--allow-simulated" in log and "accepted a SIMULATED quote" in log


def test_keys_and_secrets_never_reach_the_log(kms: KmsProcess, state: KmsState) -> None:
    released = [client(kms).get_key(p, VOL)[0] for p in P.PURPOSES]
    log = kms.log()
    for key in [*released, state.root]:
        assert key.reveal().hex() not in log
    assert "operator secret for the kms tests" not in log
    assert "released volume-wrap key v1" in log  # decisions are logged, values are not
