"""Connection floods against a real KMS on 127.0.0.1: per-peer limits, fair queuing, timeouts.

Peers are told apart by source address: every test peer binds its own loopback address
(127.0.0.2, 127.0.0.3, ...) before connecting. Nothing here is paced by sleeps: each step
waits for the event it needs (an answer, an EOF, a server counter), with a generous guard
that only turns a hang into a failure.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from sealfs.kms.server import FairGate, HttpLimits, peer_key_of
from sealfs.kms.service import ServiceConfig

from .conftest import (
    APP_A,
    InProcessKms,
    KmsProcess,
    KmsState,
    attester,
    connect_from,
    get,
    read_answer,
    start_kms,
    wait_for,
)

HOG, VICTIM, OTHER = "127.0.0.2", "127.0.0.3", "127.0.0.4"
INFO = b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def patient_kms(state: KmsState) -> Iterator[KmsProcess]:
    """A KMS with default connection limits that waits long for headers, so idle
    connections stay open for the whole test however slow the machine is."""
    server = start_kms(
        state,
        "--allow-simulated",
        "--header-timeout",
        "300",
        "--request-timeout",
        "300",
        log_name="patient.log",
    )
    yield server
    server.stop()


def readable(socks: list[socket.socket], wait_s: float = 0) -> list[socket.socket]:
    """The sockets with an answer or an EOF waiting (poll: no FD_SETSIZE limit)."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(wait_s * 1000)]


def refused_until(socks: list[socket.socket], count: int) -> list[socket.socket]:
    """Read answers on ``socks`` until ``count`` of them were refused (answered and closed);
    returns the refused ones. Every answer must be a 429."""
    refused: list[socket.socket] = []
    pending = list(socks)
    while len(refused) < count:
        ready = readable(pending, 60)
        assert ready, f"only {len(refused)} of {count} excess connections were refused"
        for s in ready:
            status, body = read_answer(s)
            assert (status, body["error"]) == (429, "too_many_connections"), (status, body)
            refused.append(s)
            pending.remove(s)
    return refused


def test_one_peer_with_many_idle_connections_cannot_starve_others(patient_kms: KmsProcess) -> None:
    from sealfs.kms.client import KmsClient

    limit = HttpLimits().max_connections_per_peer
    hog = [connect_from(HOG, patient_kms.port) for _ in range(200)]
    try:
        refused = refused_until(hog, len(hog) - limit)
        held = [s for s in hog if s not in refused]
        assert len(held) == limit and not readable(held)
        # Another peer is served while the hog's connections are all still open: a full
        # attested key release (nonce + key) from 127.0.0.1, and /v1/info from 127.0.0.3.
        client = KmsClient(
            patient_kms.url, APP_A, attester(), deadline_s=60, trusted_keys=[patient_kms.public_key]
        )
        key, version = client.get_key("volume-wrap", b"flooded")
        assert version == 1 and len(key) == 32
        assert get(patient_kms.port, "/v1/info", source=VICTIM)[0] == 200
        assert not readable(held), "the hog's idle connections were answered or dropped"
        # One more from the hog is still refused; the flood is logged once, not 185 times.
        with connect_from(HOG, patient_kms.port) as extra:
            extra.sendall(INFO)
            assert read_answer(extra)[0] == 429
    finally:
        for s in hog:
            s.close()
    assert patient_kms.log().count("-> 429 too_many_connections") == 1


def server_sockets(mine: list[socket.socket], baseline: int) -> int:
    """Sockets this process holds beyond ``baseline`` that are not the test's own: those
    of the in-process KMS."""
    return _socket_fds() - baseline - sum(s.fileno() >= 0 for s in mine)


def _socket_fds() -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own fd)
            count += os.readlink(fd).startswith("socket:")
    return count


def test_a_flood_of_refused_connections_holds_no_sockets(state: KmsState) -> None:
    """Refused and lingering sockets count against their peer: a peer cannot make the KMS
    hold more than twice its allowance of sockets, however many connections it opens (each
    would otherwise linger with its file descriptor, and exhaust the KMS's)."""
    limit = 4
    limits = HttpLimits(
        max_connections_per_peer=limit, read_timeout_s=300, header_timeout_s=300, linger_s=300
    )
    with InProcessKms(state, ServiceConfig(), limits) as srv:
        baseline = _socket_fds()
        hog = [connect_from(HOG, srv.port) for _ in range(limit)]
        try:
            wait_for(lambda: srv.server._open_total == limit, "the hog's idle connections")
            flood = [connect_from(HOG, srv.port) for _ in range(100)]
            hog += flood
            refused_until(flood, len(flood))
            wait_for(
                lambda: server_sockets(hog, baseline) <= 2 * limit,
                "the KMS to hold at most twice the peer's allowance of sockets",
            )
            assert get(srv.port, "/v1/info", source=VICTIM)[0] == 200
            assert not readable(hog[:limit]), "a held connection was answered or dropped"
        finally:
            for s in hog:
                s.close()


