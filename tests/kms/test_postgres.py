"""KMS replicas sharing one PostgreSQL 15 database (a real server, tests/kms/postgres.py).

Replicas derive identical keys, agree on one history per volume (an advance is a
compare-and-set: of two racing for one volume, exactly one wins), survive the loss of one
replica, and refuse a database restored from an older backup.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sealfs.cli.exit_codes import exit_code
from sealfs.errors import IntegrityError, KmsError
from sealfs.kms import protocol as P
from sealfs.kms.client import EpochRefused, KmsClient
from sealfs.kms.highwater import HighWater
from sealfs.kms.store import EpochConflict, KmsStore

from .conftest import (
    APP_A,
    REPO,
    KmsProcess,
    KmsState,
    attester,
    envelope,
    post,
    start_kms,
    wait_for,
)
from .postgres import PostgresServer, replica

STORE_RACE_ROUNDS = 2000  # compare-and-set races between two stores (two connections)
HTTP_RACE_ROUNDS = 1000  # the same through two `kms serve` replicas, over the protocol
STREAM = 60  # advances in the stream that loses a replica halfway


@pytest.fixture
def replicas(pg_state: KmsState) -> Iterator[tuple[KmsProcess, KmsProcess]]:
    one, two = replica(pg_state, "one"), replica(pg_state, "two")
    yield one, two
    one.stop()
    two.stop()


def client(kms: KmsProcess) -> KmsClient:
    return KmsClient(kms.url, APP_A, attester(), trusted_keys=[kms.public_key], deadline_s=30)


def test_replicas_release_identical_keys(replicas: tuple[KmsProcess, KmsProcess]) -> None:
    one, two = replicas
    assert one.public_key == two.public_key
    key1, v1 = client(one).get_key("volume-wrap", b"vol-1")
    key2, v2 = client(two).get_key("volume-wrap", b"vol-1")
    assert (key1.reveal(), v1) == (key2.reveal(), v2)
    other, _ = client(two).get_key("volume-wrap", b"vol-2")
    assert other.reveal() != key1.reveal()


def race(rounds: int, attempt: Callable[[int, int], bool]) -> list[tuple[bool, bool]]:
    """Two threads released together each round (a barrier), each calling
    ``attempt(racer, round)`` (True: won, False: refused); the outcomes of every round. A
    racer that fails breaks the barrier, so the other stops too and the failure shows."""
    gate = threading.Barrier(2)
    wins: list[list[bool]] = [[], []]
    failed: list[BaseException] = []

    def racer(i: int) -> None:
        try:
            for r in range(1, rounds + 1):
                gate.wait()
                wins[i].append(attempt(i, r))
        except threading.BrokenBarrierError:
            pass
        except BaseException as e:
            failed.append(e)
            gate.abort()

    threads = [threading.Thread(target=racer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    assert len(wins[0]) == len(wins[1]) == rounds
    return list(zip(*wins, strict=True))


def raced_digest(racer: int, epoch: int) -> bytes:
    return bytes([racer + 1]) * 16 + epoch.to_bytes(16, "big")


def test_store_race_exactly_one_wins(pg_state: KmsState) -> None:
    """Two stores (each its own connections, as two replicas) advance one volume to the same
    epoch with different roots, released together each round: exactly one is accepted, the
    other refused as a fork, and the database holds the winner."""
    stores = [pg_state.store, KmsStore(pg_state.url)]

    def attempt(i: int, epoch: int) -> bool:
        try:
            stores[i].advance_epoch(pg_state.macs, APP_A, b"raced", epoch, raced_digest(i, epoch))
            return True
        except EpochConflict as e:
            assert e.reason == "fork"
            return False

    rounds = race(STORE_RACE_ROUNDS, attempt)
    assert all(a != b for a, b in rounds)
    final = pg_state.store.get_epoch(pg_state.macs, APP_A, b"raced")
    winner = 0 if rounds[-1][0] else 1
    assert final is not None
    assert (final.epoch, final.root_digest) == (
        STORE_RACE_ROUNDS,
        raced_digest(winner, STORE_RACE_ROUNDS),
    )
    assert pg_state.store.verify(pg_state.macs).epochs == 1


def test_replica_race_exactly_one_wins(replicas: tuple[KmsProcess, KmsProcess]) -> None:
    """The same race through two `kms serve` replicas, each client asking its own."""
    clients = [client(k) for k in replicas]

    def attempt(i: int, epoch: int) -> bool:
        try:
            clients[i].advance_epoch(b"raced", epoch, raced_digest(i, epoch))
            return True
        except EpochRefused as e:
            assert e.reason == "fork"
            return False

    assert all(a != b for a, b in race(HTTP_RACE_ROUNDS, attempt))
    # whichever replica is asked, the history is the same
    assert clients[0].get_epoch(b"raced") == clients[1].get_epoch(b"raced")
    # and a fork of the anchored epoch is refused by both
    epoch, digest = clients[0].get_epoch(b"raced")
    for c in clients:
        with pytest.raises(EpochRefused) as refused:
            c.advance_epoch(b"raced", epoch, bytes(32))
        assert refused.value.reason == "fork"
        assert c.advance_epoch(b"raced", epoch, digest) == (epoch, digest)  # idempotent


def advance_with_failover(
    clients: list[KmsClient], epoch: int, digest: bytes, issued: threading.Event
) -> list[KmsClient]:
    """What a multi-URL client does: ask the replicas in order, skipping one that cannot
    answer (down), and start from the one that answered next time. The same (epoch, digest)
    asked again is idempotent, so an advance whose replica died mid-request is neither lost
    nor counted twice."""
    for i, c in enumerate(clients):
        issued.set()
        try:
            c.advance_epoch(b"stream", epoch, digest)
            return clients[i:] + clients[:i]
        except EpochRefused:
            raise
        except KmsError:
            continue
    raise AssertionError(f"no replica anchored epoch {epoch}")


def test_losing_a_replica_loses_no_anchor(pg_state: KmsState) -> None:
    """A stream of advances through replica one, which is killed (SIGKILL) while advance
    STREAM/2 may be in flight; the stream goes on through replica two."""
    one, two = replica(pg_state, "one"), replica(pg_state, "two")
    try:
        clients = [
            KmsClient(k.url, APP_A, attester(), trusted_keys=[k.public_key], deadline_s=3)
            for k in (one, two)
        ]
        half = threading.Event()

        def killer() -> None:
            half.wait()
            one.proc.kill()

        t = threading.Thread(target=killer)
        t.start()
        idle = threading.Event()
        order = clients
        for epoch in range(1, STREAM + 1):
            order = advance_with_failover(
                order, epoch, epoch.to_bytes(32, "big"), half if epoch == STREAM // 2 else idle
            )
        t.join()
        assert one.proc.wait(10) != 0
        assert clients[1].get_epoch(b"stream") == (STREAM, STREAM.to_bytes(32, "big"))
        assert pg_state.store.verify(pg_state.macs).epochs == 1
        # the killed replica restarts and agrees
        back = replica(pg_state, "one")
        try:
            assert client(back).get_epoch(b"stream") == (STREAM, STREAM.to_bytes(32, "big"))
        finally:
            back.stop()
    finally:
        one.stop()
        two.stop()


def _serve(state: KmsState, high_water: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`kms serve` expected to refuse to start."""
    return sealfs_cli(
        "kms",
        "serve",
        "--state",
        state.url,
        "--secret-file",
        str(state.secret_file),
        "--port",
        "0",
        "--high-water",
        str(high_water),
        *extra,
        check=False,
    )


