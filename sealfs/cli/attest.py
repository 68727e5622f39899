"""``sealfs attest``: check TDX attestation evidence the way the KMS does."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from sealfs.attest.dcap import (
    Collateral,
    VerificationFailed,
    VerificationReport,
    load_collateral,
    verify_quote,
)
from sealfs.attest.eventlog import RTMR_SIZE, extend, load_runtime_log
from sealfs.attest.quote import MAX_QUOTE_LEN, decode_quote_input
from sealfs.cli.exit_codes import fail_with
from sealfs.cli.output import SealfsGroup, emit, json_option
from sealfs.errors import AttestationError, UsageError

_MEASUREMENTS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data")


@click.group(cls=SealfsGroup)
def attest() -> None:
    """Verify Intel TDX attestation evidence.

    These commands run the same verifier the KMS uses before it releases a key, so an
    operator can see exactly why a CVM was accepted or refused.
    """


@attest.command("replay-log")
@click.argument("log_path", metavar="FILE", type=click.Path(path_type=Path, dir_okay=False))
@json_option
def replay_log(log_path: Path, as_json: bool) -> None:
    """Replay a runtime event log and print each event and the resulting RTMR3.

    FILE holds one JSON object per line, {"event": NAME, "payload": BASE64, "version": 1}
    (dstack's runtime_events.log, and what `sealfs init up` appends). Each event is extended
    into RTMR3 as SHA-384(u32le(0x08000001) || ":" || NAME || ":" || PAYLOAD), starting from
    48 zero bytes. Compare the final RTMR3 with the quote's (e.g. `sealfs attest verify`):
    only a log that reproduces it says what the CVM measured. The KMS replays the log it is
    sent the same way before it releases a key. Payloads that are printable text (the JSON of
    a `sealfs-volume` event) are shown as text, others as hex.
    """
    if not log_path.exists():
        raise UsageError(f"{log_path} does not exist")
    rtmr = bytes(RTMR_SIZE)
    rows = []
    for event in load_runtime_log(log_path):
        rtmr = extend(rtmr, event.digest())
        rows.append(
            {
                "event": event.name,
                "payload_hex": event.payload.hex(),
                "payload_text": _printable(event.payload),
                "digest": event.digest().hex(),
                "rtmr3": rtmr.hex(),
            }
        )
    lines = [
        f"{i:3} {r['event']:<16} {r['payload_text'] if r['payload_text'] is not None else r['payload_hex']}"
        for i, r in enumerate(rows)
    ]
    lines.append(f"RTMR3 {rtmr.hex()}  ({len(rows)} event(s))")
    emit({"ok": True, "events": rows, "rtmr3": rtmr.hex()}, as_json, "\n".join(lines))


def _printable(payload: bytes) -> str | None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


@attest.command("verify")
@click.argument("quote_path", metavar="QUOTE", type=click.Path(path_type=Path))
@click.option(
    "--collateral",
    "collateral_path",
    metavar="FILE",
    type=click.Path(path_type=Path),
    help="Intel collateral for the quote's platform, as JSON: tcb_info, qe_identity "
    "(each with signature and issuer chain), pck_crl, root_ca_crl, "
    "pck_crl_issuer_chain. Without it only the quote's own signatures and PCK "
    "chain are checked, and the command fails.",
)
@click.option(
    "--now",
    "now_text",
    metavar="TIME",
    help="Verify as of TIME, an ISO 8601 time with a zone (2025-07-01T12:00:00Z). "
    "Default: the current time.",
)
@json_option
def verify(
    quote_path: Path, collateral_path: Path | None, now_text: str | None, as_json: bool
) -> None:
    """Verify a TDX quote (version 4 or 5) offline with DCAP collateral.

    QUOTE is a file holding the quote as raw bytes or as hex text. Nothing is fetched from the
    network: every certificate, CRL and TCB document comes from --collateral and is checked
    against the Intel SGX Root CA built into sealfs, at the time given by --now.

    \b
    Checks, in order:
      quote_header           version, ECDSA-P256 key, TDX, Intel QE
      td_attributes          the TD is not a debug TD
      quote_signature        attestation key signed the header and TD report
      qe_report_binding      QE report commits to the attestation key
      pck_chain              PCK certificate -> PCK CA -> Intel SGX Root CA
      qe_report_signature    PCK key signed the QE report
      root_ca_crl, pck_crl   CRLs authentic and current
      pck_not_revoked        PCK certificate and its CA not revoked
      tcb_info_signature     TCB info signed by Intel SGX TCB Signing
      tcb_info               TCB info is for this FMSPC / PCE-ID, current
      qe_identity_signature  QE identity signed by Intel SGX TCB Signing
      qe_identity            QE report matches Intel's TD QE; QE TCB level
      tdx_module             TDX module signer, attributes and TCB level
      tcb_status             platform TCB level; combined status
    Every certificate, CRL, TCB info and QE identity must be valid at --now
    (both ends inclusive).

    The output lists MRTD, RTMR0-3 and report_data, every check with its result, and the TCB
    status (UpToDate, SWHardeningNeeded, ConfigurationNeeded, OutOfDate, ...) with any Intel
    advisory ids. Whether a status other than UpToDate is acceptable is a policy decision
    left to the KMS; Revoked and "no matching TCB level" are failures here.

    With --json, stdout is one JSON object: "ok", "measurements", "checks", "platform",
    "tcb", "valid_from"/"valid_until" (the window in which all the evidence is valid), and on
    failure "error" and "message" as well.

    \b
    Exit status: 0 verified; 9 verification failed or the quote or collateral is
    malformed; 2 bad usage (unreadable file, bad --now).

    \b
    Examples:
      sealfs attest verify quote.bin --collateral collateral.json
      sealfs attest verify quote.hex --collateral collateral.json \\
          --now 2025-07-01T00:00:00Z --json
    """
    now = _parse_now(now_text)
    quote = decode_quote_input(_read_quote(quote_path))
    collateral: Collateral | None = None
    if collateral_path is not None:
        try:
            collateral = load_collateral(collateral_path)
        except OSError as e:
            raise _unreadable("collateral", collateral_path, e) from None
    try:
        report = verify_quote(quote, collateral, now)
    except VerificationFailed as failure:
        if as_json:
            emit(
                {**failure.report.to_dict(), "error": failure.kind, "message": failure.message},
                True,
                "",
            )
            fail_with(type(failure))
        click.echo(_human(failure.report))
        raise
    emit(report.to_dict(), as_json, _human(report))


def _parse_now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is not None:
            return moment.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: a valid time whose UTC is year 10000
        pass
    raise UsageError(
        f"--now {text!r}: expected an ISO 8601 time with a zone, between years 1 and 9999 "
        "in UTC, e.g. 2025-07-01T12:00:00Z"
    )


def _read_quote(path: Path) -> bytes:
    """Read the quote file, refusing (not loading) one too large to be a quote, even in hex."""
    limit = 4 * MAX_QUOTE_LEN
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise _unreadable("quote", path, e) from None
    if len(data) > limit:
        raise AttestationError(f"quote file {path} is larger than {limit} bytes")
    return data


def _unreadable(what: str, path: Path, error: OSError) -> UsageError:
    return UsageError(f"cannot read {what} file {path}: {error.strerror or error}")


def _human(report: VerificationReport) -> str:
    data = report.to_dict()
    quote = data["quote"]
    lines = [f"Quote: version {quote['version']}, {quote['body']} body"]
    lines += [f"  {name:<12} {data['measurements'][name]}" for name in _MEASUREMENTS]
    if report.pck is not None:
        platform = data["platform"]
        lines.append(
            f"Platform: FMSPC {platform['fmspc']}, PCESVN {platform['pce_svn']}, "
            f"TDX module SVN {report.quote.report.tee_tcb_svn[0]}, QE SVN {quote['qe_svn']}"
        )
        lines.append(f"Device id: {platform['device_id']} (SHA-256 of PPID {platform['ppid']})")
    lines.append(f"Checks at {data['now']}:")
    width = max(len(c.name) for c in report.checks)
    lines += [
        f"  {'ok' if c.passed else 'FAIL':<4}  {c.name:<{width}}  {c.detail}" for c in report.checks
    ]
    tcb = report.tcb
    if tcb is not None:
        module = f"TDX module {tcb.module_id} " if tcb.module_id else "TDX module "
        lines.append(
            f"TCB status: {tcb.status} (platform {tcb.platform_status}, "
            f"{module}{tcb.module_status}, QE {tcb.qe_status})"
        )
        lines.append(f"Advisories: {', '.join(tcb.advisory_ids) or 'none'}")
    else:
        lines.append("TCB status: not established")
    if data["valid_from"] and data["valid_until"]:
        lines.append(f"Evidence valid: {data['valid_from']} .. {data['valid_until']}")
    lines.append(f"Result: {'VERIFIED' if report.ok else 'FAILED'}")
    return "\n".join(lines)
