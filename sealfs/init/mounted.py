"""What bringing one volume up produced: enough to measure it and to take it down again."""

from __future__ import annotations

from dataclasses import dataclass, field

from sealfs.luks import failpoints

from .config import VolumeConfig

#: ``SEALFS_INIT_CRASH_AT=<point>`` SIGKILLs ``sealfs init up`` there (tests only; see
#: sealfs.luks.failpoints for why this grants nothing).
CRASH_ENV = "SEALFS_INIT_CRASH_AT"
CRASH_POINTS = (
    "creating",
    "root-written",
    "checkpoint-written",
    "created",
    "mounted",
    "ready-written",
    "measured",
)


def crash_point(name: str) -> None:
    failpoints.reached(name, CRASH_ENV)


@dataclass
class Mounted:
    """A volume this run mounted (or found up), with what its measurement binds."""

    vol: VolumeConfig
    volume_id: str
    header_sha256: bytes
    anchor: tuple[int, bytes] = (0, b"")
    pid: int | None = None
    log: str | None = None
    steps: list[str] = field(default_factory=list)
