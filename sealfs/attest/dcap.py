"""Offline DCAP verification of TDX quotes (v4, v5) against Intel collateral read from disk.

The KMS releases keys on the strength of this module, so it fails closed:
:func:`verify_quote` returns a :class:`VerificationReport` only when every check passed and a
TCB status was established; otherwise it raises :class:`VerificationFailed`, which carries the
same report (every check, passed or not) for display. There is no "partly verified" result.

The trust anchor is the Intel SGX Root CA, built in below. Everything else (the quote, the PCK
chain inside it, CRLs, TCB info, QE identity and their issuer chains) is untrusted input and is
checked against that anchor at a caller-supplied time ``now``; nothing here reads the clock or
the network. The checks follow Intel's Quote Verification Library (SGX/TDX DCAP QVL) and are
listed, with what each one stops, in docs/attestation.md.

Signed collateral (``tcb_info``, ``qe_identity``) is verified over its exact bytes *before* it is
parsed, and is never re-serialised. Signatures in quotes and collateral are raw ``r || s``.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from sealfs import strict
from sealfs.errors import AttestationError

from .quote import INTEL_QE_VENDOR_ID, EnclaveReport, Quote, TdReport, parse_quote

# The Intel SGX Root CA (SHA-256 of the DER: 44a0196b2b99f889b8e149e95b807a350e7424964399e885
# a7cbb8ccfab674d3), published at certificates.trustedservices.intel.com. It anchors the PCK
# chain, the TCB signing chain and both CRLs; nothing supplied with a quote can replace it.
INTEL_SGX_ROOT_CA_PEM = b"""-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""

_ANCHOR = x509.load_pem_x509_certificate(INTEL_SGX_ROOT_CA_PEM)

#: Upper bound on a collateral file; real ones are 15-20 KiB (the PCK CRL grows slowly).
MAX_COLLATERAL_LEN = 16 << 20

SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")

# TCB statuses as spelled in Intel's TCB info; TDX module and QE levels use the three of
# IDENTITY_STATUSES. Intel's QVL derives two more for TD 1.5 quotes, RELAUNCH_ADVISED*
# ("relaunch the TD to pick up a TD-preserving module update").
TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    }
)
IDENTITY_STATUSES = frozenset({"UpToDate", "OutOfDate", "Revoked"})
RELAUNCH_ADVISED = "TDRelaunchAdvised"
RELAUNCH_ADVISED_CONFIG = "TDRelaunchAdvisedConfigurationNeeded"
_CONFIG_NEEDED = frozenset(
    {
        "ConfigurationNeeded",
        "OutOfDateConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        RELAUNCH_ADVISED_CONFIG,
    }
)

_SGX_NOT_OUT_OF_DATE = frozenset(
    {"UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"}
)

_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z", re.ASCII)


class CollateralFormatError(AttestationError):
    """Collateral (file, TCB info, QE identity) is malformed or of an unsupported kind."""


class VerificationFailed(AttestationError):
    """At least one check failed; ``report`` lists every check with its outcome."""

    def __init__(self, report: VerificationReport) -> None:
        first = next((c for c in report.checks if not c.passed), None)
        reason = f"{first.name}: {first.detail}" if first else "no TCB status established"
        super().__init__(f"quote verification failed: {reason}")
        self.report = report


# --------------------------------------------------------------------------------------------
# Collateral (the JSON file format of Phala-Network/dcap-qvl's QuoteCollateralV3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Collateral:
    """Verification collateral for one platform, as fetched from Intel PCS or a PCCS.

    ``tcb_info`` and ``qe_identity`` are kept as the exact text that was signed.
    """

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes


_TEXT_FIELDS = (
    "pck_crl_issuer_chain",
    "tcb_info_issuer_chain",
    "tcb_info",
    "qe_identity_issuer_chain",
    "qe_identity",
)
_HEX_FIELDS = ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature")


def parse_collateral(data: bytes | str) -> Collateral:
    """Parse the collateral JSON object: text fields as-is, binary fields (CRLs, signatures) hex.

    Unknown fields are refused rather than ignored, so that nobody believes a field (for
    example a separate ``pck_certificate_chain``) was taken into account when it was not.
    """
    obj = _json_object(data, "collateral")
    expected = set(_TEXT_FIELDS) | set(_HEX_FIELDS)
    if missing := sorted(expected - obj.keys()):
        raise CollateralFormatError(f"collateral lacks field(s): {', '.join(missing)}")
    if unknown := sorted(obj.keys() - expected):
        raise CollateralFormatError(f"collateral has unsupported field(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        if not isinstance(obj[name], str):
            raise CollateralFormatError(f"collateral field {name} must be a string")
        values[name] = obj[name]
    for name in _HEX_FIELDS:
        values[name] = _hex(obj[name], f"collateral field {name}")
    for name in ("tcb_info_signature", "qe_identity_signature"):
        if len(values[name]) != 64:
            raise CollateralFormatError(f"collateral field {name} must be 64 bytes (raw r||s)")
    return Collateral(**values)


def load_collateral(path: Path) -> Collateral:
    """Read and parse a collateral file; ``OSError`` propagates for the caller to report."""
    with path.open("rb") as f:
        data = f.read(MAX_COLLATERAL_LEN + 1)
    if len(data) > MAX_COLLATERAL_LEN:
        raise CollateralFormatError(f"collateral file is larger than {MAX_COLLATERAL_LEN} bytes")
    return parse_collateral(data)


def _json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """Strict JSON: no duplicate keys (which reader wins is ambiguous), no NaN/Infinity."""
    try:
        obj = strict.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError included
        raise CollateralFormatError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CollateralFormatError(f"{what} must be a JSON object")
    return obj


def _hex(value: Any, what: str, size: int | None = None) -> bytes:
    try:
        return strict.hex_bytes(value, size or 0, size)
    except ValueError as e:
        raise CollateralFormatError(f"{what} {e}") from None


# --------------------------------------------------------------------------------------------
# Signed collateral content: TCB info (TDX, version 3) and QE identity (TD_QE, version 2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcbLevel:
    """One platform TCB level: minimum SGX and TDX component SVNs and PCESVN, and its status."""

    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...]
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class IdentityLevel:
    """A minimum ISVSVN (TDX module or QE) and the status of software at or above it."""

    isv_svn: int
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TdxModuleIdentity:
    """Expected signer and attributes of a TDX module; ``levels`` is empty for the base entry.

    Levels are best first (highest ISVSVN first): :func:`parse_tcb_info` refuses any other
    order. The ``attributesMask`` of the document is not kept: Intel's QVL compares
    SEAMATTRIBUTES with ``attributes`` unmasked, and both must be zero.
    """

    id: str
    mrsigner: bytes
    attributes: bytes
    levels: tuple[IdentityLevel, ...]


