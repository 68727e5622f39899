"""``sealfs luks rekey``: re-encrypt a LUKS2 volume under a new volume key, resumably.

Changing a key slot's passphrase only re-wraps the volume key: an old header copy plus an old
passphrase still opens the data. A rekey replaces the volume key itself (``cryptsetup
reencrypt``), so nothing an attacker kept from before opens what is on the disk afterwards.

The run is a sequence of steps on the device's own header, each one a single cryptsetup
metadata update, and the state each step leaves is recognisable from the header alone, so a
rerun after a crash continues from where it stopped:

1. *stage*: add the passphrase of the KMS key's current version as key slot
   :data:`STAGING_KEYSLOT` (same old volume key) and record that version in the header;
2. *re-encrypt*: ``cryptsetup reencrypt --key-slot 7`` creates a new random volume key in a
   new slot under that passphrase, re-encrypts the data (online when the device is mapped),
   and at the end wipes every slot of the old key (cryptsetup resumes its own progress);
3. *finish*: put the new key back at slot 0 (and the recovery passphrase at slot 1), then
   wipe the slot the re-encryption used.

The header is validated (:func:`sealfs.luks.header.validate_rekey_area`) before every step and
the final one strictly, like any open.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sealfs import failpoints
from sealfs.crypto import Secret
from sealfs.errors import LuksError, UnlockError, UsageError

from . import cryptsetup as cs
from . import header as H
from . import profile as P
from .device import check_device_path, is_block_device, read_exact
from .device import device_size as get_device_size
from .keys import KeyBinding, KeySource
from .snapshot import HeaderSnapshot

#: The slot the new passphrase is staged in before the re-encryption (never used otherwise).
STAGING_KEYSLOT = 7


@dataclass
class RekeyResult:
    device: str
    uuid: str
    kms_key_version: int | None
    #: The run continued an interrupted one.
    resumed: bool
    steps: list[str] = field(default_factory=list)
    #: The mapping the data was re-encrypted through (online), or None (offline).
    online: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_rekey_state(device: str, profile: P.LuksProfile) -> H.RekeyHeaderInfo:
    """Validate the device's header as a rekey may have left it."""
    size = get_device_size(device)
    return H.validate_rekey_area(read_exact(device, 0, P.DATA_OFFSET), size, profile)


def rekey_volume(
    device: str,
    keys: KeySource,
    binding: KeyBinding,
    profile: P.LuksProfile,
    *,
    recovery: Secret | None,
    recovery_cost: cs.KdfCost = cs.RECOVERY_SLOT_COST,
    hotzone_bytes: int | None = None,
    on_progress: Callable[[cs.ReencryptProgress], None] = lambda _: None,
) -> RekeyResult:
    """Re-encrypt ``device`` under a new volume key, or finish a rekey that was interrupted."""
    if profile.integrity:
        raise UsageError(
            "cryptsetup cannot re-encrypt a volume with dm-integrity; copy the data to a newly "
            "formatted volume instead"
        )
    if profile.recovery_slot != (recovery is not None):
        raise UsageError(
            "a volume with --recovery-slot needs --recovery-key-file: a rekey rewrites every "
            "key slot, the recovery slot included (the same passphrase or a new one)"
        )
    check_device_path(device)
    state = read_rekey_state(device, profile)
    canonical = not state.reencrypting and state.info.keyslots == profile.keyslots
    result = RekeyResult(device, state.info.uuid, state.info.kms_key_version, not canonical)
    if canonical:
        _stage(device, keys, binding, state.info)
        result.steps.append("staged")
        failpoints.reached("luks:rekey-staged")
        state = read_rekey_state(device, profile)
    elif not state.reencrypting and STAGING_KEYSLOT in state.info.keyslots:
        state = _settle_staging(device, keys, binding, profile, state.info)
    if state.reencrypting or STAGING_KEYSLOT in state.info.keyslots:
        key = keys.existing_key(binding, state.info.kms_key_version)
        result.online = cs.active_mapping(state.info.uuid)

        def run() -> None:
            cs.reencrypt(
                device,
                key,
                keyslot=None if state.reencrypting else STAGING_KEYSLOT,
                resume=state.reencrypting,
                active_name=result.online,
                offline_file=not is_block_device(device),
                hotzone_bytes=hotzone_bytes,
                on_progress=on_progress,
            )

        try:
            run()
        except cs.ReencryptionCrashed:
            # Killed inside a hotzone: cryptsetup restores it, then resumes.
            cs.recover_reencryption(device, key)
            result.steps.append("recovered")
            state = read_rekey_state(device, profile)
            run()
        result.steps.append("re-encrypted")
        failpoints.reached("luks:rekey-reencrypted")
        state = read_rekey_state(device, profile)
    if state.reencrypting:
        raise LuksError(f"{device}: cryptsetup left the re-encryption unfinished; rerun the rekey")
    _finish(device, keys, binding, profile, state.info, recovery, recovery_cost)
    result.steps.append("slots rewritten")
    info = _final_check(device, keys, binding, profile)
    result.kms_key_version = info.kms_key_version
    return result


