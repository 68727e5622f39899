"""The one LUKS2 shape sealfs formats, and therefore the only shape it will open.

The profile is *trusted configuration* (the CVM's measured volume list or the command line),
never something read from the disk: whether a volume has dm-integrity or a recovery key slot
must be known before the header is looked at, otherwise a host could strip integrity from a
header and the validator would happily accept the weaker shape (a downgrade).
"""

from __future__ import annotations

from dataclasses import dataclass

from sealfs.errors import UsageError

CIPHER = "aes-xts-plain64"
#: XTS with two AES-256 keys.
CIPHER_KEY_BYTES = 64
SECTOR_SIZE = 4096
#: Binary header + JSON area of one header copy (cryptsetup's default and smallest size).
HDR_SIZE = 16384
JSON_SIZE = HDR_SIZE - 4096
#: Where the encrypted data starts; the same 16 MiB dstack uses, holding both header copies
#: and the keyslot area.
DATA_OFFSET = 16 * 1024 * 1024
KEYSLOTS_SIZE = DATA_OFFSET - 2 * HDR_SIZE
AF_STRIPES = 4000
AF_HASH = "sha256"
DIGEST_HASH = "sha256"

#: Key slot numbers are fixed so the validator can insist on them.
KMS_KEYSLOT = 0
RECOVERY_KEYSLOT = 1

#: The KMS slot is unlocked with a 256-bit random key, so stretching it buys nothing; the
#: minimum argon2id cost keeps boots (and emulated test VMs) fast. The recovery slot holds a
#: human passphrase and gets cryptsetup's benchmarked cost instead.
KMS_SLOT_ARGON2_TIME = 4  # iterations (cryptsetup's minimum)
KMS_SLOT_ARGON2_MEMORY_KIB = 32  # cryptsetup's minimum
KMS_SLOT_ARGON2_THREADS = 1

#: Supported authenticated modes: sealfs name (cryptsetup ``--integrity``) -> (name in the
#: LUKS2 JSON, bytes the integrity algorithm adds to the volume key).
INTEGRITY_MODES: dict[str, tuple[str, int]] = {
    "hmac-sha256": ("hmac(sha256)", 32),
}


@dataclass(frozen=True)
class LuksProfile:
    """What a sealfs LUKS2 volume must look like: the fixed shape plus the two options."""

    integrity: str | None = None
    recovery_slot: bool = False

    def __post_init__(self) -> None:
        if self.integrity is not None and self.integrity not in INTEGRITY_MODES:
            raise UsageError(
                f"unsupported integrity mode {self.integrity!r} "
                f"(supported: {', '.join(sorted(INTEGRITY_MODES))})"
            )

    @property
    def volume_key_bytes(self) -> int:
        """Size of the LUKS volume key: the XTS key, plus the HMAC key with integrity."""
        extra = INTEGRITY_MODES[self.integrity][1] if self.integrity else 0
        return CIPHER_KEY_BYTES + extra

    @property
    def integrity_json_name(self) -> str | None:
        return INTEGRITY_MODES[self.integrity][0] if self.integrity else None

    @property
    def keyslots(self) -> tuple[int, ...]:
        return (KMS_KEYSLOT, RECOVERY_KEYSLOT) if self.recovery_slot else (KMS_KEYSLOT,)

    def describe(self) -> str:
        parts = [f"{CIPHER} {CIPHER_KEY_BYTES * 8}-bit", f"sector {SECTOR_SIZE}"]
        parts.append(f"integrity {self.integrity}" if self.integrity else "no integrity")
        parts.append("recovery slot" if self.recovery_slot else "no recovery slot")
        return ", ".join(parts)
