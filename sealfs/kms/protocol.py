"""KMS wire protocol: message shapes, strict parsing, and the byte strings both sides bind.

Shared by client and server so that the values bound into report_data and covered by the
KMS's response signature are computed by one piece of code. The full protocol, with the
reason for every check, is in docs/kms-protocol.md.

Binding: a request for operation ``op`` with parameters ``p`` (see :class:`GetKey`,
:class:`GetEpoch`, :class:`AdvanceEpoch`) under KMS nonce ``n`` and ephemeral X25519 public
key ``pk`` binds::

    binding     = label("kms-request", PROTOCOL_VERSION, n, pk, op, *p.binding_parts())
    report_data = SHA-512(binding)                 # the 64 bytes the quote must carry

and the KMS signs its answer with its identity key (Ed25519)::

    signature   = Sign(label("kms-response", PROTOCOL_VERSION, op, report_data, *result_parts))

so a response is bound to exactly one request, and nobody but the KMS can produce it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

from sealfs import strict
from sealfs.crypto import label

PROTOCOL_VERSION = 1
NONCE_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
MAX_ID_BYTES = 64
MIN_DIGEST_BYTES, MAX_DIGEST_BYTES = 16, 64
MAX_EPOCH = 2**63 - 1
MAX_KEY_VERSION = 2**31 - 1
MAX_QUOTE_BYTES = 64 * 1024
#: Largest request body the server reads (quote + event log + DCAP collateral fit easily).
MAX_BODY_BYTES = 256 * 1024

PURPOSE_VOLUME_WRAP = "volume-wrap"
PURPOSE_LUKS_PASSPHRASE = "luks-passphrase"
PURPOSE_EPOCH_SIGNING = "epoch-signing"
PURPOSES = (PURPOSE_VOLUME_WRAP, PURPOSE_LUKS_PASSPHRASE, PURPOSE_EPOCH_SIGNING)

OP_GET_KEY = "get_key"
OP_GET_EPOCH = "get_epoch"
OP_ADVANCE_EPOCH = "advance_epoch"
#: HTTP path of each operation.
OP_PATHS = {
    OP_GET_KEY: "/v1/key",
    OP_GET_EPOCH: "/v1/epoch/get",
    OP_ADVANCE_EPOCH: "/v1/epoch/advance",
}
TEE_KINDS = ("tdx", "simulated")
KEY_PROVIDER_NAME = "sealfs-kms"


class ProtocolError(Exception):
    """A request the KMS refuses: an HTTP status, a stable code, a one-line safe message.

    The message goes back to the client, so it names the failed check but never includes
    key material, policy contents or internal state.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(400, "bad_request", message)


# --- field parsing ---------------------------------------------------------------------------


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Strict JSON (:func:`sealfs.strict.loads`): UTF-8, one object, no duplicate keys,
    no NaN, bounded nesting."""
    try:
        value = strict.loads(body)
    except ValueError:  # UnicodeDecodeError and too deep nesting included
        raise bad_request("body is not valid JSON") from None
    if not isinstance(value, dict):
        raise bad_request("body must be a JSON object")
    return value


def check_fields(
    obj: dict[str, Any],
    required: Set[str],
    optional: Set[str] = frozenset(),
    where: str = "request",
) -> None:
    missing = required - obj.keys()
    if missing:
        raise bad_request(f"{where}: missing field {sorted(missing)[0]!r}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise bad_request(f"{where}: unknown field {sorted(unknown)[0]!r}")


def hex_field(obj: dict[str, Any], name: str, min_len: int, max_len: int) -> bytes:
    try:
        return strict.hex_bytes(obj.get(name), min_len, max_len)
    except ValueError as e:
        raise bad_request(f"{name} {e}") from None


def int_field(obj: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"{name} must be an integer in [{lo}, {hi}]")
    return value


def b64_field(obj: dict[str, Any], name: str, max_len: int) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str) or len(value) > (max_len * 4) // 3 + 4:
        raise bad_request(f"{name} must be base64 of at most {max_len} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{name} is not valid base64") from None
    if not raw:
        raise bad_request(f"{name} is empty")
    return raw


# --- operation parameters --------------------------------------------------------------------


@dataclass(frozen=True)
class GetKey:
    """Release the app key for ``purpose`` and ``volume_id`` (``key_version`` None = current)."""

    purpose: str
    volume_id: bytes
    key_version: int | None = None
    op = OP_GET_KEY

    def to_wire(self) -> dict[str, Any]:
        return {
            "purpose": self.purpose,
            "volume_id": self.volume_id.hex(),
            "key_version": self.key_version,
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> GetKey:
        check_fields(obj, {"purpose", "volume_id", "key_version"}, where="params")
        purpose = obj["purpose"]
        if purpose not in PURPOSES:
            raise bad_request(f"purpose must be one of {', '.join(PURPOSES)}")
        version = (
            None
            if obj["key_version"] is None
            else int_field(obj, "key_version", 1, MAX_KEY_VERSION)
        )
        return cls(purpose, hex_field(obj, "volume_id", 1, MAX_ID_BYTES), version)

    def binding_parts(self) -> tuple[bytes | str | int, ...]:
        # "absent" is the empty string, which no 8-byte integer encoding can equal.
        return (self.purpose, self.volume_id, b"" if self.key_version is None else self.key_version)


@dataclass(frozen=True)
class GetEpoch:
    """Read the freshness anchor of one of the caller's volumes."""

    volume_id: bytes
    op = OP_GET_EPOCH

    def to_wire(self) -> dict[str, Any]:
        return {"volume_id": self.volume_id.hex()}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> GetEpoch:
        check_fields(obj, {"volume_id"}, where="params")
        return cls(hex_field(obj, "volume_id", 1, MAX_ID_BYTES))

    def binding_parts(self) -> tuple[bytes | str | int, ...]:
        return (self.volume_id,)


