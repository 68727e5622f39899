"""The runtime state file: what ``up`` did to each volume, for ``status`` and ``down``.

``<runtime_dir>/state.json`` (directory 0700, file 0600), on the CVM's own tmpfs (/run): it
lives exactly as long as the mounts it describes. It is informational — ``down`` and
``status`` check the live mount table too — and holds no secrets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sealfs import strict
from sealfs.errors import UsageError

STATE_NAME = "state.json"
MAX_STATE_BYTES = 1 << 20


def load_state(runtime_dir: Path) -> dict[str, dict[str, Any]]:
    """Per volume name, the last recorded state (empty if none or unreadable)."""
    try:
        fd = os.open(
            runtime_dir / STATE_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        )
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as f:
            data = strict.loads(f.read(MAX_STATE_BYTES))
    except (OSError, ValueError):
        return {}
    volumes = data.get("volumes") if isinstance(data, dict) else None
    return volumes if isinstance(volumes, dict) else {}


def save_state(runtime_dir: Path, volumes: dict[str, dict[str, Any]]) -> None:
    """Replace the state file atomically (temporary file, rename)."""
    tmp = runtime_dir / f".{STATE_NAME}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(runtime_dir, 0o700)
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "volumes": volumes}, f, indent=1, sort_keys=True)
        os.replace(tmp, runtime_dir / STATE_NAME)
    except OSError as e:
        raise UsageError(f"cannot write the state file in {runtime_dir}: {e.strerror}") from None
