"""``sealfs luks rekey`` and ``sealfs luks key`` on image files (offline; no device-mapper).

The data check decrypts the data area in the test with the volume keys cryptsetup reports
(``luksDump --dump-volume-key``): the plaintext must be the same before and after, and the old
volume key (from a header backup taken before, with the old passphrase) must no longer decrypt
any sector of it. The online variant with a mounted file system runs in the VM (tests/luks/dm).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sealfs.luks import header as H
from sealfs.luks import profile as P
from sealfs.luks.rekey import STAGING_KEYSLOT, read_rekey_state

from . import attacker as A
from .conftest import new_image, reencrypt_killed_after_progress, sealfs_cli, write_key

DATA = 8 * 1024 * 1024
SECTOR = P.SECTOR_SIZE


@pytest.fixture
def vol(tmp_path: Path) -> dict[str, Any]:
    """A formatted image (KMS slot from a key file, recovery slot) whose data area is full."""
    img = new_image(tmp_path / "img", P.DATA_OFFSET + DATA)
    key = write_key(tmp_path / "key", os.urandom(32))
    rec = write_key(tmp_path / "recovery", b"correct horse battery staple")
    run_ok("format", str(img), "--key-file", str(key), "--recovery-key-file", str(rec),
           "--recovery-iter-time", "100")  # fmt: skip
    with open(img, "r+b") as f:
        f.seek(P.DATA_OFFSET)
        f.write(os.urandom(DATA))
    backup = tmp_path / "old-header"
    run_ok("header-backup", str(img), str(backup), "--recovery-slot")
    return {
        "img": img,
        "key": key,
        "rec": rec,
        "backup": backup,
        "plain": plaintext(img, volume_key(img, key)),
        "old_vk": volume_key(img, key),
    }


def run_ok(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = sealfs_cli("luks", *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def rekey_args(v: dict[str, Any]) -> list[str]:
    return ["rekey", str(v["img"]), "--key-file", str(v["key"]), "--recovery-slot",
            "--recovery-key-file", str(v["rec"]), "--recovery-iter-time", "100"]  # fmt: skip


def volume_key(header: Path, key: Path) -> bytes:
    out = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file",
         str(key), str(header)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise ValueError(out.stderr.strip())
    text = out.stdout.split("MK dump:")[1]
    return bytes.fromhex("".join(text.split()))


def decrypt_sector(vk: bytes, ct: bytes, index: int) -> bytes:
    """aes-xts-plain64 with 4096-byte sectors: the IV counts 512-byte sectors."""
    d = Cipher(algorithms.AES(vk), modes.XTS(struct.pack("<QQ", index * 8, 0))).decryptor()
    return d.update(ct) + d.finalize()


def sectors(img: Path) -> list[bytes]:
    with open(img, "rb") as f:
        f.seek(P.DATA_OFFSET)
        data = f.read()
    return [data[i : i + SECTOR] for i in range(0, len(data), SECTOR)]


def plaintext(img: Path, vk: bytes) -> list[bytes]:
    return [decrypt_sector(vk, ct, i) for i, ct in enumerate(sectors(img))]


def assert_rekeyed(v: dict[str, Any]) -> None:
    """Same plaintext under a new key; the old header + old key decrypt none of it."""
    new_vk = volume_key(v["img"], v["key"])
    assert new_vk != v["old_vk"]
    assert plaintext(v["img"], new_vk) == v["plain"]
    assert volume_key(v["backup"], v["key"]) == v["old_vk"]  # the old copy still unwraps...
    stale = plaintext(v["img"], v["old_vk"])  # ...but its key opens nothing that remains
    assert not any(a == b for a, b in zip(stale, v["plain"], strict=True))
    info = H.validate_header_area(bytes(A.read_region(v["img"])), v["img"].stat().st_size,
                                  P.LuksProfile(recovery_slot=True))  # fmt: skip
    assert info.keyslots == (0, 1)
    for args in (["--key-file", str(v["key"])], ["--key-file", str(v["rec"]), "--use-recovery"]):
        run_ok("check-key", str(v["img"]), "--recovery-slot", *args)


def test_rekey_keeps_the_data_and_revokes_the_old_volume_key(vol: dict[str, Any]) -> None:
    out = run_ok(*rekey_args(vol))
    assert out["steps"] == ["staged", "re-encrypted", "slots rewritten"] and not out["resumed"]
    assert_rekeyed(vol)


@pytest.mark.parametrize("point", ["rekey-staged", "rekey-reencrypted", "rekey-finishing"])
def test_rekey_continues_after_a_crash_between_steps(vol: dict[str, Any], point: str) -> None:
    crashed = sealfs_cli("luks", *rekey_args(vol), env={"SEALFS_FAILPOINT": f"luks:{point}"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # Every other command refuses the half-done header; only the rekey itself continues.
    refused = sealfs_cli("luks", "check-key", str(vol["img"]), "--key-file", str(vol["key"]),
                         "--recovery-slot")  # fmt: skip
    assert refused.returncode == 10 and "LUKS header refused" in refused.stderr
    out = run_ok(*rekey_args(vol))
    assert out["resumed"]
    assert_rekeyed(vol)


def test_rekey_resumes_a_reencryption_killed_mid_way(vol: dict[str, Any]) -> None:
    """cryptsetup reencrypt (as the rekey runs it, 4 KiB hotzones) SIGKILLed after its first
    progress report, then `sealfs luks rekey` again: cryptsetup's resume finishes it."""
    crashed = sealfs_cli("luks", *rekey_args(vol), env={"SEALFS_FAILPOINT": "luks:rekey-staged"})
    assert crashed.returncode == -signal.SIGKILL
    reencrypt_killed_after_progress(str(vol["img"]), str(vol["key"]), "--force-offline-reencrypt")
    state = read_rekey_state(str(vol["img"]), P.LuksProfile(recovery_slot=True))
    assert state.reencrypting
    out = run_ok(*rekey_args(vol))
    assert out["resumed"] and out["steps"][-2:] == ["re-encrypted", "slots rewritten"]
    assert out["steps"][:-2] in ([], ["recovered"])  # "recovered": killed inside a hotzone
    assert_rekeyed(vol)


