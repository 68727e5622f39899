"""The volume commands as a user meets them: clear one-line errors and exit codes, never a
traceback, and every unlock path (key file, recovery passphrase) on real volumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import Volume, new_volume, sealfs


def no_traceback(res) -> None:  # type: ignore[no-untyped-def]
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert len(res.stderr.strip().splitlines()) <= 1, res.stderr


def test_info_shows_public_header_and_no_secrets(tmp_path: Path) -> None:
    vol = new_volume(tmp_path, "--compression", "lz4", "--block-size", "64K")
    info = json.loads(sealfs("info", str(vol.backing), "--json").stdout)
    assert info["ok"] and info["compression"] == "lz4" and info["block_size"] == 65536
    assert info["format_version"] == 2 and [s["type"] for s in info["slots"]] == ["keyfile"]
    assert "wrapped" not in json.dumps(info) and "salt" not in json.dumps(info)


def test_passphrase_slot_unlocks_mount(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    pw.chmod(0o600)
    vol = Volume(tmp_path / "b", tmp_path / "unused", tmp_path / "m", tmp_path / "log")
    vol.mnt.mkdir()
    sealfs(
        "create",
        str(vol.backing),
        "--passphrase-file",
        str(pw),
        "--kdf-memory",
        "8M",
        "--kdf-iterations",
        "1",
    )
    sealfs("mount", str(vol.backing), str(vol.mnt), "--passphrase-file", str(pw))
    try:
        (vol.mnt / "f").write_text("via passphrase")
    finally:
        sealfs("umount", str(vol.mnt))
    # the passphrase can also come on standard input (not a terminal)
    sealfs(
        "mount",
        str(vol.backing),
        str(vol.mnt),
        "--passphrase",
        input=b"correct horse battery staple\n",
    )
    try:
        assert (vol.mnt / "f").read_text() == "via passphrase"
    finally:
        sealfs("umount", str(vol.mnt))
    res = sealfs(
        "mount",
        str(vol.backing),
        str(vol.mnt),
        "--passphrase",
        input=b"wrong horse battery staple\n",
        check=False,
    )
    assert res.returncode == 3 and "wrong passphrase" in res.stderr
    no_traceback(res)


@pytest.mark.parametrize(
    "case",
    [
        "wrong-key",
        "group-readable",
        "short-key",
        "missing-key",
        "no-volume",
        "missing-mountpoint",
        "corrupt-header",
        "newer-version",
        "no-credential",
        "not-empty",
    ],
)
def test_user_mistakes_get_one_line_and_exit_code(
    volume: Volume, tmp_path: Path, case: str
) -> None:
    key, backing, mnt = str(volume.key), str(volume.backing), str(volume.mnt)
    bad = tmp_path / "bad.key"
    args: list[str]
    if case == "wrong-key":
        bad.write_bytes(os.urandom(64))
        bad.chmod(0o600)
        args, code, words = ["mount", backing, mnt, "--key-file", str(bad)], 3, "wrong key"
    elif case == "group-readable":
        bad.write_bytes(os.urandom(64))
        bad.chmod(0o640)
        args, code, words = ["mount", backing, mnt, "--key-file", str(bad)], 2, "chmod 600"
    elif case == "short-key":
        bad.write_bytes(b"short")
        bad.chmod(0o600)
        args, code, words = ["mount", backing, mnt, "--key-file", str(bad)], 2, "at least 32"
    elif case == "missing-key":
        args, code, words = ["mount", backing, mnt, "--key-file", str(bad)], 2, "does not exist"
    elif case == "no-volume":
        args, code, words = ["mount", str(tmp_path), mnt, "--key-file", key], 4, "not a sealfs"
    elif case == "missing-mountpoint":
        args, code, words = (
            ["mount", backing, str(tmp_path / "nope"), "--key-file", key],
            2,
            "does not exist",
        )
    elif case == "corrupt-header":
        (volume.backing / "sealfs.header").write_text("{not json")
        args, code, words = ["mount", backing, mnt, "--key-file", key], 4, "not valid JSON"
    elif case == "newer-version":
        h = json.loads((volume.backing / "sealfs.header").read_text())
        h["format_version"] = 99
        (volume.backing / "sealfs.header").write_text(json.dumps(h))
        args, code, words = ["info", backing], 4, "newer than this sealfs supports"
    elif case == "no-credential":
        args, code, words = ["mount", backing, mnt], 2, "exactly one of"
    else:
        args, code, words = (
            ["create", str(volume.backing / "objects"), "--key-file", key],
            2,
            "not empty",
        )
    res = sealfs(*args, check=False)
    assert res.returncode == code, (res.returncode, res.stderr)
    assert words in res.stderr, res.stderr
    no_traceback(res)


HOSTILE_HEADER_EDITS = {
    "created-1e400": lambda h: h.update(created=1e400),  # OverflowError before
    "block-size-string": lambda h: h.update(block_size="131072"),
    "slot-id-minus-1": lambda h: h["slots"][0].update(id=-1),  # struct.error before
    "slot-id-2^64": lambda h: h["slots"][0].update(id=2**64),
    "slot-id-true": lambda h: h["slots"][0].update(id=True),
    "duplicate-slot-id": lambda h: h["slots"].append(dict(h["slots"][0])),
    "nested-2000": lambda h: h.update(x=[[[]]]),  # replaced by 2,000 levels below
    # each passphrase slot may cost 4 GiB of argon2id to try: their number is bounded
    "17-slots": lambda h: h["slots"].extend(dict(h["slots"][0], id=i) for i in range(1, 17)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADER_EDITS))
@pytest.mark.parametrize("command", ["info", "mount"])
def test_hostile_header_values_are_format_errors(volume: Volume, case: str, command: str) -> None:
    """Values a host can write into the unauthenticated header (issue 10, item 8) are a
    one-line format error (exit 4), never an internal error (exit 1 with a traceback)."""
    path = volume.backing / "sealfs.header"
    h = json.loads(path.read_text())
    HOSTILE_HEADER_EDITS[case](h)
    text = json.dumps(h).replace("[[[]]]", "[" * 2000 + "]" * 2000)
    path.write_text(text)
    args = (
        ["info", str(volume.backing)]
        if command == "info"
        else ["mount", str(volume.backing), str(volume.mnt), "--key-file", str(volume.key)]
    )
    res = sealfs(*args, check=False)
    assert res.returncode == 4, (res.returncode, res.stderr)
    no_traceback(res)


def test_json_errors_are_machine_readable(tmp_path: Path) -> None:
    res = sealfs("info", str(tmp_path), "--json", check=False)
    assert res.returncode == 4
    doc = json.loads(res.stdout)
    assert doc == {"ok": False, "error": "format", "message": doc["message"]}


def test_create_refuses_existing_volume_and_key_overwrite(volume: Volume) -> None:
    res = sealfs("create", str(volume.backing), "--key-file", str(volume.key), check=False)
    assert res.returncode == 2 and "already holds a sealfs volume" in res.stderr
    res = sealfs(
        "create", str(volume.backing.parent / "new"), "--new-key-file", str(volume.key), check=False
    )
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr


def test_help_is_complete() -> None:
    for cmd in ("create", "mount", "umount", "info"):
        text = sealfs(cmd, "--help").stdout
        assert "Usage:" in text and len(text) > 300
    assert "Exit codes" in sealfs("--help").stdout
