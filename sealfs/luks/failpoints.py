"""Named crash points, so tests can kill a real first boot at each step boundary.

Setting ``SEALFS_LUKS_CRASH_AT=<name>`` makes the process SIGKILL itself when it reaches that
point: no cleanup handlers, no unmount, no close, like a crash. Unset (always, outside tests)
this costs one environment lookup. It grants nothing: whoever can set this process's
environment can kill it anyway.
"""

from __future__ import annotations

import os
import signal

ENV = "SEALFS_LUKS_CRASH_AT"

POINTS = (
    "header-body-written",
    "header-secondary-magic-written",
    "header-committed",
    "opened",
    "mkfs-done",
    "mounted",
    "ready-written",
)

#: Import of a bundle (sealfs.luks.bundle): after each data chunk written to the target.
BUNDLE_POINTS = ("bundle-chunk-written",)


def reached(name: str, env: str = ENV) -> None:
    """SIGKILL this process if the environment variable ``env`` names this crash point."""
    if os.environ.get(env) == name:
        os.kill(os.getpid(), signal.SIGKILL)
