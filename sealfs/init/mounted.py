"""What bringing one volume up produced: enough to measure it and to take it down again."""

from __future__ import annotations

from dataclasses import dataclass, field

from sealfs import failpoints

from .config import VolumeConfig

#: ``SEALFS_FAILPOINT=init:<point>`` SIGKILLs ``sealfs init up`` there (tests only; see
#: :mod:`sealfs.failpoints` for why this grants nothing).
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
    failpoints.reached(f"init:{name}")


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
