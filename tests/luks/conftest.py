"""Fixtures for the LUKS tests: real cryptsetup, real LUKS2 headers on sparse image files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sealfs.crypto import Secret
from sealfs.luks import cryptsetup as cs
from sealfs.luks import profile as P
from sealfs.luks.cryptsetup import KdfCost
from sealfs.luks.rekey import STAGING_KEYSLOT
from sealfs.luks.volume import format_volume

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32 * 1024 * 1024  # 16 MiB header region + 16 MiB data
#: The recovery slot normally gets a benchmarked (slow) argon2id; tests use the minimum.
FAST_RECOVERY = KdfCost(iterations=4, memory_kib=32, threads=1)

if shutil.which("cryptsetup", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
    pytest.skip("cryptsetup is not installed (package cryptsetup-bin)", allow_module_level=True)


@dataclass(frozen=True)
class Golden:
    """A header formatted once per session by sealfs (through real cryptsetup)."""

    path: Path
    key: bytes
    recovery: bytes | None
    profile: P.LuksProfile


def new_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def clone(golden: Golden, dest: Path) -> Path:
    shutil.copyfile(golden.path, dest)
    return dest


def write_key(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def sealfs_cli(
    *args: str, input: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real ``python -m sealfs`` command line."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sealfs", *args],
        input=input.decode() if input else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=full_env,
    )


@pytest.fixture(scope="session")
def golden_plain(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    path = new_image(tmp_path_factory.mktemp("golden") / "plain.img")
    key = os.urandom(32)
    format_volume(str(path), Secret(key), P.LuksProfile())
    return Golden(path, key, None, P.LuksProfile())


@pytest.fixture(scope="session")
def golden_recovery(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    path = new_image(tmp_path_factory.mktemp("golden") / "recovery.img")
    key, recovery = os.urandom(32), b"correct horse battery staple\n"
    profile = P.LuksProfile(recovery_slot=True)
    format_volume(
        str(path), Secret(key), profile, recovery=Secret(recovery), recovery_cost=FAST_RECOVERY
    )
    return Golden(path, key, recovery, profile)


@pytest.fixture
def disk(golden_plain: Golden, tmp_path: Path) -> Path:
    """A fresh copy of a sealfs-formatted image (no recovery slot, no integrity)."""
    return clone(golden_plain, tmp_path / "disk.img")


@pytest.fixture
def cryptsetup_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every cryptsetup run from this process, recorded (argv, env, stdin); the real binary
    still runs."""
    calls: list[dict[str, Any]] = []
    real_run = subprocess.run

    def spy(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append(
            {
                "argv": list(argv),
                "env": dict(kw.get("env") or {}),
                "input": kw.get("input"),
                "pass_fds": kw.get("pass_fds"),
            }
        )
        return real_run(argv, **kw)

    monkeypatch.setattr(cs.subprocess, "run", spy)
    return calls


def reencrypt_killed_after_progress(device: str, key_file: str, *extra: str) -> None:
    """Run ``cryptsetup reencrypt`` as ``sealfs luks rekey`` does after its staging step, but
    with 4 KiB hotzones, and SIGKILL it on its first progress report that shows work done (an
    event, not a delay: with thousands of hotzones it cannot finish in its first second)."""
    proc = subprocess.Popen(
        ["cryptsetup", "reencrypt", "--batch-mode", "--key-file", key_file,
         "--key-slot", str(STAGING_KEYSLOT), "--resilience", "checksum", "--pbkdf", "argon2id",
         "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32", "--pbkdf-parallel", "1",
         "--hotzone-size", "4096", "--progress-json", "--progress-frequency", "1", *extra,
         device],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    done = total = 0
    for line in proc.stdout:
        report = json.loads(line)
        done, total = int(report["device_bytes"]), int(report["device_size"])
        if done > 0:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert 0 < done < total, "cryptsetup finished before its first progress report"
