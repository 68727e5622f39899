"""Quote verification for the KMS, one interface over the two TEE kinds.

``tdx``: :func:`sealfs.attest.dcap.verify_quote` (quote signature, QE report, PCK chain to the
Intel root, CRLs, TCB info and QE identity signatures, collateral validity at ``now``, TCB
level). It fails closed (raises unless every check passed and a TCB status was established);
this module only parses the collateral the request carried and maps the result to a
:class:`QuoteReport`.

``simulated``: :func:`sealfs.attest.simulated.verify_quote`, only if the operator started the
KMS with ``--allow-simulated``.

Either way the caller gets a :class:`QuoteReport`, or AttestationError with a one-line reason.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sealfs.attest import simulated
from sealfs.errors import AttestationError

MR_SIZE = 48


@dataclass(frozen=True)
class QuoteReport:
    """What a verified quote proves, whichever TEE kind produced it."""

    tee: str
    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tcb_status: str
    td_attributes: bytes
    mr_servicetd: bytes | None  # None for a TD 1.0 quote (no such field)
    device_id: bytes  # the host: SHA-256 of the PCK certificate's PPID (simulated: as given)


def verify_tdx(quote: bytes, collateral: dict[str, Any] | None, now: float) -> QuoteReport:
    """Verify a TDX quote with DCAP collateral (the JSON object) at Unix time ``now``."""
    try:
        dcap = importlib.import_module("sealfs.attest.dcap")
    except ImportError:
        raise AttestationError(
            "TDX quote verification (sealfs.attest.dcap) is not available in this build"
        ) from None
    if collateral is None:
        raise AttestationError(
            "TDX quote needs DCAP collateral (send it, or start the KMS with --collateral)"
        )
    try:
        # tcb_info / qe_identity are JSON strings inside the object; re-encoding the outer
        # object leaves their exact (signed) text intact.
        parsed = dcap.parse_collateral(json.dumps(collateral))
        report = dcap.verify_quote(quote, parsed, dt.datetime.fromtimestamp(now, dt.UTC))
    except AttestationError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        # A verifier that lets a parsing error escape still means "not verified".
        raise AttestationError(f"TDX quote verification failed: {type(e).__name__}") from None
    td = report.quote.report
    if report.tcb is None or report.pck is None:  # never so once verified; fail closed anyway
        raise AttestationError("DCAP verification established no TCB status or platform")
    return QuoteReport(
        tee="tdx",
        mrtd=td.mr_td,
        rtmr0=td.rtmrs[0],
        rtmr1=td.rtmrs[1],
        rtmr2=td.rtmrs[2],
        rtmr3=td.rtmrs[3],
        report_data=td.report_data,
        tcb_status=report.tcb.status,
        td_attributes=td.td_attributes,
        mr_servicetd=td.mr_servicetd,
        device_id=report.pck.device_id,
    )


def verify_simulated(
    quote: bytes, collateral: Any, now: float, trusted_keys: Sequence[bytes]
) -> QuoteReport:
    """Verify a simulated quote (only call when simulated TEEs are explicitly allowed)."""
    rep = simulated.verify_quote(quote, collateral, now, trusted_keys)
    return QuoteReport(
        tee="simulated",
        mrtd=rep.mrtd,
        rtmr0=rep.rtmr0,
        rtmr1=rep.rtmr1,
        rtmr2=rep.rtmr2,
        rtmr3=rep.rtmr3,
        report_data=rep.report_data,
        tcb_status=rep.tcb_status,
        td_attributes=rep.td_attributes,
        mr_servicetd=rep.mr_servicetd,
        device_id=rep.device_id,
    )