@dataclass(frozen=True)
class TcbInfo:
    """Parsed TDX TCB info. Levels are best first, the order Intel's QVL evaluates them in
    (:func:`parse_tcb_info` refuses a document that lists them in any other order)."""

    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_evaluation_data_number: int
    tdx_module: TdxModuleIdentity
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    levels: tuple[TcbLevel, ...]


@dataclass(frozen=True)
class QeIdentity:
    """Parsed TD_QE identity: what a genuine TD quoting enclave's report must contain.

    ``levels`` are in document order, the order Intel's QVL walks them in (not sorted).
    """

    issue_date: datetime
    next_update: datetime
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    levels: tuple[IdentityLevel, ...]


def parse_tcb_info(text: str) -> TcbInfo:
    """Parse TDX TCB info (id "TDX", version 3); call only on text whose signature verified."""
    doc = _Doc(_json_object(text, "TCB info"), "TCB info")
    doc.require_equal("id", "TDX")
    doc.require_equal("version", 3)
    doc.require_equal("tcbType", 0)  # the only type defined: compare SVNs component by component
    levels = [_parse_tcb_level(_Doc(v, "TCB info tcbLevels[]")) for v in doc.items("tcbLevels")]
    if not levels:
        raise CollateralFormatError("TCB info has no tcbLevels")
    _require_best_first(
        [(lv.sgx_components, lv.pce_svn, lv.tdx_components) for lv in levels], "TCB info"
    )
    identities = []
    for item in doc.items("tdxModuleIdentities", optional=True):
        entry = _Doc(item, "TCB info tdxModuleIdentities[]")
        module_levels = _identity_levels(entry)
        _require_best_first([lv.isv_svn for lv in module_levels], f"TDX module {entry.text('id')}")
        identities.append(_parse_module(entry, entry.text("id"), module_levels))
    return TcbInfo(
        issue_date=doc.time("issueDate"),
        next_update=doc.time("nextUpdate"),
        fmspc=doc.hexbytes("fmspc", 6),
        pce_id=doc.hexbytes("pceId", 2),
        tcb_evaluation_data_number=doc.integer("tcbEvaluationDataNumber", 0, 2**32 - 1),
        tdx_module=_parse_module(doc.child("tdxModule"), "", ()),
        tdx_module_identities=tuple(identities),
        levels=tuple(levels),
    )


def parse_qe_identity(text: str) -> QeIdentity:
    """Parse a TD_QE identity (version 2); call only on text whose signature verified."""
    doc = _Doc(_json_object(text, "QE identity"), "QE identity")
    doc.require_equal("id", "TD_QE")
    doc.require_equal("version", 2)
    return QeIdentity(
        issue_date=doc.time("issueDate"),
        next_update=doc.time("nextUpdate"),
        miscselect=int.from_bytes(doc.hexbytes("miscselect", 4), "little"),
        miscselect_mask=int.from_bytes(doc.hexbytes("miscselectMask", 4), "little"),
        attributes=doc.hexbytes("attributes", 16),
        attributes_mask=doc.hexbytes("attributesMask", 16),
        mrsigner=doc.hexbytes("mrsigner", 32),
        isv_prod_id=doc.integer("isvprodid", 0, 0xFFFF),
        levels=_identity_levels(doc),
    )


