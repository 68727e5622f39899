"""Crafted-header attacks: a real sealfs header, edited the way a malicious host would.

Each case takes a header that cryptsetup produced for sealfs, edits its JSON metadata (or
binary header), recomputes both copies' checksums, and then shows two things: what cryptsetup
makes of the result (mostly: it accepts it, which is why validation is needed) and that
sealfs's validator refuses it with a reason, before cryptsetup is ever asked to open it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sealfs.crypto import Secret
from sealfs.luks import header as H
from sealfs.luks import profile as P
from sealfs.luks.volume import check_volume_key, inspect_device

from . import attacker as A
from .conftest import Golden, clone

Meta = dict[str, Any]


def seg(meta: Meta) -> Meta:
    return meta["segments"]["0"]


def ks(meta: Meta, n: str = "0") -> Meta:
    return meta["keyslots"][n]


def _set(path: Callable[[Meta], Meta], key: str, value: Any) -> Callable[[Meta], None]:
    def mutate(meta: Meta) -> None:
        path(meta)[key] = value

    return mutate


def _extra_keyslot(meta: Meta) -> None:
    slot = copy.deepcopy(ks(meta))
    slot["area"]["offset"] = str(int(ks(meta)["area"]["offset"]) + int(ks(meta)["area"]["size"]))
    meta["keyslots"]["2"] = slot
    meta["digests"]["0"]["keyslots"] = ["0", "2"]


def _linear_segment(meta: Meta) -> None:
    meta["segments"]["0"] = {"type": "linear", "offset": "16777216", "size": "dynamic"}


def _extra_plain_segment(meta: Meta) -> None:
    seg(meta)["size"] = "8388608"
    meta["segments"]["1"] = {"type": "linear", "offset": "25165824", "size": "dynamic"}


def _token(meta: Meta) -> None:
    meta["tokens"]["0"] = {"type": "luks2-keyring", "keyslots": ["0"], "key_description": "x"}


def _external_token(meta: Meta) -> None:
    meta["tokens"]["0"] = {"type": "systemd-tpm2", "keyslots": ["0"], "tpm2-blob": "AA=="}


def _requirements(meta: Meta) -> None:
    meta["config"]["requirements"] = {"mandatory": ["online-reencrypt-v2"]}


def _flags(meta: Meta) -> None:
    meta["config"]["flags"] = ["allow-discards"]


def _integrity_added(meta: Meta) -> None:
    seg(meta)["integrity"] = {
        "type": "hmac(sha256)",
        "journal_encryption": "none",
        "journal_integrity": "none",
    }


def _pbkdf2_kdf(meta: Meta) -> None:
    ks(meta)["kdf"] = {
        "type": "pbkdf2",
        "hash": "sha256",
        "iterations": 1000,
        "salt": ks(meta)["kdf"]["salt"],
    }


def _second_digest(meta: Meta) -> None:
    meta["digests"]["1"] = copy.deepcopy(meta["digests"]["0"])


def _digest_without_segment(meta: Meta) -> None:
    meta["digests"]["0"]["segments"] = []


@dataclass(frozen=True)
class Attack:
    name: str
    mutate: Callable[[Meta], None]
    reason: str  # a fragment of sealfs's refusal reason
    cryptsetup_accepts: bool  # what the installed cryptsetup makes of the crafted header
    still_unlocks: bool | None = None  # the CVM's real key still opens it in cryptsetup


ATTACKS = [
    # The dstack advisory (CVE-2025-59054 class): data cipher set to cipher_null. The key slot
    # is untouched, so the CVM's real key still unlocks it and the volume would map plaintext.
    Attack(
        "segment-cipher-null", _set(seg, "encryption", "cipher_null-ecb"), "cipher_null", True, True
    ),
    # Key slot encrypted with cipher_null: with an empty passphrase (and with any passphrase
    # before cryptsetup 2.8.1) it opens without the real key.
    Attack(
        "keyslot-cipher-null",
        _set(lambda m: ks(m)["area"], "encryption", "cipher_null-ecb"),
        "cipher_null",
        True,
    ),
    Attack("segment-linear-plaintext", _linear_segment, "type 'linear'", True),
    Attack("extra-plaintext-segment", _extra_plain_segment, "exactly one segment", True),
    Attack("segment-offset-into-header", _set(seg, "offset", "0"), "data offset", True),
    Attack("segment-detached-offset", _set(seg, "offset", "20971520"), "data offset", True),
    Attack("segment-fixed-size", _set(seg, "size", "4096"), "size is fixed", True),
    Attack("segment-iv-tweak", _set(seg, "iv_tweak", "7"), "iv_tweak", True),
    Attack("segment-sector-512", _set(seg, "sector_size", 512), "sector size", True, True),
    Attack(
        "segment-cbc-essiv", _set(seg, "encryption", "aes-cbc-essiv:sha256"), "cipher", True, True
    ),
    Attack("segment-xts-plain32", _set(seg, "encryption", "aes-xts-plain"), "cipher", True, True),
    Attack("segment-integrity-added", _integrity_added, "has integrity", True, True),
    Attack("segment-flags", _set(seg, "flags", ["backup-final"]), "segment flags", False),
    Attack("extra-keyslot", _extra_keyslot, "keyslots", True, True),
    Attack(
        "keyslot-area-into-header",
        _set(lambda m: ks(m)["area"], "offset", "4096"),
        "outside",
        False,
    ),
    Attack(
        "keyslot-area-into-data",
        _set(lambda m: ks(m)["area"], "offset", "16777216"),
        "outside",
        False,
    ),
    Attack("keyslot-area-shrunk", _set(lambda m: ks(m)["area"], "size", "4096"), "size", True),
    Attack("keyslot-kdf-pbkdf2", _pbkdf2_kdf, "argon2id", True),
    Attack(
        "keyslot-kdf-memory-dos",
        _set(lambda m: ks(m)["kdf"], "memory", 64 * 1024 * 1024),
        "memory outside",
        True,
    ),
    Attack("keyslot-priority", _set(ks, "priority", 2), "unexpected field", True, True),
    Attack("keyslot-type-reencrypt", _set(ks, "type", "reencrypt"), "type", False),
    Attack("keyslot-af-stripes", _set(lambda m: ks(m)["af"], "stripes", 1), "stripes", True),
    Attack("token-keyring", _token, "tokens present", True, True),
    Attack("token-external-plugin", _external_token, "tokens present", True, True),
    Attack("requirements-reencrypt", _requirements, "requirements", False),
    Attack("persistent-flags-discards", _flags, "flags", True, True),
    Attack("second-digest", _second_digest, "exactly one digest", False),
    Attack("digest-without-segment", _digest_without_segment, "segment 0", False),
    Attack("json-size-claim", _set(lambda m: m["config"], "json_size", "4096"), "json_size", False),
    Attack(
        "unknown-top-level", _set(lambda m: m, "sealfs", {"x": 1}), "unexpected field", True, True
    ),
    Attack("type-confusion-bool", _set(seg, "sector_size", True), "not an integer", False),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_crafted_header_refused(attack: Attack, disk: Path, golden_plain: Golden) -> None:
    A.edit_json(disk, attack.mutate)
    region = bytes(A.read_region(disk))
    assert A.cryptsetup_accepts(disk) is attack.cryptsetup_accepts
    if attack.still_unlocks is not None:
        assert A.cryptsetup_unlocks(disk, golden_plain.key) is attack.still_unlocks
    with pytest.raises(H.HeaderRefused) as refused:
        H.validate_header_area(region, disk.stat().st_size, P.LuksProfile())
    assert attack.reason in refused.value.reason
    # The public entry point refuses before running cryptsetup with the key.
    with pytest.raises(H.HeaderRefused):
        check_volume_key(str(disk), Secret(golden_plain.key), P.LuksProfile())


def test_cipher_null_header_is_what_cryptsetup_would_use(disk: Path, golden_plain: Golden) -> None:
    """The headline attack end to end on the host: cryptsetup sees cipher_null and the CVM's
    key opens it (so an unvalidated open maps plaintext: proven for real in the VM tests)."""
    A.edit_json(disk, _set(seg, "encryption", "cipher_null-ecb"))
    assert A.cryptsetup_json(disk)["segments"]["0"]["encryption"] == "cipher_null-ecb"
    assert A.cryptsetup_unlocks(disk, golden_plain.key)
    report = inspect_device(str(disk), P.LuksProfile())
    assert not report.valid and "cipher_null" in (report.reason or "")


def test_secondary_copy_with_higher_seqid_refused(disk: Path) -> None:
    """Edit only the secondary copy and give it a higher seqid: the primary still looks
    perfect, yet cryptsetup prefers the secondary, and even "repairs" the primary from it."""
    A.edit_json(disk, _set(seg, "encryption", "cipher_null-ecb"), copies=(1,), seqid_bump=1)
    region = bytes(A.read_region(disk))
    assert A.metadata(disk, 0)["segments"]["0"]["encryption"] == P.CIPHER
    with pytest.raises(H.HeaderRefused, match="seqid"):
        H.validate_header_area(region, disk.stat().st_size, P.LuksProfile())
    # What cryptsetup does with it: uses the secondary, and rewrites the primary on disk.
    assert A.cryptsetup_json(disk)["segments"]["0"]["encryption"] == "cipher_null-ecb"
    assert A.metadata(disk, 0)["segments"]["0"]["encryption"] == "cipher_null-ecb"


def test_copies_with_same_seqid_but_different_json_refused(disk: Path) -> None:
    A.edit_json(disk, _set(seg, "encryption", "cipher_null-ecb"), copies=(1,))
    with pytest.raises(H.HeaderRefused, match="different JSON"):
        H.validate_header_area(bytes(A.read_region(disk)), disk.stat().st_size, P.LuksProfile())


def test_broken_primary_checksum_refused(disk: Path) -> None:
    """A corrupt primary is "repaired" from the secondary by cryptsetup; sealfs refuses to
    guess which copy the host meant."""
    region = A.read_region(disk)
    region[A.BIN_SIZE + 10] ^= 0x01  # flip a bit in the JSON, checksum not recomputed
    A.write_region(disk, region)
    assert A.cryptsetup_accepts(disk)
    with pytest.raises(H.HeaderRefused, match="primary header: checksum mismatch"):
        H.validate_header_area(bytes(region), disk.stat().st_size, P.LuksProfile())


def test_missing_secondary_refused(disk: Path) -> None:
    region = A.read_region(disk)
    region[A.HDR_SIZE : 2 * A.HDR_SIZE] = bytes(A.HDR_SIZE)
    A.write_region(disk, region)
    assert A.cryptsetup_accepts(disk)
    with pytest.raises(H.HeaderRefused, match="secondary header: bad magic"):
        H.validate_header_area(bytes(region), disk.stat().st_size, P.LuksProfile())


def test_duplicate_json_key_refused(disk: Path) -> None:
    """Two "segments" keys: parsers disagree on which one wins, so neither may be trusted."""
    meta = A.metadata(disk)
    text = json.dumps(meta, separators=(",", ":"))
    evil = json.dumps({"0": {**seg(meta), "encryption": "cipher_null-ecb"}}, separators=(",", ":"))
    text = text[:-1] + ',"segments":' + evil + "}"
    region = A.read_region(disk)
    A.set_json_text(region, text.encode())
    A.write_region(disk, region)
    with pytest.raises(H.HeaderRefused, match="duplicate key"):
        H.validate_header_area(bytes(region), disk.stat().st_size, P.LuksProfile())


def test_data_hidden_after_json_refused(disk: Path) -> None:
    meta = A.metadata(disk)
    text = json.dumps(meta, separators=(",", ":")).encode() + b"\0hidden"
    region = A.read_region(disk)
    A.set_json_text(region, text)
    A.write_region(disk, region)
    assert not A.cryptsetup_accepts(disk)  # this one cryptsetup catches too
    with pytest.raises(H.HeaderRefused, match="data after the JSON"):
        H.validate_header_area(bytes(region), disk.stat().st_size, P.LuksProfile())


@pytest.mark.parametrize(
    ("offset", "data", "reason"),
    [
        (24, b"evil-label", "label set"),
        (208, b"systemd", "subsystem set to something"),
        (208, b"sealfs-kms-v0", "subsystem set to something"),
        (208, b"sealfs-kms-v01", "subsystem set to something"),
        (208, b"sealfs-kms-v2147483648", "subsystem set to something"),
        (208, b"sealfs-kms-v1\0x", "subsystem set to something"),
        (300, b"\x01", "reserved bytes"),
        (168, b"not-a-uuid".ljust(40, b"\0"), "malformed UUID"),
    ],
    ids=[
        "label",
        "subsystem",
        "kms-v0",
        "kms-leading-zero",
        "kms-too-big",
        "kms-hidden-bytes",
        "reserved",
        "uuid",
    ],
)
def test_binary_header_fields_refused(disk: Path, offset: int, data: bytes, reason: str) -> None:
    A.edit_binary(disk, offset, data)
    with pytest.raises(H.HeaderRefused, match=reason):
        H.validate_header_area(bytes(A.read_region(disk)), disk.stat().st_size, P.LuksProfile())


def test_kms_key_version_field(disk: Path) -> None:
    """The one subsystem value sealfs writes is read back as the KMS key version; copies that
    disagree on it are refused like any other disagreement."""
    size = disk.stat().st_size
    assert (
        H.validate_header_area(bytes(A.read_region(disk)), size, P.LuksProfile()).kms_key_version
        is None
    )
    A.edit_binary(disk, 208, b"sealfs-kms-v7")
    info = H.validate_header_area(bytes(A.read_region(disk)), size, P.LuksProfile())
    assert info.kms_key_version == 7
    assert A.cryptsetup_accepts(disk)
    A.edit_binary(disk, 208, b"sealfs-kms-v8", copies=(1,))
    with pytest.raises(H.HeaderRefused, match="disagree: subsystem"):
        H.validate_header_area(bytes(A.read_region(disk)), size, P.LuksProfile())


def test_integrity_downgrade_refused(golden_plain: Golden) -> None:
    """A volume configured with integrity must never be opened from a header without it."""
    report = inspect_device(str(golden_plain.path), P.LuksProfile(integrity="hmac-sha256"))
    assert not report.valid
    assert "no integrity" in (report.reason or "")


def test_unexpected_recovery_slot_refused(golden_recovery: Golden) -> None:
    report = inspect_device(str(golden_recovery.path), P.LuksProfile())
    assert not report.valid and "keyslots" in (report.reason or "")


def test_missing_recovery_slot_refused(golden_plain: Golden) -> None:
    report = inspect_device(str(golden_plain.path), P.LuksProfile(recovery_slot=True))
    assert not report.valid and "keyslots" in (report.reason or "")


def test_overlapping_keyslot_areas_refused(golden_recovery: Golden, tmp_path: Path) -> None:
    disk = clone(golden_recovery, tmp_path / "r.img")
    A.edit_json(disk, lambda m: ks(m, "1")["area"].update(offset=ks(m, "0")["area"]["offset"]))
    with pytest.raises(H.HeaderRefused, match="overlap"):
        H.validate_header_area(
            bytes(A.read_region(disk)), disk.stat().st_size, golden_recovery.profile
        )
