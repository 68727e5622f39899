"""Synchronous KMS client, used by the volume code inside the CVM.

API::

    client = KmsClient([url, ...], app_id, attester, trusted_keys=[pub, ...], deadline_s=60.0)
    key, version = client.get_key(purpose, volume_id, key_version=None)  # -> (Secret, int)
    epoch, root_digest = client.get_epoch(volume_id)                   # -> (int, bytes)
    client.advance_epoch(volume_id, epoch, root_digest)                # -> (int, bytes)

* ``purpose``: one of ``sealfs.kms.protocol.PURPOSES`` - ``"volume-wrap"`` (wraps the
  volume master key in the KMS slot), ``"luks-passphrase"``, ``"epoch-signing"`` (a MAC key
  for the volume's own epoch record). ``key_version=None`` asks for the app's current version;
  the version used is returned, store it next to whatever the key protects.
* ``get_epoch`` of a volume the KMS has never anchored returns ``(0, b"")``.
* ``advance_epoch`` succeeds if ``epoch`` is newer than the KMS's, or equal with the same
  digest (idempotent); it raises :class:`EpochRefused` (``reason`` ``"rollback"`` or
  ``"fork"``) otherwise. It returns the anchored ``(epoch, root_digest)``.
* ``attester``: ``sealfs.attest.simulated.SimulatedAttester`` or
  ``sealfs.attest.configfs_tsm.ConfigfsTsmAttester`` - anything with ``kind``,
  ``quote(report_data) -> bytes``, ``event_log() -> list[RuntimeEvent]`` and
  ``collateral() -> dict | None``.

Errors are :class:`sealfs.errors.KmsError` (unreachable past the deadline, malformed or
unsigned answers, refusals) or :class:`sealfs.errors.AttestationError` (the KMS refused this
CVM's attestation or policy), each with a one-line message.

Trust in the KMS: every answer is signed by a KMS identity key and bound to the request's
nonce and ephemeral key. The keys the client accepts (several, for replicas) come from
something the host cannot write, in order: the ``trusted_keys`` argument (operator or init
configuration); else the ``key-provider`` events measured in this CVM's own event log. Never
from the volume on disk: a host that swaps in a look-alike volume and redirects the KMS address
must not choose the KMS. With neither, the client fails closed (UsageError) unless
``trust_on_first_use`` is set, a development mode that accepts the key the KMS announces on
first contact and logs a warning saying so. ``client.answering_key`` is the key that signed the
last answer (informational, e.g. recorded in a new kms slot).

Replicas and retries: ``url`` is one KMS URL or several replicas of one KMS (same root key,
same state), tried in the order given. An exchange that gets no answer (connection refused,
``request_timeout_s`` passed), or an answer that says "not now" (5xx, 408, 429, a spent nonce),
moves on to the next replica; after a round in which none answered, the client backs off
(0.2 s doubling to 5 s, with jitter) and starts again from the first, all within one
``deadline_s``. A refusal (any other 4xx) is final at once and never asked of another replica:
an unsigned error cannot make a request succeed, but shopping among replicas for a different
answer could (docs/kms-protocol.md §8).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sealfs import strict
from sealfs.attest.eventlog import (
    EVENT_KEY_PROVIDER,
    RuntimeEvent,
    events_to_wire,
    identity_from_log,
)
from sealfs.crypto import AuthError, EphemeralKeyPair, Secret, ct_equal, verify_signature
from sealfs.errors import AttestationError, KmsError, UsageError
from sealfs.kms import protocol as P

log = logging.getLogger("sealfs.kms.client")
T = TypeVar("T")

MAX_RESPONSE_BYTES = 1 << 20
_ATTESTATION_CODES = {
    "attestation_failed",
    "policy_denied",
    "unknown_app",
    "app_id_mismatch",
    "simulated_disabled",
}


class Attester(Protocol):
    kind: str

    def quote(self, report_data: bytes) -> bytes: ...

    def event_log(self) -> list[RuntimeEvent]: ...

    def collateral(self) -> dict[str, Any] | None: ...


class KeyProvider(Protocol):
    """What a kms key slot needs from the KMS (sealfs.volume.header): app keys released to
    this CVM, and the public facts a new slot records. :class:`KmsClient` is one."""

    @property
    def url(self) -> str: ...

    @property
    def app_id(self) -> bytes: ...

    @property
    def answering_key(self) -> bytes | None: ...

    def get_key(
        self, purpose: str, volume_id: bytes, key_version: int | None = None
    ) -> tuple[Secret, int]: ...


class EpochStore(Protocol):
    """What the freshness anchor needs from the KMS (sealfs.volume.anchor): read and advance
    a volume's anchored ``(epoch, head)``. :class:`KmsClient` is one."""

    def get_epoch(self, volume_id: bytes) -> tuple[int, bytes]: ...

    def advance_epoch(
        self, volume_id: bytes, epoch: int, root_digest: bytes
    ) -> tuple[int, bytes]: ...