def _reencrypting_metadata(tmp_path: Path, vol: dict[str, Any]) -> Path:
    """An image paused inside a re-encryption (cryptsetup --init-only)."""
    crashed = sealfs_cli("luks", *rekey_args(vol), env={"SEALFS_FAILPOINT": "luks:rekey-staged"})
    assert crashed.returncode == -signal.SIGKILL
    subprocess.run(
        ["cryptsetup", "reencrypt", "--init-only", "--batch-mode", "--key-file", str(vol["key"]),
         "--key-slot", str(STAGING_KEYSLOT), "--resilience", "checksum",
         "--force-offline-reencrypt", "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4",
         "--pbkdf-memory", "32", "--pbkdf-parallel", "1", str(vol["img"])],
        check=True, capture_output=True,
    )  # fmt: skip
    return Path(vol["img"])


def _null_new_segment(m: dict[str, Any]) -> None:
    m["segments"]["0"]["encryption"] = "cipher_null-ecb"


def _linear_segment(m: dict[str, Any]) -> None:
    m["segments"]["0"] = {"type": "linear", "offset": str(P.DATA_OFFSET), "size": "dynamic"}


def _no_resilience(m: dict[str, Any]) -> None:
    slot = next(k for k, v in m["keyslots"].items() if v["type"] == "reencrypt")
    m["keyslots"][slot]["area"] = {"type": "none", "offset": "0", "size": "0"}


def _backward(m: dict[str, Any]) -> None:
    slot = next(k for k, v in m["keyslots"].items() if v["type"] == "reencrypt")
    m["keyslots"][slot]["direction"] = "backward"