def test_restored_database_is_refused(postgres: PostgresServer, pg_state: KmsState) -> None:
    """A backup taken at version v, restored after the replica served v + n: the running
    replica refuses every answer (503 state_rolled_back), and refuses to start again on it;
    a new replica pointed at it (--peer) refuses too; only a replica that never saw the
    newer state and asks no peer that did accepts it (docs/kms-protocol.md §2)."""
    db = urllib.parse.urlsplit(pg_state.url).path.lstrip("/")
    hw = pg_state.path.parent / "one.high-water"
    one = replica(pg_state, "one")
    try:
        c = client(one)
        c.advance_epoch(b"vol", 1, b"\x01" * 32)
        backup = pg_state.path.parent / "old.dump"
        postgres.dump(db, backup)
        c.advance_epoch(b"vol", 2, b"\x02" * 32)
        served = HighWater(hw, pg_state.macs).load()
        postgres.restore(db, backup)
        body, _, _ = envelope(one.port, attester(), P.AdvanceEpoch(b"vol", 2, b"\x03" * 32))
        status, answer = post(one.port, P.OP_PATHS[P.OP_ADVANCE_EPOCH], body)
        assert (status, answer["error"]) == (503, "state_rolled_back"), answer
        assert "went back from" in one.log()
        # a replica with no record of its own learns from its peer what was served
        taught = _serve(pg_state, pg_state.path.parent / "three.high-water", "--peer", one.url)
        assert taught.returncode == exit_code(IntegrityError), taught.stderr
        assert f"went back from {served} to" in taught.stderr
    finally:
        one.stop()
    refused = _serve(pg_state, hw)
    assert refused.returncode == exit_code(IntegrityError)
    assert f"went back from {served} to" in refused.stderr
    assert "Traceback" not in refused.stderr
    shown = sealfs_cli(
        "kms",
        "info",
        "--state",
        pg_state.url,
        "--secret-file",
        str(pg_state.secret_file),
        "--high-water",
        str(hw),
        "--json",
    )
    assert json.loads(shown.stdout)["rolled_back"] is True
    # the documented hole: a replica with no record of what was served cannot tell
    fresh = KmsStore(pg_state.url)
    fresh.remember_in(HighWater(pg_state.path.parent / "new.high-water", pg_state.macs))
    assert fresh.verify(pg_state.macs).version < served


