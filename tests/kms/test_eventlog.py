"""RTMR3 event-log replay and identity extraction (pure units)."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import pytest

from sealfs.attest import eventlog as E
from sealfs.errors import AttestationError

APP = bytes.fromhex("aa" * 20)
COMPOSE = hashlib.sha256(b"compose").digest()


def boot(*extra: E.RuntimeEvent) -> list[E.RuntimeEvent]:
    return [
        E.RuntimeEvent("app-id", APP),
        E.RuntimeEvent("compose-hash", COMPOSE),
        E.RuntimeEvent("boot-mr-done", b""),
        *extra,
    ]


def test_digest_is_dstack_v1_layout() -> None:
    # dstack: SHA-384(u32le(0x08000001) ":" name ":" payload); computed independently here.
    ev = E.RuntimeEvent("app-id", b"\xde\xad\xbe\xef")
    expected = hashlib.sha384(b"\x01\x00\x00\x08:app-id:\xde\xad\xbe\xef").digest()
    assert ev.digest() == expected


def test_replay_extends_from_zero() -> None:
    events = boot()
    mr = bytes(48)
    for ev in events:
        mr = hashlib.sha384(mr + ev.digest()).digest()
    assert E.replay(events) == mr
    assert E.replay([]) == bytes(48)


def test_replay_is_order_and_content_sensitive() -> None:
    events = boot()
    assert E.replay(events) != E.replay(list(reversed(events)))
    changed = [E.RuntimeEvent("app-id", bytes.fromhex("bb" * 20)), *events[1:]]
    assert E.replay(events) != E.replay(changed)


def test_identity_from_log() -> None:
    ident = E.identity_from_log(boot(E.RuntimeEvent("app-started", b"x")))
    assert ident.app_id == APP and ident.compose_hash == COMPOSE


@pytest.mark.parametrize(
    "events, reason",
    [
        ([E.RuntimeEvent("compose-hash", COMPOSE)], "no app-id"),
        ([E.RuntimeEvent("app-id", APP)], "no compose-hash"),
        (boot(E.RuntimeEvent("app-id", bytes(20))), "after boot-mr-done"),
        (
            [
                E.RuntimeEvent("app-id", APP),
                E.RuntimeEvent("app-id", bytes(20)),
                E.RuntimeEvent("compose-hash", COMPOSE),
            ],
            "more than once",
        ),
        ([E.RuntimeEvent("app-id", APP), E.RuntimeEvent("compose-hash", b"short")], "32 bytes"),
        (boot(E.RuntimeEvent("boot-mr-done", b"")), "twice"),
    ],
)
def test_identity_refuses_ambiguous_logs(events: list[E.RuntimeEvent], reason: str) -> None:
    with pytest.raises(AttestationError, match=reason):
        E.identity_from_log(events)


def test_names_with_colons_are_refused() -> None:
    # "a:b" + payload "c" and "a" + payload "b:c" hash the same in the v1 layout.
    with pytest.raises(AttestationError):
        E.RuntimeEvent("app-id:x", b"")
    with pytest.raises(AttestationError):
        E.RuntimeEvent("", b"")
    with pytest.raises(AttestationError):
        E.RuntimeEvent("with space", b"")


def test_wire_roundtrip_and_strictness() -> None:
    events = boot()
    assert E.events_from_wire(E.events_to_wire(events)) == events
    for bad in (
        {"x": 1},
        [{"event": "a"}],
        [{"event": "a", "payload": "zz"}],
        [{"event": "a", "payload": "00", "digest": "00"}],
        [{"event": 1, "payload": ""}],
        [{"event": "a", "payload": ""}] * (E.MAX_EVENTS + 1),
    ):
        with pytest.raises(AttestationError):
            E.events_from_wire(bad)


def test_runtime_log_file_format() -> None:
    events = boot(E.RuntimeEvent("custom", b"\x00\x01"))
    text = "\n".join(e.to_json_line() for e in events) + "\n\n"
    assert E.parse_runtime_log(text) == events
    line = json.loads(events[0].to_json_line())
    assert base64.b64decode(line["payload"]) == APP
    with pytest.raises(AttestationError, match="line 2"):
        E.parse_runtime_log(events[0].to_json_line() + "\n{not json}\n")


def test_event_type_constant() -> None:
    assert struct.pack("<I", E.RUNTIME_EVENT_TYPE) == b"\x01\x00\x00\x08"
