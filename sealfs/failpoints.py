"""Crash points for tests only: kill this process at one named step of a multi-step change.

Crash-safety claims ("a crash at any point leaves the old or the new header") are proved by
crashing there for real. ``SEALFS_FAILPOINT=<point>`` in the environment arms one point; when
the code reaches it, the process SIGKILLs itself (no cleanup, no ``finally``, no buffered
output flushed: what a crash leaves is what is on disk). Unset, a point costs one environment
lookup; points sit between steps that do I/O, never in a loop over requests. Operators have no
use for it, and it grants nothing: whoever sets this process's environment can kill it anyway.

Points: ``<file>:<step>`` for each atomic replace of a backing-directory file (the store's
``replace_file``), e.g. ``sealfs.header:after-write``, with the steps of :data:`REPLACE_STEPS`;
``rekey:<phase>`` at the phase boundaries of a re-key (``sealfs.fs.rekey.CRASH_POINTS``);
``luks:<step>`` in LUKS format, first boot, bundle import and rekey
(``sealfs.luks.firstboot.CRASH_POINTS`` and the calls in sealfs/luks); ``init:<step>`` in
``sealfs init up`` (``sealfs.init.mounted.CRASH_POINTS``).
"""

from __future__ import annotations

import os
import signal

ENV = "SEALFS_FAILPOINT"
#: The steps of an atomic replace, in order (see ``ObjectStore.replace_file``).
REPLACE_STEPS = ("after-create", "after-write", "after-fsync", "after-rename", "after-dir-fsync")


def reached(point: str) -> None:
    """Die here if ``point`` is the armed one."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
