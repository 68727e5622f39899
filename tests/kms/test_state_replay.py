"""Replaying rows into the KMS state file, or rolling the file back, is refused.

The attacker here can write the SQLite file (not the operator secret): it saves a validly
MACed row, lets the KMS move on, and puts the old row back with sqlite3 — an older epoch (to
hide a volume rollback), a revoked app's policy, a pre-rotation policy — or restores a whole
older copy of the file. Each must be refused on read by a running KMS and at startup, and an
honest restart must keep working.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sealfs.crypto import KdfParams, Secret, derive_from_passphrase, label, wrap_key
from sealfs.errors import IntegrityError
from sealfs.kms import protocol as P
from sealfs.kms.client import KmsClient
from sealfs.kms.derivation import StoreMac
from sealfs.kms.store import KmsStore

from .conftest import (
    APP_A,
    APP_B,
    COMPOSE_A,
    FAST_KDF_KIB,
    REPO,
    SECRET,
    KmsProcess,
    KmsState,
    attester,
    envelope,
    make_state,
    post,
    sim_policy,
    start_kms,
)

VOL = b"replayed-volume"
D1, D2 = b"\x01" * 32, b"\x02" * 32
REPLAYED = "a row was replayed, added or removed outside the KMS"


def client(kms: KmsProcess, app_id: bytes = APP_A) -> KmsClient:
    return KmsClient(
        kms.url, app_id, attester(app_id), trusted_keys=[kms.public_key], deadline_s=30
    )


def saved_row(path: Path, table: str, where: str, *args: Any) -> tuple[Any, ...]:
    """A copy of one row, as an attacker with write access to the file would keep it."""
    with sqlite3.connect(path) as conn:
        row = conn.execute(f"SELECT * FROM {table} WHERE {where}", args).fetchone()
    assert row is not None
    return tuple(row)


def put_back(path: Path, table: str, row: tuple[Any, ...]) -> None:
    with sqlite3.connect(path) as conn:
        marks = ", ".join("?" * len(row))
        conn.execute(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", row)


def serve_refuses(state: KmsState, *extra: str) -> str:
    """Run `sealfs kms serve` and require it to refuse to start (exit 5); its stderr."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sealfs",
            "kms",
            "serve",
            "--state",
            str(state.path),
            "--secret-file",
            str(state.secret_file),
            "--port",
            "0",
            "--allow-simulated",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert res.returncode == 5, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr


def refused_on_read(
    kms: KmsProcess,
    path: str,
    params: Any,
    app: bytes = APP_A,
    refusal: tuple[int, str] = (500, "internal"),
) -> None:
    body, _, _ = envelope(kms.port, attester(app), params)
    status, resp = post(kms.port, path, body)
    assert (status, resp["error"]) == refusal, (status, resp)