class _Doc:
    """Typed, path-aware access to one JSON object of signed collateral."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise CollateralFormatError(f"{where} must be a JSON object")
        self.obj = obj
        self.where = where

    def _get(self, key: str) -> Any:
        if key not in self.obj:
            raise CollateralFormatError(f"{self.where} lacks {key}")
        return self.obj[key]

    def require_equal(self, key: str, expected: Any) -> None:
        value = self._get(key)
        if type(value) is not type(expected) or value != expected:
            raise CollateralFormatError(
                f"{self.where} {key} is {value!r}, this verifier handles only {expected!r}"
            )

    def integer(self, key: str, lo: int, hi: int) -> int:
        value = self._get(key)
        if type(value) is not int or not lo <= value <= hi:
            raise CollateralFormatError(f"{self.where} {key} must be an integer in {lo}..{hi}")
        return value

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise CollateralFormatError(f"{self.where} {key} must be a string")
        return value

    def hexbytes(self, key: str, size: int) -> bytes:
        return _hex(self._get(key), f"{self.where} {key}", size)

    def time(self, key: str) -> datetime:
        """A UTC timestamp that exists: the pattern alone admits 2025-02-30 and hour 24."""
        value = self.text(key)
        try:
            if _TIMESTAMP.fullmatch(value):
                return datetime.fromisoformat(value)
        except ValueError:
            pass
        raise CollateralFormatError(f"{self.where} {key} is not a UTC timestamp: {value!r}")

    def items(self, key: str, optional: bool = False) -> list[Any]:
        value = self.obj.get(key, []) if optional else self._get(key)
        if not isinstance(value, list):
            raise CollateralFormatError(f"{self.where} {key} must be a list")
        return value

    def child(self, key: str) -> _Doc:
        return _Doc(self._get(key), f"{self.where} {key}")

    def status(self, allowed: frozenset[str]) -> str:
        value = self.text("tcbStatus")
        if value not in allowed:
            raise CollateralFormatError(f"{self.where} has unrecognised tcbStatus {value!r}")
        return value

    def advisories(self) -> tuple[str, ...]:
        ids = self.obj.get("advisoryIDs", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise CollateralFormatError(f"{self.where} advisoryIDs must be a list of strings")
        return tuple(ids)


def _components(doc: _Doc, key: str) -> tuple[int, ...]:
    items = doc.items(key)
    if len(items) != 16:
        raise CollateralFormatError(f"{doc.where} {key} must have 16 entries, has {len(items)}")
    return tuple(_Doc(item, f"{doc.where} {key}[]").integer("svn", 0, 255) for item in items)


def _require_best_first(keys: list[Any], where: str) -> None:
    """Refuse TCB levels that are repeated or not listed best first.

    Intel's QVL keeps platform and TDX module levels in a set ordered best first by these keys
    (SGX components, PCESVN, TDX components; or ISVSVN), refusing a repeated key ("Detected
    duplicated TCB levels"), so the order of the document does not matter to it; Intel
    publishes them best first. Requiring that order makes the document's order and Intel's the
    same, so this verifier, Intel's and one that walks the list as written cannot disagree.
    """
    if len(set(keys)) != len(keys):
        raise CollateralFormatError(f"{where} has duplicated TCB levels")
    for index, (before, after) in enumerate(pairwise(keys)):
        if not before > after:
            raise CollateralFormatError(
                f"{where} tcbLevels are not ordered best first (level {index + 1} is higher "
                f"than level {index})"
            )


def _parse_tcb_level(doc: _Doc) -> TcbLevel:
    doc.time("tcbDate")  # required (Intel's QVL refuses a level without it); not evaluated
    tcb = doc.child("tcb")
    return TcbLevel(
        sgx_components=_components(tcb, "sgxtcbcomponents"),
        pce_svn=tcb.integer("pcesvn", 0, 0xFFFF),
        tdx_components=_components(tcb, "tdxtcbcomponents"),
        status=doc.status(TCB_STATUSES),
        advisory_ids=doc.advisories(),
    )


def _identity_levels(doc: _Doc) -> tuple[IdentityLevel, ...]:
    """ISVSVN levels of a QE or TDX module identity, in document order (never sorted)."""
    levels = []
    for item in doc.items("tcbLevels"):
        level = _Doc(item, f"{doc.where} tcbLevels[]")
        level.time("tcbDate")  # required, as for platform levels
        levels.append(
            IdentityLevel(
                isv_svn=level.child("tcb").integer("isvsvn", 0, 0xFFFF),
                status=level.status(IDENTITY_STATUSES),
                advisory_ids=level.advisories(),
            )
        )
    if not levels:
        raise CollateralFormatError(f"{doc.where} has no tcbLevels")
    return tuple(levels)


def _parse_module(doc: _Doc, ident: str, levels: tuple[IdentityLevel, ...]) -> TdxModuleIdentity:
    doc.hexbytes("attributesMask", 8)  # required and well-formed, but not applied (see class)
    return TdxModuleIdentity(
        id=ident,
        mrsigner=doc.hexbytes("mrsigner", 48),
        attributes=doc.hexbytes("attributes", 8),
        levels=levels,
    )


# --------------------------------------------------------------------------------------------
# The PCK certificate's SGX extension (OID 1.2.840.113741.1.13.1), a small DER walk
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PckInfo:
    """Platform identity and TCB from the PCK certificate, the values matched against TCB info.

    ``ppid`` (Platform Provisioning ID, 16 bytes) names the physical CPU package the quote came
    from; :attr:`device_id` is what a KMS policy pins hosts by.
    """

    fmspc: bytes
    pce_id: bytes
    pce_svn: int
    cpu_svn: bytes
    sgx_components: tuple[int, ...]
    ppid: bytes

    @property
    def device_id(self) -> bytes:
        """SHA-256 of the PPID: the host's device id, derived as dstack derives it, so the
        ids a dstack deployment lists are the ids a sealfs policy takes."""
        return device_id_of_ppid(self.ppid)


def device_id_of_ppid(ppid: bytes) -> bytes:
    """The device id of a TDX host: SHA-256 of its PCK certificate's PPID."""
    return sha256(ppid).digest()


_DER_INTEGER, _DER_OCTETS, _DER_OID, _DER_SEQUENCE = 0x02, 0x04, 0x06, 0x30
_SGX = "1.2.840.113741.1.13.1"


def _der_items(data: bytes, what: str) -> list[tuple[int, bytes]]:
    """Split ``data`` into (tag, content) pairs that cover it exactly (definite lengths only)."""
    items, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise AttestationError(f"{what}: truncated DER")
        tag, first = data[pos], data[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if not 1 <= n <= 3 or pos + n > len(data):
                raise AttestationError(f"{what}: unsupported DER length")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > len(data):
            raise AttestationError(f"{what}: truncated DER")
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def _der_oid(content: bytes) -> str:
    arcs, value = [], 0
    for b in content:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    if not arcs or content[-1] & 0x80:
        raise AttestationError("PCK SGX extension: malformed OID")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def _der_fields(data: bytes, what: str) -> dict[str, tuple[int, bytes]]:
    """Read a SEQUENCE OF SEQUENCE { OID, value } into {oid: (tag, content)}, refusing repeats."""
    fields: dict[str, tuple[int, bytes]] = {}
    for tag, content in _der_items(data, what):
        pair = _der_items(content, what) if tag == _DER_SEQUENCE else []
        if len(pair) != 2 or pair[0][0] != _DER_OID:
            raise AttestationError(f"{what}: expected SEQUENCE {{OID, value}}")
        oid = _der_oid(pair[0][1])
        if oid in fields:
            raise AttestationError(f"{what}: {oid} appears twice")
        fields[oid] = pair[1]
    return fields


def _der_field(fields: dict[str, tuple[int, bytes]], oid: str, tag: int, what: str) -> bytes:
    if oid not in fields or fields[oid][0] != tag:
        raise AttestationError(f"PCK SGX extension: {what} ({oid}) missing or mistyped")
    return fields[oid][1]


def _der_uint(content: bytes, hi: int, what: str) -> int:
    value = int.from_bytes(content, "big", signed=True)
    if not content or not 0 <= value <= hi:
        raise AttestationError(f"PCK SGX extension: {what} out of range")
    return value


def parse_pck_extension(cert: x509.Certificate) -> PckInfo:
    """Extract PPID, FMSPC, PCE-ID, PCESVN, CPUSVN and the 16 SGX TCB component SVNs."""
    try:
        ext = cert.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
    except x509.ExtensionNotFound:
        raise AttestationError("PCK certificate has no SGX extension") from None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise AttestationError("PCK certificate SGX extension has an unexpected form")
    outer = _der_items(ext.value, "PCK SGX extension")
    if len(outer) != 1 or outer[0][0] != _DER_SEQUENCE:
        raise AttestationError("PCK SGX extension is not one SEQUENCE")
    fields = _der_fields(outer[0][1], "PCK SGX extension")
    tcb = _der_fields(_der_field(fields, f"{_SGX}.2", _DER_SEQUENCE, "TCB"), "PCK TCB")
    components = tuple(
        _der_uint(_der_field(tcb, f"{_SGX}.2.{i}", _DER_INTEGER, f"SGX TCB comp {i}"), 255, "SVN")
        for i in range(1, 17)
    )
    pce_svn = _der_field(tcb, f"{_SGX}.2.17", _DER_INTEGER, "PCESVN")
    info = PckInfo(
        fmspc=_der_field(fields, f"{_SGX}.4", _DER_OCTETS, "FMSPC"),
        pce_id=_der_field(fields, f"{_SGX}.3", _DER_OCTETS, "PCE-ID"),
        pce_svn=_der_uint(pce_svn, 0xFFFF, "PCESVN"),
        cpu_svn=_der_field(tcb, f"{_SGX}.2.18", _DER_OCTETS, "CPUSVN"),
        sgx_components=components,
        ppid=_der_field(fields, f"{_SGX}.1", _DER_OCTETS, "PPID"),
    )
    sizes = (len(info.fmspc), len(info.pce_id), len(info.cpu_svn), len(info.ppid))
    if sizes != (6, 2, 16, 16):
        raise AttestationError("PCK SGX extension: FMSPC, PCE-ID, CPUSVN or PPID has a wrong size")
    return info


# --------------------------------------------------------------------------------------------
# TCB evaluation (pure functions over parsed, already-authenticated data)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcbVerdict:
    """The TCB status of the platform, its TDX module and its QE, and the combined status."""

    status: str
    platform_status: str
    module_id: str | None
    module_status: str
    qe_status: str
    advisory_ids: tuple[str, ...]


def match_module(
    tcb_info: TcbInfo, report: TdReport
) -> tuple[TdxModuleIdentity, IdentityLevel | None]:
    """Check the TDX module's signer and attributes; find its TCB level.

    TEE_TCB_SVN[1] is the module's major version: 0 means the base ``tdxModule`` entry (no
    separate level), otherwise ``tdxModuleIdentities`` entry ``TDX_%02X`` whose levels are
    matched by TEE_TCB_SVN[0], the module ISVSVN.
    """
    isv_svn, major = report.tee_tcb_svn[0], report.tee_tcb_svn[1]
    module = _module_identity(tcb_info, major) if major else tcb_info.tdx_module
    if report.mr_signer_seam != module.mrsigner:
        name = module.id or "(base)"
        raise AttestationError(f"MRSIGNERSEAM is not the signer of TDX module {name}")
    # Intel's QVL: every SEAMATTRIBUTES byte zero and equal to the identity's, no mask applied.
    if any(report.seam_attributes) or report.seam_attributes != module.attributes:
        raise AttestationError(
            f"SEAMATTRIBUTES {report.seam_attributes.hex()} are not zero or do not match the "
            "TDX module identity"
        )
    if not major:
        return module, None
    level = next((lv for lv in module.levels if isv_svn >= lv.isv_svn), None)
    if level is None:
        raise AttestationError(
            f"TDX module {module.id} ISVSVN {isv_svn} is below every TCB level (TCB not supported)"
        )
    return module, level


def _module_identity(tcb_info: TcbInfo, major: int) -> TdxModuleIdentity:
    """The ``tdxModuleIdentities`` entry for a module major version (ids compare uppercase)."""
    wanted = f"TDX_{major:02X}"
    for module in tcb_info.tdx_module_identities:
        if module.id.upper() == wanted:
            return module
    raise AttestationError(f"TCB info has no TDX module identity {wanted}")


def match_qe(identity: QeIdentity, qe: EnclaveReport) -> IdentityLevel:
    """Check the QE report against the QE identity (Intel's TD QE, production mode); return
    the QE's TCB level: as Intel's QVL does, the first level in document order whose ISVSVN
    the QE meets, even if a better level follows it."""
    if not hmac.compare_digest(qe.mr_signer, identity.mrsigner):
        raise AttestationError("QE MRSIGNER is not Intel's TD quoting enclave signer")
    if qe.isv_prod_id != identity.isv_prod_id:
        raise AttestationError(f"QE ISVPRODID {qe.isv_prod_id} is not {identity.isv_prod_id}")
    if qe.misc_select & identity.miscselect_mask != identity.miscselect:
        raise AttestationError("QE MISCSELECT does not match the QE identity")
    if not _masked_equal(qe.attributes, identity.attributes_mask, identity.attributes):
        raise AttestationError("QE ATTRIBUTES do not match the QE identity (debug QE?)")
    level = next((lv for lv in identity.levels if qe.isv_svn >= lv.isv_svn), None)
    if level is None:
        raise AttestationError(
            f"QE ISVSVN {qe.isv_svn} is below every QE TCB level (TCB not supported)"
        )
    return level


def _masked_equal(value: bytes, mask: bytes, expected: bytes) -> bool:
    """``value & mask == expected`` byte by byte (bits outside the mask are not compared)."""
    if not len(value) == len(mask) == len(expected):
        return False
    return all(v & m == e for v, m, e in zip(value, mask, expected, strict=True))


def match_tcb_levels(
    levels: Iterable[TcbLevel], pck: PckInfo, tee_tcb_svn: bytes
) -> tuple[TcbLevel, TcbLevel]:
    """Return (first level the SGX TCB meets, first level the SGX and TDX TCB meet).

    ``levels`` must be ordered best first, as :attr:`TcbInfo.levels` is.

    Comparison is component by component, never the CPUSVN as one number: a level is met only
    if *every* component is at least the level's. When the TDX module major version
    (TEE_TCB_SVN[1]) is non-zero, the first two TDX components are the module's own SVNs,
    judged by the module identity instead, so the comparison starts at index 2.
    """
    start = 2 if tee_tcb_svn[1] else 0
    sgx_level = None
    for level in levels:
        pairs = zip(pck.sgx_components, level.sgx_components, strict=True)
        if not all(have >= need for have, need in pairs) or pck.pce_svn < level.pce_svn:
            continue
        if sgx_level is None:
            sgx_level = level
        if all(tee_tcb_svn[i] >= level.tdx_components[i] for i in range(start, 16)):
            return sgx_level, level
    if sgx_level is None:
        raise AttestationError(
            "no matching TCB level (TCB not supported): SGX TCB components "
            f"{list(pck.sgx_components)} with PCESVN {pck.pce_svn} are below every level"
        )
    raise AttestationError(
        f"no matching TCB level (TCB not supported): TEE_TCB_SVN {tee_tcb_svn.hex()} is below "
        "every level the SGX TCB meets"
    )


def converge(status: str, component_status: str) -> str:
    """Fold a TDX module or QE status into a platform status (Intel QVL's rules)."""
    if component_status == "Revoked":
        return "Revoked"
    if component_status == "OutOfDate":
        if status in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return status


def relaunch_status(
    tcb_info: TcbInfo, report: TdReport, sgx_status: str, tdx_status: str, module_status: str
) -> str:
    """TD 1.5: an out-of-date TD whose host already runs the current module should relaunch.

    TEE_TCB_SVN2 describes the module the host would give a relaunched TD (TD-preserving
    update). If that module meets the newest level while the TD's own is out of date, Intel's
    QVL reports TDRelaunchAdvised instead of OutOfDate. Only called with an up-to-date QE.
    """
    svn2 = report.tee_tcb_svn2
    if (
        svn2 is None
        or sgx_status not in _SGX_NOT_OUT_OF_DATE
        or tdx_status not in ("OutOfDate", "OutOfDateConfigurationNeeded")
        or module_status != "OutOfDate"
    ):
        return tdx_status
    latest = tcb_info.levels[0]
    if svn2[1] == 0:
        newest_module_svn = latest.tdx_components[0]
    else:
        newest_module_svn = _module_identity(tcb_info, svn2[1]).levels[0].isv_svn
    if svn2[0] < newest_module_svn or svn2[2] < latest.tdx_components[2]:
        return tdx_status
    if sgx_status in _CONFIG_NEEDED or tdx_status in _CONFIG_NEEDED:
        return RELAUNCH_ADVISED_CONFIG
    return RELAUNCH_ADVISED


def evaluate_tcb(
    tcb_info: TcbInfo,
    pck: PckInfo,
    report: TdReport,
    module: tuple[TdxModuleIdentity, IdentityLevel | None],
    qe_level: IdentityLevel,
) -> TcbVerdict:
    """Combine platform, TDX module and QE levels into one status; Revoked raises."""
    sgx_level, tdx_level = match_tcb_levels(tcb_info.levels, pck, report.tee_tcb_svn)
    identity, module_level = module
    module_status = module_level.status if module_level else "UpToDate"
    status = converge(tdx_level.status, module_status)
    if status != "Revoked" and qe_level.status == "UpToDate":
        status = relaunch_status(tcb_info, report, sgx_level.status, status, module_status)
    status = converge(status, qe_level.status)
    if status == "Revoked":
        raise AttestationError("TCB status is Revoked (platform, TDX module or QE)")
    advisories: list[str] = []
    for source in (tdx_level, module_level, qe_level):
        for advisory in source.advisory_ids if source else ():
            if advisory not in advisories:
                advisories.append(advisory)
    return TcbVerdict(
        status=status,
        platform_status=tdx_level.status,
        module_id=identity.id or None,
        module_status=module_status,
        qe_status=qe_level.status,
        advisory_ids=tuple(advisories),
    )


# --------------------------------------------------------------------------------------------
# Certificates, CRLs and raw ECDSA signatures
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Role:
    """What a certificate at one position of an Intel chain must be (the root is the anchor)."""

    common_names: frozenset[str]
    is_ca: bool


_PCK_LEAF = _Role(frozenset({"Intel SGX PCK Certificate"}), is_ca=False)
_PCK_CA = _Role(frozenset({"Intel SGX PCK Platform CA", "Intel SGX PCK Processor CA"}), is_ca=True)
_TCB_SIGNER = _Role(frozenset({"Intel SGX TCB Signing"}), is_ca=False)


def _load_pem_chain(pem: bytes, what: str) -> list[x509.Certificate]:
    """Parse PEM certificates and insist on the canonical encoding.

    The PEM text is not covered by any signature; requiring that it re-encode byte for byte
    means no byte of it can change (base64 padding bits, line breaks, text between blocks)
    without the chain being refused.
    """
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise AttestationError(f"{what}: not a PEM certificate chain ({e})") from None
    if b"".join(c.public_bytes(Encoding.PEM) for c in certs) != pem:
        raise AttestationError(f"{what}: not in canonical PEM form")
    return certs


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return ""
    return names[0].value


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    """A CA here is marked CA in BasicConstraints *and* allowed to sign certificates."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    usage = _key_usage(cert)
    return constraints.ca and usage is not None and usage.key_cert_sign


def _p256_key(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise AttestationError(f"{what}: key is not ECDSA P-256")
    return key


def _verify_raw_ecdsa(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """Verify a raw ``r || s`` (32 + 32 bytes, big-endian) ECDSA-P256-SHA256 signature."""
    if len(signature) != 64:
        return False
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


# --------------------------------------------------------------------------------------------
# The verification run: checks in order, each with the checks it depends on
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One verification step: its name, whether it passed, and what was found."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class VerificationReport:
    """Everything established about one quote. ``ok`` is true only if nothing failed."""

    quote: Quote
    now: datetime
    checks: tuple[Check, ...]
    pck: PckInfo | None
    tcb: TcbVerdict | None
    valid_from: datetime | None
    valid_until: datetime | None

    @property
    def ok(self) -> bool:
        return self.tcb is not None and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: hex for bytes, RFC 3339 UTC for times."""
        quote = self.quote
        tcb = self.tcb
        return {
            "ok": self.ok,
            "now": _rfc3339(self.now),
            "quote": {
                "version": quote.header.version,
                "body": "TD1.5" if quote.report.is_td15 else "TD1.0",
                "qe_svn": quote.certification.qe_report.isv_svn,
            },
            "measurements": quote.report.measurements(),
            "checks": [asdict(c) for c in self.checks],
            "platform": None
            if self.pck is None
            else {
                "device_id": self.pck.device_id.hex(),
                "ppid": self.pck.ppid.hex(),
                "fmspc": self.pck.fmspc.hex().upper(),
                "pce_id": self.pck.pce_id.hex().upper(),
                "pce_svn": self.pck.pce_svn,
                "cpu_svn": self.pck.cpu_svn.hex(),
                "sgx_tcb_components": list(self.pck.sgx_components),
            },
            "tcb": None
            if tcb is None
            else {
                "status": tcb.status,
                "platform_status": tcb.platform_status,
                "tdx_module": tcb.module_id,
                "tdx_module_svn": quote.report.tee_tcb_svn[0],
                "tdx_module_status": tcb.module_status,
                "qe_status": tcb.qe_status,
                "advisory_ids": list(tcb.advisory_ids),
            },
            "valid_from": _rfc3339(self.valid_from) if self.valid_from else None,
            "valid_until": _rfc3339(self.valid_until) if self.valid_until else None,
        }


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Run:
    """State shared by the checks of one verification; each check fills in what it proved."""

    quote: Quote
    collateral: Collateral | None
    now: datetime
    anchor: x509.Certificate
    windows: list[tuple[datetime, datetime]] = field(default_factory=list)
    pck_chain: list[x509.Certificate] = field(default_factory=list)
    pck: PckInfo | None = None
    root_crl: x509.CertificateRevocationList | None = None
    pck_crl: x509.CertificateRevocationList | None = None
    tcb_info: TcbInfo | None = None
    qe_level: IdentityLevel | None = None
    module: tuple[TdxModuleIdentity, IdentityLevel | None] | None = None
    tcb: TcbVerdict | None = None

    @property
    def coll(self) -> Collateral:
        assert self.collateral is not None  # collateral checks run only when it was supplied
        return self.collateral

    def within(self, start: datetime, end: datetime | None, what: str) -> None:
        """Require ``start <= now <= end`` (both inclusive) and remember the window."""
        if end is None:
            raise AttestationError(f"{what} has no expiry (nextUpdate)")
        if not start <= self.now <= end:
            raise AttestationError(
                f"{what} is not valid at {_rfc3339(self.now)} "
                f"(valid {_rfc3339(start)} .. {_rfc3339(end)})"
            )
        self.windows.append((start, end))

    def chain(self, certs: list[x509.Certificate], roles: tuple[_Role, ...], what: str) -> None:
        """Verify ``certs`` = [roles..., Intel SGX Root CA]: names, CA flags, signatures, dates."""
        if len(certs) != len(roles) + 1:
            raise AttestationError(
                f"{what}: {len(certs)} certificates, expected {len(roles) + 1} "
                "ending in the Intel SGX Root CA"
            )
        if certs[-1].public_bytes(Encoding.DER) != self.anchor.public_bytes(Encoding.DER):
            raise AttestationError(f"{what}: does not end in the trusted Intel SGX Root CA")
        for cert, role in zip(certs, roles, strict=False):
            name = _common_name(cert)
            if name not in role.common_names:
                raise AttestationError(f"{what}: unexpected certificate {name!r}")
            if _is_ca(cert) != role.is_ca:
                raise AttestationError(f"{what}: {name} has wrong CA constraints")
        for child, parent in pairwise(certs):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                raise AttestationError(
                    f"{what}: {_common_name(child)!r} is not signed by {_common_name(parent)!r}"
                ) from None
        for cert in certs:
            self.within(
                cert.not_valid_before_utc,
                cert.not_valid_after_utc,
                f"{what} certificate {_common_name(cert)!r}",
            )

    def crl(
        self, der: bytes, issuer: x509.Certificate, what: str
    ) -> x509.CertificateRevocationList:
        """Load a CRL; require it be signed by ``issuer``, current, with no critical extension."""
        crl = x509.load_der_x509_crl(der)
        usage = _key_usage(issuer)
        if crl.issuer != issuer.subject or usage is None or not usage.crl_sign:
            raise AttestationError(f"{what} is not issued by {_common_name(issuer)!r}")
        if not crl.is_signature_valid(_p256_key(issuer, what)):
            raise AttestationError(f"{what} signature is invalid")
        if any(ext.critical for ext in crl.extensions):
            raise AttestationError(f"{what} has a critical extension this verifier does not know")
        self.within(crl.last_update_utc, crl.next_update_utc, what)
        return crl


_CheckFn = Callable[[_Run], str]


def _check_header(run: _Run) -> str:
    header = run.quote.header
    if header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise AttestationError(f"QE vendor id {header.qe_vendor_id.hex()} is not Intel's")
    body = "TD 1.5" if run.quote.report.is_td15 else "TD 1.0"
    return f"version {header.version}, ECDSA-P256 key, TDX, {body} body, Intel QE"


def _check_td_attributes(run: _Run) -> str:
    if run.quote.report.debug:
        raise AttestationError("TD is in debug mode: the host can read and change its memory")
    return f"TDATTRIBUTES {run.quote.report.td_attributes.hex()}: not a debug TD"


def _check_quote_signature(run: _Run) -> str:
    quote = run.quote
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + quote.attestation_key
        )
    except ValueError:
        raise AttestationError("attestation key is not a P-256 point") from None
    if not _verify_raw_ecdsa(key, quote.signature, quote.signed_data):
        raise AttestationError("quote signature does not verify with the attestation key")
    return f"ECDSA-P256 over bytes 0..{len(quote.signed_data) - 1} (header and TD report)"


def _check_pck_chain(run: _Run) -> str:
    pem = run.quote.certification.pck_chain_pem
    certs = _load_pem_chain(pem.removesuffix(b"\x00"), "PCK certificate chain")
    run.chain(certs, (_PCK_LEAF, _PCK_CA), "PCK certificate chain")
    _p256_key(certs[0], "PCK certificate")
    run.pck = parse_pck_extension(certs[0])
    run.pck_chain = certs
    return (
        f"PCK certificate -> {_common_name(certs[1])} -> Intel SGX Root CA; "
        f"FMSPC {run.pck.fmspc.hex().upper()}, PCESVN {run.pck.pce_svn}"
    )


def _check_qe_report_signature(run: _Run) -> str:
    cert_data = run.quote.certification
    key = _p256_key(run.pck_chain[0], "PCK certificate")
    if not _verify_raw_ecdsa(key, cert_data.qe_report_signature, cert_data.qe_report.raw):
        raise AttestationError("QE report signature does not verify with the PCK key")
    return "QE report signed by the PCK certificate's key"


def _check_qe_binding(run: _Run) -> str:
    quote = run.quote
    cert_data = quote.certification
    expected = sha256(quote.attestation_key + cert_data.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(cert_data.qe_report.report_data, expected):
        raise AttestationError(
            "QE report data is not SHA-256(attestation key || QE auth data) || zeros"
        )
    return "QE report data = SHA-256(attestation key || QE auth data)"


def _check_root_ca_crl(run: _Run) -> str:
    run.root_crl = run.crl(run.coll.root_ca_crl, run.anchor, "root CA CRL")
    return f"signed by Intel SGX Root CA, {len(run.root_crl)} revoked, current"


def _check_pck_crl(run: _Run) -> str:
    assert run.root_crl is not None
    issuers = _load_pem_chain(run.coll.pck_crl_issuer_chain.encode(), "PCK CRL issuer chain")
    run.chain(issuers, (_PCK_CA,), "PCK CRL issuer chain")
    if _revoked(run.root_crl, issuers[0]):
        raise AttestationError("PCK CRL issuer is revoked by the root CA CRL")
    pck_ca = run.pck_chain[1]
    if issuers[0].subject != pck_ca.subject or issuers[0].public_key() != pck_ca.public_key():
        raise AttestationError("PCK CRL issuer is not the CA that issued the PCK certificate")
    run.pck_crl = run.crl(run.coll.pck_crl, issuers[0], "PCK CRL")
    return f"signed by {_common_name(pck_ca)}, {len(run.pck_crl)} revoked, current"


def _check_pck_not_revoked(run: _Run) -> str:
    assert run.root_crl is not None and run.pck_crl is not None
    leaf, ca = run.pck_chain[0], run.pck_chain[1]
    if _revoked(run.pck_crl, leaf):
        raise AttestationError(f"PCK certificate serial {leaf.serial_number:x} is revoked")
    if _revoked(run.root_crl, ca):
        raise AttestationError(f"{_common_name(ca)} is revoked by the root CA CRL")
    return "neither the PCK certificate nor its CA is revoked"


def _signed_document(run: _Run, chain_pem: str, body: str, signature: bytes, what: str) -> str:
    """Verify a TCB-signing chain and its raw signature over the exact bytes of ``body``."""
    assert run.root_crl is not None
    certs = _load_pem_chain(chain_pem.encode(), f"{what} issuer chain")
    run.chain(certs, (_TCB_SIGNER,), f"{what} issuer chain")
    if _revoked(run.root_crl, certs[0]):
        raise AttestationError(f"{what} signing certificate is revoked by the root CA CRL")
    if not _verify_raw_ecdsa(_p256_key(certs[0], what), signature, body.encode("utf-8")):
        raise AttestationError(f"{what} signature does not verify (content or signature altered)")
    return f"signed by Intel SGX TCB Signing ({len(body.encode('utf-8'))} bytes, as supplied)"


def _check_tcb_info_signature(run: _Run) -> str:
    c = run.coll
    return _signed_document(
        run, c.tcb_info_issuer_chain, c.tcb_info, c.tcb_info_signature, "TCB info"
    )


def _check_tcb_info(run: _Run) -> str:
    assert run.pck is not None
    info = parse_tcb_info(run.coll.tcb_info)
    run.within(info.issue_date, info.next_update, "TCB info")
    if info.fmspc != run.pck.fmspc:
        raise AttestationError(
            f"TCB info is for FMSPC {info.fmspc.hex().upper()}, the PCK certificate's is "
            f"{run.pck.fmspc.hex().upper()}"
        )
    if info.pce_id != run.pck.pce_id:
        raise AttestationError("TCB info PCE-ID differs from the PCK certificate's")
    run.tcb_info = info
    return (
        f"TDX TCB info v3 for FMSPC {info.fmspc.hex().upper()}, evaluation data number "
        f"{info.tcb_evaluation_data_number}, {len(info.levels)} levels"
    )


def _check_qe_identity_signature(run: _Run) -> str:
    c = run.coll
    return _signed_document(
        run, c.qe_identity_issuer_chain, c.qe_identity, c.qe_identity_signature, "QE identity"
    )


def _check_qe_identity(run: _Run) -> str:
    identity = parse_qe_identity(run.coll.qe_identity)
    run.within(identity.issue_date, identity.next_update, "QE identity")
    qe = run.quote.certification.qe_report
    run.qe_level = match_qe(identity, qe)
    return f"Intel TD QE, production mode; QE ISVSVN {qe.isv_svn}: {run.qe_level.status}"


def _check_tdx_module(run: _Run) -> str:
    assert run.tcb_info is not None
    run.module = match_module(run.tcb_info, run.quote.report)
    identity, level = run.module
    svn = run.quote.report.tee_tcb_svn[0]
    if level is None:
        return "TDX module major version 0: signer and attributes match the base identity"
    return f"TDX module {identity.id} ISVSVN {svn}: {level.status}"


def _check_tcb_status(run: _Run) -> str:
    assert run.tcb_info and run.pck and run.module and run.qe_level  # every check passed
    run.tcb = evaluate_tcb(run.tcb_info, run.pck, run.quote.report, run.module, run.qe_level)
    advisories = ", ".join(run.tcb.advisory_ids) or "none"
    return (
        f"{run.tcb.status} (platform {run.tcb.platform_status}, TDX module "
        f"{run.tcb.module_status}, QE {run.tcb.qe_status}); advisories: {advisories}"
    )


# (name, checks it needs to have passed, function). The order is the order of evaluation and of
# the report; a check whose prerequisites failed is reported as failed, not run. The TCB status
# comes last and only once every other check has passed.
_QUOTE_CHECKS: tuple[tuple[str, tuple[str, ...], _CheckFn], ...] = (
    ("quote_header", (), _check_header),
    ("td_attributes", (), _check_td_attributes),
    ("quote_signature", (), _check_quote_signature),
    ("qe_report_binding", (), _check_qe_binding),
    ("pck_chain", (), _check_pck_chain),
    ("qe_report_signature", ("pck_chain",), _check_qe_report_signature),
)
_COLLATERAL_CHECKS: tuple[tuple[str, tuple[str, ...], _CheckFn], ...] = (
    ("root_ca_crl", (), _check_root_ca_crl),
    ("pck_crl", ("pck_chain", "root_ca_crl"), _check_pck_crl),
    ("pck_not_revoked", ("pck_crl",), _check_pck_not_revoked),
    ("tcb_info_signature", ("root_ca_crl",), _check_tcb_info_signature),
    ("tcb_info", ("tcb_info_signature", "pck_chain"), _check_tcb_info),
    ("qe_identity_signature", ("root_ca_crl",), _check_qe_identity_signature),
    (
        "qe_identity",
        ("qe_identity_signature", "qe_report_signature", "qe_report_binding"),
        _check_qe_identity,
    ),
    ("tdx_module", ("tcb_info", "quote_signature"), _check_tdx_module),
)


def _run_one(run: _Run, name: str, fn: _CheckFn) -> Check:
    """Run one check; any exception fails it.

    The checks feed hostile bytes to X.509, CRL and JSON parsers whose exception types on
    malformed input are not a documented, closed set (``DuplicateExtension`` is not a
    ``ValueError``, for one). Whatever is raised, the check fails, never passes, and the
    exception type is named so that a bug would still be visible.
    """
    try:
        return Check(name, True, fn(run))
    except AttestationError as e:
        return Check(name, False, e.message)
    except Exception as e:  # fail closed on undocumented parser errors, see above
        return Check(name, False, f"malformed input ({type(e).__name__}: {e})")


def _run_checks(run: _Run) -> list[Check]:
    if run.collateral is None:
        checks = list(_QUOTE_CHECKS)
    else:
        checks = [*_QUOTE_CHECKS, *_COLLATERAL_CHECKS]
    results: list[Check] = []
    for name, needs, fn in checks:
        missing = [n for n in needs if not any(c.name == n and c.passed for c in results)]
        if missing:
            results.append(Check(name, False, f"not evaluated: needs {', '.join(missing)}"))
        else:
            results.append(_run_one(run, name, fn))
    if run.collateral is None:
        results.append(Check("collateral", False, "none supplied: revocation and TCB unknown"))
    elif all(c.passed for c in results):
        results.append(_run_one(run, "tcb_status", _check_tcb_status))
    else:
        results.append(Check("tcb_status", False, "not evaluated: an earlier check failed"))
    return results


def verify_quote(
    quote_bytes: bytes, collateral: Collateral | None, now: datetime
) -> VerificationReport:
    """Verify a TDX quote against collateral at time ``now`` (timezone-aware).

    Returns the report only if every check passed and a TCB status was established; raises
    :class:`VerificationFailed` (with the report) otherwise, and
    :class:`~sealfs.attest.quote.QuoteFormatError` if the quote cannot be parsed at all.
    Without collateral the quote's own signatures and PCK chain are checked, but the result is
    always a failure: revocation and TCB status are unknown.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    run = _Run(
        quote=parse_quote(quote_bytes),
        collateral=collateral,
        now=now.astimezone(UTC),
        anchor=_ANCHOR,
    )
    checks = _run_checks(run)
    report = VerificationReport(
        quote=run.quote,
        now=run.now,
        checks=tuple(checks),
        pck=run.pck,
        tcb=run.tcb,
        valid_from=max((w[0] for w in run.windows), default=None),
        valid_until=min((w[1] for w in run.windows), default=None),
    )
    if not report.ok:
        raise VerificationFailed(report)
    return report