def _gap(m: dict[str, Any]) -> None:
    m["segments"]["0"]["offset"] = str(P.DATA_OFFSET + SECTOR)
    m["segments"]["0"]["iv_tweak"] = str(SECTOR // 512)


def _requirement_only(m: dict[str, Any]) -> None:
    slot = next(k for k, v in m["keyslots"].items() if v["type"] == "reencrypt")
    del m["keyslots"][slot]


def _reencrypt_slot(m: dict[str, Any]) -> dict[str, Any]:
    slot: dict[str, Any] = next(v for v in m["keyslots"].values() if v["type"] == "reencrypt")
    return slot


def _decrypt_mode(m: dict[str, Any]) -> None:
    _reencrypt_slot(m)["mode"] = "decrypt"  # cryptsetup would write the data back in plaintext


def _null_final_backup(m: dict[str, Any]) -> None:
    final = next(v for v in m["segments"].values() if v.get("flags") == ["backup-final"])
    final["encryption"] = "cipher_null-ecb"  # the target of the re-encryption: plaintext


def _datashift(m: dict[str, Any]) -> None:
    area = _reencrypt_slot(m)["area"]
    area.update(type="datashift", shift_size=str(SECTOR))
    del area["hash"], area["sector_size"]


def _second_reencrypt_slot(m: dict[str, Any]) -> None:
    extra = json.loads(json.dumps(_reencrypt_slot(m)))
    extra["area"]["offset"] = str(2 * P.HDR_SIZE + P.KEYSLOTS_SIZE - 4096)
    extra["area"]["size"] = "4096"
    m["keyslots"][str(min(set(range(8)) - set(map(int, m["keyslots"]))))] = extra


@pytest.mark.parametrize(
    "mutate",
    [_null_new_segment, _linear_segment, _no_resilience, _backward, _gap, _requirement_only,
     _decrypt_mode, _null_final_backup, _datashift, _second_reencrypt_slot],
)  # fmt: skip
def test_rekey_validator_refuses_a_forged_reencryption(
    tmp_path: Path, vol: dict[str, Any], mutate: Callable[[dict[str, Any]], None]
) -> None:
    img = _reencrypting_metadata(tmp_path, vol)
    profile = P.LuksProfile(recovery_slot=True)
    assert read_rekey_state(str(img), profile).reencrypting
    with pytest.raises(H.HeaderRefused):
        H.validate_header_area(bytes(A.read_region(img)), img.stat().st_size, profile)
    A.edit_json(img, mutate)
    with pytest.raises(H.HeaderRefused):
        read_rekey_state(str(img), profile)
    refused = sealfs_cli("luks", *rekey_args(vol))
    assert refused.returncode == 10 and "LUKS header refused" in refused.stderr


def test_rekey_needs_the_recovery_passphrase_and_refuses_integrity(vol: dict[str, Any]) -> None:
    no_rec = sealfs_cli("luks", "rekey", str(vol["img"]), "--key-file", str(vol["key"]),
                        "--recovery-slot")  # fmt: skip
    assert no_rec.returncode == 2 and "--recovery-key-file" in no_rec.stderr
    integ = sealfs_cli("luks", "rekey", str(vol["img"]), "--key-file", str(vol["key"]),
                       "--integrity", "hmac-sha256")  # fmt: skip
    assert integ.returncode == 2 and "dm-integrity" in integ.stderr
    wrong = write_key(Path(vol["key"]).with_name("wrong"), os.urandom(32))
    bad = sealfs_cli("luks", "rekey", str(vol["img"]), "--key-file", str(wrong),
                     "--recovery-slot", "--recovery-key-file", str(vol["rec"]))  # fmt: skip
    assert bad.returncode == 3, bad.stderr
    assert volume_key(vol["img"], vol["key"]) == vol["old_vk"]  # untouched


def test_key_list_add_remove_keep_the_volume_key_and_the_last_slot(
    tmp_path: Path, vol: dict[str, Any]
) -> None:
    img, key = str(vol["img"]), str(vol["key"])
    listed = run_ok("key", "list", img, "--recovery-slot")
    assert [(s["slot"], s["role"]) for s in listed["slots"]] == [(0, "kms"), (1, "recovery")]
    last = sealfs_cli("luks", "key", "remove", img, "--key-file", key, "--recovery-slot",
                      "--slot", "0")  # fmt: skip
    assert last.returncode == 10 and "refusing to remove key slot 0" in last.stderr
    run_ok("key", "remove", img, "--key-file", key, "--recovery-slot", "--slot", "1")
    assert [s["slot"] for s in run_ok("key", "list", img)["slots"]] == [0]
    with pytest.raises(ValueError):  # the recovery passphrase opens nothing any more
        volume_key(vol["img"], vol["rec"])
    only = sealfs_cli("luks", "key", "remove", img, "--key-file", key, "--slot", "0")
    assert only.returncode == 10 and "last slot" in only.stderr
    typed = write_key(tmp_path / "typed", b"a new recovery passphrase\n")
    run_ok("key", "add", img, "--key-file", key, "--new-passphrase-file", str(typed),
           "--recovery-iter-time", "100")  # fmt: skip
    as_typed = write_key(tmp_path / "as-typed", b"a new recovery passphrase")
    run_ok("check-key", img, "--key-file", str(as_typed), "--recovery-slot", "--use-recovery")
    # Re-wrapping only: the volume key is unchanged and the old header copy still opens it.
    assert volume_key(vol["img"], vol["key"]) == vol["old_vk"]
    assert volume_key(vol["backup"], vol["rec"]) == vol["old_vk"]
    again = sealfs_cli("luks", "key", "add", img, "--key-file", key, "--recovery-slot",
                       "--new-key-file", str(typed))  # fmt: skip
    assert again.returncode == 2 and "already has a recovery slot" in again.stderr


@pytest.mark.parametrize("newer", [0, 1])
def test_rekey_continues_from_header_copies_one_update_apart(
    vol: dict[str, Any], newer: int
) -> None:
    """A crash between cryptsetup's writes of the two header copies (either order): the rekey
    accepts the pair because each copy passes alone, and cryptsetup continues from the newer."""
    crashed = sealfs_cli("luks", *rekey_args(vol), env={"SEALFS_FAILPOINT": "luks:rekey-staged"})
    assert crashed.returncode == -signal.SIGKILL
    before = A.read_region(vol["img"])
    subprocess.run(
        ["cryptsetup", "config", "--subsystem", "sealfs-kms-v7", str(vol["img"])],
        check=True, capture_output=True,
    )  # fmt: skip
    after = A.read_region(vol["img"])
    torn = bytearray(after)
    stale = slice((1 - newer) * P.HDR_SIZE, (2 - newer) * P.HDR_SIZE)
    torn[stale] = before[stale]
    A.write_region(vol["img"], torn)
    profile = P.LuksProfile(recovery_slot=True)
    with pytest.raises(H.HeaderRefused, match="disagree"):
        H.validate_header_area(bytes(torn), vol["img"].stat().st_size, profile)
    assert read_rekey_state(str(vol["img"]), profile).info.kms_key_version == 7
    out = run_ok(*rekey_args(vol))
    assert out["resumed"] and out["online"] is None
    assert_rekeyed(vol)


def test_rekey_refuses_header_copies_further_apart(vol: dict[str, Any]) -> None:
    before = A.read_region(vol["img"])
    for version in (7, 8):
        subprocess.run(
            ["cryptsetup", "config", "--subsystem", f"sealfs-kms-v{version}", str(vol["img"])],
            check=True, capture_output=True,
        )  # fmt: skip
    torn = A.read_region(vol["img"])
    torn[P.HDR_SIZE : 2 * P.HDR_SIZE] = before[P.HDR_SIZE : 2 * P.HDR_SIZE]
    A.write_region(vol["img"], torn)
    refused = sealfs_cli("luks", *rekey_args(vol))
    assert refused.returncode == 10 and "disagree: seqid" in refused.stderr


@pytest.mark.parametrize("torn", [0, 1], ids=["primary-torn", "secondary-torn"])
def test_rekey_continues_from_a_torn_header_copy(vol: dict[str, Any], torn: int) -> None:
    """A crash inside cryptsetup's write of one header copy leaves its checksum wrong (so
    cryptsetup ignores that copy): the rekey goes on from the other one."""
    crashed = sealfs_cli("luks", *rekey_args(vol), env={"SEALFS_FAILPOINT": "luks:rekey-staged"})
    assert crashed.returncode == -signal.SIGKILL
    region = A.read_region(vol["img"])
    off = torn * P.HDR_SIZE + H.BINARY_HEADER_SIZE + 100
    region[off : off + 8] = b"\xff" * 8  # half-written JSON, checksum left as it was
    A.write_region(vol["img"], region)
    out = run_ok(*rekey_args(vol))
    assert out["resumed"]
    assert_rekeyed(vol)


def test_rekey_refuses_a_torn_primary_with_a_planted_secondary(vol: dict[str, Any]) -> None:
    region = A.read_region(vol["img"])
    region[H.BINARY_HEADER_SIZE + 100 : H.BINARY_HEADER_SIZE + 108] = b"\xff" * 8
    region[4 * P.HDR_SIZE : 4 * P.HDR_SIZE + 6] = H.MAGIC_SECONDARY  # cryptsetup would scan it
    A.write_region(vol["img"], region)
    refused = sealfs_cli("luks", *rekey_args(vol))
    assert refused.returncode == 10 and "another secondary header" in refused.stderr
