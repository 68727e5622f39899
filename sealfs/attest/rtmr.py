"""Extending RTMR3 with a runtime event, and keeping the event log that explains it in step.

A measurement is two writes that must agree: the log line a verifier replays, and the extend
of the register the quote reports. :func:`measure` appends the line first (fsynced), then
extends; if the extend fails the line is cut off again, so a failure that is reported leaves
log and register agreeing. Two registers implement :class:`Rtmr3`: the kernel's TDX interface
(:class:`KernelRtmr3`) and the simulated TEE's (``sealfs.attest.simulated``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from sealfs.attest.eventlog import (
    RTMR_SIZE,
    RuntimeEvent,
    append_runtime_event,
    truncate_runtime_log,
)
from sealfs.errors import AttestationError

#: Linux >= 6.16 (drivers/virt/coco/tdx-guest): writing a 48-byte digest to this attribute
#: extends RTMR3 (TDG.MR.RTMR.EXTEND).
KERNEL_RTMR3 = Path("/sys/class/misc/tdx_guest/measurements/rtmr3:sha384")


class Rtmr3(Protocol):
    def extend(self, digest: bytes) -> None:
        """Extend RTMR3 with a 48-byte digest."""
        ...


class KernelRtmr3:
    """RTMR3 of this TDX guest, through the kernel's measurement attribute."""

    def __init__(self, path: Path = KERNEL_RTMR3) -> None:
        self.path = path

    def available(self) -> bool:
        return self.path.exists()

    def extend(self, digest: bytes) -> None:
        if len(digest) != RTMR_SIZE:
            raise ValueError("an RTMR3 digest is 48 bytes")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise AttestationError(
                f"cannot extend RTMR3 through {self.path}: {e.strerror} (a TDX guest with "
                "Linux >= 6.16 is needed)"
            ) from None
        try:
            if os.write(fd, digest) != RTMR_SIZE:
                raise AttestationError("short write extending RTMR3")
        except OSError as e:
            raise AttestationError(f"extending RTMR3 failed: {e.strerror}") from None
        finally:
            os.close(fd)


def measure(log_path: str | os.PathLike[str], register: Rtmr3, event: RuntimeEvent) -> None:
    """Record ``event`` in the runtime log and extend RTMR3 with its digest."""
    before = append_runtime_event(log_path, event)
    try:
        register.extend(event.digest())
    except BaseException:
        truncate_runtime_log(log_path, before)
        raise
