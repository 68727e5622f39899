"""Parsing of Intel TDX DCAP quotes, versions 4 and 5.

This module only turns bytes into typed fields; it verifies nothing (see
:mod:`sealfs.attest.dcap`). It is strict on purpose: a quote is attacker-supplied input, so
every length is checked before use, every nested structure must be consumed exactly, and the
only bytes tolerated after the signature data are zero padding. Any deviation raises
:class:`QuoteFormatError` with the offset and the field concerned; no ``IndexError`` or
``struct.error`` can escape.

Layout (all integers little-endian; sizes in bytes)::

    header (48)  version u16 | att_key_type u16 | tee_type u32 | reserved 4 |
                 qe_vendor_id 16 | user_data 20
    v4:  TD report body (584, TD 1.0)
    v5:  body_type u16 | body_size u32 | body (2: TD 1.0, 584; 3: TD 1.5, 648)
    signature_data_len u32 | signature_data
    zero padding (any length)

    signature_data:  quote signature r||s (64) | attestation key X||Y (64) |
                     cert_type u16 (= 6, QE report certification data) | size u32 | data
    QE report certification data:  QE report (384) | QE report signature r||s (64) |
                     auth_data_len u16 | auth_data | cert_type u16 (= 5, PCK chain, PEM) |
                     size u32 | PEM bytes

The quote signature covers the header and the body, including the 6-byte body descriptor of a
version 5 quote (bytes 0..701 of a TD 1.5 quote).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sealfs.errors import AttestationError

HEADER_LEN = 48
TD10_BODY_LEN = 584
TD15_BODY_LEN = 648
ENCLAVE_REPORT_LEN = 384
ECDSA_P256_SIGNATURE_LEN = 64
ECDSA_P256_KEY_LEN = 64

TEE_TYPE_TDX = 0x81
ATT_KEY_TYPE_ECDSA_P256 = 2
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6

#: QE vendor id of Intel's quoting enclaves.
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

#: Upper bound on an accepted quote; real ones are about 5 KiB.
MAX_QUOTE_LEN = 1 << 20

_BODY_LENGTHS = {BODY_TYPE_TD10: TD10_BODY_LEN, BODY_TYPE_TD15: TD15_BODY_LEN}
_HEX_TEXT = re.compile(rb"\s*(?:0[xX])?[0-9a-fA-F][0-9a-fA-F\s]*")  # linear: no overlap
_WHITESPACE = re.compile(rb"\s+")

# TDATTRIBUTES bits (Intel TDX Module 1.0 ABI, as Phala-Network/dcap-qvl reads them): DEBUG
# (TUD bit 0), SEPT_VE_DISABLE (28), PKS (30), KL (31), PERFMON (63). Every other bit is
# reserved here, including bits later module versions define (e.g. 27 LASS, 29 MIGRATABLE).
TD_ATTR_DEBUG = 1 << 0
TD_ATTR_SEPT_VE_DISABLE = 1 << 28
TD_ATTR_DEFINED = TD_ATTR_DEBUG | TD_ATTR_SEPT_VE_DISABLE | 1 << 30 | 1 << 31 | 1 << 63


class QuoteFormatError(AttestationError):
    """The quote is truncated, malformed, or of a kind this verifier does not handle."""


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    att_key_type: int
    tee_type: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdReport:
    """A TD report body: TD 1.0 (584 bytes) or TD 1.5 (648 bytes, two extra fields)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None

    @property
    def is_td15(self) -> bool:
        return self.tee_tcb_svn2 is not None

    @property
    def debug(self) -> bool:
        """TUD.DEBUG: the host can read and modify this TD's memory."""
        return bool(int.from_bytes(self.td_attributes, "little") & TD_ATTR_DEBUG)

    def measurements(self) -> dict[str, str]:
        """The identity-bearing fields as lowercase hex, keyed by their conventional names."""
        fields = {
            "mrtd": self.mr_td,
            "rtmr0": self.rtmrs[0],
            "rtmr1": self.rtmrs[1],
            "rtmr2": self.rtmrs[2],
            "rtmr3": self.rtmrs[3],
            "report_data": self.report_data,
            "mr_config_id": self.mr_config_id,
            "mr_owner": self.mr_owner,
            "mr_owner_config": self.mr_owner_config,
            "mr_seam": self.mr_seam,
            "mr_signer_seam": self.mr_signer_seam,
            "seam_attributes": self.seam_attributes,
            "td_attributes": self.td_attributes,
            "xfam": self.xfam,
            "tee_tcb_svn": self.tee_tcb_svn,
        }
        if self.tee_tcb_svn2 is not None and self.mr_servicetd is not None:
            fields["tee_tcb_svn2"] = self.tee_tcb_svn2
            fields["mr_servicetd"] = self.mr_servicetd
        return {name: value.hex() for name, value in fields.items()}


