"""DCAP TDX quote parsing and verification, against real Intel quotes and collateral.

Expected values come from tests/data/tdx/README.md, not from the library. Offsets in
the tamper tests are computed here from the published quote layout, independently of
sealfs.attest.quote.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sealfs.attest import dcap
from sealfs.attest.dcap import (
    Collateral,
    IdentityLevel,
    PckInfo,
    TcbInfo,
    TcbLevel,
    TdxModuleIdentity,
    VerificationFailed,
    verify_quote,
)
from sealfs.attest.quote import QuoteFormatError, TdReport, decode_quote_input, parse_quote
from sealfs.errors import AttestationError
from tests.tdx_vectors import TDX_VECTORS

TESTDATA = TDX_VECTORS

# Layout of a v4 quote with a TD 1.0 body (Intel TDX DCAP Quoting Library API, appendix).
HEADER, BODY = 48, 584
SIG_LEN_AT = HEADER + BODY  # 632
SIGNATURE_AT = SIG_LEN_AT + 4  # 636
ATT_KEY_AT = SIGNATURE_AT + 64  # 700
QE_REPORT_AT = ATT_KEY_AT + 64 + 6  # 770: after cert type u16 and size u32
QE_SIG_AT = QE_REPORT_AT + 384  # 1154
AUTH_DATA_AT = QE_SIG_AT + 64 + 2  # 1220 (32 bytes in these quotes)
PCK_CERT_TYPE_AT = AUTH_DATA_AT + 32  # 1252
PEM_AT = PCK_CERT_TYPE_AT + 6  # 1258
MRTD_AT = HEADER + 136

NOW_UPTODATE = datetime(2025, 7, 1, tzinfo=UTC)
NOW_OUTDATED = datetime(2026, 3, 1, tzinfo=UTC)
SECOND = timedelta(seconds=1)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text)


def vector(name: str) -> Path:
    """A test vector file (tests/data/tdx)."""
    return TESTDATA / name


@pytest.fixture(scope="module")
def quote() -> bytes:
    return vector("tdx_quote").read_bytes()


@pytest.fixture(scope="module")
def collateral() -> Collateral:
    return dcap.load_collateral(vector("tdx_quote_collateral.json"))


@pytest.fixture(scope="module")
def outdated() -> tuple[bytes, Collateral]:
    return (
        vector("tdx_quote_outdated").read_bytes(),
        dcap.load_collateral(vector("tdx_quote_outdated_collateral.json")),
    )


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def rejected(quote: bytes, collateral: Collateral | None, now: datetime) -> list[str]:
    """Names of the failed checks; fails the test if the quote is accepted."""
    try:
        verify_quote(quote, collateral, now)
    except VerificationFailed as e:
        return [c.name for c in e.report.checks if not c.passed]
    except QuoteFormatError:
        return ["<parse>"]
    pytest.fail("tampered input was accepted")


def failure(quote: bytes, collateral: Collateral | None, now: datetime) -> VerificationFailed:
    with pytest.raises(VerificationFailed) as info:
        verify_quote(quote, collateral, now)
    return info.value


# ---------------------------------------------------------------------------- expected results


def test_up_to_date_vector_verifies_with_exact_statuses(quote: bytes, collateral: Collateral):
    report = verify_quote(quote, collateral, NOW_UPTODATE)
    assert report.ok
    assert all(c.passed for c in report.checks)
    assert report.pck is not None and report.tcb is not None
    assert report.pck.fmspc.hex().upper() == "B0C06F000000"
    assert report.pck.pce_svn == 11
    assert report.tcb.status == "UpToDate"
    assert report.tcb.platform_status == "UpToDate"
    assert (report.tcb.module_id, report.quote.report.tee_tcb_svn[0]) == ("TDX_01", 6)
    assert report.tcb.module_status == "UpToDate"
    assert report.quote.certification.qe_report.isv_svn == 6
    assert report.tcb.qe_status == "UpToDate"
    assert report.tcb.advisory_ids == ()
    assert report.valid_from == utc("2025-06-19T10:32:27Z")
    assert report.valid_until == utc("2025-07-19T10:00:35Z")


@pytest.mark.parametrize(
    ("now", "ok"),
    [
        (utc("2025-06-19T10:32:27Z"), True),
        (utc("2025-07-19T10:00:35Z"), True),
        (utc("2025-06-19T10:32:27Z") - SECOND, False),
        (utc("2025-07-19T10:00:35Z") + SECOND, False),
        (utc("2030-01-01T00:00:00Z"), False),
    ],
)
def test_collateral_window_is_inclusive_to_the_second(
    quote: bytes, collateral: Collateral, now: datetime, ok: bool
):
    if ok:
        assert verify_quote(quote, collateral, now).ok
    else:
        failed = rejected(quote, collateral, now)
        assert "tcb_status" in failed


def test_window_failures_name_the_expired_item(quote: bytes, collateral: Collateral):
    early = failure(quote, collateral, utc("2025-06-19T10:32:27Z") - SECOND)
    assert [c.name for c in early.report.checks if not c.passed][0] == "qe_identity"
    late = failure(quote, collateral, utc("2025-07-19T10:00:35Z") + SECOND)
    first = next(c for c in late.report.checks if not c.passed)
    assert first.name == "pck_crl" and "not valid at" in first.detail


def test_outdated_vector_has_no_matching_tcb_level(outdated: tuple[bytes, Collateral]):
    quote, collateral = outdated
    report = failure(quote, collateral, NOW_OUTDATED).report
    failed = [c for c in report.checks if not c.passed]
    assert [c.name for c in failed] == ["tcb_status"]
    assert "no matching TCB level" in failed[0].detail
    assert "TCB not supported" in failed[0].detail
    assert report.tcb is None
    assert report.quote.header.version == 5 and report.quote.report.is_td15
    assert len(report.quote.signed_data) == 702
    assert report.pck is not None
    assert (report.pck.fmspc.hex().upper(), report.pck.pce_svn) == ("90C06F000000", 13)
    assert report.valid_from == utc("2026-02-18T10:58:51Z")
    assert report.valid_until == utc("2026-03-20T10:41:15Z")


def test_outdated_vector_trap_cpusvn_as_one_number(outdated: tuple[bytes, Collateral]):
    """Component 7 is 3 where every level wants 5, although the CPUSVN is numerically larger."""
    quote, collateral = outdated
    report = failure(quote, collateral, NOW_OUTDATED).report
    assert report.pck is not None
    info = dcap.parse_tcb_info(collateral.tcb_info)
    assert report.pck.sgx_components[7] == 3
    assert all(level.sgx_components[7] == 5 for level in info.levels)
    assert any(bytes(level.sgx_components) < report.pck.cpu_svn for level in info.levels)


def test_tappd_hex_quote_parses_and_self_verifies():
    raw = decode_quote_input(vector("quote-from-tappd.hex").read_bytes())
    parsed = parse_quote(raw)
    assert parsed.header.version == 4 and not parsed.report.is_td15
    body = raw[HEADER : HEADER + BODY]
    measurements = parsed.report.measurements()
    assert measurements["mrtd"] == body[136:184].hex()
    for i in range(4):
        assert measurements[f"rtmr{i}"] == body[328 + 48 * i : 376 + 48 * i].hex()
    assert measurements["report_data"] == body[520:584].hex()
    report = failure(raw, None, NOW_UPTODATE).report
    outcome = {c.name: c.passed for c in report.checks}
    for name in ("quote_signature", "qe_report_signature", "qe_report_binding", "pck_chain"):
        assert outcome[name], name
    assert outcome["collateral"] is False and report.tcb is None


def test_built_in_anchor_is_the_intel_sgx_root_ca():
    anchor = x509.load_pem_x509_certificate(dcap.INTEL_SGX_ROOT_CA_PEM)
    assert anchor.public_bytes(Encoding.DER) == vector("TrustedRootCA.der").read_bytes()


def test_naive_now_is_refused(quote: bytes, collateral: Collateral):
    with pytest.raises(ValueError):
        verify_quote(quote, collateral, datetime(2025, 7, 1))


def test_swapped_collateral_is_refused(quote: bytes, outdated: tuple[bytes, Collateral]):
    failed = rejected(quote, outdated[1], NOW_OUTDATED)
    assert "tcb_info" in failed  # FMSPC of another platform


# ---------------------------------------------------------------------------- quote parsing


def test_every_truncation_is_a_precise_format_error(quote: bytes):
    end = SIG_LEN_AT + 4 + int.from_bytes(quote[SIG_LEN_AT : SIG_LEN_AT + 4], "little")
    for n in range(end):
        with pytest.raises(QuoteFormatError):
            parse_quote(quote[:n])
    # What follows the signature data is zero padding, which may be cut.
    assert parse_quote(quote[:end]) == parse_quote(quote)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"\x03\x00", "version"),
        (2, b"\x03\x00", "attestation key type"),
        (4, b"\x00\x00\x00\x00", "TEE type"),
        (ATT_KEY_AT + 64, b"\x05\x00", "certification data type"),
        (PCK_CERT_TYPE_AT, b"\x03\x00", "PCK certification data type"),
    ],
)
def test_unsupported_fields_are_format_errors(
    quote: bytes, offset: int, value: bytes, message: str
):
    bad = quote[:offset] + value + quote[offset + len(value) :]
    with pytest.raises(QuoteFormatError, match=message):
        parse_quote(bad)


def test_length_fields_must_match_the_structures(quote: bytes):
    sig_len = int.from_bytes(quote[SIG_LEN_AT : SIG_LEN_AT + 4], "little")
    longer = quote[:SIG_LEN_AT] + (sig_len + 1).to_bytes(4, "little") + quote[SIG_LEN_AT + 4 :]
    with pytest.raises(QuoteFormatError, match="unexpected bytes"):
        parse_quote(longer)
    huge = quote[:SIG_LEN_AT] + (2**32 - 1).to_bytes(4, "little") + quote[SIG_LEN_AT + 4 :]
    with pytest.raises(QuoteFormatError, match="truncated"):
        parse_quote(huge)
    with pytest.raises(QuoteFormatError, match="non-zero"):
        parse_quote(quote[:-1] + b"\x01")


def test_v5_body_descriptor_is_checked(outdated: tuple[bytes, Collateral]):
    quote = outdated[0]
    assert quote[HEADER : HEADER + 2] == b"\x03\x00"
    with pytest.raises(QuoteFormatError, match="body type 1"):
        parse_quote(quote[:HEADER] + b"\x01\x00" + quote[HEADER + 2 :])
    with pytest.raises(QuoteFormatError, match="has size 584"):
        parse_quote(quote[: HEADER + 2] + (584).to_bytes(4, "little") + quote[HEADER + 6 :])


def test_quote_input_hex_and_binary(quote: bytes):
    text = quote.hex()
    wrapped = "\n".join(text[i : i + 64] for i in range(0, len(text), 64)).upper()
    assert decode_quote_input(quote) == quote
    assert decode_quote_input(text.encode()) == quote
    assert decode_quote_input(f"0x{wrapped}\n".encode()) == quote
    with pytest.raises(QuoteFormatError, match="odd number"):
        decode_quote_input(text[:-1].encode())
    with pytest.raises(QuoteFormatError, match="not hex"):
        decode_quote_input(b"hello, this is not a quote\n")
    with pytest.raises(QuoteFormatError):
        parse_quote(decode_quote_input(b""))


# ---------------------------------------------------------------------------- quote tampering


@pytest.mark.parametrize(
    ("where", "offsets", "expected_check"),
    [
        ("header", (0 + 10, 20, HEADER - 1), "quote_signature"),
        ("TD report body", (HEADER, MRTD_AT, HEADER + BODY - 1), "quote_signature"),
        ("quote signature", (SIGNATURE_AT, SIGNATURE_AT + 40, ATT_KEY_AT - 1), "quote_signature"),
        ("attestation key", (ATT_KEY_AT, ATT_KEY_AT + 63), "qe_report_binding"),
        ("QE report", (QE_REPORT_AT, QE_REPORT_AT + 320, QE_SIG_AT - 1), "qe_report_signature"),
        ("QE report signature", (QE_SIG_AT, QE_SIG_AT + 63), "qe_report_signature"),
        ("QE auth data", (AUTH_DATA_AT, AUTH_DATA_AT + 31), "qe_report_binding"),
        ("PCK chain PEM", (PEM_AT, PEM_AT + 500, PEM_AT + 1900, PEM_AT + 3676), "pck_chain"),
    ],
)
def test_tampered_quote_region_fails_the_right_check(
    quote: bytes, collateral: Collateral, where: str, offsets: tuple[int, ...], expected_check: str
):
    for offset in offsets:
        failed = rejected(flip(quote, offset), collateral, NOW_UPTODATE)
        assert expected_check in failed, (where, offset, failed)


def test_tampered_quote_is_rejected_at_any_offset(quote: bytes, collateral: Collateral):
    for offset in range(0, len(quote), 17):
        rejected(flip(quote, offset), collateral, NOW_UPTODATE)
    length_fields = (SIG_LEN_AT, ATT_KEY_AT + 64, ATT_KEY_AT + 66, QE_SIG_AT + 64)
    for offset in (*length_fields, PCK_CERT_TYPE_AT, PCK_CERT_TYPE_AT + 2, len(quote) - 1):
        rejected(flip(quote, offset), collateral, NOW_UPTODATE)


def test_pem_trailing_nul_and_padding_bits(quote: bytes, collateral: Collateral):
    # The chain's last base64 quantum "qI=" has two unused low bits: "qJ=" decodes to the same
    # DER, so only the canonical-encoding rule can catch it.
    end = PEM_AT + 3678
    pem = quote[PEM_AT:end]
    last_b64 = pem.rindex(b"qI=")
    altered = quote[: PEM_AT + last_b64] + b"qJ=" + quote[PEM_AT + last_b64 + 3 :]
    assert "pck_chain" in rejected(altered, collateral, NOW_UPTODATE)
    assert quote[end - 1] == 0
    assert "pck_chain" in rejected(quote[: end - 1] + b"\n" + quote[end:], collateral, NOW_UPTODATE)


def test_debug_td_is_refused(quote: bytes, collateral: Collateral):
    failed = rejected(flip(quote, HEADER + 120), collateral, NOW_UPTODATE)
    assert "td_attributes" in failed


# ---------------------------------------------------------------------------- collateral tampering


def _flip_text(text: str, index: int) -> str:
    raw = text.encode()
    return flip(raw, index).decode()


def _der_chain_flip(pem: str, cert_index: int, byte_index: int) -> str:
    certs = x509.load_pem_x509_certificates(pem.encode())
    der = certs[cert_index].public_bytes(Encoding.DER)
    tampered = flip(der, byte_index)
    parts = [c.public_bytes(Encoding.PEM) for c in certs]
    body = "\n".join(textwrap.wrap(base64.b64encode(tampered).decode(), 64))
    parts[cert_index] = f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n".encode()
    return b"".join(parts).decode()


@pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")  # cryptography on bad names
@pytest.mark.parametrize(
    "field",
    [
        "tcb_info",
        "qe_identity",
        "tcb_info_signature",
        "qe_identity_signature",
        "pck_crl",
        "root_ca_crl",
    ],
)
def test_tampered_collateral_field_is_rejected(quote: bytes, collateral: Collateral, field: str):
    value = getattr(collateral, field)
    stride = max(1, len(value) // 60)
    for index in [*range(0, len(value), stride), len(value) - 1]:
        tampered = _flip_text(value, index) if isinstance(value, str) else flip(value, index)
        rejected(quote, dataclasses.replace(collateral, **{field: tampered}), NOW_UPTODATE)


@pytest.mark.parametrize(
    "field", ["pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"]
)
def test_tampered_issuer_chain_is_rejected(quote: bytes, collateral: Collateral, field: str):
    pem: str = getattr(collateral, field)
    for cert_index in (0, 1):
        for byte_index in (4, 150, 300, 400, 600):
            tampered = _der_chain_flip(pem, cert_index, byte_index)
            rejected(quote, dataclasses.replace(collateral, **{field: tampered}), NOW_UPTODATE)
    for index in range(0, len(pem), 97):
        tampered = _flip_text(pem, index)
        rejected(quote, dataclasses.replace(collateral, **{field: tampered}), NOW_UPTODATE)


def test_reserialised_tcb_info_is_rejected(quote: bytes, collateral: Collateral):
    """The trap: json.dumps of the same content is different bytes, so the signature fails."""
    same_content = json.dumps(json.loads(collateral.tcb_info))
    assert same_content != collateral.tcb_info
    failed = rejected(quote, dataclasses.replace(collateral, tcb_info=same_content), NOW_UPTODATE)
    assert "tcb_info_signature" in failed


def test_crl_of_another_issuer_is_rejected(quote: bytes, collateral: Collateral):
    swapped = dataclasses.replace(collateral, pck_crl=collateral.root_ca_crl)
    assert "pck_crl" in rejected(quote, swapped, NOW_UPTODATE)
    swapped = dataclasses.replace(collateral, root_ca_crl=collateral.pck_crl)
    assert "root_ca_crl" in rejected(quote, swapped, NOW_UPTODATE)


def test_qe_identity_in_place_of_tcb_info_is_rejected(quote: bytes, collateral: Collateral):
    swapped = dataclasses.replace(
        collateral,
        tcb_info=collateral.qe_identity,
        tcb_info_signature=collateral.qe_identity_signature,
    )
    assert "tcb_info" in rejected(quote, swapped, NOW_UPTODATE)


# ---------------------------------------------------------------------------- collateral loading


def _collateral_json() -> dict[str, str]:
    return json.loads(vector("tdx_quote_collateral.json").read_text())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("pck_crl"), "lacks"),
        (lambda d: d.update(pck_certificate_chain="x"), "unsupported field"),
        (lambda d: d.update(pck_crl="zz"), "hex"),
        (lambda d: d.update(pck_crl="abc"), "hex"),
        (lambda d: d.update(tcb_info_signature="00" * 63), "64 bytes"),
        (lambda d: d.update(tcb_info=7), "string"),
    ],
)
def test_collateral_loader_is_strict(mutate, message: str):
    data = _collateral_json()
    mutate(data)
    with pytest.raises(dcap.CollateralFormatError, match=message):
        dcap.parse_collateral(json.dumps(data))


def test_collateral_loader_rejects_non_json_and_duplicates():
    with pytest.raises(dcap.CollateralFormatError, match="not valid JSON"):
        dcap.parse_collateral(b"\xff\xfe not json")
    with pytest.raises(dcap.CollateralFormatError, match="duplicate"):
        dcap.parse_collateral('{"a": 1, "a": 2}')
    with pytest.raises(dcap.CollateralFormatError, match="object"):
        dcap.parse_collateral("[]")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(id="SGX"), "id"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d["tcbLevels"][0]["tcb"]["sgxtcbcomponents"].pop(), "16 entries"),
        (lambda d: d["tcbLevels"][0].update(tcbStatus="Fine"), "unrecognised"),
        (lambda d: d.update(issueDate="2025-06-19"), "timestamp"),
        (lambda d: d.update(tcbLevels=[]), "no tcbLevels"),
    ],
)
def test_tcb_info_parser_is_strict(collateral: Collateral, mutate, message: str):
    doc = json.loads(collateral.tcb_info)
    mutate(doc)
    with pytest.raises(dcap.CollateralFormatError, match=message):
        dcap.parse_tcb_info(json.dumps(doc))


def test_pck_extension_values(quote: bytes):
    parsed = parse_quote(quote)
    pem = parsed.certification.pck_chain_pem.rstrip(b"\0")
    info = dcap.parse_pck_extension(x509.load_pem_x509_certificates(pem)[0])
    assert info.fmspc == bytes.fromhex("B0C06F000000")
    assert info.pce_id == b"\0\0"
    assert info.pce_svn == 11
    assert info.sgx_components == tuple(info.cpu_svn)


# The PPID field of the SGX extension, DER: SEQUENCE { OID 1.2.840.113741.1.13.1.1, OCTET STRING
# (16) }. Found by its exact bytes, not by the verifier's DER walk, so the two agree by evidence.
_PPID_FIELD = bytes.fromhex("301e060a2a864886f84d010d01010410")


def _ppid_from_certificate(cert: x509.Certificate) -> bytes:
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.2.840.113741.1.13.1"))
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    der = ext.value.value
    at = der.find(_PPID_FIELD)
    assert at > 0 and der.find(_PPID_FIELD, at + 1) == -1
    return der[at + len(_PPID_FIELD) : at + len(_PPID_FIELD) + 16]


@pytest.mark.parametrize("name", ["tdx_quote", "tdx_quote_outdated", "quote-from-tappd.hex"])
def test_ppid_and_device_id_of_the_real_quotes(name: str):
    parsed = parse_quote(decode_quote_input(vector(name).read_bytes()))
    pem = parsed.certification.pck_chain_pem.rstrip(b"\0")
    cert = x509.load_pem_x509_certificates(pem)[0]
    expected = _ppid_from_certificate(cert)
    info = dcap.parse_pck_extension(cert)
    assert info.ppid == expected and any(expected)
    assert info.device_id == hashlib.sha256(expected).digest()


def test_verification_report_shows_the_device_id(quote: bytes, collateral: Collateral):
    report = dcap.verify_quote(quote, collateral, NOW_UPTODATE)
    assert report.pck is not None
    platform = report.to_dict()["platform"]
    assert platform["ppid"] == report.pck.ppid.hex()
    assert platform["device_id"] == hashlib.sha256(report.pck.ppid).hexdigest()


# ---------------------------------------------------------------------------- TCB evaluation logic


def _td_report(svn: list[int], svn2: list[int] | None = None) -> TdReport:
    pad = [0] * 16
    return TdReport(
        tee_tcb_svn=bytes((svn + pad)[:16]),
        mr_seam=bytes(48),
        mr_signer_seam=bytes(48),
        seam_attributes=bytes(8),
        td_attributes=bytes(8),
        xfam=bytes(8),
        mr_td=bytes(48),
        mr_config_id=bytes(48),
        mr_owner=bytes(48),
        mr_owner_config=bytes(48),
        rtmrs=(bytes(48),) * 4,
        report_data=bytes(64),
        tee_tcb_svn2=None if svn2 is None else bytes((svn2 + pad)[:16]),
        mr_servicetd=None if svn2 is None else bytes(48),
    )


def _level(sgx: list[int], tdx: list[int], status: str, *advisories: str, pce: int = 0) -> TcbLevel:
    pad = [0] * 16
    return TcbLevel(tuple((sgx + pad)[:16]), pce, tuple((tdx + pad)[:16]), status, advisories)


def _pck(sgx: list[int], pce_svn: int = 0) -> PckInfo:
    comps = tuple((sgx + [0] * 16)[:16])
    return PckInfo(b"\0" * 6, b"\0\0", pce_svn, bytes(comps), comps, bytes(16))


def _module(ident: str, *levels: IdentityLevel) -> TdxModuleIdentity:
    return TdxModuleIdentity(ident, bytes(48), bytes(8), levels)


def _tcb_info(levels: list[TcbLevel], identities: list[TdxModuleIdentity] = ()) -> TcbInfo:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    ordered = sorted(
        levels, key=lambda lv: (lv.sgx_components, lv.pce_svn, lv.tdx_components), reverse=True
    )
    return TcbInfo(now, now, b"\0" * 6, b"\0\0", 1, _module(""), tuple(identities), tuple(ordered))


UP = IdentityLevel(0, "UpToDate", ())


def test_component_wise_comparison_not_one_number():
    levels = [_level([2, 2, 2, 2, 3, 1, 0, 5], [], "UpToDate")]
    platform = _pck([3, 3, 2, 2, 4, 1, 0, 3])  # larger as a number, lower in component 7
    with pytest.raises(AttestationError, match="no matching TCB level"):
        dcap.match_tcb_levels(levels, platform, _td_report([]).tee_tcb_svn)


def test_best_level_met_gives_status_and_advisories():
    info = _tcb_info(
        [
            _level([5], [], "UpToDate"),
            _level([3], [], "OutOfDate", "INTEL-SA-1"),
            _level([1], [], "OutOfDate", "INTEL-SA-1", "INTEL-SA-2"),
        ]
    )
    verdict = dcap.evaluate_tcb(info, _pck([4]), _td_report([]), (info.tdx_module, None), UP)
    assert (verdict.status, verdict.advisory_ids) == ("OutOfDate", ("INTEL-SA-1",))


def test_pcesvn_below_level_skips_it():
    info = _tcb_info([_level([1], [], "UpToDate", pce=10), _level([1], [], "OutOfDate", pce=5)])
    verdict = dcap.evaluate_tcb(info, _pck([1], 9), _td_report([]), (info.tdx_module, None), UP)
    assert verdict.status == "OutOfDate"


def test_tdx_module_svns_are_skipped_when_module_major_is_set():
    levels = [_level([], [5, 0, 2], "UpToDate")]
    sgx, tdx = dcap.match_tcb_levels(levels, _pck([]), _td_report([3, 1, 2]).tee_tcb_svn)
    assert sgx is tdx is levels[0]
    with pytest.raises(AttestationError, match="TEE_TCB_SVN"):
        dcap.match_tcb_levels(levels, _pck([]), _td_report([3, 0, 2]).tee_tcb_svn)


@pytest.mark.parametrize(
    ("platform", "component", "expected"),
    [
        ("UpToDate", "OutOfDate", "OutOfDate"),
        ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
        ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("OutOfDate", "UpToDate", "OutOfDate"),
        ("UpToDate", "Revoked", "Revoked"),
        ("SWHardeningNeeded", "UpToDate", "SWHardeningNeeded"),
    ],
)
def test_status_convergence(platform: str, component: str, expected: str):
    assert dcap.converge(platform, component) == expected


def test_module_and_qe_statuses_fold_in_with_advisories():
    module = _module(
        "TDX_01", IdentityLevel(6, "UpToDate", ()), IdentityLevel(4, "OutOfDate", ("INTEL-SA-M",))
    )
    info = _tcb_info([_level([], [], "UpToDate")], [module])
    report = _td_report([4, 1])
    matched = dcap.match_module(info, report)
    assert matched == (module, module.levels[1])
    qe = IdentityLevel(4, "OutOfDate", ("INTEL-SA-Q",))
    verdict = dcap.evaluate_tcb(info, _pck([]), report, matched, qe)
    assert verdict.status == "OutOfDate"
    assert (verdict.platform_status, verdict.module_status, verdict.qe_status) == (
        "UpToDate",
        "OutOfDate",
        "OutOfDate",
    )
    assert verdict.advisory_ids == ("INTEL-SA-M", "INTEL-SA-Q")


def test_revoked_anywhere_fails():
    info = _tcb_info([_level([], [], "UpToDate")])
    with pytest.raises(AttestationError, match="Revoked"):
        dcap.evaluate_tcb(
            info, _pck([]), _td_report([]), (info.tdx_module, None), IdentityLevel(0, "Revoked", ())
        )
    info = _tcb_info([_level([], [], "Revoked")])
    with pytest.raises(AttestationError, match="Revoked"):
        dcap.evaluate_tcb(info, _pck([]), _td_report([]), (info.tdx_module, None), UP)


def test_td15_relaunch_advised_when_host_already_has_the_fix():
    module = _module("TDX_01", IdentityLevel(6, "UpToDate", ()), IdentityLevel(4, "OutOfDate", ()))
    info = _tcb_info(
        [_level([], [0, 0, 3], "UpToDate"), _level([], [0, 0, 2], "OutOfDate")], [module]
    )

    def status(svn2: list[int], qe: IdentityLevel = UP) -> str:
        report = _td_report([4, 1, 2], svn2)
        return dcap.evaluate_tcb(info, _pck([]), report, dcap.match_module(info, report), qe).status

    assert status([6, 1, 3]) == dcap.RELAUNCH_ADVISED
    assert status([5, 1, 3]) == "OutOfDate"  # the host's module is not the newest either
    assert status([6, 1, 2]) == "OutOfDate"
    assert status([6, 1, 3], IdentityLevel(0, "OutOfDate", ())) == "OutOfDate"


def test_module_identity_mismatches_fail():
    info = _tcb_info([_level([], [], "UpToDate")], [_module("TDX_01", UP)])
    with pytest.raises(AttestationError, match="TDX_02"):
        dcap.match_module(info, _td_report([1, 2]))
    wrong_signer = dataclasses.replace(_td_report([1, 1]), mr_signer_seam=b"\1" * 48)
    with pytest.raises(AttestationError, match="MRSIGNERSEAM"):
        dcap.match_module(info, wrong_signer)
    odd_attributes = dataclasses.replace(_td_report([1, 1]), seam_attributes=b"\1" + bytes(7))
    with pytest.raises(AttestationError, match="SEAMATTRIBUTES"):
        dcap.match_module(info, odd_attributes)
    module = _module("TDX_01", IdentityLevel(5, "UpToDate", ()))
    low = _tcb_info([_level([], [], "UpToDate")], [module])
    with pytest.raises(AttestationError, match="below every TCB level"):
        dcap.match_module(low, _td_report([4, 1]))


def test_qe_identity_match(quote: bytes, collateral: Collateral):
    identity = dcap.parse_qe_identity(collateral.qe_identity)
    qe = parse_quote(quote).certification.qe_report
    assert dcap.match_qe(identity, qe).status == "UpToDate"
    debug = dataclasses.replace(qe, attributes=bytes([qe.attributes[0] | 0x02]) + qe.attributes[1:])
    with pytest.raises(AttestationError, match="ATTRIBUTES"):
        dcap.match_qe(identity, debug)
    with pytest.raises(AttestationError, match="below every QE TCB level"):
        dcap.match_qe(identity, dataclasses.replace(qe, isv_svn=1))
    with pytest.raises(AttestationError, match="MRSIGNER"):
        dcap.match_qe(identity, dataclasses.replace(qe, mr_signer=bytes(32)))


# ---------------------------------------------------------------------------- Intel's exact rules
# Collateral edited here cannot be re-signed (Intel's key), so these feed the parsers and the
# evaluation functions directly, as verify_quote does once a signature has verified.


def _edited(text: str, mutate) -> str:
    doc = json.loads(text)
    mutate(doc)
    return json.dumps(doc)


def _level_date(levels: list[dict], value: str) -> None:
    levels[0]["tcbDate"] = value


IMPOSSIBLE_TIMES = [
    "2025-02-30T00:00:00Z",
    "2025-01-01T24:00:00Z",
    "2025-01-01T00:00:60Z",
    "0000-01-01T00:00:00Z",
    "٢٠٢٥-01-01T00:00:00Z",
]


@pytest.mark.parametrize("value", IMPOSSIBLE_TIMES)
@pytest.mark.parametrize(
    ("document", "place"),
    [
        ("tcb_info", lambda d, v: d.update(issueDate=v)),
        ("tcb_info", lambda d, v: d.update(nextUpdate=v)),
        ("tcb_info", lambda d, v: _level_date(d["tcbLevels"], v)),
        ("tcb_info", lambda d, v: _level_date(d["tdxModuleIdentities"][1]["tcbLevels"], v)),
        ("qe_identity", lambda d, v: d.update(issueDate=v)),
        ("qe_identity", lambda d, v: _level_date(d["tcbLevels"], v)),
    ],
)
def test_impossible_collateral_times_are_format_errors(
    collateral: Collateral, document: str, place, value: str
):
    """Dates that match the pattern but do not exist were a ValueError escaping the parser."""
    parse = dcap.parse_tcb_info if document == "tcb_info" else dcap.parse_qe_identity
    text = _edited(getattr(collateral, document), lambda d: place(d, value))
    with pytest.raises(dcap.CollateralFormatError, match="not a UTC timestamp"):
        parse(text)


def test_qe_levels_are_walked_in_document_order(quote: bytes, collateral: Collateral):
    """Intel's QVL takes the first QE level the ISVSVN meets, in document order, unsorted."""
    out_of_order = _edited(
        collateral.qe_identity,
        lambda d: d["tcbLevels"].insert(
            0,
            {
                "tcb": {"isvsvn": 2},
                "tcbDate": "2023-01-01T00:00:00Z",
                "tcbStatus": "OutOfDate",
                "advisoryIDs": ["INTEL-SA-00000"],
            },
        ),
    )
    identity = dcap.parse_qe_identity(out_of_order)
    assert [lv.isv_svn for lv in identity.levels] == [2, 4]
    qe = parse_quote(quote).certification.qe_report
    assert qe.isv_svn == 6
    level = dcap.match_qe(identity, qe)
    assert (level.status, level.advisory_ids) == ("OutOfDate", ("INTEL-SA-00000",))
    info = dcap.parse_tcb_info(collateral.tcb_info)
    report = parse_quote(quote).report
    pck = dcap.parse_pck_extension(
        x509.load_pem_x509_certificates(parse_quote(quote).certification.pck_chain_pem[:-1])[0]
    )
    verdict = dcap.evaluate_tcb(info, pck, report, dcap.match_module(info, report), level)
    assert (verdict.status, verdict.qe_status) == ("OutOfDate", "OutOfDate")


