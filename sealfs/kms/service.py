"""The KMS decision logic, independent of HTTP: verify, check policy, then act.

For every operation (get_key, get_epoch, advance_epoch) the request is an attested envelope,
and the steps run in this order (docs/kms-protocol.md says what each one stops):

1. parse strictly (known fields only, sizes bounded, hex/base64 exact);
2. consume the nonce: it must have been issued by this KMS, be unexpired and unused; it is
   spent even if a later check fails, so a request can never be tried twice;
3. verify the quote (DCAP for ``tdx``; the dev-key signature for ``simulated``, only when the
   operator allowed simulated TEEs) including collateral validity and TCB status;
4. require report_data = SHA-512(binding of nonce, ephemeral public key, op and parameters);
5. replay the event log and require it to reproduce the quote's RTMR3;
6. read app id and compose hash from that replayed log (exactly once, before boot-mr-done);
7. look up the app's policy by that attested app id and check MRTD/RTMR0-2, compose hash,
   TCB status and debug;
8. perform the operation for that app id only, seal keys to the ephemeral public key, and sign
   the result with the KMS identity key, bound to this request's report_data.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sealfs.attest.eventlog import AppIdentity, events_from_wire, identity_from_log, replay
from sealfs.attest.simulated import DEV_PUBLIC_KEY
from sealfs.crypto import AuthError, Secret, ct_equal, random_bytes, seal_to_public
from sealfs.errors import AttestationError, IntegrityError, KmsError, UsageError
from sealfs.kms import protocol as P
from sealfs.kms.derivation import StoreMac, app_key, identity_key
from sealfs.kms.policy import AppPolicy, PolicyDenied
from sealfs.kms.store import EpochConflict, KmsStore, StateRolledBack
from sealfs.kms.verify import QuoteReport, verify_simulated, verify_tdx

log = logging.getLogger("sealfs.kms")
T = TypeVar("T")


@dataclass(frozen=True)
class ServiceConfig:
    allow_simulated: bool = False
    simulated_keys: Sequence[bytes] = (DEV_PUBLIC_KEY,)
    nonce_ttl_s: float = 60.0
    max_outstanding_nonces: int = 4096
    #: DCAP collateral used when a ``tdx`` request carries none (e.g. from a local PCCS).
    default_collateral: Any = None
    clock: Callable[[], float] = field(default=time.time)


class NonceBook:
    """Nonces this KMS issued: single use, short-lived, bounded in number.

    When full, the oldest outstanding nonce is dropped: a flood can make honest clients fetch
    a new nonce (they retry), but can never make a nonce usable twice.
    """

    def __init__(self, ttl_s: float, capacity: int, clock: Callable[[], float]) -> None:
        self._ttl, self._capacity, self._clock = ttl_s, capacity, clock
        self._live: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def issue(self) -> bytes:
        nonce = random_bytes(P.NONCE_SIZE)
        now = self._clock()
        with self._lock:
            self._expire(now)
            while len(self._live) >= self._capacity:
                self._live.popitem(last=False)
            self._live[nonce] = now + self._ttl
        return nonce

    def consume(self, nonce: bytes) -> bool:
        """True exactly once for an issued, unexpired nonce."""
        now = self._clock()
        with self._lock:
            expiry = self._live.pop(nonce, None)
            self._expire(now)
        return expiry is not None and now <= expiry

    def _expire(self, now: float) -> None:
        while self._live:
            nonce, expiry = next(iter(self._live.items()))
            if expiry >= now:
                break
            del self._live[nonce]


@dataclass(frozen=True)
class _Attested:
    report: QuoteReport
    identity: AppIdentity
    policy: AppPolicy
    nonce: bytes
    public_key: bytes
    report_data: bytes


_ENVELOPE_REQUIRED = {"version", "tee", "nonce", "public_key", "quote", "event_log", "params"}
_ENVELOPE_OPTIONAL = {"app_id", "collateral"}


class KmsService:
    """Holds the unlocked root key (as a Secret) and answers protocol operations."""

    def __init__(self, store: KmsStore, root: Secret, config: ServiceConfig | None = None) -> None:
        self.store = store
        self.config = config or ServiceConfig()
        self._root = root
        self._macs = StoreMac(root)
        found = store.verify(self._macs)  # refuse replayed or removed rows before serving
        log.info(
            "KMS state %s verified: table version %d, %d policies, %d volume epochs",
            store.location,
            found.version,
            found.policies,
            found.epochs,
        )
        self.state_version = found.version
        self._identity = identity_key(root)
        self.nonces = NonceBook(
            self.config.nonce_ttl_s, self.config.max_outstanding_nonces, self.config.clock
        )

    def __repr__(self) -> str:
        return f"<KmsService {self.store.location}>"

    @property
    def public_key(self) -> bytes:
        """The KMS identity public key (Ed25519) that clients pin."""
        return self._identity.public_bytes

    def info(self) -> dict[str, Any]:
        return {
            "ok": True,
            "protocol": P.PROTOCOL_VERSION,
            "kms_public_key": self.public_key.hex(),
            "simulated_allowed": self.config.allow_simulated,
            "served_version": self.store.seen_version,
            "served_signature": self._identity.sign(
                P.served_message(self.store.seen_version)
            ).hex(),
            "purposes": list(P.PURPOSES),
        }

    def new_nonce(self) -> dict[str, Any]:
        return {
            "ok": True,
            "nonce": self.nonces.issue().hex(),
            "expires_in": int(self.config.nonce_ttl_s),
        }

    # --- the attested operations -------------------------------------------------------------

    def handle(self, op: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Run one operation; raises ProtocolError for every refusal."""
        params, envelope = self._parse(op, obj)
        att = self._attest(params, *envelope)
        if isinstance(params, P.GetKey):
            parts, result = self._get_key(att, params)
        elif isinstance(params, P.GetEpoch):
            parts, result = self._get_epoch(att, params)
        else:
            parts, result = self._advance_epoch(att, params)
        signature = self._identity.sign(P.response_message(op, att.report_data, parts))
        return {
            "ok": True,
            "op": op,
            "result": result,
            "kms_public_key": self.public_key.hex(),
            "signature": signature.hex(),
        }

    def _parse(self, op: str, obj: dict[str, Any]) -> tuple[P.Params, tuple[Any, ...]]:
        P.check_fields(obj, _ENVELOPE_REQUIRED, _ENVELOPE_OPTIONAL)
        if obj["version"] != P.PROTOCOL_VERSION or isinstance(obj["version"], bool):
            raise P.ProtocolError(
                400, "unsupported_version", f"protocol version must be {P.PROTOCOL_VERSION}"
            )
        tee = obj["tee"]
        if tee not in P.TEE_KINDS:
            raise P.bad_request(f"tee must be one of {', '.join(P.TEE_KINDS)}")
        nonce = P.hex_field(obj, "nonce", P.NONCE_SIZE, P.NONCE_SIZE)
        public_key = P.hex_field(obj, "public_key", P.PUBLIC_KEY_SIZE, P.PUBLIC_KEY_SIZE)
        quote = P.b64_field(obj, "quote", P.MAX_QUOTE_BYTES)
        claimed = (
            P.hex_field(obj, "app_id", 1, P.MAX_ID_BYTES) if obj.get("app_id") is not None else None
        )
        collateral = obj.get("collateral")
        if collateral is not None and not isinstance(collateral, dict):
            raise P.bad_request("collateral must be a JSON object")
        if not isinstance(obj["params"], dict):
            raise P.bad_request("params must be a JSON object")
        params = P.PARAM_TYPES[op].from_wire(obj["params"])
        try:
            events = events_from_wire(obj["event_log"])
        except AttestationError as e:
            raise P.bad_request(e.message) from None
        return params, (tee, nonce, public_key, quote, claimed, collateral, events)

    def _attest(
        self,
        params: P.Params,
        tee: str,
        nonce: bytes,
        public_key: bytes,
        quote: bytes,
        claimed: bytes | None,
        collateral: Any,
        events: list[Any],
    ) -> _Attested:
        if not self.nonces.consume(nonce):
            raise P.ProtocolError(
                401, "bad_nonce", "nonce unknown, expired or already used; fetch a new one"
            )
        now = self.config.clock()
        try:
            if tee == "simulated":
                if not self.config.allow_simulated:
                    raise P.ProtocolError(
                        403, "simulated_disabled", "simulated attestation is disabled on this KMS"
                    )
                report = verify_simulated(quote, collateral, now, self.config.simulated_keys)
            else:
                report = verify_tdx(quote, collateral or self.config.default_collateral, now)
        except AttestationError as e:
            raise P.ProtocolError(
                401, "attestation_failed", f"quote rejected: {e.message}"
            ) from None
        report_data = P.report_data_for(nonce, public_key, params)
        if not ct_equal(report.report_data, report_data):
            raise P.ProtocolError(
                401,
                "attestation_failed",
                "report_data does not bind this "
                "request (nonce, public key, operation and parameters)",
            )
        if not ct_equal(replay(events), report.rtmr3):
            raise P.ProtocolError(
                401, "attestation_failed", "event log does not reproduce the quote's RTMR3"
            )
        try:
            identity = identity_from_log(events)
        except AttestationError as e:
            raise P.ProtocolError(401, "attestation_failed", e.message) from None
        if claimed is not None and not ct_equal(claimed, identity.app_id):
            raise P.ProtocolError(
                403, "app_id_mismatch", "the attested app id is not the one requested"
            )
        policy = self._store_call(self.store.get_policy, self._macs, identity.app_id)
        if policy is None:
            raise P.ProtocolError(403, "unknown_app", "no policy for the attested app id")
        try:
            policy.check(report, identity)
        except PolicyDenied as e:
            log.warning(
                "policy denied app=%s: %s (mrtd=%s compose=%s tcb=%s device=%s)",
                identity.app_id.hex(),
                e,
                report.mrtd.hex()[:16],
                identity.compose_hash.hex()[:16],
                report.tcb_status,
                report.device_id.hex(),
            )
            raise P.ProtocolError(403, "policy_denied", f"policy denied: {e}") from None
        if report.tee == "simulated":
            log.warning(
                "accepted a SIMULATED quote for app %s: this KMS offers NO hardware "
                "protection (started with --allow-simulated)",
                identity.app_id.hex(),
            )
        return _Attested(report, identity, policy, nonce, public_key, report_data)

    def _get_key(self, att: _Attested, p: P.GetKey) -> tuple[tuple[Any, ...], dict[str, Any]]:
        version = p.key_version if p.key_version is not None else att.policy.key_version
        if version > att.policy.key_version:
            raise P.ProtocolError(
                403, "bad_key_version", f"key version {version} does not exist for this app"
            )
        app_id = att.identity.app_id
        if version in att.policy.retired_versions:
            log.warning("refused retired key v%d of app %s", version, app_id.hex())
            raise P.ProtocolError(
                403,
                "key_version_retired",
                f"key version {version} of this app is retired and no longer released; "
                "open the volume with its recovery slot",
            )
        key = app_key(self._root, p.purpose, app_id, version, p.volume_id)
        info = P.key_release_info(app_id, p.purpose, p.volume_id, version, att.nonce)
        try:
            enc, ciphertext = seal_to_public(att.public_key, key, info)
        except (UsageError, AuthError, ValueError):
            raise P.bad_request("public_key is not a usable X25519 public key") from None
        log.info(
            "released %s key v%d for app %s volume %s (%s)",
            p.purpose,
            version,
            app_id.hex(),
            p.volume_id.hex(),
            att.report.tee,
        )
        return (
            P.get_key_result_parts(app_id, version, enc, ciphertext),
            {
                "app_id": app_id.hex(),
                "key_version": version,
                "enc": enc.hex(),
                "ciphertext": ciphertext.hex(),
            },
        )

    def _epoch_result(
        self, app_id: bytes, volume_id: bytes, epoch: int, digest: bytes, known: bool
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (
            P.epoch_result_parts(app_id, volume_id, epoch, digest, known),
            {
                "app_id": app_id.hex(),
                "volume_id": volume_id.hex(),
                "epoch": epoch,
                "root_digest": digest.hex(),
                "known": known,
            },
        )

    def _get_epoch(self, att: _Attested, p: P.GetEpoch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        app_id = att.identity.app_id
        rec = self._store_call(self.store.get_epoch, self._macs, app_id, p.volume_id)
        if rec is None:
            return self._epoch_result(app_id, p.volume_id, 0, b"", False)
        return self._epoch_result(app_id, p.volume_id, rec.epoch, rec.root_digest, True)

    def _advance_epoch(
        self, att: _Attested, p: P.AdvanceEpoch
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        app_id = att.identity.app_id
        try:
            rec = self._store_call(
                self.store.advance_epoch, self._macs, app_id, p.volume_id, p.epoch, p.root_digest
            )
        except EpochConflict as e:
            log.warning(
                "epoch %s refused for app %s volume %s: %s",
                e.reason,
                app_id.hex(),
                p.volume_id.hex(),
                e.message,
            )
            raise P.ProtocolError(409, e.reason, e.message) from None
        log.info("epoch of app %s volume %s is now %d", app_id.hex(), p.volume_id.hex(), rec.epoch)
        return self._epoch_result(app_id, p.volume_id, rec.epoch, rec.root_digest, True)

    @staticmethod
    def _store_call(fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except EpochConflict:
            raise
        except StateRolledBack as e:
            log.error("refusing to answer: %s", e.message)
            raise P.ProtocolError(
                503,
                "state_rolled_back",
                "this KMS replica's state is older than one it already served; ask another replica",
            ) from None
        except IntegrityError as e:
            log.error("state store integrity failure: %s", e.message)
            raise P.ProtocolError(500, "internal", "KMS internal error") from None
        except KmsError as e:
            log.error("state store unavailable: %s", e.message)
            raise P.ProtocolError(503, "unavailable", "KMS state store busy; retry") from None
