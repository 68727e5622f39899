"""The KMS's TDX path with a genuine quote and Intel collateral (sealfs.attest.dcap).

The quote's collateral is valid only in mid-2025, so these tests run the real server code
in-process with its clock set inside that window. The quote then passes DCAP, and is refused
at the next step because its report_data was not made for this KMS's nonce: exactly what a
replayed genuine quote must get.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest

from sealfs.kms import protocol as P
from sealfs.kms.service import ServiceConfig
from sealfs.kms.verify import verify_tdx
from tests.tdx_vectors import TDX_VECTORS

from .conftest import InProcessKms, KmsState, attester, envelope, make_state, post

TESTDATA = TDX_VECTORS
IN_WINDOW = dt.datetime(2025, 7, 1, tzinfo=dt.UTC).timestamp()


def quote_and_collateral() -> tuple[bytes, dict[str, object]]:
    return (
        (TESTDATA / "tdx_quote").read_bytes(),
        json.loads((TESTDATA / "tdx_quote_collateral.json").read_text()),
    )


def test_verify_tdx_maps_the_dcap_report() -> None:
    quote, coll = quote_and_collateral()
    rep = verify_tdx(quote, coll, IN_WINDOW)
    assert rep.tee == "tdx" and rep.tcb_status == "UpToDate"
    assert len(rep.mrtd) == 48 and len(rep.rtmr3) == 48 and len(rep.report_data) == 64


@pytest.fixture
def state(tmp_path: Path) -> KmsState:
    return make_state(tmp_path)


def tdx_body(port: int, coll: dict[str, object] | None) -> dict[str, object]:
    quote, _ = quote_and_collateral()
    body, _, _ = envelope(port, attester(), P.GetKey("volume-wrap", b"vol"))
    body.update(tee="tdx", quote=base64.b64encode(quote).decode(), collateral=coll)
    return body


def test_genuine_quote_passes_dcap_then_fails_the_binding(state: KmsState) -> None:
    _, coll = quote_and_collateral()
    with InProcessKms(state, ServiceConfig(clock=lambda: IN_WINDOW)) as srv:
        status, resp = post(srv.port, "/v1/key", tdx_body(srv.port, coll))
    assert (status, resp["error"]) == (401, "attestation_failed")
    assert "report_data does not bind" in resp["message"]


def test_collateral_outside_its_window(state: KmsState) -> None:
    _, coll = quote_and_collateral()
    late = dt.datetime(2025, 7, 19, 10, 0, 36, tzinfo=dt.UTC).timestamp()
    with InProcessKms(state, ServiceConfig(clock=lambda: late)) as srv:
        status, resp = post(srv.port, "/v1/key", tdx_body(srv.port, coll))
    assert (status, resp["error"]) == (401, "attestation_failed")
    assert "quote rejected" in resp["message"]


def test_tampered_or_missing_collateral(state: KmsState) -> None:
    _, coll = quote_and_collateral()
    bad = dict(coll)
    sig = str(bad["tcb_info_signature"])
    bad["tcb_info_signature"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    with InProcessKms(state, ServiceConfig(clock=lambda: IN_WINDOW)) as srv:
        for c in (bad, {"tcb_info": "x"}, None):
            status, resp = post(srv.port, "/v1/key", tdx_body(srv.port, c))
            assert (status, resp["error"]) == (401, "attestation_failed"), c


def test_operator_collateral_is_used_when_the_request_has_none(state: KmsState) -> None:
    _, coll = quote_and_collateral()
    config = ServiceConfig(clock=lambda: IN_WINDOW, default_collateral=coll)
    with InProcessKms(state, config) as srv:
        status, resp = post(srv.port, "/v1/key", tdx_body(srv.port, None))
    assert "report_data does not bind" in resp["message"]