def _swap_first_two(levels: list) -> None:
    levels[0], levels[1] = levels[1], levels[0]


def _module_levels(d: dict) -> list:
    return next(m for m in d["tdxModuleIdentities"] if m["id"] == "TDX_01")["tcbLevels"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: _swap_first_two(d["tcbLevels"]), "TCB info tcbLevels are not ordered best"),
        (lambda d: d["tcbLevels"].append(d["tcbLevels"][0]), "TCB info has duplicated"),
        # Same components, another status: still the same level to Intel's QVL.
        (
            lambda d: d["tcbLevels"].append({**d["tcbLevels"][0], "tcbStatus": "OutOfDate"}),
            "TCB info has duplicated",
        ),
        (lambda d: d["tcbLevels"][1].pop("tcbDate"), "lacks tcbDate"),
        (lambda d: _swap_first_two(_module_levels(d)), "TDX module TDX_01 tcbLevels are not"),
        (lambda d: _module_levels(d).append(_module_levels(d)[0]), "TDX_01 has duplicated"),
        (lambda d: _module_levels(d)[0].pop("tcbDate"), "lacks tcbDate"),
    ],
)
def test_tcb_levels_intel_refuses_are_refused(collateral: Collateral, mutate, message: str):
    with pytest.raises(dcap.CollateralFormatError, match=message):
        dcap.parse_tcb_info(_edited(collateral.tcb_info, mutate))


