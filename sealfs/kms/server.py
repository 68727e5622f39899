"""A small, strict HTTP/1.1 server for the KMS, on trio streams.

Deliberately minimal, because every byte of it faces the network:

* one request per connection (``Connection: close``): no keep-alive, no pipelining, no
  request-smuggling surface;
* bodies only with a single, all-digit ``Content-Length`` no larger than the limit;
  ``Transfer-Encoding`` is refused; header block size and count are bounded; obsolete line
  folding and whitespace before the colon are refused;
* the header block must arrive within ``header_timeout_s`` and the whole request within
  ``read_timeout_s`` (idle and slow-loris connections are answered 408 and closed);
* connections are counted per peer (an IPv4 address or an IPv6 /64) from accept until the
  socket is closed: a peer holding ``max_connections_per_peer`` gets 429 for the next one, so
  one host cannot take every slot; of its sockets in a lingering close (after an answer or a
  refusal) it keeps at most as many again, each new one closing its oldest, so a flood of
  refused connections cannot hold the KMS's file descriptors either;
* at most ``max_connections`` are served at once; up to ``max_queued`` more wait (at most
  ``read_timeout_s``) in a :class:`FairGate`, which hands each freed slot to the waiting peer
  holding the fewest; beyond that: immediate 503. Worker threads are shared out the same way;
* every failure is a JSON body ``{"ok": false, "error": code, "message": text}`` with a
  fitting status; unexpected exceptions become a generic 500 (details only in the log), and
  never stop the server;
* CPU-heavy verification runs in worker threads, so the event loop keeps accepting and
  timing out connections.

Routes: ``GET /v1/info``, ``POST /v1/nonce``, ``POST /v1/key``, ``POST /v1/epoch/get``,
``POST /v1/epoch/advance``.
"""

from __future__ import annotations

import collections
import contextlib
import http
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import trio

from sealfs.kms import protocol as P
from sealfs.kms.service import KmsService

log = logging.getLogger("sealfs.kms")

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH_OPS = {path: op for op, path in P.OP_PATHS.items()}


@dataclass(frozen=True)
class HttpLimits:
    """Server limits; docs/kms-protocol.md §9 lists them with their defaults."""

    max_header_bytes: int = 16 * 1024
    max_headers: int = 64
    max_body_bytes: int = P.MAX_BODY_BYTES
    header_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    write_timeout_s: float = 10.0
    max_connections: int = 128
    max_connections_per_peer: int = 16
    max_queued: int = 512
    worker_threads: int = max(2, os.cpu_count() or 2)
    linger_s: float = 1.0  # lingering close: how long to drain a peer's unread input