def test_replayed_epoch_row_is_refused_on_read_and_at_startup(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    kms = start_kms(state, "--allow-simulated")
    try:
        client(kms).advance_epoch(VOL, 1, D1)
        old = saved_row(state.path, "epochs", "volume_id = ?", VOL)
        client(kms).advance_epoch(VOL, 2, D2)
        current = saved_row(state.path, "epochs", "volume_id = ?", VOL)
        put_back(state.path, "epochs", old)
        # The replayed row would make epoch 1 current again (hiding a volume rollback):
        # neither a read nor the advance it would allow gets through.
        refused_on_read(kms, "/v1/epoch/get", P.GetEpoch(VOL))
        refused_on_read(kms, "/v1/epoch/advance", P.AdvanceEpoch(VOL, 1, D1))
        assert "does not match the table head" in kms.log()
    finally:
        kms.stop()
    assert REPLAYED in serve_refuses(state)
    put_back(state.path, "epochs", current)  # the operator restores the current row
    kms = start_kms(state, "--allow-simulated", log_name="restart.log")
    try:
        assert client(kms).get_epoch(VOL) == (2, D2)
    finally:
        kms.stop()


def test_replayed_policy_rows_are_refused_on_read_and_at_startup(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    revoked = saved_row(state.path, "policies", "app_id = ?", APP_B)
    before_rotation = saved_row(state.path, "policies", "app_id = ?", APP_A)
    kms = start_kms(state, "--allow-simulated")
    try:
        state.store.delete_policy(state.macs, APP_B)  # the operator revokes app B
        body, _, _ = envelope(kms.port, attester(APP_B), P.GetKey("volume-wrap", VOL))
        assert post(kms.port, "/v1/key", body)[1]["error"] == "unknown_app"
        put_back(state.path, "policies", revoked)  # ... and the host brings it back
        refused_on_read(kms, "/v1/key", P.GetKey("volume-wrap", VOL), APP_B)
    finally:
        kms.stop()
    assert REPLAYED in serve_refuses(state)
    with sqlite3.connect(state.path) as conn:
        conn.execute("DELETE FROM policies WHERE app_id = ?", (APP_B,))
    state.store.rotate_policy(state.macs, APP_A)  # honest changes work again ...
    kms = start_kms(state, "--allow-simulated", log_name="restart.log")
    try:
        assert client(kms).get_key("volume-wrap", VOL)[1] == 2
    finally:
        kms.stop()
    put_back(state.path, "policies", before_rotation)  # ... and a pre-rotation row is refused
    assert REPLAYED in serve_refuses(state)


def test_whole_file_rollback_is_caught_while_running_and_by_min_state_version(
    tmp_path: Path,
) -> None:
    state = make_state(tmp_path)
    old_copy = tmp_path / "old-copy.db"
    kms = start_kms(state, "--allow-simulated")
    try:
        client(kms).advance_epoch(VOL, 1, D1)
        with sqlite3.connect(state.path) as src, sqlite3.connect(old_copy) as dst:
            src.backup(dst)
        old_version = state.store.verify(state.macs).version
        client(kms).advance_epoch(VOL, 2, D2)
        recorded = state.store.verify(state.macs).version  # what the operator wrote down
        assert recorded > old_version
        with sqlite3.connect(old_copy) as src, sqlite3.connect(state.path) as dst:
            src.backup(dst)  # the whole file goes back, consistently
        refused_on_read(kms, "/v1/epoch/get", P.GetEpoch(VOL), refusal=(503, "state_rolled_back"))
        assert "table version went back" in kms.log()
    finally:
        kms.stop()
    # Stopped, the file alone cannot tell; the version recorded outside it can.
    assert "below --min-state-version" in serve_refuses(state, "--min-state-version", str(recorded))
    kms = start_kms(
        state, "--allow-simulated", "--min-state-version", str(old_version), log_name="restart.log"
    )
    kms.stop()


# --- format 1 files ----------------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE policies (app_id BLOB PRIMARY KEY, body BLOB NOT NULL, mac BLOB NOT NULL);
CREATE TABLE epochs (
    app_id BLOB NOT NULL, volume_id BLOB NOT NULL, epoch INTEGER NOT NULL,
    root_digest BLOB NOT NULL, updated_at INTEGER NOT NULL, mac BLOB NOT NULL,
    PRIMARY KEY (app_id, volume_id));
"""


def make_v1_state(tmp: Path) -> KmsState:
    """A state file exactly as the previous release (format 1) wrote it."""
    secret_file = tmp / "operator.secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    path = tmp / "kms-v1.db"
    kdf = KdfParams.default(memory_kib=FAST_KDF_KIB)
    kdf_json = json.dumps(kdf.to_dict(), sort_keys=True).encode()
    root = Secret.generate()
    macs = StoreMac(root)
    policy = sim_policy(APP_A, COMPOSE_A).canonical()
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA)
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [
                ("format", b"1"),
                ("kdf", kdf_json),
                ("created_at", b"1700000000"),
                (
                    "sealed_root",
                    wrap_key(
                        derive_from_passphrase(Secret(SECRET), kdf),
                        root,
                        label("kms-root-seal", 1, kdf_json),
                    ),
                ),
            ],
        )
        conn.execute(
            "INSERT INTO policies VALUES (?, ?, ?)", (APP_A, policy, macs.policy(APP_A, policy))
        )
        conn.execute(
            "INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?)",
            (APP_A, VOL, 7, D1, 1700000000, macs.epoch(APP_A, VOL, 7, D1)),
        )
    path.chmod(0o600)
    return KmsState(path, secret_file, KmsStore(path), macs, root)


def test_format_1_state_is_migrated_and_cannot_be_downgraded(tmp_path: Path) -> None:
    state = make_v1_state(tmp_path)
    kms = start_kms(state, "--allow-simulated")
    try:
        assert client(kms).get_epoch(VOL) == (7, D1)
        assert client(kms).advance_epoch(VOL, 8, D2) == (8, D2)
        assert "migrated KMS state file" in kms.log()
    finally:
        kms.stop()
    with sqlite3.connect(state.path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone() == (b"2",)
    with sqlite3.connect(state.path) as conn:  # passing the file off as format 1 again
        conn.execute("UPDATE meta SET value = '1' WHERE name = 'format'")
    assert "downgrade refused" in serve_refuses(state)
    with sqlite3.connect(state.path) as conn:
        conn.execute("UPDATE meta SET value = X'32' WHERE name = 'format'")
    kms = start_kms(state, "--allow-simulated", log_name="restart.log")
    try:
        assert client(kms).get_epoch(VOL) == (8, D2)
    finally:
        kms.stop()


def test_every_way_of_editing_the_tables_is_caught(tmp_path: Path) -> None:
    """Beyond replay: deleting a row, refiling it in another bucket, editing a bucket digest
    or the head. Each edit is undone before the next, so each is caught on its own."""
    state = make_state(tmp_path)
    state.store.advance_epoch(state.macs, APP_A, VOL, 3, D1)
    edits = [
        ("DELETE FROM epochs", "epochs"),
        ("UPDATE epochs SET bucket = (bucket + 1) % 256", "epochs"),
        ("DELETE FROM policies WHERE app_id = X'" + APP_B.hex() + "'", "policies"),
        ("UPDATE buckets SET digest = zeroblob(32) WHERE bucket = 0", "buckets"),
        ("UPDATE meta SET value = '99' WHERE name = 'state_version'", "meta"),
    ]
    for edit, table in edits:
        with sqlite3.connect(state.path) as conn:
            saved = conn.execute(f"SELECT * FROM {table}").fetchall()
            conn.execute(edit)
        with pytest.raises(IntegrityError):
            state.store.verify(state.macs)
        with pytest.raises(IntegrityError):
            if table == "policies":
                state.store.get_policy(state.macs, APP_B)
            else:
                state.store.get_epoch(state.macs, APP_A, VOL)
        with sqlite3.connect(state.path) as conn:
            conn.execute(f"DELETE FROM {table}")
            conn.executemany(
                f"INSERT INTO {table} VALUES ({', '.join('?' * len(saved[0]))})", saved
            )
        assert state.store.verify(state.macs).epochs == 1
