"""One LUKS volume at boot: ``sealfs luks up``'s resumable state machine, driven by the KMS.

Formatting happens only on a blank device (or to finish a format a crash interrupted), mkfs
only without the encrypted ready record (sealfs.luks.firstboot); ``create = "never"`` refuses
a device that is not yet formatted instead. The key binding is (app id, volume name).
"""

from __future__ import annotations

import hashlib

from sealfs.errors import FormatError, LuksError
from sealfs.kms.client import KmsClient
from sealfs.luks import cryptsetup as cs
from sealfs.luks import profile as P
from sealfs.luks.device import DeviceState, probe, read_exact
from sealfs.luks.firstboot import VolumeSpec, bring_down, bring_up
from sealfs.luks.fs import mountpoints_of
from sealfs.luks.keys import KmsKeySource
from sealfs.luks.volume import check_volume_key, mapper_path

from .config import VolumeConfig
from .mounted import Mounted


def _spec(vol: VolumeConfig, keys: KmsKeySource) -> VolumeSpec:
    return VolumeSpec(
        device=str(vol.source),
        name=vol.name,
        binding=keys.binding(vol.name),
        profile=P.LuksProfile(integrity="hmac-sha256" if vol.integrity else None),
        fs=vol.filesystem,
        mountpoint=str(vol.mountpoint) if vol.filesystem != "none" else None,
    )


def up_luks(vol: VolumeConfig, client: KmsClient) -> Mounted:
    """Validate the header strictly, open, fsck/mkfs once, mount; nothing open on failure.

    Everything that needs no device-mapper comes first — the device's state, the strict
    header validation and the KMS key against key slot 0 — so a host without dm-crypt (or a
    header that would be refused) fails before anything is written, and says which."""
    keys = KmsKeySource(client)
    spec = _spec(vol, keys)
    found = probe(spec.device, spec.profile)
    if found is DeviceState.FOREIGN:
        raise LuksError(
            f"{vol.source} holds data that is neither blank nor a sealfs LUKS header; "
            "refusing to format over it"
        )
    if found is DeviceState.LUKS:
        check_volume_key(
            spec.device,
            lambda hdr: keys.existing_key(spec.binding, hdr.kms_key_version),
            spec.profile,
        )
    elif not vol.create:
        raise FormatError(f'{vol.source} is not formatted yet, and create = "never"')
    cs.require_device_mapper()
    result = bring_up(spec, keys)
    header = read_exact(spec.device, 0, P.DATA_OFFSET)
    return Mounted(vol, result.uuid, hashlib.sha256(header).digest(), steps=result.steps)


def is_up_luks(vol: VolumeConfig) -> bool:
    """Whether the mapping is open and mounted where the configuration says."""
    if cs.mapping_status(vol.name) is None:
        return False
    return vol.filesystem == "none" or str(vol.mountpoint) in mountpoints_of(mapper_path(vol.name))


def down_luks(vol: VolumeConfig) -> None:
    """Unmount (the kernel flushes) and close the mapping."""
    bring_down(vol.name)
