"""``sealfs luks key list/add/remove``: the recovery key slot, re-wrapped without re-encrypting.

Adding or removing a slot changes which passphrases unwrap the volume key, never the key
itself: a header copy taken before the change still opens the data with whatever passphrase
it held then. Revoking that needs ``sealfs luks rekey``. The slots stay where the validator
insists on them: slot 0 is the KMS (or key file) slot every open uses, slot 1 the recovery
slot. Each change is one cryptsetup header update on the device, after the unlocking key was
checked against the validated header, and the result is validated against the new profile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sealfs import strict
from sealfs.crypto import Secret
from sealfs.errors import LuksError, UsageError

from . import cryptsetup as cs
from . import header as H
from . import profile as P
from .keys import MAX_PASSPHRASE
from .volume import KeyFor, resolve_key, validated_snapshot

ROLES = {P.KMS_KEYSLOT: "kms", P.RECOVERY_KEYSLOT: "recovery"}


@dataclass(frozen=True)
class SlotInfo:
    slot: int
    role: str
    kdf: str
    kdf_time: int
    kdf_memory_kib: int
    #: KMS key version of slot 0 (None: formatted from a key file; always None for slot 1).
    kms_key_version: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_slots(device: str, profile: P.LuksProfile) -> tuple[H.HeaderInfo, list[SlotInfo]]:
    """The key slots of the validated header (reads only; needs no key)."""
    snap, info = validated_snapshot(device, profile)
    with snap:
        region = snap.read()
    meta = H.load_json_area(region[H.BINARY_HEADER_SIZE : P.HDR_SIZE], "primary header")
    out = []
    for slot in info.keyslots:
        kdf = meta["keyslots"][str(slot)]["kdf"]
        out.append(
            SlotInfo(
                slot=slot,
                role=ROLES[slot],
                kdf=kdf["type"],
                kdf_time=kdf["time"],
                kdf_memory_kib=kdf["memory"],
                kms_key_version=info.kms_key_version if slot == P.KMS_KEYSLOT else None,
            )
        )
    return info, out


def read_new_secret(path: str, passphrase: bool) -> Secret:
    """A new slot's secret: a key file verbatim, or a passphrase file minus one final newline."""
    raw = strict.read_secret_file(path, "new key file", MAX_PASSPHRASE)
    if passphrase and raw.endswith(b"\n"):
        raw = raw[:-1]
    if not raw:
        raise UsageError(f"{path}: empty; a key slot needs a non-empty passphrase")
    return Secret(raw)


def add_recovery(
    device: str, key: KeyFor, profile: P.LuksProfile, new: Secret, cost: cs.KdfCost
) -> H.HeaderInfo:
    """Add ``new`` as the recovery slot (slot 1) of a volume that has none yet."""
    if profile.recovery_slot:
        raise UsageError(
            "the volume already has a recovery slot (slot 1): remove it first, or run "
            "'sealfs luks rekey' to replace every key"
        )
    snap, info = validated_snapshot(device, profile)
    with snap:
        unlock = resolve_key(key, info)
        cs.check_key(snap, device, unlock, P.KMS_KEYSLOT)
    cs.add_key(device, unlock, new, P.RECOVERY_KEYSLOT, cost)
    return _validated_after(device, P.LuksProfile(profile.integrity, recovery_slot=True))


def remove_slot(device: str, key: KeyFor, profile: P.LuksProfile, slot: int) -> H.HeaderInfo:
    """Wipe the recovery slot; slot 0 stays, and must open with ``key`` first."""
    if slot not in profile.keyslots:
        raise UsageError(f"the volume has no key slot {slot} (slots: {list(profile.keyslots)})")
    if slot == P.KMS_KEYSLOT:
        raise LuksError(
            "refusing to remove key slot 0: it is the slot every open uses, and the last one "
            "that opens the volume without the recovery passphrase (to replace its key, run "
            "'sealfs luks rekey')"
            if profile.recovery_slot
            else "refusing to remove key slot 0: it is the last slot that opens the volume"
        )
    snap, info = validated_snapshot(device, profile)
    with snap:
        unlock = resolve_key(key, info)
        cs.check_key(snap, device, unlock, P.KMS_KEYSLOT)
    cs.kill_slot(device, unlock, slot)
    return _validated_after(device, P.LuksProfile(profile.integrity, recovery_slot=False))


def _validated_after(device: str, profile: P.LuksProfile) -> H.HeaderInfo:
    snap, info = validated_snapshot(device, profile)
    snap.close()
    return info