def test_info_shows_the_replicas_view(pg_state: KmsState) -> None:
    pg_state.store.advance_epoch(pg_state.macs, APP_A, b"vol", 1, b"\1" * 32)
    hw = pg_state.path.parent / "hw"
    HighWater(hw, pg_state.macs).store(pg_state.store.seen_version)
    out = sealfs_cli(
        "kms",
        "info",
        "--state",
        pg_state.url,
        "--secret-file",
        str(pg_state.secret_file),
        "--high-water",
        str(hw),
        "--json",
    )
    info = json.loads(out.stdout)
    assert info["reachable"] and info["format"] == 2 and info["volumes"] == 1
    assert info["state"] == pg_state.url and len(info["apps"]) == 2
    assert info["state_version"] == info["served_version"] == pg_state.store.seen_version
    assert info["rolled_back"] is False


def test_unreachable_database_is_one_line(pg_state: KmsState, tmp_path: Path) -> None:
    gone = f"postgresql://postgres:hunter2@/nodb?host={tmp_path}"
    out = sealfs_cli(
        "kms", "info", "--state", gone, "--secret-file", str(pg_state.secret_file), check=False
    )
    assert out.returncode == exit_code(KmsError)
    assert "cannot reach the KMS database postgresql://postgres:***@" in out.stderr
    assert "hunter2" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:hunter2@[::1/db",  # libpq quotes the whole malformed URL
        "postgresql://postgres:hun%zzter2@localhost/db",  # ... or the bad token of it
        "postgresql://postgres@[::1/db?password=hunter2",
    ],
)
def test_a_malformed_url_never_shows_its_password(url: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o600)
    out = sealfs_cli("kms", "info", "--state", url, "--secret-file", str(secret), check=False)
    assert out.returncode == exit_code(KmsError), out.stderr
    assert "hunter2" not in out.stderr and "hun%zzter2" not in out.stderr
    assert "***" in out.stderr and "Traceback" not in out.stderr


def sealfs_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sealfs", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=check,
    )


def test_running_replica_learns_the_rollback_from_its_peer(
    postgres: PostgresServer,
    pg_state: KmsState,
) -> None:
    """Replica two never served past the backup, so its own records accept the restored
    database; its periodic cross-check with replica one (which did) makes it refuse too."""
    db = urllib.parse.urlsplit(pg_state.url).path.lstrip("/")
    backup = pg_state.path.parent / "old.dump"
    postgres.dump(db, backup)
    one = replica(pg_state, "one")
    two = start_kms(
        pg_state,
        "--allow-simulated",
        "--high-water",
        str(pg_state.path.parent / "two.high-water"),
        "--peer",
        one.url,
        "--peer-check-interval",
        "1",
        log_name="two.log",
    )
    try:
        client(one).advance_epoch(b"vol", 1, b"\1" * 32)
        postgres.restore(db, backup)

        # two's own floor is the backup's version (it started on it and served nothing
        # newer): only replica one's signed served version can make it refuse
        def two_refuses() -> bool:
            body, _, _ = envelope(two.port, attester(), P.GetEpoch(b"vol"))
            status, answer = post(two.port, P.OP_PATHS[P.OP_GET_EPOCH], body)
            return (status, answer.get("error")) == (503, "state_rolled_back")

        wait_for(two_refuses, "replica two to learn replica one's served version")
        assert f"peer {one.url} served state version" in two.log()
    finally:
        one.stop()
        two.stop()