@dataclass(frozen=True)
class AdvanceEpoch:
    """Move one of the caller's volumes to ``epoch`` with metadata root ``root_digest``."""

    volume_id: bytes
    epoch: int
    root_digest: bytes
    op = OP_ADVANCE_EPOCH

    def to_wire(self) -> dict[str, Any]:
        return {
            "volume_id": self.volume_id.hex(),
            "epoch": self.epoch,
            "root_digest": self.root_digest.hex(),
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> AdvanceEpoch:
        check_fields(obj, {"volume_id", "epoch", "root_digest"}, where="params")
        return cls(
            hex_field(obj, "volume_id", 1, MAX_ID_BYTES),
            int_field(obj, "epoch", 0, MAX_EPOCH),
            hex_field(obj, "root_digest", MIN_DIGEST_BYTES, MAX_DIGEST_BYTES),
        )

    def binding_parts(self) -> tuple[bytes | str | int, ...]:
        return (self.volume_id, self.epoch, self.root_digest)


Params = GetKey | GetEpoch | AdvanceEpoch
PARAM_TYPES: dict[str, type[GetKey] | type[GetEpoch] | type[AdvanceEpoch]] = {
    OP_GET_KEY: GetKey,
    OP_GET_EPOCH: GetEpoch,
    OP_ADVANCE_EPOCH: AdvanceEpoch,
}


def request_binding(nonce: bytes, public_key: bytes, params: Params) -> bytes:
    return label(
        "kms-request", PROTOCOL_VERSION, nonce, public_key, params.op, *params.binding_parts()
    )


def report_data_for(nonce: bytes, public_key: bytes, params: Params) -> bytes:
    """The 64 bytes the CVM's quote must carry for this exact request."""
    return hashlib.sha512(request_binding(nonce, public_key, params)).digest()


def response_message(op: str, report_data: bytes, parts: tuple[bytes | str | int, ...]) -> bytes:
    """What the KMS signs: the request it answers (via report_data) and the result."""
    return label("kms-response", PROTOCOL_VERSION, op, report_data, *parts)


def served_message(version: int) -> bytes:
    """What a replica signs in ``/v1/info``: the highest state version it has served, so its
    peers (which share its identity key) can raise their own floor to it."""
    return label("kms-served-version", PROTOCOL_VERSION, version)


def key_release_info(
    app_id: bytes, purpose: str, volume_id: bytes, key_version: int, nonce: bytes
) -> bytes:
    """HPKE info/AD for a released key: the key only opens in the context it was asked for."""
    return label(
        "kms-key-release", PROTOCOL_VERSION, app_id, purpose, volume_id, key_version, nonce
    )


def get_key_result_parts(
    app_id: bytes, key_version: int, enc: bytes, ciphertext: bytes
) -> tuple[bytes | str | int, ...]:
    return (app_id, key_version, enc, ciphertext)


def epoch_result_parts(
    app_id: bytes, volume_id: bytes, epoch: int, root_digest: bytes, known: bool
) -> tuple[bytes | str | int, ...]:
    return (app_id, volume_id, epoch, root_digest, int(known))


def key_provider_payload(kms_public_key: bytes) -> bytes:
    """The ``key-provider`` event payload that measures which KMS a CVM trusts."""
    return json.dumps(
        {"name": KEY_PROVIDER_NAME, "id": kms_public_key.hex()},
        separators=(",", ":"),
        sort_keys=True,
    ).encode()


def parse_key_provider(payload: bytes) -> bytes | None:
    """The KMS public key named by a ``key-provider`` event, or None if it names another."""
    try:
        obj = strict.loads(payload)
        if obj.get("name") != KEY_PROVIDER_NAME:
            return None
        return strict.hex_bytes(obj["id"], 32, 32)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
