"""Volume freshness anchors at the running KMS."""

from __future__ import annotations

import pytest

from sealfs.errors import KmsError
from sealfs.kms import protocol as P
from sealfs.kms.client import EpochRefused, KmsClient

from .conftest import APP_A, APP_B, KmsProcess, KmsState, attester, envelope, post, start_kms

D1, D2, D3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def client(kms: KmsProcess, app_id: bytes = APP_A) -> KmsClient:
    return KmsClient(kms.url, app_id, attester(app_id), trusted_keys=[kms.public_key], deadline_s=5)


def test_advance_and_get(kms: KmsProcess) -> None:
    c = client(kms)
    vol = b"epoch-basic"
    assert c.get_epoch(vol) == (0, b"")
    assert c.advance_epoch(vol, 1, D1) == (1, D1)
    assert c.get_epoch(vol) == (1, D1)
    assert c.advance_epoch(vol, 1, D1) == (1, D1)  # idempotent retry after a lost answer
    assert c.advance_epoch(vol, 5, D2) == (5, D2)  # gaps are fine (crash between advances)
    with pytest.raises(EpochRefused) as e:
        c.advance_epoch(vol, 4, D3)
    assert e.value.reason == "rollback"
    with pytest.raises(EpochRefused) as e:
        c.advance_epoch(vol, 5, D3)
    assert e.value.reason == "fork"
    assert c.get_epoch(vol) == (5, D2)


def test_one_app_cannot_touch_another_apps_epochs(kms: KmsProcess) -> None:
    a, b = client(kms, APP_A), client(kms, APP_B)
    vol = b"shared-volume-id"
    a.advance_epoch(vol, 10, D1)
    # B sees nothing of A's volume, and B's advances land in B's own namespace.
    assert b.get_epoch(vol) == (0, b"")
    b.advance_epoch(vol, 99, D2)
    assert a.get_epoch(vol) == (10, D1)
    with pytest.raises(EpochRefused):
        a.advance_epoch(vol, 9, D1)


def test_epoch_changed_in_transit_is_refused(kms: KmsProcess) -> None:
    params = P.AdvanceEpoch(b"epoch-mitm", 7, D1)
    body, _, _ = envelope(kms.port, attester(), params)
    body["params"]["epoch"] = 1000  # an attacker pushing the anchor ahead to brick the volume
    status, resp = post(kms.port, "/v1/epoch/advance", body)
    assert (status, resp["error"]) == (401, "attestation_failed")
    assert client(kms).get_epoch(b"epoch-mitm") == (0, b"")


def test_epochs_survive_a_restart(state: KmsState) -> None:
    first = start_kms(state, "--allow-simulated", log_name="restart1.log")
    try:
        client(first).advance_epoch(b"durable", 3, D3)
    finally:
        first.stop()
    second = start_kms(state, "--allow-simulated", log_name="restart2.log")
    try:
        assert client(second).get_epoch(b"durable") == (3, D3)
    finally:
        second.stop()


def test_client_checks_arguments_before_any_io() -> None:
    c = KmsClient("http://127.0.0.1:9", APP_A, attester(), deadline_s=0.1)
    with pytest.raises(KmsError, match="epoch"):
        c.advance_epoch(b"v", -1, D1)
    with pytest.raises(KmsError, match="root_digest"):
        c.advance_epoch(b"v", 1, b"short")
    with pytest.raises(KmsError, match="purpose"):
        c.get_key("master", b"v")
    with pytest.raises(KmsError, match="volume_id"):
        c.get_epoch(b"")
