"""TD attribute and MRSERVICETD policy: what a TDX deployment requires beyond Intel's QVL.

A real `sealfs kms serve` on 127.0.0.1 refuses CVMs whose quote violates each option of the
default policy, with the reason in the answer and in its log, and releases the key once the
app's policy opts out. The real Intel quotes in tests/data/tdx meet the defaults.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from sealfs.attest.eventlog import AppIdentity
from sealfs.attest.quote import TD_ATTR_SEPT_VE_DISABLE, decode_quote_input, parse_quote
from sealfs.errors import AttestationError, UsageError
from sealfs.kms.client import KmsClient
from sealfs.kms.policy import AppPolicy, Measurement
from sealfs.kms.verify import QuoteReport
from tests.tdx_vectors import TDX_VECTORS

from .conftest import COMPOSE_A, KmsProcess, KmsState, attester, sim_policy

TESTDATA = TDX_VECTORS
SEPT = TD_ATTR_SEPT_VE_DISABLE
RELAXED_APP = bytes.fromhex("d7" * 20)

# (attester keywords, reason the KMS gives, the policy option that lets it through)
VIOLATIONS = [
    ({"td_attributes": 0}, "SEPT_VE_DISABLE is not set", "require_sept_ve_disable"),
    (
        {"td_attributes": SEPT | 1 << 1},
        "reserved TD attribute bits",
        "allow_reserved_td_attributes",
    ),
    (
        {"td_attributes": SEPT | 1 << 29},
        "reserved TD attribute bits",
        "allow_reserved_td_attributes",
    ),
    (
        {"td_attributes": SEPT | 1 << 40},
        "reserved TD attribute bits",
        "allow_reserved_td_attributes",
    ),
    ({"mr_servicetd": b"\x01" + bytes(47)}, "MRSERVICETD is not zero", "allow_service_td"),
]


def get_key(kms: KmsProcess, app_id: bytes, **attester_kw: Any) -> bytes:
    att = attester(app_id, compose=COMPOSE_A, **attester_kw)
    client = KmsClient(kms.url, app_id, att, trusted_keys=[kms.public_key], deadline_s=5)
    return client.get_key("volume-wrap", b"volume-td-policy")[0].reveal()


@pytest.mark.parametrize(("attester_kw", "reason", "option"), VIOLATIONS)
def test_kms_refuses_each_violation_with_its_reason(
    kms: KmsProcess, attester_kw: dict[str, Any], reason: str, option: str
) -> None:
    with pytest.raises(AttestationError, match=f"policy_denied.*{reason}"):
        get_key(kms, bytes.fromhex("a1" * 20), **attester_kw)
    assert reason in kms.log()


@pytest.fixture
def relaxed_app(state: KmsState) -> Iterator[bytes]:
    yield RELAXED_APP
    state.store.delete_policy(state.macs, RELAXED_APP)


@pytest.mark.parametrize(("attester_kw", "reason", "option"), VIOLATIONS)
def test_each_option_lets_only_its_own_violation_through(
    kms: KmsProcess,
    state: KmsState,
    relaxed_app: bytes,
    attester_kw: dict[str, Any],
    reason: str,
    option: str,
) -> None:
    relaxed = {option: option != "require_sept_ve_disable"}  # the non-default value
    state.put(sim_policy(relaxed_app, COMPOSE_A, **relaxed))
    assert len(get_key(kms, relaxed_app, **attester_kw)) == 32
    others = [kw for kw, _, opt in VIOLATIONS if opt != option]
    for kw in others:
        with pytest.raises(AttestationError, match="policy_denied"):
            get_key(kms, relaxed_app, **kw)


def test_policy_documents_default_to_the_secure_choice() -> None:
    written_before = {"app_id": "aa", "measurements": [], "compose_hashes": []}
    policy = AppPolicy.from_dict(written_before)
    assert policy.require_sept_ve_disable
    assert not policy.allow_reserved_td_attributes and not policy.allow_service_td
    doc = policy.to_dict()
    assert AppPolicy.from_dict(json.loads(json.dumps(doc))) == policy
    for flag in ("require_sept_ve_disable", "allow_reserved_td_attributes", "allow_service_td"):
        with pytest.raises(UsageError, match=flag):
            AppPolicy.from_dict({**doc, flag: "yes"})


@pytest.mark.parametrize("name", ["tdx_quote", "tdx_quote_outdated", "quote-from-tappd.hex"])
def test_real_tdx_quotes_meet_the_default_policy(name: str) -> None:
    """Every real quote at hand sets SEPT_VE_DISABLE only and binds no service TD."""
    td = parse_quote(decode_quote_input((TESTDATA / name).read_bytes())).report
    report = QuoteReport(
        tee="tdx",
        mrtd=td.mr_td,
        rtmr0=td.rtmrs[0],
        rtmr1=td.rtmrs[1],
        rtmr2=td.rtmrs[2],
        rtmr3=td.rtmrs[3],
        report_data=td.report_data,
        tcb_status="UpToDate",
        td_attributes=td.td_attributes,
        mr_servicetd=td.mr_servicetd,
        device_id=bytes(32),
    )
    policy = AppPolicy(
        app_id=b"app",
        compose_hashes=(COMPOSE_A,),
        measurements=(Measurement(td.mr_td, *td.rtmrs[:3]),),
    )
    policy.check(report, AppIdentity(b"app", COMPOSE_A))
