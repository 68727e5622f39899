"""The RTMR3 runtime event log: replay it, and read the app identity out of it.

A CVM measures what it boots (app id, compose hash, instance id, KMS identity) by extending
RTMR3 with one SHA-384 digest per *runtime event*. The quote proves only the final RTMR3 value;
the event log is what says which events produced it. A verifier therefore never trusts the log
on its own: it replays the log and accepts it only if the replay reproduces the quote's RTMR3,
and then reads the app identity from that replayed log, never from anything the client claims.

The format matches dstack's runtime events (its "v1" digest), so logs from a dstack CVM replay:

* digest(event) = SHA-384( u32le(0x08000001) || ":" || name || ":" || payload )
* RTMR3 starts at 48 zero bytes; for each event, RTMR3 = SHA-384( RTMR3 || digest(event) )
* on disk, one JSON object per line: ``{"event": name, "payload": base64(payload),
  "version": 1}`` (dstack writes ``/run/log/dstack/runtime_events.log``; readers ignore
  ``version``); on the KMS wire, payload is hex.

Because the v1 digest joins name and payload with ":", a name containing ":" would make two
different events hash the same. Names here are therefore restricted to printable ASCII without
":" and whitespace, and identity events must occur exactly once and before ``boot-mr-done``:
after boot an app that can emit its own events cannot add or re-interpret an identity event.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sealfs import strict
from sealfs.errors import AttestationError

#: dstack's event type for runtime events (not a TCG-defined type).
RUNTIME_EVENT_TYPE = 0x08000001
RTMR_SIZE = 48
#: Where dstack's guest tooling appends runtime events.
DEFAULT_RUNTIME_LOG = "/run/log/dstack/runtime_events.log"

MAX_EVENTS = 512
MAX_NAME_LEN = 64
MAX_PAYLOAD_LEN = 8192
#: The version of the log line format written here (the "version" field).
LOG_LINE_VERSION = 1
#: A log of MAX_EVENTS events of the largest size, base64 and JSON included, fits this.
MAX_LOG_BYTES = MAX_EVENTS * (MAX_PAYLOAD_LEN * 4 // 3 + 256)

EVENT_APP_ID = "app-id"
EVENT_COMPOSE_HASH = "compose-hash"
EVENT_INSTANCE_ID = "instance-id"
EVENT_KEY_PROVIDER = "key-provider"
EVENT_BOOT_DONE = "boot-mr-done"
#: Events that define who the CVM is; each may occur at most once, before boot-mr-done.
IDENTITY_EVENTS = (EVENT_APP_ID, EVENT_COMPOSE_HASH, EVENT_INSTANCE_ID, EVENT_KEY_PROVIDER)


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME_LEN and all(0x21 <= ord(c) <= 0x7E and c != ":" for c in name)


@dataclass(frozen=True)
class RuntimeEvent:
    """One runtime event: a name and an opaque payload, measured into RTMR3."""

    name: str
    payload: bytes

    def __post_init__(self) -> None:
        if not _valid_name(self.name):
            raise AttestationError(
                "event log: event name must be 1-64 printable ASCII characters without ':'"
            )
        if len(self.payload) > MAX_PAYLOAD_LEN:
            raise AttestationError("event log: event payload too large")

    def digest(self) -> bytes:
        """The SHA-384 digest this event extends RTMR3 with (dstack v1 layout)."""
        return hashlib.sha384(
            struct.pack("<I", RUNTIME_EVENT_TYPE)
            + b":"
            + self.name.encode("ascii")
            + b":"
            + self.payload
        ).digest()

    def to_wire(self) -> dict[str, str]:
        """The KMS-protocol form (payload as lowercase hex)."""
        return {"event": self.name, "payload": self.payload.hex()}

    def to_json_line(self) -> str:
        """The on-disk runtime-log form (payload as base64, like dstack)."""
        return json.dumps(
            {
                "event": self.name,
                "payload": base64.b64encode(self.payload).decode("ascii"),
                "version": LOG_LINE_VERSION,
            },
            separators=(",", ":"),
        )


def extend(rtmr: bytes, digest: bytes) -> bytes:
    """One RTMR extend step: SHA-384(old || digest)."""
    if len(rtmr) != RTMR_SIZE or len(digest) != RTMR_SIZE:
        raise ValueError("RTMR values and event digests are 48 bytes")
    return hashlib.sha384(rtmr + digest).digest()


def replay(events: Iterable[RuntimeEvent]) -> bytes:
    """The RTMR3 value that measuring ``events`` in order, from reset, produces."""
    rtmr = bytes(RTMR_SIZE)
    for event in events:
        rtmr = extend(rtmr, event.digest())
    return rtmr


def events_from_wire(value: Any) -> list[RuntimeEvent]:
    """Parse the KMS-protocol event list strictly: a JSON list of ``{"event", "payload"}``."""
    if not isinstance(value, list):
        raise AttestationError("event log: expected a list of events")
    if len(value) > MAX_EVENTS:
        raise AttestationError(f"event log: more than {MAX_EVENTS} events")
    events = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"event", "payload"}:
            raise AttestationError("event log: each event needs exactly 'event' and 'payload'")
        name, payload = item["event"], item["payload"]
        if not isinstance(name, str) or not isinstance(payload, str):
            raise AttestationError("event log: event and payload must be strings")
        try:
            raw = strict.hex_bytes(payload, 0, MAX_PAYLOAD_LEN)
        except ValueError as e:
            raise AttestationError(f"event log: event payload {e}") from None
        events.append(RuntimeEvent(name, raw))
    return events


def events_to_wire(events: Iterable[RuntimeEvent]) -> list[dict[str, str]]:
    return [e.to_wire() for e in events]


def parse_runtime_log(text: str) -> list[RuntimeEvent]:
    """Parse a runtime event log file (JSON lines, base64 payloads; blank lines ignored)."""
    events = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = strict.loads(line)
            name, payload = obj["event"], obj.get("payload", "")
            if not isinstance(name, str) or not isinstance(payload, str):
                raise TypeError
            raw = base64.b64decode(payload, validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise AttestationError(f"runtime event log line {lineno} is malformed") from None
        events.append(RuntimeEvent(name, raw))
        if len(events) > MAX_EVENTS:
            raise AttestationError(f"runtime event log has more than {MAX_EVENTS} events")
    return events


def _open_log(path: str | os.PathLike[str], flags: int) -> int:
    """Open the log without following a link and insist on a regular file: /run is the CVM's,
    but whatever runs in it before us (or the app, later) must not redirect our writes."""
    try:
        # O_NONBLOCK: a FIFO planted there must not hang the boot (for files it is a no-op).
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AttestationError(f"runtime event log {path} is a symbolic link") from None
        if e.errno == errno.ENXIO:
            raise AttestationError(f"runtime event log {path} is not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AttestationError(f"runtime event log {path} is not a regular file")
    return fd


def load_runtime_log(path: str | os.PathLike[str]) -> list[RuntimeEvent]:
    """The events in the runtime log at ``path`` (none if it does not exist yet); read without
    following links and refused beyond :data:`MAX_LOG_BYTES`."""
    try:
        fd = _open_log(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise AttestationError(f"cannot read runtime event log {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_LOG_BYTES + 1)
    if len(raw) > MAX_LOG_BYTES:
        raise AttestationError(f"runtime event log {path} is larger than {MAX_LOG_BYTES} bytes")
    try:
        return parse_runtime_log(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise AttestationError(f"runtime event log {path} is not UTF-8") from None


def append_runtime_event(
    path: str | os.PathLike[str], event: RuntimeEvent, *, truncate: bool = False
) -> int:
    """Append ``event`` as one line (0600 file, parent made 0700 if missing, fsynced) and
    return the file's size before it, so a caller whose RTMR extend then fails can cut the
    line off again (:func:`truncate_runtime_log`). ``truncate`` starts a new log (a power-on)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        fd = _open_log(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except OSError as e:
        raise AttestationError(f"cannot open runtime event log {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        if truncate:
            os.ftruncate(fd, 0)
        before = os.fstat(fd).st_size
        os.write(fd, event.to_json_line().encode("ascii") + b"\n")
        os.fsync(fd)
        return before
    except OSError as e:
        raise AttestationError(f"cannot write runtime event log {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def truncate_runtime_log(path: str | os.PathLike[str], size: int) -> None:
    """Cut the log back to ``size`` bytes (undo an append whose extend failed)."""
    try:
        fd = _open_log(path, os.O_WRONLY)
    except OSError as e:
        raise AttestationError(f"cannot open runtime event log {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class AppIdentity:
    """Who a CVM is, as measured into RTMR3 at boot."""

    app_id: bytes
    compose_hash: bytes
    instance_id: bytes | None = None
    key_provider: bytes | None = None


def identity_from_log(events: Sequence[RuntimeEvent]) -> AppIdentity:
    """Read the app identity from an (already replay-checked) event log.

    Refuses a log in which an identity event is missing (app id, compose hash), repeated, or
    emitted after ``boot-mr-done``: any of these would let a later, app-controlled event
    choose which identity the verifier sees.
    """
    found: dict[str, bytes] = {}
    boot_done = False
    for event in events:
        if event.name == EVENT_BOOT_DONE:
            if boot_done:
                raise AttestationError("event log: boot-mr-done occurs twice")
            boot_done = True
        elif event.name in IDENTITY_EVENTS:
            if boot_done:
                raise AttestationError(f"event log: {event.name} occurs after boot-mr-done")
            if event.name in found:
                raise AttestationError(f"event log: {event.name} occurs more than once")
            found[event.name] = event.payload
    for required in (EVENT_APP_ID, EVENT_COMPOSE_HASH):
        if required not in found:
            raise AttestationError(f"event log: no {required} event")
    app_id = found[EVENT_APP_ID]
    if not 1 <= len(app_id) <= 64:
        raise AttestationError("event log: app id must be 1-64 bytes")
    if len(found[EVENT_COMPOSE_HASH]) != 32:
        raise AttestationError("event log: compose hash must be 32 bytes (SHA-256)")
    return AppIdentity(
        app_id=app_id,
        compose_hash=found[EVENT_COMPOSE_HASH],
        instance_id=found.get(EVENT_INSTANCE_ID),
        key_provider=found.get(EVENT_KEY_PROVIDER),
    )
