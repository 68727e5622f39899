"""TDX quotes from the Linux configfs-tsm interface (``/sys/kernel/config/tsm/report``).

Protocol (Documentation/ABI/testing/configfs-tsm): make a fresh report directory, check its
``provider`` is ``tdx_guest``, read ``generation``, write the 64-byte report_data to ``inblob``,
read the quote from ``outblob``, read ``generation`` again and require exactly one write (ours)
in between, so another process in the CVM cannot swap the report_data under us; then remove
the directory. One directory per request means concurrent callers never share state.

The quote's RTMR values are the real ones; the runtime event log that explains RTMR3 is read
from the runtime log file (dstack's path by default). Collateral for DCAP verification is not
fetched over the network here: give a file (e.g. from a PCCS) with ``collateral_path``.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from sealfs import strict
from sealfs.attest.eventlog import DEFAULT_RUNTIME_LOG, RuntimeEvent, load_runtime_log
from sealfs.attest.quote import parse_quote
from sealfs.errors import AttestationError

log = logging.getLogger("sealfs.attest")

DEFAULT_ROOT = "/sys/kernel/config/tsm/report"
REPORT_DATA_SIZE = 64
MAX_QUOTE_SIZE = 64 * 1024
MAX_COLLATERAL_SIZE = 256 * 1024


class ConfigfsTsmAttester:
    """Quotes from this TDX guest's configfs-tsm, plus its runtime event log."""

    kind = "tdx"

    def __init__(
        self,
        root: str | os.PathLike[str] = DEFAULT_ROOT,
        *,
        event_log_path: str | os.PathLike[str] = DEFAULT_RUNTIME_LOG,
        collateral_path: str | os.PathLike[str] | None = None,
        attribute_wait_s: float = 2.0,
    ) -> None:
        self.root = Path(root)
        self.event_log_path = Path(event_log_path)
        self.collateral_path = Path(collateral_path) if collateral_path else None
        self._attribute_wait_s = attribute_wait_s

    def __repr__(self) -> str:
        return f"<ConfigfsTsmAttester root={self.root}>"

    def quote(self, report_data: bytes) -> bytes:
        """A TDX quote whose report_data is exactly ``report_data`` (64 bytes)."""
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError("report_data is 64 bytes")
        if not self.root.is_dir():
            raise AttestationError(
                f"configfs-tsm not available at {self.root} "
                "(not a TDX guest, or configfs not mounted)"
            )
        entry = self.root / f"sealfs-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            entry.mkdir(mode=0o700)
        except OSError as e:
            raise AttestationError(f"cannot create configfs-tsm report: {e.strerror}") from None
        try:
            return self._quote_in(entry, report_data)
        finally:
            try:
                entry.rmdir()
            except OSError as e:
                log.warning("could not remove configfs-tsm report %s: %s", entry.name, e.strerror)

    def _quote_in(self, entry: Path, report_data: bytes) -> bytes:
        provider = self._read_attr(entry / "provider", wait=True).strip()
        if provider != b"tdx_guest":
            raise AttestationError(f"configfs-tsm provider is {provider[:32]!r}, not tdx_guest")
        before = self._generation(entry)
        try:
            (entry / "inblob").write_bytes(report_data)
            quote = self._read_attr(entry / "outblob")
        except OSError as e:
            raise AttestationError(f"configfs-tsm quote generation failed: {e.strerror}") from None
        after = self._generation(entry)
        if after != before + 1:
            raise AttestationError("configfs-tsm report was modified concurrently; retry")
        if not 0 < len(quote) <= MAX_QUOTE_SIZE:
            raise AttestationError("configfs-tsm returned an empty or oversized quote")
        # A local sanity check only (the KMS verifies the quote with DCAP): the structure must
        # parse and carry our report_data, or something between us and the TDX module is off.
        if parse_quote(quote).report.report_data != report_data:
            raise AttestationError("configfs-tsm quote does not carry the requested report_data")
        return quote

    def _read_attr(self, path: Path, wait: bool = False) -> bytes:
        # Attributes exist as soon as the directory does in real configfs; waiting briefly
        # also covers user-space imitations that populate the directory asynchronously.
        deadline = time.monotonic() + (self._attribute_wait_s if wait else 0)
        while True:
            try:
                with open(path, "rb") as f:
                    return f.read(MAX_QUOTE_SIZE + 1)
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise AttestationError(f"configfs-tsm attribute {path.name} missing") from None
                time.sleep(0.005)
            except OSError as e:
                if e.errno in (errno.EBUSY, errno.EAGAIN) and time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
                raise AttestationError(
                    f"configfs-tsm read of {path.name} failed: {e.strerror}"
                ) from None

    def _generation(self, entry: Path) -> int:
        raw = self._read_attr(entry / "generation").strip()
        if not raw.isdigit():
            raise AttestationError("configfs-tsm generation is not a number")
        return int(raw)

    def event_log(self) -> list[RuntimeEvent]:
        """The runtime events measured into RTMR3 (empty if the log does not exist yet)."""
        return load_runtime_log(self.event_log_path)

    def collateral(self) -> dict[str, Any] | None:
        """DCAP collateral from ``collateral_path``, or None to let the KMS use its own."""
        if self.collateral_path is None:
            return None
        try:
            raw = self.collateral_path.read_bytes()[: MAX_COLLATERAL_SIZE + 1]
            if len(raw) > MAX_COLLATERAL_SIZE:
                raise AttestationError("collateral file too large")
            value = strict.loads(raw)
        except (OSError, ValueError) as e:
            raise AttestationError(f"cannot read collateral file: {e}") from None
        if not isinstance(value, dict):
            raise AttestationError("collateral file must hold a JSON object")
        return value

    def measurements(self) -> dict[str, str]:
        """This CVM's MRTD and RTMR0-3 (hex), read from a fresh quote."""
        fields = parse_quote(self.quote(bytes(REPORT_DATA_SIZE))).report.measurements()
        return {k: fields[k] for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")}