def test_qe_level_without_tcb_date_is_refused(collateral: Collateral):
    text = _edited(collateral.qe_identity, lambda d: d["tcbLevels"][0].pop("tcbDate"))
    with pytest.raises(dcap.CollateralFormatError, match="lacks tcbDate"):
        dcap.parse_qe_identity(text)


@pytest.mark.parametrize(
    ("seam", "identity_attributes", "mask"),
    [
        ("0100000000000000", "0100000000000000", "FFFFFFFFFFFFFFFF"),
        ("0000000000000080", "0000000000000000", "0000000000000000"),
        ("0000000000000000", "0100000000000000", "0000000000000000"),
    ],
)
def test_seam_attributes_must_be_zero_whatever_the_identity_says(
    quote: bytes, collateral: Collateral, seam: str, identity_attributes: str, mask: str
):
    """Intel's QVL wants SEAMATTRIBUTES zero and equal to the identity's, unmasked: an identity
    naming non-zero attributes does not make them acceptable."""

    def edit(d: dict) -> None:
        for module in [d["tdxModule"], *d["tdxModuleIdentities"]]:
            module.update(attributesMask=mask, attributes=identity_attributes)

    info = dcap.parse_tcb_info(_edited(collateral.tcb_info, edit))
    report = dataclasses.replace(parse_quote(quote).report, seam_attributes=bytes.fromhex(seam))
    with pytest.raises(AttestationError, match="SEAMATTRIBUTES"):
        dcap.match_module(info, report)