def _stage(device: str, keys: KeySource, binding: KeyBinding, info: H.HeaderInfo) -> None:
    """Step 1: the current KMS key version's passphrase in the staging slot, version recorded."""
    old = keys.existing_key(binding, info.kms_key_version)
    new = keys.new_key(binding)
    cs.add_key(device, old, new.passphrase, STAGING_KEYSLOT, cs.KMS_SLOT_COST)
    failpoints.reached("luks:rekey-staging-slot-added")
    if new.key_version is not None and new.key_version != info.kms_key_version:
        cs.set_subsystem(device, H.kms_subsystem(new.key_version))


def _settle_staging(
    device: str, keys: KeySource, binding: KeyBinding, profile: P.LuksProfile, info: H.HeaderInfo
) -> H.RekeyHeaderInfo:
    """A run stopped inside step 1: record the staged key's version, or stage again.

    The staged passphrase is the KMS key's current version; if the header does not record
    it yet, record it, unless the KMS has moved on since (then the staging slot is wiped with
    the old key, which still opens slot 0, and staged anew).
    """
    new = keys.new_key(binding)
    if new.key_version is not None and new.key_version != info.kms_key_version:
        with HeaderSnapshot.capture(device) as snap:
            if H.validate_rekey_area(snap.read(), snap.device_size, profile).info != info:
                raise LuksError(f"{device}: the header changed during the rekey")
            try:
                cs.check_key(snap, device, new.passphrase, STAGING_KEYSLOT)
                staged = True
            except UnlockError:
                staged = False
        if staged:
            cs.set_subsystem(device, H.kms_subsystem(new.key_version))
        else:
            old = keys.existing_key(binding, info.kms_key_version)
            cs.kill_slot(device, old, STAGING_KEYSLOT)
            _stage(device, keys, binding, info)
    return read_rekey_state(device, profile)


def _finish(
    device: str,
    keys: KeySource,
    binding: KeyBinding,
    profile: P.LuksProfile,
    info: H.HeaderInfo,
    recovery: Secret | None,
    recovery_cost: cs.KdfCost,
) -> None:
    """Step 3: the one volume key at slot 0 (and 1), the re-encryption's slot wiped.

    Outside a re-encryption the validator admits a single volume key, so every slot present
    opens the new one: adding and wiping slots here never touches an old key.
    """
    key = keys.existing_key(binding, info.kms_key_version)
    slots = set(info.keyslots)
    if P.KMS_KEYSLOT not in slots:
        cs.add_key(device, key, key, P.KMS_KEYSLOT, cs.KMS_SLOT_COST)
    if recovery is not None and P.RECOVERY_KEYSLOT not in slots:
        cs.add_key(device, key, recovery, P.RECOVERY_KEYSLOT, recovery_cost)
    for slot in sorted(slots - set(profile.keyslots)):
        failpoints.reached("luks:rekey-finishing")
        cs.kill_slot(device, key, slot)


def _final_check(
    device: str, keys: KeySource, binding: KeyBinding, profile: P.LuksProfile
) -> H.HeaderInfo:
    """The result must be a header any sealfs open accepts, and the key must open slot 0."""
    snap = HeaderSnapshot.capture(device)
    with snap:
        try:
            info = H.validate_header_area(snap.read(), snap.device_size, profile)
        except H.HeaderRefused as e:
            raise LuksError(
                f"the rekey left a header sealfs does not accept ({e.reason}); keep the device "
                "as it is and report this"
            ) from None
        cs.check_key(snap, device, keys.existing_key(binding, info.kms_key_version), 0)
    return info
