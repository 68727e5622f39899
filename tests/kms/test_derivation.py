"""Key derivation, policy checks, store MACs and the simulated quote (pure units)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sealfs.attest import simulated
from sealfs.crypto import KdfParams, Secret, hkdf
from sealfs.errors import AttestationError, IntegrityError, UnlockError, UsageError
from sealfs.kms import protocol as P
from sealfs.kms.derivation import StoreMac, app_key, identity_key
from sealfs.kms.policy import AppPolicy, PolicyDenied
from sealfs.kms.store import EpochConflict, KmsStore
from sealfs.kms.verify import verify_simulated

from .conftest import APP_A, APP_B, COMPOSE_A, attester, sim_policy

ROOT = Secret(bytes(range(32)))


def test_app_keys_are_deterministic_and_separated() -> None:
    k = app_key(ROOT, "volume-wrap", APP_A, 1, b"vol")
    assert k == app_key(Secret(bytes(range(32))), "volume-wrap", APP_A, 1, b"vol")
    others = [
        app_key(ROOT, "luks-passphrase", APP_A, 1, b"vol"),
        app_key(ROOT, "epoch-signing", APP_A, 1, b"vol"),
        app_key(ROOT, "volume-wrap", APP_B, 1, b"vol"),
        app_key(ROOT, "volume-wrap", APP_A, 2, b"vol"),
        app_key(ROOT, "volume-wrap", APP_A, 1, b"vol2"),
        app_key(Secret(bytes(32)), "volume-wrap", APP_A, 1, b"vol"),
    ]
    assert all(k != o for o in others)
    assert len({o.reveal() for o in others}) == len(others)


def test_label_parts_cannot_be_shifted() -> None:
    # Plain concatenation would make (app "ab", volume "c") == (app "a", volume "bc").
    assert app_key(ROOT, "volume-wrap", b"ab", 1, b"c") != app_key(
        ROOT, "volume-wrap", b"a", 1, b"bc"
    )


def test_documented_label_vector() -> None:
    # docs/kms-protocol.md gives this label; a change here changes every released key.
    assert app_key(ROOT, "volume-wrap", b"\x01", 1, b"\x02") == hkdf(
        ROOT, "kms-app-key", "volume-wrap", b"\x01", 1, b"\x02"
    )
    assert identity_key(ROOT).public_bytes == identity_key(Secret(bytes(range(32)))).public_bytes


def test_app_key_rejects_bad_arguments() -> None:
    for args in (
        ("nope", APP_A, 1, b"v"),
        ("volume-wrap", APP_A, 0, b"v"),
        ("volume-wrap", b"", 1, b"v"),
        ("volume-wrap", APP_A, 1, b"x" * 65),
    ):
        with pytest.raises(ValueError):
            app_key(ROOT, *args)  # type: ignore[arg-type]


def test_secrets_have_safe_reprs() -> None:
    assert "Secret 32 bytes" in repr(app_key(ROOT, "volume-wrap", APP_A, 1, b"v"))
    assert repr(identity_key(ROOT)) == "<SigningKey Ed25519>"
    assert repr(StoreMac(ROOT)) == "<StoreMac>"


def test_binding_distinguishes_absent_version_and_parameters() -> None:
    n, pk = bytes(32), bytes(32)
    rds = {
        P.report_data_for(n, pk, P.GetKey("volume-wrap", b"v", None)),
        P.report_data_for(n, pk, P.GetKey("volume-wrap", b"v", 1)),
        P.report_data_for(n, pk, P.GetKey("luks-passphrase", b"v", None)),
        P.report_data_for(n, pk, P.GetEpoch(b"v")),
        P.report_data_for(n, pk, P.AdvanceEpoch(b"v", 1, bytes(32))),
        P.report_data_for(n, pk, P.AdvanceEpoch(b"v", 2, bytes(32))),
        P.report_data_for(bytes([1]) * 32, pk, P.GetEpoch(b"v")),
    }
    assert len(rds) == 7 and all(len(r) == 64 for r in rds)


# --- policy -----------------------------------------------------------------------------------


def report_of(att: simulated.SimulatedAttester) -> object:
    return verify_simulated(
        att.quote(bytes(64)),
        att.collateral(),
        __import__("time").time(),
        [simulated.DEV_PUBLIC_KEY],
    )


def test_policy_checks() -> None:
    from sealfs.attest.eventlog import identity_from_log

    policy = sim_policy(APP_A, COMPOSE_A)
    ok = attester()
    policy.check(report_of(ok), identity_from_log(ok.event_log()))  # type: ignore[arg-type]
    cases = {
        "MRTD": attester(mrtd=b"\x01" * 48),
        "RTMR": attester(rtmr2=b"\x01" * 48),
        "compose hash": attester(compose=b"\x02" * 32),
        "TCB status": attester(tcb_status="OutOfDate"),
        "debug": attester(debug=True),
    }
    for reason, att in cases.items():
        with pytest.raises(PolicyDenied, match=reason):
            policy.check(report_of(att), identity_from_log(att.event_log()))  # type: ignore[arg-type]


def test_policy_document_is_strict() -> None:
    good = sim_policy(APP_A, COMPOSE_A).to_dict()
    assert AppPolicy.from_dict(good) == sim_policy(APP_A, COMPOSE_A)
    for bad in (
        {**good, "extra": 1},
        {**good, "tcb_statuses": ["Revoked"]},
        {**good, "compose_hashes": ["00"]},
        {**good, "key_version": 0},
        {**good, "allow_debug": "yes"},
        {**good, "measurements": [{"mrtd": "00"}]},
        {k: v for k, v in good.items() if k != "app_id"},
    ):
        with pytest.raises(UsageError):
            AppPolicy.from_dict(bad)


# --- simulated quotes ------------------------------------------------------------------------


def test_simulated_quote_verification() -> None:
    att = attester()
    quote = att.quote(b"\x07" * 64)
    rep = verify_simulated(
        quote, att.collateral(), __import__("time").time(), [simulated.DEV_PUBLIC_KEY]
    )
    assert rep.report_data == b"\x07" * 64 and rep.rtmr3 == att.rtmr3
    flipped = bytearray(quote)
    flipped[100] ^= 1
    with pytest.raises(AttestationError, match="signature"):
        verify_simulated(bytes(flipped), att.collateral(), 0, [simulated.DEV_PUBLIC_KEY])
    with pytest.raises(AttestationError, match="untrusted"):
        verify_simulated(quote, att.collateral(), 0, [identity_key(ROOT).public_bytes])
    expired = attester(validity=(0, 10))
    with pytest.raises(AttestationError, match="expired"):
        verify_simulated(
            expired.quote(bytes(64)),
            expired.collateral(),
            __import__("time").time(),
            [simulated.DEV_PUBLIC_KEY],
        )
    forged = {**att.collateral(), "tcb_status": "UpToDate", "not_after": 2**40}
    with pytest.raises(AttestationError, match="collateral signature"):
        verify_simulated(quote, forged, 0, [simulated.DEV_PUBLIC_KEY])


# --- state store -----------------------------------------------------------------------------


def new_store(tmp_path: Path) -> tuple[KmsStore, StoreMac]:
    store, root = KmsStore.initialize(
        tmp_path / "s.db", Secret(b"x" * 20), KdfParams.default(memory_kib=8192)
    )
    return store, StoreMac(root)


def test_store_unlock_and_refuse_overwrite(tmp_path: Path) -> None:
    store, root = KmsStore.initialize(
        tmp_path / "s.db", Secret(b"x" * 20), KdfParams.default(memory_kib=8192)
    )
    assert (tmp_path / "s.db").stat().st_mode & 0o077 == 0
    assert store.unlock(Secret(b"x" * 20)) == root
    with pytest.raises(UnlockError):
        store.unlock(Secret(b"y" * 20))
    with pytest.raises(UsageError, match="already exists"):
        KmsStore.initialize(tmp_path / "s.db", Secret(b"x" * 20))
    with pytest.raises(UsageError, match="does not exist"):
        KmsStore(tmp_path / "missing.db")


def test_epoch_rules(tmp_path: Path) -> None:
    store, macs = new_store(tmp_path)
    d1, d2 = b"1" * 32, b"2" * 32
    assert store.get_epoch(macs, APP_A, b"v") is None
    assert store.advance_epoch(macs, APP_A, b"v", 5, d1).epoch == 5
    assert store.advance_epoch(macs, APP_A, b"v", 5, d1).epoch == 5  # idempotent
    with pytest.raises(EpochConflict) as e:
        store.advance_epoch(macs, APP_A, b"v", 5, d2)
    assert e.value.reason == "fork"
    with pytest.raises(EpochConflict) as e:
        store.advance_epoch(macs, APP_A, b"v", 4, d1)
    assert e.value.reason == "rollback"
    assert store.advance_epoch(macs, APP_A, b"v", 6, d2).epoch == 6
    assert store.get_epoch(macs, APP_B, b"v") is None  # per-app namespace


def test_store_rows_are_macd(tmp_path: Path) -> None:
    store, macs = new_store(tmp_path)
    store.put_policy(macs, sim_policy(APP_A, COMPOSE_A))
    store.advance_epoch(macs, APP_A, b"v", 9, b"1" * 32)
    conn = sqlite3.connect(store.location)
    conn.execute("UPDATE epochs SET epoch = 1")
    conn.execute("UPDATE policies SET body = replace(body, 'UpToDate', 'OutOfDate')")
    conn.commit()
    conn.close()
    with pytest.raises(IntegrityError):
        store.get_epoch(macs, APP_A, b"v")
    with pytest.raises(IntegrityError):
        store.get_policy(macs, APP_A)
