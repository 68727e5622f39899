"""One sealfs (FUSE) volume at boot: first-boot decision, creation, validation, the daemon.

The first-boot rules (docs/init.md, "First boot, explicitly and resumably"): the header is the
proof that a volume exists, and creation writes it last, so "no header" is the only state in
which anything is created, and that is decided from the disk before the KMS is asked. A ready
record (:data:`RECORD_NAME`, written after the first successful mount) makes a later missing
header a refusal instead of a re-creation; so does a pinned ``volume_id``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable

from sealfs.errors import FormatError, IntegrityError
from sealfs.fs.lifecycle import create_volume
from sealfs.fuse.mount import unmount
from sealfs.kms.client import KmsClient
from sealfs.store import HEADER_NAME, ObjectStore
from sealfs.volume.header import MAX_HEADER_BYTES, Header, KmsCredential

from .config import VolumeConfig
from .mounted import Mounted, crash_point

#: In the backing directory: this volume finished its first boot (plain JSON; its only power
#: is to forbid a re-creation, so a forged one can only deny service, which the host can
#: anyway).
RECORD_NAME = "sealfs-init.json"
MAX_RECORD_BYTES = 4096

#: Start the mount daemon for a volume with this credential; returns (pid, log file).
Starter = Callable[[VolumeConfig, KmsCredential], tuple[int, str]]


def up_sealfs(vol: VolumeConfig, client: KmsClient, start: Starter) -> Mounted:
    """Create (genuine first boot only), validate, mount. On failure nothing stays mounted."""
    steps: list[str] = []
    store = ObjectStore(vol.source)
    try:
        if not vol.source.is_dir() or not store.exists(HEADER_NAME):
            _create(vol, store, client)
            steps.append("created")
        raw = store.read_file(HEADER_NAME, MAX_HEADER_BYTES)
        initialised = store.exists(RECORD_NAME)
    finally:
        store.close()
    header = Header.from_bytes(raw)
    cred = KmsCredential(client, vol.volume_id)
    header.unlock(cred)  # the KMS key opens it and the header MAC holds (else: never mounted)
    anchor = client.get_epoch(header.volume_id)
    steps.append("validated")
    pid, log = start(vol, KmsCredential(client, header.volume_id))
    steps.append("mounted")
    mounted = Mounted(
        vol,
        str(uuid.UUID(bytes=header.volume_id)),
        hashlib.sha256(raw).digest(),
        anchor,
        pid,
        log,
        steps,
    )
    try:
        crash_point("mounted")
        if not initialised:
            _write_record(vol, mounted.volume_id)
            steps.append("ready")
            crash_point("ready-written")
    except BaseException:
        down_sealfs(vol)
        raise
    return mounted


def _create(vol: VolumeConfig, store: ObjectStore, client: KmsClient) -> None:
    """Create the volume, or refuse: only a backing directory without header may be used."""
    if vol.source.is_dir() and store.exists(RECORD_NAME):
        raise IntegrityError(
            f"{vol.source} has no volume header but its first boot completed: refusing to "
            "create a new volume over it (restore the header, e.g. from a backup)"
        )
    if vol.volume_id is not None:
        raise IntegrityError(
            f"{vol.source} holds no volume header, and the configuration pins volume "
            f"{uuid.UUID(bytes=vol.volume_id)}: a pinned volume is never re-created"
        )
    if not vol.create:
        raise FormatError(f'{vol.source} holds no sealfs volume, and create = "never"')
    crash_point("creating")
    owner = vol.owner or (None, None)
    create_volume(
        vol.source,
        [(KmsCredential(client), None)],
        compression=vol.compression,
        uid=owner[0],
        gid=owner[1],
        step=crash_point,
    )
    crash_point("created")


def _write_record(vol: VolumeConfig, volume_id: str) -> None:
    record = {"version": 1, "state": "ready", "name": vol.name, "volume_id": volume_id}
    store = ObjectStore(vol.source)
    try:
        store.replace_file(RECORD_NAME, json.dumps(record, sort_keys=True).encode() + b"\n")
    finally:
        store.close()


def down_sealfs(vol: VolumeConfig, timeout: float = 120.0) -> None:
    """Unmount and wait for the daemon's final commit (it flushes everything)."""
    unmount(vol.mountpoint, timeout)
