"""The runtime event that records a mounted volume in RTMR3 (docs/init.md, "Measurement")."""

from __future__ import annotations

import json

from sealfs.attest.eventlog import RuntimeEvent

from .mounted import Mounted

EVENT_VOLUME = "sealfs-volume"
PAYLOAD_VERSION = 1


def volume_payload(m: Mounted) -> bytes:
    """Canonical JSON binding the volume id, its header hash and the anchored commit."""
    epoch, head = m.anchor
    body = {
        "v": PAYLOAD_VERSION,
        "name": m.vol.name,
        "kind": m.vol.kind,
        "mountpoint": str(m.vol.mountpoint),
        "volume_id": m.volume_id,
        "header_sha256": m.header_sha256.hex(),
        "anchor_epoch": epoch,
        "anchor_head": head.hex(),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def volume_event(m: Mounted) -> RuntimeEvent:
    return RuntimeEvent(EVENT_VOLUME, volume_payload(m))