class VolumeKms(KeyProvider, EpochStore, Protocol):
    """Everything a volume asks of the KMS: its kms slot's keys and its freshness anchor."""


class EpochRefused(KmsError):
    """The KMS refused an epoch advance: ``reason`` is ``"rollback"`` or ``"fork"``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Retry(KmsError):
    """No answer, or "not now": try the next replica, with a new nonce, if the deadline allows
    (a KmsError to whoever asks one replica only, as :func:`exchange`'s callers do)."""


@dataclass(frozen=True)
class Replica:
    """One KMS address: ``http(s)://host[:port]``, nothing else."""

    url: str
    scheme: str
    host: str
    port: int | None

    @classmethod
    def parse(cls, url: str) -> Replica:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise KmsError(f"KMS URL must be http(s)://host[:port], not {url!r}")
        if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
            raise KmsError("KMS URL must not have a path, query or fragment")
        try:
            port = parsed.port
        except ValueError:
            raise KmsError(f"bad port in KMS URL {url!r}") from None
        return cls(f"{parsed.scheme}://{parsed.netloc}", parsed.scheme, parsed.hostname, port)


class KmsClient:
    def __init__(
        self,
        url: str | Sequence[str],
        app_id: bytes | str,
        attester: Attester,
        *,
        trusted_keys: Sequence[bytes] = (),
        trust_on_first_use: bool = False,
        deadline_s: float = 60.0,
        request_timeout_s: float = 15.0,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise KmsError("no KMS URL given")
        self.replicas = tuple(Replica.parse(u) for u in urls)
        if len({r.url for r in self.replicas}) != len(self.replicas):
            raise KmsError("a KMS URL is given twice")
        self.urls = tuple(r.url for r in self.replicas)
        self.url = self.urls[0]  # the first choice; recorded (as a hint only) in a kms slot
        if isinstance(app_id, str):
            try:
                app_id = strict.hex_bytes(app_id, 1, P.MAX_ID_BYTES)
            except ValueError as e:
                raise KmsError(f"app id {e}") from None
        if not 1 <= len(app_id) <= P.MAX_ID_BYTES:
            raise KmsError(f"app id must be 1-{P.MAX_ID_BYTES} bytes")
        self.app_id = app_id
        self.attester = attester
        self.deadline_s = deadline_s
        self.request_timeout_s = request_timeout_s
        if any(len(k) != P.PUBLIC_KEY_SIZE for k in trusted_keys):
            raise KmsError("a KMS public key must be 32 bytes (Ed25519)")
        self.trusted_keys: tuple[bytes, ...] = tuple(bytes(k) for k in trusted_keys)
        self.trust_on_first_use = trust_on_first_use
        self.answering_key: bytes | None = None

    def __repr__(self) -> str:
        return f"<KmsClient {' '.join(self.urls)} app={self.app_id.hex()}>"

    # --- public operations -------------------------------------------------------------------

    def get_key(
        self, purpose: str, volume_id: bytes, key_version: int | None = None
    ) -> tuple[Secret, int]:
        """The app key for ``purpose`` on ``volume_id``, and its version."""
        if purpose not in P.PURPOSES:
            raise KmsError(f"unknown key purpose {purpose!r}")
        params = _checked(P.GetKey(purpose, bytes(volume_id), key_version))
        result, eph, nonce = self._call(params)
        version = _int(result, "key_version")
        if key_version is not None and version != key_version:
            raise KmsError("KMS returned a different key version than requested")
        info = P.key_release_info(self.app_id, purpose, params.volume_id, version, nonce)
        try:
            key = eph.open_sealed(_hex(result, "enc"), _hex(result, "ciphertext"), info)
        except AuthError:
            raise KmsError("released key does not open with this request's ephemeral key") from None
        return key, version

    def get_epoch(self, volume_id: bytes) -> tuple[int, bytes]:
        """The KMS's freshness anchor for ``volume_id``: ``(epoch, root_digest)``."""
        result, _, _ = self._call(_checked(P.GetEpoch(bytes(volume_id))))
        if not result.get("known"):
            return 0, b""
        return _int(result, "epoch"), _hex(result, "root_digest")

    def advance_epoch(self, volume_id: bytes, epoch: int, root_digest: bytes) -> tuple[int, bytes]:
        """Anchor ``volume_id`` at ``epoch`` with metadata root ``root_digest``."""
        params = _checked(P.AdvanceEpoch(bytes(volume_id), epoch, bytes(root_digest)))
        result, _, _ = self._call(params)
        got = (_int(result, "epoch"), _hex(result, "root_digest"))
        if got[0] != epoch or not ct_equal(got[1], root_digest):
            raise KmsError("KMS anchored a different epoch than requested")
        return got

    # --- one attested exchange, failing over between replicas ---------------------------------

    def _call(self, params: P.Params) -> tuple[dict[str, Any], EphemeralKeyPair, bytes]:
        return self._with_failover(
            lambda replica, deadline: self._attempt(replica, params, deadline)
        )

    def _with_failover(self, fn: Callable[[Replica, float], T]) -> T:
        """``fn`` on each replica in order until one answers; rounds separated by backoff, all
        within ``deadline_s``. Only :class:`_Retry` moves on: every other error is final."""
        deadline = time.monotonic() + self.deadline_s
        delay = 0.2
        last: dict[str, str] = {}
        while True:
            for replica in self.replicas:
                try:
                    return fn(replica, deadline)
                except _Retry as e:
                    last[replica.url] = str(e)
                    if time.monotonic() >= deadline:
                        raise self._unavailable(last) from None
                    # A replica skipped is worth an operator's look; one KMS retried is not.
                    level = logging.WARNING if len(self.replicas) > 1 else logging.INFO
                    log.log(level, "KMS at %s: %s; trying the next replica", replica.url, e)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._unavailable(last)
            time.sleep(min(remaining, delay * random.uniform(0.75, 1.25)))
            delay = min(delay * 2, 5.0)

    def _unavailable(self, last: dict[str, str]) -> KmsError:
        if len(self.replicas) == 1:
            return KmsError(
                f"KMS at {self.url} not available after {self.deadline_s:g} s: {last[self.url]}"
            )
        reasons = "; ".join(f"{url}: {why}" for url, why in last.items())
        return KmsError(f"no KMS replica available after {self.deadline_s:g} s ({reasons})")

    def _attempt(
        self, replica: Replica, params: P.Params, deadline: float
    ) -> tuple[dict[str, Any], EphemeralKeyPair, bytes]:
        events = _attesting(self.attester.event_log)
        identity = identity_from_log(events)
        if not ct_equal(identity.app_id, self.app_id):
            raise AttestationError(
                f"this CVM's measured app id is {identity.app_id.hex()}, not {self.app_id.hex()}"
            )
        trusted = self._trusted_keys(replica, events, deadline)
        nonce = _hex(self._http(replica, "POST", "/v1/nonce", {}, deadline), "nonce")
        if len(nonce) != P.NONCE_SIZE:
            raise KmsError("KMS sent a malformed nonce")
        eph = EphemeralKeyPair()
        report_data = P.report_data_for(nonce, eph.public_bytes, params)
        quote = _attesting(self.attester.quote, report_data)
        collateral = _attesting(self.attester.collateral)
        body = {
            "version": P.PROTOCOL_VERSION,
            "tee": self.attester.kind,
            "nonce": nonce.hex(),
            "public_key": eph.public_bytes.hex(),
            "quote": base64.b64encode(quote).decode("ascii"),
            "event_log": events_to_wire(events),
            "app_id": self.app_id.hex(),
            "collateral": collateral,
            "params": params.to_wire(),
        }
        resp = self._http(replica, "POST", P.OP_PATHS[params.op], body, deadline)
        result = resp.get("result")
        if resp.get("op") != params.op or not isinstance(result, dict):
            raise KmsError("KMS answer is malformed")
        signer = _hex(resp, "kms_public_key")
        if not any(ct_equal(signer, key) for key in trusted):
            raise KmsError(
                f"KMS at {replica.url} answered as {signer.hex()[:16]}..., which is "
                "not a trusted KMS identity (redirected to another KMS?)"
            )
        if not ct_equal(_hex(result, "app_id"), self.app_id):
            raise KmsError("KMS answered for another app id")
        if not isinstance(params, P.GetKey) and _hex(result, "volume_id") != params.volume_id:
            raise KmsError("KMS answered for another volume")
        if not verify_signature(
            signer,
            _hex(resp, "signature"),
            P.response_message(params.op, report_data, _result_parts(params, result)),
        ):
            raise KmsError("KMS answer signature is invalid (tampered in transit?)")
        self.answering_key = signer
        return result, eph, nonce

    def _trusted_keys(
        self, replica: Replica, events: list[RuntimeEvent], deadline: float
    ) -> tuple[bytes, ...]:
        """The KMS identities this client accepts; resolved once, never from the disk."""
        if not self.trusted_keys:
            measured = tuple(
                k
                for k in (
                    P.parse_key_provider(e.payload) for e in events if e.name == EVENT_KEY_PROVIDER
                )
                if k is not None
            )
            if measured:
                self.trusted_keys = measured
            elif self.trust_on_first_use:
                announced = _hex(
                    self._http(replica, "GET", "/v1/info", None, deadline), "kms_public_key"
                )
                if len(announced) != P.PUBLIC_KEY_SIZE:
                    raise KmsError("KMS announced a malformed public key")
                log.warning(
                    "INSECURE: trusting KMS identity %s from %s on first use; the "
                    "host controls the network and can answer in its place. Pin it "
                    "with --kms-public-key %s",
                    announced.hex(),
                    replica.url,
                    announced.hex(),
                )
                self.trusted_keys = (announced,)
            else:
                raise UsageError(
                    "no trusted KMS identity: give --kms-public-key HEX (the "
                    "key `sealfs kms init` printed; repeat it for each replica) "
                    "or measure a key-provider event; the volume on disk is "
                    "never trusted to name its KMS"
                )
        return self.trusted_keys

    # --- HTTP --------------------------------------------------------------------------------

    def _http(
        self,
        replica: Replica,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        deadline: float,
    ) -> dict[str, Any]:
        # One exchange may not outlive the caller's overall deadline.
        timeout = max(0.2, min(self.request_timeout_s, deadline - time.monotonic()))
        return exchange(replica, method, path, body, timeout)


def exchange(
    replica: Replica, method: str, path: str, body: dict[str, Any] | None, timeout: float
) -> dict[str, Any]:
    """One HTTP exchange with one replica: its JSON answer if ``ok``; :class:`_Retry` if there
    was none, or it said "not now" (5xx, 408, 429, ``bad_nonce``); a final error otherwise."""
    cls = http.client.HTTPSConnection if replica.scheme == "https" else http.client.HTTPConnection
    conn = cls(replica.host, replica.port, timeout=timeout)
    cutoff = _Cutoff(timeout)
    conn._create_connection = cutoff.connect  # type: ignore[attr-defined]
    data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read(MAX_RESPONSE_BYTES + 1)
        status = resp.status
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        raise _Retry("timed out" if cutoff.fired else _describe(e)) from None
    finally:
        cutoff.cancel()
        conn.close()
    if len(raw) > MAX_RESPONSE_BYTES:
        raise KmsError("KMS answer too large")
    try:
        payload = strict.loads(raw)  # the network is the host's: bounded depth
        if not isinstance(payload, dict):
            raise ValueError
    except ValueError:
        if status >= 500 or status in (408, 429):
            raise _Retry(f"HTTP {status}") from None
        raise KmsError(f"KMS answered HTTP {status} without a valid JSON body") from None
    if status == 200 and payload.get("ok") is True:
        return payload
    code, message = str(payload.get("error", "?")), str(payload.get("message", ""))[:300]
    if status >= 500 or status in (408, 429) or code == "bad_nonce":
        raise _Retry(f"HTTP {status} {code}: {message}")
    if code in _ATTESTATION_CODES:
        raise AttestationError(f"KMS refused ({code}): {message}")
    if status == 409 and code in ("rollback", "fork"):
        raise EpochRefused(code, f"KMS refused ({code}): {message}")
    raise KmsError(f"KMS refused (HTTP {status} {code}): {message}")


class _Cutoff:
    """Ends one exchange's connection ``timeout`` seconds after it began. A socket timeout
    bounds each recv, not the exchange: a server (or the host's network) trickling one byte
    at a time would otherwise hold the client far past its deadline (slowloris). Shutting the
    socket down makes the blocked recv return, whichever thread is in it."""

    def __init__(self, timeout: float) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None  # a duplicate: shutdown acts on the connection
        self.fired = False
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def connect(
        self, address: tuple[str, int], timeout: float, source: Any = None
    ) -> socket.socket:
        """``socket.create_connection``, the connection then watched (TLS wraps the same)."""
        sock = socket.create_connection(address, timeout, source)
        with self._lock:
            self._sock = sock.dup()
            if self.fired:
                self._sock.shutdown(socket.SHUT_RDWR)
        return sock

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                with contextlib.suppress(OSError):  # already closed by the other side
                    self._sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


@dataclass(frozen=True)
class ReplicaStatus:
    """What one KMS replica says about itself (``GET /v1/info``, unauthenticated): for an
    operator checking replicas, never for trust."""

    url: str
    reachable: bool
    latency_ms: float | None
    kms_public_key: str | None
    protocol: int | None
    error: str | None


def probe(url: str, timeout_s: float) -> ReplicaStatus:
    """Ask one replica for its public information, once, and time the exchange."""
    replica = Replica.parse(url)
    start = time.monotonic()
    try:
        info = exchange(replica, "GET", "/v1/info", None, timeout_s)
    except KmsError as e:
        return ReplicaStatus(replica.url, False, None, None, None, str(e))
    latency = (time.monotonic() - start) * 1000
    key, protocol = info.get("kms_public_key"), info.get("protocol")
    return ReplicaStatus(
        replica.url,
        True,
        round(latency, 2),
        key if isinstance(key, str) else None,
        protocol if isinstance(protocol, int) else None,
        None,
    )


def _attesting(fn: Callable[..., T], *args: Any) -> T:
    """Call the attester; its I/O failures become one-line AttestationErrors."""
    try:
        return fn(*args)
    except (OSError, ValueError) as e:
        raise AttestationError(f"attester failed: {getattr(e, 'strerror', None) or e}") from None


def _checked(params: P.Params) -> P.Params:
    """Apply the server's own parameter checks locally, for a clear error before any I/O."""
    try:
        type(params).from_wire(params.to_wire())
    except P.ProtocolError as e:
        raise KmsError(e.message) from None
    return params


def _result_parts(params: P.Params, result: dict[str, Any]) -> tuple[Any, ...]:
    app_id = _hex(result, "app_id")
    if isinstance(params, P.GetKey):
        return P.get_key_result_parts(
            app_id, _int(result, "key_version"), _hex(result, "enc"), _hex(result, "ciphertext")
        )
    known = result.get("known")
    if not isinstance(known, bool):
        raise KmsError("KMS answer is malformed (known)")
    return P.epoch_result_parts(
        app_id, _hex(result, "volume_id"), _int(result, "epoch"), _hex(result, "root_digest"), known
    )


def _hex(obj: dict[str, Any], name: str) -> bytes:
    try:
        return strict.hex_bytes(obj.get(name))
    except ValueError:
        raise KmsError(f"KMS answer is malformed ({name})") from None


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise KmsError(f"KMS answer is malformed ({name})")
    return value


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError):
        return "timed out"
    return getattr(e, "strerror", None) or type(e).__name__
