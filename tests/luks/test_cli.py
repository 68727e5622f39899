"""``sealfs luks`` command line on real image files, plus key handling rules."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sealfs.crypto import Secret
from sealfs.errors import UsageError
from sealfs.luks import cryptsetup as cs
from sealfs.luks import profile as P
from sealfs.luks.keys import KeyBinding, KeyFileSource, read_key_file
from sealfs.luks.volume import check_volume_key, format_volume

from . import attacker as A
from .conftest import FAST_RECOVERY, Golden, new_image, sealfs_cli, write_key


def test_format_status_backup_restore(tmp_path: Path) -> None:
    img = new_image(tmp_path / "vol.img")
    key = write_key(tmp_path / "kms.key", os.urandom(32))
    res = sealfs_cli("luks", "format", str(img), "--key-file", str(key), "--json")
    assert res.returncode == 0, res.stderr
    uuid = json.loads(res.stdout)["uuid"]

    res = sealfs_cli("luks", "status", str(img), "--json")
    assert res.returncode == 0
    report = json.loads(res.stdout)
    assert report["valid"] and report["header"]["uuid"] == uuid

    res = sealfs_cli("luks", "format", str(img), "--key-file", str(key))
    assert res.returncode == 10 and "refusing to format" in res.stderr

    backup = tmp_path / "hdr.bak"
    assert sealfs_cli("luks", "header-backup", str(img), str(backup)).returncode == 0
    A.edit_json(img, lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"))
    res = sealfs_cli("luks", "status", str(img))
    assert res.returncode == 10 and "cipher_null" in res.stdout
    # Same volume (UUID), refused header: restore replaces it without --force.
    res = sealfs_cli("luks", "header-restore", str(img), str(backup), "--json")
    assert res.returncode == 0, res.stderr
    assert sealfs_cli("luks", "status", str(img)).returncode == 0
    # A header that validates is only replaced with --force.
    res = sealfs_cli("luks", "header-restore", str(img), str(backup))
    assert res.returncode == 10 and "--force" in res.stderr
    assert sealfs_cli("luks", "header-restore", str(img), str(backup), "--force").returncode == 0


def test_format_with_recovery_slot(tmp_path: Path) -> None:
    img = new_image(tmp_path / "vol.img")
    key = write_key(tmp_path / "kms.key", os.urandom(32))
    rec = write_key(tmp_path / "recovery", b"a long recovery passphrase\n")
    # The recovery slot gets cryptsetup's benchmarked argon2id cost (shortened here).
    res = sealfs_cli(
        "luks",
        "format",
        str(img),
        "--key-file",
        str(key),
        "--recovery-key-file",
        str(rec),
        "--recovery-iter-time",
        "200",
    )
    assert res.returncode == 0, res.stderr
    assert sealfs_cli("luks", "status", str(img)).returncode == 10
    assert sealfs_cli("luks", "status", str(img), "--recovery-slot").returncode == 0
    meta = A.cryptsetup_json(img)
    assert meta["keyslots"]["1"]["kdf"]["type"] == "argon2id"
    assert A.cryptsetup_unlocks(img, b"a long recovery passphrase\n", keyslot=1)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_file_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    img = new_image(tmp_path / "vol.img")
    key = write_key(tmp_path / "kms.key", os.urandom(32), mode)
    res = sealfs_cli("luks", "format", str(img), "--key-file", str(key))
    assert res.returncode == 2
    assert "chmod 600" in res.stderr and "Traceback" not in res.stderr
    assert not any(A.read_region(img))


def test_key_file_rules(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="empty"):
        read_key_file(str(write_key(tmp_path / "empty", b"")))
    with pytest.raises(UsageError, match="does not exist"):
        read_key_file(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="larger"):
        read_key_file(str(write_key(tmp_path / "big", b"x" * 5000)))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # so that opening it does not block
    try:
        with pytest.raises(UsageError, match="not a regular file"):
            read_key_file(str(fifo))
    finally:
        os.close(fd)
    secret = KeyFileSource(str(write_key(tmp_path / "ok", b"pass\n"))).luks_passphrase(
        KeyBinding("app", "vol")
    )
    assert secret.reveal() == b"pass\n"  # verbatim: the newline is part of the passphrase
    assert "pass" not in repr(secret) and "pass" not in str(secret)


def test_binding_ids_validated() -> None:
    with pytest.raises(UsageError):
        KeyBinding("app id with spaces", "vol")
    with pytest.raises(UsageError):
        KeyBinding("app", "")


def test_bad_input_is_one_line_no_traceback(tmp_path: Path, golden_plain: Golden) -> None:
    key = write_key(tmp_path / "k", golden_plain.key)
    cases: list[tuple[list[str], int]] = [
        (["luks", "format", str(tmp_path / "nope.img"), "--key-file", str(key)], 2),
        (["luks", "format", str(tmp_path), "--key-file", str(key)], 2),
        (["luks", "status", str(tmp_path / "nope.img")], 2),
        (["luks", "open", str(golden_plain.path), "bad/name", "--key-file", str(key)], 2),
        (["luks", "header-restore", str(golden_plain.path), str(key)], 10),
        (
            ["luks", "open", str(golden_plain.path), "x", "--key-file", str(key), "--use-recovery"],
            2,
        ),
    ]
    for args, code in cases:
        res = sealfs_cli(*args)
        assert res.returncode == code, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sealfs: error:"), (args, res.stderr)


def test_open_without_device_mapper_is_one_clear_line(tmp_path: Path, golden_plain: Golden) -> None:
    if cs.device_mapper_available():
        pytest.skip("this kernel has device-mapper (the VM tests cover open)")
    key = write_key(tmp_path / "k", golden_plain.key)
    for args in (
        ["open", str(golden_plain.path), "data"],
        ["up", str(golden_plain.path), "data", "--mountpoint", str(tmp_path / "m")],
    ):
        res = sealfs_cli("luks", *args, "--key-file", str(key))
        assert res.returncode == 10
        assert res.stderr.strip().splitlines() == ["sealfs: error: " + cs.NO_DEVICE_MAPPER]
    res = sealfs_cli("luks", "close", "data")
    assert res.returncode == 10 and "device-mapper is not available" in res.stderr


def assert_secrets_only_on_stdin(calls: list[dict[str, Any]], needles: list[bytes]) -> None:
    """No needle in any cryptsetup argv or environment; the environment is the fixed two
    variables; every call that takes a key takes it as --key-file=- (stdin)."""
    assert calls
    for call in calls:
        blob = "\0".join(call["argv"] + [f"{k}={v}" for k, v in call["env"].items()]).encode()
        assert not any(n in blob for n in needles), call["argv"]
        assert set(call["env"]) == {"PATH", "LC_ALL"}
        assert "--key-file=-" in call["argv"]


def test_secrets_never_in_argv_or_environment(
    tmp_path: Path, cryptsetup_calls: list[dict[str, Any]]
) -> None:
    """Spy on every cryptsetup invocation (the real binary still runs): keys travel only on
    stdin or through a pipe, never in argv or the environment. (The KMS path: test_kms.py.)"""
    calls = cryptsetup_calls
    key, recovery = os.urandom(32), b"recovery-passphrase-for-the-spy-test"
    img = new_image(tmp_path / "vol.img")
    profile = P.LuksProfile(recovery_slot=True)
    format_volume(
        str(img), Secret(key), profile, recovery=Secret(recovery), recovery_cost=FAST_RECOVERY
    )
    check_volume_key(str(img), Secret(key), profile)
    assert len(calls) == 3
    needles = [key, key.hex().encode(), recovery]
    assert_secrets_only_on_stdin(calls, needles)
    assert calls[0]["input"] == key and calls[2]["input"] == key
    assert not any(n in (tmp_path / "vol.img").read_bytes()[:4096] for n in needles)


TOOL = Path(__file__).resolve().parents[2] / "tools" / "sealfs-luks"


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import sys

    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SEALFS_PYTHON": sys.executable}
    full.update(env or {})
    return subprocess.run(
        ["sh", str(TOOL), *args], capture_output=True, text=True, env=full, timeout=120, check=False
    )


def test_shell_entry_point(tmp_path: Path, golden_plain: Golden, golden_recovery: Golden) -> None:
    res = run_tool("check", str(golden_plain.path))
    assert res.returncode == 0 and "valid sealfs LUKS2 header" in res.stdout
    assert run_tool("check", str(golden_recovery.path)).returncode == 10
    assert (
        run_tool("check", str(golden_recovery.path), env={"SEALFS_RECOVERY_SLOT": "1"}).returncode
        == 0
    )
    res = run_tool("check", str(golden_plain.path), env={"SEALFS_INTEGRITY": "hmac-sha256"})
    assert res.returncode == 10 and "no integrity" in res.stdout
    res = run_tool("up", str(golden_plain.path), "data", str(tmp_path / "m"))
    assert res.returncode == 2 and res.stderr.strip() == (
        "sealfs: error: set SEALFS_KMS (with SEALFS_APP_ID and SEALFS_VOLUME_ID) or SEALFS_KEY_FILE"
    )
    assert run_tool().returncode == 2
    assert run_tool("frobnicate").returncode == 2
    if not cs.device_mapper_available():
        key = write_key(tmp_path / "k", golden_plain.key)
        res = run_tool(
            "up",
            str(golden_plain.path),
            "data",
            str(tmp_path / "m"),
            env={"SEALFS_KEY_FILE": str(key)},
        )
        assert res.returncode == 10
        assert res.stderr.strip() == "sealfs: error: " + cs.NO_DEVICE_MAPPER