def test_idle_and_slow_header_connections_are_dropped(state: KmsState) -> None:
    server = start_kms(
        state,
        "--allow-simulated",
        "--header-timeout",
        "0.5",
        "--request-timeout",
        "300",
        log_name="header-timeout.log",
    )
    try:
        with connect_from(HOG, server.port) as idle, connect_from(OTHER, server.port) as slow:
            slow.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
            for s in (idle, slow):
                status, body = read_answer(s)  # the server answers and closes by itself
                assert (status, body["error"]) == (408, "timeout")
    finally:
        server.stop()


def test_a_newcomer_gets_the_next_slot_before_the_hogs_queue(state: KmsState) -> None:
    limits = HttpLimits(
        max_connections=2, max_connections_per_peer=8, read_timeout_s=300, header_timeout_s=300
    )
    with InProcessKms(state, ServiceConfig(), limits) as srv:

        def open_total() -> int:
            return srv.server._open_total

        hog = [connect_from(HOG, srv.port) for _ in range(2)]
        try:
            wait_for(lambda: srv.server._slots.held(HOG) == 2, "the hog to hold both slots")
            hog += [connect_from(HOG, srv.port) for _ in range(4)]
            wait_for(lambda: open_total() == 6, "4 more hog connections to queue")
            with connect_from(VICTIM, srv.port) as victim:
                victim.sendall(INFO)
                wait_for(lambda: open_total() == 7, "the newcomer to queue")
                hog[0].close()  # frees a slot: FIFO would give it to the hog's queue
                assert read_answer(victim)[0] == 200
            assert not readable(hog[1:]), "a hog connection was answered or dropped"
        finally:
            for s in hog:
                s.close()


def test_queue_full_means_busy(state: KmsState) -> None:
    limits = HttpLimits(max_connections=2, max_queued=0, read_timeout_s=300, header_timeout_s=300)
    with InProcessKms(state, ServiceConfig(), limits) as srv:
        idle = [connect_from(HOG, srv.port), connect_from(OTHER, srv.port)]
        try:
            wait_for(lambda: srv.server._open_total == 2, "two idle connections")
            status, body = get(srv.port, "/v1/info", source=VICTIM)
            assert (status, body["error"]) == (503, "busy")
        finally:
            for s in idle:
                s.close()
        wait_for(lambda: srv.server._open_total == 0, "the idle connections to close")
        assert get(srv.port, "/v1/info", source=VICTIM)[0] == 200


def test_fair_gate_hands_freed_slots_to_the_peer_holding_fewest() -> None:
    granted: list[str] = []

    async def waiter(gate: FairGate, peer: str, cancel: trio.CancelScope | None = None) -> None:
        with cancel or trio.CancelScope():
            await gate.acquire(peer)
            granted.append(peer)

    async def main() -> None:
        gate = FairGate(2)
        await gate.acquire("hog")
        await gate.acquire("hog")
        gone = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(waiter, gate, "hog")
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, gate, "a", gone)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, gate, "b")
            await trio.testing.wait_all_tasks_blocked()
            gone.cancel()  # a waiter that gives up leaves the queue without a slot
            await trio.testing.wait_all_tasks_blocked()
            gate.release("hog")  # hog holds 1, b holds 0: b first, though the hog queued first
            await trio.testing.wait_all_tasks_blocked()
            assert granted == ["b"]
            gate.release("b")
            gate.release("hog")
            await trio.testing.wait_all_tasks_blocked()
            assert granted == ["b", "hog", "hog"] and gate.held("a") == 0
            for _ in range(3):
                gate.release("hog")
            await trio.testing.wait_all_tasks_blocked()
        assert granted == ["b", "hog", "hog", "hog"] and gate.held("hog") == 0

    trio.run(main)


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("::ffff:10.1.2.3", "10.1.2.3"),  # IPv4-mapped: the same peer as over IPv4
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),  # one /64 is one peer,
        ("2001:db8:1:2:bbbb::9%eth0", "2001:db8:1:2::/64"),  # whatever address it picks
        ("not an address", "?"),
    ],
)
def test_peers_are_counted_by_ipv4_address_or_ipv6_64(host: str, key: str) -> None:
    assert peer_key_of(host) == key