@dataclass(frozen=True)
class EnclaveReport:
    """An SGX enclave report body; here, the Quoting Enclave's report. ``raw`` is what is signed."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


@dataclass(frozen=True)
class QeCertificationData:
    """Certification data type 6: the QE report, its PCK signature, auth data, PCK chain."""

    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes


@dataclass(frozen=True)
class Quote:
    """A parsed TDX quote. ``signed_data`` is exactly the byte range the quote signature covers."""

    header: QuoteHeader
    body_type: int
    report: TdReport
    signed_data: bytes
    signature: bytes
    attestation_key: bytes
    certification: QeCertificationData


class _Reader:
    """Bounds-checked little-endian reader over one structure of the quote."""

    def __init__(self, data: bytes, what: str, base: int = 0) -> None:
        self._data = data
        self._what = what
        self._base = base  # offset of ``data`` within the whole quote, for messages
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.remaining:
            raise QuoteFormatError(
                f"quote truncated: {field} needs {n} bytes at offset {self._base + self.pos}, "
                f"only {self.remaining} left in the {self._what}"
            )
        chunk = self._data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def sub(self, n: int, field: str) -> _Reader:
        start = self._base + self.pos
        return _Reader(self.take(n, field), field, start)

    def expect_end(self) -> None:
        if self.remaining:
            raise QuoteFormatError(
                f"{self.remaining} unexpected bytes at offset {self._base + self.pos} "
                f"after the end of the {self._what}"
            )


def decode_quote_input(data: bytes) -> bytes:
    """Return the quote bytes from a file's content: raw binary, or hex text.

    Hex may be upper or lower case, wrapped over lines, and prefixed by ``0x``. Binary quotes
    always start with a non-hex byte (the version, 4 or 5), so the two forms cannot collide.
    """
    if _HEX_TEXT.fullmatch(data):
        digits = _WHITESPACE.sub(b"", data)
        if digits[:2] in (b"0x", b"0X"):
            digits = digits[2:]
        if len(digits) % 2:
            raise QuoteFormatError("hex quote has an odd number of digits")
        return bytes.fromhex(digits.decode("ascii"))
    if data.strip() and all(32 <= b < 127 or b in b"\t\r\n" for b in data):
        raise QuoteFormatError("input is text but not hex; expected a binary quote or hex text")
    return data


def parse_quote(data: bytes) -> Quote:
    """Parse a TDX quote of version 4 or 5; raise :class:`QuoteFormatError` on any defect."""
    if len(data) > MAX_QUOTE_LEN:
        raise QuoteFormatError(f"quote is {len(data)} bytes, more than {MAX_QUOTE_LEN}")
    reader = _Reader(data, "quote")
    header = _parse_header(reader.take(HEADER_LEN, "header"))
    body_type = _read_body_descriptor(reader, header.version)
    body = reader.sub(_BODY_LENGTHS[body_type], "TD report body")
    report = _parse_td_report(body, td15=body_type == BODY_TYPE_TD15)
    signed_data = data[: reader.pos]
    sig_len = reader.u32("signature data length")
    signature, attestation_key, certification = _parse_signature_data(
        reader.sub(sig_len, "signature data")
    )
    padding = data[reader.pos :]
    if padding.count(0) != len(padding):
        raise QuoteFormatError(
            f"non-zero bytes in the {len(padding)} bytes after the signature data "
            f"(offset {reader.pos})"
        )
    return Quote(header, body_type, report, signed_data, signature, attestation_key, certification)


def _parse_header(raw: bytes) -> QuoteHeader:
    r = _Reader(raw, "header")
    version = r.u16("version")
    att_key_type = r.u16("attestation key type")
    tee_type = r.u32("TEE type")
    r.take(4, "reserved")
    vendor, user_data = r.take(16, "QE vendor id"), r.take(20, "user data")
    if version not in (4, 5):
        raise QuoteFormatError(f"unsupported quote version {version} (supported: 4, 5)")
    if tee_type != TEE_TYPE_TDX:
        raise QuoteFormatError(f"TEE type {tee_type:#x} is not TDX ({TEE_TYPE_TDX:#x})")
    if att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise QuoteFormatError(
            f"attestation key type {att_key_type} is not ECDSA-P256 ({ATT_KEY_TYPE_ECDSA_P256})"
        )
    return QuoteHeader(version, att_key_type, tee_type, vendor, user_data)


def _read_body_descriptor(reader: _Reader, version: int) -> int:
    """Version 4 quotes always carry a TD 1.0 body; version 5 says which body follows."""
    if version == 4:
        return BODY_TYPE_TD10
    body_type = reader.u16("body type")
    body_size = reader.u32("body size")
    expected = _BODY_LENGTHS.get(body_type)
    if expected is None:
        raise QuoteFormatError(f"body type {body_type} is not a TD report (2: TD 1.0, 3: TD 1.5)")
    if body_size != expected:
        raise QuoteFormatError(f"body type {body_type} has size {body_size}, expected {expected}")
    return body_type


def _parse_td_report(r: _Reader, td15: bool) -> TdReport:
    fixed = {
        "tee_tcb_svn": r.take(16, "TEE_TCB_SVN"),
        "mr_seam": r.take(48, "MRSEAM"),
        "mr_signer_seam": r.take(48, "MRSIGNERSEAM"),
        "seam_attributes": r.take(8, "SEAMATTRIBUTES"),
        "td_attributes": r.take(8, "TDATTRIBUTES"),
        "xfam": r.take(8, "XFAM"),
        "mr_td": r.take(48, "MRTD"),
        "mr_config_id": r.take(48, "MRCONFIGID"),
        "mr_owner": r.take(48, "MROWNER"),
        "mr_owner_config": r.take(48, "MROWNERCONFIG"),
    }
    rtmrs = (r.take(48, "RTMR0"), r.take(48, "RTMR1"), r.take(48, "RTMR2"), r.take(48, "RTMR3"))
    report_data = r.take(64, "REPORTDATA")
    if not td15:
        r.expect_end()
        return TdReport(**fixed, rtmrs=rtmrs, report_data=report_data)
    svn2 = r.take(16, "TEE_TCB_SVN2")
    servicetd = r.take(48, "MRSERVICETD")
    r.expect_end()
    return TdReport(
        **fixed, rtmrs=rtmrs, report_data=report_data, tee_tcb_svn2=svn2, mr_servicetd=servicetd
    )


def _parse_signature_data(r: _Reader) -> tuple[bytes, bytes, QeCertificationData]:
    signature = r.take(ECDSA_P256_SIGNATURE_LEN, "quote signature")
    attestation_key = r.take(ECDSA_P256_KEY_LEN, "attestation key")
    cert_type = r.u16("certification data type")
    if cert_type != CERT_TYPE_QE_REPORT:
        raise QuoteFormatError(
            f"certification data type {cert_type} is not QE report certification data "
            f"({CERT_TYPE_QE_REPORT})"
        )
    cert_size = r.u32("certification data size")
    certification = _parse_qe_certification(r.sub(cert_size, "QE report certification data"))
    r.expect_end()
    return signature, attestation_key, certification


def _parse_qe_certification(r: _Reader) -> QeCertificationData:
    qe_report = _parse_enclave_report(r.take(ENCLAVE_REPORT_LEN, "QE report"))
    qe_signature = r.take(ECDSA_P256_SIGNATURE_LEN, "QE report signature")
    auth_len = r.u16("QE authentication data length")
    auth_data = r.take(auth_len, "QE authentication data")
    cert_type = r.u16("PCK certification data type")
    if cert_type != CERT_TYPE_PCK_CHAIN:
        raise QuoteFormatError(
            f"PCK certification data type {cert_type} is not a PEM PCK chain "
            f"({CERT_TYPE_PCK_CHAIN}); other types need collateral this verifier does not take"
        )
    pem = r.take(r.u32("PCK certification data size"), "PCK certificate chain")
    r.expect_end()
    return QeCertificationData(qe_report, qe_signature, auth_data, pem)


def _parse_enclave_report(raw: bytes) -> EnclaveReport:
    """Parse a 384-byte SGX report body (the QE report)."""
    r = _Reader(raw, "QE report")
    cpu_svn = r.take(16, "CPUSVN")
    misc_select = r.u32("MISCSELECT")
    r.take(28, "reserved")
    attributes = r.take(16, "ATTRIBUTES")
    mr_enclave = r.take(32, "MRENCLAVE")
    r.take(32, "reserved")
    mr_signer = r.take(32, "MRSIGNER")
    r.take(96, "reserved")
    isv_prod_id = r.u16("ISVPRODID")
    isv_svn = r.u16("ISVSVN")
    r.take(60, "reserved")
    report_data = r.take(64, "REPORTDATA")
    r.expect_end()
    return EnclaveReport(
        raw,
        cpu_svn,
        misc_select,
        attributes,
        mr_enclave,
        mr_signer,
        isv_prod_id,
        isv_svn,
        report_data,
    )