class FairGate:
    """At most ``capacity`` slots held at once, shared fairly between peers.

    When the gate is full, waiters queue per peer, and each freed slot goes to the waiting
    peer that holds the fewest slots (among equals, the one served longest ago). A peer that
    opens many connections therefore only ever delays itself: a newcomer holding nothing is
    next in line, whatever the hog has queued.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._total = 0
        self._held: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, collections.deque[trio.Event]] = {}

    def held(self, peer: str) -> int:
        return self._held[peer]

    async def acquire(self, peer: str) -> None:
        """Wait for a slot (cancellable; a slot granted to a cancelled waiter is passed on)."""
        if self._total < self.capacity and not self._waiting:
            self._take(peer)
            return
        granted = trio.Event()
        self._waiting.setdefault(peer, collections.deque()).append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self.release(peer)
            else:
                self._withdraw(peer, granted)
            raise

    def release(self, peer: str) -> None:
        self._held[peer] -= 1
        if not self._held[peer]:
            del self._held[peer]
        self._total -= 1
        self._grant()

    def _take(self, peer: str) -> None:
        self._held[peer] += 1
        self._total += 1

    def _grant(self) -> None:
        while self._total < self.capacity and self._waiting:
            # min() keeps the first of equals; re-inserting a served peer at the end of the
            # dict makes equals take turns.
            peer = min(self._waiting, key=self._held.__getitem__)
            queue = self._waiting.pop(peer)
            granted = queue.popleft()
            if queue:
                self._waiting[peer] = queue
            self._take(peer)
            granted.set()

    def _withdraw(self, peer: str, granted: trio.Event) -> None:
        queue = self._waiting[peer]
        queue.remove(granted)
        if not queue:
            del self._waiting[peer]


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


async def read_request(stream: trio.abc.Stream, limits: HttpLimits) -> Request | None:
    """Read one request; None if the peer closed before sending anything."""
    buf = bytearray()
    with trio.fail_after(limits.header_timeout_s):
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > limits.max_header_bytes:
                raise HttpError(431, "headers_too_large", "request header block too large")
            chunk = await stream.receive_some(8192)
            if not chunk:
                if not buf:
                    return None
                raise HttpError(400, "bad_request", "connection closed mid-request")
            buf += chunk
    if end > limits.max_header_bytes:
        raise HttpError(431, "headers_too_large", "request header block too large")
    head, rest = bytes(buf[:end]), bytes(buf[end + 4 :])
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if (
        len(parts) != 3
        or not _TOKEN.fullmatch(parts[0])
        or not parts[1].startswith(b"/")
        or len(parts[1]) > 256
        or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0")
    ):
        raise HttpError(400, "bad_request", "malformed request line")
    if len(lines) - 1 > limits.max_headers:
        raise HttpError(431, "headers_too_large", "too many request headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "bad_request", "malformed header line")
        key = name.decode("ascii").lower()
        if key in headers and key in ("content-length", "host", "transfer-encoding"):
            raise HttpError(400, "bad_request", f"duplicate {key} header")
        headers[key] = value.strip(b" \t").decode("latin-1")
    if "transfer-encoding" in headers:
        raise HttpError(
            411, "length_required", "Transfer-Encoding is not supported; send a Content-Length"
        )
    method = parts[0].decode("ascii")
    length = 0
    if "content-length" in headers:
        raw = headers["content-length"]
        if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
            raise HttpError(400, "bad_request", "malformed Content-Length")
        length = int(raw)
    elif method == "POST":
        raise HttpError(411, "length_required", "POST needs a Content-Length")
    if length > limits.max_body_bytes:
        raise HttpError(413, "too_large", f"request body larger than {limits.max_body_bytes} bytes")
    if headers.get("expect", "").lower() == "100-continue" and len(rest) < length:
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = bytearray(rest[:length])
    while len(body) < length:
        chunk = await stream.receive_some(min(65536, length - len(body)))
        if not chunk:
            raise HttpError(400, "bad_request", "connection closed mid-body")
        body += chunk
    return Request(method, parts[1].decode("ascii", "replace"), headers, bytes(body))


def render_response(status: int, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    reason = http.HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def error_payload(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "message": message}


class KmsHttpServer:
    """Serves one :class:`KmsService` over HTTP."""

    def __init__(self, service: KmsService, limits: HttpLimits | None = None) -> None:
        self.service = service
        self.limits = limits or HttpLimits()
        # per peer: every socket from accept until closed (served, queued, refused, lingering)
        self._open: collections.Counter[str] = collections.Counter()
        self._open_total = 0  # served + queued
        self._lingering: dict[str, collections.deque[trio.CancelScope]] = {}  # per peer
        self._refused: set[str] = set()  # peers at their limit whose refusal was logged
        self._slots = FairGate(self.limits.max_connections)
        self._workers = FairGate(self.limits.worker_threads)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (port 0 = ephemeral) and serve until cancelled.
        ``task_status.started`` receives the bound port."""
        listeners = await self.listen(host, port)
        task_status.started(listeners[0].socket.getsockname()[1])
        await self.serve_listeners(listeners)

    @staticmethod
    async def listen(host: str, port: int) -> list[trio.SocketListener]:
        """Bind the listening sockets (OSError if the address is unavailable)."""
        return await trio.open_tcp_listeners(port, host=host)

    async def serve_listeners(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        peer, key = _peer(stream), peer_key(stream)
        self._open[key] += 1  # until the socket is closed: lingering sockets count too
        try:
            refusal = self._refusal(key)
            if refusal is not None:
                status, payload, quiet = refusal
                await self._send(stream, status, payload, peer, "-", quiet)
                return
            self._open_total += 1
            try:
                await self._queue_and_serve(stream, peer, key)
            finally:
                self._open_total -= 1
        except Exception:  # never let one connection take the server down
            log.exception("internal error serving %s", peer)
        finally:
            await self._linger(stream, key)
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]
                self._refused.discard(key)

    async def _linger(self, stream: trio.SocketStream, key: str) -> None:
        """A lingering close that keeps at most ``max_connections_per_peer`` of a peer's
        sockets lingering: each new one cuts the oldest short (which has had the longest to
        read its answer)."""
        lingering = self._lingering.setdefault(key, collections.deque())
        with trio.CancelScope() as scope:
            lingering.append(scope)
            while len(lingering) > self.limits.max_connections_per_peer:
                lingering.popleft().cancel()
            try:
                await _lingering_close(stream, self.limits.linger_s)
            finally:
                if scope in lingering:
                    lingering.remove(scope)
                if not lingering and self._lingering.get(key) is lingering:
                    del self._lingering[key]

    def _refusal(self, key: str) -> tuple[int, dict[str, Any], bool] | None:
        """(status, payload, quiet) refusing a new connection from ``key`` at once, or None.

        Only a peer's first refusal while it stays at its limit is logged as a warning, so a
        connection flood cannot flood the log too.
        """
        if self._open[key] > self.limits.max_connections_per_peer:  # this one included
            quiet = key in self._refused
            self._refused.add(key)
            return (
                429,
                error_payload(
                    "too_many_connections", "too many connections from your address; retry later"
                ),
                quiet,
            )
        if self._open_total >= self.limits.max_connections + self.limits.max_queued:
            return 503, error_payload("busy", "too many connections; retry"), False
        return None

    async def _queue_and_serve(self, stream: trio.SocketStream, peer: str, key: str) -> None:
        """Wait (at most the request timeout) for a fairly shared slot, then serve."""
        admitted = False
        with trio.move_on_after(self.limits.read_timeout_s):
            await self._slots.acquire(key)
            admitted = True
        if not admitted:
            await self._send(
                stream, 503, error_payload("busy", "too many connections; retry"), peer, "-"
            )
            return
        try:
            await self._serve_one(stream, peer, key)
        finally:
            self._slots.release(key)

    async def _serve_one(self, stream: trio.SocketStream, peer: str, key: str) -> None:
        target = "-"
        try:
            with trio.fail_after(self.limits.read_timeout_s):
                req = await read_request(stream, self.limits)
            if req is None:
                return
            target = f"{req.method} {req.path}"
            status, payload = await self._dispatch(req, key)
        except trio.TooSlowError:
            status, payload = 408, error_payload("timeout", "request not received in time")
        except HttpError as e:
            status, payload = e.status, error_payload(e.code, e.message)
        except P.ProtocolError as e:
            status, payload = e.status, error_payload(e.code, e.message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:
            log.exception("internal error handling %s from %s", target, peer)
            status, payload = 500, error_payload("internal", "KMS internal error")
        await self._send(stream, status, payload, peer, target)

    async def _send(
        self,
        stream: trio.SocketStream,
        status: int,
        payload: dict[str, Any],
        peer: str,
        target: str,
        quiet: bool = False,
    ) -> None:
        level = logging.DEBUG if quiet else logging.INFO if status < 400 else logging.WARNING
        log.log(
            level,
            "%s %s -> %d %s%s",
            peer,
            target,
            status,
            payload.get("error", "ok") if not payload.get("ok") else "ok",
            f": {payload['message']}" if not payload.get("ok") else "",
        )
        with trio.move_on_after(self.limits.write_timeout_s):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(render_response(status, payload))

    async def _dispatch(self, req: Request, key: str) -> tuple[int, dict[str, Any]]:
        if req.path == "/v1/info":
            if req.method != "GET":
                raise HttpError(405, "method_not_allowed", "use GET")
            return 200, self.service.info()
        if req.path == "/v1/nonce":
            if req.method != "POST":
                raise HttpError(405, "method_not_allowed", "use POST")
            return 200, self.service.new_nonce()
        op = _PATH_OPS.get(req.path)
        if op is None:
            raise HttpError(404, "not_found", "no such endpoint")
        if req.method != "POST":
            raise HttpError(405, "method_not_allowed", "use POST")
        obj = P.parse_json_object(req.body)
        await self._workers.acquire(key)
        try:
            result = await trio.to_thread.run_sync(self.service.handle, op, obj)
        finally:
            self._workers.release(key)
        return 200, result


async def _lingering_close(stream: trio.SocketStream, linger_s: float) -> None:
    """Half-close, then discard what the peer still sends (bounded, at most ``linger_s``),
    then close.

    Closing with unread input makes the kernel send RST, which can destroy the error
    response (e.g. 413) before a client that is still uploading has read it.
    """
    with trio.move_on_after(linger_s):
        try:
            await stream.send_eof()
            drained = 0
            while drained < 4 * P.MAX_BODY_BYTES:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    with trio.move_on_after(1):
        await stream.aclose()


def peer_key(stream: trio.SocketStream) -> str:
    """The unit that per-peer limits count: see :func:`peer_key_of`."""
    try:
        return peer_key_of(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "?"


def peer_key_of(host: str) -> str:
    """An IPv4 address as is; an IPv6 address as its /64 network.

    A host is usually given a whole IPv6 /64, so counting single v6 addresses would let one
    host appear as any number of peers. IPv4-mapped v6 addresses count as their IPv4 address.
    """
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return "?"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError):
        return "?"
