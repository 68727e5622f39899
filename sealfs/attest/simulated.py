"""A simulated TEE for development and CI.  NOT SECURE: anyone can forge these quotes.

A simulated quote carries the same fields a TDX quote proves (MRTD, RTMR0-3, report_data,
TD attributes, MRSERVICETD, and the host's device id, which a TDX quote proves through its PCK
certificate) and is signed with Ed25519 by a *development key*. The default development key
is derived from a published constant, so it protects nothing: it exists so the whole key-release
path (report_data binding, RTMR3 replay, policy, key sealing) runs for real without TDX
hardware. The KMS accepts simulated quotes only when started with ``--allow-simulated``, and
logs a warning for every one it accepts.

"Collateral" for a simulated quote is a small signed statement of a TCB status and a validity
window, so that TCB-status policy and collateral expiry are exercised the same way as with
DCAP collateral.

Quote layout (big-endian integers)::

    magic "SEALFS-SIMQUOTE1" (16) | version u16 = 3 | reserved u16 = 0 | td_attributes (8)
    | mrtd (48) | rtmr0 (48) | rtmr1 (48) | rtmr2 (48) | rtmr3 (48) | mr_servicetd (48)
    | device_id (32) | report_data (64)
    | signature (64) = Ed25519(label("simulated-quote", everything before the signature))

Version 3 added ``device_id``; version 2 quotes are refused (quotes are made per request and
never stored, so nothing older is left to read).
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealfs import strict
from sealfs.attest.eventlog import (
    EVENT_APP_ID,
    EVENT_BOOT_DONE,
    EVENT_COMPOSE_HASH,
    EVENT_INSTANCE_ID,
    EVENT_KEY_PROVIDER,
    RTMR_SIZE,
    RuntimeEvent,
    append_runtime_event,
    extend,
    load_runtime_log,
    replay,
)
from sealfs.attest.quote import TD_ATTR_DEBUG, TD_ATTR_SEPT_VE_DISABLE
from sealfs.attest.rtmr import measure
from sealfs.crypto import Secret, SigningKey, label, verify_signature
from sealfs.errors import AttestationError

MAGIC = b"SEALFS-SIMQUOTE1"
VERSION = 3
MR_SIZE = 48
DEVICE_ID_SIZE = 32
REPORT_DATA_SIZE = 64
SIG_SIZE = 64
_BODY = struct.Struct(f">16sHH8s{MR_SIZE * 6}s{DEVICE_ID_SIZE}s{REPORT_DATA_SIZE}s")
QUOTE_SIZE = _BODY.size + SIG_SIZE
COLLATERAL_KIND = "sealfs-simulated-collateral"

#: The compose hash a simulated CVM measures when given none.
DEV_COMPOSE_HASH = hashlib.sha256(b"sealfs-dev").digest()

#: The published development seed. Quotes signed with it prove nothing.
_DEV_SEED = hashlib.sha256(b"sealfs simulated TEE development key v1 (public, not secret)").digest()


def dev_signing_key() -> SigningKey:
    """The well-known development signing key (public knowledge, not a secret)."""
    return SigningKey(Secret(_DEV_SEED))


DEV_PUBLIC_KEY = dev_signing_key().public_bytes


def _mr(tag: str) -> bytes:
    return hashlib.sha384(b"sealfs simulated measurement " + tag.encode()).digest()


#: Default simulated boot measurements (stand-ins for firmware, kernel, initrd, cmdline).
DEFAULT_MRTD = _mr("mrtd")
DEFAULT_RTMR0 = _mr("rtmr0")
DEFAULT_RTMR1 = _mr("rtmr1")
DEFAULT_RTMR2 = _mr("rtmr2")
#: The device id of a simulated host that was given none (stands in for SHA-256 of a PPID).
DEFAULT_DEVICE_ID = hashlib.sha256(b"sealfs simulated host device id").digest()


@dataclass(frozen=True)
class SimulatedReport:
    """What a verified simulated quote proves; same field names as the DCAP report."""

    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    td_attributes: bytes
    mr_servicetd: bytes
    device_id: bytes
    tcb_status: str
    signer: bytes


def _collateral_message(tcb_status: str, not_before: int, not_after: int) -> bytes:
    return label("simulated-collateral", tcb_status, not_before, not_after)


def verify_quote(
    quote: bytes, collateral: Any, now: float, trusted_keys: Sequence[bytes] = (DEV_PUBLIC_KEY,)
) -> SimulatedReport:
    """Verify a simulated quote and its collateral at time ``now`` (Unix seconds).

    Raises AttestationError with a one-line reason on any failure.
    """
    if len(quote) != QUOTE_SIZE:
        raise AttestationError("simulated quote has the wrong length")
    body, sig = quote[: _BODY.size], quote[_BODY.size :]
    magic, version, reserved, td_attr, mrs, device_id, report_data = _BODY.unpack(body)
    if magic != MAGIC or version != VERSION or reserved != 0:
        raise AttestationError("not a simulated quote of a known version")
    msg = label("simulated-quote", body)
    signer = next((k for k in trusted_keys if verify_signature(k, sig, msg)), None)
    if signer is None:
        raise AttestationError("simulated quote signature is invalid or from an untrusted key")
    tcb_status = _verify_collateral(collateral, now, signer)
    m = [mrs[i * MR_SIZE : (i + 1) * MR_SIZE] for i in range(6)]
    return SimulatedReport(
        mrtd=m[0],
        rtmr0=m[1],
        rtmr1=m[2],
        rtmr2=m[3],
        rtmr3=m[4],
        report_data=report_data,
        td_attributes=td_attr,
        mr_servicetd=m[5],
        device_id=device_id,
        tcb_status=tcb_status,
        signer=signer,
    )


def _verify_collateral(collateral: Any, now: float, signer: bytes) -> str:
    if not isinstance(collateral, dict):
        raise AttestationError("simulated quote needs its collateral")
    try:
        if collateral["kind"] != COLLATERAL_KIND:
            raise TypeError
        status, nb, na = collateral["tcb_status"], collateral["not_before"], collateral["not_after"]
        if not isinstance(status, str) or not isinstance(nb, int) or not isinstance(na, int):
            raise TypeError
        if isinstance(nb, bool) or isinstance(na, bool) or not 0 <= nb <= na < 2**62:
            raise TypeError
        sig = strict.hex_bytes(collateral["signature"])
    except (KeyError, TypeError, ValueError):
        raise AttestationError("simulated collateral is malformed") from None
    if not verify_signature(signer, sig, _collateral_message(status, nb, na)):
        raise AttestationError("simulated collateral signature is invalid")
    if not nb <= now <= na:
        raise AttestationError("collateral expired or not yet valid")
    return status


class SimulatedAttester:
    """A software CVM: an app identity, boot measurements and a development signing key.

    Tests create several with different app ids or compose hashes to check that one app cannot
    obtain another's keys. The event log is built like a dstack boot: app-id, compose-hash,
    [instance-id], [key-provider], boot-mr-done, then whatever :meth:`emit_event` adds.
    TD attributes default to SEPT_VE_DISABLE alone, as real TDX guests run (``debug`` adds
    DEBUG); MRSERVICETD defaults to zeros (no service TD bound). ``device_id`` names the
    simulated host (32 bytes, like a TDX host's SHA-256 of its PPID), so tests can play a
    volume moving between hosts.
    """

    kind = "simulated"

    def __init__(
        self,
        app_id: bytes,
        compose_hash: bytes,
        *,
        instance_id: bytes | None = None,
        key_provider: bytes | None = None,
        mrtd: bytes = DEFAULT_MRTD,
        rtmr0: bytes = DEFAULT_RTMR0,
        rtmr1: bytes = DEFAULT_RTMR1,
        rtmr2: bytes = DEFAULT_RTMR2,
        debug: bool = False,
        td_attributes: int = TD_ATTR_SEPT_VE_DISABLE,
        mr_servicetd: bytes = bytes(MR_SIZE),
        device_id: bytes = DEFAULT_DEVICE_ID,
        tcb_status: str = "UpToDate",
        validity: tuple[int, int] | None = None,
        signing_key: SigningKey | None = None,
        boot_events: Iterable[RuntimeEvent] | None = None,
    ) -> None:
        for mr in (mrtd, rtmr0, rtmr1, rtmr2, mr_servicetd):
            if len(mr) != MR_SIZE:
                raise ValueError("measurements are 48 bytes")
        if len(device_id) != DEVICE_ID_SIZE:
            raise ValueError("a device id is 32 bytes")
        self.app_id = app_id
        self.compose_hash = compose_hash
        self.mrtd, self.rtmr0, self.rtmr1, self.rtmr2 = mrtd, rtmr0, rtmr1, rtmr2
        self.td_attributes = struct.pack("<Q", td_attributes | (TD_ATTR_DEBUG if debug else 0))
        self.mr_servicetd = mr_servicetd
        self.device_id = device_id
        self.tcb_status = tcb_status
        self._validity = validity
        self._key = signing_key or dev_signing_key()
        if boot_events is not None:
            self._events = list(boot_events)
        else:
            self._events = [
                RuntimeEvent(EVENT_APP_ID, app_id),
                RuntimeEvent(EVENT_COMPOSE_HASH, compose_hash),
            ]
            if instance_id is not None:
                self._events.append(RuntimeEvent(EVENT_INSTANCE_ID, instance_id))
            if key_provider is not None:
                self._events.append(RuntimeEvent(EVENT_KEY_PROVIDER, key_provider))
            self._events.append(RuntimeEvent(EVENT_BOOT_DONE, b""))

    def __repr__(self) -> str:
        return f"<SimulatedAttester app_id={self.app_id.hex()}>"

    def event_log(self) -> list[RuntimeEvent]:
        """The runtime events measured into RTMR3 so far."""
        return list(self._events)

    def emit_event(self, name: str, payload: bytes) -> None:
        """Measure one more runtime event (as an app may after boot)."""
        self._events.append(RuntimeEvent(name, payload))

    @property
    def rtmr3(self) -> bytes:
        return replay(self._events)

    def quote(self, report_data: bytes) -> bytes:
        """A simulated quote over the current measurements and ``report_data``."""
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError("report_data is 64 bytes")
        mrs = self.mrtd + self.rtmr0 + self.rtmr1 + self.rtmr2 + self.rtmr3 + self.mr_servicetd
        body = _BODY.pack(MAGIC, VERSION, 0, self.td_attributes, mrs, self.device_id, report_data)
        return body + self._key.sign(label("simulated-quote", body))

    def collateral(self) -> dict[str, Any]:
        """Signed TCB status with a validity window (default: from a minute ago, one hour)."""
        now = int(time.time())
        nb, na = self._validity or (now - 60, now + 3600)
        sig = self._key.sign(_collateral_message(self.tcb_status, nb, na))
        return {
            "kind": COLLATERAL_KIND,
            "tcb_status": self.tcb_status,
            "not_before": nb,
            "not_after": na,
            "signature": sig.hex(),
        }

    def measurements(self) -> dict[str, str]:
        """MRTD and RTMR0-2 as hex, the form a KMS policy lists them in."""
        return {
            "mrtd": self.mrtd.hex(),
            "rtmr0": self.rtmr0.hex(),
            "rtmr1": self.rtmr1.hex(),
            "rtmr2": self.rtmr2.hex(),
        }


class PersistentSimulatedAttester(SimulatedAttester):
    """A simulated TEE whose RTMR3 outlives the process, like a real CVM's across its boot.

    The register is a file (``register``, 0600: 48 bytes as hex) and the runtime event log a
    second, independent file (``event_log``), as on TDX where the kernel holds the register
    and a file the log: a measurement writes both (:func:`sealfs.attest.rtmr.measure`), and a
    verifier that replays the log must reproduce the register. The first use (no register yet)
    is a power-on: a new log is started with the boot events and the register set to their
    replay. Quotes carry the register; :meth:`event_log` is the file's content.
    """

    def __init__(
        self,
        app_id: bytes,
        compose_hash: bytes,
        *,
        register: Path,
        event_log: Path,
        **kw: Any,
    ) -> None:
        super().__init__(app_id, compose_hash, **kw)
        self.register = Path(register)
        self.event_log_path = Path(event_log)
        if not self.register.exists():
            self._power_on()

    def _power_on(self) -> None:
        boot = super().event_log()
        for i, event in enumerate(boot):
            append_runtime_event(self.event_log_path, event, truncate=i == 0)
        self._store(replay(boot))

    def event_log(self) -> list[RuntimeEvent]:
        return load_runtime_log(self.event_log_path)

    def emit_event(self, name: str, payload: bytes) -> None:
        measure(self.event_log_path, self, RuntimeEvent(name, payload))

    @property
    def rtmr3(self) -> bytes:
        try:
            fd = os.open(self.register, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                return strict.hex_bytes(f.read(2 * RTMR_SIZE + 1).decode("ascii"), 48, 48)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise AttestationError(f"simulated RTMR3 register {self.register}: {e}") from None

    def extend(self, digest: bytes) -> None:
        """Extend the simulated RTMR3 (the :class:`sealfs.attest.rtmr.Rtmr3` protocol)."""
        self._store(extend(self.rtmr3, digest))

    def _store(self, value: bytes) -> None:
        """Replace the register atomically (temporary file, then rename)."""
        tmp = self.register.with_name(f".{self.register.name}.tmp")
        try:
            self.register.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with_tmp = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(tmp, with_tmp, 0o600)
            except FileExistsError:
                os.unlink(tmp)
                fd = os.open(tmp, with_tmp, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(value.hex().encode("ascii"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.register)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise AttestationError(f"{tmp} is a symbolic link") from None
            raise AttestationError(
                f"cannot write the simulated RTMR3 register {self.register}: {e.strerror}"
            ) from None
