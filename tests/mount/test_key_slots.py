"""`sealfs key`: slots added, removed and listed on real volumes, mounted or not; the last
slot is never removed. Crashes mid-replace and concurrent changes: test_header_change.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sealfs.store import HEADER_NAME
from tests.conftest import Volume, new_volume, sealfs

pytestmark = pytest.mark.mount

CHEAP_KDF = ("--kdf-memory", "8M", "--kdf-iterations", "1")


def secret_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def opens(vol: Volume, *unlock: str) -> bool:
    """Whether ``unlock`` opens the volume (a full check, exit 0 when intact)."""
    return sealfs("check", str(vol.backing), *unlock, check=False).returncode == 0


def slots(vol: Volume) -> list[dict[str, object]]:
    listed = json.loads(sealfs("key", "list", str(vol.backing), "--json").stdout)
    return list(listed["slots"])


def add(vol: Volume, *new: str) -> dict[str, object]:
    res = sealfs("key", "add", str(vol.backing), "--key-file", str(vol.key), *new, "--json")
    return dict(json.loads(res.stdout)["slot"])


def test_add_list_and_remove_slots(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    key2 = tmp_path / "key2"  # absent: generated, mode 0600
    pw = secret_file(tmp_path / "pw", b"a long recovery passphrase\n")
    assert add(vol, "--new-key-file", str(key2))["id"] == 1
    assert key2.stat().st_mode & 0o777 == 0o600 and key2.stat().st_size == 64
    assert add(vol, "--new-passphrase-file", str(pw), *CHEAP_KDF)["type"] == "passphrase"
    assert [(s["id"], s["type"]) for s in slots(vol)] == [
        (0, "keyfile"),
        (1, "keyfile"),
        (2, "passphrase"),
    ]
    assert opens(vol, "--key-file", str(key2)) and opens(vol, "--passphrase-file", str(pw))

    sealfs("key", "remove", str(vol.backing), "--passphrase-file", str(pw), "--slot", "0")
    assert [s["id"] for s in slots(vol)] == [1, 2]
    res = sealfs("check", str(vol.backing), "--key-file", str(vol.key), check=False)
    assert res.returncode == 3 and "no keyfile slot opens" in res.stderr
    assert opens(vol, "--key-file", str(key2)) and opens(vol, "--passphrase-file", str(pw))


def test_last_slot_is_never_removed(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    res = sealfs(
        "key", "remove", str(vol.backing), "--key-file", str(vol.key), "--slot", "0", check=False
    )
    assert res.returncode == 2 and "last key slot" in res.stderr
    res = sealfs(
        "key", "remove", str(vol.backing), "--key-file", str(vol.key), "--slot", "7", check=False
    )
    assert res.returncode == 2 and "no key slot 7" in res.stderr
    assert len(slots(vol)) == 1 and opens(vol, "--key-file", str(vol.key))


def test_wrong_credential_changes_nothing(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    wrong = secret_file(tmp_path / "wrong", os.urandom(64))
    before = (vol.backing / HEADER_NAME).read_bytes()
    res = sealfs(
        "key", "add", str(vol.backing), "--key-file", str(wrong),
        "--new-key-file", str(tmp_path / "k2"), check=False,
    )  # fmt: skip
    assert res.returncode == 3
    assert (vol.backing / HEADER_NAME).read_bytes() == before
    res = sealfs("key", "add", str(vol.backing), "--key-file", str(vol.key), check=False)
    assert res.returncode == 2 and "exactly one of --new-key-file" in res.stderr


def test_add_while_mounted(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    key2 = secret_file(tmp_path / "key2", os.urandom(48))  # an existing key file is used
    vol.mount()
    try:
        (vol.mnt / "before").write_text("written before")
        add(vol, "--new-key-file", str(key2))
        (vol.mnt / "after").write_text("written after")
        assert (vol.mnt / "before").read_text() == "written before"
    finally:
        vol.umount()
    assert key2.stat().st_size == 48  # used, not overwritten
    sealfs("mount", str(vol.backing), str(vol.mnt), "--key-file", str(key2))
    try:
        assert (vol.mnt / "after").read_text() == "written after"
    finally:
        vol.umount()


def test_help_says_rewrap_does_not_revoke() -> None:
    for cmd in (["key"], ["key", "add"], ["key", "remove"], ["key", "rotate"]):
        text = " ".join(sealfs(*cmd, "--help").stdout.split())
        assert "Re-wrapping does not revoke" in text and "sealfs rekey" in text
